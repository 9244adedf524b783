"""Probing this machine for the device model's terms (about a minute and a half on a 2-core VM; cached by
`device_cache`).

- the kernels' terms (`kernel_probes`): GEMM rates on a grid of shapes, memory-bound kernel time by bytes for
  each class of op (and streamed from memory), fresh pages, a scatter-add's cost per row, and the kernel time
  of every exact GEMM shape a calibration step (below) or a predicted step meets; the threads' private caches
  are read from the OS (beyond them an op in a model step streams its operands);
- the host's time per dispatched op, per phase, and how much slower GEMMs run inside a model step than their
  shapes back to back: real steps, each timed, less the kernel time the terms above give for its traced
  ops. Forwards and forecasts of debug, tiny and small fit the host time (debug) and the GEMM terms (tiny and
  small on few rows, tiny on many, against their shapes timed beside them: a factor on the kernel time and a
  cost per byte of weight) of each; a forward and backward and an AdamW step of debug give the backward's and
  the optimizer's host time. Views are timed alone.

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
import math
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from model.config import make_config
from planner.bench.memory_probe import SETTLED_MMAP_THRESHOLD_BYTES, reuse_all_freed_memory, settle_allocator
from planner.steptime.calibration_steps import (CALIBRATION_WORKLOAD, CalibrationStep,
                                                calibration_run, state_steps, time_alternately, training_steps)
from planner.steptime.gemms_beside import GemmsBeside
from planner.steptime.host_state import parallel_speedup
from planner.steptime.kernel_probes import (BMM_AXES, BMM_BATCH, BUSY_FLOOR, KERNEL_FLOOR_S, MM_AXES, Timed,
                                            fresh_page_s_per_byte_probe, gemm_grid, median_timing, memory_probes,
                                            op_call_s, scatter_s_per_row_probe, size_curve, spin_window_probe,
                                            streamed_elementwise, time_after_untimed_run, typical_time_s,
                                            with_exact_gemms)
from planner.steptime.measured import MeasuredDevice, product_weight_bytes
from planner.steptime.ops import StepTrace
from planner.steptime.predict import predict_step_time
from planner.bench.device import TORCH_DTYPES
from planner.workload import Workload

DEFAULT_PRIVATE_CACHE_BYTES = 512 * 2**10  # a thread's level-2 cache where the OS lists none (Zen 3's)
MAX_HOST_BUSY = 64.0  # the host's busy threads beyond this are a disturbed calibration step
GEMM_FACTOR_RANGE = (0.5, 3.0)  # a fitted in-model GEMM factor outside this is a disturbed probe
# A fitted cost per weight byte above this (a weight read again at 100 MB/s) is a disturbed probe.
MAX_WEIGHT_S_PER_BYTE = 1e-8
# The calibration steps: the debug model at a small workload (overhead dominates; kernels are modelled), and
# steps whose GEMMs dominate (at batches and contexts no benchmark grid uses): tiny and small on a few rows,
# where a product's time is mostly its weight's (a forecast's decoding steps multiply a few rows by every
# weight), and tiny on 2,056 rows, where it is mostly arithmetic. Together they separate the host's time per
# op from how much slower GEMMs run inside a model than beside it, on their arithmetic and on their weights.
GEMM_CALIBRATIONS = (("debug", CALIBRATION_WORKLOAD),
                     ("tiny", Workload(batch_size=2, context_length=32, prediction_length=4, num_samples=2)),
                     ("small", Workload(batch_size=1, context_length=32, prediction_length=4, num_samples=2)),
                     ("tiny", Workload(batch_size=8, context_length=256, prediction_length=4, num_samples=2)))
FITTED_MODES = ("forward", "forecast")  # each its own host time and GEMM terms; a mode is its phase's name
FIT_ROUNDS = 11  # timings of each calibration step (and its GEMM shapes beside it); each step's median is kept



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


def _fit_host_and_gemm_terms(device: MeasuredDevice, dtype: str, view_s: float, mode: str
                             ) -> tuple[float, float, float, MeasuredDevice, tuple[Timed, StepTrace]]:
    """Host seconds per op and the GEMM in-model terms of `mode` (a factor g on the kernel time and a cost c per
    byte of weight), from its calibration steps: t = n·h + g·K + c·W + rest (n non-view ops, K the kernel time
    of the steps' GEMM shapes, W the bytes of their weights, rest the other kernels and the views). The first
    step (debug: mostly dispatch) is met exactly and sets h given g and c; the others (mostly GEMMs) set g and
    c by least squares on relative errors. Fitting h freely too lets it trade off with them: a slow GEMM would
    read as a slow host and price every small model's dispatch wrong. (A fixed cost per GEMM cannot be fitted
    here: every calibration model has the same share of GEMMs among its ops, so such a cost reads as host
    time.)

    K is of the timings a benchmark multiplies by g: each GEMM-bound step's shapes timed beside it, one timing
    of each after each of its timings (gemms_beside), over FIT_ROUNDS rounds of the steps one after another,
    each step's median timing kept. Against the probe's exact timings of the same shapes, made once before the
    steps, a factor priced two states of the machine: its shapes timed beside a step read 1.2–1.5× their exact
    timings. The terms hold more than the GEMMs' own slowdown: each product's own time in the step, read with
    torch.profiler, came to 0.89–1.09× its shape timed beside it, and a factor of that alone (1.03) priced
    every run of a grid 1.17× low (median), debug's too; what the products' weights evict, their neighbours
    read again from memory, which would cost per byte of weight, not per FLOP. A factor alone, fitted on steps
    of 32–66 rows (1.32), priced products of thousands of rows high (least squares over a grid's runs at batch
    16, context 512 put them at 0.85 of it); fitted with a step of 2,056 rows, one probe read g = 1.10 and
    c = 1.1 × 10⁻¹¹ s a byte for the forward (a few per cent of a few-row product), and for the forecast c
    below zero, so g alone (1.20).

    Returns the device with the steps' exact GEMM timings, and the first step's timing and trace, from which
    its dispatch's busy threads are read once g and c are known."""
    steps = [calibration_run(make_config(size), workload, dtype, mode) for size, workload in GEMM_CALIBRATIONS]
    for _, trace in steps:
        device = with_exact_gemms(device, trace)
    beside = [None] + [GemmsBeside(trace, dtype) for _, trace in steps[1:]]
    wall_s: list[list[float]] = [[] for _ in steps]
    cpu_s: list[list[float]] = [[] for _ in steps]
    for _ in range(FIT_ROUNDS):
        for (run, _), gemms, wall, cpu in zip(steps, beside, wall_s, cpu_s):
            time_after_untimed_run(run, wall, cpu)
            if gemms is not None:
                gemms.time_once()
    priced = device
    for gemms in beside[1:]:
        priced = gemms.priced_on(priced)
    timings = [median_timing(wall, cpu) for wall, cpu in zip(wall_s, cpu_s)]
    host_s, factor, per_weight_byte = _solve_host_and_gemm_terms(timings, [trace for _, trace in steps], priced,
                                                                 view_s)
    return host_s, factor, per_weight_byte, device, (timings[0], steps[0][1])


def _solve_host_and_gemm_terms(timings: list[Timed], traces: list[StepTrace], device: MeasuredDevice,
                               view_s: float) -> tuple[float, float, float]:
    """(h, g, c) from the calibration steps' timings, each step's median (see _fit_host_and_gemm_terms). Where
    the two GEMM terms fit outside reason, g alone is fitted (c = 0), and where that fails too, neither."""
    rows = []
    for timed, trace in zip(timings, traces):
        spent_s = timed.seconds
        kernels = predict_step_time(trace, _with_host(device, 0.0, 0.0))
        views = trace.count("view")
        weight_bytes = sum(count * product_weight_bytes(op) for op, count in trace.ops if op.kind == "matmul")
        rows.append((trace.op_count - views, kernels.matmul_s, weight_bytes,
                     spent_s - kernels.memory_s - views * view_s, spent_s))
    (n0, k0, w0, r0, _), others = rows[0], rows[1:]
    # With h = (r0 − g·K0 − c·W0) / n0, each other step reads
    # g·(K − n·K0/n0) + c·(W − n·W0/n0) ≈ r − n·r0/n0.
    scaled = [((k - n * k0 / n0) / t, (w - n * w0 / n0) / t, (r - n * r0 / n0) / t)
              for n, k, w, r, t in others]
    for factor, per_weight_byte in (_least_squares(scaled), _least_squares([(a, 0.0, y) for a, _, y in scaled])):
        host_s = (r0 - k0 * factor - w0 * per_weight_byte) / n0
        if (host_s > 0 and GEMM_FACTOR_RANGE[0] <= factor <= GEMM_FACTOR_RANGE[1]
                and 0 <= per_weight_byte <= MAX_WEIGHT_S_PER_BYTE):
            return host_s, factor, per_weight_byte
    # A fit outside reason (steps disturbed beyond what their medians absorb): no GEMM terms.
    return max((r0 - k0) / n0, KERNEL_FLOOR_S), 1.0, 0.0


def _least_squares(rows: list[tuple[float, float, float]]) -> tuple[float, float]:
    """(x, y) minimising Σ (a·x + b·y − r)² over `rows` of (a, b, r); y = 0 where the b column is all zero,
    (nan, nan) where the a column is too, or the two columns are proportional."""
    aa = sum(a * a for a, _, _ in rows)
    ab = sum(a * b for a, b, _ in rows)
    bb = sum(b * b for _, b, _ in rows)
    ar = sum(a * r for a, _, r in rows)
    br = sum(b * r for _, b, r in rows)
    if bb == 0:
        return (ar / aa, 0.0) if aa > 0 else (math.nan, math.nan)
    determinant = aa * bb - ab * ab
    if determinant <= 1e-12 * aa * bb:
        return math.nan, math.nan
    return (ar * bb - br * ab) / determinant, (aa * br - ab * ar) / determinant


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
        streamed_memory = size_curve(streamed_elementwise(torch_dtype), 3 * element_bytes, call_s)
    finally:
        settle_allocator()
    scatter = scatter_s_per_row_probe(memory["elementwise"], call_s)
    view_s = _view_s()
    draft = MeasuredDevice(device_name, dtype, datetime.date.today().isoformat(), mm, bmm, memory,
                           scatter.seconds, fresh.seconds, SETTLED_MMAP_THRESHOLD_BYTES, {"forward": 1.0},
                           {"forward": view_s}, view_s, speedup_before, scatter_busy=scatter.busy_threads,
                           fresh_page_busy=fresh.busy_threads, streamed_memory=streamed_memory,
                           private_cache_bytes=private_cache_bytes(), pool_threads=torch.get_num_threads(),
                           spin_window_s=spin_window_probe())
    host: dict[str, float] = {}
    busy: dict[str, float] = {}
    gemm_factor: dict[str, float] = {}
    per_weight_byte: dict[str, float] = {}
    dispatch_steps = {}
    for mode in FITTED_MODES:
        host[mode], gemm_factor[mode], per_weight_byte[mode], draft, dispatch_steps[mode] = \
            _fit_host_and_gemm_terms(draft, dtype, view_s, mode)
    draft = replace(draft, gemm_in_model_factor=gemm_factor, gemm_weight_s_per_byte=per_weight_byte)
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
    its own steps compares the model with the step, not two states of the machine. (The GEMM terms, fitted
    on whole steps, are left as probed: a factor refitted at each run over a minute read 1.23 to 1.67, more
    than a state moves it.) Fresh pages move too: 64 MiB written on new pages cost 23 ms beyond a warm write when a
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


def private_cache_bytes(cpu_root: Path = Path("/sys/devices/system/cpu")) -> int:
    """The private (level 2) caches of the threads PyTorch runs, together: the first CPU's level-2 cache, as
    Linux lists it (`cpu0/cache/indexI/level` and `size`, e.g. "512K"), times the threads (taken to run on
    cores alike), or DEFAULT_PRIVATE_CACHE_BYTES per thread where it lists none (another OS, a container hiding
    sysfs)."""
    per_thread = DEFAULT_PRIVATE_CACHE_BYTES
    for index in sorted((cpu_root / "cpu0" / "cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() != "2":
                continue
            size = (index / "size").read_text().strip().upper()
            scale = {"K": 2**10, "M": 2**20}.get(size[-1:], 1)
            per_thread = int(size.rstrip("KM")) * scale
        except (OSError, ValueError):
            continue
        break
    return per_thread * torch.get_num_threads()


def _view_s() -> float:
    """The host's time for a view (no kernel)."""
    tensor = torch.ones(4, 4)
    return typical_time_s(lambda: tensor.view(16))


def _with_host(device: MeasuredDevice, per_op_s: float, per_view_s: float) -> MeasuredDevice:
    return replace(device, host_s_per_op={"forward": per_op_s}, host_s_per_view=per_view_s)
