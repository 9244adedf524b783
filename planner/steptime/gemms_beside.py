"""A benchmark step's exact GEMM shapes, timed beside its timed steps: one timing of each shape after each step
(`GemmsBeside.time_once`), so the step and the kernel times its prediction prices share the same seconds of a
machine whose speed moves (calibration_steps says by how much).

Timed after the steps instead, they priced another state of the machine: small expert_only's forward at
batch 1, context 64 (20 steps, five times over in one process) took 1.36–1.53 × the kernel time of its GEMM
shapes timed beside it, and 1.13–1.76 × the same shapes timed after its steps.

The shapes come from a step recorded before the timed ones. A step whose routing moves (a training step's)
may meet shapes that one did not; the prediction times those after the steps. Each shape is timed as the probe
times it (kernel_probes.gemm_run: a plain product's weight rotating through copies that together pass the
last-level cache twice), so each holds its own copies, 64 MiB or more: only the MAX_SHAPES shapes of the most
FLOPs in the step are timed beside it.
"""

from __future__ import annotations

from collections import Counter

from planner.bench.device import TORCH_DTYPES
from planner.steptime.kernel_probes import (Timed, gemm_run, kernel_part, median_timing, op_call_s,
                                            time_after_untimed_run)
from planner.steptime.measured import MeasuredDevice, gemm_key
from planner.steptime.ops import StepTrace

MAX_SHAPES = 24  # about 1.5 GiB of weight copies at Chronos' sizes (a weight above 32 MiB: two copies)


def heaviest_gemm_shapes(trace: StepTrace, limit: int) -> list[tuple[int, int, int, int]]:
    """The `limit` GEMM shapes (batch, m, n, k) of `trace` with the most FLOPs in the step, most first."""
    flops: Counter = Counter()
    for op, count in trace.ops:
        if op.kind == "matmul" and op.gemm is not None:
            flops[op.gemm] += count * op.flops
    return [shape for shape, _ in flops.most_common(limit)]


class GemmsBeside:
    """The heaviest GEMM shapes of a recorded step, each with its timings so far."""

    def __init__(self, trace: StepTrace, dtype: str) -> None:
        torch_dtype = TORCH_DTYPES[dtype]
        self.shapes = heaviest_gemm_shapes(trace, MAX_SHAPES)
        self._runs = {shape: gemm_run(*shape, torch_dtype) for shape in self.shapes}
        self._call_s = op_call_s(torch_dtype)
        self.wall_s: dict[tuple[int, int, int, int], list[float]] = {shape: [] for shape in self.shapes}
        self.cpu_s: dict[tuple[int, int, int, int], list[float]] = {shape: [] for shape in self.shapes}

    def time_once(self) -> None:
        """One timing of each shape, after an untimed call: the step left the caches to its own code and data,
        and a product's activations and output, which a model step has just written, would come from memory
        (its weight does either way: a copy not in the cache). tiny expert_only's forward at batch 16, context
        512 (1,024-row products of small weights) read 0.92 and 0.92 of its price so, 0.89 and 0.87 with its
        shapes that take over a millisecond timed alone after each step."""
        for shape, run in self._runs.items():
            time_after_untimed_run(run, self.wall_s[shape], self.cpu_s[shape])

    def timings(self) -> dict[str, Timed]:
        """`gemm_key` -> each timed shape's kernel seconds (its median timing less the cost of calling an op)
        and busy threads, as kernel_probes.time_gemm_shapes reports them."""
        return {gemm_key(*shape): kernel_part(median_timing(wall, self.cpu_s[shape]), self._call_s)
                for shape, wall in self.wall_s.items() if wall}

    def priced_on(self, device: MeasuredDevice) -> MeasuredDevice:
        """`device` with these timings (less any a busy machine disturbed)."""
        timings = self.timings()
        return device.with_gemm_timings({key: t.seconds for key, t in timings.items()},
                                        {key: t.busy_threads for key, t in timings.items()})
