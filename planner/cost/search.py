"""The fastest and the cheapest training plans that fit and reach a global batch, and the front between.

The space: GPU presets × device counts × strategies × per-device micro-batch × gradient accumulation ±
activation checkpointing, with micro-batch × devices × accumulation = the global batch. Every point is
priced by planner.cost.training; a plan qualifies when it fits its device with headroom (planner.headroom).
Memory grows with the micro-batch, so for each GPU, device count, strategy and checkpointing the micro-batches
are tried in ascending order and the first that does not fit ends them (the larger ones cannot fit either).
The fastest plan has the fewest hours, the cheapest the lowest cost; ties go to the larger headroom. The
Pareto front holds every plan no other plan beats on both hours and cost, sorted by hours.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Optional

from planner.cost.training import MicroStep, RunEstimate, TrainingRun, micro_step, price_training_run
from planner.parallel import STRATEGIES


@dataclass(frozen=True)
class SearchSpace:
    gpus: tuple[str, ...]
    device_counts: tuple[int, ...]
    strategies: tuple[str, ...] = STRATEGIES
    checkpointing: tuple[bool, ...] = (False, True)


@dataclass(frozen=True)
class SearchResult:
    plans: tuple[RunEstimate, ...]  # every plan that fits, in the order tried
    tried: int  # plans priced, fitting or not

    @property
    def fastest(self) -> Optional[RunEstimate]:
        return min(self.plans, key=lambda e: (e.hours, -e.headroom.headroom_bytes), default=None)

    @property
    def cheapest(self) -> Optional[RunEstimate]:
        return min(self.plans, key=lambda e: (e.cost_usd, -e.headroom.headroom_bytes), default=None)

    @property
    def pareto_front(self) -> list[RunEstimate]:
        return pareto_front(self.plans)


def pareto_front(plans: Iterable[RunEstimate]) -> list[RunEstimate]:
    """Plans no other plan beats on both hours and cost (equal on both: the larger headroom stays)."""
    ordered = sorted(plans, key=lambda e: (e.hours, e.cost_usd, -e.headroom.headroom_bytes))
    front: list[RunEstimate] = []
    for estimate in ordered:
        if not front or estimate.cost_usd < front[-1].cost_usd:
            front.append(estimate)
    return front


def micro_batches(global_batch: int, num_devices: int) -> list[int]:
    """Per-device micro-batches that reach `global_batch` on `num_devices` with a whole accumulation."""
    if global_batch % num_devices:
        return []
    per_device = global_batch // num_devices
    return [b for b in range(1, per_device + 1) if per_device % b == 0]


def search_plans(template: TrainingRun, global_batch: int, space: SearchSpace) -> SearchResult:
    """Every fitting plan of `space` at `global_batch`, the rest of the run as in `template` (steps, variant,
    lengths, precision, price when the template sets one for a single GPU type, links)."""
    micro_steps: dict[tuple[str, int], MicroStep] = {}
    plans: list[RunEstimate] = []
    tried = 0
    for gpu in space.gpus:
        for num_devices in space.device_counts:
            for strategy in space.strategies:
                if strategy == "expert_parallel" and not template.config.is_moe:
                    continue
                for checkpointing in space.checkpointing:
                    for batch in micro_batches(global_batch, num_devices):
                        run = dataclasses.replace(
                            template, gpu=gpu, num_devices=num_devices, devices_per_node=None, strategy=strategy,
                            activation_checkpointing=checkpointing, per_device_batch=batch,
                            gradient_accumulation=global_batch // (num_devices * batch),
                            price_per_device_hour=template.price_per_device_hour if len(space.gpus) == 1 else None)
                        key = (gpu, batch)
                        if key not in micro_steps:
                            micro_steps[key] = micro_step(run)
                        estimate = price_training_run(run, micro_steps[key])
                        tried += 1
                        if not estimate.headroom.fits:
                            break  # a larger micro-batch needs more memory still
                        plans.append(estimate)
    return SearchResult(tuple(plans), tried)
