"""Probing this machine for the device model's terms (about half a minute; cached by `device_cache`).

- the kernels' terms (`kernel_probes`): GEMM rates on a grid of shapes, memory-bound kernel time by bytes for
  each class of op, fresh pages, a scatter-add's cost per row, and the kernel time of every exact GEMM shape
  a calibration step (below) or a predicted step meets;
- how much slower GEMMs run inside a model step than their exact shapes back to back: forwards and forecasts
  of tiny and small at small shapes, their GEMMs' own time read with the profiler (gemms_in_step);
- the host's time per dispatched op, per phase: real steps of debug, each timed, less the kernel time the
  terms above give for its traced ops: a forward and a forecast, a forward and backward, and an AdamW step.
  Views are timed alone.

The threads' speedup on a reference GEMM is taken at both ends (host_state: the machine's state, which a
benchmark run compares with its own). Every time is the median of repeats on the wall clock, as a benchmark
reports its steps (run the probe on a quiet machine: neighbours slow every repeat). Runs in the benchmark's
worker, after its measurement (so the allocator is in the same state as the timed steps).

The host's terms and the exact GEMM timings move with the state of the machine and the process
(`remeasure_state` says by how much), so every benchmark run times them again beside its own timed steps for
its prediction (a second or a few); the cache keeps the probe's.
"""

from __future__ import annotations

import datetime
from dataclasses import replace
from typing import Optional

import torch

from model.config import make_config
from planner.bench.memory_probe import SETTLED_MMAP_THRESHOLD_BYTES, reuse_all_freed_memory, settle_allocator
from planner.steptime.calibration_steps import (CALIBRATION_TIME_S, CALIBRATION_WORKLOAD, CalibrationStep,
                                                calibration_run, state_steps, time_alternately, training_steps)
from planner.steptime.gemms_beside import GemmsBeside
from planner.steptime.gemms_in_step import in_model_gemm_factor
from planner.steptime.host_state import parallel_speedup
from planner.steptime.kernel_probes import (BMM_AXES, BMM_BATCH, BUSY_FLOOR, KERNEL_FLOOR_S, MM_AXES, Timed,
                                            fresh_page_s_per_byte_probe, gemm_grid, memory_probes, op_call_s,
                                            scatter_s_per_row_probe, size_curve, streamed_elementwise, typical_time,
                                            typical_time_s, with_exact_gemms)
from planner.steptime.measured import MeasuredDevice
from planner.steptime.ops import StepTrace
from planner.steptime.predict import predict_step_time
from planner.bench.device import TORCH_DTYPES
from planner.workload import Workload

MAX_HOST_BUSY = 64.0  # the host's busy threads beyond this are a disturbed calibration step
GEMM_FACTOR_RANGE = (0.5, 3.0)  # an in-model GEMM factor outside this is a disturbed probe
# The calibration steps: the debug model at a small workload (overhead dominates; kernels are modelled), and
# steps whose small GEMMs dominate (tiny and small at batches and contexts no benchmark grid uses): together
# they separate the host's time per op from how much slower GEMMs run inside a model than back to back, for
# forwards and for forecasts (whose decoding steps multiply a few rows by every weight).
GEMM_CALIBRATIONS = (("debug", CALIBRATION_WORKLOAD),
                     ("tiny", Workload(batch_size=2, context_length=32, prediction_length=4, num_samples=2)),
                     ("small", Workload(batch_size=1, context_length=32, prediction_length=4, num_samples=2)))
FITTED_MODES = ("forward", "forecast")  # each its own host time and GEMM factor; a mode is its phase's name



def _host_s_per_op(spent_s: float, ops, device: MeasuredDevice, view_s: float) -> float:
    """What a step spent beyond its modelled kernels and views, per dispatched op."""
    kernels = predict_step_time(ops, _with_host(device, 0.0, 0.0))
    views = ops.count("view")
    return max((spent_s - kernels.total_s - views * view_s) / max(ops.op_count - views, 1), KERNEL_FLOOR_S)


def _host_busy(spent: Timed, ops: StepTrace, device: MeasuredDevice, host_s: float, view_s: float,
               other_cpu_s: float = 0.0) -> float:
    """Threads busy while the host dispatches `ops`: the step's CPU time, less `other_cpu_s` (a part of the
    step priced apart) and the kernels' (each kernel's time × its busy threads), ÷ the host's time."""
    dispatch = replace(_with_host(device, host_s, view_s), host_busy={"forward": 0.0})
    priced = predict_step_time(ops, dispatch)
    if priced.cpu_s is None or priced.overhead_s <= 0:
        return 1.0
    spent_cpu_s = spent.busy_threads * spent.seconds - other_cpu_s
    # Not capped at PyTorch's threads: between a step's ops every idle thread of its pools may spin.
    return min(max((spent_cpu_s - priced.cpu_s) / priced.overhead_s, BUSY_FLOOR), MAX_HOST_BUSY)


def _fit_host_and_gemm_factor(device: MeasuredDevice, dtype: str, view_s: float,
                              mode: str) -> tuple[float, float, MeasuredDevice, tuple[Timed, StepTrace]]:
    """Host seconds per op and the GEMM in-model factor g of `mode`, from its calibration steps. The GEMM-bound
    steps (tiny's and small's) give g, their GEMMs' own time read with the profiler (gemms_in_step); the
    dispatch-bound step (debug's) then gives h: t = n·h + g·K + rest (n non-view ops, K the kernel time of its
    exact GEMM shapes, timed here and returned in the device, rest the other kernels and the views). Also
    returns that step's timing and trace, from which its dispatch's busy threads are read.

    Both fitted from the steps' whole times, g and h traded off: a slow GEMM read as a slow host and priced
    every small model's dispatch wrong, and a probe fitted g at 1.56 where the profiler read 0.89–1.09."""
    (dispatch_run, dispatch_trace), *gemm_steps = [calibration_run(make_config(size), workload, dtype, mode)
                                                   for size, workload in GEMM_CALIBRATIONS]
    for _, trace in ((dispatch_run, dispatch_trace), *gemm_steps):
        device = with_exact_gemms(device, trace)
    factor = in_model_gemm_factor(gemm_steps, dtype, device)
    if not GEMM_FACTOR_RANGE[0] <= factor <= GEMM_FACTOR_RANGE[1]:
        factor = 1.0  # a disturbed probe: no factor
    timed = typical_time(dispatch_run, min_time_s=CALIBRATION_TIME_S)
    priced = replace(device, gemm_in_model_factor={"forward": factor, mode: factor})
    return _host_s_per_op(timed.seconds, dispatch_trace, priced, view_s), factor, device, (timed, dispatch_trace)


def _phase_trace(trace, phases: tuple[str, ...]) -> StepTrace:
    return StepTrace(tuple((op, count) for op, count in trace.ops if op.phase in phases))


def probe_device(dtype: str, device_name: str) -> MeasuredDevice:
    """Measure this CPU's terms in `dtype` (see the module docstring)."""
    torch_dtype = TORCH_DTYPES[dtype]
    speedup_before = parallel_speedup()
    call_s = op_call_s(torch_dtype)
    mm = gemm_grid(MM_AXES, torch_dtype, 1, call_s)
    bmm = gemm_grid(BMM_AXES, torch_dtype, BMM_BATCH, call_s)
    settle_allocator()  # the timed steps' allocator: large outputs are fresh pages
    fresh = fresh_page_s_per_byte_probe()
    reuse_all_freed_memory()  # the kernels alone; fresh pages are priced apart
    try:
        memory = {name: size_curve(make_run, moved, call_s)
                  for name, (make_run, moved) in memory_probes(torch_dtype).items()}
        element_bytes = torch.finfo(torch_dtype).bits // 8
        optimizer_memory = size_curve(streamed_elementwise(torch_dtype), 3 * element_bytes, call_s)
    finally:
        settle_allocator()
    scatter = scatter_s_per_row_probe(memory["elementwise"], call_s)
    view_s = _view_s()
    draft = MeasuredDevice(device_name, dtype, datetime.date.today().isoformat(), mm, bmm, memory,
                           scatter.seconds, fresh.seconds, SETTLED_MMAP_THRESHOLD_BYTES, {"forward": 1.0},
                           {"forward": view_s}, view_s, speedup_before, scatter_busy=scatter.busy_threads,
                           fresh_page_busy=fresh.busy_threads, optimizer_memory=optimizer_memory)
    host: dict[str, float] = {}
    busy: dict[str, float] = {}
    gemm_factor: dict[str, float] = {}
    dispatch_steps = {}
    for mode in FITTED_MODES:
        host[mode], gemm_factor[mode], draft, dispatch_steps[mode] = _fit_host_and_gemm_factor(draft, dtype, view_s,
                                                                                              mode)
    draft = replace(draft, gemm_in_model_factor=gemm_factor)
    for mode, (timed, trace) in dispatch_steps.items():
        busy[mode] = _host_busy(timed, trace, draft, host[mode], view_s)
    steps = training_steps(dtype)
    for step in steps:
        draft = with_exact_gemms(draft, step.trace)
    time_alternately(steps)
    _fit_training_host(draft, view_s, host, busy, steps)
    # The machine's state over the probe: the mean of its two ends (a state change midway shows in neither)
    return replace(draft, host_s_per_op=host, host_busy=busy,
                   parallel_speedup=(speedup_before + parallel_speedup()) / 2)


def _fit_training_host(device: MeasuredDevice, view_s: float, host: dict[str, float], busy: dict[str, float],
                       steps: list[CalibrationStep]) -> None:
    """The backward's and the optimizer's host time per op and busy threads, into `host` and `busy`, from the
    training step's calibration steps, timed (calibration_steps.training_steps; the forward's part of the
    forward and backward priced with host["forward"] and busy["forward"], which must be there)."""
    for step in steps:
        spent = step.timed()
        spent_s, other_cpu_s = spent.seconds, 0.0
        if step.phase == "backward":  # the forward and backward together: take the forward's part off
            forward_ops = _phase_trace(step.trace, ("forward",))
            forward = predict_step_time(forward_ops, replace(_with_host(device, host["forward"], view_s),
                                                             host_busy={"forward": busy["forward"]}))
            spent_s -= forward.total_s
            other_cpu_s = forward.cpu_s or 0.0
        ops = _phase_trace(step.trace, (step.phase,))
        host[step.phase] = _host_s_per_op(spent_s, ops, device, view_s)
        busy[step.phase] = _host_busy(spent, ops, device, host[step.phase], view_s, other_cpu_s)


def remeasure_state(device: MeasuredDevice, mode: str, trace: StepTrace,
                    steps: Optional[list[CalibrationStep]] = None,
                    gemms: Optional[GemmsBeside] = None) -> MeasuredDevice:
    """`device` as this process runs now, for a benchmark's prediction of `trace` (a `mode` step): the step's
    exact GEMM shapes timed again, and the host's terms of the phases it dispatches fitted again on the probe's
    own calibration steps (the debug model's, their GEMM shapes timed again too), each phase as the probe fits
    it: the forward's or the forecast's from its dispatch-bound step, less its kernels at the probed GEMM
    factor; the training step's backward and optimizer from theirs; and the cost of fresh pages. The GEMM
    factors and the other kernel terms are the probe's.

    Kernel and host speeds move with the state of the machine and of the process together: one workload's
    step and the exact GEMMs of its trace, timed in the same process, ran 262 and 113 ms in one process and
    238 and 91 ms in the next; 55 exact GEMM timings a probe had made in a benchmark's worker minutes before
    were 1.23× (median; up to 3.6×) the same shapes timed again in a new process, while timing them twice in
    a row agrees within 10 % (median 0.99). The host's time per op moves too (±40 % over hours: a debug step
    at batch 1, 60–70 % dispatch, ran 33 ms and 55 ms on one probe). A run priced with what it times beside
    its own steps compares the model with the step, not two states of the machine. (The GEMM factors are
    left as probed: reading them needs tiny's and small's calibration steps built and profiled, seconds and
    hundreds of MiB that a benchmark of a debug model would not otherwise spend.) Fresh pages move too: 64 MiB written on new pages cost 23 ms beyond a warm write when a
    probe ran and 29–34 ms in a benchmark's process the next day, a third of debug's forward at batch 16,
    context 512 (327 MiB of new pages a step).

    `steps`: the calibration steps of `mode` (calibration_steps.state_steps: a benchmark's are of the debug
    model of its step's architecture), already timed beside the benchmark's own steps, one of each after each
    of its steps: the host's terms are then fitted on the same seconds of the machine, and the same mix of
    ops, as the step they price. Without them (or untimed) the dense debug model's are built and timed here.
    `gemms`: the step's heaviest GEMM shapes, timed beside its steps the same way (gemms_beside): those the
    step or its calibration steps meet are priced at those timings, their other shapes timed here."""
    if not steps or not all(step.wall_s for step in steps):
        steps = state_steps(mode, device.dtype)
        time_alternately(steps)
    view_s = _view_s()
    fresh = fresh_page_s_per_byte_probe()
    beside = gemms.timings().keys() if gemms else ()
    device = gemms.priced_on(device) if gemms else device
    for priced in (trace, *{id(step.trace): step.trace for step in steps}.values()):
        device = with_exact_gemms(device, priced, retime=True, timed_beside=beside)
    (dispatch, *training), host, busy = steps, dict(device.host_s_per_op), dict(device.host_busy)
    timed = dispatch.timed()
    host[dispatch.phase] = _host_s_per_op(timed.seconds, dispatch.trace, device, view_s)
    busy[dispatch.phase] = _host_busy(timed, dispatch.trace, device, host[dispatch.phase], view_s)
    _fit_training_host(device, view_s, host, busy, training)
    return replace(device, host_s_per_op=host, host_busy=busy, host_s_per_view=view_s,
                   fresh_page_s_per_byte=fresh.seconds, fresh_page_busy=fresh.busy_threads)


def _view_s() -> float:
    """The host's time for a view (no kernel)."""
    tensor = torch.ones(4, 4)
    return typical_time_s(lambda: tensor.view(16))


def _with_host(device: MeasuredDevice, per_op_s: float, per_view_s: float) -> MeasuredDevice:
    return replace(device, host_s_per_op={"forward": per_op_s}, host_s_per_view=per_view_s)
