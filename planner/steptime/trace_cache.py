"""Traces cached on disk per variant, workload, mode and dtype, so a prediction traces each step once.

The key holds everything the ops depend on: the model config, the workload, the mode, the dtype, the
versions of torch and transformers and the source of this project's model and tracer (their code paths are
what is traced: a change to either traces again). A damaged or foreign file is traced again and replaced,
never used.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Optional

from model.config import ChronosMoEConfig
from planner.bench.cache import cache_dir
from planner.steptime.ops import StepTrace
from planner.units import GIB
from planner.workload import Workload

# Bump when what a trace records changes (3: large outputs made, saved tensors as shapes; 4: first touches;
# 5: inner strides; 6: inner loops).
TRACE_FORMAT = 6


_CODE_TRACED = (Path(__file__).resolve().parents[2] / "model", Path(__file__).resolve().with_name("trace.py"),
                Path(__file__).resolve().with_name("layouts.py"))


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """A digest of the model code and the tracer: the code a trace records runs through."""
    digest = hashlib.sha256()
    for root in _CODE_TRACED:
        for path in sorted(root.rglob("*.py")) if root.is_dir() else [root]:
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def trace_key(config: ChronosMoEConfig, workload: Workload, mode: str, dtype: str, foreach_optimizer: bool) -> str:
    versions = {name: metadata.version(name) for name in ("torch", "transformers")}
    versions["code"] = _code_digest()
    identity = {"format": TRACE_FORMAT, "config": dataclasses.asdict(config), "mode": mode, "dtype": dtype,
                "foreach_optimizer": foreach_optimizer,
                "workload": {field: getattr(workload, field) for field in
                             ("batch_size", "context_length", "prediction_length", "num_samples", "trainable")},
                "versions": versions}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _trace_file(key: str) -> Path:
    folder = cache_dir() / "traces"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{key}.json"


def _load(path: Path) -> Optional[StepTrace]:
    try:
        return StepTrace.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError):  # absent, unreadable or damaged: trace again
        return None


def largest_tensor_bytes(config: ChronosMoEConfig, workload: Workload) -> int:
    """The largest tensor a step makes, in fp32: the encoder's attention scores (B·H·S²), its FFN's hidden
    activations (B·S·d_ff) or the decoder's logits (B·T·V), whichever is largest."""
    dims, batch = config.dims, workload.batch_size
    positions, targets = workload.context_length + 1, workload.prediction_length + 1
    return 4 * batch * max(dims.num_heads * positions**2, positions * dims.d_ff, targets * dims.vocab_size)


def check_traceable(config: ChronosMoEConfig, workload: Workload) -> None:
    """ValueError naming the workload's fields when one tensor of the step is larger than this machine's
    memory: tracing makes each output (its pages untouched), and no allocator maps more than there is."""
    import psutil

    largest, total = largest_tensor_bytes(config, workload), psutil.virtual_memory().total
    if largest > total:
        raise ValueError(f"this step is too large to time: one of its tensors would hold {largest / GIB:,.0f} GiB, "
                         f"more than this machine's {total / GIB:,.0f} GiB, so its ops cannot be traced; lower the "
                         f"batch per device or the context length")


def load_or_trace(config: ChronosMoEConfig, workload: Workload, mode: str, dtype: str = "fp32",
                  foreach_optimizer: bool = False) -> StepTrace:
    """The cached trace of one step, or a new one (traced by shape-only execution, then saved); ValueError
    for a step too large to trace here (check_traceable)."""
    try:
        path = _trace_file(trace_key(config, workload, mode, dtype, foreach_optimizer))
    except OSError:  # no cache folder can be made: trace every time
        path = None
    trace = _load(path) if path else None
    if trace is not None:
        return trace
    check_traceable(config, workload)
    from planner.steptime.trace import trace_step  # torch loads only when a trace must be made

    trace = trace_step(config, workload, mode, dtype, foreach_optimizer=foreach_optimizer)
    if path is None:
        return trace
    try:
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(trace.to_dict()))
        temporary.replace(path)  # atomically: another process may be reading it
    except OSError:
        pass  # an unwritable cache costs a retrace next time, nothing else
    return trace
