"""A benchmark step's heaviest memory-bound kernels timed beside its steps (steptime.memory_beside)."""

import pytest

from planner.steptime import memory_beside
from planner.steptime.memory_beside import MIN_BYTES, MemoryBeside, heaviest_memory_points
from planner.steptime.ops import OpRecord, StepTrace
from tests.steptime_fixtures import BYTES_PER_S, simple_measured_device

MIB = 2**20


def _op(name, read, written, count):
    return OpRecord(name, "memory", "forward", "float32", 0, read, written), count


# Bytes in the step, by hand: softmax 4 + 4 MiB × 3 = 24 MiB; bernoulli_ 8 + 8 MiB × 2 = 32 MiB; add 8 + 4 MiB
# × 1 = 12 MiB; a mul of 0.5 + 0.25 MiB × 100 (75 MiB in all, but under MIN_BYTES each) is not timed; nor is the
# product, which is no memory-bound kernel.
TRACE = StepTrace((_op("aten._softmax.default", 4 * MIB, 4 * MIB, 3), _op("aten.bernoulli_.float", 8 * MIB, 8 * MIB, 2),
                   _op("aten.add.Tensor", 8 * MIB, 4 * MIB, 1), _op("aten.mul.Tensor", MIB // 2, MIB // 4, 100),
                   (OpRecord("aten.mm.default", "matmul", "forward", "float32", 2 * 64**3, 0, 0, (1, 64, 64, 64)),
                    5)))
SOFTMAX, RANDOM, ADD = ("softmax", 8 * MIB), ("random", 16 * MIB), ("elementwise", 12 * MIB)


def test_the_heaviest_points_are_the_classes_and_sizes_of_the_most_bytes_in_the_step():
    assert MIN_BYTES == MIB
    assert heaviest_memory_points(TRACE) == [RANDOM, SOFTMAX, ADD]
    assert heaviest_memory_points(TRACE, limit=2) == [RANDOM, SOFTMAX]
    # Their own operands within the bound: 16 MiB, then softmax's 8 would pass 20; the add's 12 would not.
    assert heaviest_memory_points(TRACE, total_bytes=20 * MIB) == [RANDOM]


def test_each_point_gets_one_timing_per_call_after_an_untimed_run(monkeypatch):
    monkeypatch.setattr(memory_beside, "MAX_TOTAL_BYTES", 30 * MIB)  # the operands of RANDOM and SOFTMAX only
    beside = MemoryBeside(TRACE, "fp32")
    assert beside.points == [RANDOM, SOFTMAX]
    calls = dict.fromkeys(beside.points, 0)

    def counted(point):
        def run():
            calls[point] += 1
        return run
    beside._runs = {point: counted(point) for point in beside.points}
    for _ in range(3):
        beside.time_once()
    assert calls == {RANDOM: 6, SOFTMAX: 6}
    assert [len(beside.wall_s[p]) for p in beside.points] == [len(beside.cpu_s[p]) for p in beside.points] == [3, 3]


def test_each_timed_class_is_scaled_by_its_time_beside_over_its_price_and_the_others_kept():
    """On the fixture's device every class moves BYTES_PER_S: softmax's 8 MiB priced 0.839 ms, bernoulli_'s
    16 MiB 1.678 ms. Timed beside (medians of three, less a 10 µs call): softmax 1.2 × its price, bernoulli_
    4 × (outside STATE_RANGE: a disturbed timing, the class left as probed), the add none."""
    device = simple_measured_device()
    beside = MemoryBeside(StepTrace(TRACE.ops[:2]), "fp32")
    beside._call_s = 10e-6
    softmax_s, random_s = 8 * MIB / BYTES_PER_S, 16 * MIB / BYTES_PER_S
    beside.wall_s[SOFTMAX][:] = [1.2 * softmax_s + 10e-6, 9.0, 0.5 * softmax_s]  # median: 1.2 × plus the call
    beside.cpu_s[SOFTMAX][:] = beside.wall_s[SOFTMAX]
    beside.wall_s[RANDOM][:] = beside.cpu_s[RANDOM][:] = [4 * random_s + 10e-6] * 3
    assert beside.state_ratios(device) == {"softmax": pytest.approx(1.2)}
    priced = beside.priced_on(device)
    for size in (1e3, 8 * MIB, 1e9):
        assert priced.memory["softmax"](size) == pytest.approx(1.2 * size / BYTES_PER_S)
        assert priced.memory["random"](size) == device.memory["random"](size)
        assert priced.memory["elementwise"](size) == device.memory["elementwise"](size)
    assert priced.memory["softmax"].busy_threads == device.memory["softmax"].busy_threads
    assert priced.gemm_shape_s == device.gemm_shape_s and priced.host_s_per_op == device.host_s_per_op


def test_a_step_with_no_kernel_of_a_mebibyte_times_nothing_and_prices_as_probed():
    beside = MemoryBeside(StepTrace(TRACE.ops[3:]), "fp32")
    beside.time_once()
    device = simple_measured_device()
    assert beside.points == [] and beside.state_ratios(device) == {} and beside.priced_on(device) == device


def test_a_points_run_is_its_class_probe_at_the_ops_bytes():
    """The real runs, built by each class's probe for the op's bytes moved: softmax's over a 1,048,576-element
    input (8 MiB read and written), bernoulli_'s over 2,097,152 elements (16 MiB read and written in place)."""
    beside = MemoryBeside(StepTrace(TRACE.ops[:2]), "fp32")
    beside.time_once()
    assert all(len(beside.wall_s[p]) == 1 and 0 < beside.wall_s[p][0] < 5 for p in beside.points)
