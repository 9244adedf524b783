"""Activation bytes saved for backward: hand-derived terms, and the analytic count against the saved-tensor
measurement of the real modules (exact on CPU; an upper bound where routing decides how many experts run),
with every parameter training and under the fine-tuning regimes (frozen parts save far less)."""

import contextlib
import dataclasses
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model import build_model, make_config
from model.build import build_model_from_config
from model.checks import SettingError
from model.components import COMPONENTS
from model.trainable import set_trainable
from planner.activations import (
    activation_widths,
    estimate_activation_breakdown,
    estimate_activation_bytes,
)
from planner.measure import measure_saved_activation_bytes
from planner.workload import Workload

from .conftest import ARCHITECTURES, token_batch

# A model small enough to derive by hand: D 8, F 16, H 2 × Dk 4 (A 8), one block per stack, V 16;
# context 3 and prediction 1 give S = 4 encoder and T = 2 decoder tokens, one series.
HAND = dict(d_model=8, d_ff=16, d_kv=4, num_heads=2, num_layers=1, vocab_size=16)
HAND_WORKLOAD = Workload(batch_size=1, context_length=3, prediction_length=1)

# Hand derivation, fp32 on CPU (dropout masks are fp32 there: 4 bytes an element).
# Encoder, S = 4 tokens:
HAND_ENCODER_ATTENTION = (
    4 * 8 * (4 + 4) + 4 * 4  # T5LayerNorm: input, normalised, rsqrt per token
    + 4 * 8 * 4  # q/k/v input (the norm's output)
    + 3 * 4 * 8 * 4  # q, kᵀ, v copies for bmm
    + 2 * 4 * 4 * 4  # softmax probabilities, H·S·S
    + 2 * 4 * 4 * (4 + 4)  # dropout mask and dropped probabilities
    + 4 * 8 * 4  # output-projection input
    + 4 * 8 * 4  # residual dropout mask
)
# FFN: norm, wi input, ReLU output + dropout mask + wo input, residual mask
HAND_ENCODER_FFN = (4 * 8 * 8 + 4 * 4) + 4 * 8 * 4 + 4 * 16 * (4 + 4 + 4) + 4 * 8 * 4
HAND_ENCODER_ENDS = 4 * 8 * 4 + (4 * 8 * 8 + 4 * 4) + 4 * 8 * 4  # embedding mask, final norm, final mask
HAND_ENCODER_BUCKETS = 4 * 4 * 8  # int64 position buckets S×S
HAND_ENCODER = HAND_ENCODER_ATTENTION + HAND_ENCODER_FFN + HAND_ENCODER_ENDS + HAND_ENCODER_BUCKETS
# Decoder, T = 2 tokens, cross-attending to S = 4:
# Same terms as the encoder's attention, in order.
HAND_DECODER_SELF = ((2 * 8 * 8 + 2 * 4) + 2 * 8 * 4 + 3 * 2 * 8 * 4 + 2 * 2 * 2 * 4 + 2 * 2 * 2 * 8
                     + 2 * 8 * 4 + 2 * 8 * 4)
HAND_DECODER_CROSS = ((2 * 8 * 8 + 2 * 4) + 2 * 8 * 4 + (2 + 2 * 4) * 8 * 4 + 2 * 2 * 4 * 4 + 2 * 2 * 4 * 8
                      + 2 * 8 * 4 + 2 * 8 * 4)  # q over T, kᵀ and v over S
HAND_DECODER_FFN = (2 * 8 * 8 + 2 * 4) + 2 * 8 * 4 + 2 * 16 * 12 + 2 * 8 * 4
HAND_DECODER = (HAND_DECODER_SELF + HAND_DECODER_CROSS + HAND_DECODER_FFN
                + 2 * 8 * 4 + (2 * 8 * 8 + 2 * 4) + 2 * 8 * 4  # stack ends
                + 2 * 2 * 8  # position buckets T×T
                + 4 * 8 * 4)  # the encoder output the cross-attention k/v keep
HAND_INPUTS = (4 + 2 + 2) * 8  # int64 encoder ids, decoder ids, targets
HAND_LOSS = 2 * 16 * 4 + 4  # fp32 log-probabilities T×V, NLL total weight
HAND_LM_HEAD = 2 * 8 * 4  # the scaled decoder output the tied head keeps
# MoE parts with E = 2, K = 1, router width R = 4:
HAND_CONTEXT_ROUTER = (4 * 4 + 4) + 8 * 4 + 4 * 12 + (2 * 4 + 8 + 4 + 4) + 2 * 4  # pool, in, hidden, top-K, balance
HAND_HEAD_COMBINE = 16 + 4 + 2 * (2 * 16) * 4  # slot order and row indices, weight, head output and weighted output (T×V)
HAND_EXPERT_HEAD = 2 * (32 * 12 + 8 * 4 + 8 * 4 + 2 * 4 + 8 * 4) + 2 * 8 * 4 + HAND_HEAD_COMBINE
HAND_ENCODER_COMBINE = 16 + 4 + 2 * (4 * 8) * 4
HAND_EXPERT_ENCODER = HAND_ENCODER + HAND_ENCODER_COMBINE + 2 * 8 * 4 + HAND_HEAD_COMBINE
HAND_TOKEN_LAYER = {  # tokens -> TokenExpertFFN layer bytes (norm, router input, K gathered, experts, combine, mask)
    tokens: (tokens * 8 * 8 + tokens * 4) + tokens * 8 * 4 + tokens * 8 * 4 + tokens * 16 * 12
    + tokens * (16 + 4 + 2 * 8 * 4) + tokens * 8 * 4
    for tokens in (4, 2)
}
HAND_TOKEN_ROUTER = {tokens: tokens * (2 * 4 + 8 + 4 + 4) + 2 * 4 for tokens in (4, 2)}

HAND_TOTALS = {
    "dense": HAND_INPUTS + HAND_ENCODER + HAND_DECODER + HAND_LM_HEAD + HAND_LOSS,
    "shared_then_expert": (HAND_INPUTS + HAND_ENCODER + HAND_DECODER + HAND_CONTEXT_ROUTER + HAND_EXPERT_HEAD
                           + HAND_LOSS),
    "expert_only": HAND_INPUTS + HAND_DECODER + HAND_CONTEXT_ROUTER + HAND_EXPERT_ENCODER + HAND_LOSS,
    "token_ffn": (HAND_INPUTS + HAND_ENCODER - HAND_ENCODER_FFN + HAND_DECODER - HAND_DECODER_FFN
                  + HAND_TOKEN_ROUTER[4] + HAND_TOKEN_ROUTER[2] + HAND_TOKEN_LAYER[4] + HAND_TOKEN_LAYER[2]
                  + HAND_LM_HEAD + HAND_LOSS),
}


def hand_config(architecture: str, **settings):
    if architecture == "dense":
        return make_config("custom", **HAND, **settings)
    blocks = dict(encoder_moe_blocks=(0,), decoder_moe_blocks=(0,)) if architecture == "token_ffn" else {}
    return make_config("custom", architecture=architecture, num_experts=2, top_k=1, router_hidden_dim=4,
                       **blocks, **HAND, **settings)


def measure(config, workload: Workload, precision: str = "fp32", model=None) -> int:
    """Saved-tensor bytes of one training forward at the workload's shapes (a fresh model unless given)."""
    if model is None:
        model = build_model_from_config(config)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    batch = token_batch(workload.batch_size, workload.encoder_tokens, workload.decoder_tokens,
                        config.dims.vocab_size)
    autocast = {"amp_bf16": torch.bfloat16, "amp_fp16": torch.float16}.get(precision)
    with torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext():
        return measure_saved_activation_bytes(model, *batch)


@pytest.mark.parametrize("architecture", ["dense", *ARCHITECTURES])
def test_activation_bytes_hand_derived(architecture):
    config = hand_config(architecture)
    assert estimate_activation_bytes(config, HAND_WORKLOAD, device="cpu") == HAND_TOTALS[architecture]
    assert measure(config, HAND_WORKLOAD) == HAND_TOTALS[architecture]


def test_activation_encoder_and_decoder_hand_derived():
    breakdown = estimate_activation_breakdown(hand_config("dense"), HAND_WORKLOAD, device="cpu")
    assert (breakdown.encoder_bytes, breakdown.decoder_bytes) == (HAND_ENCODER, HAND_DECODER) == (3376, 2528)
    assert breakdown.loss_bytes == HAND_LOSS == 132


def test_activation_cuda_masks_are_one_byte():
    # The dense hand model keeps 360 mask elements: encoder 32 + 32 (attention) + 64 + 32 (FFN) + 32 + 32
    # (stack ends); decoder 8 + 16 (self) + 16 + 16 (cross) + 32 + 16 (FFN) + 16 + 16 (stack ends).
    config = hand_config("dense")
    cpu = estimate_activation_bytes(config, HAND_WORKLOAD, device="cpu")
    assert cpu - estimate_activation_bytes(config, HAND_WORKLOAD, device="cuda") == 360 * (4 - 1)


def test_activation_amp_weight_copies_hand_derived():
    # Half copies of every matmul weight: encoder 4·D·A + 2·D·F, decoder 8·D·A + 2·D·F, tied head V·D.
    workload = Workload(batch_size=1, context_length=3, prediction_length=1, precision="amp_bf16")
    breakdown = estimate_activation_breakdown(hand_config("dense"), workload, device="cpu")
    assert breakdown.amp_weight_copies_bytes == 2 * ((4 * 64 + 2 * 128) + (8 * 64 + 2 * 128) + 16 * 8) == 2816
    assert measure(hand_config("dense"), workload, "amp_bf16") == breakdown.total_bytes


@pytest.mark.parametrize("architecture", ["dense", *ARCHITECTURES])
@pytest.mark.parametrize(
    "size, workload",
    [
        ("tiny", Workload()),  # Chronos' default shape: one series, context 512, prediction 64
        ("small", Workload(batch_size=2, context_length=64, prediction_length=16)),
    ],
    ids=["tiny-default", "small-reduced"],
)
def test_activation_bytes_match_measurement(size, workload, architecture, one_thread):
    moe = {} if architecture == "dense" else dict(architecture=architecture, num_experts=4)
    config = make_config(size, **moe)
    measured = measure(config, workload)
    analytic = estimate_activation_bytes(config, workload, device="cpu")
    # Target: within 3%. The count is exact, except that with several series it assumes min(E, B·K)
    # expert encoders run (each keeps its own S×S position buckets), an upper bound.
    assert measured <= analytic <= 1.03 * measured
    if workload.batch_size == 1 or architecture != "expert_only":
        assert analytic == measured


@pytest.mark.parametrize("precision", ["bf16", "amp_bf16", "amp_fp16"])
@pytest.mark.parametrize("architecture", ["dense", *ARCHITECTURES])
def test_activation_bytes_match_measurement_in_half_precision(precision, architecture, one_thread):
    moe = {} if architecture == "dense" else dict(architecture=architecture, num_experts=4)
    config = make_config("debug", **moe)
    workload = Workload(context_length=32, prediction_length=8, precision=precision)
    assert estimate_activation_bytes(config, workload, device="cpu") == measure(config, workload, precision)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_activation_bytes_match_measurement_with_dense_dispatch(architecture, one_thread):
    config = make_config("debug", architecture=architecture, num_experts=4, dispatch="dense")
    workload = Workload(batch_size=2, context_length=32, prediction_length=8)
    assert estimate_activation_bytes(config, workload, device="cpu") == measure(config, workload)


def test_activation_bytes_with_capacity_are_an_upper_bound():
    # A capacity drops overflowing tokens; the count assumes every expert fills up to its capacity.
    config = make_config("debug", architecture="token_ffn", num_experts=8, expert_capacity=1.0)
    workload = Workload(batch_size=2, context_length=32, prediction_length=8)
    measured = measure(config, workload)
    unlimited = estimate_activation_bytes(make_config("debug", architecture="token_ffn", num_experts=8),
                                          workload, device="cpu")
    assert measured <= estimate_activation_bytes(config, workload, device="cpu") <= unlimited


def test_measurement_excludes_weights_and_restores_mode():
    model = build_model("debug").eval()
    batch = token_batch(1, 9, 3)
    weights_bytes = sum(p.numel() * 4 for p in model.parameters())
    measured = measure_saved_activation_bytes(model, *batch)
    assert 0 < measured < weights_bytes  # a 9-token batch keeps far less than the debug model's weights
    assert not model.training


def test_activation_widths_refuse_unknown_device():
    with pytest.raises(ValueError, match="device"):
        activation_widths("fp32", device="tpu")


@settings(max_examples=30, deadline=None)
@given(
    architecture=st.sampled_from(["dense", *ARCHITECTURES]),
    num_experts=st.integers(1, 16),
    batch=st.integers(1, 8),
    context=st.integers(1, 1024),
    prediction=st.integers(1, 128),
    precision=st.sampled_from(["fp32", "amp_bf16", "amp_fp16", "bf16"]),
)
def test_activation_bytes_grow_with_batch_and_context(architecture, num_experts, batch, context, prediction, precision):
    moe = {} if architecture == "dense" else dict(architecture=architecture, num_experts=num_experts, top_k=1)
    config = make_config("small", **moe)
    workload = Workload(batch_size=batch, context_length=context, prediction_length=prediction, precision=precision)
    bytes_now = estimate_activation_bytes(config, workload)
    longer = Workload(batch_size=batch, context_length=context + 1, prediction_length=prediction, precision=precision)
    larger = Workload(batch_size=batch + 1, context_length=context, prediction_length=prediction, precision=precision)
    assert estimate_activation_bytes(config, longer) > bytes_now
    assert estimate_activation_bytes(config, larger) > bytes_now


# --- fine-tuning regimes (architecture.md §6): only what the gradients autograd computes need is saved ------

VARIANTS = [{}] + [dict(architecture=a, num_experts=e) for a in ARCHITECTURES for e in (4, 16)]
NAMED_REGIMES = ["all", "experts_and_router", "experts", "router"]
REGIMES = [*NAMED_REGIMES, "decoder_ffn", "encoder_norm,expert_head", "encoder_position_bias", "embedding",
           "decoder_cross_attention"]
REGIME_WORKLOAD = dict(batch_size=1, context_length=32, prediction_length=8)


@functools.lru_cache(maxsize=1)  # the cases of one variant run in a row; set_trainable switches the regime
def _fp32_model(size: str, moe: tuple):
    torch.manual_seed(0)
    return build_model_from_config(make_config(size, **dict(moe)))


def _regime_model(size: str, moe: dict, regime: str):
    """The variant's fp32 model training `regime`, or None where the regime has nothing to train in it."""
    model = _fp32_model(size, tuple(sorted(moe.items())))
    try:
        set_trainable(model, regime)
    except SettingError:
        return None
    return model


def _applies(moe: dict, regime: str) -> bool:
    return _regime_model("debug", moe, regime) is not None


# Every regime on debug; the named regimes on tiny. One series: sample-level routing runs exactly K experts.
REGIME_CASES = [(size, moe, regime) for size in ("debug", "tiny") for moe in VARIANTS
                for regime in (REGIMES if size == "debug" else NAMED_REGIMES) if _applies(moe, regime)]


def _case_id(case) -> str:
    size, moe, regime = case
    return f"{size}-{moe.get('architecture', 'dense')}-{moe.get('num_experts', 0)}-{regime}"


@pytest.mark.parametrize("case", REGIME_CASES, ids=_case_id)
def test_activation_bytes_follow_the_trainable_regime(case, one_thread):
    size, moe, regime = case
    config, workload = make_config(size, **moe), Workload(**REGIME_WORKLOAD, trainable=regime)
    measured = measure(config, workload, model=_regime_model(size, moe, regime))
    assert estimate_activation_bytes(config, workload, device="cpu") == measured


@pytest.mark.parametrize("moe", VARIANTS[1:], ids=lambda moe: f"{moe['architecture']}-{moe['num_experts']}")
@pytest.mark.parametrize("regime", ["experts_and_router", "experts", "router", "decoder_ffn"])
def test_activation_bytes_under_a_regime_with_several_series(moe, regime, one_thread):
    """Three series: expert_only's count takes min(E, B·K) expert encoders as running, each keeping its
    position buckets when the expert encoders train (an upper bound); everything else is per routing slot."""
    config = make_config("debug", **moe)
    workload = Workload(batch_size=3, context_length=32, prediction_length=8, trainable=regime)
    measured = measure(config, workload, model=_regime_model("debug", moe, regime))
    analytic = estimate_activation_bytes(config, workload, device="cpu")
    assert measured <= analytic <= 1.03 * measured
    if moe["architecture"] != "expert_only" or regime not in ("experts_and_router", "experts"):
        assert analytic == measured


HALF_CASES = [(precision, moe, regime) for precision in ("amp_bf16", "bf16") for moe in VARIANTS
              if moe.get("num_experts", 4) == 4
              for regime in ("experts_and_router", "router", "decoder_ffn", "encoder_norm,expert_head")
              if _applies(moe, regime)]


@pytest.mark.parametrize("case", HALF_CASES, ids=lambda case: f"{case[0]}-{_case_id(('debug', *case[1:]))}")
def test_activation_bytes_follow_the_regime_in_half_precision(case, one_thread):
    """Under autocast a frozen matmul weight is cast anew at each use, a trained one once (cached); either
    copy is saved only where the input requires grad (the input gradient reads it). E = 4 and one series:
    every expert that may run does, so the half weight copies are exact too."""
    precision, moe, regime = case
    config = make_config("debug", **moe)
    workload = Workload(**REGIME_WORKLOAD, precision=precision, trainable=regime)
    torch.manual_seed(0)
    model = build_model_from_config(config, trainable=regime)
    assert estimate_activation_bytes(config, workload, device="cpu") == measure(config, workload, precision, model)


def test_a_frozen_backbone_saves_only_above_its_first_trainable_layer():
    """Hand derivation, dense hand model (one block per stack) with only the decoder FFN training, fp32 on CPU.
    The embedding is frozen (no ids kept) and nothing below the decoder FFN requires grad: the encoder, the
    decoder's attention and the FFN's norm keep nothing. wi trains, so it keeps its input (the norm's output);
    from there on everything requires grad; wo keeps its input; the final norm's weight is frozen, so it keeps
    its input and rsqrt but not the normalised tensor; the frozen tied head keeps nothing (its weight is a
    parameter)."""
    t, d, f = 2, 8, 16
    ffn = t * d * 4 + t * f * 4 * 3 + t * d * 4  # wi input; ReLU output, dropout mask, wo input; residual mask
    stack_end = (t * d * 4 + t * 4) + t * d * 4  # final norm's input and rsqrt; final dropout mask
    expected = t * 8 + ffn + stack_end + HAND_LOSS  # targets, decoder, loss
    assert expected == 796
    config, workload = hand_config("dense"), dataclasses.replace(HAND_WORKLOAD, trainable="decoder_ffn")
    breakdown = estimate_activation_breakdown(config, workload, device="cpu")
    assert (breakdown.encoder_bytes, breakdown.decoder_bytes, breakdown.lm_head_bytes) == (0, ffn + stack_end, 0)
    assert breakdown.total_bytes == measure(config, workload, model=build_model_from_config(config,
                                                                                             trainable="decoder_ffn"))
    assert breakdown.total_bytes == expected


def test_only_the_router_training_keeps_the_router_and_the_weighting_of_frozen_heads():
    """Hand derivation, shared_then_expert hand model (E 2, K 1, R 4) with only the router training. Its
    input (the frozen encoder's output) requires no grad: no pooling mask or count is kept, but both router
    Linears keep their inputs. The frozen heads on a frozen decoder keep nothing; weighting their logits keeps
    the slot order and the logits (the weights' gradient reads them), the scatter-add its row indices and
    weighted source."""
    t, v, r = 2, 16, 4
    router = 8 * 4 + r * 4 * 3 + (2 * 4 + 8 + 4 + 4) + 2 * 4  # pooled input; ReLU, mask, input; top-K; balance
    combine = 8 + t * v * 4 + 8 + t * v * 4  # slot order and head logits; row indices and weighted logits
    expected = t * 8 + router + combine + HAND_LOSS
    assert expected == 532
    config = hand_config("shared_then_expert")
    workload = dataclasses.replace(HAND_WORKLOAD, trainable="router")
    breakdown = estimate_activation_breakdown(config, workload, device="cpu")
    assert (breakdown.encoder_bytes, breakdown.decoder_bytes, breakdown.router_bytes, breakdown.experts_bytes,
            breakdown.expert_combine_bytes) == (0, 0, router, 0, combine)
    assert breakdown.total_bytes == measure(config, workload, model=build_model_from_config(config,
                                                                                             trainable="router"))
    assert breakdown.total_bytes == expected


@settings(max_examples=40, deadline=None)
@given(
    architecture=st.sampled_from(["dense", *ARCHITECTURES]),
    fewer=st.sets(st.sampled_from(COMPONENTS), min_size=1),
    more=st.sets(st.sampled_from(COMPONENTS)),
    precision=st.sampled_from(["fp32", "amp_bf16", "bf16"]),
    device=st.sampled_from(["cpu", "cuda"]),
)
def test_training_more_parameters_never_saves_less(architecture, fewer, more, precision, device):
    moe = {} if architecture == "dense" else dict(architecture=architecture, num_experts=8, top_k=2)
    config = make_config("small", **moe)
    workload = Workload(batch_size=2, context_length=64, prediction_length=16, precision=precision)

    def saved(components) -> int:
        return estimate_activation_bytes(config, dataclasses.replace(workload, trainable=",".join(components)),
                                         device=device)

    assert saved(fewer) <= saved(fewer | more) <= saved(COMPONENTS) == estimate_activation_bytes(
        config, workload, device=device)
