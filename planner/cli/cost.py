"""`python -m planner run` (a training run in hours and money, or a search for the fastest and cheapest plans)
and `python -m planner serve` (a forecasting service in devices and money). Each `add_*` registers a
subcommand; each `run_*` returns rows and metadata. The numbers are planner.cost's."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from model.checks import SettingError
from model.config import ARCHITECTURES, MAX_EXPERTS, make_config
from model.presets import PRESETS
from planner.cli.flags import integer_list, name_list, parse_count, positive_number, whole_number
from planner.config_import import import_training_yaml
from planner.cost.interconnects import INTERCONNECTS
from planner.cost.search import SearchSpace, search_plans
from planner.cost.service import SERVICE_DTYPES, ForecastService, plan_service
from planner.cost.training import PRECISIONS, PRICED_GPUS, TrainingRun, global_batch_split, price_training_run, steps_for
from planner.parallel import STRATEGIES
from planner.workload import CONTEXT_LENGTH, NUM_SAMPLES, OPTIMIZERS, PREDICTION_LENGTH

GPUS = PRICED_GPUS
RUN_SUMMARY = ("variant", "gpu", "devices", "strategy", "activation_checkpointing", "per_device_batch",
               "gradient_accumulation", "step_time_s", "hours", "device_hours", "cost_usd", "mfu", "bound",
               "fit_status", "headroom_bytes")
SERVE_SUMMARY = ("variant", "gpu", "dtype", "batch_size", "latency_s", "series_per_s_per_device", "devices_needed",
                 "cost_per_million_usd", "bound", "fit_status")


def _add_variant_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=list(PRESETS), default=None, help="preset size (default small)")
    parser.add_argument("--architecture", choices=ARCHITECTURES, default=None,
                        help="MoE architecture (default shared_then_expert)")
    parser.add_argument("--experts", type=int, default=None, help=f"E, 0 (dense) to {MAX_EXPERTS}; default 0")
    parser.add_argument("--top-k", type=int, default=None, help="K active experts (default 2)")
    parser.add_argument("--context-length", type=whole_number, default=None, help="context values (default 512)")
    parser.add_argument("--prediction-length", type=whole_number, default=None,
                        help="prediction values (default 64)")
    parser.add_argument("--price-per-hour", type=positive_number, default=None,
                        help="USD per device-hour (default: the GPU's on-demand list price, planner/cost/prices.py)")
    parser.add_argument("--compile", action="store_true", help="the torch.compile what-if (elementwise ops fused)")


def add_run_subcommand(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "run", parents=parents, help="a training run in hours and money; --search for the fastest/cheapest plans",
        description="Price a whole training run from the step-time model: compute, communication, optimizer; "
        "hours, device-hours, cost, MFU, what bounds the step and whether it fits. With --search, every GPU × "
        "device count × strategy × micro-batch ± checkpointing that fits and reaches --global-batch, listed as "
        "the Pareto front of hours and cost.")
    _add_variant_flags(parser)
    parser.add_argument("--config", default=None, help="a Chronos training YAML: model, batch, accumulation, "
                        "max_steps, tf32/bf16/fp16, torch_compile, optim (flags override it)")
    parser.add_argument("--gpu", type=name_list(GPUS), default=None, help=f"comma-separated: {', '.join(GPUS)}")
    parser.add_argument("--devices", type=integer_list(1, 100_000), default=None, help="device counts, comma-separated (default 1)")
    parser.add_argument("--devices-per-node", type=int, default=None, help="GPUs per node (default 8, or fewer)")
    parser.add_argument("--global-batch", type=whole_number, default=None,
                        help="series per optimizer step = per-device batch × devices × accumulation")
    parser.add_argument("--per-device-batch", type=whole_number, default=None, help="series per device per micro-step")
    parser.add_argument("--accumulation", type=whole_number, default=None, help="gradient accumulation steps")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=whole_number, default=None, help="optimizer steps (e.g. 200000, 200K)")
    length.add_argument("--tokens", type=parse_count, default=None,
                        help="instead of --steps: tokens to train on (encoder + decoder tokens per series)")
    length.add_argument("--epochs", type=positive_number, default=None, help="instead of --steps: passes over --series")
    parser.add_argument("--series", type=whole_number, default=None, help="series in the data set (with --epochs)")
    parser.add_argument("--precision", choices=PRECISIONS, default=None, help="default tf32")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="default adamw")
    parser.add_argument("--trainable", default="all",
                        help="which parameters learn: all, experts_and_router, experts, router, or comma-separated "
                             "components (fine-tuning: fewer gradients, optimizer states and backward FLOPs)")
    parser.add_argument("--strategy", choices=STRATEGIES, default="data_parallel")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    parser.add_argument("--no-overlap", action="store_true", help="communication does not overlap compute")
    parser.add_argument("--data-series-per-s", type=positive_number, default=None,
                        help="the input pipeline's ceiling (series/s over all devices)")
    links = sorted(INTERCONNECTS)
    parser.add_argument("--intra-link", choices=links, default=None, help="the GPUs' link inside a node")
    parser.add_argument("--inter-link", choices=links, default=None, help="the network between nodes")
    parser.add_argument("--search", action="store_true",
                        help="search --gpu × --devices × every strategy × micro-batch ± checkpointing")


def _variant(args: argparse.Namespace, imported=None):
    if imported is not None and args.size is None and args.experts is None and args.architecture is None:
        return imported.size, imported.config
    size = args.size or (imported.size if imported else "small")
    experts = args.experts if args.experts is not None else 0
    if not 0 <= experts <= MAX_EXPERTS:
        raise SettingError("num_experts", f"num_experts must be from 0 to {MAX_EXPERTS}, got {experts}")
    moe = {} if experts == 0 else dict(architecture=args.architecture or "shared_then_expert", num_experts=experts,
                                       top_k=args.top_k if args.top_k is not None else 2)
    return size, make_config(size, **moe)


def _label(size: str, config) -> str:
    return f"{size} {config.label}"


def _batches(args: argparse.Namespace, num_devices: int, imported) -> tuple[int, int]:
    """(per-device batch, accumulation) from --global-batch, --per-device-batch, --accumulation or the config."""
    accumulation = args.accumulation or (imported.gradient_accumulation_steps if imported else None)
    per_device = args.per_device_batch or (imported.workload.batch_size if imported else None)
    if args.global_batch is None:
        return per_device or 32, accumulation or 1
    if args.per_device_batch is not None and args.accumulation is None:
        product = num_devices * per_device
        if args.global_batch % product:
            raise SettingError("global_batch", f"global_batch {args.global_batch} is not divisible by devices × per-device batch "
                             f"({num_devices} × {per_device} = {product})")
        return per_device, args.global_batch // product
    accumulation = args.accumulation or 1
    return global_batch_split(args.global_batch, num_devices, accumulation), accumulation


def _read_yaml(path: str):
    try:
        return import_training_yaml(Path(path))
    except ValueError as error:  # the keys it names are the file's, not this command's flags
        raise ValueError(f"argument --config: {str(path)[:200]}: {error}") from None


def _template(args: argparse.Namespace) -> tuple[str, TrainingRun, Any]:
    imported = _read_yaml(args.config) if args.config else None
    size, config = _variant(args, imported)
    gpus = args.gpu or ["a100-40gb"]
    devices = (args.devices or [1])[0]
    per_device, accumulation = _batches(args, devices, imported)
    context = args.context_length or (imported.workload.context_length if imported else CONTEXT_LENGTH)
    prediction = args.prediction_length or (imported.workload.prediction_length if imported else 64)
    global_batch = per_device * devices * accumulation
    if args.steps is not None:
        steps = args.steps
    elif args.tokens is not None or args.epochs is not None:
        steps = steps_for(global_batch, tokens=args.tokens, epochs=args.epochs, series=args.series,
                          context_length=context, prediction_length=prediction)
    else:
        steps = (imported.max_steps if imported and imported.max_steps else None) or 1000
    run = TrainingRun(
        config, gpus[0], num_devices=devices, devices_per_node=args.devices_per_node, per_device_batch=per_device,
        gradient_accumulation=accumulation, steps=steps, context_length=context, prediction_length=prediction,
        strategy=args.strategy, activation_checkpointing=args.checkpointing,
        precision=args.precision or (imported.run_precision if imported else "tf32"),
        optimizer=args.optimizer or (imported.workload.optimizer if imported else "adamw"), trainable=args.trainable,
        compiled=args.compile or bool(imported and imported.torch_compile),
        overlap_communication=not args.no_overlap, data_series_per_s=args.data_series_per_s,
        price_per_device_hour=args.price_per_hour, intra_link=args.intra_link, inter_link=args.inter_link)
    return _label(size, config), run, imported


def run_run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    label, template, imported = _template(args)
    metadata: dict[str, Any] = {"variant": label, "context_length": template.context_length,
                                "prediction_length": template.prediction_length, "steps": template.steps,
                                "precision": template.precision, "optimizer": template.optimizer,
                                "trainable": template.trainable}
    if imported is not None:
        metadata.update(config_file=args.config, ignored_keys=", ".join(imported.ignored_keys) or "none")
    gpus, counts = args.gpu or [template.gpu], args.devices or [template.num_devices]
    if args.search:
        global_batch = args.global_batch or template.global_batch
        result = search_plans(template, global_batch, SearchSpace(tuple(gpus), tuple(counts)))
        metadata.update(global_batch=global_batch, plans_tried=result.tried, plans_fitting=len(result.plans),
                        listing="Pareto front of hours and cost")
        if not result.plans:
            raise SettingError("global_batch", f"global_batch: no plan of {', '.join(gpus)} × {counts} devices fits at global batch "
                             f"{global_batch}; add devices or a larger GPU")
        fastest, cheapest = result.fastest, result.cheapest
        rows = []
        for estimate in result.pareto_front:
            marks = [name for name, chosen in (("fastest", fastest), ("cheapest", cheapest)) if chosen is estimate]
            rows.append({"variant": label, "pick": " and ".join(marks), **estimate.row()})
        return rows, metadata
    rows = []
    for gpu in gpus:
        for count in counts:
            run = template
            if (gpu, count) != (template.gpu, template.num_devices):
                per_device, accumulation = _batches(args, count, imported)
                run = dataclasses.replace(template, gpu=gpu, num_devices=count, per_device_batch=per_device,
                                          gradient_accumulation=accumulation)
            rows.append({"variant": label, **price_training_run(run).row()})
    return rows, metadata


def add_serve_subcommand(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "serve", parents=parents, help="a forecasting service: latency, throughput, devices, cost per million",
        description="Forecast --series series within --deadline-hours on GPUs of a preset: latency per batch, "
        "series/s per device, devices needed, cost per million forecasts, at the batch that maximises "
        "throughput within memory (or --batch-size).")
    _add_variant_flags(parser)
    parser.add_argument("--gpu", type=name_list(GPUS), default=["l4"], help=f"comma-separated: {', '.join(GPUS)}")
    parser.add_argument("--series", type=whole_number, default=1_000_000, help="series to forecast (e.g. 1M)")
    parser.add_argument("--deadline-hours", type=positive_number, default=24.0, help="within this many hours")
    parser.add_argument("--num-samples", type=whole_number, default=NUM_SAMPLES, help="sample paths per series")
    parser.add_argument("--dtype", choices=SERVICE_DTYPES, default="bf16", help="weights and compute")
    parser.add_argument("--batch-size", type=whole_number, default=None,
                        help="series per batch (default: the throughput-maximising batch that fits)")
    parser.add_argument("--max-batch", type=whole_number, default=1024, help="the largest batch the search tries")
    parser.add_argument("--tf32", action="store_true", help="fp32 matmuls in TF32")


def run_serve(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    size, config = _variant(args)
    label = _label(size, config)
    rows = []
    for gpu in args.gpu:
        service = ForecastService(config, gpu, series=args.series, deadline_hours=args.deadline_hours,
                                  num_samples=args.num_samples, context_length=args.context_length or CONTEXT_LENGTH,
                                  prediction_length=args.prediction_length or PREDICTION_LENGTH, dtype=args.dtype,
                                  batch_size=args.batch_size, max_batch=args.max_batch, compiled=args.compile,
                                  tf32=args.tf32,
                                  price_per_device_hour=args.price_per_hour)
        rows.append({"variant": label, **plan_service(service).row()})
    metadata = {"variant": label, "series": args.series, "deadline_hours": args.deadline_hours,
                "num_samples": args.num_samples, "dtype": args.dtype}
    return rows, metadata


def summary(rows: list[dict[str, Any]], command: str) -> list[dict[str, Any]]:
    """The columns a table shows (CSV, JSON and XLSX carry every key)."""
    columns = ("pick", *RUN_SUMMARY) if command == "run" else SERVE_SUMMARY
    return [{key: row[key] for key in columns if key in row} for row in rows]

