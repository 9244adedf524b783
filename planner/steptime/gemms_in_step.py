"""How much slower GEMMs run inside a model step than their exact shapes back to back (the device model's
in-model GEMM factor): each product's own time in the step, read with torch.profiler (an op's self time: its
children, such as addmm's copy of the bias, are not in it), against the kernel time of its shape timed beside
the step as a benchmark times its own step's shapes (gemms_beside), so the factor applies to the timings it
multiplies.

Read this way, the factor is the GEMMs' alone. Fitted from whole steps' times together with the host's time
per op, the two traded off: one probe fitted 1.56 and 1.59 (forward, forecast) on steps in which the
profiler read 0.89–1.09 against their shapes timed beside them.

The profiler's self time of a product holds, besides its kernel, the part of calling an op that runs inside
the op (checks, the output's allocation). The exact timings have the whole cost of calling an op taken off
(`kernel_part`), so that part is taken off here too: the self time of a (1 × 1) · (1 × 1) product, read the
same way. What remains of calling an op is the host's time per op, which the probe fits apart.
"""

from __future__ import annotations

import os
import statistics
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from planner.bench.device import TORCH_DTYPES
from planner.steptime.gemms_beside import GemmsBeside
from planner.steptime.measured import MeasuredDevice
from planner.steptime.ops import StepTrace

# Kineto writes a line to stderr at every start and stop of the profiler unless its log level is above USDT's (5).
os.environ.setdefault("KINETO_LOG_LEVEL", "6")
CALL_PROBE_CALLS = 50  # (1 × 1) · (1 × 1) products profiled for the in-op part of calling an op
FACTOR_ROUNDS = 9  # profiled runs of each step: one run's GEMMs read 0.8–1.6 × their shapes beside


def profiled_op_name(trace_name: str) -> str:
    """The profiler's name of a traced op: 'aten.addmm.default' -> 'aten::addmm'."""
    namespace, name = trace_name.split(".")[:2]
    return f"{namespace}::{name}"


def gemm_self_times_s(run: Callable[[], object], op_names: set[str]) -> list[float]:
    """One call of `run` under the profiler: the self CPU seconds of each op named in `op_names` (the
    profiler's names), in the order they ran."""
    with profile(activities=[ProfilerActivity.CPU]) as recorded:
        run()
    return [event.self_cpu_time_total / 1e6 for event in recorded.events() if event.name in op_names]


def in_op_call_s(dtype: torch.dtype) -> float:
    """The self time, under the profiler, of a product whose kernel is nothing: the part of calling an op
    that runs inside it (the median of CALL_PROBE_CALLS)."""
    one = torch.ones(1, 1, dtype=dtype)

    def products():
        for _ in range(CALL_PROBE_CALLS):
            torch.mm(one, one)

    products()
    return statistics.median(gemm_self_times_s(products, {"aten::mm"}))


def back_to_back_gemm_s(trace: StepTrace, device: MeasuredDevice) -> float:
    """The kernel seconds of `trace`'s GEMMs, every call, as `device` prices them back to back (its exact
    shapes' timings): the step's GEMMs with no in-model factor and no fresh pages."""
    return sum(count * device.gemm_kernel_s(op) for op, count in trace.ops if op.kind == "matmul")


def matmul_op_names(trace: StepTrace) -> set[str]:
    """The profiler's names of `trace`'s GEMM ops."""
    return {profiled_op_name(op.name) for op, _ in trace.ops if op.kind == "matmul"}


def in_step_gemm_s(run: Callable[[], object], trace: StepTrace, call_s: float) -> float:
    """The kernel seconds of one step's GEMMs as they ran in it: each product's self time, less `call_s`
    (`in_op_call_s`). A ValueError when the step did not run the GEMMs `trace` recorded (then the two do not
    describe the same step)."""
    times = gemm_self_times_s(run, matmul_op_names(trace))
    expected = sum(count for op, count in trace.ops if op.kind == "matmul")
    if len(times) != expected:
        raise ValueError(f"the profiled step ran {len(times)} GEMMs where its trace has {expected}")
    return sum(max(t - call_s, 0.0) for t in times)


def in_model_gemm_factor(steps: list[tuple[Callable[[], object], StepTrace]], dtype: str,
                         device: MeasuredDevice) -> float:
    """The GEMMs' seconds in `steps` (each a run and its trace), profiled FACTOR_ROUNDS times, ÷ the same
    GEMMs back to back: their shapes timed beside the steps, one timing of each after each profiled run (those
    not among a step's heaviest at `device`'s timings). Each step's median run; the steps' sums."""
    call_s = in_op_call_s(TORCH_DTYPES[dtype])
    beside = [GemmsBeside(trace, dtype) for _, trace in steps]
    in_step: list[list[float]] = [[] for _ in steps]
    for _ in range(FACTOR_ROUNDS):
        for (run, trace), gemms, seconds in zip(steps, beside, in_step):
            seconds.append(in_step_gemm_s(run, trace, call_s))
            gemms.time_once()
    back_to_back_s = sum(back_to_back_gemm_s(trace, gemms.priced_on(device))
                         for (_, trace), gemms in zip(steps, beside))
    return sum(statistics.median(seconds) for seconds in in_step) / back_to_back_s
