"""Kernel-level probes of this machine (torch), each time the median of repeats on the wall clock with the
threads it kept busy (`Timed`), as a benchmark reports its steps:

- GEMM kernel rates on a grid of shapes in the run's dtype: plain products with the weight read from memory
  (`mm`), and batched ones as attention runs them, operands in the cache (`bmm`); and the kernel time of
  exact GEMM shapes (`time_gemm_shapes`, `with_exact_gemms`), timed as the grid's points are;
- kernel time by bytes moved, 4 KiB to 128 MiB, for each class of memory-bound op (elementwise, random
  draws, sampling, top-k, softmax, its backward, transcendental, reductions), and with the operands streamed
  from memory (an optimizer's first touches; any op beyond the threads' private caches); the cost of fresh pages (an output above glibc's mmap threshold) and a
  scatter-add's cost per row.

Each kernel point is the faster of two passes, less the cost of calling an op from Python. `probe` puts
them together with the host's terms fitted on real steps.
"""

from __future__ import annotations

import math
import mmap
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Collection

import torch

from planner.bench.device import TORCH_DTYPES
from planner.bench.timing import busy_threads, other_thread_clocks, process_cpu_s
from planner.steptime.curves import GemmGrid, SizeCurve
from planner.steptime.devices import SHORT_LOOP_PROBE_RUN, STRIDED_PROBE_STRIDE
from planner.steptime.measured import MeasuredDevice, gemm_key
from planner.steptime.ops import StepTrace

MIN_TIME_S = 0.02  # per kernel point: enough repeats for a stable median
MIN_REPEATS, MAX_REPEATS = 3, 200
MM_AXES = ((1, 4, 16, 64, 256, 1024), (64, 256, 1024, 4096), (64, 256, 1024, 4096))
BMM_BATCH = 32
BMM_AXES = ((1, 16, 64, 512), (16, 64, 512), (16, 64, 512))
# Operands met once a step are timed from a rotation of copies that together exceed twice a 32 MiB last-level
# cache, however small each is (a few KiB for a debug model's weights, a bias's moments).
COLD_BYTES, COLD_COPIES_MAX = 64 * 2**20, 16384
# Bytes moved at which each memory-bound class is timed; between them the time is interpolated (log-log). The
# points at 32 and 48 MiB hold the drop where the operands stop fitting a 32 MiB last-level cache: elementwise
# products ran 178 GB/s at 16 MiB, 59 at 32, 39 at 48 and 26–34 at 128, so without them a debug model's 68 MiB
# position-bias sum at batch 16, context 512 was priced at ~60 GB/s between 16 and 128 MiB.
SIZES_BYTES = (4 * 2**10, 64 * 2**10, 2**20, 16 * 2**20, 32 * 2**20, 48 * 2**20, 128 * 2**20)
SOFTMAX_ROW = 512
VOCABULARY_ROW = 4096
FRESH_PROBE_BYTES = 64 * 2**20  # above glibc's settled mmap threshold (32 MiB): every allocation is new pages
KERNEL_FLOOR_S = 1e-7
# The spin probe sleeps longer than an idle OpenMP thread spins (libgomp's default: 5–7 ms on a 2-core Zen 5 VM).
SPIN_PROBE_SLEEP_S, SPIN_PROBE_REPEATS = 0.05, 10
BUSY_FLOOR = 0.05  # busy threads below this are a clock's rounding, not a kernel



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
    cpu_s: list[float] = []
    # The process clock, not process_cpu_s: back to back, a kernel leaves the pool's threads as it found them,
    # so over the repeats the other threads' ticks land in the timings in proportion to their time; reading
    # their clocks exactly adds about a microsecond of CPU time to each timing (0.4 µs a thread), as long as
    # the shortest kernels take.
    while len(times) < MIN_REPEATS or (sum(times) < min_time_s and len(times) < MAX_REPEATS):
        start, start_cpu = time.perf_counter(), time.process_time()
        run()
        synchronize()
        times.append(time.perf_counter() - start)
        cpu_s.append(time.process_time() - start_cpu)
    return median_timing(times, cpu_s)


def median_timing(wall_s: list[float], cpu_s: list[float]) -> Timed:
    """Timings of one run as `typical_time` reports them: the median wall time, with the threads it kept busy
    over all of them (CPU time ÷ wall time)."""
    return Timed(statistics.median(wall_s), max(busy_threads(wall_s, cpu_s), BUSY_FLOOR))


def time_after_untimed_run(run: Callable[[], object], wall_s: list[float], cpu_s: list[float]) -> None:
    """Run `run` once untimed, then once timed: its wall and CPU seconds appended to `wall_s` and `cpu_s` (a
    benchmark's step before it left the caches to its own code and data)."""
    run()
    clocks = other_thread_clocks()
    start_cpu, start = process_cpu_s(clocks), time.perf_counter()
    run()
    wall_s.append(time.perf_counter() - start)
    cpu_s.append(process_cpu_s(clocks) - start_cpu)


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
    copies = _cold_copies(n * k * torch.finfo(dtype).bits // 8)
    weights = [weight.t() for weight in torch.ones(copies, n, k, dtype=dtype)]
    turn = iter(range(1 << 62))
    return lambda: weights[next(turn) % copies]


def _cold_copies(bytes_each: int) -> int:
    """How many copies of an operand of `bytes_each` exceed COLD_BYTES together (at least two)."""
    return max(2, min(COLD_COPIES_MAX, -(-COLD_BYTES // bytes_each)))


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
    return [kernel_part(t, call_s) for t in best]


def kernel_part(timed: Timed, call_s: float) -> Timed:
    """A timed call of a kernel less the cost of calling an op (`op_call_s`): the kernel's seconds and busy
    threads."""
    return Timed(max(timed.seconds - call_s, KERNEL_FLOOR_S), _kernel_busy(timed, call_s))


def op_call_s(dtype: torch.dtype) -> float:
    """The cost of calling an op from Python: a (1 × 1) · (1 × 1) product."""
    one = torch.ones(1, 1, dtype=dtype)
    return typical_time_s(lambda: torch.mm(one, one))


def gemm_run(batch: int, m: int, n: int, k: int, dtype: torch.dtype) -> Callable[[], object]:
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


def gemm_grid(axes, dtype: torch.dtype, batch: int, call_s: float) -> GemmGrid:
    shapes = [(m, n, k) for m in axes[0] for n in axes[1] for k in axes[2]]
    timed = _least_disturbed([lambda shape=shape: gemm_run(batch, *shape, dtype) for shape in shapes], call_s)
    rate = {shape: 2 * batch * shape[0] * shape[1] * shape[2] / t.seconds for shape, t in zip(shapes, timed)}
    rates = tuple(tuple(tuple(rate[m, n, k] for k in axes[2]) for n in axes[1]) for m in axes[0])
    return GemmGrid(*axes, rates)


def size_curve(make_run: Callable[[int], Callable[[], object]], bytes_per_element: int, call_s: float) -> SizeCurve:
    """Kernel seconds of `make_run(elements)` at each of SIZES_BYTES moved (`bytes_per_element` moved per
    element, read and written, as the trace counts them)."""
    makers = [lambda size=size: make_run(max(size // bytes_per_element, SOFTMAX_ROW)) for size in SIZES_BYTES]
    timed = _least_disturbed(makers, call_s)
    return SizeCurve(tuple(float(s) for s in SIZES_BYTES), tuple(t.seconds for t in timed),
                     tuple(t.busy_threads for t in timed))


def _rows(elements: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.rand(max(elements // SOFTMAX_ROW, 1), SOFTMAX_ROW, dtype=dtype)


def memory_probes(dtype: torch.dtype) -> dict[str, tuple[Callable[[int], Callable[[], object]], int]]:
    """Per memory class: a representative op at a number of elements, and the bytes it moves per element."""
    e = torch.finfo(dtype).bits // 8

    def elementwise(n):
        x, y, out = torch.rand(n, dtype=dtype), torch.rand(n, dtype=dtype), torch.empty(n, dtype=dtype)
        return lambda: torch.mul(x, y, out=out)

    def strided(n):  # an input read across its layout at STRIDED_PROBE_STRIDE (a position bias, heads innermost)
        shape = (STRIDED_PROBE_STRIDE, max(n // STRIDED_PROBE_STRIDE, 1))
        x, out = torch.rand(shape, dtype=dtype), torch.empty(shape, dtype=dtype)
        across = torch.rand(shape[::-1], dtype=dtype).t()
        return lambda: torch.add(x, across, out=out)

    def short_loop(n):  # rows of SHORT_LOOP_PROBE_RUN elements plus one value per row: a loop per row
        shape = (max(n // SHORT_LOOP_PROBE_RUN, 1), SHORT_LOOP_PROBE_RUN)
        x, out = torch.rand(shape, dtype=dtype), torch.empty(shape, dtype=dtype)
        column = torch.rand(shape[0], 1, dtype=dtype)
        return lambda: torch.add(x, column, out=out)

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

    short_loop_bytes = (2 * SHORT_LOOP_PROBE_RUN + 1) * e // SHORT_LOOP_PROBE_RUN  # a row in and out, its value
    return {"elementwise": (elementwise, 3 * e), "strided": (strided, 3 * e),
            "short_loop": (short_loop, short_loop_bytes), "random": (random, 2 * e), "sampling": (sampling, 4),
            "selection": (selection, e), "softmax": (softmax, 2 * e), "softmax_backward": (softmax_backward, 3 * e),
            "transcendental": (transcendental, 2 * e), "reduction": (reduction, e)}


def streamed_elementwise(dtype: torch.dtype) -> Callable[[int], Callable[[], object]]:
    """The elementwise probe with its operands streamed from memory: a different set of tensors at each call,
    as many as exceed twice a 32 MiB last-level cache, as an optimizer step meets each parameter, gradient
    and moment once."""
    def make_run(n: int) -> Callable[[], object]:
        copies = _cold_copies(3 * n * torch.finfo(dtype).bits // 8)
        operands = list(zip(torch.rand(copies, n, dtype=dtype), torch.rand(copies, n, dtype=dtype),
                            torch.empty(copies, n, dtype=dtype)))
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
    timed = _least_disturbed([lambda shape=shape: gemm_run(*shape, torch_dtype) for shape in shapes],
                             op_call_s(torch_dtype))
    return {gemm_key(*shape): t for shape, t in zip(shapes, timed)}


def with_exact_gemms(device: MeasuredDevice, trace: StepTrace, *, retime: bool = False,
                     timed_beside: Collection[str] = ()) -> MeasuredDevice:
    """`device` with every GEMM shape of `trace` timed exactly (the ones it already has are kept, unless
    `retime`: then all are timed now but those keyed in `timed_beside`, which a benchmark has just timed
    beside its steps), less the timings a busy machine disturbed (MeasuredDevice.without_disturbed_gemm_shapes:
    left to the grid)."""
    missing = ([shape for shape in device.gemm_shapes(trace) if gemm_key(*shape) not in timed_beside] if retime
               else device.missing_gemm_shapes(trace))
    if not missing:
        return device
    timed = time_gemm_shapes(missing, device.dtype)
    # Less a busy machine's timings: the grid prices those.
    return device.with_gemm_timings({k: t.seconds for k, t in timed.items()},
                                    {k: t.busy_threads for k, t in timed.items()})


def scatter_s_per_row_probe(elementwise: SizeCurve, call_s: float) -> Timed:
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


def fresh_page_s_per_byte_probe() -> Timed:
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


def spin_window_probe() -> float:
    """How long each idle thread of PyTorch's pool spins after a parallel region before it sleeps: the CPU time
    the process spends while its main thread sleeps just after a parallel op, per idle thread, summed over
    repeats. At most the sleep (a pool told to spin always, OMP_WAIT_POLICY=active, spins through every
    kernel)."""
    idle_threads = torch.get_num_threads() - 1
    if idle_threads < 1:
        return 0.0
    data = torch.ones(2**22)  # an elementwise op this large runs on every thread
    spent_cpu_s = 0.0
    clocks = other_thread_clocks()
    for _ in range(SPIN_PROBE_REPEATS):
        data.add_(1.0)
        start_cpu = process_cpu_s(clocks)  # the add's share of the other threads' time is counted before
        time.sleep(SPIN_PROBE_SLEEP_S)
        spent_cpu_s += process_cpu_s(clocks) - start_cpu
    return min(spent_cpu_s / (SPIN_PROBE_REPEATS * idle_threads), SPIN_PROBE_SLEEP_S)
