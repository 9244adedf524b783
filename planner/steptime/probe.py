"""Probing this machine for the device model's terms (about ten seconds; cached by `device_cache`).

- GEMM kernel rates on a grid of shapes in the run's dtype: plain products with the weight read from memory
  (`mm`), and batched ones as attention runs them, operands in the cache (`bmm`); each time less the cost
  of calling an op from Python (a 1×1 product);
- kernel time by bytes moved, 4 KiB to 128 MiB, for each class of memory-bound op (elementwise, random
  draws, sampling, top-k, softmax, its backward, transcendental, reductions); the cost of fresh pages (an
  output above glibc's mmap threshold) and a scatter-add's cost per row;
- the host's time per dispatched op, per phase, and how much slower GEMMs run inside a model step than back
  to back: real steps (debug at small shapes: a forecast, a forward and backward, an AdamW step; and two
  forwards, debug and tiny, that separate host time from GEMM time), each timed, less the kernel time the
  terms above give for its traced ops, per op. Views are timed alone.

Every time is the median of repeats on the wall clock, as a benchmark reports its steps (run the probe on a
quiet machine: neighbours slow every repeat). Runs in the benchmark's worker, after its measurement (so the
allocator is in the same state as the timed steps).
"""

from __future__ import annotations

import datetime
import statistics
import time
from dataclasses import replace
from typing import Callable

import torch

from model.build import build_model_from_config
from model.config import make_config
from planner.bench.memory_probe import SETTLED_MMAP_THRESHOLD_BYTES, reuse_all_freed_memory, settle_allocator
from planner.measure import token_batch
from planner.steptime.devices import GemmGrid, MeasuredDevice, SizeCurve
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
GEMM_FACTOR_RANGE = (0.5, 3.0)  # a fitted in-model GEMM factor outside this is a disturbed probe  # a kernel time never reads as zero or negative after the call cost is taken off
# The calibration steps: the debug model at a small workload (overhead dominates; kernels are modelled), and a
# forward whose small GEMMs dominate (tiny at a batch and context no benchmark grid uses): together they
# separate the host's time per op from how much slower GEMMs run inside a model than back to back.
CALIBRATION_WORKLOAD = Workload(batch_size=1, context_length=16, prediction_length=4, num_samples=2)
GEMM_CALIBRATION = ("tiny", Workload(batch_size=2, context_length=32, prediction_length=4, num_samples=2))


def typical_time_s(run: Callable[[], object], synchronize: Callable[[], None] = lambda: None,
                   min_time_s: float = MIN_TIME_S) -> float:
    """The median wall time of `run` after one untimed call (MIN_REPEATS at least, `min_time_s` in all): the
    statistic a benchmark reports for its steps, so predictions are of the same quantity."""
    run()
    synchronize()
    times: list[float] = []
    while len(times) < MIN_REPEATS or (sum(times) < min_time_s and len(times) < MAX_REPEATS):
        start = time.perf_counter()
        run()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cold_weights(n: int, k: int, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """A (k, n) weight as a linear layer holds it (n, k) transposed, a different copy at each call, so it
    comes from memory as a model's weights do (each is read once per step), not from the cache."""
    copies = max(2, min(COLD_COPIES_MAX, -(-COLD_BYTES // (n * k * torch.finfo(dtype).bits // 8))))
    weights = [torch.ones(n, k, dtype=dtype) for _ in range(copies)]
    turn = iter(range(1 << 62))
    return lambda: weights[next(turn) % copies].t()


def _gemm_grid(axes, dtype: torch.dtype, batch: int, call_s: float) -> GemmGrid:
    rates = []
    for m in axes[0]:
        plane = []
        for n in axes[1]:
            row = []
            for k in axes[2]:
                if batch > 1:  # attention's operands: activations just made, in the cache
                    a, b = torch.ones(batch, m, k, dtype=dtype), torch.ones(batch, k, n, dtype=dtype)
                    run = lambda: torch.bmm(a, b)  # noqa: E731
                else:
                    a, weight = torch.ones(m, k, dtype=dtype), _cold_weights(n, k, dtype)
                    run = lambda: torch.mm(a, weight())  # noqa: E731
                seconds = max(typical_time_s(run) - call_s, KERNEL_FLOOR_S)
                row.append(2 * batch * m * n * k / seconds)
            plane.append(tuple(row))
        rates.append(tuple(plane))
    return GemmGrid(*axes, tuple(rates))


def _size_curve(make_run: Callable[[int], Callable[[], object]], bytes_per_element: int, call_s: float) -> SizeCurve:
    """Kernel seconds of `make_run(elements)` at each of SIZES_BYTES moved (`bytes_per_element` moved per
    element, read and written, as the trace counts them)."""
    seconds = []
    for size in SIZES_BYTES:
        run = make_run(max(size // bytes_per_element, SOFTMAX_ROW))
        seconds.append(max(typical_time_s(run) - call_s, KERNEL_FLOOR_S))
    return SizeCurve(tuple(float(s) for s in SIZES_BYTES), tuple(seconds))


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


def _scatter_s_per_row(elementwise: SizeCurve, call_s: float) -> float:
    """T5's relative-position gradient: L·L rows of H values summed into a 32-bucket table, less its bytes."""
    rows, heads = 2**18, 4
    grad, indices = torch.rand(rows, heads), torch.randint(0, 32, (rows,))
    seconds = typical_time_s(lambda: torch.ops.aten.embedding_dense_backward(grad, indices, 32, -1, False)) - call_s
    moved = grad.numel() * 4 + rows * 8 + 32 * heads * 4
    return max(seconds - elementwise(moved), KERNEL_FLOOR_S) / rows


def _fresh_page_s_per_byte() -> float:
    """Writing a tensor above the mmap threshold (new pages) less writing one already mapped, per byte."""
    elements = FRESH_PROBE_BYTES // 4
    mapped = torch.empty(elements)
    fresh_s = typical_time_s(lambda: torch.empty(elements).fill_(1.0))
    mapped_s = typical_time_s(lambda: mapped.fill_(1.0))
    return max(fresh_s - mapped_s, KERNEL_FLOOR_S) / FRESH_PROBE_BYTES


def _calibration_steps(dtype: str):
    """(phase, run, trace) for each calibration step of the debug model."""
    model, batch = _model_and_batch("debug", CALIBRATION_WORKLOAD, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    steps = []
    for mode, phase in (("forecast", "forecast"),):
        def run(mode=mode):
            run_step(model, batch, CALIBRATION_WORKLOAD, mode, generator=torch.Generator().manual_seed(0))
        steps.append((phase, run, record_step(model, batch, CALIBRATION_WORKLOAD, mode,
                                              generator=torch.Generator().manual_seed(0))))
    train_trace = record_step(model, batch, CALIBRATION_WORKLOAD, "train")

    def forward_backward():
        run_step(model, batch, CALIBRATION_WORKLOAD, "train")
        model.zero_grad(set_to_none=True)

    def optimizer_step():
        if next(model.parameters()).grad is None:  # gradients to step on, made once, outside the timing
            run_step(model, batch, CALIBRATION_WORKLOAD, "train")
        optimizer.step()

    steps.append(("backward", forward_backward, train_trace))
    steps.append(("optimizer", optimizer_step, train_trace))
    return steps


def _host_s_per_op(spent_s: float, ops, device: MeasuredDevice, view_s: float) -> float:
    """What a step spent beyond its modelled kernels and views, per dispatched op."""
    kernels = predict_step_time(ops, _with_host(device, 0.0, 0.0))
    views = ops.count("view")
    return max((spent_s - kernels.total_s - views * view_s) / max(ops.op_count - views, 1), KERNEL_FLOOR_S)


def _forward_step(size: str, workload: Workload, dtype: str):
    model, batch = _model_and_batch(size, workload, dtype)
    run = lambda: run_step(model, batch, workload, "forward")  # noqa: E731
    run()
    return typical_time_s(run, min_time_s=CALIBRATION_TIME_S), record_step(model, batch, workload, "forward")


def _fit_forward_host_and_gemm_factor(device: MeasuredDevice, dtype: str, view_s: float) -> tuple[float, float]:
    """Host seconds per forward op and the GEMM in-model factor, from two forwards: t = n·h + g·K + rest
    (n non-view ops, K the GEMM kernel time at factor 1, rest the other kernels and the views)."""
    rows = []
    for size, workload in (("debug", CALIBRATION_WORKLOAD), GEMM_CALIBRATION):
        spent_s, trace = _forward_step(size, workload, dtype)
        kernels = predict_step_time(trace, _with_host(device, 0.0, 0.0))
        views = trace.count("view")
        rows.append((trace.op_count - views, kernels.matmul_s, spent_s - kernels.memory_s - views * view_s))
    (n1, k1, r1), (n2, k2, r2) = rows
    determinant = n1 * k2 - n2 * k1
    if determinant:
        host_s, factor = (r1 * k2 - r2 * k1) / determinant, (n1 * r2 - n2 * r1) / determinant
        if host_s > 0 and GEMM_FACTOR_RANGE[0] <= factor <= GEMM_FACTOR_RANGE[1]:
            return host_s, factor
    return max((r1 - k1) / n1, KERNEL_FLOOR_S), 1.0  # a fit outside reason (a disturbed probe): no factor


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
    one = torch.ones(1, 1, dtype=torch_dtype)
    call_s = typical_time_s(lambda: torch.mm(one, one))
    mm = _gemm_grid(MM_AXES, torch_dtype, 1, call_s)
    bmm = _gemm_grid(BMM_AXES, torch_dtype, BMM_BATCH, call_s)
    settle_allocator()  # the timed steps' allocator: large outputs are fresh pages
    fresh_s_per_byte = _fresh_page_s_per_byte()
    reuse_all_freed_memory()  # the kernels alone; fresh pages are priced apart
    try:
        memory = {name: _size_curve(make_run, moved, call_s)
                  for name, (make_run, moved) in _memory_probes(torch_dtype).items()}
    finally:
        settle_allocator()
    scatter_s_per_row = _scatter_s_per_row(memory["elementwise"], call_s)
    tensor = torch.ones(4, 4)
    view_s = typical_time_s(lambda: tensor.view(16))
    draft = MeasuredDevice(device_name, dtype, datetime.date.today().isoformat(), mm, bmm, memory, scatter_s_per_row,
                           fresh_s_per_byte, SETTLED_MMAP_THRESHOLD_BYTES, 1.0, {"forward": view_s}, view_s)
    host_s, gemm_factor = _fit_forward_host_and_gemm_factor(draft, dtype, view_s)
    draft = replace(draft, gemm_in_model_factor=gemm_factor)
    host: dict[str, float] = {"forward": host_s}
    for phase, run, trace in _calibration_steps(dtype):
        run()  # the first AdamW step also creates the moments: the timed ones are steady-state steps
        spent_s = typical_time_s(run, min_time_s=CALIBRATION_TIME_S)
        if phase == "forward":
            continue  # fitted above, with the GEMM factor
        if phase == "backward":  # the forward and backward together: take the forward's part off
            forward_ops = _phase_trace(trace, ("forward",))
            spent_s -= predict_step_time(forward_ops, _with_host(draft, host["forward"], view_s)).total_s
            ops = _phase_trace(trace, ("backward",))
        else:
            ops = _phase_trace(trace, ("optimizer",)) if phase == "optimizer" else trace
        host[phase] = _host_s_per_op(spent_s, ops, draft, view_s)
    return replace(draft, host_s_per_op=host)


def _with_host(device: MeasuredDevice, per_op_s: float, per_view_s: float) -> MeasuredDevice:
    return replace(device, host_s_per_op={"forward": per_op_s}, host_s_per_view=per_view_s)
