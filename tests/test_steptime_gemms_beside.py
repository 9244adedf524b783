"""A benchmark step's GEMM shapes timed beside its steps (steptime.gemms_beside)."""

import pytest

from planner.steptime import gemms_beside, probe
from planner.steptime.gemms_beside import GemmsBeside, heaviest_gemm_shapes
from planner.steptime.measured import gemm_key
from planner.steptime.ops import OpRecord, StepTrace
from tests.steptime_fixtures import simple_measured_device


def _mm(shape, count):
    batch, m, n, k = shape
    return OpRecord("aten.mm.default", "matmul", "forward", "float32", 2 * batch * m * n * k, 0, 0, shape), count


# Four shapes; FLOPs in the step, by hand: 2·1·8·64·64 × 10 = 655,360; 2·1·128·64·64 × 1 = 1,048,576;
# 2·4·16·16·16 × 3 = 196,608; 2·1·2·64·64 × 20 = 327,680. And an add, which is no GEMM.
SHAPES = ((1, 8, 64, 64), (1, 128, 64, 64), (4, 16, 16, 16), (1, 2, 64, 64))
TRACE = StepTrace((_mm(SHAPES[0], 10), _mm(SHAPES[1], 1), _mm(SHAPES[2], 3), _mm(SHAPES[3], 20),
                   (OpRecord("aten.add.Tensor", "memory", "forward", "float32", 0, 8, 4), 7)))


def test_the_heaviest_shapes_are_those_of_the_most_flops_in_the_step():
    assert heaviest_gemm_shapes(TRACE, 3) == [SHAPES[1], SHAPES[0], SHAPES[3]]
    assert heaviest_gemm_shapes(TRACE, 10) == [SHAPES[1], SHAPES[0], SHAPES[3], SHAPES[2]]


def test_each_shape_gets_one_timing_per_call_after_an_untimed_run(monkeypatch):
    """Only the MAX_SHAPES heaviest shapes; each run twice per call, the second timed."""
    monkeypatch.setattr(gemms_beside, "MAX_SHAPES", 2)
    gemms = GemmsBeside(TRACE, "fp32")
    assert gemms.shapes == [SHAPES[1], SHAPES[0]]
    calls = {shape: 0 for shape in gemms.shapes}

    def counted(shape):
        def run():
            calls[shape] += 1
        return run
    gemms._runs = {shape: counted(shape) for shape in gemms.shapes}
    for _ in range(3):
        gemms.time_once()
    assert calls == {SHAPES[1]: 6, SHAPES[0]: 6}
    assert [len(gemms.wall_s[shape]) for shape in gemms.shapes] == [3, 3]
    assert [len(gemms.cpu_s[shape]) for shape in gemms.shapes] == [3, 3]


def test_a_shapes_timing_is_its_median_less_the_call_with_the_threads_it_kept_busy():
    """Timings 30, 90 and 50 µs (CPU 45, 135 and 75 µs) and a 10 µs call: 40 µs of kernel, at (1.5 × 50 − 10)
    ÷ 40 busy threads (kernel_probes.kernel_part: the call runs on one thread); on a device, at those seconds."""
    gemms = GemmsBeside(StepTrace((_mm(SHAPES[1], 1),)), "fp32")
    gemms._call_s = 10e-6
    gemms.wall_s[SHAPES[1]][:], gemms.cpu_s[SHAPES[1]][:] = [30e-6, 90e-6, 50e-6], [45e-6, 135e-6, 75e-6]
    key = gemm_key(*SHAPES[1])
    timed = gemms.timings()[key]
    assert timed.seconds == pytest.approx(40e-6) and timed.busy_threads == pytest.approx((75 - 10) / 40)
    assert gemms.priced_on(simple_measured_device()).gemm_shape_s[key] == pytest.approx(40e-6)


def test_remeasure_state_prices_the_shapes_timed_beside_and_times_only_the_others(monkeypatch):
    """The step's shapes timed beside its steps are priced at those timings; the prediction times the rest."""
    device = simple_measured_device()
    gemms = GemmsBeside(StepTrace((_mm(SHAPES[0], 10), _mm(SHAPES[1], 1))), "fp32")
    for shape, seconds in ((SHAPES[0], 3e-6), (SHAPES[1], 5e-6)):
        gemms.wall_s[shape][:] = gemms.cpu_s[shape][:] = [seconds + gemms._call_s]
    asked: list = []

    def time_gemm_shapes(shapes, dtype):
        asked.extend(shapes)
        return {gemm_key(*shape): probe.Timed(7e-6, 1.0) for shape in shapes}
    monkeypatch.setattr("planner.steptime.kernel_probes.time_gemm_shapes", time_gemm_shapes)
    retimed = probe.remeasure_state(device, "forward", TRACE, gemms=gemms)
    assert SHAPES[0] not in asked and SHAPES[1] not in asked and {SHAPES[2], SHAPES[3]} <= set(asked)
    assert retimed.gemm_shape_s[gemm_key(*SHAPES[0])] == pytest.approx(3e-6)
    assert retimed.gemm_shape_s[gemm_key(*SHAPES[1])] == pytest.approx(5e-6)
    assert retimed.gemm_shape_s[gemm_key(*SHAPES[2])] == 7e-6
