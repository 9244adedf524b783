"""`planner.verify`: the analytic counts beside measurements of the real modules, with the reason for any
difference (issue 3: parameters, forward / training / forecast FLOPs, activation bytes).

What is measured, and how (details in planner/measure.py):
- parameters: the modules built on the meta device, unique tensors, by component; active parameters as the
  measured total less the E − K experts a series does not use (one expert's measured size);
- forward and training-step FLOPs: FlopCounterMode over a teacher-forced forward and its backward;
- forward FLOPs again with fvcore (MACs × 2), with its unsupported ops and uncalled modules;
- forecast FLOPs: a real `model.forecast`, counted op by op with FlopCounterMode's formulas;
- activation bytes: tensors saved for backward (`torch.autograd.graph.saved_tensors_hooks`), on CPU in
  fp32, beside `planner.activations.estimate_activation_bytes(..., device="cpu")`.
FLOPs and activations come from shape-only execution (real code path and shapes, matrix products not
computed), so the whole grid at the Chronos shapes fits in minutes on two cores.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Optional, Sequence

from model.config import ChronosMoEConfig
from planner.activations import estimate_activation_bytes
from planner.flops import count_flops
from planner.params import count_params
from planner.plan import DENSE, grid_configs
from planner.workload import Workload

ACTIVATION_TOLERANCE = 0.03  # the target for saved-activation bytes; everything else is exact
QUICK_SIZES = ("debug", "tiny")
QUICK_EXPERTS = (0, 4)


@dataclass(frozen=True)
class Check:
    """One analytic number beside its measurement."""

    size: str
    architecture: str
    num_experts: int
    top_k: int
    quantity: str
    counter: str
    analytic: int
    measured: int
    ok: bool
    reason: str = ""

    @property
    def difference(self) -> int:
        return self.measured - self.analytic

    def row(self) -> dict[str, Any]:
        relative = self.difference / self.analytic if self.analytic else float(self.difference != 0)
        return {**asdict(self), "difference": self.difference, "relative_difference": relative}


def _check(variant: dict, quantity: str, counter: str, analytic: int, measured: int,
           tolerance: float = 0.0, reason: str = "") -> Check:
    ok = measured == analytic or abs(measured - analytic) <= tolerance * abs(analytic)
    if not ok and not reason:
        reason = "unexplained: the planner and the modules disagree"
    return Check(**variant, quantity=quantity, counter=counter, analytic=analytic, measured=measured, ok=ok,
                 reason=reason)


def _variant(size: str, config: ChronosMoEConfig) -> dict[str, Any]:
    return {
        "size": size,
        "architecture": config.architecture if config.is_moe else DENSE,
        "num_experts": config.num_experts,
        "top_k": config.top_k if config.is_moe else 0,
    }


def verify_params(size: str, config: ChronosMoEConfig) -> list[Check]:
    """Total, active and per-component parameters against the meta-device build."""
    from planner.measure import measure_params

    variant, analytic = _variant(size, config), count_params(config)
    measured, one_expert = measure_params(config)
    total = sum(measured.values())
    checks = [_check(variant, "total_params", "meta build", analytic.total_params, total)]
    if config.is_moe:
        active = total - (config.num_experts - config.top_k) * one_expert
        checks.append(_check(variant, "active_params", "meta build", analytic.active_params, active))
    for component, count in analytic.components().items():
        if count or measured.get(component):
            checks.append(_check(variant, f"{component}_params", "meta build", count, measured.get(component, 0)))
    for component in sorted(set(measured) - set(analytic.components())):
        checks.append(_check(variant, f"{component}_params", "meta build", 0, measured[component],
                             reason="parameters whose names the planner does not map to a component"))
    return checks


def _capacity_reason(config: ChronosMoEConfig) -> str:
    if config.expert_capacity is None:
        return ""
    return ("expert_capacity: the count assumes balanced routing, an upper bound; "
            "unbalanced routing drops more slots")


def verify_flops(size: str, config: ChronosMoEConfig, workload: Workload, *, fvcore: bool = True,
                 forecast: bool = True, activations: bool = True, seed: int = 0) -> list[Check]:
    """FLOPs (FlopCounterMode, fvcore, counted forecast) and saved-activation bytes of one variant."""
    import torch

    from planner.activations import measure_saved_activation_bytes
    from planner.measure import (
        ShapeOnlyMatmuls,
        build_shape_only,
        measure_forecast_flops,
        measure_forward_and_train_flops,
        measure_fvcore_forward_flops,
        token_batch,
    )

    variant, analytic = _variant(size, config), count_flops(config, workload)
    # With a capacity factor only an overshoot is wrong: the count is the balanced-routing upper bound.
    capacity_reason = _capacity_reason(config)

    def flop_check(quantity: str, counter: str, analytic_flops: int, measured_flops: int, note: str = "") -> Check:
        if capacity_reason and measured_flops < analytic_flops:
            return Check(**variant, quantity=quantity, counter=counter, analytic=analytic_flops,
                         measured=measured_flops, ok=True, reason=capacity_reason)
        return _check(variant, quantity, counter, analytic_flops, measured_flops, reason=note)

    generator = torch.Generator().manual_seed(seed)
    model = build_shape_only(config)
    batch = token_batch(config, workload, generator)
    checks = []
    with ShapeOnlyMatmuls():
        forward_flops, train_flops = measure_forward_and_train_flops(model, batch)
        checks.append(flop_check("forward_flops", "FlopCounterMode", analytic.forward_flops, forward_flops))
        checks.append(flop_check("train_flops", "FlopCounterMode", analytic.train_flops, train_flops))
        if fvcore:
            fvcore_flops, unsupported, uncalled = measure_fvcore_forward_flops(model, batch)
            note = _fvcore_note(unsupported, uncalled)
            checks.append(flop_check("forward_flops", "fvcore (MACs x 2)", analytic.forward_flops, fvcore_flops, note))
        if forecast:
            forecast_flops = measure_forecast_flops(model, workload, generator)
            checks.append(flop_check("forecast_flops", "counted forecast", analytic.forecast_flops, forecast_flops))
        if activations:
            measured_bytes = measure_saved_activation_bytes(model, *batch)
            estimated = estimate_activation_bytes(config, workload, device="cpu")
            checks.append(_check(variant, "train_activations_bytes", "saved_tensors_hooks (CPU, fp32)", estimated,
                                 measured_bytes, ACTIVATION_TOLERANCE,
                                 "data-dependent routing: the estimate bounds the experts that run from above"
                                 if measured_bytes != estimated and config.is_moe else ""))
    return checks


def _fvcore_note(unsupported: dict[str, int], uncalled: set[str]) -> str:
    """fvcore's gaps, stated: they must all be elementwise or data movement (not counted by convention)."""
    ops = ", ".join(sorted(op.removeprefix("aten::") for op in unsupported)) or "none"
    modules = ", ".join(sorted(uncalled)) or "none"
    return f"fvcore unsupported ops: {ops}; uncalled modules: {modules}"


def verify_variant(size: str, config: ChronosMoEConfig, workload: Workload, **options: Any) -> list[Check]:
    """Every check of one variant (options: fvcore, forecast, activations, seed)."""
    import torch

    # Shape-only execution is bound by per-op overhead, where a second thread only adds contention.
    torch.set_num_threads(1)
    return verify_params(size, config) + verify_flops(size, config, workload, **options)


def _estimated_cost(item: tuple[str, ChronosMoEConfig, Workload]) -> int:
    flops = count_flops(item[1], item[2])
    return flops.train_flops + flops.forecast_flops


def _verify_item(item: tuple[str, ChronosMoEConfig, Workload, dict]) -> list[Check]:
    size, config, workload, options = item
    return verify_variant(size, config, workload, **options)


def verify_grid(
    sizes: Iterable[str],
    architectures: Iterable[str],
    experts: Iterable[int],
    workload: Workload = Workload(),
    *,
    workers: Optional[int] = None,
    options: Optional[dict[str, Any]] = None,
    **settings: Any,
) -> list[Check]:
    """Checks for every variant of the grid (settings as for `plan_grid`), in worker processes.

    Each worker runs one variant at a time on one thread; the default is one worker per CPU core.
    Variants are started largest first, so no worker is left with a large one at the end.
    """
    items = [(size, config, workload, options or {})
             for size, config in grid_configs(sizes, architectures, experts, **settings)]
    order = sorted(range(len(items)), key=lambda i: -_estimated_cost(items[i][:3]))
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(items) == 1:
        results = {i: _verify_item(items[i]) for i in order}
    else:
        import multiprocessing

        # A fresh process per variant: freed tensor memory is not given back to the system, and two large
        # variants in a row would otherwise hold both peaks.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, max_tasks_per_child=1) as pool:
            futures = {i: pool.submit(_verify_item, items[i]) for i in order}
            results = {i: future.result() for i, future in futures.items()}
    return [check for i in range(len(items)) for check in results[i]]


def all_ok(checks: Sequence[Check]) -> bool:
    return all(check.ok for check in checks)
