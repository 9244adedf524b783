"""What a device does per op: GEMM time by shape and dtype, memory-bound time by bytes, per-op host overhead,
host-sync latency (performance.md, "What the model contains").

Two kinds of device model, one interface (`DeviceModel`):

- `MeasuredDevice`: this machine, from `probe.probe_device` (cached with its date): GEMM kernel rates on a
  grid of shapes (interpolated between them), the kernel time of every exact GEMM shape a predicted step
  has met (`gemm_shape_s`: a CPU GEMM's speed jumps between neighbouring shapes, e.g. 65 rows against 64, as
  its kernels tile the rows, so a grid cannot be interpolated to within the band) and how much slower they
  run inside a model step, kernel time
  by bytes for each class of memory-bound op (MEMORY_CLASSES), fresh pages and scatter rows, and the host's
  time per dispatched op, each phase apart (Python module code around the forward's ops, the C++ autograd
  engine around the backward's, the optimizer's Python loop).
- `GpuPreset`: a GPU one does not have, from its datasheet and published measurements (cited beside each
  number): the matmul rate is the datasheet peak × the measured achievable fraction (MAMF) × the share of
  the GPU a GEMM's 128×128 output tiles fill (wave quantisation); memory-bound ops run at the datasheet
  bandwidth × an achievable fraction; every kernel takes at least a minimum duration; the host's time per
  op is this machine's probe (or a stated default) plus the CUDA launch call.

Torch-free: presets and cached probes predict without loading torch.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping, Optional, Protocol

from planner.steptime.ops import OpRecord

# Memory-bound ops fall into classes whose CPU kernels run at very different speeds per byte; the probe
# times one representative of each. Everything not named here is "elementwise" (binary ops, copies, cat,
# masks, gathers).
MEMORY_CLASSES = ("elementwise", "random", "sampling", "selection", "softmax", "softmax_backward", "transcendental",
                  "reduction")
_CLASS_OF_OP = {
    **dict.fromkeys(("bernoulli_", "uniform_", "normal_", "rand", "randn"), "random"),
    "multinomial": "sampling",  # an exponential draw per element, a division and an argmax per row
    **dict.fromkeys(("topk", "sort"), "selection"),
    **dict.fromkeys(("_softmax", "_log_softmax"), "softmax"),
    **dict.fromkeys(("_softmax_backward_data", "_log_softmax_backward_data"), "softmax_backward"),
    **dict.fromkeys(("exp", "log", "rsqrt", "sqrt", "tanh", "erf"),
                    "transcendental"),
    **dict.fromkeys(("sum", "mean", "amax", "max", "min", "nll_loss_forward", "nll_loss_backward",
                     "native_layer_norm", "native_layer_norm_backward"), "reduction"),
}


# Scatter-adds (rows added into a table): on CPU a row at a time, so their time grows with the rows.
SCATTER_OPS = frozenset({"embedding_dense_backward", "index_add", "index_add_", "index_put", "index_put_",
                         "scatter_add", "scatter_add_"})


def memory_class(op: OpRecord) -> str:
    return _CLASS_OF_OP.get(op_base_name(op), "elementwise")


def allocates_output(op: OpRecord) -> bool:
    """Out-of-place ops write into a freshly allocated tensor; in-place ones (trailing _) into their input."""
    return not op_base_name(op).endswith("_") and op.bytes_written > 0


DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def op_base_name(op: OpRecord) -> str:
    """'aten._softmax.default' -> '_softmax'."""
    parts = op.name.split(".")
    return parts[1] if len(parts) > 2 else parts[-1]


class DeviceModel(Protocol):
    name: str
    source: str
    overlaps_host: bool  # True on GPUs: the host queues kernels and runs ahead until a sync

    def matmul_s(self, op: OpRecord, matmul_dtype: str) -> float: ...
    def memory_s(self, op: OpRecord) -> float: ...
    def host_s(self, op: OpRecord) -> float: ...
    def sync_s(self) -> float: ...
    # CPU seconds, every thread, of an op's kernel and of its dispatch; None where the device has no
    # measured thread occupancy (a GPU; a GEMM shape not timed exactly).
    def kernel_cpu_s(self, op: OpRecord, matmul_dtype: str) -> Optional[float]: ...
    def host_cpu_s(self, op: OpRecord) -> Optional[float]: ...


# --- interpolation -----------------------------------------------------------------------------------------


def _interpolate(points: list[float], values: list[float], x: float) -> float:
    """Linear interpolation of `values` at `x` over ascending `points`, clamped at both ends."""
    if x <= points[0]:
        return values[0]
    if x >= points[-1]:
        return values[-1]
    i = bisect.bisect_right(points, x) - 1
    t = (x - points[i]) / (points[i + 1] - points[i])
    return values[i] + t * (values[i + 1] - values[i])


@dataclass(frozen=True)
class SizeCurve:
    """Kernel seconds of an op class measured at sizes (bytes moved, ascending): log-log interpolation inside,
    the largest size's throughput beyond it, the smallest size's time below it."""

    sizes: tuple[float, ...]
    seconds: tuple[float, ...]
    busy_threads: tuple[float, ...] = ()  # at each size, the threads the kernel kept busy (probe.Timed)

    def busy_at(self, size: float) -> Optional[float]:
        """Threads kept busy at `size` bytes: linear in log size between the measured sizes, the nearest
        end outside them; None where the curve has no busy threads measured."""
        if not self.busy_threads:
            return None
        logs = [math.log(s) for s in self.sizes]
        return _interpolate(logs, list(self.busy_threads), math.log(max(size, 1.0)))

    def __call__(self, size: float) -> float:
        if size <= 0:
            return 0.0
        if size >= self.sizes[-1]:
            return self.seconds[-1] * size / self.sizes[-1]
        if size <= self.sizes[0]:
            return self.seconds[0] * size / self.sizes[0]
        logs = [math.log(s) for s in self.sizes]
        return math.exp(_interpolate(logs, [math.log(t) for t in self.seconds], math.log(size)))


@dataclass(frozen=True)
class GemmGrid:
    """GEMM kernel FLOP/s measured at every (m, n, k) of three ascending axes; `rates[i][j][l]` at
    (m_values[i], n_values[j], k_values[l]). Between points, trilinear in log2 of the shape and of the rate;
    outside, the nearest edge (a GEMM larger than the grid runs at the largest measured shape's rate)."""

    m_values: tuple[int, ...]
    n_values: tuple[int, ...]
    k_values: tuple[int, ...]
    rates: tuple[tuple[tuple[float, ...], ...], ...]

    def rate(self, m: int, n: int, k: int) -> float:
        axes = [[math.log2(v) for v in values] for values in (self.m_values, self.n_values, self.k_values)]
        x = [math.log2(max(v, 1)) for v in (m, n, k)]
        log_rates = [[[math.log2(r) for r in row] for row in plane] for plane in self.rates]
        over_k = [[_interpolate(axes[2], row, x[2]) for row in plane] for plane in log_rates]
        over_n = [_interpolate(axes[1], column, x[1]) for column in over_k]
        return 2 ** _interpolate(axes[0], over_n, x[0])


# --- this machine, probed ----------------------------------------------------------------------------------


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
    gemm_in_model_factor: dict[str, float]  # phase -> GEMMs inside a model step ÷ the same back to back (fitted)
    host_s_per_op: dict[str, float]  # phase -> seconds of host time per dispatched op
    host_s_per_view: float
    parallel_speedup: float  # every thread ÷ one thread on a reference GEMM, when probed (host_state)
    source: str = "probe"
    overlaps_host: bool = False  # a CPU computes what it dispatches: host and kernel time add up
    # gemm_key(batch, m, n, k) -> kernel seconds of that exact GEMM, timed as the grid's points are
    gemm_shape_s: dict[str, float] = field(default_factory=dict)
    # Threads each term keeps busy (probe.Timed), for the step's CPU time: a benchmark's CPU-time ratio
    # compares like with like, since a serial kernel (dropout's draws) leaves the other threads asleep.
    gemm_shape_busy: dict[str, float] = field(default_factory=dict)  # by gemm_key, as gemm_shape_s
    scatter_busy: float = 1.0
    fresh_page_busy: float = 1.0
    host_busy: dict[str, float] = field(default_factory=dict)  # phase -> threads busy while dispatching
    # The optimizer's memory-bound ops by bytes moved, operands streamed from memory: each parameter, gradient
    # and moment is touched once a step, long after its last use, where the classes above are timed on
    # operands in the cache (as a forward's chained activations mostly are). None: priced as elementwise.
    optimizer_memory: Optional[SizeCurve] = None

    def for_step(self, trace) -> "MeasuredDevice":
        """This device as `trace` (a StepTrace) meets it: the optimizer's operands stream from memory only when
        what it moves exceeds the last-level cache (OPTIMIZER_CACHED_BYTES); a small model's states stay in
        the cache from one op to the next, and its optimizer is priced as the cached classes are."""
        moved = sum(count * op.bytes for op, count in trace.ops if op.phase == "optimizer" and op.kind == "memory")
        return self if moved > OPTIMIZER_CACHED_BYTES else replace(self, optimizer_memory=None)

    def missing_gemm_shapes(self, trace) -> list[tuple[int, int, int, int]]:
        """The GEMM shapes of `trace` (a StepTrace) without an exact timing (and its busy threads) yet."""
        shapes = {op.gemm for op, _ in trace.ops if op.kind == "matmul" and op.gemm is not None}
        return sorted(shape for shape in shapes
                      if gemm_key(*shape) not in self.gemm_shape_s or gemm_key(*shape) not in self.gemm_shape_busy)

    def _fresh_pages_s(self, op: OpRecord) -> float:
        fresh = allocates_output(op) and op.bytes_written > self.fresh_above_bytes
        return op.bytes_written * self.fresh_page_s_per_byte if fresh else 0.0

    def matmul_s(self, op: OpRecord, matmul_dtype: str) -> float:
        factor = self.gemm_in_model_factor.get(op.phase, self.gemm_in_model_factor["forward"])
        if op.gemm is None:
            return op.flops / self.mm.rate(4096, 4096, 4096) * factor
        batch, m, n, k = op.gemm
        exact_s = self.gemm_shape_s.get(gemm_key(batch, m, n, k))
        kernel_s = exact_s if exact_s is not None else op.flops / (self.bmm if batch > 1 else self.mm).rate(m, n, k)
        return kernel_s * factor + self._fresh_pages_s(op)

    def _memory_curve(self, op: OpRecord) -> SizeCurve:
        if op.phase == "optimizer" and self.optimizer_memory is not None:
            return self.optimizer_memory
        return self.memory[memory_class(op)]

    def memory_s(self, op: OpRecord) -> float:
        scatter_s = op.index_rows * self.scatter_s_per_row if op_base_name(op) in SCATTER_OPS else 0.0
        return self._memory_curve(op)(op.bytes) + scatter_s + self._fresh_pages_s(op)

    def host_s(self, op: OpRecord) -> float:
        if op.kind == "view":
            return self.host_s_per_view
        return self.host_s_per_op.get(op.phase, self.host_s_per_op["forward"])

    def sync_s(self) -> float:
        return 0.0  # the values are already on the host

    def kernel_cpu_s(self, op: OpRecord, matmul_dtype: str) -> Optional[float]:
        """The kernel's time × the threads it keeps busy (its fresh pages × theirs)."""
        fresh_s = self._fresh_pages_s(op)
        if op.kind == "matmul":
            busy = self.gemm_shape_busy.get(gemm_key(*op.gemm)) if op.gemm is not None else None
            kernel_s = self.matmul_s(op, matmul_dtype) - fresh_s
        else:
            scatter = op_base_name(op) in SCATTER_OPS
            busy = self.scatter_busy if scatter else self._memory_curve(op).busy_at(op.bytes)
            kernel_s = self.memory_s(op) - fresh_s
        return None if busy is None else kernel_s * busy + fresh_s * self.fresh_page_busy

    def host_cpu_s(self, op: OpRecord) -> Optional[float]:
        busy = self.host_busy.get(op.phase, self.host_busy.get("forward"))
        return None if busy is None else self.host_s(op) * busy

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

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
            optimizer_memory = _size_curve_from(values["optimizer_memory"], "optimizer_memory")
            per_phase = {}
            for key in ("host_s_per_op", "gemm_in_model_factor", "host_busy"):
                per_phase[key] = {str(phase): float(v) for phase, v in dict(values[key]).items()}
                if "forward" not in per_phase[key]:
                    raise ValueError(f"{key}: the forward phase is missing")
                _check_positive(key, list(per_phase[key].values()))
            _check_busy("host_busy", list(per_phase["host_busy"].values()))
            scalars = {key: float(values[key]) for key in ("host_s_per_view", "scatter_s_per_row",
                                                             "fresh_page_s_per_byte", "fresh_above_bytes",
                                                             "parallel_speedup", "scatter_busy", "fresh_page_busy")}
            for key, value in scalars.items():
                _check_positive(key, [value])
            _check_busy("scatter_busy / fresh_page_busy", [scalars["scatter_busy"], scalars["fresh_page_busy"]])
            # Both absent in probes made before exact shapes (and their busy threads) were timed.
            shapes = _per_gemm_shape(values, "gemm_shape_s", "seconds", _check_positive)
            busy_of_shape = _per_gemm_shape(values, "gemm_shape_busy", "busy threads", _check_busy)
            return cls(str(values["name"]), str(values["dtype"]), str(values["measured_on"]), grids["mm"],
                       grids["bmm"], curves, scalars["scatter_s_per_row"], scalars["fresh_page_s_per_byte"],
                       int(scalars["fresh_above_bytes"]), per_phase["gemm_in_model_factor"],
                       per_phase["host_s_per_op"], scalars["host_s_per_view"], scalars["parallel_speedup"],
                       gemm_shape_s=shapes, gemm_shape_busy=busy_of_shape, scatter_busy=scalars["scatter_busy"],
                       fresh_page_busy=scalars["fresh_page_busy"], host_busy=per_phase["host_busy"],
                       optimizer_memory=optimizer_memory)
        except (KeyError, TypeError, IndexError) as error:
            raise ValueError(f"a cached device probe lacks or mistypes {error}") from None


def gemm_key(batch: int, m: int, n: int, k: int) -> str:
    return f"{batch},{m},{n},{k}"


def parse_gemm_key(key: str) -> tuple[int, int, int, int]:
    """'batch,m,n,k' -> the four sizes; a ValueError for anything else."""
    parts = key.split(",")
    if len(parts) != 4 or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise ValueError(f"gemm_shape_s: {key[:40]!r} is not 'batch,m,n,k' of positive integers")
    batch, m, n, k = (int(part) for part in parts)
    return batch, m, n, k


MAX_BUSY_THREADS = 4096  # more threads busy than any machine has: a damaged cache
# What an optimizer step may move and still find its operands in the cache: twice a 32 MiB last-level cache,
# the probe's own assumption for cold operands (probe.COLD_BYTES).
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


def _check_positive(field_name: str, values) -> None:
    bad = [v for v in values if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0)]
    if bad:
        raise ValueError(f"{field_name}: every value must be a positive finite number, got {bad[0]!r}")


# --- GPUs one does not have --------------------------------------------------------------------------------

# Default host time per dispatched op when no probe of this machine exists: the order this CPU measures
# (tests/test_steptime_devices.py keeps the default within 3x of a fresh probe).
DEFAULT_HOST_S_PER_OP = {"forward": 12e-6, "forecast": 12e-6, "backward": 6e-6, "optimizer": 6e-6}
DEFAULT_HOST_S_PER_VIEW = 2e-6
# The next three are assumptions, not measurements: public write-ups put a CUDA kernel launch at a few to
# tens of µs of host time, and a host sync (.item(), .tolist()) at tens of µs. scripts/device_check.sh
# measures what a real GPU gives, and its results replace these once a GPU has been lent.
CUDA_LAUNCH_S = 5e-6  # cudaLaunchKernel's host cost per kernel
KERNEL_FLOOR_S = 2.5e-6  # the shortest a kernel occupies the GPU, however little it does
CUDA_SYNC_S = 15e-6  # cudaStreamSynchronize + a small device-to-host copy (the queued work is device time)
GEMM_TILE = 128  # cuBLAS's common output tile for large half/TF32 GEMMs (CUTLASS default 128×128)
# Achievable share of the datasheet bandwidth for streaming kernels: an assumption (copy kernels typically
# reach 80–90% of HBM peaks); device_check.sh measures it on a lent GPU.
BANDWIDTH_EFFICIENCY = 0.85
# Share of the datasheet matmul peak the best cuBLAS GEMM reaches (Bekman, "Machine Learning Engineering",
# compute/accelerator, "Maximum Achievable Matmul FLOPS comparison table", bf16, torch 2.5–2.7):
# A100 SXM 86.9%, A100 PCIe 81.1%, H100 SXM 80.3% ("H200 is the same"). Cards absent from the table take
# 0.80, stated as an assumption.
MAMF_FRACTION_ASSUMED = 0.80


@dataclass(frozen=True)
class GpuPreset:
    """A GPU from its datasheet: dense matmul FLOP/s per math mode (no 2:4 sparsity), memory bandwidth,
    SM count. `matmul_peaks` keys: fp32 (CUDA cores), tf32, bf16, fp16. `sources` cites every number."""

    name: str
    matmul_peaks: dict[str, float]
    bandwidth_bytes_per_s: float
    sm_count: int
    mamf_fraction: float
    sources: dict[str, str]
    host_s_per_op: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_HOST_S_PER_OP))
    host_s_per_view: float = DEFAULT_HOST_S_PER_VIEW
    source: str = "preset"
    overlaps_host: bool = True

    def with_host(self, host_s_per_op: Mapping[str, float], host_s_per_view: float) -> "GpuPreset":
        """The same GPU driven by a host whose per-op time was measured (this machine's probe)."""
        from dataclasses import replace
        return replace(self, host_s_per_op=dict(host_s_per_op), host_s_per_view=host_s_per_view)

    def wave_efficiency(self, batch: int, m: int, n: int) -> float:
        """Share of the SMs busy over a GEMM's waves of 128×128 output tiles (wave quantisation)."""
        tiles = batch * math.ceil(m / GEMM_TILE) * math.ceil(n / GEMM_TILE)
        waves = math.ceil(tiles / self.sm_count)
        return tiles / (waves * self.sm_count)

    def matmul_s(self, op: OpRecord, matmul_dtype: str) -> float:
        if matmul_dtype not in self.matmul_peaks:
            raise ValueError(f"{self.name} has no {matmul_dtype} matmul rate; use one of {', '.join(self.matmul_peaks)}")
        rate = self.matmul_peaks[matmul_dtype] * self.mamf_fraction
        if op.gemm is not None:
            batch, m, n, _ = op.gemm
            rate *= self.wave_efficiency(batch, m, n)
        compute_s = op.flops / rate
        memory_s = op.bytes / (self.bandwidth_bytes_per_s * BANDWIDTH_EFFICIENCY)
        return max(compute_s, memory_s, KERNEL_FLOOR_S)

    def memory_s(self, op: OpRecord) -> float:
        return max(op.bytes / (self.bandwidth_bytes_per_s * BANDWIDTH_EFFICIENCY), KERNEL_FLOOR_S)

    def host_s(self, op: OpRecord) -> float:
        if op.kind == "view":
            return self.host_s_per_view
        return self.host_s_per_op.get(op.phase, self.host_s_per_op["forward"]) + CUDA_LAUNCH_S

    def sync_s(self) -> float:
        return CUDA_SYNC_S

    def kernel_cpu_s(self, op: OpRecord, matmul_dtype: str) -> Optional[float]:
        return None  # a GPU's kernels are not the host's CPU time

    def host_cpu_s(self, op: OpRecord) -> Optional[float]:
        return None


def _nvidia(name: str, peaks: dict[str, float], bandwidth: float, sms: int, datasheet: str,
            mamf: Optional[tuple[float, str]] = None) -> GpuPreset:
    fraction, mamf_source = mamf or (MAMF_FRACTION_ASSUMED, "assumed 0.80 (not in the MAMF table)")
    return GpuPreset(name, peaks, bandwidth, sms, fraction,
                     {"peaks, bandwidth, SMs": datasheet, "achievable matmul fraction": mamf_source})


MAMF_TABLE = "Bekman, Machine Learning Engineering, MAMF comparison table (bf16)"
GPU_PRESETS: dict[str, GpuPreset] = {
    "h100-sxm": _nvidia("NVIDIA H100 SXM", {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12},
                        3.35e12, 132, "NVIDIA H100 Tensor Core GPU datasheet (SXM5)", (0.803, MAMF_TABLE)),
    "h100-pcie": _nvidia("NVIDIA H100 PCIe", {"fp32": 51.2e12, "tf32": 378e12, "bf16": 756e12, "fp16": 756e12},
                         2.0e12, 114, "NVIDIA H100 Tensor Core GPU datasheet (PCIe)"),
    "h200": _nvidia("NVIDIA H200 SXM", {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12},
                    4.8e12, 132, "NVIDIA H200 Tensor Core GPU datasheet (SXM)",
                    (0.803, MAMF_TABLE + ": H100 SXM 80.3%, 'H200 is the same'")),
    "a100-40gb": _nvidia("NVIDIA A100 40GB SXM", {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12},
                         1.555e12, 108, "NVIDIA A100 Tensor Core GPU datasheet (40GB SXM)", (0.869, MAMF_TABLE)),
    "a100-80gb": _nvidia("NVIDIA A100 80GB SXM", {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12},
                         2.039e12, 108, "NVIDIA A100 Tensor Core GPU datasheet (80GB SXM)", (0.869, MAMF_TABLE)),
    "a10g": _nvidia("NVIDIA A10G", {"fp32": 31.2e12, "tf32": 62.5e12, "bf16": 125e12, "fp16": 125e12},
                    600e9, 80, "NVIDIA A10 datasheet (AWS A10G: same GA102 configuration)"),
    "l4": _nvidia("NVIDIA L4", {"fp32": 30.3e12, "tf32": 60e12, "bf16": 121e12, "fp16": 121e12},
                  300e9, 58, "NVIDIA L4 Tensor Core GPU datasheet"),
    "t4": _nvidia("NVIDIA T4", {"fp32": 8.1e12, "fp16": 65e12}, 320e9, 40,
                  "NVIDIA T4 Tensor Core GPU datasheet (no bf16 or TF32)"),
    "rtx-4090": _nvidia("NVIDIA GeForce RTX 4090", {"fp32": 82.6e12, "tf32": 82.6e12, "bf16": 165.2e12,
                                                     "fp16": 165.2e12},
                        1.008e12, 128, "NVIDIA Ada Lovelace architecture whitepaper (RTX 4090, FP32 accumulate)"),
}


def apple_preset(name: str, flops: float, bandwidth: float, cores: int, source: str) -> GpuPreset:
    """Apple GPUs (MPS) run fp16/bf16 at their fp32 rate and have no TF32; their GPU cores stand for SMs."""
    return GpuPreset(name, {"fp32": flops, "bf16": flops, "fp16": flops}, bandwidth, cores,
                     MAMF_FRACTION_ASSUMED, {"peaks, bandwidth, cores": source,
                                             "achievable matmul fraction": "assumed 0.80"})


GPU_PRESETS.update({
    "apple-m1": apple_preset("Apple M1 (8-core GPU)", 2.6e12, 68.25e9, 8, "Apple M1 product page"),
    "apple-m1-max": apple_preset("Apple M1 Max (32-core GPU)", 10.4e12, 400e9, 32, "Apple M1 Max announcement"),
    "apple-m2": apple_preset("Apple M2 (10-core GPU)", 3.6e12, 100e9, 10, "Apple M2 announcement"),
    "apple-m2-max": apple_preset("Apple M2 Max (38-core GPU)", 13.6e12, 400e9, 38, "Apple M2 Max announcement"),
    "apple-m2-ultra": apple_preset("Apple M2 Ultra (76-core GPU)", 27.2e12, 800e9, 76,
                                   "Apple M2 Ultra announcement"),
})


def gpu_preset(name: str) -> GpuPreset:
    """A preset by key, or a ValueError listing the valid ones."""
    if name not in GPU_PRESETS:
        raise ValueError(f"unknown device {name!r}; valid devices: {', '.join(GPU_PRESETS)}")
    return GPU_PRESETS[name]


# Substrings of torch.cuda.get_device_name() -> preset, most specific first.
_PRESET_BY_DEVICE_NAME = (("H200", "h200"), ("H100 PCIe", "h100-pcie"), ("H100", "h100-sxm"),
                          ("A100-SXM4-80GB", "a100-80gb"), ("A100 80GB", "a100-80gb"), ("A100", "a100-40gb"),
                          ("A10G", "a10g"), ("L4", "l4"), ("T4", "t4"), ("RTX 4090", "rtx-4090"))


def preset_for_device_name(device_name: str) -> Optional[str]:
    """The preset of a CUDA device by the name torch reports ('NVIDIA H100 80GB HBM3' -> 'h100-sxm'), if any."""
    return next((preset for part, preset in _PRESET_BY_DEVICE_NAME if part in device_name), None)
