"""Probing this machine for the device model's terms (about half a minute; cached by `device_cache`).

- GEMM kernel rates on a grid of shapes in the run's dtype: plain products with the weight read from memory
  (`mm`), and batched ones as attention runs them, operands in the cache (`bmm`); each time less the cost
  of calling an op from Python (a 1×1 product);
- kernel time by bytes moved, 4 KiB to 128 MiB, for each class of memory-bound op (elementwise, random
  draws, sampling, top-k, softmax, its backward, transcendental, reductions); the cost of fresh pages (an
  output above glibc's mmap threshold) and a scatter-add's cost per row;
- the kernel time of every exact GEMM shape a calibration step (below) or a predicted step meets
  (`time_gemm_shapes`, as the grid's points are timed);
- the host's time per dispatched op, per phase, and how much slower GEMMs run inside a model step than their
  exact shapes back to back: real steps, each timed, less the kernel time the terms above give for its
  traced ops. Forwards and forecasts of debug, tiny and small at small shapes fit the host time (debug) and
  the GEMM factor (tiny and small) of each; a forward and backward and an AdamW step of debug give the
  backward's and the optimizer's host time. Views are timed alone.

The threads' speedup on a reference GEMM is taken at both ends (host_state: the machine's state, which a
benchmark run compares with its own). Every time is the median of repeats on the wall clock, as a benchmark reports its steps (run the probe on a
quiet machine: neighbours slow every repeat); each kernel point is the faster of two passes. Runs in the
benchmark's worker, after its measurement (so the allocator is in the same state as the timed steps).
"""

from __future__ import annotations

import datetime
import math
import mmap
import statistics
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch

from model.build import build_model_from_config
from model.config import make_config
from planner.bench.memory_probe import SETTLED_MMAP_THRESHOLD_BYTES, reuse_all_freed_memory, settle_allocator
from planner.measure import token_batch
from planner.steptime.curves import GemmGrid, SizeCurve
from planner.steptime.measured import MeasuredDevice, gemm_key
from planner.steptime.host_state import parallel_speedup
from planner.steptime.ops import StepTrace
from planner.steptime.predict import predict_step_time
from planner.bench.device import TORCH_DTYPES
from planner.steptime.trace import record_step, run_step
from planner.workload import Workload

MIN_TIME_S = 0.02  # per kernel point: enough repeats for a stable median
CALIBRATION_TIME_S = 0.3  # per calibration step: milliseconds each, so dozens of repeats
MIN_REPEATS, MAX_REPEATS = 3, 200
MM_AXES = ((1, 4, 16, 64, 256, 1024), (64, 256, 1024, 4096), (64, 256, 1024, 4096))
BMM_BATCH = 32
BMM_AXES = ((1, 16, 64, 512), (16, 64, 512), (16, 64, 512))
COLD_BYTES, COLD_COPIES_MAX = 64 * 2**20, 64  # twice a 32 MiB last-level cache
SIZES_BYTES = (4 * 2**10, 64 * 2**10, 2**20, 16 * 2**20, 128 * 2**20)
SOFTMAX_ROW = 512
VOCABULARY_ROW = 4096
FRESH_PROBE_BYTES = 64 * 2**20  # above glibc's settled mmap threshold (32 MiB): every allocation is new pages
KERNEL_FLOOR_S = 1e-7
BUSY_FLOOR = 0.05  # busy threads below this are a clock's rounding, not a kernel
MAX_HOST_BUSY = 64.0  # the host's busy threads beyond this are a disturbed calibration step
GEMM_FACTOR_RANGE = (0.5, 3.0)  # a fitted in-model GEMM factor outside this is a disturbed probe
# The calibration steps: the debug model at a small workload (overhead dominates; kernels are modelled), and
# steps whose small GEMMs dominate (tiny and small at batches and contexts no benchmark grid uses): together
# they separate the host's time per op from how much slower GEMMs run inside a model than back to back, for
# forwards and for forecasts (whose decoding steps multiply a few rows by every weight).
CALIBRATION_WORKLOAD = Workload(batch_size=1, context_length=16, prediction_length=4, num_samples=2)
GEMM_CALIBRATIONS = (("debug", CALIBRATION_WORKLOAD),
                     ("tiny", Workload(batch_size=2, context_length=32, prediction_length=4, num_samples=2)),
                     ("small", Workload(batch_size=1, context_length=32, prediction_length=4, num_samples=2)))
FITTED_MODES = ("forward", "forecast")  # each its own host time and GEMM factor; a mode is its phase's name


@dataclass(frozen=True)
class Timed:
    """A run's median wall time, and how many threads it kept busy: the process's CPU time (every thread,
    user and system) ÷ the wall time, over the timed repeats. An idle OpenMP thread spins a little after each
    parallel region, then sleeps: a serial kernel (dropout's draws, a scatter) keeps one thread busy, a
    parallel one every thread."""

    seconds: float
    busy_threads: float


def typical_time(run: Callable[[], object], synchronize: Callable[[], None] = lambda: None,
                 min_time_s: float = MIN_TIME_S) -> Timed:
    """The median wall time of `run` after one untimed call (MIN_REPEATS at least, `min_time_s` in all): the
    statistic a benchmark reports for its steps, so predictions are of the same quantity; with the threads
    it kept busy."""
    run()
    synchronize()
    times: list[float] = []
    cpu_s = 0.0
    while len(times) < MIN_REPEATS or (sum(times) < min_time_s and len(times) < MAX_REPEATS):
        start, start_cpu = time.perf_counter(), time.process_time()
        run()
        synchronize()
        times.append(time.perf_counter() - start)
        cpu_s += time.process_time() - start_cpu
    return Timed(statistics.median(times), max(cpu_s / sum(times), BUSY_FLOOR))


def typical_time_s(run: Callable[[], object], synchronize: Callable[[], None] = lambda: None,
                   min_time_s: float = MIN_TIME_S) -> float:
    """`typical_time`'s median wall time alone."""
    return typical_time(run, synchronize, min_time_s).seconds


def _kernel_busy(timed: Timed, call_s: float) -> float:
    """The threads a kernel keeps busy, from a timed call of it: the call's own cost runs on one thread."""
    kernel_s = timed.seconds - call_s
    if kernel_s <= KERNEL_FLOOR_S:
        return 1.0
    return _within_threads((timed.busy_threads * timed.seconds - call_s) / kernel_s)


def _within_threads(busy: float) -> float:
    """Busy threads between the floor and the threads PyTorch runs: a kernel barely longer than the call it
    is measured beside gives a ratio of two near-equal differences, which no kernel can exceed."""
    return min(max(busy, BUSY_FLOOR), float(torch.get_num_threads()))


def _cold_weights(n: int, k: int, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """A (k, n) weight as a linear layer holds it (n, k) transposed, a different copy at each call, so it
    comes from memory as a model's weights do (each is read once per step), not from the cache."""
    copies = max(2, min(COLD_COPIES_MAX, -(-COLD_BYTES // (n * k * torch.finfo(dtype).bits // 8))))
    weights = [torch.ones(n, k, dtype=dtype) for _ in range(copies)]
    turn = iter(range(1 << 62))
    return lambda: weights[next(turn) % copies].t()


def _least_disturbed(makers: list[Callable[[], Callable[[], object]]], call_s: float) -> list[Timed]:
    """Kernel seconds and busy threads of each run `makers[i]()` builds: the faster of two passes over all of
    them, the second in reverse order, less the cost of calling an op. A neighbour's burst slows the points
    it lands on; a second pass at another moment leaves each point's least disturbed time (the slowdown every
    step has in common is the in-model GEMM factor's and the host's, fitted on real steps). Runs are built
    one at a time and dropped: the cold weights of every point together would not fit in memory."""
    best = [Timed(math.inf, 1.0)] * len(makers)
    for order in (range(len(makers)), reversed(range(len(makers)))):
        for i in order:
            timed = typical_time(makers[i]())
            if timed.seconds < best[i].seconds:
                best[i] = timed
    return [Timed(max(t.seconds - call_s, KERNEL_FLOOR_S), _kernel_busy(t, call_s)) for t in best]


def _gemm_run(batch: int, m: int, n: int, k: int, dtype: torch.dtype) -> Callable[[], object]:
    """One GEMM as a model step runs it: a batched product's operands (attention's activations, just made)
    in the cache; a plain product's weight from memory. The kernel alone: it writes into an output made
    once, so a large output's fresh pages (priced apart, MeasuredDevice._fresh_pages_s) are not in it."""
    if batch > 1:
        a, b = torch.ones(batch, m, k, dtype=dtype), torch.ones(batch, k, n, dtype=dtype)
        out = torch.empty(batch, m, n, dtype=dtype)
        return lambda: torch.bmm(a, b, out=out)
    a, weight = torch.ones(m, k, dtype=dtype), _cold_weights(n, k, dtype)
    out = torch.empty(m, n, dtype=dtype)
    return lambda: torch.mm(a, weight(), out=out)


def _gemm_grid(axes, dtype: torch.dtype, batch: int, call_s: float) -> GemmGrid:
    shapes = [(m, n, k) for m in axes[0] for n in axes[1] for k in axes[2]]
    timed = _least_disturbed([lambda shape=shape: _gemm_run(batch, *shape, dtype) for shape in shapes], call_s)
    rate = {shape: 2 * batch * shape[0] * shape[1] * shape[2] / t.seconds for shape, t in zip(shapes, timed)}
    rates = tuple(tuple(tuple(rate[m, n, k] for k in axes[2]) for n in axes[1]) for m in axes[0])
    return GemmGrid(*axes, rates)


def _size_curve(make_run: Callable[[int], Callable[[], object]], bytes_per_element: int, call_s: float) -> SizeCurve:
    """Kernel seconds of `make_run(elements)` at each of SIZES_BYTES moved (`bytes_per_element` moved per
    element, read and written, as the trace counts them)."""
    makers = [lambda size=size: make_run(max(size // bytes_per_element, SOFTMAX_ROW)) for size in SIZES_BYTES]
    timed = _least_disturbed(makers, call_s)
    return SizeCurve(tuple(float(s) for s in SIZES_BYTES), tuple(t.seconds for t in timed),
                     tuple(t.busy_threads for t in timed))


def _rows(elements: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.rand(max(elements // SOFTMAX_ROW, 1), SOFTMAX_ROW, dtype=dtype)


def _memory_probes(dtype: torch.dtype) -> dict[str, tuple[Callable[[int], Callable[[], object]], int]]:
    """Per memory class: a representative op at a number of elements, and the bytes it moves per element."""
    e = torch.finfo(dtype).bits // 8

    def elementwise(n):
        x, y, out = torch.rand(n, dtype=dtype), torch.rand(n, dtype=dtype), torch.empty(n, dtype=dtype)
        return lambda: torch.mul(x, y, out=out)

    def random(n):
        x = torch.empty(n, dtype=dtype)
        return lambda: x.bernoulli_(0.9)

    def softmax(n):
        x = _rows(n, dtype)
        return lambda: torch.softmax(x, -1)

    def softmax_backward(n):
        grad, out = _rows(n, dtype), torch.softmax(_rows(n, dtype), -1)
        return lambda: torch.ops.aten._softmax_backward_data(grad, out, -1, dtype)

    def transcendental(n):
        x, out = torch.rand(n, dtype=dtype), torch.empty(n, dtype=dtype)
        return lambda: torch.exp(x, out=out)

    def reduction(n):
        x = _rows(n, dtype)
        return lambda: x.sum(-1)

    def sampling(n):  # one draw per row over a Chronos vocabulary, as sample_next_tokens does
        probs = torch.softmax(torch.rand(max(n // VOCABULARY_ROW, 1), VOCABULARY_ROW), -1)
        return lambda: torch.multinomial(probs, 1)

    def selection(n):  # Chronos' top-50 over the vocabulary
        scores = torch.rand(max(n // VOCABULARY_ROW, 1), VOCABULARY_ROW, dtype=dtype)
        return lambda: torch.topk(scores, 50, dim=-1)

    return {"elementwise": (elementwise, 3 * e), "random": (random, 2 * e), "sampling": (sampling, 4),
            "selection": (selection, e), "softmax": (softmax, 2 * e),
            "softmax_backward": (softmax_backward, 3 * e), "transcendental": (transcendental, 2 * e),
            "reduction": (reduction, e)}


def _streamed_elementwise(dtype: torch.dtype) -> Callable[[int], Callable[[], object]]:
    """The elementwise probe with its operands streamed from memory: a different set of tensors at each call,
    as many as exceed twice a 32 MiB last-level cache, as an optimizer step meets each parameter, gradient
    and moment once."""
    def make_run(n: int) -> Callable[[], object]:
        copies = max(2, min(COLD_COPIES_MAX, -(-COLD_BYTES // (3 * n * torch.finfo(dtype).bits // 8))))
        operands = [(torch.rand(n, dtype=dtype), torch.rand(n, dtype=dtype), torch.empty(n, dtype=dtype))
                    for _ in range(copies)]
        turn = iter(range(1 << 62))

        def run() -> object:
            x, y, out = operands[next(turn) % copies]
            return torch.mul(x, y, out=out)
        return run
    return make_run


def time_gemm_shapes(shapes: list[tuple[int, int, int, int]], dtype: str) -> dict[str, Timed]:
    """Kernel seconds and busy threads of each exact GEMM shape (batch, m, n, k), measured as the grid's
    points are, keyed by `gemm_key` (MeasuredDevice.gemm_shape_s and gemm_shape_busy)."""
    torch_dtype = TORCH_DTYPES[dtype]
    one = torch.ones(1, 1, dtype=torch_dtype)
    call_s = typical_time_s(lambda: torch.mm(one, one))
    timed = _least_disturbed([lambda shape=shape: _gemm_run(*shape, torch_dtype) for shape in shapes], call_s)
    return {gemm_key(*shape): t for shape, t in zip(shapes, timed)}


def with_exact_gemms(device: MeasuredDevice, trace: StepTrace) -> MeasuredDevice:
    """`device` with every GEMM shape of `trace` timed exactly (the ones it already has are kept)."""
    missing = device.missing_gemm_shapes(trace)
    if not missing:
        return device
    timed = time_gemm_shapes(missing, device.dtype)
    return replace(device, gemm_shape_s={**device.gemm_shape_s, **{k: t.seconds for k, t in timed.items()}},
                   gemm_shape_busy={**device.gemm_shape_busy, **{k: t.busy_threads for k, t in timed.items()}})


def _scatter_s_per_row(elementwise: SizeCurve, call_s: float) -> Timed:
    """T5's relative-position gradient: L·L rows of H values summed into a 32-bucket table, less its bytes;
    per row, with the threads the whole scatter keeps busy."""
    rows, heads = 2**18, 4
    grad, indices = torch.rand(rows, heads), torch.randint(0, 32, (rows,))
    timed = typical_time(lambda: torch.ops.aten.embedding_dense_backward(grad, indices, 32, -1, False))
    moved = grad.numel() * 4 + rows * 8 + 32 * heads * 4
    seconds = timed.seconds - call_s
    return Timed(max(seconds - elementwise(moved), KERNEL_FLOOR_S) / rows, _kernel_busy(timed, call_s))


def _write_fresh_pages(elements: int) -> None:
    """Fill a tensor on newly mapped memory, then unmap it: what an output above the mmap threshold costs.
    The memory is mapped here, not asked of the allocator, which may hand back a large free block of its
    heap instead (after a model's steps it often holds one)."""
    region = mmap.mmap(-1, elements * 4, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    tensor = torch.frombuffer(region, dtype=torch.float32)
    tensor.fill_(1.0)
    del tensor
    region.close()


def _fresh_page_s_per_byte() -> Timed:
    """Writing a tensor on new pages less writing one already mapped, per byte, and the threads the
    difference keeps busy."""
    elements = FRESH_PROBE_BYTES // 4
    mapped = torch.empty(elements)
    fresh = typical_time(lambda: _write_fresh_pages(elements))
    warm = typical_time(lambda: mapped.fill_(1.0))
    extra_s = fresh.seconds - warm.seconds
    if extra_s <= KERNEL_FLOOR_S:
        return Timed(KERNEL_FLOOR_S / FRESH_PROBE_BYTES, 1.0)
    busy = (fresh.busy_threads * fresh.seconds - warm.busy_threads * warm.seconds) / extra_s
    return Timed(extra_s / FRESH_PROBE_BYTES, _within_threads(busy))


def _calibration_steps(dtype: str):
    """(phase, run, trace) for the training step's calibration, on the debug model: its forward and backward,
    and its AdamW step."""
    model, batch = _model_and_batch("debug", CALIBRATION_WORKLOAD, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    train_trace = record_step(model, batch, CALIBRATION_WORKLOAD, "train")

    def forward_backward():
        run_step(model, batch, CALIBRATION_WORKLOAD, "train")
        model.zero_grad(set_to_none=True)

    def optimizer_step():
        if next(model.parameters()).grad is None:  # gradients to step on, made once, outside the timing
            run_step(model, batch, CALIBRATION_WORKLOAD, "train")
        optimizer.step()

    return [("backward", forward_backward, train_trace), ("optimizer", optimizer_step, train_trace)]


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


def _timed_step(size: str, workload: Workload, dtype: str, mode: str) -> tuple[Timed, StepTrace]:
    model, batch = _model_and_batch(size, workload, dtype)
    run = lambda: run_step(model, batch, workload, mode, generator=torch.Generator().manual_seed(0))  # noqa: E731
    run()
    trace = record_step(model, batch, workload, mode, generator=torch.Generator().manual_seed(0))
    return typical_time(run, min_time_s=CALIBRATION_TIME_S), trace


def _fit_host_and_gemm_factor(device: MeasuredDevice, dtype: str, view_s: float,
                              mode: str) -> tuple[float, float, MeasuredDevice, tuple[Timed, StepTrace]]:
    """Host seconds per op and the GEMM in-model factor of `mode`, from its calibration steps: t = n·h + g·K +
    rest (n non-view ops, K the kernel time of the steps' exact GEMM shapes, timed here and returned in the
    device, rest the other kernels and the views). The first step (debug: mostly dispatch) is met exactly
    and sets h given g; the others (mostly GEMMs) set g by least squares on relative errors. Fitting both
    freely lets the two trade off: a slow GEMM would read as a slow host and price every small model's
    dispatch wrong. (A fixed cost per GEMM instead of a factor cannot be fitted here: every calibration
    model has the same share of GEMMs among its ops, so such a cost reads as host time.) Also returns the
    first step's timing and trace, from which its dispatch's busy threads are read once g is known."""
    rows, first = [], None
    for size, workload in GEMM_CALIBRATIONS:
        timed, trace = _timed_step(size, workload, dtype, mode)
        first = first or (timed, trace)
        spent_s = timed.seconds
        device = with_exact_gemms(device, trace)
        kernels = predict_step_time(trace, _with_host(device, 0.0, 0.0))
        views = trace.count("view")
        rows.append((trace.op_count - views, kernels.matmul_s, spent_s - kernels.memory_s - views * view_s,
                     spent_s))
    (n0, k0, r0, _), others = rows[0], rows[1:]
    # With h = (r0 − K0·g) / n0, each other step reads g·(K − n·K0/n0) ≈ r − n·r0/n0.
    slopes = [((k - n * k0 / n0) / t, (r - n * r0 / n0) / t) for n, k, r, t in others]
    denominator = sum(a * a for a, _ in slopes)
    if denominator > 0:
        factor = sum(a * b for a, b in slopes) / denominator
        host_s = (r0 - k0 * factor) / n0
        if host_s > 0 and GEMM_FACTOR_RANGE[0] <= factor <= GEMM_FACTOR_RANGE[1]:
            return host_s, factor, device, first
    # A fit outside reason (a disturbed probe): no factor.
    return max((r0 - k0) / n0, KERNEL_FLOOR_S), 1.0, device, first


def _model_and_batch(size: str, workload: Workload, dtype: str):
    """A seeded model of `size` in `dtype` and a random token batch (ids, mask, labels) at `workload`."""
    config = make_config(size)
    torch.manual_seed(0)
    model = build_model_from_config(config, dtype=None if dtype == "fp32" else TORCH_DTYPES[dtype])
    return model, token_batch(config, workload, torch.Generator().manual_seed(0))


def _phase_trace(trace, phases: tuple[str, ...]) -> StepTrace:
    return StepTrace(tuple((op, count) for op, count in trace.ops if op.phase in phases))


def probe_device(dtype: str, device_name: str) -> MeasuredDevice:
    """Measure this CPU's terms in `dtype` (see the module docstring)."""
    torch_dtype = TORCH_DTYPES[dtype]
    speedup_before = parallel_speedup()
    one = torch.ones(1, 1, dtype=torch_dtype)
    call_s = typical_time_s(lambda: torch.mm(one, one))
    mm = _gemm_grid(MM_AXES, torch_dtype, 1, call_s)
    bmm = _gemm_grid(BMM_AXES, torch_dtype, BMM_BATCH, call_s)
    settle_allocator()  # the timed steps' allocator: large outputs are fresh pages
    fresh = _fresh_page_s_per_byte()
    reuse_all_freed_memory()  # the kernels alone; fresh pages are priced apart
    try:
        memory = {name: _size_curve(make_run, moved, call_s)
                  for name, (make_run, moved) in _memory_probes(torch_dtype).items()}
        element_bytes = torch.finfo(torch_dtype).bits // 8
        optimizer_memory = _size_curve(_streamed_elementwise(torch_dtype), 3 * element_bytes, call_s)
    finally:
        settle_allocator()
    scatter = _scatter_s_per_row(memory["elementwise"], call_s)
    tensor = torch.ones(4, 4)
    view_s = typical_time_s(lambda: tensor.view(16))
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
    for phase, run, trace in _calibration_steps(dtype):
        draft = with_exact_gemms(draft, trace)
        run()  # the first AdamW step also creates the moments: the timed ones are steady-state steps
        spent = typical_time(run, min_time_s=CALIBRATION_TIME_S)
        spent_s, other_cpu_s = spent.seconds, 0.0
        if phase == "backward":  # the forward and backward together: take the forward's part off
            forward_ops = _phase_trace(trace, ("forward",))
            forward = predict_step_time(forward_ops, replace(_with_host(draft, host["forward"], view_s),
                                                             host_busy={"forward": busy["forward"]}))
            spent_s -= forward.total_s
            other_cpu_s = forward.cpu_s or 0.0
            ops = _phase_trace(trace, ("backward",))
        else:
            ops = _phase_trace(trace, ("optimizer",))
        host[phase] = _host_s_per_op(spent_s, ops, draft, view_s)
        busy[phase] = _host_busy(spent, ops, draft, host[phase], view_s, other_cpu_s)
    # The machine's state over the probe: the mean of its two ends (a state change midway shows in neither)
    return replace(draft, host_s_per_op=host, host_busy=busy,
                   parallel_speedup=(speedup_before + parallel_speedup()) / 2)


def _with_host(device: MeasuredDevice, per_op_s: float, per_view_s: float) -> MeasuredDevice:
    return replace(device, host_s_per_op={"forward": per_op_s}, host_s_per_view=per_view_s)
