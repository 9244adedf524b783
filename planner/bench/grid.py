"""The grid of benchmark runs a user asks for, the same for the CLI (`python -m planner bench`) and the
app's Benchmark tab: for each size and mode, the dense model once (when 0 is among the expert counts), then
every architecture × expert count × dispatch."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Optional, Sequence

from model.checks import SettingError
from planner.bench.spec import BenchSpec
from planner.plan import DENSE, grid_points


def bench_grid(sizes: Iterable[str], modes: Sequence[str], architectures: Sequence[str], experts: Sequence[int],
               dispatch: Sequence[str] = ("sparse",), expert_capacity: Optional[float] = None,
               recalibrate: bool = False, **settings: Any) -> list[BenchSpec]:
    """The runs, dense first within each size and mode; repeated values give one run each. `settings` are
    BenchSpec fields shared by every run (top_k, batch_size, device, repeats, ...); `expert_capacity` applies
    to token_ffn runs only; `recalibrate` re-probes the device in the first run, which the others then use.
    Training runs a `trainable` regime leaves nothing to train in (the dense model under experts_and_router)
    are left out. Raises ValueError naming a bad setting."""
    sizes = list(dict.fromkeys(sizes))
    if not sizes:
        raise ValueError("sizes: give at least one size preset")
    specs: list[BenchSpec] = []
    refused: Optional[SettingError] = None

    def add(**fields: Any) -> None:
        nonlocal refused
        try:
            specs.append(BenchSpec(**fields, **settings))
        except SettingError as error:
            if error.field != "trainable" or fields["mode"] != "train":
                raise
            refused = error

    for size in sizes:
        for mode in dict.fromkeys(modes):
            for _, architecture, num_experts in grid_points([size], architectures, experts):
                if architecture == DENSE:
                    add(size=size, mode=mode)
                    continue
                capacity = expert_capacity if architecture == "token_ffn" else None
                for mode_of_dispatch in dict.fromkeys(dispatch):
                    add(size=size, mode=mode, architecture=architecture, num_experts=num_experts,
                        dispatch=mode_of_dispatch, expert_capacity=capacity)
    if not specs and refused is not None:
        raise refused
    return [dataclasses.replace(spec, recalibrate=recalibrate and index == 0) for index, spec in enumerate(specs)]
