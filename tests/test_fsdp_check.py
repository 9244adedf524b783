"""The FSDP2 cross-check (planner.fsdp_check): FSDPMemTracker's per-rank bytes on a fake process group against
plan_devices, on debug (dense and token_ffn MoE) at world sizes 2 and 8, plus the documented limits."""

from __future__ import annotations

import math

import pytest

from planner.fsdp_check import compare_with_plan, matrix_row, moe_config, simulate_fsdp_step
from planner.parallel import plan_devices
from planner.workload import Workload

WORKLOAD = Workload(batch_size=2, context_length=32, prediction_length=8)
CASES = [("dense", 0, 8, "zero3"), ("dense", 0, 2, "zero2"), ("token_ffn", 4, 8, "zero3"), ("token_ffn", 4, 2, "zero2")]
_cache: dict = {}


def measure(architecture, experts, n, strategy, tensors="fake"):
    key = (architecture, experts, n, strategy, tensors)
    if key not in _cache:
        _cache[key] = simulate_fsdp_step("debug", architecture, experts, n, strategy, WORKLOAD, tensors=tensors)
    return _cache[key]


@pytest.mark.parametrize("architecture,experts,n,strategy", CASES)
def test_model_states_equal_the_planner_exactly(architecture, experts, n, strategy):
    config = moe_config("debug", architecture, experts)
    measured = measure(architecture, experts, n, strategy)
    plan = plan_devices(config, WORKLOAD, strategy, n, device="cpu")
    # The tracker's rank 0 against the planner's rank 0: FSDP2's padded dim-0 chunks, both AdamW moments and
    # AdamW's fp32 step counter per parameter tensor, all inside the plan now.
    assert measured["sharded_grads"] == plan.gradients_bytes
    assert measured["optimizer_states"] == plan.optimizer_states_bytes
    assert measured["sharded_params"] == plan.weights_bytes
    # and by hand: rank 0 holds ceil(dim0/n) rows of every parameter (padded = held on rank 0)
    assert measured["sharded_grads"] == 4 * measured["padded_params"]
    assert measured["optimizer_states"] == 8 * measured["padded_params"] + 4 * measured["param_tensors"]
    if strategy == "zero2":  # FSDP2's ZeRO-2: every unit gathered after forward, n padded chunks per parameter
        assert measured["unsharded_params_after_forward"] == plan.gathered_layer_bytes == (
            4 * n * measured["padded_params"])
    rows = compare_with_plan(measured, config)
    exact = [r for r in rows if r["explained"] is not None and not r["term"].startswith("activations")]
    assert len(exact) == (5 if strategy == "zero2" else 4) and all(r["exact"] for r in exact), exact
    assert all(r["difference"] == 0 for r in exact)
    assert matrix_row(measured, config)["states_exact"]


def test_padding_is_inside_the_plan_at_world_size_8_for_token_ffn():
    # debug token_ffn has two 4-expert token routers Linear(64→4): rank 0 holds ceil(4/8) = 1 row of 64 where an
    # even split would be 4·64/8 = 32, so 2 × 32 = 64 elements beyond ceil(P/8); the plan's shard is the padded one.
    measured = measure("token_ffn", 4, 8, "zero3")
    assert measured["padded_params"] - math.ceil(measured["params"] / 8) == 64
    plan = plan_devices(moe_config("debug", "token_ffn", 4), WORKLOAD, "zero3", 8, device="cpu")
    assert plan.weights_bytes == 4 * (math.ceil(measured["params"] / 8) + 64)
    assert measure("dense", 0, 8, "zero3")["padded_params"] * 8 == measure("dense", 0, 8, "zero3")["params"]


@pytest.mark.parametrize("architecture,experts,n,strategy", CASES)
def test_activations_and_peak(architecture, experts, n, strategy):
    config = moe_config("debug", architecture, experts)
    measured = measure(architecture, experts, n, strategy)
    rows = {r["term"]: r for r in compare_with_plan(measured, config)}
    activations = rows["activations (after forward)"]
    if experts == 0:  # dense: logits and loss held by the output, minus the token ids and labels filed as Inputs
        assert activations["exact"]
    else:  # the routing decisions the output's records keep (token routers' rows·K indices and weights)
        assert 0 < activations["residual"] < 0.001 * activations["planner_bytes"]
    # The plan's peak holds the logits and the loss's two B·T·V backward gradients; debug's tracked peak comes
    # later in the backward, with activation-gradient temporaries the plan leaves out (1.01–1.18 here).
    assert 1.0 < rows["peak"]["fsdp_bytes"] / rows["peak"]["planner_bytes"] < 1.25


@pytest.mark.parametrize("architecture,experts", [("shared_then_expert", 4), ("expert_only", 4), ("dense", 0)])
def test_zero3_gathered_term_is_fsdp2s_root_and_one_all_gather_output(architecture, experts):
    config = moe_config("debug", architecture, experts)
    measured = measure(architecture, experts, 2, "zero3")
    plan = plan_devices(config, WORKLOAD, "zero3", 2, device="cpu")
    # The tracker's own unit sizes (built model, FSDP param groups), fp32: at the peak the root is gathered
    # (FSDP2 does not reshard it after forward) beside one all-gather output.
    root, block = 4 * measured["root_params"], 4 * measured["largest_block_params"]
    assert measured["peak_Unsharded Param"] == root and measured["peak_Unsharded Grad"] == 0
    assert plan.gathered_layer_bytes == root + max(root, block)
    if architecture == "dense":  # a block's all-gather output at the peak (which block depends on the shapes)
        assert 0 < measured["peak_All Gather"] <= block < root
    else:  # the root is the largest unit (routers and the experts' heads or encoders' norms): its output
        assert measured["peak_All Gather"] == root


def test_fake_tensors_measure_what_real_tensors_do():
    fake, real = measure("dense", 0, 8, "zero3"), measure("dense", 0, 8, "zero3", tensors="real")
    skip = {"tensors", "seconds"}
    assert {k: v for k, v in fake.items() if k not in skip} == {k: v for k, v in real.items() if k not in skip}


def test_meta_parameters_cannot_be_trained_by_fsdp2():
    with pytest.raises(RuntimeError, match="materialized from meta device"):
        simulate_fsdp_step("debug", "dense", 0, 2, "zero3", WORKLOAD, tensors="meta")


def test_sparse_dispatch_needs_data_fake_tensors_do_not_have():
    config = moe_config("debug", "token_ffn", 4).__class__(**{**moe_config("debug", "token_ffn", 4).__dict__,
                                                              "dispatch": "sparse"})
    with pytest.raises(NotImplementedError, match="sparse dispatch"):
        simulate_fsdp_step("debug", "token_ffn", 4, 2, "zero3", WORKLOAD, config=config)
