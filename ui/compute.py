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
from planner.memory import MemoryBreakdown
from planner.parallel import plan_all_strategies
from planner.plan import Plan, breakdown_rows, plan, plan_row
from planner.solver import Budget, SearchSpace, SolverResult, solve
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


def workload_of(settings: Settings) -> Workload:
    return Workload(
        batch_size=settings.batch_size, context_length=settings.context_length,
        prediction_length=settings.prediction_length, num_samples=settings.num_samples,
        dtype=settings.dtype, optimizer=settings.optimizer, precision=settings.precision,
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
    shapes = [(arch, e) for arch in settings.architectures for e in experts if e]
    variants, left_out = [], {}  # error message -> the variants it leaves out
    for size in sizes:
        try:  # the backbone first: if it is wrong, no variant of this size can exist
            dense = _config(settings, size, "dense", 0)
        except ValueError as error:
            left_out.setdefault(str(error), []).append(f"every {size} variant")
            continue
        configs = [dense] if 0 in experts else []
        for architecture, num_experts in shapes:
            try:
                configs.append(_config(settings, size, architecture, num_experts))
            except ValueError as error:
                names = left_out.setdefault(str(error), [])
                if f"{architecture} MoE-{num_experts}" not in names:
                    names.append(f"{architecture} MoE-{num_experts}")
        for config in configs:
            variant_plan = plan(config, workload, size)
            variants.append(Variant(variant_plan, plan_row(variant_plan)))
    problems = [f"{', '.join(names)} left out: {message}" for message, names in left_out.items()]
    return PlanTable(tuple(variants), tuple(problems))


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



@st.cache_data(max_entries=16, show_spinner=False)
def solve_budget(base: ChronosMoEConfig, target_total_params: int, budget: Budget, architectures: tuple[str, ...],
                 workload: Workload, space: SearchSpace, tolerance: Optional[float]) -> SolverResult:
    """planner.solver.solve: the ranking, the Pareto front and every feasible point. About a second: behind
    a button."""
    return solve(base, target_total_params, budget, architectures=architectures, workload=workload, space=space,
                 tolerance=tolerance)


@st.cache_data(max_entries=64, show_spinner=False)
def device_plans(config: ChronosMoEConfig, workload: Workload, num_devices: int, device_memory_bytes: int,
                 precision: str) -> list[dict[str, Any]]:
    """planner.parallel.plan_all_strategies: one row per strategy × activation checkpointing, with `fits`.
    ValueError naming the field (num_devices, precision); a device memory ≤ 0 is refused here."""
    if device_memory_bytes <= 0:
        raise ValueError(f"device memory must be above 0 GiB, got {device_memory_bytes / 2**30:g} GiB")
    return plan_all_strategies(config, workload, num_devices, device_memory_bytes=device_memory_bytes,
                               precision=precision)
