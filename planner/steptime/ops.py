"""A traced step as plain data: the ops it dispatches, merged by what they are, with counts.

Torch-free, so predictions can read a cached trace without loading torch. `trace.trace_step` makes them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Mapping, Optional

KINDS = ("matmul", "memory", "view", "sync", "collective")
PHASES = ("forward", "backward", "optimizer", "forecast")


def first_phase(mode: str) -> str:
    """The phase a step of `mode` (forward, train, forecast) dispatches its first ops in: a forecast's own, the
    forward's otherwise (a training step's backward and optimizer follow)."""
    return "forecast" if mode == "forecast" else "forward"


@dataclass(frozen=True)
class OpRecord:
    """One op as the device sees it. `gemm` is (batch, m, n, k) for the products whose shape is known."""

    name: str  # the ATen overload, e.g. "aten.addmm.default" ("Tensor.tolist" for a host read)
    kind: str  # one of KINDS
    phase: str  # one of PHASES
    dtype: str  # of the output, e.g. "float32"
    flops: int  # FlopCounterMode's formula; 0 unless a matmul
    bytes_read: int
    bytes_written: int
    gemm: Optional[tuple[int, int, int, int]] = None
    pointwise: bool = False  # elementwise (PyTorch's pointwise tag): what a compiler fuses into its neighbours
    index_rows: int = 0  # index ops: the rows their indices address (a scatter-add's cost grows with them)
    # Bytes of new pages the op touched first (page faults × 4 KiB), counted when it was recorded in a real
    # step; None when traced by shape, where the device's rule (outputs above the mmap threshold) stands in.
    fresh_bytes: Optional[int] = None
    # Optimizer ops: bytes of the inputs no earlier op of the step's optimizer phase touched. An AdamW step meets
    # each parameter, gradient and moment first in one op (streamed from memory when the states exceed the
    # cache) and then again, in the cache, in the next few ops on the same parameter.
    first_touch_bytes: int = 0
    # Memory-bound ops: the largest stride, in elements, at which an input is read along the dimension the
    # output is written contiguously in; 1 when every input is walked contiguously there (or broadcast). T5's
    # position bias, laid out heads innermost, is read at a stride of the head count when added to the scores.
    inner_stride: int = 1
    # Memory-bound ops: the elements of the kernel's innermost loop, the output's contiguous dimensions that
    # every operand walks in step, merged as TensorIterator merges them (0: not recorded). T5's position bias
    # plus its mask comes out heads innermost, a loop of 4 elements in debug and tiny: per element, a loop's
    # overhead then costs more than the bytes.
    inner_run: int = 0

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written


@dataclass(frozen=True)
class StepTrace:
    """The ops of one step, each distinct op once with the number of times it ran."""

    ops: tuple[tuple[OpRecord, int], ...]

    @classmethod
    def from_counter(cls, counts: Mapping[OpRecord, int]) -> "StepTrace":
        return cls(tuple(sorted(counts.items(), key=lambda item: (item[0].phase, item[0].name, -item[1]))))

    @property
    def flops(self) -> int:
        return sum(op.flops * count for op, count in self.ops)

    @property
    def op_count(self) -> int:
        return sum(count for _, count in self.ops)

    def count(self, kind: Optional[str] = None, phase: Optional[str] = None) -> int:
        """Ops of `kind` (any kind when None) in `phase` (any phase when None)."""
        return sum(count for op, count in self.ops
                   if (kind is None or op.kind == kind) and (phase is None or op.phase == phase))

    @property
    def fresh_bytes(self) -> Optional[int]:
        """New pages the step touched first, as counted when it was recorded; None when traced by shape."""
        counted = [(op.fresh_bytes, count) for op, count in self.ops if op.fresh_bytes is not None]
        return sum(fresh * count for fresh, count in counted) if counted else None

    def with_fresh_bytes(self, total: int) -> "StepTrace":
        """This recorded step with `total` bytes of new pages in place of those it counted, each op's share as
        counted (where it counted none, by the bytes each computing op writes). How many pages glibc gives back
        to the system and maps again varies from step to step (a small token_ffn training step at batch 1 faulted
        0 to 945 MiB on consecutive steps), so one recorded step is one draw; a benchmark passes its timed
        steps' median. A trace traced by shape is returned as it is."""
        counted = self.fresh_bytes
        if counted is None:
            return self
        if counted > 0:
            share = {op: op.fresh_bytes / counted for op, _ in self.ops if op.fresh_bytes is not None}
        else:
            written = sum(op.bytes_written * count for op, count in self.ops
                          if op.fresh_bytes is not None and op.kind in ("matmul", "memory"))
            share = {op: op.bytes_written / written if op.kind in ("matmul", "memory") else 0.0
                     for op, _ in self.ops if op.fresh_bytes is not None} if written else {}
        return StepTrace(tuple((replace(op, fresh_bytes=round(total * share[op])) if op in share else op, count)
                               for op, count in self.ops))

    def names(self) -> Counter:
        """How often each ATen op ran."""
        counts: Counter = Counter()
        for op, count in self.ops:
            counts[op.name] += count
        return counts

    def to_dict(self) -> dict[str, Any]:
        fields = ("name", "kind", "phase", "dtype", "flops", "bytes_read", "bytes_written", "gemm", "pointwise", "index_rows",
                  "fresh_bytes", "first_touch_bytes", "inner_stride", "inner_run")
        return {"fields": [*fields, "count"],
                "ops": [[getattr(op, f) for f in fields] + [count] for op, count in self.ops]}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "StepTrace":
        """Inverse of to_dict; raises ValueError for anything else (a damaged cache file)."""
        try:
            ops = []
            for *fields, count in values["ops"]:
                if len(fields) == 10:  # a trace saved before fresh pages were counted
                    fields = [*fields, None]
                if len(fields) == 11:  # ... or before first touches were
                    fields = [*fields, 0]
                if len(fields) == 12:  # ... or before inner strides were
                    fields = [*fields, 1]
                if len(fields) == 13:  # ... or before inner loops were
                    fields = [*fields, 0]
                name, kind, phase, dtype, flops, read, written, gemm, pointwise, index_rows, fresh, first, stride, run \
                    = fields
                if kind not in KINDS or phase not in PHASES or not isinstance(count, int) or count < 1:
                    raise ValueError(f"bad op record {str(fields)[:200]}")
                if min(int(flops), int(read), int(written), int(index_rows), int(fresh or 0), int(first)) < 0:
                    raise ValueError(f"negative FLOPs or bytes in {str(fields)[:200]}")
                if int(first) > int(read):
                    raise ValueError(f"first-touch bytes above the bytes read in {str(fields)[:200]}")
                if int(stride) < 1:
                    raise ValueError(f"an inner stride below 1 in {str(fields)[:200]}")
                if int(run) < 0:
                    raise ValueError(f"a negative inner loop in {str(fields)[:200]}")
                ops.append((OpRecord(str(name), kind, phase, str(dtype), int(flops), int(read), int(written),
                                     tuple(int(v) for v in gemm) if gemm is not None else None, bool(pointwise),
                                     int(index_rows), int(fresh) if fresh is not None else None, int(first),
                                     int(stride), int(run)),
                            count))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"not a step trace: {error}") from None
        return cls(tuple(ops))
