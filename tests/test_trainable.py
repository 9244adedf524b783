"""Fine-tuning regimes: trainable parameters, gradients, optimizer states and backward FLOPs against the real
modules with the same `requires_grad` (architecture.md §6)."""

import pytest
import torch

from model import build_model, make_config
from model.checks import SettingError
from model.trainable import normalize_trainable, set_trainable
from planner.flops import count_flops
from planner.measure import build_shape_only, measure_forward_and_train_flops, token_batch
from planner.memory import estimate_memory
from planner.params import count_params, count_trainable_params
from planner.workload import Workload

VARIANTS = [{}] + [dict(architecture=a, num_experts=e) for a in ("shared_then_expert", "expert_only", "token_ffn")
                   for e in (4, 16)]
REGIMES = ["all", "experts_and_router", "experts", "router",
           "decoder_ffn", "encoder_norm,expert_head", "encoder_position_bias", "embedding", "decoder_cross_attention"]
WORKLOAD = dict(batch_size=2, context_length=16, prediction_length=4)


def _applies(moe: dict, regime: str) -> bool:
    """Whether the regime has something to train in the variant (the dense model has no router or experts;
    expert_only has no shared encoder)."""
    try:
        count_trainable_params(count_params(make_config("debug", **moe)), regime)
        return True
    except SettingError:
        return False


CASES = [(size, moe, regime) for size in ("debug", "tiny") for moe in VARIANTS for regime in REGIMES
         if _applies(moe, regime)]
# FlopCounterMode runs a real forward and backward: the named regimes on both sizes, component sets on debug.
FLOP_CASES = [(size, moe, regime) for size, moe, regime in CASES if size == "debug" or "_" not in regime
              or regime == "experts_and_router"]


def _id(case) -> str:
    size, moe, regime = case
    return f"{size}-{moe.get('architecture', 'dense')}-{moe.get('num_experts', 0)}-{regime}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_trainable_params_are_the_parameters_that_require_grad(case):
    size, moe, regime = case
    model = build_model(size, device="meta", trainable=regime, **moe)
    requiring = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count_trainable_params(count_params(make_config(size, **moe)), regime) == requiring


@pytest.mark.parametrize("case", FLOP_CASES, ids=_id)
def test_training_flops_equal_flop_counter_mode_over_forward_and_backward(case):
    """The real backward computes only the gradients the regime needs; FlopCounterMode counts what it runs."""
    size, moe, regime = case
    config, workload = make_config(size, **moe), Workload(**WORKLOAD, trainable=regime)
    model = build_shape_only(config)
    set_trainable(model, regime)
    forward, train = measure_forward_and_train_flops(model, token_batch(config, workload), shape_only=True)
    flops = count_flops(config, workload)
    assert (flops.forward_flops, flops.train_flops) == (forward, train)


def test_a_frozen_backbone_computes_far_fewer_gradients():
    """Hand derivation for dense tiny with only the decoder FFNs training. Nothing below the first decoder FFN
    requires grad, so the encoder and the first decoder block's attention compute no gradient at all; from
    there on every frozen product passes an input gradient down, and the FFNs add their weight gradients."""
    config = make_config("tiny")
    workload = Workload(**WORKLOAD, trainable="decoder_ffn")
    b, t, s, d, f, a, v = 2, 5, 17, 256, 1024, 256, 4096  # S = 16 + 1, T = 4 + 1
    ffn_linear = 2 * b * t * d * f  # wi (or wo) forward
    projection = 2 * b * t * d * a  # one of q, k, v, o over the decoder tokens
    self_products = 2 * (2 * b * t * t * a)  # Q·Kᵀ and P·V
    cross_half = 2 * b * t * s * a  # Q·Kᵀ (or P·V) of cross-attention
    first_block = 3 * ffn_linear  # wi: weight gradient only (its input requires none); wo: weight + input
    later_block = (4 * ffn_linear  # wi, wo: weight + input gradients
                   + 4 * projection + 2 * self_products  # q, k, v, o input gradients; both operands of both
                   + 2 * projection + 2 * cross_half)  # q, o; k, v read the frozen encoder: only dQ and dP
    head = 2 * b * t * d * v  # the tied head (frozen embedding): input gradient only
    assert count_flops(config, workload).backward_flops == first_block + 3 * later_block + head
    assert count_flops(config, Workload(**WORKLOAD)).backward_flops == 2 * count_flops(config, workload).forward_flops


@pytest.mark.parametrize("case", FLOP_CASES, ids=_id)
def test_gradients_and_optimizer_states_are_what_adamw_allocates(case):
    """One real AdamW step: the gradients that exist and the moments AdamW creates. Dense dispatch runs every
    expert, so every trainable parameter gets its gradient in one step, as over a run."""
    size, moe, regime = case
    workload = Workload(**WORKLOAD, trainable=regime)
    settings = {**moe, "dispatch": "dense"} if moe else {}
    config = make_config(size, **settings)
    torch.manual_seed(0)
    model = build_model(size, trainable=regime, **settings)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    input_ids, attention_mask, labels = token_batch(config, workload, torch.Generator().manual_seed(0))
    model(input_ids, attention_mask, labels=labels).loss.backward()
    optimizer.step()
    gradient_bytes = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    state_bytes = sum(value.numel() * value.element_size() for state in optimizer.state.values()
                      for key, value in state.items() if key in ("exp_avg", "exp_avg_sq"))
    training = estimate_memory(make_config(size, **moe), workload, device="cpu").training
    assert (training.gradients_bytes, training.optimizer_states_bytes) == (gradient_bytes, state_bytes)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("bad,message", [
    ("everything", "trainable must be one of all, experts_and_router, experts, router or a comma-separated set"),
    ("router,decoder_fnn", "'decoder_fnn'"),
    ("", "trainable must be one of"),
    (42, "trainable must be one of"),
])
def test_unknown_regimes_and_components_are_refused_naming_the_field(bad, message):
    with pytest.raises(SettingError, match=message) as refused:
        normalize_trainable(bad)
    assert refused.value.field == "trainable" and "\n" not in str(refused.value)


def test_a_regime_that_leaves_nothing_to_train_is_refused():
    with pytest.raises(SettingError, match="experts leaves nothing to train in dense"):
        build_model("debug", device="meta", trainable="experts")
    with pytest.raises(SettingError, match="leaves nothing to train"):
        estimate_memory(make_config("debug"), Workload(trainable="router"))
    with pytest.raises(SettingError, match="leaves nothing to train"):  # expert_only has no shared encoder
        count_trainable_params(count_params(make_config("debug", architecture="expert_only", num_experts=4)),
                               "encoder_attention")


def test_component_sets_are_written_one_way():
    assert normalize_trainable("expert_head, router") == "router,expert_head"
    assert normalize_trainable(["router", "expert_encoder", "expert_ffn", "expert_head"]) == \
        "router,expert_encoder,expert_ffn,expert_head"
    assert normalize_trainable("experts_and_router") == "experts_and_router"
