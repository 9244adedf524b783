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
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

from model.checks import SettingError
from model.config import ChronosMoEConfig
from model.trainable import nothing_trainable_message
from planner.activations import estimate_activation_bytes
from planner.flops import count_flops
from planner.params import count_params, count_trainable_params
from planner.plan import DENSE, grid_configs, trains_something
from planner.units import GIB
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
           tolerance: float = 0.0, note: str = "") -> Check:
    """Equal, or within `tolerance` (relative); `note` says what the counter could not see."""
    ok = measured == analytic or abs(measured - analytic) <= tolerance * abs(analytic)
    reason = note
    if measured != analytic:
        verdict = f"within the {tolerance:.0%} tolerance" if ok else "unexplained: the planner and the modules disagree"
        reason = "; ".join(filter(None, (verdict, note)))
    return Check(**variant, quantity=quantity, counter=counter, analytic=analytic, measured=measured, ok=ok,
                 reason=reason)


def _variant(size: str, config: ChronosMoEConfig) -> dict[str, Any]:
    return {
        "size": size,
        "architecture": config.architecture if config.is_moe else DENSE,
        "num_experts": config.num_experts,
        "top_k": config.top_k if config.is_moe else 0,
    }


def verify_params(size: str, config: ChronosMoEConfig, trainable: str = "all") -> list[Check]:
    """Total, active, trainable and per-component parameters against the meta-device build."""
    from model.build import build_model_from_config
    from planner.measure import measure_params

    variant, analytic = _variant(size, config), count_params(config)
    measured, one_expert = measure_params(config)
    total = sum(measured.values())
    checks = [_check(variant, "total_params", "meta build", analytic.total_params, total)]
    frozen = build_model_from_config(config, device="meta", trainable=trainable)
    checks.append(_check(variant, "trainable_params", "meta build (requires_grad)",
                         count_trainable_params(analytic, trainable, config.label),
                         sum(p.numel() for p in frozen.parameters() if p.requires_grad)))
    if config.is_moe:
        active = total - (config.num_experts - config.top_k) * one_expert
        checks.append(_check(variant, "active_params", "meta build", analytic.active_params, active))
    for component, count in analytic.components().items():
        if count or measured.get(component):
            checks.append(_check(variant, f"{component}_params", "meta build", count, measured.get(component, 0)))
    for component in sorted(set(measured) - set(analytic.components())):
        checks.append(_check(variant, f"{component}_params", "meta build", 0, measured[component],
                             note="parameters whose names the planner does not map to a component"))
    return checks


CAPACITY_REASON = ("expert_capacity: the count assumes balanced routing, an upper bound; unbalanced routing "
                   "drops more slots")
ROUTING_BOUND_REASON = "data-dependent routing: the estimate bounds the experts that run from above"


def _bounded_check(variant: dict, quantity: str, counter: str, analytic: int, measured: int, bound_reason: str,
                   tolerance: float = 0.0, note: str = "") -> Check:
    """Where routing makes the analytic number an upper bound (`bound_reason` set), falling short is fine."""
    if bound_reason and measured < analytic:
        return Check(**variant, quantity=quantity, counter=counter, analytic=analytic, measured=measured, ok=True,
                     reason=bound_reason)
    return _check(variant, quantity, counter, analytic, measured, tolerance, note)


def verify_flops(size: str, config: ChronosMoEConfig, workload: Workload, *, fvcore: bool = True,
                 forecast: bool = True, activations: bool = True, seed: int = 0) -> list[Check]:
    """FLOPs (FlopCounterMode, fvcore, counted forecast) and saved-activation bytes of one variant."""
    import torch

    from model.trainable import set_trainable
    from planner.measure import measure_saved_activation_bytes
    from planner.measure import (
        ShapeOnlyMatmuls,
        build_shape_only,
        measure_forecast_flops,
        measure_forward_and_train_flops,
        measure_fvcore_forward_flops,
        token_batch,
    )

    variant, analytic = _variant(size, config), count_flops(config, workload)
    capacity = CAPACITY_REASON if config.expert_capacity is not None else ""
    generator = torch.Generator().manual_seed(seed)
    model = build_shape_only(config)
    set_trainable(model, workload.trainable)
    batch = token_batch(config, workload, generator)
    forward_flops, train_flops = measure_forward_and_train_flops(model, batch, shape_only=True)
    checks = [
        _bounded_check(variant, "forward_flops", "FlopCounterMode", analytic.forward_flops, forward_flops, capacity),
        _bounded_check(variant, "train_flops", "FlopCounterMode", analytic.train_flops, train_flops, capacity),
    ]
    if fvcore:
        fvcore_flops, unsupported, uncalled = measure_fvcore_forward_flops(model, batch, shape_only=True)
        checks.append(_bounded_check(variant, "forward_flops", "fvcore (MACs x 2)", analytic.forward_flops,
                                     fvcore_flops, capacity, note=_fvcore_note(unsupported, uncalled)))
    if forecast:
        forecast_flops = measure_forecast_flops(model, workload, generator, shape_only=True)
        checks.append(_bounded_check(variant, "forecast_flops", "counted forecast", analytic.forecast_flops,
                                     forecast_flops, capacity))
    if activations:
        with ShapeOnlyMatmuls():
            measured_bytes = measure_saved_activation_bytes(model, *batch)
        # Which experts run (sample level, several series) and what a capacity drops depend on the routing.
        sample_level = config.is_moe and config.architecture != "token_ffn"
        bound = ROUTING_BOUND_REASON if capacity or (sample_level and workload.batch_size > 1) else ""
        checks.append(_bounded_check(variant, "train_activations_bytes", "saved_tensors_hooks (CPU, fp32)",
                                     estimate_activation_bytes(config, workload, device="cpu"), measured_bytes,
                                     bound, ACTIVATION_TOLERANCE))
    return checks


def _fvcore_note(unsupported: dict[str, int], uncalled: set[str]) -> str:
    """fvcore's gaps, stated: they must all be elementwise or data movement (not counted by convention)."""
    ops = ", ".join(sorted(op.removeprefix("aten::") for op in unsupported)) or "none"
    modules = ", ".join(sorted(uncalled)) or "none"
    return f"fvcore unsupported ops: {ops}; uncalled modules: {modules}"


def verify_variant(size: str, config: ChronosMoEConfig, workload: Workload, **options: Any) -> list[Check]:
    """Every check of one variant (options: fvcore, forecast, activations, seed)."""
    import torch

    # Shape-only execution is bound by per-op overhead, where a second thread only adds contention; the
    # caller's thread count comes back after (the app's server and the tests run other work in this process).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return (verify_params(size, config, workload.trainable) + verify_flops(size, config, workload, **options)
                + [verify_reachability(size, config, workload.trainable)])
    finally:
        torch.set_num_threads(threads)


def verify_reachability(size: str, config: ChronosMoEConfig, trainable: str) -> Check:
    """Every trainable parameter receives a (non-zero) gradient in a real backward (planner.gradients)."""
    from planner.gradients import check_reachability

    reach = check_reachability(config, trainable)
    return Check(**_variant(size, config), quantity="trainable_params_reached", counter="real backward (debug width)",
                 analytic=reach.trainable_params, measured=reach.reached_params, ok=reach.ok,
                 reason="" if reach.ok else reach.summary())


def _estimated_cost(item: tuple[str, ChronosMoEConfig, Workload]) -> int:
    flops = count_flops(item[1], item[2])
    return flops.train_flops + flops.forecast_flops


def _verify_item(item: tuple[str, ChronosMoEConfig, Workload, dict]) -> list[Check]:
    size, config, workload, options = item
    return verify_variant(size, config, workload, **options)


def verification_metadata() -> dict[str, Any]:
    """How every verification measures (for its exports, the CLI's and the app's alike)."""
    from importlib import metadata

    try:
        fvcore_version = metadata.version("fvcore")
    except metadata.PackageNotFoundError:
        fvcore_version = "not installed"
    return {"fvcore": fvcore_version, "device": "cpu", "dtype": "fp32", "attention": "eager",
            "execution": "shape-only (real modules and routing; matrix products not computed, see planner/measure.py)"}


VERIFY_MEMORY_SHARE = 0.8  # of the available memory a verification may plan to use


def check_verify_fits(configs, workload: Workload) -> None:
    """Refuse (ValueError naming the flags) a grid whose largest variant would not fit in this machine's
    memory: verification holds the fp32 weights and measures the activations a training step saves, so
    their planned sizes are what it needs."""
    import psutil

    available = psutil.virtual_memory().available
    needed = max((4 * count_params(config).total_params + estimate_activation_bytes(config, workload, device="cpu")
                  for config in configs), default=0)
    if needed > VERIFY_MEMORY_SHARE * available:
        raise ValueError(f"argument --context-length/--batch-size: verifying this grid needs about "
                         f"{needed / GIB:,.1f} GiB (the largest variant's weights and saved activations) and this machine has "
                         f"{available / GIB:,.1f} GiB available; lower --context-length or --batch-size, or "
                         f"verify smaller --sizes")


def verify_grid(
    sizes: Iterable[str],
    architectures: Iterable[str],
    experts: Iterable[int],
    workload: Workload = Workload(),
    *,
    workers: Optional[int] = None,
    options: Optional[dict[str, Any]] = None,
    progress: Optional[Callable[[int, int, list[Check]], None]] = None,
    **settings: Any,
) -> list[Check]:
    """Checks for every variant of the grid (settings as for `plan_grid`), in worker processes.

    Each worker runs one variant at a time on one thread; the default is one worker per CPU core.
    Variants are started largest first, so no worker is left with a large one at the end.
    `progress(done, total, checks)` is called as each variant finishes.
    """
    configs = grid_configs(sizes, architectures, experts, **settings)
    items = [(size, config, workload, options or {}) for size, config in configs if trains_something(config, workload)]
    if configs and not items:
        raise SettingError("trainable", nothing_trainable_message(workload.trainable, "any variant of this grid"))
    check_verify_fits([item[1] for item in items], workload)
    if workers is not None and not 1 <= workers <= (os.cpu_count() or 1):
        raise SettingError("workers", f"workers must be from 1 to this machine's {os.cpu_count() or 1} cores, got {workers}")
    order = sorted(range(len(items)), key=lambda i: -_estimated_cost(items[i][:3]))
    workers = workers or os.cpu_count() or 1
    results: dict[int, list[Check]] = {}

    def finished(index: int, checks: list[Check]) -> None:
        results[index] = checks
        if progress is not None:
            progress(len(results), len(items), checks)

    if workers == 1 or len(items) == 1:
        for i in order:
            finished(i, _verify_item(items[i]))
    else:
        import multiprocessing

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_verify_item, items[i]): i for i in order}
            for future in as_completed(futures):
                finished(futures[future], future.result())
    return [check for i in range(len(items)) for check in results[i]]


def all_ok(checks: Sequence[Check]) -> bool:
    return all(check.ok for check in checks)
