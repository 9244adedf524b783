"""Activation bytes saved for backward: hand-derived terms, and the analytic count against the saved-tensor
measurement of the real modules (exact on CPU; an upper bound where routing decides how many experts run)."""

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model import build_model, make_config
from model.build import build_model_from_config
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


def measure(config, workload: Workload, precision: str = "fp32") -> int:
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
def test_activation_bytes_match_measurement(size, workload, architecture):
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
def test_activation_bytes_match_measurement_in_half_precision(precision, architecture):
    moe = {} if architecture == "dense" else dict(architecture=architecture, num_experts=4)
    config = make_config("debug", **moe)
    workload = Workload(context_length=32, prediction_length=8, precision=precision)
    assert estimate_activation_bytes(config, workload, device="cpu") == measure(config, workload, precision)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_activation_bytes_match_measurement_with_dense_dispatch(architecture):
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
