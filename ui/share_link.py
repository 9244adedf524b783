"""Share links checked before any widget reads them.

Every widget is bound to a query parameter, and Streamlit reads a bound value as the widget is drawn: a
value it cannot convert (`?top_k=inf`) raises inside Streamlit, and one it rejects (`?top_k=-3`,
`?sizes=huge`) silently becomes the default, so a shared view is not what its sender saw and nobody says
so. `check_share_link()` runs first: it refuses every such value with one line naming the parameter and
what is allowed, removes it from the address, and reruns, so the widgets start from their defaults and the
page says why.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import streamlit as st

from model.components import COMPONENTS
from model.config import ARCHITECTURES, DISPATCH_MODES, MAX_CAPACITY_FACTOR
from model.presets import DIMENSION_FIELDS, PRESETS
from planner.bench import DEVICES, DTYPES, MODES, PREDICTION_DEVICES
from planner.cost.service import SERVICE_DTYPES
from planner.cost.training import PRECISIONS, PRICED_GPUS
from planner.parallel import STRATEGIES
from planner.solver import BUDGET_KINDS, TOKEN_BLOCK_PATTERNS
from planner.workload import DTYPE_BYTES, OPTIMIZERS, PRECISION_REGIMES
from ui.sidebar import TRAINABLE_CHOICES

PROBLEMS_KEY = "share_link_problems"
LARGEST_NUMBER = 1e15  # no setting of the planner comes near it; Streamlit's number widgets overflow past 2^63
MAX_SHOWN_CHARS = 40

Check = Callable[[list[str]], Optional[str]]  # the parameter's values -> what is allowed, when they are not


def _integer(low: int) -> Check:
    def check(values: list[str]) -> Optional[str]:
        try:
            value = int(values[-1])
        except ValueError:
            return f"an integer ≥ {low}"
        return None if low <= value <= LARGEST_NUMBER else f"an integer from {low} to {LARGEST_NUMBER:.0e}"
    return check


def _capacity(values: list[str]) -> Optional[str]:
    try:
        value = float(values[-1])
    except ValueError:
        value = math.nan
    return None if 0 < value <= MAX_CAPACITY_FACTOR else f"a capacity factor > 0 and ≤ {MAX_CAPACITY_FACTOR:g}"


def one_of(options: Sequence[str]) -> Check:
    def check(values: list[str]) -> Optional[str]:
        return None if values[-1] in options else f"one of {', '.join(options)}"
    return check


def _each_of(options: Sequence[str]) -> Check:
    def check(values: list[str]) -> Optional[str]:
        named = [value for value in values if value]
        return None if all(value in options for value in named) else f"each one of {', '.join(options)}"
    return check


# The sidebar's settings, which every tab uses; other parameters get the generic number check below.
CHECKS: dict[str, Check] = {
    "sizes": _each_of(list(PRESETS)), "architectures": _each_of(list(ARCHITECTURES)),
    "top_k": _integer(1), "router_hidden_dim": _integer(1), "vocab_size": _integer(4),
    "context_length": _integer(1), "prediction_length": _integer(1), "batch_size": _integer(1),
    "num_samples": _integer(1), "expert_capacity": _capacity, "dtype": one_of(list(DTYPE_BYTES)),
    "optimizer": one_of(list(OPTIMIZERS)), "precision": one_of(list(PRECISION_REGIMES)),
    "dispatch": one_of(list(DISPATCH_MODES)), "trainable": one_of(list(TRAINABLE_CHOICES)),
    "trainable_components": _each_of(list(COMPONENTS)),
    **{name: _integer(1) for name in DIMENSION_FIELDS},
    # Other tabs' counts, which their widgets would otherwise clamp without a word
    **{name: _integer(1) for name in ("devices_count", "cost_devices", "cost_global_batch", "cost_accumulation",
                                      "cost_steps", "serve_series", "bench_top_k", "budget_max_experts",
                                      "budget_max_top_k")},
    # ... and their fixed choices, which their widgets would otherwise drop without a word
    "bench_sizes": _each_of(list(PRESETS)), "bench_modes": _each_of(list(MODES)),
    "bench_dispatch": _each_of(list(DISPATCH_MODES)), "bench_architectures": _each_of(list(ARCHITECTURES)),
    "bench_device": one_of(list(DEVICES)), "bench_dtype": one_of(list(DTYPES)),
    "bench_predict_device": one_of(list(PREDICTION_DEVICES)), "budget_kind": one_of(list(BUDGET_KINDS)),
    "budget_architectures": _each_of(list(ARCHITECTURES)), "budget_blocks": _each_of(list(TOKEN_BLOCK_PATTERNS)),
    **{name: one_of(list(PRICED_GPUS)) for name in ("cost_gpu", "serve_gpu")},
    "cost_search_gpus": _each_of(list(PRICED_GPUS)), "cost_precision": one_of(list(PRECISIONS)),
    "cost_strategy": one_of(list(STRATEGIES)), "serve_dtype": one_of(list(SERVICE_DTYPES)),
}


def _finite_numbers(values: list[str]) -> Optional[str]:
    """Any parameter: a value that reads as a number must be finite and of a sane size."""
    for value in values:
        try:
            number = float(value)
        except ValueError:
            continue
        if not math.isfinite(number) or abs(number) > LARGEST_NUMBER:
            return f"a finite number of magnitude ≤ {LARGEST_NUMBER:.0e}"
    return None


def share_link_problems(parameters: dict[str, list[str]], checks: Optional[dict[str, Check]] = None) -> dict[str, str]:
    """Parameter -> one line saying what it holds and what is allowed, for each value the page would
    misread; `parameters` maps each name to its values (a multiselect repeats its name); `checks` adds
    the page's own parameters to CHECKS."""
    checks = {**CHECKS, **(checks or {})}
    problems = {}
    for name, values in parameters.items():
        if not values:
            continue
        allowed = _finite_numbers(values) or (checks[name](values) if name in checks else None)
        if allowed:
            shown = ", ".join(values)
            shown = shown if len(shown) <= MAX_SHOWN_CHARS else shown[:MAX_SHOWN_CHARS] + "…"
            problems[name] = f"Share link: {name}={shown} is not allowed ({allowed}); the default is shown instead."
    return problems


def check_share_link(checks: Optional[dict[str, Check]] = None) -> None:
    """Call before any widget: refuse the address's bad values (see the module docstring), then rerun."""
    parameters = {name: st.query_params.get_all(name) for name in st.query_params}
    problems = share_link_problems(parameters, checks)
    if not problems:
        return
    for name in problems:
        del st.query_params[name]
    st.session_state[PROBLEMS_KEY] = list(problems.values())
    st.rerun()


def draw_share_link_problems() -> None:
    """One warning per refused value, once (the next rerun has a clean address)."""
    for line in st.session_state.pop(PROBLEMS_KEY, []):
        st.warning(line, icon=":material/link_off:")
