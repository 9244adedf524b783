"""Synchronised timing after warm-up, and what the times give: median, p95, throughput, achieved FLOP/s."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

# on_step(stage, done, total): stage is "warmup" or "measure".
StepCallback = Callable[[str, int, int], None]


def measure_step_times_s(
    step: Callable[[], object],
    *,
    warmup: int,
    repeats: int,
    synchronize: Callable[[], None],
    on_step: Optional[StepCallback] = None,
) -> list[float]:
    """Run `step` warmup + repeats times; time the repeats, each between two synchronisations (queued GPU
    work would otherwise be charged to the next step or to nobody)."""
    for done in range(1, warmup + 1):
        step()
        synchronize()
        if on_step:
            on_step("warmup", done, warmup)
    times_s = []
    for done in range(1, repeats + 1):
        synchronize()
        start = time.perf_counter()
        step()
        synchronize()
        times_s.append(time.perf_counter() - start)
        if on_step:
            on_step("measure", done, repeats)
    return times_s


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0–100), linear between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class TimingSummary:
    """Step times of one run, and the rates they give at the median step time."""

    times_s: tuple[float, ...]
    median_s: float
    p95_s: float
    series_per_s: float
    tokens_per_s: float
    achieved_flops_per_s: float


def summarise_times(times_s: Sequence[float], *, series: int, tokens: int, flops: int) -> TimingSummary:
    """Median and p95 of the step times; series/s, tokens/s and FLOP/s (the planner's FLOPs) at the median."""
    median = statistics.median(times_s)
    return TimingSummary(
        times_s=tuple(times_s),
        median_s=median,
        p95_s=percentile(times_s, 95),
        series_per_s=series / median,
        tokens_per_s=tokens / median,
        achieved_flops_per_s=flops / median,
    )
