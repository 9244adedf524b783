"""`python -m planner`: the analytic table, the per-component breakdown, verification against the modules,
the benchmarks (planner/cli/bench.py), the budget solver and config import with multi-device plans
(planner/cli/budget.py), training runs and forecasting services in hours and money (planner/cli/cost.py).

Bad flags exit with status 2 and one line naming the flag and what it allows; `verify` exits 1 when any
check fails. The table and Markdown formats show the summary columns below; CSV, JSON and XLSX carry
every row key (the README's "table rows" section).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from model.config import ARCHITECTURES, DISPATCH_MODES, MAX_EXPERTS
from model.components import COMPONENTS
from model.presets import PRESETS
from model.trainable import REGIMES
from planner.export import FORMATS, export_metadata, render
from planner.cli.flags import capacity_factor, count, integer_list, name_list
from planner.output_path import check_output_path, write_output
from planner.units import column_format
from planner.plan import breakdown_rows, plan_grid, plan_row, untrained_variants
from planner.workload import (CONTEXT_LENGTH, DTYPE_BYTES, NUM_SAMPLES, OPTIMIZERS, PRECISION_REGIMES,
                              PREDICTION_LENGTH, Workload)

SUMMARY_COLUMNS = (
    "size", "architecture", "num_experts", "top_k", "total_params", "active_params", "trainable_params",
    "total_params_vs_dense",
    "forward_flops", "forward_flops_vs_dense", "train_flops", "forecast_flops", "forecast_flops_vs_dense",
    "weights_fp32_bytes", "train_memory_bytes", "forecast_memory_bytes",
)
HUMAN_FORMATS = ("table", "md")
UNITS = ("exact", "human")


def _unit_kind(column: str) -> Optional[str]:
    """How a row key reads in human units (planner.units.column_format), None to keep it as it is."""
    if column.endswith("_bytes"):
        return "bytes"
    if column.endswith("_vs_dense"):
        return "ratio"
    if column == "params_increase_over_dense" or column.startswith("distance_to"):
        return "signed_count"
    if column.endswith(("_params", "_flops")) or column in ("params", "flops"):
        return "count"
    return None


def human_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """`rows` with counts in SI prefixes, bytes in one binary unit per column and ratios to two decimals."""
    columns = list(rows[0]) if rows else []
    formats = {c: column_format(kind, [row[c] for row in rows]) for c in columns
               if (kind := _unit_kind(c)) and all(isinstance(row[c], (int, float, type(None))) for row in rows)}
    return [{c: formats[c](v) if c in formats and v is not None else v for c, v in row.items()} for row in rows]
# Config and workload fields -> the flags that set them, for one-line errors.
FIELD_FLAGS = {
    "num_experts": "--experts", "top_k": "--top-k", "router_hidden_dim": "--router-hidden-dim",
    "vocab_size": "--vocab-size", "expert_capacity": "--expert-capacity", "batch_size": "--batch-size",
    "context_length": "--context-length", "prediction_length": "--prediction-length",
    "num_samples": "--num-samples", "max_experts": "--max-experts", "max_top_k": "--max-top-k",
    "router_widths": "--router-widths", "token_block_patterns": "--token-blocks", "tolerance": "--tolerance",
    "num_devices": "--devices",
    "global_batch": "--global-batch", "per_device_batch": "--per-device-batch", "gradient_accumulation": "--accumulation",
    "steps": "--steps", "tokens": "--tokens", "epochs": "--epochs", "series": "--series",
    "devices_per_node": "--devices-per-node", "price_per_device_hour": "--price-per-hour",
    "data_series_per_s": "--data-series-per-s", "intra_link": "--intra-link", "inter_link": "--inter-link",
    "deadline_hours": "--deadline-hours", "precision": "--precision", "trainable": "--trainable", "dtype": "--dtype", "strategy": "--strategy",
    "expert_load_factor": "--expert-load",
    "max_batch": "--max-batch", "workers": "--workers",
}


_DEFAULT_ONLY = "\x00"  # the help of an option that has only its default to show


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help shows every option's default (argparse's own formatter skips options without help text)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = "" if action.help == _DEFAULT_ONLY else (action.help or "").strip()
        if action.default in (None, False, argparse.SUPPRESS) or "%(default)" in text or not action.option_strings:
            return text
        default = action.default
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})".strip()


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (no usage dump), exit status 2; --help shows defaults."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        if "help" not in kwargs and kwargs.get("default") not in (None, False):
            kwargs["help"] = _DEFAULT_ONLY  # argparse skips an option without help; this one shows its default
        return super().add_argument(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parents() -> dict[str, argparse.ArgumentParser]:
    grid = OneLineParser(add_help=False)
    grid.add_argument("--sizes", type=name_list(list(PRESETS)), default=["tiny", "mini", "small", "base", "large"],
                      help=f"comma-separated presets: {', '.join(PRESETS)}")
    grid.add_argument("--architectures", type=name_list(ARCHITECTURES), default=list(ARCHITECTURES),
                      help=f"comma-separated: {', '.join(ARCHITECTURES)}")
    grid.add_argument("--experts", type=integer_list(0, MAX_EXPERTS), default=[0, 4, 8, 16], help="comma-separated E; 0 = dense")
    grid.add_argument("--top-k", type=int, default=2, help="K active experts per series/token")
    grid.add_argument("--router-hidden-dim", type=int, default=256, help="R of the context router")
    grid.add_argument("--vocab-size", type=int, default=4096)
    grid.add_argument("--dispatch", choices=DISPATCH_MODES, default="sparse",
                      help="sparse: only chosen experts run; dense: every expert runs (reference)")
    grid.add_argument("--expert-capacity", type=capacity_factor, default=None,
                      help="capacity factor for token_ffn rows (others drop nothing); default: no limit")
    workload = OneLineParser(add_help=False)
    workload.add_argument("--context-length", type=int, default=CONTEXT_LENGTH, help="context values (S = this + 1)")
    workload.add_argument("--prediction-length", type=int, default=PREDICTION_LENGTH,
                          help="prediction values (T = this + 1)")
    workload.add_argument("--batch-size", type=int, default=1, help="series per batch")
    workload.add_argument("--num-samples", type=int, default=NUM_SAMPLES, help="sample paths per forecast")
    workload.add_argument("--dtype", choices=list(DTYPE_BYTES), default="fp32", help="inference weights' format")
    workload.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    workload.add_argument("--precision", choices=PRECISION_REGIMES, default="fp32", help="training regime")
    workload.add_argument("--trainable", default="all",
                          help=f"which parameters learn: {', '.join(REGIMES)}, or comma-separated components "
                               f"({', '.join(COMPONENTS)}); frozen ones get no gradient or optimizer state")
    output = OneLineParser(add_help=False)
    output.add_argument("--format", choices=FORMATS, default="table", dest="output_format")
    output.add_argument("--output", type=Path, default=None, help="write here instead of stdout")
    output.add_argument("--units", choices=UNITS, default="exact",
                        help="table and md: exact integers, or human units (SI prefixes, GiB); exports stay exact")
    architectures = OneLineParser(add_help=False)
    architectures.add_argument("--architectures", type=name_list(ARCHITECTURES), default=list(ARCHITECTURES),
                               help=f"comma-separated: {', '.join(ARCHITECTURES)}")
    return {"grid": grid, "workload": workload, "output": output, "architectures": architectures}


def build_parser() -> OneLineParser:
    from planner.cli.bench import add_bench_subcommand
    from planner.cli.budget import add_plan_subcommand, add_solve_subcommand
    from planner.cli.cost import add_run_subcommand, add_serve_subcommand

    parents = _parents()
    common = [parents["grid"], parents["workload"], parents["output"]]
    parser = OneLineParser(
        prog="python -m planner",
        description="Parameters, FLOPs and memory of Chronos-T5 and its MoE variants. FLOPs = 2 x MACs, matrix "
        "products only (softmax, norms, activations not counted); memory in bytes (GiB = 2^30).")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    subparsers.add_parser("table", parents=common, help="one row per variant: parameters, FLOPs, memory")
    subparsers.add_parser("breakdown", parents=common, help="parameters and FLOPs by component")
    verify = subparsers.add_parser("verify", parents=common, help="the planner against the real modules")
    verify.add_argument("--quick", action="store_true",
                        help=f"only sizes {', '.join(('debug', 'tiny'))} and E in 0, 4 (under a minute)")
    verify.add_argument("--workers", type=count, default=None, help="processes (default: one per CPU core)")
    add_bench_subcommand(subparsers)
    add_solve_subcommand(subparsers, [parents["architectures"], parents["workload"], parents["output"]])
    add_plan_subcommand(subparsers, [parents["output"]])
    add_run_subcommand(subparsers, [parents["output"]])
    add_serve_subcommand(subparsers, [parents["output"]])
    # Each report-making subcommand names the function that makes its rows (bench runs its own handler).
    for name, make_rows in (("table", run_table), ("breakdown", run_table), ("verify", run_verify),
                            ("solve", run_solve_command), ("plan", run_plan_command), ("run", run_cost_command),
                            ("serve", run_cost_command)):
        subparsers.choices[name].set_defaults(make_rows=make_rows)
    return parser


def _workload(args: argparse.Namespace) -> Workload:
    return Workload(
        batch_size=args.batch_size, context_length=args.context_length, prediction_length=args.prediction_length,
        num_samples=args.num_samples, dtype=args.dtype, optimizer=args.optimizer, precision=args.precision,
        trainable=args.trainable,
    )


def _grid_settings(args: argparse.Namespace) -> dict[str, Any]:
    return dict(top_k=args.top_k, router_hidden_dim=args.router_hidden_dim, vocab_size=args.vocab_size,
                dispatch=args.dispatch, expert_capacity=args.expert_capacity)


def _workload_metadata(workload: Workload) -> dict[str, Any]:
    return {f"workload_{key}": value for key, value in workload.__dict__.items()}


def run_table(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any], int]:
    workload = _workload(args)
    plans = plan_grid(args.sizes, args.architectures, args.experts, workload, **_grid_settings(args))
    left_out = untrained_variants(args.sizes, args.architectures, args.experts, workload, **_grid_settings(args))
    if left_out:
        print(f"note: left out, nothing to train with --trainable {workload.trainable}: {', '.join(left_out)}",
              file=sys.stderr)
    if args.command == "breakdown":
        rows = [row for p in plans for row in breakdown_rows(p)]
    else:
        rows = [plan_row(p) for p in plans]
        if args.output_format in HUMAN_FORMATS:
            rows = [{key: row[key] for key in SUMMARY_COLUMNS} for row in rows]
    return rows, _workload_metadata(workload), 0


def _report_progress(start: float) -> Callable[[int, int, list], None]:
    def report(done: int, total: int, checks: list) -> None:
        first, failed = checks[0], sum(not check.ok for check in checks)
        verdict = f"{failed} FAILED" if failed else "ok"
        print(f"[{done}/{total}] {first.size} {first.architecture} E={first.num_experts}: {len(checks)} checks {verdict} "
              f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)

    return report


def run_verify(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any], int]:
    from planner.verify import QUICK_EXPERTS, QUICK_SIZES, all_ok, verification_metadata, verify_grid

    workload = _workload(args)
    sizes, experts = (QUICK_SIZES, QUICK_EXPERTS) if args.quick else (args.sizes, args.experts)
    start = time.perf_counter()
    checks = verify_grid(sizes, args.architectures, experts, workload, workers=args.workers,
                         progress=_report_progress(start), **_grid_settings(args))
    metadata = {
        **_workload_metadata(workload),
        **verification_metadata(),
        "elapsed_s": round(time.perf_counter() - start, 1),
        "failed_checks": sum(not check.ok for check in checks),
    }
    return [check.row() for check in checks], metadata, 0 if all_ok(checks) else 1


def run_solve_command(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any], int]:
    from planner.cli.budget import run_solve

    workload = _workload(args)
    rows = run_solve(args, workload, args.architectures)
    metadata = {**_workload_metadata(workload), "base_size": args.size, "target_total_params": int(args.target_total),
                "budget": f"{args.budget} <= {args.budget_limit:g}", "listing": "pareto front" if args.pareto else "ranked"}
    return rows, metadata, 0


def run_plan_command(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any], int]:
    from planner.cli.budget import run_plan

    rows, metadata = run_plan(args)
    if not args.strategies and args.output_format in HUMAN_FORMATS:
        rows = [{key: row[key] for key in SUMMARY_COLUMNS} for row in rows]
    return rows, metadata, 0


def run_cost_command(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any], int]:
    from planner.cli.cost import run_run, run_serve, summary

    rows, metadata = (run_run if args.command == "run" else run_serve)(args)
    if args.output_format in HUMAN_FORMATS:
        rows = summary(rows, args.command)
    return rows, metadata, 0


def write_report(data: bytes, output: Optional[Path]) -> None:
    """The report to stdout, or whole to `output` (OSError if it cannot be written: the caller says so)."""
    if output is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        write_output(data, output)


def input_files(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """The files a command reads, by flag: its report must not be written over them."""
    config = getattr(args, "config", None)
    return [("--config", Path(config))] if config else []


def flag_for(error: ValueError) -> str:
    """The error's line, led by the flag that sets the refused field where a SettingError names one."""
    field = getattr(error, "field", None)
    return f"argument {FIELD_FLAGS[field]}: {error}" if field in FIELD_FLAGS else str(error)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "handler"):  # bench: runs, reports and sets its own exit status
        return args.handler(args)
    if args.output_format == "xlsx" and args.output is None:
        parser.error("argument --output: the xlsx format is binary; give --output PATH.xlsx")
    try:
        check_output_path(args.output, input_files(args))
        rows, metadata, status = args.make_rows(args)
    except ValueError as error:
        parser.error(flag_for(error))
    if getattr(args, "units", "exact") == "human":
        if args.output_format not in HUMAN_FORMATS:
            parser.error(f"argument --units: human units are for the table and md formats; "
                         f"{args.output_format} stays exact")
        rows = human_rows(rows)
    try:
        write_report(render(rows, args.output_format, export_metadata(metadata)), args.output)
    except OSError as error:
        print(f"{parser.prog}: error: argument --output: could not write {str(args.output)!r}: "
              f"{error.strerror or error}", file=sys.stderr)
        return 1
    return status
