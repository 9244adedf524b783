"""What a device does per op: GEMM time by shape and dtype, memory-bound time by bytes, per-op host overhead,
host-sync latency (performance.md, "What the model contains"). This module: the interface every device model
offers (`DeviceModel`) and how an op is classed for it.

Two kinds of device model, one interface:

- `measured.MeasuredDevice`: this machine, from `probe.probe_device` (cached with its date by `device_cache`);
- `gpu_presets.GpuPreset`: a GPU one does not have, from its datasheet and published measurements.

Torch-free: presets and cached probes predict without loading torch.
"""

from __future__ import annotations

from typing import Optional, Protocol

from planner.steptime.ops import OpRecord

# Memory-bound ops fall into classes whose CPU kernels run at very different speeds per byte; the probe
# times one representative of each. Everything not named here is "elementwise" (binary ops, copies, cat,
# masks, gathers), or "strided" when it reads an input across its layout (OpRecord.inner_stride > 1).
# "short_loop" prices the loops of an elementwise kernel (OpRecord.inner_run) beyond its bytes.
MEMORY_CLASSES = ("elementwise", "strided", "short_loop", "random", "sampling", "selection", "softmax",
                  "softmax_backward", "transcendental", "reduction")
# The stride, in elements, at which the "strided" class is probed (the position bias of a model with 8 heads);
# other strides scale its extra time over the contiguous op by the cache lines they waste (MeasuredDevice).
STRIDED_PROBE_STRIDE = 8
# The innermost loop, in elements, of the "short_loop" probe (an add of a tensor's rows and a column of it,
# as T5's heads-innermost position bias plus its mask runs in debug and tiny); other loops scale its extra time
# over the contiguous op by how many loops they run (MeasuredDevice).
SHORT_LOOP_PROBE_RUN = 4
CACHE_LINE_BYTES = 64
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
    named = _CLASS_OF_OP.get(op_base_name(op), "elementwise")
    return "strided" if named == "elementwise" and op.inner_stride > 1 else named


def in_elementwise_class(base_name: str) -> bool:
    """Whether an op of this name ('add_', '_softmax') is priced as elementwise (or strided) when memory-bound."""
    return base_name not in _CLASS_OF_OP


def element_bytes(op: OpRecord) -> int:
    """Bytes of one element of `op`'s dtype (4 where the dtype names no width)."""
    width = next((int(digits) for digits in ("64", "32", "16", "8") if op.dtype.endswith(digits)), 32)
    return max(width // 8, 1)


def cache_line_elements(op: OpRecord) -> int:
    """Elements of `op`'s dtype in a cache line."""
    return max(CACHE_LINE_BYTES // element_bytes(op), 1)


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
    # CPU seconds, every thread, of an op's kernel (which takes `kernel_s`) and of its dispatch; None where the device has no
    # measured thread occupancy (a GPU; a GEMM shape not timed exactly).
    def kernel_cpu_s(self, op: OpRecord, kernel_s: float) -> Optional[float]: ...
    def host_cpu_s(self, op: OpRecord) -> Optional[float]: ...
