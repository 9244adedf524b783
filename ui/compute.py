"""The app's only door to the planner: settings in, counted variants out, cached.

Validation happens here, once: the planner's own checks (make_config, Workload) raise ValueError naming
the field; a variant that cannot exist (top-k above its expert count) is reported and left out while
the rest of the grid is still shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import streamlit as st

from model.config import MAX_EXPERTS, ChronosMoEConfig, make_config
from planner.cost.search import SearchSpace as CostSearchSpace, search_plans
from planner.cost.service import ForecastService, plan_service
from planner.communication import Link, bytes_sent_per_step, collective_time_s, step_collectives
from planner.cost.training import TrainingRun, price_training_run
from planner.memory import MemoryBreakdown
from planner.parallel import STRATEGIES, plan_all_strategies
from planner.plan import Plan, breakdown_rows, grid_points, plan, plan_row, trains_something
from planner.solver import Budget, SearchSpace, SolverResult, solve
from planner.units import GIB
from planner.workload import Workload
from ui.sidebar import Settings

CUSTOM = "custom"


def parse_expert_counts(text: str) -> tuple[int, ...]:
    """'0, 4, 8, 16' -> (0, 4, 8, 16); ValueError naming the field otherwise."""
    counts = []
    for part in (p.strip() for p in text.replace(";", ",").split(",")):
        if not part:
            continue
        if not part.isdigit() or int(part) > MAX_EXPERTS:
            raise ValueError(f"experts: {part!r} is not an expert count; give integers from 0 to {MAX_EXPERTS:,} "
                             "separated by commas, e.g. 0, 4, 8, 16")
        counts.append(int(part))
    if not counts:
        raise ValueError("experts: give at least one expert count, e.g. 0, 4, 8, 16 (0 is the dense model)")
    return tuple(sorted(set(counts)))


@dataclass(frozen=True)
class Variant:
    """One row of the grid: the planner's plan and its exact flat row (planner.plan.plan_row) for exports."""

    plan: Plan
    row: dict[str, Any]

    @property
    def label(self) -> str:
        config = self.plan.config
        if not config.is_moe:
            return f"{self.plan.size} · dense"
        return f"{self.plan.size} · MoE-{config.num_experts} top-{config.top_k} · {config.architecture}"


@dataclass(frozen=True)
class PlanTable:
    variants: tuple[Variant, ...]
    problems: tuple[str, ...]  # one line per variant left out, naming the field
    untrained: tuple[str, ...] = ()  # variants left out because the fine-tuning regime trains nothing in them


def workload_of(settings: Settings) -> Workload:
    return Workload(
        batch_size=settings.batch_size, context_length=settings.context_length,
        prediction_length=settings.prediction_length, num_samples=settings.num_samples,
        dtype=settings.dtype, optimizer=settings.optimizer, precision=settings.precision, trainable=settings.trainable,
    )


def _config(settings: Settings, size: str, architecture: str, num_experts: int) -> ChronosMoEConfig:
    dims = dict(settings.custom_dims or ()) if size == CUSTOM else {}
    moe = dict(architecture=architecture, num_experts=num_experts, top_k=settings.top_k,
               router_hidden_dim=settings.router_hidden_dim, dispatch=settings.dispatch,
               expert_capacity=settings.expert_capacity if architecture == "token_ffn" else None)
    return make_config(size, vocab_size=settings.vocab_size, **(moe if num_experts else {}), **dims)


def dense_config(settings: Settings, size: str) -> ChronosMoEConfig:
    """The dense model of one size (a preset, or "custom" from the sidebar's dimensions) at the sidebar's
    vocabulary: the base the Budget tab's solver adds experts to. ValueError naming the field."""
    return _config(settings, size, "dense", 0)


@st.cache_data(max_entries=64, show_spinner=False)
def plan_table(settings: Settings) -> PlanTable:
    """Every size × (dense, architecture × E) the settings span. ValueError for settings no row can use."""
    workload = workload_of(settings)
    experts = parse_expert_counts(settings.experts)
    sizes = settings.sizes + ((CUSTOM,) if settings.custom_dims else ())
    if not sizes:
        raise ValueError("sizes: choose at least one size (or add a custom size)")
    if any(experts) and not settings.architectures:
        raise ValueError("architectures: choose at least one architecture for the MoE variants")
    variants, left_out, untrained = [], {}, []  # left_out: error message -> the variants it leaves out
    usable_sizes = []
    for size in sizes:
        try:  # the backbone first: if it is wrong, no variant of this size can exist
            dense_config(settings, size)
            usable_sizes.append(size)
        except ValueError as error:
            left_out.setdefault(str(error), []).append(f"every {size} variant")
    for size, architecture, num_experts in grid_points(usable_sizes, settings.architectures, experts):
        try:
            config = _config(settings, size, architecture, num_experts)
        except ValueError as error:
            names = left_out.setdefault(str(error), [])
            if f"{architecture} MoE-{num_experts}" not in names:
                names.append(f"{architecture} MoE-{num_experts}")
            continue
        if not trains_something(config, workload):
            untrained.append(f"{size} {config.label}")
            continue
        variant_plan = plan(config, workload, size)
        variants.append(Variant(variant_plan, plan_row(variant_plan)))
    problems = [f"{', '.join(names)} left out: {message}" for message, names in left_out.items()]
    return PlanTable(tuple(variants), tuple(problems), tuple(untrained))


def export_rows(table: PlanTable) -> list[dict[str, Any]]:
    """What the grid shows, exact: the planner's row per variant."""
    return [variant.row for variant in table.variants]


def breakdown_export_rows(variant: Variant) -> list[dict[str, Any]]:
    """The Breakdown tab's numbers, exact: components of parameters and FLOPs, then memory parts."""
    rows = breakdown_rows(variant.plan)
    base = {key: rows[0][key] for key in ("size", "architecture", "num_experts", "top_k")} if rows else {}
    for quantity, parts in memory_parts(variant.plan.memory).items():
        rows += [{**base, "quantity": quantity, "component": part, "value": value} for part, value in parts.items()]
    return rows


def memory_parts(memory: MemoryBreakdown) -> dict[str, dict[str, int]]:
    """Where the bytes go, per phase: the planner's fields, named for people."""
    training, forecast = memory.training, memory.forecast
    return {
        "train_memory_bytes": {
            "weights": training.weights_bytes,
            "gradients": training.gradients_bytes,
            "optimizer states": training.optimizer_states_bytes,
            "activations": training.activations_bytes,
        },
        "forecast_memory_bytes": {
            "weights": forecast.weights_bytes,
            "KV cache (self-attention)": forecast.self_attention_cache_bytes,
            "KV cache (cross-attention)": forecast.cross_attention_cache_bytes,
            "encoder output (per path)": forecast.encoder_output_bytes,
            "largest activation": forecast.largest_activation_bytes,
        },
    }



APP_SOLVE_TIME_LIMIT_S = 10.0  # a page waits no longer for the solver


@st.cache_data(max_entries=64, show_spinner="Checking that every trainable parameter gets a gradient…")
def reachability(config: ChronosMoEConfig, trainable: str) -> tuple[bool, str]:
    """(ok, one line) of planner.gradients' real backward for this variant and regime."""
    from planner.gradients import check_reachability  # torch loads only when a regime is chosen

    reach = check_reachability(config, trainable)
    return reach.ok, reach.summary()


@st.cache_data(max_entries=16, show_spinner=False)
def solve_budget(base: ChronosMoEConfig, target_total_params: int, budget: Budget, architectures: tuple[str, ...],
                 workload: Workload, space: SearchSpace, tolerance: Optional[float]) -> SolverResult:
    """planner.solver.solve: the ranking, the Pareto front and every feasible point. About a second at the
    defaults, behind a button; never longer than APP_SOLVE_TIME_LIMIT_S (the result says if it stopped)."""
    return solve(base, target_total_params, budget, architectures=architectures, workload=workload, space=space,
                 tolerance=tolerance, time_limit_s=APP_SOLVE_TIME_LIMIT_S)


@st.cache_data(max_entries=64, show_spinner=False)
def device_plans(config: ChronosMoEConfig, workload: Workload, num_devices: int, device_memory_bytes: int,
                 precision: str, expert_load_factor: float = 1.0) -> list[dict[str, Any]]:
    """planner.parallel.plan_all_strategies: one row per strategy × activation checkpointing, with `fits`.
    ValueError naming the field (num_devices, precision, expert_load_factor); a device memory ≤ 0 is refused
    here."""
    if device_memory_bytes <= 0:
        raise ValueError(f"device memory must be above 0 GiB, got {device_memory_bytes / GIB:g} GiB")
    return plan_all_strategies(config, workload, num_devices, device_memory_bytes=device_memory_bytes,
                               precision=precision, expert_load_factor=expert_load_factor)


@st.cache_data(max_entries=64, show_spinner=False)
def step_communication(config: ChronosMoEConfig, workload: Workload, num_devices: int, precision: str,
                       link: Link) -> list[dict[str, Any]]:
    """planner.communication.step_collectives of every strategy (expert_parallel for MoE only): one row per
    collective one device runs in a training step, with the bytes it sends (Collective.bytes_sent) and its time
    on `link` (collective_time_s). ValueError naming the field."""
    rows = []
    for strategy in STRATEGIES:
        if strategy == "expert_parallel" and not config.is_moe:
            continue
        for collective in step_collectives(config, workload, strategy, num_devices, precision):
            rows.append({"strategy": strategy, "collective": collective.kind, "purpose": collective.purpose,
                         "phase": collective.phase, "every_micro_step": collective.per_micro_step,
                         "calls": collective.calls, "devices": collective.group_size,
                         "buffer_bytes": collective.buffer_bytes, "bytes_sent_per_device": collective.bytes_sent(),
                         "seconds": collective_time_s(collective, link)})
    return rows


@st.cache_data(max_entries=64, show_spinner=False)
def strategy_bytes_sent(config: ChronosMoEConfig, workload: Workload, num_devices: int, precision: str,
                        micro_steps: int = 1) -> dict[str, int]:
    """Strategy -> bytes one device sends per optimizer step (planner.communication.bytes_sent_per_step over
    its step_collectives), expert_parallel for MoE only. ValueError naming the field."""
    return {strategy: bytes_sent_per_step(step_collectives(config, workload, strategy, num_devices, precision),
                                          micro_steps)
            for strategy in STRATEGIES if strategy != "expert_parallel" or config.is_moe}


@st.cache_data(max_entries=64, show_spinner="Tracing the step and pricing the run…")
def training_run_row(run: TrainingRun) -> dict[str, Any]:
    """planner.cost.training.price_training_run: one run's row (traces are cached on disk as well)."""
    estimate = price_training_run(run)
    collectives = [{"collective": c.kind, "what": c.purpose, "phase": c.phase, "buffer_bytes": c.buffer_bytes,
                    "devices": c.group_size, "calls": c.calls, "every_micro_step": c.per_micro_step,
                    "seconds_per_step": seconds}
                   for c, seconds in estimate.collectives]
    return {**estimate.row(), "collectives": collectives}


@st.cache_data(max_entries=16, show_spinner="Searching GPU × devices × strategy × micro-batch ± checkpointing…")
def plan_search_rows(template: TrainingRun, global_batch: int, gpus: tuple[str, ...],
                     device_counts: tuple[int, ...]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """planner.cost.search.search_plans: (every fitting plan's row with its pick, the Pareto front's rows by
    hours, plans tried)."""
    result = search_plans(template, global_batch, CostSearchSpace(gpus, device_counts))
    front = {id(e) for e in result.pareto_front}
    picks = {id(result.fastest): "fastest", id(result.cheapest): "cheapest"}
    if result.fastest is result.cheapest and result.fastest is not None:
        picks[id(result.fastest)] = "fastest and cheapest"
    rows = {id(e): {"pick": picks.get(id(e), ""), "pareto": id(e) in front, **e.row()} for e in result.plans}
    return list(rows.values()), [rows[id(e)] for e in result.pareto_front], result.tried


@st.cache_data(max_entries=32, show_spinner="Tracing forecasts and pricing the service…")
def service_rows(service: ForecastService) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """planner.cost.service.plan_service: (the chosen batch's row, one row per batch tried)."""
    estimate = plan_service(service)
    options = [{"batch_size": o.batch_size, "latency_s": o.latency_s, "series_per_s_per_device": o.series_per_s,
                "bound": o.step.bound, "fit_status": o.headroom.status, "headroom_bytes": o.headroom.headroom_bytes}
               for o in estimate.options]
    return estimate.row(), options
