"""The distributed training benchmark: N local ranks on torch.distributed itself, per rank beside the planner.

    from planner.bench import BenchSpec
    from planner.bench.distributed import DistributedSpec, run_distributed

    spec = DistributedSpec(BenchSpec(size="debug", mode="train", batch_size=2), strategy="zero3", ranks=2)
    result = run_distributed(spec)        # -> DistributedResult, never raises for what happens in the run
    result.status, result.message, result.rows, result.summary

Strategies: data_parallel (DDP), zero2 / zero3 (FSDP2 `fully_shard`, reshard_after_forward False / True),
expert_parallel (model.expert_parallel: make_expert_parallel + average_gradients). AdamW, fp32. One launcher
subprocess (planner.bench.distributed_worker) spawns the ranks: gloo on CPU, nccl with one GPU per rank. It
runs like every benchmark (planner.bench.runner): one at a time (the benchmark lock), its own process group
killed whole at the time limit or on cancel, every rank dying with the launcher, a rank's error ending the
run with its message.

Per rank: parameter, gradient and optimizer-state bytes from the local tensors' storages, the peak memory
above the rank's baseline, step times, and the collectives of one steady-state step (counts from
CommDebugMode, bytes from the tensors each collective is passed), each beside planner.parallel.plan_devices
for that rank (`rank=r`: FSDP2's padded shards, the rank's own rows of the moments, its experts) and
planner.communication.step_collectives. `states_exact`: all three measured values equal the rank's plan;
`<kind>_exact`: the count and the bytes of that kind of collective equal the planner's (all_to_all: the
count on the rank, the bytes summed over the ranks, since what a rank routes depends on its batch);
`collectives_exact`: every kind. The predicted peak is `DevicePlan.peak_bytes` for the run's backend (the model
states, activations, DDP's buckets, the larger of the loss's logits with its two B·T·V backward gradients and
the expert exchange's V-wide temporaries, and on gloo FSDP2's Python-side state); for expert parallel at the
routing load of the step that set the rank's peak (each step's peak is measured).
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from planner.bench.lock import BenchLock, cancel_requested, clear_cancel_request
from planner.bench.runner import BenchProgress, _crash_message, run_guarded
from planner.bench.spec import BenchSpec
from planner.communication import step_collectives
from planner.parallel import plan_devices
from planner.params import count_params
from planner.units import GIB

STRATEGIES = ("data_parallel", "zero2", "zero3", "expert_parallel")
COLLECTIVE_KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")
RANKS_PER_CORE = 2  # at most twice the cores: more ranks only time-share them
# A rank's own resident memory beside the planner's bytes: the interpreter, torch, gloo and the model code
# (measured: about 440 MiB per rank on torch 2.13 CPU). The memory preflight adds it per rank.
RANK_PROCESS_BYTES = 512 * 2**20
MEMORY_FRACTION = 0.8


@dataclass(frozen=True)
class DistributedSpec:
    """One distributed run: the variant, workload (per-rank batch) and limits of `bench`, on `ranks` ranks."""

    bench: BenchSpec
    strategy: str
    ranks: int
    device: str = "cpu"  # resolved: "cpu" (gloo) or "cuda" (nccl, one GPU per rank)

    @property
    def label(self) -> str:
        return f"{self.bench.size} {self.bench.model_config().describe()} {self.strategy} ×{self.ranks}"

    def to_dict(self) -> dict[str, Any]:
        return {"bench": self.bench.to_dict(), "strategy": self.strategy, "ranks": self.ranks, "device": self.device}


@dataclass
class DistributedResult:
    spec: DistributedSpec
    status: str  # ok, refused, timeout, cancelled, error
    message: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    traceback: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def summary(self) -> str:
        return summary_line(self)


# --- checks before anything runs ----------------------------------------------------------------------------

def resolve_distributed_device(requested: str) -> str:
    """cpu (gloo) or cuda (nccl); mps has no distributed backend here."""
    if requested == "mps":
        raise ValueError("argument --device: the distributed benchmark runs on cpu (gloo) or cuda (nccl), not mps")
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("argument --device: cuda was asked for but no CUDA device is present")
    return "cuda" if requested in ("auto", "cuda") and torch.cuda.is_available() else "cpu"


def backend_of(spec: DistributedSpec) -> str:
    return "gloo" if spec.device == "cpu" else "nccl"


def predicted_rank_bytes(spec: DistributedSpec) -> int:
    """The planner's per-device peak (model states, activations, DDP's buckets, the loss's backward
    temporaries, on gloo FSDP2's host-side state) for this run, on rank 0."""
    bench = spec.bench
    return plan_devices(bench.model_config(), bench.workload(), spec.strategy, spec.ranks,
                        device="cpu" if spec.device == "cpu" else "cuda", backend=backend_of(spec)).peak_bytes


def check_distributed(spec: DistributedSpec, *, cores: Optional[int] = None, available_bytes: Optional[int] = None,
                      gpus: Optional[int] = None) -> None:
    """ValueError, one line naming the flag, for a run that cannot or should not start (the preflight)."""
    bench = spec.bench
    if spec.strategy not in STRATEGIES:
        raise ValueError(f"argument --strategy: must be one of {', '.join(STRATEGIES)}, got {spec.strategy!r}")
    if isinstance(spec.ranks, bool) or not isinstance(spec.ranks, int) or spec.ranks < 2:
        raise ValueError(f"argument --ranks: --strategy needs --ranks N with N ≥ 2 (one rank is the single-process "
                         f"benchmark), got {spec.ranks!r}")
    if bench.mode != "train":
        raise ValueError("argument --modes: --strategy runs training steps; use --modes train")
    if bench.dtype != "fp32":
        raise ValueError(f"argument --dtype: the distributed benchmark trains in fp32, got {bench.dtype}")
    config = bench.model_config()
    if spec.strategy == "expert_parallel":
        if not config.is_moe:
            raise ValueError("argument --strategy: expert_parallel needs experts; a dense model (--experts 0) "
                             "has none: give --experts without 0")
        if config.dispatch != "sparse":
            raise ValueError("argument --dispatch: expert_parallel runs sparse dispatch only")
        if config.expert_capacity is not None:
            raise ValueError("argument --expert-capacity: expert_parallel does not support an expert capacity")
    if spec.device == "cuda":
        if gpus is None:
            import torch

            gpus = torch.cuda.device_count()
        if spec.ranks > gpus:
            raise ValueError(f"argument --ranks: {spec.ranks} ranks need {spec.ranks} GPUs (one each); "
                             f"this machine has {gpus}")
    else:
        cores = cores if cores is not None else (os.cpu_count() or 1)
        if spec.ranks > RANKS_PER_CORE * cores:
            raise ValueError(f"argument --ranks: {spec.ranks} ranks is more than {RANKS_PER_CORE} per core on this "
                             f"machine's {cores} cores (at most {RANKS_PER_CORE * cores})")
        if available_bytes is None:
            import psutil

            available_bytes = psutil.virtual_memory().available
        per_rank = predicted_rank_bytes(spec) + RANK_PROCESS_BYTES
        needed, limit = spec.ranks * per_rank, MEMORY_FRACTION * available_bytes
        if needed > limit:
            fitting = int(limit // per_rank)
            raise ValueError(
                f"argument --ranks: {spec.ranks} ranks of {spec.label} need a predicted {needed / GIB:.2f} GiB "
                f"({per_rank / GIB:.2f} GiB each: the plan plus {RANK_PROCESS_BYTES / GIB:.2f} GiB per process), "
                f"more than {MEMORY_FRACTION:.0%} of the {available_bytes / GIB:.2f} GiB available; "
                + (f"at most {fitting} fit" if fitting >= 2 else "not even 2 fit: a smaller size or batch"))


def distributed_specs(specs: list[BenchSpec], strategy: Optional[str], ranks: Optional[int]) -> list[DistributedSpec]:
    """The CLI's grid as distributed runs, every one checked (ValueError naming the flag)."""
    if strategy is None:
        raise ValueError("argument --ranks: --ranks needs --strategy (data_parallel, zero2, zero3 or expert_parallel)")
    if ranks is None:
        raise ValueError("argument --ranks: --strategy needs --ranks N with N ≥ 2")
    if not specs:
        raise ValueError("argument --modes: --strategy runs training steps; use --modes train")
    device = resolve_distributed_device(specs[0].device)
    runs = [DistributedSpec(spec, strategy, ranks, device) for spec in specs]
    for run in runs:
        check_distributed(run)
    return runs


# --- the run -------------------------------------------------------------------------------------------------

def _run_launcher(spec: DistributedSpec, progress, cancel_event, lock_fd: int, deadline: float):
    """The launcher (planner.bench.distributed_worker) in its own session: killing its process group at the time
    limit or on cancel ends every rank with it."""
    return run_guarded("planner.bench.distributed_worker", spec.to_dict(), progress, cancel_event, lock_fd, deadline)


def run_distributed(spec: DistributedSpec, progress: Optional[Callable[[BenchProgress], None]] = None,
                    cancel_event: Optional[threading.Event] = None) -> DistributedResult:
    """Run `spec` (after any other benchmark), within its time limit; never raises for what happens in it."""
    report = progress or (lambda update: None)
    try:
        check_distributed(spec)
    except ValueError as error:
        return DistributedResult(spec, "refused", str(error))
    limit = spec.bench.time_limit_s
    deadline = time.monotonic() + limit
    with BenchLock(spec.label, cancel_event, None, max_wait_s=limit) as lock:
        if lock.timed_out:
            return DistributedResult(spec, "timeout", f"waited its time limit of {limit:g} s for another benchmark")
        if not lock.acquired:
            return DistributedResult(spec, "cancelled", "cancelled while waiting for another benchmark")
        clear_cancel_request()
        report(BenchProgress("starting"))
        start = time.monotonic()
        outcome, final, stderr_tail = _run_launcher(spec, report, cancel_event, lock.fileno(), deadline)
        wall = time.monotonic() - start
        report(BenchProgress("done"))
    if outcome == "timeout":
        return DistributedResult(spec, "timeout", f"killed at its time limit of {limit:g} s (every rank)", wall_s=wall)
    if outcome == "cancelled" or cancel_requested():
        return DistributedResult(spec, "cancelled", "cancelled by request; every rank was killed", wall_s=wall)
    if outcome != "measured":
        message = final.get("message") or _crash_message(final.get("returncode"), stderr_tail)
        return DistributedResult(spec, "error", message, wall_s=wall, traceback=final.get("traceback", stderr_tail))
    return DistributedResult(spec, "ok", rows=rank_rows(spec, final["ranks"]), wall_s=wall)


# --- rows: measured beside predicted ---------------------------------------------------------------------------

def predicted_collectives(spec: DistributedSpec) -> dict[str, dict[str, int]]:
    """step_collectives per kind: {kind: {"count": calls, "bytes": buffer bytes}} for one step (one micro-step)."""
    bench = spec.bench
    totals: dict[str, dict[str, int]] = {}
    for collective in step_collectives(bench.model_config(), bench.workload(), spec.strategy, spec.ranks,
                                       bench.workload().precision):
        entry = totals.setdefault(collective.kind, {"count": 0, "bytes": 0})
        entry["count"] += collective.calls
        entry["bytes"] += collective.buffer_bytes
    return totals


def rank_rows(spec: DistributedSpec, ranks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    bench = spec.bench
    config, workload = bench.model_config(), bench.workload()
    device = "cpu" if spec.device == "cpu" else "cuda"
    predicted = predicted_collectives(spec)
    total_params = count_params(config).total_params
    routed_sum = sum(measured["collective_bytes"].get("all_to_all", 0) for measured in ranks)
    routed_exact = routed_sum == spec.ranks * predicted.get("all_to_all", {}).get("bytes", 0)
    rows = []
    backend = backend_of(spec)
    for measured in ranks:
        balanced = plan_devices(config, workload, spec.strategy, spec.ranks, device=device, rank=measured["rank"],
                                backend=backend)
        # Expert parallel: the rank's peak at the load its experts measurably received in the step that set the
        # peak (slots received over the slots its own batch sent, the balanced figure), beside the balanced
        # prediction.
        received, sent = measured.get("expert_slots_received"), measured.get("expert_slots_sent")
        load = received / sent if received is not None and sent else None
        plan = balanced if load is None else plan_devices(config, workload, spec.strategy, spec.ranks, device=device,
                                                          rank=measured["rank"], expert_load_factor=load,
                                                          backend=backend)
        values = {"param": measured["param_bytes"], "grad": measured["grad_bytes"],
                  "optimizer": measured["optimizer_bytes"]}
        planned = {"param": plan.weights_bytes, "grad": plan.gradients_bytes, "optimizer": plan.optimizer_states_bytes}
        counts, sizes = measured["collective_counts"], measured["collective_bytes"]
        times = measured["times_s"]
        row: dict[str, Any] = {
            "label": spec.label, "size": bench.size, "variant": config.describe(), "strategy": spec.strategy,
            "ranks": spec.ranks, "rank": measured["rank"], "device": measured["device"],
            "batch_size": bench.batch_size, "context_length": bench.context_length,
            "prediction_length": bench.prediction_length, "trainable": bench.trainable, "status": "ok",
            "measured_param_bytes": values["param"], "predicted_param_bytes": planned["param"],
            "measured_grad_bytes": values["grad"], "predicted_grad_bytes": planned["grad"],
            "measured_optimizer_bytes": values["optimizer"], "predicted_optimizer_bytes": planned["optimizer"],
            "states_exact": values == planned,
            # FSDP2's dim-0 padding on this rank's shard: elements beyond ceil(P/n), now inside the plan
            "padding_params": measured["padded_numel"] - -(-total_params // spec.ranks)
            if spec.strategy in ("zero2", "zero3") else 0,
            "peak_memory_bytes": measured["peak_memory_bytes"], "predicted_peak_bytes": plan.peak_bytes,
            "memory_ratio": measured["peak_memory_bytes"] / plan.peak_bytes if plan.peak_bytes else None,
            "predicted_peak_bytes_balanced": balanced.peak_bytes,
            "expert_slots_received": received, "expert_slots_sent": sent, "expert_load_factor": load,
            "expert_slots_received_steps": ",".join(map(str, measured.get("expert_slots_received_steps", []))) or None,
            "peak_memory_bytes_steps": ",".join(map(str, measured.get("step_peak_bytes") or [])) or None,
            "peak_step": measured.get("peak_step"),
            "step_time_s": statistics.median(times) if times else None,
            "collective_bytes": sum(sizes.values()),
            "predicted_collective_bytes": sum(entry["bytes"] for entry in predicted.values()),
        }
        exact = []
        for kind in COLLECTIVE_KINDS:
            expected = predicted.get(kind, {"count": 0, "bytes": 0})
            row[f"{kind}_count"] = counts.get(kind, 0)
            row[f"predicted_{kind}_count"] = expected["count"]
            row[f"{kind}_bytes"] = sizes.get(kind, 0)
            row[f"predicted_{kind}_bytes"] = expected["bytes"]
            bytes_exact = routed_exact if kind == "all_to_all" else sizes.get(kind, 0) == expected["bytes"]
            row[f"{kind}_exact"] = counts.get(kind, 0) == expected["count"] and bytes_exact
            exact.append(row[f"{kind}_exact"])
        row["collectives_exact"] = all(exact)
        row["held_experts"] = ",".join(map(str, measured.get("held_experts", []))) or None
        row["comm_debug_counts"] = ";".join(f"{op}={count}" for op, count in sorted(measured["comm_debug_counts"].items()))
        row["memory_method"] = measured["memory_method"]
        row["file_backed_growth_bytes"] = measured.get("file_backed_growth_bytes")
        row["loss"] = measured["losses"][-1] if measured["losses"] else None
        rows.append(row)
    return rows


def summary_line(result: DistributedResult) -> str:
    spec = result.spec
    if not result.ok:
        return f"{spec.label}: {result.status}: {result.message}"
    rows = result.rows
    exact = sum(row["states_exact"] for row in rows)
    collectives = sum(row["collectives_exact"] for row in rows)
    ratios = [row["memory_ratio"] for row in rows if row["memory_ratio"] is not None]
    step = statistics.median(row["step_time_s"] for row in rows if row["step_time_s"] is not None)
    measured = sum(row["collective_bytes"] for row in rows) / len(rows)
    return (f"{spec.label}: model states exact on {exact}/{len(rows)} ranks, collectives on {collectives}/{len(rows)}; "
            f"peak memory / predicted "
            f"{min(ratios):.2f}–{max(ratios):.2f}; step {step * 1000:.1f} ms (median); collectives "
            f"{measured:,.0f} B per rank per step measured, {rows[0]['predicted_collective_bytes']:,} B predicted; "
            f"{result.wall_s:.1f} s")


def error_row(result: DistributedResult) -> dict[str, Any]:
    return {"label": result.spec.label, "strategy": result.spec.strategy, "ranks": result.spec.ranks,
            "status": result.status, "message": result.message}
