"""A benchmark step's heaviest memory-bound kernels, timed beside its timed steps as its GEMM shapes are
(gemms_beside): one timing of each after each step, each by its class's probe at the op's bytes, so the curves
that price the step's memory-bound ops are of the seconds of the machine the step ran in.

The probe's curves are of another state: on this VM dropout's `bernoulli_`, a serial kernel, ran 1.3–1.5× the
probe's curve back to back at the sizes of debug's training step at batch 16, context 512, an hour after the
probe, while the threads ran 1.8× one thread's rate together against 1.37× when it was probed (a thread alone
on its core runs faster than beside a busy sibling). That step, 31 % dropout draws, read 1.27–1.31 when its
curves were the probe's.

Only kernels of MIN_BYTES or more are timed (a single timing of a smaller one is mostly the cost of calling
it), the MAX_POINTS of the most bytes in the step; each point holds its operands (MAX_TOTAL_BYTES in all).
Each class's curve is then scaled by its points' beside time ÷ their price on it (a time-weighted ratio); a
ratio outside STATE_RANGE is a disturbed timing and leaves the class as probed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from planner.bench.device import TORCH_DTYPES
from planner.steptime.curves import SizeCurve
from planner.steptime.devices import memory_class
from planner.steptime.kernel_probes import kernel_part, median_timing, memory_probes, op_call_s, time_after_untimed_run
from planner.steptime.measured import MeasuredDevice
from planner.steptime.ops import StepTrace

MIN_BYTES = 2**20
MAX_POINTS = 12
MAX_TOTAL_BYTES = 2**30
STATE_RANGE = (0.5, 3.0)


def heaviest_memory_points(trace: StepTrace, limit: int = MAX_POINTS,
                           total_bytes: int = MAX_TOTAL_BYTES) -> list[tuple[str, int]]:
    """(class, bytes moved) of `trace`'s memory-bound ops of MIN_BYTES or more, the `limit` of the most bytes
    in the step (bytes × count) first, while their own bytes together stay within `total_bytes`."""
    moved: Counter = Counter()
    for op, count in trace.ops:
        if op.kind == "memory" and op.bytes >= MIN_BYTES:
            moved[(memory_class(op), op.bytes)] += count * op.bytes
    points, held = [], 0
    for point, _ in moved.most_common():
        if len(points) == limit:
            break
        if held + point[1] <= total_bytes:
            points.append(point)
            held += point[1]
    return points


class MemoryBeside:
    """The heaviest memory-bound points of a recorded step, each with its timings so far."""

    def __init__(self, trace: StepTrace, dtype: str) -> None:
        torch_dtype = TORCH_DTYPES[dtype]
        probes = memory_probes(torch_dtype)
        self.points = heaviest_memory_points(trace, MAX_POINTS, MAX_TOTAL_BYTES)
        self._runs = {}
        for name, size in self.points:
            make_run, bytes_per_element = probes[name]
            self._runs[(name, size)] = make_run(max(size // bytes_per_element, 1))
        self._call_s = op_call_s(torch_dtype)
        self.wall_s: dict[tuple[str, int], list[float]] = {point: [] for point in self.points}
        self.cpu_s: dict[tuple[str, int], list[float]] = {point: [] for point in self.points}

    def time_once(self) -> None:
        """One timing of each point, after an untimed run (as GemmsBeside.time_once)."""
        for point, run in self._runs.items():
            time_after_untimed_run(run, self.wall_s[point], self.cpu_s[point])

    def state_ratios(self, device: MeasuredDevice) -> dict[str, float]:
        """Per class timed: its points' kernel seconds beside the steps (median less the call) ÷ their price on
        `device`'s curve of that class, time-weighted; classes whose ratio is outside STATE_RANGE left out."""
        beside: Counter = Counter()
        priced: Counter = Counter()
        for (name, size), wall in self.wall_s.items():
            if wall:
                beside[name] += kernel_part(median_timing(wall, self.cpu_s[(name, size)]), self._call_s).seconds
                priced[name] += device.memory[name](size)
        ratios = {name: beside[name] / priced[name] for name in beside if priced[name] > 0}
        return {name: ratio for name, ratio in ratios.items() if STATE_RANGE[0] <= ratio <= STATE_RANGE[1]}

    def priced_on(self, device: MeasuredDevice) -> MeasuredDevice:
        """`device` with each timed class's curve scaled by its state ratio."""
        ratios = self.state_ratios(device)
        memory = {name: _scaled(curve, ratios[name]) if name in ratios else curve
                  for name, curve in device.memory.items()}
        return replace(device, memory=memory)


def _scaled(curve: SizeCurve, ratio: float) -> SizeCurve:
    return SizeCurve(curve.sizes, tuple(seconds * ratio for seconds in curve.seconds), curve.busy_threads)
