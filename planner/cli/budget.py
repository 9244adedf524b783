"""`python -m planner solve` and `python -m planner plan --config FILE`: the budget solver, config import and
multi-device plans on the command line. Each `add_*` registers a subcommand; each `run_*` returns rows."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from model.config import MAX_ROUTER_HIDDEN_DIM, make_config
from planner.cli.flags import bounded_number, count, integer_list, parse_count
from planner.config_import import import_config_file
from planner.parallel import GPU_MEMORY_BYTES, GIB, STRATEGIES, plan_all_strategies
from planner.plan import plan, plan_row
from planner.solver import BUDGET_KINDS, DEFAULT_BASE_SIZE, TOKEN_BLOCK_PATTERNS, Budget, SearchSpace, solve
from planner.workload import Workload

MAX_DEVICE_MEMORY_GIB = 1 << 20  # a mebibyte of GiB: no device is larger


def read_config(path: str):
    """import_config_file, its errors naming the file (`--config`): the keys they name are the file's, not
    this command's flags."""
    try:
        return import_config_file(path)
    except ValueError as error:
        raise ValueError(f"argument --config: {str(path)[:200]}: {error}") from None


def _gpu_memory_bytes(args: argparse.Namespace) -> int:
    if args.device_memory_gib is not None:
        return int(args.device_memory_gib * GIB)
    return GPU_MEMORY_BYTES[args.gpu or "A100 80GB"]


def add_solve_subcommand(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "solve", parents=parents, help="find (E, K, router width) that reach a total size within a budget",
        description="Enumerate MoE configurations of a base size, keep those within the budget, rank by closeness "
        "of total parameters to the target, and list the Pareto front of total vs active parameters.")
    parser.add_argument("--size", default=DEFAULT_BASE_SIZE, help="base size (a preset name)")
    parser.add_argument("--target-total", type=parse_count, required=True, help="target total parameters, e.g. 200M")
    parser.add_argument("--budget", choices=list(BUDGET_KINDS), default="active_params",
                        help="; ".join(f"{k}: {v}" for k, v in BUDGET_KINDS.items()))
    parser.add_argument("--limit", type=parse_count, required=True, dest="budget_limit",
                        help="the budget's limit: 50M active params, 2.5 (ratio), 5e10 FLOPs, or bytes (e.g. 16G)")
    space = SearchSpace()  # the app's Budget tab starts from the same space
    parser.add_argument("--max-experts", type=count, default=space.max_experts)
    parser.add_argument("--max-top-k", type=count, default=space.max_top_k)
    parser.add_argument("--router-widths", type=integer_list(1, MAX_ROUTER_HIDDEN_DIM), default=space.router_widths,
                        help="comma-separated router hidden widths")
    parser.add_argument("--token-blocks", default=",".join(space.token_block_patterns),
                        help=f"token_ffn MoE block patterns: {', '.join(TOKEN_BLOCK_PATTERNS)}")
    parser.add_argument("--tolerance", type=float, default=None, help="keep totals within target × (1 ± this)")
    parser.add_argument("--top", type=count, default=20, help="how many ranked solutions to print")
    parser.add_argument("--pareto", action="store_true", help="print the Pareto front instead of the ranking")


def run_solve(args: argparse.Namespace, workload: Workload, architectures: list[str]) -> list[dict[str, Any]]:
    widths = tuple(args.router_widths)
    space = SearchSpace(args.max_experts, args.max_top_k, widths, tuple(p.strip() for p in args.token_blocks.split(",")))
    try:
        base = make_config(args.size, router_hidden_dim=widths[0] if len(widths) == 1 else 256)
    except ValueError as error:
        raise ValueError(f"argument --size: {error}") from None
    result = solve(base, int(args.target_total), Budget(args.budget, args.budget_limit), architectures=architectures,
                   workload=workload, space=space, tolerance=args.tolerance, limit=args.top)
    if not result.complete:
        print(f"note: the search stopped at its time limit after {result.evaluated:,} shapes (E up to "
              f"{max((c.config.num_experts for c in result.feasible), default=0)} among the feasible); narrow "
              f"--max-experts, --max-top-k or --router-widths for a complete search", file=sys.stderr)
    chosen = result.pareto_front if args.pareto else result.candidates
    return [{
        "rank": rank,
        "architecture": c.config.architecture,
        "num_experts": c.config.num_experts,
        "top_k": c.config.top_k,
        "router_hidden_dim": c.config.router_hidden_dim if c.config.architecture != "token_ffn" else None,
        "token_moe_blocks": c.token_block_pattern,
        "total_params": c.total_params,
        "active_params": c.active_params,
        "distance_to_target_params": c.total_params - int(args.target_total),
        f"budget_{args.budget}": c.budget_value,
    } for rank, c in enumerate(chosen, start=1)]


def add_plan_subcommand(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "plan", parents=parents, help="size a training config (Chronos YAML or HF config.json), per device",
        description="Read a Chronos training YAML or a Hugging Face T5 config.json and print its plan; with "
        "--devices, per-device training memory under data parallel, ZeRO-1/2/3 and expert parallelism.")
    parser.add_argument("--config", required=True, help="a Chronos training .yaml/.yml or a T5 config.json")
    parser.add_argument("--devices", type=count, default=None,
                        help="with --strategies: number of devices (the batch is per device); default 1")
    parser.add_argument("--gpu", choices=list(GPU_MEMORY_BYTES), default=None,
                        help="with --strategies: device to fit on; default A100 80GB")
    parser.add_argument("--device-memory-gib", type=bounded_number(MAX_DEVICE_MEMORY_GIB, "memory in GiB"),
                        default=None,
                        help="with --strategies: a custom device's memory in GiB")
    parser.add_argument("--strategies", action="store_true",
                        help=f"print per-device memory for {', '.join(STRATEGIES)} instead of the plan row")
    parser.add_argument("--expert-load", type=float, default=None, metavar="FACTOR",
                        help="with --strategies: routing slots device 0's experts receive under expert_parallel, "
                        "relative to balanced (default 1.0; at most devices × min(K, experts held) / K)")


def run_plan(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows and extra metadata (what was read, what was ignored)."""
    if not args.strategies:
        given = [flag for flag, value in (("--devices", args.devices), ("--gpu", args.gpu),
                                          ("--device-memory-gib", args.device_memory_gib),
                                          ("--expert-load", args.expert_load)) if value is not None]
        if given:
            raise ValueError(f"argument {given[0]}: applies only with --strategies (per-device plans)")
    imported = read_config(args.config)
    metadata = {"config_file": args.config, "read_as": imported.source, "size": imported.size,
                "ignored_keys": ", ".join(imported.ignored_keys) or "none",
                "gradient_accumulation_steps": imported.gradient_accumulation_steps}
    if args.strategies:
        load = 1.0 if args.expert_load is None else args.expert_load
        rows = plan_all_strategies(imported.config, imported.workload, args.devices or 1,
                                   device_memory_bytes=_gpu_memory_bytes(args), expert_load_factor=load)
        metadata["device_memory_bytes"] = _gpu_memory_bytes(args)
        if imported.config.is_moe:
            metadata["expert_load_factor"] = load
        return rows, metadata
    return [plan_row(plan(imported.config, imported.workload, size=imported.size))], metadata


