"""One variant at one workload, rolled up: parameters, FLOPs (with their ratios to the dense model of the
same size) and memory, as a frozen Plan and as a flat row for exports.

The dense model appears once per size: its row says architecture "dense" (num_experts 0, top_k 0), since
none of the MoE architectures applies to it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable, Iterator, Optional

from model.checks import SettingError
from model.config import ChronosMoEConfig, make_config
from model.presets import BackboneDims
from model.trainable import nothing_trainable_message, trainable_components
from planner.flops import FlopCounts, count_flops
from planner.memory import MemoryBreakdown, estimate_memory
from planner.params import ParamBreakdown, count_params, count_trainable_params
from planner.workload import Workload

DENSE = "dense"


@dataclass(frozen=True)
class Plan:
    """Everything the planner says about one variant at one workload (all FLOPs per batch)."""

    size: str
    config: ChronosMoEConfig
    workload: Workload
    params: ParamBreakdown
    flops: FlopCounts
    dense_params: ParamBreakdown
    dense_flops: FlopCounts
    memory: MemoryBreakdown

    @property
    def architecture(self) -> str:
        return self.config.architecture if self.config.is_moe else DENSE


def plan(config: ChronosMoEConfig, workload: Workload = Workload(), size: str = "custom") -> Plan:
    """Count one variant and its dense counterpart. `size` is the label rows carry (the preset name)."""
    params = count_params(config)
    dense_params, dense_flops = _dense_counts(config.dims, workload)
    return Plan(
        size=size,
        config=config,
        workload=workload,
        params=params,
        flops=count_flops(config, workload),
        dense_params=dense_params,
        dense_flops=dense_flops,
        memory=estimate_memory(config, workload, params),
    )


@lru_cache(maxsize=64)
def _dense_counts(dims: BackboneDims, workload: Workload) -> tuple[ParamBreakdown, FlopCounts]:
    """The dense model's counts, shared by every variant of a size in a grid. The dense model is compared
    fully trained, whatever the variant's fine-tuning regime (a frozen-backbone regime leaves it nothing)."""
    dense = ChronosMoEConfig(dims)
    return count_params(dense), count_flops(dense, dataclasses.replace(workload, trainable="all"))


def grid_points(sizes: Iterable[str], architectures: Iterable[str],
                experts: Iterable[int]) -> Iterator[tuple[str, str, int]]:
    """(size, architecture, E) of a grid, in the order every table and benchmark lists them: per size, the
    dense model once (DENSE, 0) when 0 is among `experts`, then every architecture × E > 0; repeated values
    once."""
    architectures, experts = list(dict.fromkeys(architectures)), list(dict.fromkeys(experts))
    for size in dict.fromkeys(sizes):
        if 0 in experts:
            yield size, DENSE, 0
        for architecture in architectures:
            for num_experts in (e for e in experts if e != 0):
                yield size, architecture, num_experts


def grid_configs(
    sizes: Iterable[str],
    architectures: Iterable[str],
    experts: Iterable[int],
    *,
    top_k: int = 2,
    router_hidden_dim: int = 256,
    vocab_size: int = 4096,
    dispatch: str = "sparse",
    expert_capacity: Optional[float] = None,
) -> list[tuple[str, ChronosMoEConfig]]:
    """(size, config) for every size × (dense once if 0 is in `experts`, then architecture × E > 0).

    `expert_capacity` applies to token_ffn configs only (sample-level routing drops nothing).
    """
    configs = []
    for size, architecture, num_experts in grid_points(sizes, architectures, experts):
        if architecture == DENSE:
            configs.append((size, make_config(size, vocab_size=vocab_size)))
            continue
        capacity = expert_capacity if architecture == "token_ffn" else None
        configs.append((size, make_config(size, architecture=architecture, num_experts=num_experts, top_k=top_k,
                                          router_hidden_dim=router_hidden_dim, vocab_size=vocab_size,
                                          dispatch=dispatch, expert_capacity=capacity)))
    return configs


def plan_grid(
    sizes: Iterable[str],
    architectures: Iterable[str],
    experts: Iterable[int],
    workload: Workload = Workload(),
    **settings: Any,
) -> list[Plan]:
    """Plans for the grid `grid_configs` spans (settings: top_k, router_hidden_dim, vocab_size, ...), less the
    variants the fine-tuning regime leaves nothing to train in (`untrained_variants` names them); SettingError
    naming `trainable` when that is every variant."""
    configs = grid_configs(sizes, architectures, experts, **settings)
    plans = [plan(config, workload, size) for size, config in configs if trains_something(config, workload)]
    if configs and not plans:
        raise SettingError("trainable", nothing_trainable_message(workload.trainable, "any variant of this grid"))
    return plans


def trains_something(config: ChronosMoEConfig, workload: Workload) -> bool:
    """Whether the workload's fine-tuning regime has parameters to train in this variant."""
    components = trainable_components(workload.trainable)
    return any(count for name, count in count_params(config).components().items() if name in components)


def untrained_variants(sizes: Iterable[str], architectures: Iterable[str], experts: Iterable[int],
                       workload: Workload, **settings: Any) -> list[str]:
    """'size label' of each variant of the grid that `plan_grid` leaves out for its regime."""
    return [f"{size} {config.label}" for size, config in grid_configs(sizes, architectures, experts, **settings)
            if not trains_something(config, workload)]


def _variant_columns(p: Plan) -> dict[str, Any]:
    return {
        "size": p.size,
        "architecture": p.architecture,
        "num_experts": p.config.num_experts,
        "top_k": p.config.top_k if p.config.is_moe else 0,
    }


def plan_row(p: Plan) -> dict[str, Any]:
    """A flat row: the variant, the workload, then the counts (keys documented in the README's "table rows" section)."""
    config, workload, params, flops, memory = p.config, p.workload, p.params, p.flops, p.memory
    b = workload.batch_size
    row: dict[str, Any] = {
        **_variant_columns(p),
        "dispatch": config.dispatch,
        "expert_capacity": config.expert_capacity,
        "router_hidden_dim": config.router_hidden_dim if config.is_moe and config.architecture != "token_ffn" else 0,
        "d_model": config.dims.d_model,
        "vocab_size": config.dims.vocab_size,
        "batch_size": b,
        "context_length": workload.context_length,
        "prediction_length": workload.prediction_length,
        "num_samples": workload.num_samples,
        "dtype": workload.dtype,
        "optimizer": workload.optimizer,
        "precision": workload.precision,
        "trainable": workload.trainable,
        "total_params": params.total_params,
        "active_params": params.active_params,
        "expert_params": params.expert_params,
        "trainable_params": count_trainable_params(params, workload.trainable, config.label),
        "params_increase_over_dense": params.total_params - p.dense_params.total_params,
        "total_params_vs_dense": params.total_params / p.dense_params.total_params,
        "active_params_vs_dense": params.active_params / p.dense_params.total_params,
    }
    for name in ("forward", "train", "forecast"):
        value, dense_value = getattr(flops, f"{name}_flops"), getattr(p.dense_flops, f"{name}_flops")
        row[f"{name}_flops"] = value
        row[f"{name}_flops_per_series"] = value / b
        row[f"{name}_flops_vs_dense"] = value / dense_value
    training, forecast = memory.training, memory.forecast
    row.update(
        weights_fp32_bytes=memory.weights.fp32_bytes,
        weights_fp16_bytes=memory.weights.fp16_bytes,
        weights_bf16_bytes=memory.weights.bf16_bytes,
        weights_int8_bytes=memory.weights.int8_bytes,
        train_weights_bytes=training.weights_bytes,
        train_gradients_bytes=training.gradients_bytes,
        train_optimizer_states_bytes=training.optimizer_states_bytes,
        train_activations_bytes=training.activations_bytes,
        train_memory_bytes=training.total_bytes,
        forecast_weights_bytes=forecast.weights_bytes,
        forecast_self_attention_cache_bytes=forecast.self_attention_cache_bytes,
        forecast_cross_attention_cache_bytes=forecast.cross_attention_cache_bytes,
        forecast_encoder_output_bytes=forecast.encoder_output_bytes,
        forecast_largest_activation_bytes=forecast.largest_activation_bytes,
        forecast_memory_bytes=forecast.total_bytes,
        what_if_active_experts_forecast_memory_bytes=forecast.what_if_active_experts_total_bytes,
    )
    return row


def breakdown_rows(p: Plan) -> list[dict[str, Any]]:
    """Long-format rows, one per (quantity, component): parameters and forward / forecast FLOPs."""
    variant = _variant_columns(p)
    quantities = (
        ("params", p.params.components()),
        ("forward_flops", p.flops.forward.components()),
        ("forecast_flops", p.flops.forecast.components()),
    )
    return [
        {**variant, "quantity": quantity, "component": component, "value": value}
        for quantity, components in quantities
        for component, value in components.items()
    ]
