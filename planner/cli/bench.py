"""`python -m planner bench`: measure variants on this device beside the planner's predictions.

`add_bench_subcommand(subparsers)` registers the subcommand and its flags; `run_bench_command(args)` runs the
grid (sizes × modes × dense and architecture × experts × dispatch), one benchmark at a time, and returns the
exit status (0 when every run finished, 1 otherwise, 2 for a bad setting). Progress goes to stderr, the
results to stdout or --output. With --predict-for PRESET nothing runs: the predictions for that device.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from planner.workload import CONTEXT_LENGTH, NUM_SAMPLES, PREDICTION_LENGTH, Workload
from planner.plan import untrained_variants
from model.config import ARCHITECTURES, DISPATCH_MODES, MAX_EXPERTS
from planner.bench.grid import bench_grid
from planner.cli.flags import capacity_factor, integer_list, name_list
from planner.bench import (
    DEVICES,
    DTYPES,
    MODES,
    PREDICTION_DEVICES,
    BenchProgress,
    BenchResult,
    BenchSpec,
    compare_to_dense,
    export_results,
    predict_row,
    run_benchmark,
)
from planner.export import export_metadata, render
from planner.output_path import check_output_path
from planner.units import GIB

OUTPUT_FORMATS = ("table", "md", "csv", "json")
DISTRIBUTED_STRATEGIES = ("data_parallel", "zero2", "zero3", "expert_parallel")
# What the table and Markdown formats show (CSV and JSON carry every field, in bytes and seconds).
SUMMARY_COLUMNS = ("label", "status", "median_s", "p95_s", "min_s", "cpu_median_s", "predicted_time_s", "time_ratio",
                   "cpu_time_ratio", "predicted_matmul_s", "predicted_memory_bound_s", "predicted_overhead_s",
                   "predicted_sync_s", "predicted_bound", "tokens_per_s", "achieved_gflops_per_s", "peak_memory_gib",
                   "predicted_peak_gib", "memory_ratio", "message")
PREDICTION_COLUMNS = ("label", "mode", "batch_size", "context_length", "prediction_length", "num_samples", "dtype",
                      "device_name", "compiled", "tf32", "predicted_time_s", "predicted_matmul_s",
                      "predicted_memory_bound_s", "predicted_overhead_s", "predicted_sync_s", "predicted_bound",
                      "predicted_peak_gib")


PROG = "python -m planner bench"


def add_bench_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench", help="measure variants on this device beside the planner's predictions",
        description="Run each variant in a subprocess with a time limit (one benchmark at a time), after a "
        "preflight that refuses runs predicted to exceed 80%% of the available memory. Timing: median and p95 "
        "of synchronised repeats after warm-up; FLOPs are the planner's; predicted time prices every op the step "
        "dispatches (traced once, cached) on this device's probed model (cached; --recalibrate re-probes), or "
        "on a GPU preset (--predict-for), split into matmul, memory-bound, overhead and sync.")
    parser.add_argument("--modes", type=name_list(MODES), default=["forward"], help=f"comma-separated: {', '.join(MODES)}")
    parser.add_argument("--sizes", type=str, default="small", help="comma-separated size presets (debug, tiny, ...)")
    parser.add_argument("--architectures", type=name_list(ARCHITECTURES), default=list(ARCHITECTURES))
    parser.add_argument("--experts", type=integer_list(0, MAX_EXPERTS), default=[0, 16], help="comma-separated expert counts, 0 = dense")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--dispatch", type=name_list(DISPATCH_MODES), default=["sparse"],
                        help="comma-separated: sparse (only the chosen experts run), dense (all run, masked)")
    parser.add_argument("--router-hidden-dim", type=int, default=256)
    parser.add_argument("--expert-capacity", type=capacity_factor, default=None, help="token_ffn capacity factor")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--context-length", type=int, default=CONTEXT_LENGTH)
    parser.add_argument("--prediction-length", type=int, default=PREDICTION_LENGTH)
    parser.add_argument("--num-samples", type=int, default=NUM_SAMPLES, help="sample paths per series (forecast)")
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="PyTorch CPU threads (default: one per core)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--time-limit", type=float, default=600.0, dest="time_limit_s", help="seconds per run")
    parser.add_argument("--recalibrate", action="store_true", help="re-run the device probe")
    parser.add_argument("--trainable", default="all",
                        help="train mode: which parameters learn (all, experts_and_router, experts, router, or "
                             "comma-separated components); runs with nothing to train are left out")
    parser.add_argument("--predict-for", choices=PREDICTION_DEVICES, default=None, metavar="DEVICE",
                        help="run nothing: predicted time and memory on DEVICE: " + ", ".join(PREDICTION_DEVICES))
    parser.add_argument("--compiled", action="store_true",
                        help="with --predict-for: the torch.compile what-if (elementwise ops fused)")
    parser.add_argument("--tf32", action="store_true", help="with --predict-for: fp32 matmuls in TF32 (GPUs)")
    parser.add_argument("--format", choices=OUTPUT_FORMATS, default="table", dest="output_format")
    parser.add_argument("--output", type=Path, default=None, help="write here instead of stdout")
    parser.add_argument("--strategy", choices=DISTRIBUTED_STRATEGIES, default=None,
                        help="train on --ranks local processes (planner.bench.distributed): DDP, FSDP2 zero2/zero3 "
                             "or expert parallel; one row per rank beside plan_devices and step_collectives")
    parser.add_argument("--ranks", type=int, default=None, help="with --strategy: the number of ranks (≥ 2)")
    parser.set_defaults(handler=run_bench_command)
    return parser


def bench_specs(args: argparse.Namespace) -> list[BenchSpec]:
    """The flags' grid (planner.bench.grid). Raises ValueError naming a bad setting."""
    sizes = [name.strip() for name in args.sizes.split(",") if name.strip()]
    if not sizes:
        raise ValueError(f"argument --sizes: give comma-separated size presets, got {args.sizes[:40]!r}")
    return bench_grid(
        sizes, args.modes, args.architectures, args.experts, args.dispatch, args.expert_capacity, args.recalibrate,
        top_k=args.top_k, router_hidden_dim=args.router_hidden_dim, batch_size=args.batch_size,
        context_length=args.context_length, prediction_length=args.prediction_length, num_samples=args.num_samples,
        device=args.device, dtype=args.dtype, threads=args.threads, warmup=args.warmup, repeats=args.repeats,
        time_limit_s=args.time_limit_s, trainable=args.trainable,
    )


def _summary_row(result: BenchResult) -> dict[str, Any]:
    row = result.row()
    achieved = row["achieved_flops_per_s"]
    row["achieved_gflops_per_s"] = achieved / 1e9 if achieved is not None else None
    for name, key in (("peak_memory_gib", "peak_memory_bytes"), ("predicted_peak_gib", "predicted_peak_bytes")):
        row[name] = row[key] / GIB if row[key] is not None else None
    return {column: row[column] for column in SUMMARY_COLUMNS}


def _prediction_rows(specs: Sequence[BenchSpec], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for spec in specs:
        row = predict_row(spec, args.predict_for, compiled=args.compiled, tf32=args.tf32)
        if row["notes"]:
            print(f"note: {row['notes']}", file=sys.stderr)
        rows.append(row)
    return rows


def _prediction_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**{column: row.get(column) for column in PREDICTION_COLUMNS if column != "predicted_peak_gib"},
             "predicted_peak_gib": row["predicted_peak_bytes"] / GIB} for row in rows]


def _print_progress(index: int, count: int, spec: BenchSpec):
    """On a terminal, one line rewritten in place; piped into a log, a line per stage (no carriage returns)."""
    terminal = sys.stderr.isatty()
    last_stage: list[str] = []

    def report(update: BenchProgress) -> None:
        detail = update.message or f"{update.stage} {update.done}/{update.total}"
        if terminal:
            print(f"\r[{index}/{count}] {spec.label}: {detail:<60}", end="", file=sys.stderr, flush=True)
        elif update.stage not in last_stage and update.stage != "done":  # the run's own line says how it ended
            last_stage.append(update.stage)
            print(f"[{index}/{count}] {spec.label}: {update.message or update.stage}", file=sys.stderr, flush=True)
    return report


def _write(text: bytes, output: Optional[Path]) -> bool:
    """Write the report; when `output` cannot take it after all (a full disk), print it to stdout instead
    so measured results are never lost, and say why. True when it went where it was asked to."""
    from planner.cli.commands import write_report

    try:
        write_report(text, output)
        return True
    except OSError as error:
        print(f"{PROG}: error: argument --output: could not write {str(output)!r} ({error.strerror or error}); "
              f"the report follows on stdout", file=sys.stderr)
        write_report(text, None)
        return False


def _untrained_runs(args: argparse.Namespace, specs: list[BenchSpec]) -> list[str]:
    """The training runs bench_grid left out because the regime trains nothing in them."""
    if "train" not in args.modes:
        return []
    sizes = dict.fromkeys(spec.size for spec in specs)
    workload = Workload(trainable=specs[0].trainable)
    return untrained_variants(sizes, args.architectures, args.experts, workload)


def run_distributed_bench(args: argparse.Namespace) -> int:
    """--strategy/--ranks: every run of the grid on N ranks (planner.bench.distributed); exit status as above."""
    from planner.bench.distributed import distributed_specs, error_row, run_distributed
    from planner.cli.commands import flag_for

    try:
        check_output_path(args.output)
        if args.predict_for:
            raise ValueError("argument --strategy: --predict-for runs nothing; measured runs only")
        specs = distributed_specs(bench_specs(args), args.strategy, args.ranks)
    except ValueError as error:
        message = str(error)
        message = f"argument --sizes: {message}" if message.startswith("size ") else flag_for(error)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    rows, summaries, results = [], [], []
    for index, spec in enumerate(specs, start=1):
        print(f"[{index}/{len(specs)}] {spec.label}: running", file=sys.stderr, flush=True)
        result = run_distributed(spec)
        results.append(result)
        rows += result.rows if result.ok else [error_row(result)]
        summaries.append(result.summary)
        print(f"[{index}/{len(specs)}] {result.summary}", file=sys.stderr, flush=True)
    metadata = {"strategy": args.strategy, "ranks": args.ranks}
    text = render(rows, args.output_format, export_metadata(metadata) if args.output_format in ("csv", "json")
                  else {})
    if args.output_format in ("table", "md"):
        text += b"\n" + "\n".join(summaries).encode("utf-8") + b"\n"
    written = _write(text, args.output)
    return 0 if written and all(r.ok for r in results) else 1


def run_bench_command(args: argparse.Namespace) -> int:
    from planner.cli.commands import flag_for

    if args.strategy is not None or args.ranks is not None:
        return run_distributed_bench(args)
    try:
        check_output_path(args.output)
        specs = bench_specs(args)
        if args.predict_for:
            rows = _prediction_rows(specs, args)
            shown = rows if args.output_format in ("csv", "json") else _prediction_table(rows)
            written = _write(render(shown, args.output_format, export_metadata({"predicted_for": args.predict_for})),
                             args.output)
            return 0 if written else 1
        if args.compiled or args.tf32:
            raise ValueError("--compiled and --tf32 are what-ifs for --predict-for; measured runs are eager fp32")
    except ValueError as error:
        message = str(error)
        message = f"argument --sizes: {message}" if message.startswith("size ") else flag_for(error)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    left_out = _untrained_runs(args, specs)
    if left_out:
        print(f"note: train runs left out, nothing to train with --trainable {specs[0].trainable}: "
              f"{', '.join(left_out)}", file=sys.stderr)
    results = []
    for index, spec in enumerate(specs, start=1):
        result = run_benchmark(spec, progress=_print_progress(index, len(specs), spec))
        done = f"[{index}/{len(specs)}] {spec.label}: {result.status} {result.message}".rstrip()
        print(f"\r{done:<100}" if sys.stderr.isatty() else done, file=sys.stderr)
        results.append(result)
        for note in result.notes:
            print(f"note: {note}", file=sys.stderr)
    if args.output_format in ("csv", "json"):
        written = _write(export_results(results, args.output_format), args.output)
    else:
        finished = next((r for r in results if r.device_name), None)
        device = {"device": f"{finished.device_name}, {finished.spec.dtype}"} if finished else {}
        text = render([_summary_row(r) for r in results], args.output_format, device)
        comparison = compare_to_dense(results)
        if comparison:
            text += b"\n" + render(comparison, args.output_format, {})
        written = _write(text, args.output)
    return 0 if written and all(r.ok for r in results) else 1
