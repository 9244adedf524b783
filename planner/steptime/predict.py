"""Predicted step time: the traced ops priced on a device model, split by what bounds them (performance.md).

For each op of the trace: its kernel time (a matmul by its GEMM shape and dtype; a memory-bound op by the
bytes it moves) and the host time to dispatch it; host syncs add their latency.

- On a CPU the host computes what it dispatches: step = host time + kernel time + syncs.
- On a GPU the host queues kernels and runs ahead; the GPU is busy for the kernels' time. Between two syncs
  the slower of the two sets the pace, so step = max(host, kernels) + syncs × sync latency, with the ops
  taken as spread evenly between the syncs (the trace keeps counts, not order). The host time the kernels
  do not hide is reported as overhead.

On a CPU the step's CPU time (every thread) is predicted too: each kernel's time × the threads the probe saw
it keep busy, each dispatch × the phase's busy threads (`StepTime.cpu_s`).

`compiled=True` is the torch.compile what-if: elementwise (pointwise) ops are fused into their neighbours,
so their kernels, their intermediate traffic and their dispatch disappear; views cost nothing; the remaining
ops are dispatched at the backward's (C++, no Python) rate per op.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

from planner.steptime.devices import DTYPE_NAMES, DeviceModel
from planner.steptime.ops import OpRecord, StepTrace

TERMS = ("matmul", "memory-bound", "overhead", "sync")
_MATMUL_DTYPES = {name: key for key, name in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class StepTime:
    """One step's predicted seconds, split into what bounds it; `total_s` is their sum."""

    matmul_s: float
    memory_s: float
    overhead_s: float
    sync_s: float
    op_count: int
    sync_count: int
    device_name: str
    compiled: bool = False
    # The CPU time of the step, every thread (each kernel × the threads it keeps busy, the dispatch × the
    # phase's): what a benchmark's CPU-time ratio compares with. None on a GPU, for the compiled what-if, or
    # where a term's busy threads were not measured.
    cpu_s: Optional[float] = None

    @property
    def total_s(self) -> float:
        return self.matmul_s + self.memory_s + self.overhead_s + self.sync_s

    def split(self) -> dict[str, float]:
        """Seconds per term (TERMS), for tables and the 'where the time goes' chart."""
        return dict(zip(TERMS, (self.matmul_s, self.memory_s, self.overhead_s, self.sync_s)))

    @property
    def bound(self) -> str:
        """The term that takes the most time."""
        split = self.split()
        return max(split, key=split.get)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "StepTime":
        return cls(**values)

    def row(self, prefix: str = "predicted_") -> dict[str, Any]:
        return {
            f"{prefix}time_s": self.total_s,
            f"{prefix}matmul_s": self.matmul_s,
            f"{prefix}memory_bound_s": self.memory_s,
            f"{prefix}overhead_s": self.overhead_s,
            f"{prefix}sync_s": self.sync_s,
            f"{prefix}bound": self.bound,
            f"{prefix}op_count": self.op_count,
            f"{prefix}sync_count": self.sync_count,
            f"{prefix}cpu_s": self.cpu_s,
        }


def _matmul_dtype(op: OpRecord, tf32: bool) -> str:
    dtype = _MATMUL_DTYPES.get(op.dtype, "fp32")
    return "tf32" if dtype == "fp32" and tf32 else dtype


def _fused(op: OpRecord, compiled: bool) -> bool:
    return compiled and (op.pointwise or op.kind == "view")


def predict_step_time(trace: StepTrace, device: DeviceModel, *, compiled: bool = False,
                      tf32: bool = False) -> StepTime:
    """Price every op of `trace` on `device` (see the module docstring). `tf32` runs fp32 matmuls in TF32
    (what `torch.backends.cuda.matmul.allow_tf32 = True` and Chronos' training configs set)."""
    for_step = getattr(device, "for_step", None)  # this machine: whether the optimizer streams its operands
    device = for_step(trace) if for_step else device
    matmul_s = memory_s = host_s = 0.0
    cpu_s: Optional[float] = None if compiled or device.overlaps_host else 0.0
    for op, count in trace.ops:
        if _fused(op, compiled):
            continue
        kernel_cpu_s: Optional[float] = 0.0
        if op.kind in ("matmul", "memory", "sync", "collective"):
            if op.kind == "matmul":
                kernel_s = device.matmul_s(op, _matmul_dtype(op, tf32))
                matmul_s += count * kernel_s
            else:
                kernel_s = device.memory_s(op)
                memory_s += count * kernel_s
            if cpu_s is not None:
                kernel_cpu_s = device.kernel_cpu_s(op, kernel_s)
        if compiled:
            host_s += count * device.host_s(OpRecord(op.name, op.kind, "backward", op.dtype, 0, 0, 0))
        else:
            host_s += count * device.host_s(op)
        if cpu_s is not None:
            host_cpu_s = device.host_cpu_s(op)
            cpu_s = None if None in (kernel_cpu_s, host_cpu_s) else cpu_s + count * (kernel_cpu_s + host_cpu_s)
    syncs = trace.count("sync")
    overhead_s = max(0.0, host_s - (matmul_s + memory_s)) if device.overlaps_host else host_s
    return StepTime(matmul_s, memory_s, overhead_s, syncs * device.sync_s(), trace.op_count, syncs, device.name,
                    compiled, cpu_s)
