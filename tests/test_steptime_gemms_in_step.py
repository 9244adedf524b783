"""The GEMMs' own time inside a step, read with torch.profiler, and the in-model GEMM factor made of it
(steptime.gemms_in_step)."""

import pytest
import torch

from model.build import build_model_from_config
from planner.measure import token_batch
from planner.steptime import gemms_in_step
from planner.steptime.gemms_in_step import (gemm_self_times_s, in_model_gemm_factor, in_step_gemm_s,
                                            matmul_op_names, profiled_op_name)
from planner.steptime.kernel_probes import gemm_run
from planner.steptime.ops import OpRecord, StepTrace
from planner.steptime.trace import record_step, run_step
from tests.steptime_fixtures import simple_measured_device
from tests.test_steptime_trace import ARCHITECTURES, WORKLOAD, config_of


def _mm_trace(shape, count):
    batch, m, n, k = shape
    name = "aten.bmm.default" if batch > 1 else "aten.mm.default"
    return StepTrace(((OpRecord(name, "matmul", "forward", "float32", 2 * batch * m * n * k, 0, 0, shape), count),
                      (OpRecord("aten.add.Tensor", "memory", "forward", "float32", 0, 8, 4), 3)))


def test_profiler_names_of_traced_ops():
    assert profiled_op_name("aten.addmm.default") == "aten::addmm"
    assert profiled_op_name("aten.mm.out") == "aten::mm"
    assert matmul_op_names(_mm_trace((4, 2, 3, 5), 2)) == {"aten::bmm"}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("mode", ["forward", "forecast"])
def test_the_profiler_sees_every_gemm_the_step_traced(architecture, mode):
    """Each product the dispatch mode recorded is one profiler event of the same name, none more: the GEMMs'
    self times describe the same products the trace prices."""
    config = config_of(architecture)
    torch.manual_seed(0)
    model = build_model_from_config(config)
    batch = token_batch(config, WORKLOAD, torch.Generator().manual_seed(0))

    def run():
        run_step(model, batch, WORKLOAD, mode, generator=torch.Generator().manual_seed(0))

    run()
    trace = record_step(model, batch, WORKLOAD, mode, generator=torch.Generator().manual_seed(0))
    traced = sum(count for op, count in trace.ops if op.kind == "matmul")
    assert traced > 0
    assert len(gemm_self_times_s(run, matmul_op_names(trace))) == traced
    assert in_step_gemm_s(run, trace, 0.0) > 0


def test_a_step_that_ran_other_gemms_than_its_trace_is_refused():
    a, w = torch.ones(8, 16), torch.ones(16, 16)

    def run():
        for _ in range(3):
            torch.mm(a, w)

    with pytest.raises(ValueError, match="ran 3 GEMMs where its trace has 2"):
        in_step_gemm_s(run, _mm_trace((1, 8, 16, 16), 2), 0.0)


def test_the_in_op_part_of_calling_an_op_is_taken_off_each_product():
    """Three products each read their self time less the in-op call time, floored at zero."""
    a, w = torch.ones(8, 16), torch.ones(16, 16)
    run = lambda: [torch.mm(a, w) for _ in range(3)]  # noqa: E731
    whole = in_step_gemm_s(run, _mm_trace((1, 8, 16, 16), 3), 0.0)
    assert in_step_gemm_s(run, _mm_trace((1, 8, 16, 16), 3), 1.0) == 0.0
    assert 0 < gemms_in_step.in_op_call_s(torch.float32) < 1e-3
    assert whole > 0


@pytest.mark.parametrize("shape", [(1, 64, 512, 512), (8, 64, 64, 64)])
def test_a_step_of_the_timed_product_itself_reads_a_factor_near_one(shape, monkeypatch):
    """A 'step' that is the product exactly as gemms_beside times it beside, eight times: its GEMMs in the step
    and its shape back to back are one and the same kernel, so the factor is 1 but for timing noise."""
    monkeypatch.setattr(gemms_in_step, "FACTOR_ROUNDS", 5)
    product = gemm_run(*shape, torch.float32)
    run = lambda: [product() for _ in range(8)]  # noqa: E731
    factor = in_model_gemm_factor([(run, _mm_trace(shape, 8))], "fp32", simple_measured_device())
    assert 0.67 < factor < 1.5
