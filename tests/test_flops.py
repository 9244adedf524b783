"""Analytic FLOPs: hand derivations per formula, and equality with the counters on the real modules
(FlopCounterMode for forward and training step, fvcore × 2 for forward, a counted real forecast)."""

import dataclasses

import pytest
import torch

from model.config import ARCHITECTURES, make_config
from planner.flops import count_expert_slots, count_flops, count_forecast_flops, count_forward_flops
from planner.workload import Workload

# tiny at the Chronos shapes: D = A = 256, F 1024, V 4096, 4 + 4 blocks; S = 513, T = 65, P = 64, N = 20.
TINY_ENCODER = 4 * (8 * 513 * 256 * 256 + 4 * 513 * 513 * 256 + 4 * 513 * 256 * 1024)
TINY_DECODER = 4 * (
    8 * 65 * 256 * 256 + 4 * 65 * 65 * 256  # self-attention: q, k, v, o; scores and weighted sum
    + 4 * 65 * 256 * 256 + 4 * 513 * 256 * 256 + 4 * 65 * 513 * 256  # cross: q, o; k, v over S; core
    + 4 * 65 * 256 * 1024  # FFN
)
TINY_HEAD = 2 * 65 * 256 * 4096


def test_forward_flops_tiny_dense_is_hand_derived():
    forward = count_forward_flops(make_config("tiny"), Workload())
    assert (forward.encoder_flops, forward.decoder_flops, forward.head_flops) == (TINY_ENCODER, TINY_DECODER, TINY_HEAD)
    assert forward.total_flops == 5_610_680_320


def test_train_flops_are_three_forwards():
    flops = count_flops(make_config("tiny"), Workload())
    assert flops.train_flops == 3 * 5_610_680_320


def test_forecast_flops_tiny_dense_is_hand_derived():
    rows, steps = 20, 64
    per_block = (
        steps * 8 * rows * 256 * 256  # self q, k, v, o for one new token per step
        + 4 * rows * 256 * sum(i + 1 for i in range(steps))  # self scores over the growing cache
        + steps * 4 * rows * 256 * 256  # cross q, o
        + 4 * rows * 513 * 256 * 256  # cross k, v over S, once
        + steps * 4 * rows * 513 * 256  # cross scores and weighted sum
        + steps * 4 * rows * 256 * 1024  # FFN
    )
    expected = TINY_ENCODER + 4 * per_block + steps * rows * 2 * 256 * 4096
    assert expected == 30_003_433_472
    assert count_forecast_flops(make_config("tiny"), Workload()).total_flops == expected


def test_forward_flops_shared_then_expert_router_and_heads():
    config = make_config("tiny", architecture="shared_then_expert", num_experts=8, top_k=2)
    forward = count_forward_flops(config, Workload())
    assert forward.router_flops == 2 * (256 * 256 + 256 * 8)
    assert forward.expert_flops == 2 * 65 * 2 * (256 * 1024 + 1024 * 256 + 256 * 4096)  # K heads, T positions
    assert forward.head_flops == 0  # the tied head does not run
    assert forward.encoder_flops == TINY_ENCODER


def test_forward_flops_expert_only_runs_k_encoders():
    config = make_config("tiny", architecture="expert_only", num_experts=16, top_k=2)
    forward = count_forward_flops(config, Workload())
    assert forward.encoder_flops == 0
    assert forward.expert_flops == 2 * TINY_ENCODER + 2 * 65 * 2 * 256 * 4096
    assert forward.decoder_flops == TINY_DECODER


def test_forward_flops_token_ffn_routes_every_token():
    config = make_config("tiny", architecture="token_ffn", num_experts=8, top_k=2)
    forward = count_forward_flops(config, Workload())
    tokens = 2 * 513 + 2 * 65  # two MoE blocks per stack (1 and 3)
    assert forward.router_flops == tokens * 2 * 256 * 8
    assert forward.expert_flops == tokens * 2 * 4 * 256 * 1024
    assert forward.head_flops == TINY_HEAD


def test_dense_dispatch_scales_with_e():
    sparse = make_config("tiny", architecture="shared_then_expert", num_experts=8, top_k=2)
    dense = dataclasses.replace(sparse, dispatch="dense")
    ratio = count_forward_flops(dense, Workload()).expert_flops / count_forward_flops(sparse, Workload()).expert_flops
    assert ratio == 8 / 2


def test_expert_slots_with_capacity_are_hand_derived():
    config = make_config("debug", architecture="token_ffn", num_experts=4, top_k=2, expert_capacity=0.5)
    assert count_expert_slots(config, 10) == 4 * 3  # capacity ceil(0.5 · 10 · 2 / 4) = 3 per expert
    generous = dataclasses.replace(config, expert_capacity=2.0)
    assert count_expert_slots(generous, 10) == 10 * 2  # nothing dropped


# --- equality with the counters on the real modules ---------------------------------------------------------
# Every architecture × E ∈ {0, 4, 8, 16}: forward and training step (FlopCounterMode) and forward (fvcore × 2)
# on debug, tiny and mini at the Chronos shapes and on small at reduced shapes; the forecast for every E on
# small (reduced) and for E ∈ {0, 4} at the Chronos shapes (64 cached steps cost seconds each; E only changes
# the router's width there). `python -m planner verify` checks the whole grid at the Chronos shapes.

REDUCED = Workload(batch_size=2, context_length=48, prediction_length=6, num_samples=2)
SHAPES = {"debug": Workload(), "tiny": Workload(), "mini": Workload(), "small": REDUCED}
FORECAST_EXPERTS = {"debug": (0, 4), "tiny": (0, 4), "mini": (0, 4), "small": (0, 4, 8, 16)}


@pytest.mark.parametrize("size", list(SHAPES))
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_flops_equal_counters(size, architecture, one_thread):
    from planner.measure import (
        build_shape_only,
        measure_forecast_flops,
        measure_forward_and_train_flops,
        measure_fvcore_forward_flops,
        token_batch,
    )

    workload = SHAPES[size]
    dense_here = architecture == ARCHITECTURES[0]  # the dense model is one model: checked once
    for num_experts in (0, 4, 8, 16) if dense_here else (4, 8, 16):
        config = make_config(size, architecture=architecture, num_experts=num_experts)
        analytic = count_flops(config, workload)
        model, generator = build_shape_only(config), torch.Generator().manual_seed(0)
        batch = token_batch(config, workload, generator)
        forward, train = measure_forward_and_train_flops(model, batch, shape_only=True)
        fvcore_forward, _, _ = measure_fvcore_forward_flops(model, batch, shape_only=True)
        assert (forward, train, fvcore_forward) == (analytic.forward_flops, analytic.train_flops,
                                                    analytic.forward_flops), (size, num_experts)
        if num_experts in FORECAST_EXPERTS[size]:
            forecast = measure_forecast_flops(model, workload, generator, shape_only=True)
            assert forecast == analytic.forecast_flops, (size, num_experts)
