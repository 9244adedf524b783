"""The inverse question: which (E, K, router width[, MoE blocks]) reach a total size within a budget?

"About 200M parameters, but only the compute of a 50M model" becomes: enumerate the MoE configurations of a
base size, keep those whose budget quantity (active parameters per series, forward FLOPs per series, the
forward-FLOP ratio to dense, or training / forecast memory per device) is within the limit, rank them by
how close their total parameters come to the target, and give the Pareto front of total vs active.

Every number comes from the planner's own counts (count_params, count_flops, estimate_memory), so a
solution is exactly what `plan` would say of it.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

from model.checks import SettingError, check_int
from model.config import ARCHITECTURES, MAX_EXPERTS, MAX_ROUTER_HIDDEN_DIM, ChronosMoEConfig, default_token_moe_blocks
from planner.flops import count_flops
from planner.params import count_params, count_trainable_params
from planner.plan import trains_something
from planner.workload import Workload

BUDGET_KINDS = {
    "active_params": "active parameters per series",
    "trainable_params": "parameters the workload's fine-tuning regime trains (--trainable)",
    "forward_flops": "teacher-forced forward FLOPs per series",
    "flop_ratio": "forward FLOPs as a ratio to the dense model",
    "train_memory": "training memory per device (bytes)",
    "forecast_memory": "forecast memory per device (bytes)",
}

# token_ffn: which blocks carry experts. Name -> block indices for a stack of n blocks.
TOKEN_BLOCK_PATTERNS: dict[str, Callable[[int], tuple[int, ...]]] = {
    "every_second": default_token_moe_blocks,  # the family's default (odd indices)
    "every_block": lambda n: tuple(range(n)),
    "every_fourth": lambda n: tuple(range(3, n, 4)) or (n - 1,),
}
DEFAULT_ROUTER_WIDTHS = (64, 128, 256, 512)
DEFAULT_BASE_SIZE = "mini"  # where `solve` and the Budget tab start when nothing narrows the choice
# Bounds that keep a search interactive (the defaults evaluate 1,536 shapes in about a second): a larger space
# is refused up front, naming what to narrow; a search still running at its time limit stops and says so.
MAX_SHAPES = 4_096
MAX_FEASIBLE_KEPT = 20_000  # (shape, K) points kept for charts; past it, each shape's smallest and largest K
DEFAULT_TIME_LIMIT_S = 30.0


@dataclass(frozen=True)
class Budget:
    kind: str
    limit: float

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise ValueError(f"budget kind must be one of {', '.join(BUDGET_KINDS)}, got {self.kind!r}")
        if not isinstance(self.limit, (int, float)) or isinstance(self.limit, bool) or not self.limit > 0:
            raise ValueError(f"budget limit must be a number > 0, got {self.limit!r}")


@dataclass(frozen=True)
class SearchSpace:
    """What the solver may choose. Defaults cover what Chronos-MoE users try, and stay fast (< 1 s)."""

    max_experts: int = 128
    max_top_k: int = 16
    router_widths: tuple[int, ...] = DEFAULT_ROUTER_WIDTHS
    token_block_patterns: tuple[str, ...] = tuple(TOKEN_BLOCK_PATTERNS)

    def __post_init__(self) -> None:
        check_int("max_experts", self.max_experts, 1, MAX_EXPERTS)
        check_int("max_top_k", self.max_top_k, 1, MAX_EXPERTS)
        if not self.router_widths:
            raise SettingError("router_widths", "router_widths: give at least one router width")
        for width in self.router_widths:
            check_int("router_widths", width, 1, MAX_ROUTER_HIDDEN_DIM)
        if len(set(self.router_widths)) != len(self.router_widths):
            raise SettingError("router_widths", f"router_widths must be distinct, got {str(self.router_widths)[:60]}")
        unknown = [p for p in self.token_block_patterns if p not in TOKEN_BLOCK_PATTERNS]
        if unknown or not self.token_block_patterns:
            raise SettingError("token_block_patterns", f"token_block_patterns must be from {', '.join(TOKEN_BLOCK_PATTERNS)}, got {self.token_block_patterns!r}")


@dataclass(frozen=True)
class Candidate:
    config: ChronosMoEConfig
    total_params: int
    active_params: int
    budget_value: float  # the budgeted quantity, in the budget's unit
    token_block_pattern: Optional[str]  # token_ffn only

    @property
    def describe(self) -> str:
        c = self.config
        extra = f", router {c.router_hidden_dim}" if c.architecture != "token_ffn" else f", blocks {self.token_block_pattern}"
        return f"{c.architecture} E={c.num_experts} K={c.top_k}{extra}"


@dataclass(frozen=True)
class SolverResult:
    candidates: tuple[Candidate, ...]  # best first; one per shape, at the largest K that fits the budget
    pareto_front: tuple[Candidate, ...]  # feasible, by total ascending: no other has more total for ≤ active
    feasible: tuple[Candidate, ...]  # every (shape, K) within the budget, for charts (see MAX_FEASIBLE_KEPT)
    evaluated: int  # shapes (architecture, E, router width or MoE blocks) whose budget was computed
    complete: bool = True  # False: stopped at its time limit, after `evaluated` shapes in E order


def _budget_value(candidate_config: ChronosMoEConfig, budget: Budget, workload: Workload,
                  dense_forward_flops: int) -> float:
    if budget.kind == "active_params":
        return count_params(candidate_config).active_params
    if budget.kind == "trainable_params":
        return count_trainable_params(count_params(candidate_config), workload.trainable)
    if budget.kind in ("forward_flops", "flop_ratio"):
        forward = count_flops(candidate_config, workload).forward_flops
        if budget.kind == "flop_ratio":
            return forward / dense_forward_flops
        return forward / workload.batch_size
    from planner.memory import estimate_memory  # memory budgets only

    memory = estimate_memory(candidate_config, workload, count_params(candidate_config))
    return memory.training.total_bytes if budget.kind == "train_memory" else memory.forecast.total_bytes


def _budget_values(config_with: Callable[[int], ChronosMoEConfig], max_top_k: int, budget: Budget,
                   workload: Workload, dense_forward_flops: int) -> list[tuple[int, float]]:
    """(K, budget quantity) of one shape for the K within the budget (at most max_top_k): every K from 1 to the
    largest, or a spread of them when there are very many (_reported_top_ks); empty when K = 1 exceeds it.

    Trainable parameters do not depend on K (K picks experts; it adds none). Active parameters and forward
    FLOPs are exactly affine in K under sparse dispatch (each series or token
    runs K identical experts), so two evaluations give them all. Memory grows with K too, so the largest K
    within the budget is found by bisection (log2 of max_top_k evaluations, not one per K).
    """
    value: dict[int, float] = {}

    def evaluate(top_k: int) -> float:
        if top_k not in value:
            value[top_k] = _budget_value(config_with(top_k), budget, workload, dense_forward_flops)
        return value[top_k]

    if evaluate(1) > budget.limit:
        return []
    affine = budget.kind in ("active_params", "trainable_params", "forward_flops", "flop_ratio")
    if affine and max_top_k > 1:
        step = evaluate(2) - value[1]
        for top_k in range(3, max_top_k + 1):
            value[top_k] = value[1] + (top_k - 1) * step
    low, high = 1, max_top_k  # evaluate(low) is within the budget; find the largest such K
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if evaluate(middle) <= budget.limit else (low, middle - 1)
    return [(top_k, evaluate(top_k)) for top_k in _reported_top_ks(low)]


def _reported_top_ks(largest: int) -> list[int]:
    """The K a shape reports: all of 1 … largest, or with very many, a spread that keeps 1 and the largest."""
    if largest <= 64:
        return list(range(1, largest + 1))
    return sorted({1, largest, *range(1, largest + 1, max(1, largest // 32))})


def _shapes(base: ChronosMoEConfig, architectures: Sequence[str], space: SearchSpace):
    """(architecture, E, router width, block pattern) for every shape the space allows; K comes later."""
    for architecture in architectures:
        for experts in range(1, space.max_experts + 1):
            if architecture == "token_ffn":
                for pattern in space.token_block_patterns:
                    yield architecture, experts, base.router_hidden_dim, pattern
            else:
                for width in space.router_widths:
                    yield architecture, experts, width, None


def _config_for(base: ChronosMoEConfig, architecture: str, experts: int, top_k: int, width: int,
                pattern: Optional[str]) -> ChronosMoEConfig:
    dims = base.dims
    blocks = {"encoder_moe_blocks": None, "decoder_moe_blocks": None}
    if pattern is not None:
        pick = TOKEN_BLOCK_PATTERNS[pattern]
        blocks = {"encoder_moe_blocks": pick(dims.num_layers), "decoder_moe_blocks": pick(dims.num_decoder_layers)}
    return dataclasses.replace(
        base, architecture=architecture, num_experts=experts, top_k=top_k, router_hidden_dim=width,
        expert_capacity=None, **blocks,
    )


def pareto_front(candidates: Iterable[Candidate]) -> tuple[Candidate, ...]:
    """Candidates no other beats on both axes (more total parameters for no more active ones)."""
    front: list[Candidate] = []
    for candidate in sorted(candidates, key=lambda c: (c.active_params, -c.total_params)):
        if not front or candidate.total_params > front[-1].total_params:
            front.append(candidate)
    return tuple(front)


def solve(
    base: ChronosMoEConfig,
    target_total_params: int,
    budget: Budget,
    *,
    architectures: Sequence[str] = ARCHITECTURES,
    workload: Workload = Workload(),
    space: SearchSpace = SearchSpace(),
    tolerance: Optional[float] = None,
    limit: int = 20,
    time_limit_s: float = DEFAULT_TIME_LIMIT_S,
) -> SolverResult:
    """Feasible shapes, each at its largest K within the budget, ranked by |total − target| (then by budget
    use, highest first, then fewer experts). `tolerance` (a fraction) keeps only totals within
    target × (1 ± tolerance). A space of more than MAX_SHAPES shapes is refused (ValueError); the search
    stops at `time_limit_s` and says so (`complete` False)."""
    if isinstance(target_total_params, bool) or not isinstance(target_total_params, int) or target_total_params < 1:
        raise ValueError(f"target total parameters must be a positive integer, got {target_total_params!r}")
    if target_total_params > 10**15:
        raise ValueError(f"target total parameters must be at most 10^15 (a quadrillion), got {target_total_params:.3g}")
    if tolerance is not None and not (isinstance(tolerance, (int, float)) and not isinstance(tolerance, bool)
                                      and 0 <= tolerance <= 1e6):
        raise SettingError("tolerance", f"tolerance must be a fraction from 0 to 1e6, got {str(tolerance)[:40]}")
    check_int("limit", limit, 1, 100_000)
    unknown = [a for a in architectures if a not in ARCHITECTURES]
    if unknown or not architectures:
        raise ValueError(f"architectures must be from {', '.join(ARCHITECTURES)}, got {list(architectures)!r}")
    dense = dataclasses.replace(base, num_experts=0, expert_capacity=None, encoder_moe_blocks=None, decoder_moe_blocks=None)
    dense_forward = count_flops(dense, workload).forward_flops

    shapes = _shape_count(architectures, space)
    if shapes > MAX_SHAPES:
        raise SettingError("max_experts", f"max_experts is too large for this search: it would evaluate {shapes:,} shapes (E × "
                         f"router widths or block patterns, per architecture), at most {MAX_SHAPES:,}; lower it, "
                         f"or search fewer router widths, block patterns or architectures")
    deadline = time.monotonic() + time_limit_s
    feasible: list[Candidate] = []
    best_per_shape: list[Candidate] = []
    evaluated = 0
    complete = True
    for architecture, experts, width, pattern in _shapes(base, architectures, space):
        if time.monotonic() > deadline:
            complete = False
            break
        def config_with(top_k: int) -> ChronosMoEConfig:
            return _config_for(base, architecture, experts, top_k, width, pattern)

        if not trains_something(config_with(1), workload):
            continue  # the regime trains nothing here (e.g. shared encoder parts of expert_only)
        breakdown = count_params(config_with(1))
        if tolerance is not None and abs(breakdown.total_params - target_total_params) > tolerance * target_total_params:
            continue
        max_top_k = min(experts, space.max_top_k)
        values = _budget_values(config_with, max_top_k, budget, workload, dense_forward)
        evaluated += 1
        shape_feasible = []
        for top_k, value in values:
            active = breakdown.with_experts(top_k)
            shape_feasible.append(Candidate(config_with(top_k), breakdown.total_params, active, value, pattern))
        feasible.extend(shape_feasible if len(feasible) < MAX_FEASIBLE_KEPT else
                        {c.config.top_k: c for c in shape_feasible[:1] + shape_feasible[-1:]}.values())
        if shape_feasible:
            # A shape's smaller K have the same total and use less of the budget: rank only its largest.
            best_per_shape.append(shape_feasible[-1])

    ranked = sorted(
        best_per_shape,
        key=lambda c: (abs(c.total_params - target_total_params), -c.budget_value, c.config.num_experts),
    )
    return SolverResult(tuple(ranked[:limit]), pareto_front(feasible), tuple(feasible), evaluated, complete)


def _shape_count(architectures: Sequence[str], space: SearchSpace) -> int:
    per_expert_count = {"token_ffn": len(space.token_block_patterns)}
    return sum(space.max_experts * per_expert_count.get(a, len(space.router_widths)) for a in architectures)
