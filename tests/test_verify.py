"""planner.verify and the measuring it rests on: shape-only execution counts what a fully computed run
counts, the lean forecast counter agrees with FlopCounterMode, and verify reports mismatches."""

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model.build import build_model_from_config
from model.config import ARCHITECTURES, make_config
from planner import verify as verify_module
from planner.measure import (
    MatmulFlopCounter,
    build_shape_only,
    measure_forecast_flops,
    measure_forward_and_train_flops,
    token_batch,
)
from planner.workload import Workload

@pytest.fixture(autouse=True)
def one_thread():
    """Counting is bound by per-op overhead; a second thread only adds contention (as verify does)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SMALL_WORKLOAD = Workload(batch_size=2, context_length=40, prediction_length=6, num_samples=3)
VARIANTS = [dict(num_experts=0)] + [dict(architecture=a, num_experts=4) for a in ARCHITECTURES]


def _counts(model, config, workload, shape_only):
    generator = torch.Generator().manual_seed(0)
    batch = token_batch(config, workload, generator)
    forward, train = measure_forward_and_train_flops(model, batch, shape_only)
    return forward, train, measure_forecast_flops(model, workload, generator, shape_only)


@pytest.mark.parametrize("size", ["debug", "tiny"])
@pytest.mark.parametrize("kwargs", VARIANTS, ids=lambda k: k.get("architecture", "dense"))
def test_shape_only_counts_equal_computed_counts(size, kwargs):
    config = make_config(size, **kwargs)
    computed = _counts(build_model_from_config(config), config, SMALL_WORKLOAD, shape_only=False)
    assert _counts(build_shape_only(config), config, SMALL_WORKLOAD, shape_only=True) == computed


@pytest.mark.parametrize("kwargs", VARIANTS, ids=lambda k: k.get("architecture", "dense"))
def test_matmul_counter_equals_flop_counter_mode_on_a_forecast(kwargs):
    config = make_config("debug", **kwargs)
    model = build_model_from_config(config)
    context = torch.rand(2, 30) + 1
    totals = []
    for counter in (FlopCounterMode(display=False), MatmulFlopCounter()):
        with counter:
            model.forecast(context, prediction_length=5, num_samples=3, context_length=30,
                           generator=torch.Generator().manual_seed(0))
        totals.append(counter.get_total_flops() if isinstance(counter, FlopCounterMode) else counter.total_flops)
    assert totals[0] == totals[1] > 0


@pytest.mark.parametrize("kwargs", VARIANTS, ids=lambda k: k.get("architecture", "dense"))
def test_verify_variant_passes_on_debug(kwargs):
    checks = verify_module.verify_variant("debug", make_config("debug", **kwargs), SMALL_WORKLOAD)
    assert checks and all(check.ok for check in checks), [c for c in checks if not c.ok]
    quantities = {(check.quantity, check.counter) for check in checks}
    assert ("forward_flops", "fvcore (MACs x 2)") in quantities
    assert ("forecast_flops", "counted forecast") in quantities
    assert any(check.quantity == "train_activations_bytes" for check in checks)


def test_verify_reports_a_wrong_planner(monkeypatch):
    real = verify_module.count_flops

    def off_by_one(config, workload):
        counts = real(config, workload)
        return dataclasses.replace(counts, forward=dataclasses.replace(counts.forward, head_flops=counts.forward.head_flops + 1))

    monkeypatch.setattr(verify_module, "count_flops", off_by_one)
    checks = verify_module.verify_flops("debug", make_config("debug"), SMALL_WORKLOAD, fvcore=False, forecast=False,
                                        activations=False)
    failed = [check for check in checks if not check.ok]
    assert {check.quantity for check in failed} == {"forward_flops", "train_flops"}
    assert all(check.difference < 0 and check.reason.startswith("unexplained") for check in failed)


def test_verify_capacity_is_an_upper_bound_with_a_reason():
    # Factor 1: a balanced routing would drop nothing; random routing overflows some experts.
    config = make_config("debug", architecture="token_ffn", num_experts=4, expert_capacity=1.0)
    checks = verify_module.verify_flops("debug", config, SMALL_WORKLOAD, fvcore=False, activations=False)
    assert all(check.ok and check.measured <= check.analytic for check in checks)
    assert any(check.measured < check.analytic and "capacity" in check.reason for check in checks)


def test_verify_grid_runs_variants_in_workers():
    checks = verify_module.verify_grid(["debug"], ["token_ffn"], [0, 4], SMALL_WORKLOAD, workers=2,
                                       options=dict(fvcore=False, activations=False))
    assert verify_module.all_ok(checks)
    assert {(c.architecture, c.num_experts) for c in checks} == {("dense", 0), ("token_ffn", 4)}
