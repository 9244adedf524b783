"""PyTorch's RuntimeEstimator beside the planner: it runs on the dense model with a preset's rates, and it
cannot run an MoE (fake tensors have no values to route with) — the README's comparison rests on both."""

import pytest

from model.config import make_config
from planner.steptime import gpu_preset, predict_step_time
from planner.steptime.peer import estimate_with_runtime_estimator
from planner.steptime.trace import trace_step
from planner.workload import Workload

WORKLOAD = Workload(batch_size=2, context_length=32, prediction_length=8, num_samples=2)


@pytest.mark.parametrize("mode", ["forward", "train"])
def test_runtime_estimator_runs_on_the_dense_model_and_leaves_out_host_time(mode):
    preset = gpu_preset("h100-sxm")
    seconds, why = estimate_with_runtime_estimator(make_config("debug"), WORKLOAD, mode, preset)
    assert why == "" and seconds > 0
    ours = predict_step_time(trace_step(make_config("debug"), WORKLOAD, mode, foreach_optimizer=True), preset)
    # It prices kernels only (at most bytes ÷ the full datasheet bandwidth per op): below the planner's step,
    # whose host time alone is a few microseconds per op.
    assert seconds < ours.total_s and ours.overhead_s > 0


def test_runtime_estimator_cannot_route_an_moe():
    config = make_config("debug", architecture="token_ffn", num_experts=4, top_k=2)
    seconds, why = estimate_with_runtime_estimator(config, WORKLOAD, "forward", gpu_preset("a100-80gb"))
    assert seconds is None and "bincount" in why
