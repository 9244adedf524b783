"""Benchmarks on the local device, measured against the planner's predictions (issue 5).

Public API (torch is imported only inside the benchmark's subprocess, so importing this package is cheap):

    from planner.bench import BenchSpec, run_benchmark

    spec = BenchSpec(size="small", architecture="token_ffn", num_experts=16, top_k=2, mode="forward",
                     batch_size=8, device="auto", dtype="fp32", warmup=1, repeats=5, time_limit_s=600)
    result = run_benchmark(spec, progress=None, cancel_event=None)   # -> BenchResult, never raises
    result.status                      # "ok" | "refused" | "timeout" | "cancelled" | "error"; result.message says why
    result.timing.median_s, result.timing.p95_s, result.timing.series_per_s, result.timing.tokens_per_s,
    result.timing.achieved_flops_per_s  # the planner's FLOPs / the median time
    result.predicted (StepTime: matmul, memory-bound, overhead, sync seconds), result.predicted_time_s,
    result.time_ratio, result.cpu_time_ratio             # measured / predicted
    result.peak_memory_bytes, result.predicted_peak_bytes, result.memory_ratio
    result.usage_counts, result.usage_entropy_nats, result.balance_loss   # forward and train modes, MoE only
    result.row()                                         # a flat dict for tables

- `BenchSpec` (spec.py): size, architecture, num_experts (0 = dense), top_k, dispatch (sparse/dense), mode
  (forward / forecast / train), batch_size, context_length, prediction_length, num_samples, device
  (auto/cpu/cuda/mps), dtype (fp32/bf16/fp16; fp16 refused on CPU), warmup, repeats, time_limit_s, seed,
  recalibrate. Invalid settings raise ValueError naming the field. `bench_grid(sizes, modes,
  architectures, experts, ...)` (grid.py): the runs a user asks for, dense first (the CLI and the app's).
- `run_benchmark(spec, progress, cancel_event)` (runner.py): waits for any other benchmark (one at a time
  across processes and browser sessions), runs one subprocess with the time limit, reports
  `BenchProgress(stage, done, total, message, .fraction)` to `progress`, stops when `cancel_event` is set.
- `request_cancel(pid)` / `lock_holder()` (lock.py): cancel the benchmark process `pid` runs (only that one); who runs now.
- `compare_to_dense(results)`, `export_results(results, "csv" | "json")` (results.py): the MoE-to-dense
  time ratio beside the FLOP ratio; exports with device, versions and settings.
- Predictions without running: `predict_row(spec, device, compiled=False, tf32=False)` (predict.py) for
  `this-machine` (this CPU's probed op-level model) or a GPU preset (PREDICTION_DEVICES); the time model
  itself is `planner.steptime`. `estimate_peak_bytes(spec, device)` and `check_preflight(spec, device, available)`.

The CLI is `python -m planner bench` (planner/cli/bench.py).
"""

from planner.bench.grid import bench_grid
from planner.bench.lock import lock_holder, request_cancel
from planner.bench.predict import LOCAL_DEVICE, PREDICTION_DEVICES, predict_row
from planner.bench.preflight import MEMORY_FRACTION, PreflightVerdict, check_preflight, estimate_peak_bytes
from planner.bench.results import BenchResult, compare_to_dense, export_results
from planner.bench.runner import BenchProgress, run_benchmark
from planner.bench.spec import DEVICES, DTYPES, MODES, BenchSpec

__all__ = [
    "DEVICES",
    "LOCAL_DEVICE",
    "PREDICTION_DEVICES",
    "DTYPES",
    "MEMORY_FRACTION",
    "MODES",
    "BenchProgress",
    "BenchResult",
    "BenchSpec",
    "bench_grid",
    "PreflightVerdict",
    "check_preflight",
    "compare_to_dense",
    "estimate_peak_bytes",
    "export_results",
    "lock_holder",
    "predict_row",
    "request_cancel",
    "run_benchmark",
]
