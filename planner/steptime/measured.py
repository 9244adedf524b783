"""This machine's device model, probed (`probe.probe_device`; cached by `device_cache`): GEMM kernel rates on a
grid of shapes (interpolated between them), the kernel time of every exact GEMM shape a predicted step has met
(`gemm_shape_s`: a CPU GEMM's speed jumps between neighbouring shapes, e.g. 65 rows against 64, as its kernels
tile the rows, so a grid cannot be interpolated to within the band) and how much slower they run inside a model
step (a factor on their kernel time and a cost per byte of their weights), kernel time by bytes for each class
of memory-bound op (MEMORY_CLASSES) with its operands in the cache and with them streamed from memory (beyond
the threads' private caches), fresh pages and scatter rows, and the host's time per dispatched op, each phase
apart (Python module code around the forward's ops, the C++ autograd engine around the backward's, the
optimizer's Python loop). Torch-free.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping, Optional

from planner.steptime.curves import GemmGrid, SizeCurve
from planner.steptime.devices import (MEMORY_CLASSES, SCATTER_OPS, SHORT_LOOP_PROBE_RUN, STRIDED_PROBE_STRIDE,
                                      allocates_output, cache_line_elements, element_bytes, memory_class,
                                      op_base_name)
from planner.steptime.ops import OpRecord


@dataclass(frozen=True)
class MeasuredDevice:
    """This machine's measured terms (see probe.py). Times are kernel times: the probe subtracts the cost of
    calling an op from Python, which `host_s_per_op` carries instead, per phase."""

    name: str
    dtype: str
    measured_on: str  # ISO date of the probe
    mm: GemmGrid
    bmm: GemmGrid  # batched products (attention), per problem of the batch
    memory: dict[str, SizeCurve]  # MEMORY_CLASSES -> kernel seconds by bytes moved
    scatter_s_per_row: float  # a scatter-add's cost per index row, beyond its bytes
    fresh_page_s_per_byte: float  # first touch of newly mapped memory (the kernel zero-fills each page)
    fresh_above_bytes: int  # outputs larger than this are newly mapped (glibc's mmap threshold)
    # phase -> GEMMs inside a model step ÷ the same timed beside it (fitted; with gemm_weight_s_per_byte)
    gemm_in_model_factor: dict[str, float]
    host_s_per_op: dict[str, float]  # phase -> seconds of host time per dispatched op
    host_s_per_view: float
    parallel_speedup: float  # every thread ÷ one thread on a reference GEMM, when probed (host_state)
    source: str = "probe"
    overlaps_host: bool = False  # a CPU computes what it dispatches: host and kernel time add up
    # gemm_key(batch, m, n, k) -> kernel seconds of that exact GEMM, timed as the grid's points are
    gemm_shape_s: dict[str, float] = field(default_factory=dict)
    # Threads each term keeps busy (kernel_probes.Timed), for the step's CPU time: a benchmark's CPU-time ratio
    # compares like with like, since a serial kernel (dropout's draws) leaves the other threads asleep.
    gemm_shape_busy: dict[str, float] = field(default_factory=dict)  # by gemm_key, as gemm_shape_s
    scatter_busy: float = 1.0
    fresh_page_busy: float = 1.0
    host_busy: dict[str, float] = field(default_factory=dict)  # phase -> threads busy while dispatching
    # Memory-bound ops by bytes moved, operands streamed from memory, where the classes above are timed on
    # operands in the cache, back to back. What an op pays whose operands are not in the cache when it runs:
    # an optimizer op's first touches of parameters, gradients and moments, long after their last use
    # (OpRecord.first_touch_bytes), and any other op moving more than the threads' private caches
    # (`private_cache_bytes`). None: priced as the classes are.
    streamed_memory: Optional[SizeCurve] = None
    # The threads' private (L2) caches together. Back to back, the probe finds a class's operands in the shared
    # last-level cache up to its size; inside a model step an op moving more than the private caches finds
    # them evicted by its neighbours' data (and, on a VM, by other tenants'): in a debug forward at batch 8,
    # context 256 the adds, products and T5's norms (1 to 9 MiB each) took 2.5 to 5 × their price off the
    # in-cache curve. None: not measured, every op priced on its class's curve.
    private_cache_bytes: Optional[int] = None
    # phase -> seconds a product inside a model step costs beyond the factor above, per byte of its second operand
    # (a layer's weight): what a weight evicts, its neighbours may read again from memory. Fitted with the factor
    # on steps of few rows and of many (probe.GEMM_CALIBRATIONS): a factor fitted on few rows alone priced large
    # products high (the forwards at batch 16, context 512 of tiny and small read 0.78–0.92 of their price).
    gemm_weight_s_per_byte: dict[str, float] = field(default_factory=lambda: {"forward": 0.0})
    # The threads of PyTorch's pool, and how long each idle one spins after a parallel region before it sleeps
    # (kernel_probes.spin_window_probe). The busy threads above are of a kernel timed back to back with itself,
    # where a serial kernel's idle neighbours have long gone to sleep; in a model step the ops come microseconds
    # apart, and the threads a kernel leaves idle spin on through it, up to this window. Without it steps of
    # few rows were priced 1.45–1.83 busy threads of 2 where they kept 1.98–2.00 busy (tiny and small at
    # batch 1, context 64); with it, 1.96–2.00.
    pool_threads: int = 1
    spin_window_s: float = 0.0
    # Set by `for_step` for a step whose optimizer states fit the cache (a property of the step, not the device:
    # the cache leaves it out).
    optimizer_in_cache: bool = False

    def for_step(self, trace) -> "MeasuredDevice":
        """This device as `trace` (a StepTrace) meets it: the optimizer's first touches stream from memory only
        when what it moves exceeds the last-level cache (OPTIMIZER_CACHED_BYTES); a small model's states stay
        in the cache from one step to the next, and its optimizer is priced as the cached classes are."""
        moved = sum(count * op.bytes for op, count in trace.ops if op.phase == "optimizer" and op.kind == "memory")
        return replace(self, optimizer_in_cache=moved <= OPTIMIZER_CACHED_BYTES)

    def grid_gemm_s(self, flops: int, batch: int, m: int, n: int, k: int) -> float:
        """A GEMM's kernel seconds read off the probed grid of shapes (batched products off their own)."""
        return flops / (self.bmm if batch > 1 else self.mm).rate(m, n, k)

    def with_gemm_timings_of(self, timed: "MeasuredDevice", shapes) -> "MeasuredDevice":
        """This device with `timed`'s exact timings (seconds and busy threads) of `shapes` ((batch, m, n, k)
        each; those `timed` lacks are left out), less any a busy machine disturbed."""
        keys = [key for key in (gemm_key(*shape) for shape in shapes)
                if key in timed.gemm_shape_s and key in timed.gemm_shape_busy]
        return self.with_gemm_timings({key: timed.gemm_shape_s[key] for key in keys},
                                      {key: timed.gemm_shape_busy[key] for key in keys})

    def with_gemm_timings(self, seconds: Mapping[str, float], busy: Mapping[str, float]) -> "MeasuredDevice":
        """This device with exact GEMM timings added (`gemm_key` -> seconds, and -> busy threads), less any a
        busy machine disturbed."""
        return replace(self, gemm_shape_s={**self.gemm_shape_s, **seconds},
                       gemm_shape_busy={**self.gemm_shape_busy, **busy}).without_disturbed_gemm_shapes()

    def without_disturbed_gemm_shapes(self) -> "MeasuredDevice":
        """This device without the exact GEMM timings more than DISTURBED_GEMM_FACTOR × slower than the grid
        prices their shape: timed while the machine was busy (a debug model's (130 × 64) · (64 × 256) took
        15.6 ms beside a test suite, against 10 µs), they would price every later step with that shape. A
        shape below the grid's smallest point is held to that point's time at its batch: the grid reads a
        product with k = 1 at the rate it measured for k = 16, 1/16 of any real call (a decoding step's
        (1 × 1) · (1 × 64), 256 times, took 63 µs against 0.37 µs priced, and was dropped as disturbed)."""
        kept = {key: seconds for key, seconds in self.gemm_shape_s.items()
                if seconds <= DISTURBED_GEMM_FACTOR * self._grid_s_of_key(key)}
        if len(kept) == len(self.gemm_shape_s):
            return self
        return replace(self, gemm_shape_s=kept,
                       gemm_shape_busy={key: busy for key, busy in self.gemm_shape_busy.items() if key in kept})

    def _grid_s_of_key(self, key: str) -> float:
        batch, m, n, k = parse_gemm_key(key)
        grid = self.bmm if batch > 1 else self.mm
        smallest = (grid.m_values[0], grid.n_values[0], grid.k_values[0])
        return max(self.grid_gemm_s(2 * batch * m * n * k, batch, m, n, k),
                   self.grid_gemm_s(2 * batch * math.prod(smallest), batch, *smallest))

    @staticmethod
    def gemm_shapes(trace) -> list[tuple[int, int, int, int]]:
        """The GEMM shapes (batch, m, n, k) of `trace` (a StepTrace), each once."""
        return sorted({op.gemm for op, _ in trace.ops if op.kind == "matmul" and op.gemm is not None})

    def missing_gemm_shapes(self, trace) -> list[tuple[int, int, int, int]]:
        """The GEMM shapes of `trace` (a StepTrace) without an exact timing (and its busy threads) yet."""
        return [shape for shape in self.gemm_shapes(trace)
                if gemm_key(*shape) not in self.gemm_shape_s or gemm_key(*shape) not in self.gemm_shape_busy]

    def _fresh_pages_s(self, op: OpRecord) -> float:
        """New pages the op touches first: as counted in a recorded step, or else its output when that is
        above glibc's mmap threshold (a shape-only trace cannot see the heap's state)."""
        if op.fresh_bytes is not None:
            return op.fresh_bytes * self.fresh_page_s_per_byte
        fresh = allocates_output(op) and op.bytes_written > self.fresh_above_bytes
        return op.bytes_written * self.fresh_page_s_per_byte if fresh else 0.0

    def matmul_s(self, op: OpRecord, matmul_dtype: str) -> float:
        factor = self.gemm_in_model_factor.get(op.phase, self.gemm_in_model_factor["forward"])
        if op.gemm is None:
            return op.flops / self.mm.rate(4096, 4096, 4096) * factor
        batch, m, n, k = op.gemm
        exact_s = self.gemm_shape_s.get(gemm_key(batch, m, n, k))
        kernel_s = exact_s if exact_s is not None else self.grid_gemm_s(op.flops, batch, m, n, k)
        per_weight_byte = self.gemm_weight_s_per_byte.get(op.phase, self.gemm_weight_s_per_byte["forward"])
        return kernel_s * factor + product_weight_bytes(op) * per_weight_byte + self._fresh_pages_s(op)

    def _streamed_share(self, op: OpRecord) -> float:
        """The share of `op`'s bytes that stream from memory. In an optimizer whose states exceed the cache
        (`for_step`): the share of its reads it is the first of the step's optimizer ops to touch (each
        parameter, gradient and moment once, in the first op on them; the ops after it find them in the
        cache). Elsewhere: all of them when it moves more than the threads' private caches, none otherwise."""
        if self.streamed_memory is None:
            return 0.0
        if op.phase == "optimizer":
            if self.optimizer_in_cache or op.bytes_read <= 0:
                return 0.0
            return min(op.first_touch_bytes / op.bytes_read, 1.0)
        return 1.0 if self.private_cache_bytes is not None and op.bytes > self.private_cache_bytes else 0.0

    def _memory_parts(self, op: OpRecord) -> list[tuple[float, SizeCurve]]:
        """`op`'s memory-bound kernel as (seconds, the curve that prices them): its class's curve for the cached
        share of its bytes; for the streamed share the slower of the streamed curve and the class's (a square
        root of streamed operands computes for longer than they stream; a short-loop add loops longer), as if
        the whole op streamed, weighted by the share."""
        cached = self.memory[memory_class(op)]
        cached_s = self._cached_s(op, cached)
        streamed = self._streamed_share(op)
        if not streamed:
            return [(cached_s, cached)]
        streamed_s = self.streamed_memory(op.bytes)
        slower_s, slower = (streamed_s, self.streamed_memory) if streamed_s > cached_s else (cached_s, cached)
        return [((1 - streamed) * cached_s, cached), (streamed * slower_s, slower)]

    def _cached_s(self, op: OpRecord, curve: SizeCurve) -> float:
        """`op`'s kernel on `curve`, its class's, with its operands in the cache. A strided op (an input read
        across its layout) is the contiguous op plus the probed stride's extra time scaled by the cache lines
        its stride wastes: s − 1 of every s elements of each line it fetches, a whole line but one element
        from a stride of a line's elements up (an add of scores and a position bias laid out heads innermost,
        124 MiB on this CPU: 2.0× the contiguous add at stride 4, 3.6× at 8, 6.0× at 12, 8.8× at 16). An
        elementwise op's loops (`inner_run` elements each) add the short-loop probe's extra time over the
        contiguous op in proportion to how many there are: an add of 67 MB of scores on this CPU took 7.5 ms
        in loops of 513 or more elements, 26.6, 17.2, 12.2 and 8.3 ms in loops of 2, 4, 8 and 16."""
        named = memory_class(op)
        if named not in ("elementwise", "strided"):
            return curve(op.bytes)
        contiguous_s = self.memory["elementwise"](op.bytes)
        extra_s = 0.0
        if named == "strided":
            wasted = (min(op.inner_stride, cache_line_elements(op)) - 1) / (STRIDED_PROBE_STRIDE - 1)
            extra_s += max(curve(op.bytes) - contiguous_s, 0.0) * wasted
        if op.inner_run > 0:
            loops = SHORT_LOOP_PROBE_RUN / op.inner_run  # per loop the probe runs at the same bytes
            extra_s += max(self.memory["short_loop"](op.bytes) - contiguous_s, 0.0) * loops
        return contiguous_s + extra_s

    def _memory_busy(self, op: OpRecord) -> float:
        """Threads busy over `op`'s memory-bound kernel: each part's, weighted by its time."""
        parts = self._memory_parts(op)
        total_s = sum(seconds for seconds, _ in parts)
        if total_s <= 0:
            return parts[0][1].busy_at(op.bytes)
        return sum(seconds * curve.busy_at(op.bytes) for seconds, curve in parts) / total_s

    def memory_s(self, op: OpRecord) -> float:
        scatter_s = op.index_rows * self.scatter_s_per_row if op_base_name(op) in SCATTER_OPS else 0.0
        return sum(seconds for seconds, _ in self._memory_parts(op)) + scatter_s + self._fresh_pages_s(op)

    def host_s(self, op: OpRecord) -> float:
        if op.kind == "view":
            return self.host_s_per_view
        return self.host_s_per_op.get(op.phase, self.host_s_per_op["forward"])

    def sync_s(self) -> float:
        return 0.0  # the values are already on the host

    def kernel_cpu_s(self, op: OpRecord, kernel_s: float) -> Optional[float]:
        """The kernel's time `kernel_s` (matmul_s or memory_s) × the threads it keeps busy, its fresh pages'
        part × theirs."""
        fresh_s = self._fresh_pages_s(op)
        if op.kind == "matmul":
            busy = self.gemm_shape_busy.get(gemm_key(*op.gemm)) if op.gemm is not None else None
        else:
            scatter = op_base_name(op) in SCATTER_OPS
            busy = self.scatter_busy if scatter else self._memory_busy(op)
        if busy is None:
            return None
        return (kernel_s - fresh_s) * busy + fresh_s * self.fresh_page_busy + self._spin_cpu_s(kernel_s, busy)

    def _spin_cpu_s(self, kernel_s: float, busy: float) -> float:
        """The CPU time of the pool's threads a kernel keeping `busy` threads leaves idle: each spins on through
        the kernel, up to `spin_window_s`, taking every kernel to follow a parallel one closely (steps of few
        rows, debug's forwards at batch 1 among them, kept 1.91–2.00 of 2 threads busy, read exactly:
        bench.timing.process_cpu_s)."""
        return max(self.pool_threads - busy, 0.0) * min(kernel_s, self.spin_window_s)

    def host_cpu_s(self, op: OpRecord) -> Optional[float]:
        busy = self.host_busy.get(op.phase, self.host_busy.get("forward"))
        return None if busy is None else self.host_s(op) * busy

    def to_dict(self) -> dict[str, Any]:
        """The probed terms, as the cache keeps them (not `optimizer_in_cache`: a step's, set by `for_step`)."""
        values = asdict(self)
        del values["optimizer_in_cache"]
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "MeasuredDevice":
        """Rebuild a cached probe, refusing anything that is not one (ValueError naming the field)."""
        if not isinstance(values, Mapping):
            raise ValueError("a cached device probe must be a JSON object")
        try:
            grids = {}
            for key in ("mm", "bmm"):
                grid = values[key]
                axes = [tuple(int(v) for v in grid[axis]) for axis in ("m_values", "n_values", "k_values")]
                rates = tuple(tuple(tuple(float(r) for r in row) for row in plane) for plane in grid["rates"])
                if [len(rates), len(rates[0]), len(rates[0][0])] != [len(a) for a in axes]:
                    raise ValueError(f"{key}: rates do not match the grid's axes")
                _check_positive(key, [r for plane in rates for row in plane for r in row] + [v for a in axes for v in a])
                grids[key] = GemmGrid(*axes, rates)
            curves = {key: _size_curve_from(values["memory"][key], f"memory.{key}") for key in MEMORY_CLASSES}
            streamed_memory = _size_curve_from(values["streamed_memory"], "streamed_memory")
            private_cache_bytes = values["private_cache_bytes"]  # absent in probes from before it was read
            if private_cache_bytes is not None:
                private_cache_bytes = int(private_cache_bytes)
                _check_positive("private_cache_bytes", [private_cache_bytes])
            per_phase = {}
            for key in ("host_s_per_op", "gemm_in_model_factor", "host_busy"):
                per_phase[key] = {str(phase): float(v) for phase, v in dict(values[key]).items()}
                if "forward" not in per_phase[key]:
                    raise ValueError(f"{key}: the forward phase is missing")
                _check_positive(key, list(per_phase[key].values()))
            _check_busy("host_busy", list(per_phase["host_busy"].values()))
            # Absent in probes from before it was fitted: refused, probed again.
            per_weight_byte = {str(phase): float(v) for phase, v in dict(values["gemm_weight_s_per_byte"]).items()}
            if "forward" not in per_weight_byte:
                raise ValueError("gemm_weight_s_per_byte: the forward phase is missing")
            _check_positive("gemm_weight_s_per_byte", list(per_weight_byte.values()), zero_allowed=True)
            # Both absent in probes from before the pool's spinning was measured: refused, probed again.
            pool_threads = values["pool_threads"]
            if not isinstance(pool_threads, int) or isinstance(pool_threads, bool):
                raise ValueError(f"pool_threads: must be a whole number of threads, got {pool_threads!r}")
            spin_window_s = float(values["spin_window_s"])
            _check_busy("pool_threads", [pool_threads])
            _check_positive("spin_window_s", [spin_window_s], zero_allowed=True)
            scalars = {key: float(values[key]) for key in ("host_s_per_view", "scatter_s_per_row",
                                                             "fresh_page_s_per_byte", "fresh_above_bytes",
                                                             "parallel_speedup", "scatter_busy", "fresh_page_busy")}
            for key, value in scalars.items():
                _check_positive(key, [value])
            _check_busy("scatter_busy / fresh_page_busy", [scalars["scatter_busy"], scalars["fresh_page_busy"]])
            # Both absent in probes made before exact shapes (and their busy threads) were timed.
            shapes = _per_gemm_shape(values, "gemm_shape_s", "seconds", _check_positive)
            busy_of_shape = _per_gemm_shape(values, "gemm_shape_busy", "busy threads", _check_busy)
            loaded = cls(str(values["name"]), str(values["dtype"]), str(values["measured_on"]), grids["mm"],
                       grids["bmm"], curves, scalars["scatter_s_per_row"], scalars["fresh_page_s_per_byte"],
                       int(scalars["fresh_above_bytes"]), per_phase["gemm_in_model_factor"],
                       per_phase["host_s_per_op"], scalars["host_s_per_view"], scalars["parallel_speedup"],
                       gemm_shape_s=shapes, gemm_shape_busy=busy_of_shape, scatter_busy=scalars["scatter_busy"],
                       fresh_page_busy=scalars["fresh_page_busy"], host_busy=per_phase["host_busy"],
                       streamed_memory=streamed_memory, private_cache_bytes=private_cache_bytes,
                       gemm_weight_s_per_byte=per_weight_byte, pool_threads=pool_threads,
                       spin_window_s=spin_window_s)
        except (KeyError, TypeError, IndexError) as error:
            raise ValueError(f"a cached device probe lacks or mistypes {error}") from None
        return loaded.without_disturbed_gemm_shapes()  # a cache written on a busy machine heals here


def product_weight_bytes(op: OpRecord) -> int:
    """The bytes of a product's second operand, (batch ×) k × n: a linear layer's weight (an attention
    product's keys or values); 0 where the shape is unknown."""
    if op.gemm is None:
        return 0
    batch, _, n, k = op.gemm
    return batch * k * n * element_bytes(op)


def gemm_key(batch: int, m: int, n: int, k: int) -> str:
    return f"{batch},{m},{n},{k}"


def parse_gemm_key(key: str) -> tuple[int, int, int, int]:
    """'batch,m,n,k' -> the four sizes; a ValueError for anything else."""
    parts = key.split(",")
    if len(parts) != 4 or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise ValueError(f"gemm_shape_s: {key[:40]!r} is not 'batch,m,n,k' of positive integers")
    batch, m, n, k = (int(part) for part in parts)
    return batch, m, n, k


# An exact GEMM timing this many times slower than the grid's price for its shape was disturbed: shapes off the
# grid's axes read up to ~45× its price here (an inner dimension of 1 to 6: a decoding step's attention over its
# first positions, the grid's smallest being 16), timings taken beside a test suite 250× to 40,000×
DISTURBED_GEMM_FACTOR = 100.0
MAX_BUSY_THREADS = 4096  # more threads busy than any machine has: a damaged cache
# What an optimizer step may move and still find its operands in the cache: twice a 32 MiB last-level cache,
# the probe's own assumption for cold operands (kernel_probes.COLD_BYTES).
OPTIMIZER_CACHED_BYTES = 64 * 2**20


def _per_gemm_shape(values: Mapping[str, Any], field_name: str, what: str, check) -> dict[str, float]:
    """A cached `gemm_key -> value` table (empty when absent), or ValueError naming the field."""
    table = values.get(field_name, {})
    if not isinstance(table, Mapping):
        raise ValueError(f"{field_name} must be an object of shape -> {what}")
    table = {str(key): float(value) for key, value in table.items()}
    for key in table:
        parse_gemm_key(key)
    check(field_name, list(table.values()))
    return table


def _size_curve_from(curve: Mapping[str, Any], field_name: str) -> SizeCurve:
    """A cached SizeCurve (sizes, seconds, busy threads), or ValueError naming the field."""
    sizes, seconds = tuple(map(float, curve["sizes"])), tuple(map(float, curve["seconds"]))
    busy = tuple(map(float, curve["busy_threads"]))
    if len({len(sizes), len(seconds), len(busy)}) != 1 or len(sizes) < 2 or list(sizes) != sorted(sizes):
        raise ValueError(f"{field_name}: sizes, seconds and busy_threads must be ascending lists of one length")
    _check_positive(field_name, sizes + seconds)
    _check_busy(f"{field_name}.busy_threads", busy)
    return SizeCurve(sizes, seconds, busy)


def _check_busy(field_name: str, values) -> None:
    _check_positive(field_name, values)
    if any(v > MAX_BUSY_THREADS for v in values):
        raise ValueError(f"{field_name}: busy threads must be at most {MAX_BUSY_THREADS}")


def _check_positive(field_name: str, values, zero_allowed: bool = False) -> None:
    bad = [v for v in values if not (isinstance(v, (int, float)) and math.isfinite(v)
                                     and (v > 0 or (zero_allowed and v == 0)))]
    if bad:
        allowed = "zero or a positive finite number" if zero_allowed else "a positive finite number"
        raise ValueError(f"{field_name}: every value must be {allowed}, got {bad[0]!r}")
