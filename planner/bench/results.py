"""BenchResult: one run's measurements beside the planner's predictions, as rows and as CSV/JSON exports.

A result exists for every request, whatever happened: `status` is "ok", or "refused" (preflight, an absent
device, an unsupported dtype), "timeout" (killed at its time limit), "cancelled" or "error"; `message` says
why. Measured fields are None unless the run finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from planner.bench.spec import BenchSpec
from planner.bench.timing import TimingSummary
from planner.export import export_metadata, render
from planner.steptime.predict import StepTime

PREDICTION_KEYS = tuple(StepTime(0, 0, 0, 0, 0, 0, "").row())
EXPORT_FORMATS = ("csv", "json")
MEASUREMENT_NOTES = {
    "timing": "median, p95 and minimum of the repeats after warm-up, each between device synchronisations; "
    "cpu_median_s: process CPU time (all threads) of the median step, at the threads busy over all repeats, "
    "which other processes sharing the cores inflate less; "
    "cpu_time_ratio: cpu_median_s / predicted_cpu_s (each op's time x the threads it keeps busy, probed)",
    "memory": "peak over the warm-up steps, above the fresh subprocess's baseline",
    "attention": "eager (the only implementation T5 has)",
    "flops_source": "planner (analytic, per step); achieved FLOP/s = planner FLOPs / median time",
    "tokens": "forward/train: B x (context + 1 + prediction + 1) positions; forecast: B x N x prediction sampled",
    "predicted_time": "op-level model: every ATen op the step dispatches (traced by shape-only execution), each "
    "priced by this device's probed GEMM rate for its shape, memory-bound time for its bytes and class, and host "
    "time per dispatched op; split into matmul, memory-bound, overhead and sync (planner.steptime)",
    "parallel_speedup": "CPU: a reference GEMM on every thread ÷ on one thread, just before the timed steps, beside "
    "the same when the device was probed; a virtual machine whose host shares its cores changes it, and every "
    "multi-threaded step with it (planner.steptime.host_state)",
    "host_s_per_op": "CPU: the host's time per dispatched op (the forward's, or the forecast's in a forecast), "
    "timed again after the run on the probe's own calibration steps and used in its prediction, beside the "
    "probe's: it moves with the state of the machine and the process, as the step's exact GEMM timings do, "
    "which are timed again too (planner.steptime.probe.remeasure_state); beyond a fifth or five times the probe's "
    "the machine is busy, and the prediction keeps the probe's (the notes say so)",
    "gemm_state_ratio": "CPU: a reference GEMM on every thread, timed after each timed step, its median ÷ its "
    "median timed beside the prediction's own timings (the step's exact GEMM shapes, the host): above 1, the "
    "machine ran GEMMs slower during the steps than when they were priced (planner.steptime.host_state)",
    "predicted_memory": "planner.memory (train: training step, gradients and moments for the trained parameters; "
    "forecast: forecast; forward: one-path forecast)",
}


@dataclass(frozen=True)
class BenchResult:
    spec: BenchSpec
    status: str
    message: str = ""
    wall_s: float = 0.0  # the whole subprocess: start-up, build, warm-up, repeats, prediction
    flops: int = 0  # the planner's FLOPs of one step
    device: Optional[str] = None
    device_name: Optional[str] = None
    threads: Optional[int] = None
    versions: dict[str, str] = field(default_factory=dict)
    timing: Optional[TimingSummary] = None
    peak_memory_bytes: Optional[int] = None
    memory_method: Optional[str] = None
    available_memory_bytes: Optional[int] = None
    predicted_peak_bytes: Optional[int] = None
    trained_params: Optional[int] = None  # train mode: parameters AdamW holds moments for (routed experts only)
    predicted: Optional[StepTime] = None
    device_model: Optional[dict[str, str]] = None  # name, source (probe / preset), measured_on
    notes: tuple[str, ...] = ()  # what the user should know about the prediction (a refused cache, ...)
    parallel_speedup: Optional[float] = None  # CPU: the threads' speedup before the timed steps (host_state)
    probe_parallel_speedup: Optional[float] = None  # ... and when the device model was probed
    host_s_per_op: Optional[float] = None  # CPU: the host's time per dispatched op, re-timed at this run
    probe_host_s_per_op: Optional[float] = None  # ... and when the device model was probed
    gemm_state_ratio: Optional[float] = None  # CPU: a reference GEMM during the timed steps ÷ at the prediction
    usage_counts: Optional[tuple[int, ...]] = None  # routing slots per expert, summed over MoE layers
    usage_entropy_nats: Optional[float] = None
    balance_loss: Optional[float] = None  # summed over MoE layers, as the training loss adds it
    moe_layers: Optional[int] = None
    loss: Optional[float] = None
    traceback: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def predicted_time_s(self) -> Optional[float]:
        return self.predicted.total_s if self.predicted else None

    @property
    def time_ratio(self) -> Optional[float]:
        """Measured median time / predicted time."""
        if self.timing is None or not self.predicted_time_s:
            return None
        return self.timing.median_s / self.predicted_time_s

    @property
    def cpu_time_ratio(self) -> Optional[float]:
        """On CPU: median CPU time (every thread) ÷ predicted CPU time (each op's time × the threads it keeps
        busy, as the probe measured them). Neighbours sharing the cores inflate CPU time less than wall time.
        None on a GPU, or where the prediction has no CPU time."""
        if self.timing is None or self.predicted is None or not self.predicted.cpu_s or self.device != "cpu":
            return None
        return self.timing.cpu_median_s / self.predicted.cpu_s

    @property
    def memory_ratio(self) -> Optional[float]:
        """Measured peak / predicted peak."""
        if self.peak_memory_bytes is None or not self.predicted_peak_bytes:
            return None
        return self.peak_memory_bytes / self.predicted_peak_bytes

    def row(self) -> dict[str, Any]:
        """A flat row: the settings, then measured beside predicted (bytes, seconds, FLOPs)."""
        timing, model = self.timing, self.device_model or {}
        settings = self.spec.to_dict()
        if not self.spec.num_experts:  # the dense model, labelled as the planner's rows label it
            settings.update(architecture="dense", top_k=0, router_hidden_dim=0)
        return {
            "label": self.spec.label,
            **settings,
            "status": self.status,
            "message": self.message,
            "device_resolved": self.device,
            "device_name": self.device_name,
            "threads_used": self.threads,
            "median_s": timing.median_s if timing else None,
            "p95_s": timing.p95_s if timing else None,
            "min_s": timing.min_s if timing else None,
            "cpu_median_s": timing.cpu_median_s if timing else None,
            "times_s": list(timing.times_s) if timing else None,
            "cpu_times_s": list(timing.cpu_times_s) if timing else None,
            **(self.predicted.row() if self.predicted else {key: None for key in PREDICTION_KEYS}),
            "time_ratio": self.time_ratio,
            "cpu_time_ratio": self.cpu_time_ratio,
            "series_per_s": timing.series_per_s if timing else None,
            "tokens_per_s": timing.tokens_per_s if timing else None,
            "flops": self.flops,
            "achieved_flops_per_s": timing.achieved_flops_per_s if timing else None,
            "peak_memory_bytes": self.peak_memory_bytes,
            "predicted_peak_bytes": self.predicted_peak_bytes,
            "memory_ratio": self.memory_ratio,
            "memory_method": self.memory_method,
            "trained_params": self.trained_params,
            "available_memory_bytes": self.available_memory_bytes,
            "device_model": model.get("name"),
            "device_model_source": model.get("source"),
            "device_model_measured_on": model.get("measured_on"),
            "parallel_speedup": self.parallel_speedup,
            "probe_parallel_speedup": self.probe_parallel_speedup,
            "gemm_state_ratio": self.gemm_state_ratio,
            "host_s_per_op": self.host_s_per_op,
            "probe_host_s_per_op": self.probe_host_s_per_op,
            "notes": "; ".join(self.notes),
            "usage_counts": list(self.usage_counts) if self.usage_counts is not None else None,
            "usage_entropy_nats": self.usage_entropy_nats,
            "balance_loss": self.balance_loss,
            "loss": self.loss,
            "wall_s": self.wall_s,
        }


def _same_workload(a: BenchSpec, b: BenchSpec) -> bool:
    keys = ("size", "mode", "batch_size", "context_length", "prediction_length", "num_samples", "device", "dtype",
            "threads")
    return all(getattr(a, key) == getattr(b, key) for key in keys)


def compare_to_dense(results: Sequence[BenchResult]) -> list[dict[str, Any]]:
    """For each finished MoE run with a finished dense run of the same size and workload: the measured
    time ratio MoE / dense beside the planner's FLOP ratio (sparse dispatch should keep them close).
    The CPU-time ratio is the steadier of the two on a machine other processes share (see timing)."""
    dense = [r for r in results if r.ok and r.spec.num_experts == 0]
    rows = []
    for result in results:
        if not result.ok or result.spec.num_experts == 0:
            continue
        match = next((d for d in dense if _same_workload(d.spec, result.spec)), None)
        if match is None:
            continue
        time_vs_dense = result.timing.median_s / match.timing.median_s
        cpu_time_vs_dense = result.timing.cpu_median_s / match.timing.cpu_median_s
        flops_vs_dense = result.flops / match.flops
        rows.append({
            "label": result.spec.label,
            "size": result.spec.size,
            "mode": result.spec.mode,
            "architecture": result.spec.architecture,
            "dispatch": result.spec.dispatch,
            "num_experts": result.spec.num_experts,
            "top_k": result.spec.top_k,
            "time_vs_dense": time_vs_dense,
            "cpu_time_vs_dense": cpu_time_vs_dense,
            "flops_vs_dense": flops_vs_dense,
            "time_ratio_over_flop_ratio": time_vs_dense / flops_vs_dense,
            "cpu_time_ratio_over_flop_ratio": cpu_time_vs_dense / flops_vs_dense,
        })
    return rows


def results_metadata(results: Sequence[BenchResult]) -> dict[str, Any]:
    """What every export carries: the conventions, the device, the library versions, how it was measured."""
    finished = next((r for r in results if r.device_name), None)
    extra: dict[str, Any] = {"device": finished.device_name if finished else "unknown"}
    if finished:
        extra.update({f"version_{name}": version for name, version in finished.versions.items()})
        extra["threads"] = finished.threads
    extra.update({f"measurement_{key}": text for key, text in MEASUREMENT_NOTES.items()})
    return export_metadata(extra)


def export_results(results: Sequence[BenchResult], fmt: str) -> bytes:
    """The results as CSV (metadata as '# key: value' lines above the header) or JSON (a list of rows)."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    return render([r.row() for r in results], fmt, results_metadata(results))
