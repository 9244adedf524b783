"""Budget solver: the design document's question answered by hand, constraints rechecked, brute force."""

import itertools

import pytest

from model import make_config
from planner.flops import count_flops
from planner.params import count_params
from planner.solver import Budget, SearchSpace, pareto_front, solve
from planner.workload import Workload


def test_mini_to_200m_with_50m_active_matches_the_hand_derivation():
    # Chronos-mini: D 384, F 1536, H·Dk 512, 4 + 4 blocks, V 4096; router width 256.
    d, f, a, v, r = 384, 1536, 512, 4096, 256
    encoder = 4 * (4 * d * a + 2 * d * f + 2 * d) + 32 * 8 + d
    decoder = 4 * (8 * d * a + 2 * d * f + 3 * d) + 32 * 8 + d
    dense = v * d + encoder + decoder
    per_expert = (d * 4 * d + 4 * d) + (4 * d * d + d) + 2 * d + d * v  # FFN 4D, LayerNorm, LM head
    router_fixed, router_per_expert = d * r + r, r + 1
    # total(E) = dense + router_fixed + E·(per_expert + r + 1): closest E to 200M.
    best_e = min(range(1, 129), key=lambda e: abs(dense + router_fixed + e * (per_expert + router_per_expert) - 200_000_000))
    total = dense + router_fixed + best_e * (per_expert + router_per_expert)
    # active(K) = total − (E − K)·per_expert ≤ 50M: the largest K.
    best_k = max(k for k in range(1, 17) if total - (best_e - k) * per_expert <= 50_000_000)

    result = solve(make_config("mini"), 200_000_000, Budget("active_params", 50_000_000),
                   architectures=["shared_then_expert"], space=SearchSpace(router_widths=(256,)))
    top = result.candidates[0]
    assert (top.config.num_experts, top.config.top_k) == (best_e, best_k) == (65, 10)
    assert top.total_params == total
    assert top.active_params == total - (best_e - best_k) * per_expert


@pytest.mark.parametrize("budget", [Budget("active_params", 40_000_000), Budget("flop_ratio", 2.0),
                                    Budget("forward_flops", 3e10), Budget("train_memory", 3 * 2**30)])
def test_every_solution_satisfies_its_constraint(budget):
    workload = Workload()
    space = SearchSpace(max_experts=24, max_top_k=4, router_widths=(128, 256))
    result = solve(make_config("mini"), 120_000_000, budget, workload=workload, space=space)
    assert result.candidates
    dense_forward = count_flops(make_config("mini"), workload).forward_flops
    for candidate in result.candidates + result.pareto_front:
        params = count_params(candidate.config)
        assert candidate.total_params == params.total_params
        assert candidate.active_params == params.active_params
        if budget.kind == "active_params":
            measured = params.active_params
        elif budget.kind == "flop_ratio":
            measured = count_flops(candidate.config, workload).forward_flops / dense_forward
        elif budget.kind == "forward_flops":
            measured = count_flops(candidate.config, workload).forward_flops / workload.batch_size
        else:
            from planner.memory import estimate_memory

            measured = estimate_memory(candidate.config, workload, params).training.total_bytes
        assert measured == pytest.approx(candidate.budget_value, rel=1e-12)
        assert measured <= budget.limit


def test_best_solution_equals_brute_force_on_a_small_space():
    base, target, budget = make_config("tiny"), 30_000_000, Budget("flop_ratio", 1.6)
    workload = Workload(batch_size=2, context_length=64, prediction_length=16)
    space = SearchSpace(max_experts=12, max_top_k=3, router_widths=(64, 256), token_block_patterns=("every_second",))
    result = solve(base, target, budget, workload=workload, space=space)
    dense_forward = count_flops(base, workload).forward_flops
    brute = []
    for architecture, experts, top_k, width in itertools.product(
            ("shared_then_expert", "expert_only", "token_ffn"), range(1, 13), range(1, 4), (64, 256)):
        if top_k > experts or (architecture == "token_ffn" and width != base.router_hidden_dim):
            continue
        config = make_config("tiny", architecture=architecture, num_experts=experts, top_k=top_k, router_hidden_dim=width)
        ratio = count_flops(config, workload).forward_flops / dense_forward
        if ratio <= budget.limit:
            brute.append((abs(count_params(config).total_params - target), -ratio, experts, config))
    best_distance = min(b[0] for b in brute)
    top = result.candidates[0]
    assert abs(top.total_params - target) == best_distance
    assert len({(c.config.architecture, c.config.num_experts, c.config.top_k, c.config.router_hidden_dim)
                for c in result.candidates}) == len(result.candidates)


def test_pareto_front_keeps_only_undominated_points():
    result = solve(make_config("tiny"), 40_000_000, Budget("active_params", 15_000_000),
                   space=SearchSpace(max_experts=16, max_top_k=4, router_widths=(256,)))
    front = result.pareto_front
    assert all(a.active_params < b.active_params and a.total_params < b.total_params for a, b in zip(front, front[1:]))
    for candidate in result.candidates:
        assert any(p.active_params <= candidate.active_params and p.total_params >= candidate.total_params for p in front)
    assert pareto_front([]) == ()


@pytest.mark.parametrize(("call", "field"), [
    (lambda: Budget("speed", 1), "budget kind"),
    (lambda: Budget("active_params", 0), "budget limit"),
    (lambda: SearchSpace(max_experts=0), "max_experts"),
    (lambda: SearchSpace(token_block_patterns=("sometimes",)), "token_block_patterns"),
    (lambda: solve(make_config("tiny"), -5, Budget("active_params", 1e7)), "target"),
    (lambda: solve(make_config("tiny"), 10**8, Budget("active_params", 1e7), architectures=["x"]), "architectures"),
])
def test_bad_solver_input_names_the_field(call, field):
    with pytest.raises(ValueError, match=field):
        call()


def test_trainable_parameter_budget_counts_what_requires_grad():
    """Fine-tuning a frozen backbone: the budget is on the parameters that learn, counted on the built model."""
    from model import build_model

    limit = 5_000_000
    result = solve(make_config("tiny"), 30_000_000, Budget("trainable_params", limit),
                   workload=Workload(trainable="experts_and_router"), space=SearchSpace(max_experts=8, max_top_k=2),
                   limit=6)
    assert result.candidates
    for candidate in result.candidates:
        c = candidate.config
        model = build_model("tiny", device="meta", trainable="experts_and_router", architecture=c.architecture,
                            num_experts=c.num_experts, top_k=c.top_k, router_hidden_dim=c.router_hidden_dim,
                            encoder_moe_blocks=c.encoder_moe_blocks, decoder_moe_blocks=c.decoder_moe_blocks)
        learning = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert candidate.budget_value == learning <= limit
