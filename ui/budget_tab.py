"""The Budget tab: the inverse question. Which (E, K, router width) of a base size come closest to a target
total size while staying within a budget? planner.solver answers; this module draws it.

Solving takes about a second, so it runs behind a button; its result is cached and kept in the session
until an input changes. "Open in Plan" fills the sidebar through the same mechanism as an upload
(ui.uploads.moe_values onto the sidebar's keys, in a callback) and switches to the Plan tab.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import pandas as pd
import streamlit as st

from model.config import ARCHITECTURES, MAX_EXPERTS, ChronosMoEConfig
from model.presets import PRESETS
from planner.solver import (BUDGET_KINDS, DEFAULT_BASE_SIZE, DEFAULT_ROUTER_WIDTHS, TOKEN_BLOCK_PATTERNS, Budget,
                            SearchSpace, SolverResult)
from planner.workload import Workload
from ui.compute import APP_SOLVE_TIME_LIMIT_S, CUSTOM, PlanTable, dense_config, solve_budget, workload_of
from planner.units import GIB, format_bytes, format_count, format_ratio, to_millions
from ui.sidebar import BIND, Settings, fill_sidebar
from ui.uploads import moe_values

SHOWN_CANDIDATES = 20
PLAN_BLOCK_PATTERN = "every_second"  # the only token_ffn block pattern the sidebar (and so Plan) can express


@dataclass(frozen=True)
class BudgetUnit:
    """How a budget kind is typed in (label, unit, scale to the solver's unit, default) and shown."""

    label: str
    unit: str
    scale: float
    default: float
    shown: Callable[[float], str]


SOLVED_PARAM = "budget_solved"  # in the address once solved, so a shared link shows the answer

BUDGET_UNITS = {
    "active_params": BudgetUnit("Active parameters per series", "M", 1e6, 50.0, format_count),
    "trainable_params": BudgetUnit("Trainable parameters (the sidebar's Trainable)", "M", 1e6, 20.0, format_count),
    "forward_flops": BudgetUnit("Forward FLOPs per series", "GFLOP", 1e9, 20.0, lambda v: format_count(v, "FLOP")),
    "flop_ratio": BudgetUnit("Forward FLOPs over dense", "×", 1.0, 1.5, format_ratio),
    "train_memory": BudgetUnit("Training memory per device", "GiB", GIB, 4.0, format_bytes),
    "forecast_memory": BudgetUnit("Forecast memory per device", "GiB", GIB, 2.0, format_bytes),
}


@dataclass(frozen=True)
class Problem:
    """One solve, exactly as solve_budget takes it (and the key of the result kept in the session)."""

    size: str
    base: ChronosMoEConfig
    target_total_params: int
    budget: Budget
    architectures: tuple[str, ...]
    space: SearchSpace
    tolerance: Optional[float]


def _draw_inputs(settings: Settings) -> dict:
    sizes = list(PRESETS) + ([CUSTOM] if settings.custom_dims else [])
    # The sidebar's size when it names one (or only a custom one), else where `solve` starts.
    chosen = list(settings.sizes) + ([CUSTOM] if settings.custom_dims else [])
    first = chosen[0] if len(chosen) == 1 else DEFAULT_BASE_SIZE
    left, middle, right = st.columns([1, 3, 1])
    size = left.selectbox("Base size", sizes, index=sizes.index(first), key="budget_size", bind=BIND,
                          help="The dense Chronos-T5 the experts are added to (custom: the sidebar's dimensions).")
    architectures = middle.multiselect("Architectures", list(ARCHITECTURES),
                                       default=list(settings.architectures) or list(ARCHITECTURES),
                                       key="budget_architectures", bind=BIND)
    target_m = right.number_input("Target total params (M)", min_value=0.0, value=200.0, step=10.0,
                                  key="budget_target_m", bind=BIND, help="Total parameters, every expert counted.")
    left, middle, right = st.columns([2, 1, 1])
    kind = left.selectbox("Budget", list(BUDGET_KINDS), key="budget_kind", bind=BIND,
                          help="; ".join(f"{k}: {text}" for k, text in BUDGET_KINDS.items()) +
                          ". Per series at the sidebar's workload; memory at its precision and optimizer.")
    unit = BUDGET_UNITS[kind]
    limit = middle.number_input(f"Limit ({unit.unit})", min_value=0.0, value=unit.default, key=f"budget_limit_{kind}",
                                bind=BIND, help=f"{unit.label} at most this.")
    tolerance_pct = right.number_input("Tolerance (% of target)", min_value=0.0, value=None, step=5.0,
                                       key="budget_tolerance_pct", bind=BIND, placeholder="any total",
                                       help="Keep only totals within target ± this; empty keeps every total.")
    with st.expander("Search space"):
        columns = st.columns(4)
        space = SearchSpace()  # `python -m planner solve` searches the same space by default
        max_experts = columns[0].number_input("Max experts E", min_value=1, max_value=MAX_EXPERTS,
                                              value=space.max_experts, step=1, key="budget_max_experts", bind=BIND)
        max_top_k = columns[1].number_input("Max top-k K", min_value=1, max_value=MAX_EXPERTS, value=space.max_top_k,
                                            step=1, key="budget_max_top_k", bind=BIND)
        widths = columns[2].multiselect("Router widths R", [str(w) for w in DEFAULT_ROUTER_WIDTHS],
                                        default=[str(w) for w in DEFAULT_ROUTER_WIDTHS], key="budget_router_widths",
                                        bind=BIND, help="Sample-level routers (shared_then_expert, expert_only).")
        patterns = columns[3].multiselect(
            "token_ffn MoE blocks", list(TOKEN_BLOCK_PATTERNS), default=list(space.token_block_patterns),
            key="budget_blocks",
            bind=BIND, help="Which blocks carry experts. Plan (and the model's default) uses every_second; "
            "candidates with other patterns cannot be opened in Plan.")
    return dict(size=size, architectures=architectures, target_m=target_m, kind=kind, limit=limit,
                tolerance_pct=tolerance_pct, max_experts=int(max_experts), max_top_k=int(max_top_k), widths=widths,
                patterns=patterns)


def build_problem(settings: Settings, inputs: dict) -> Problem:
    """The solver's arguments from the typed inputs; ValueError naming the field."""
    if not inputs["architectures"]:
        raise ValueError("architectures: choose at least one architecture to search")
    if not inputs["widths"]:
        raise ValueError("router widths: choose at least one router width")
    unit = BUDGET_UNITS[inputs["kind"]]
    tolerance = None if inputs["tolerance_pct"] is None else inputs["tolerance_pct"] / 100
    space = SearchSpace(max_experts=inputs["max_experts"], max_top_k=inputs["max_top_k"],
                        router_widths=tuple(int(w) for w in inputs["widths"]),
                        token_block_patterns=tuple(inputs["patterns"]))
    return Problem(inputs["size"], dense_config(settings, inputs["size"]), round(inputs["target_m"] * 1e6),
                   Budget(inputs["kind"], inputs["limit"] * unit.scale), tuple(inputs["architectures"]), space,
                   tolerance)


def candidates_frame(result: SolverResult, problem: Problem) -> pd.DataFrame:
    """The best candidates, exact values (the Styler shows units)."""
    front, target, limit = set(result.pareto_front), problem.target_total_params, problem.budget.limit
    rows = [{
        "Rank": rank, "Configuration": c.describe, "Architecture": c.config.architecture,
        "E": c.config.num_experts, "K": c.config.top_k,
        "Router R": "—" if c.token_block_pattern else str(c.config.router_hidden_dim),
        "MoE blocks": c.token_block_pattern or "—",
        "Total params": c.total_params, "Active params": c.active_params,
        "vs target": (c.total_params - target) / target, "Budget use": c.budget_value,
        "of limit": c.budget_value / limit, "Pareto": c in front,
    } for rank, c in enumerate(result.candidates[:SHOWN_CANDIDATES], start=1)]
    return pd.DataFrame(rows)


def pareto_figure(result: SolverResult, problem: Problem):
    """Total vs active parameters: every feasible candidate faint, the Pareto front drawn, the best starred."""
    import plotly.graph_objects as go  # plotly loads only once a chart tab opens

    def points(candidates, **style):
        return go.Scatter(x=[to_millions(c.active_params) for c in candidates],
                          y=[to_millions(c.total_params) for c in candidates],
                          text=[c.describe for c in candidates],
                          customdata=[[f"{c.total_params:,}", f"{c.active_params:,}"] for c in candidates],
                          hovertemplate="%{text}<br>total %{customdata[0]}<br>active %{customdata[1]}<extra></extra>",
                          **style)

    best = result.candidates[0]
    figure = go.Figure([
        points(result.feasible, mode="markers", name=f"feasible ({len(result.feasible):,})",
               marker=dict(color="#9e9e9e", size=5, opacity=0.3)),
        points(result.pareto_front, mode="lines+markers", name=f"Pareto front ({len(result.pareto_front)})",
               line=dict(color="#1f77b4", shape="hv"), marker=dict(size=7)),
        points([best], mode="markers", name=f"best: {best.describe}",
               marker=dict(symbol="star", size=18, color="#d62728", line=dict(color="white", width=1))),
    ])
    figure.add_hline(y=to_millions(problem.target_total_params), line=dict(dash="dash", color="#555"),
                     annotation_text="target", annotation_position="top left")
    if problem.budget.kind == "active_params":
        figure.add_vline(x=to_millions(problem.budget.limit), line=dict(dash="dot", color="#d62728"),
                         annotation_text="budget", annotation_position="top right")
    figure.update_layout(
        title=f"Total vs active parameters of every feasible {problem.size} MoE (budget: {problem.budget.kind})",
        xaxis_title="active parameters per series (M)", yaxis_title="total parameters (M)", height=480,
        legend=dict(orientation="h", yanchor="bottom", y=1.0, x=0), margin=dict(t=90),
    )
    return figure


@st.cache_resource(max_entries=8, show_spinner=False)
def cached_pareto_figure(problem: Problem, workload: Workload, _result: SolverResult):
    """The chart of one solve, kept (not copied): plotly builds thousands of points slowly (0.3 s) and
    st.plotly_chart only reads the figure. The result is the solve's for (problem, workload), so not hashed."""
    return pareto_figure(_result, problem)


def _open_in_plan(size: str, configs: dict[str, ChronosMoEConfig]) -> None:
    """Button callback: the chosen candidate (read now, so a choice made in the same rerun counts) onto the
    sidebar, with sparse dispatch and no capacity limit as solved, then the Plan tab."""
    config = configs[st.session_state["budget_candidate"]]
    fill_sidebar({"sizes": [] if size == CUSTOM else [size], "custom": size == CUSTOM, **moe_values(config),
                  "dispatch": "sparse", "tab": "Plan"})


def _draw_open_in_plan(result: SolverResult, problem: Problem) -> None:
    shown = result.candidates[:SHOWN_CANDIDATES]
    labels = [f"{rank}. {c.describe}" for rank, c in enumerate(shown, start=1)]
    left, right = st.columns([3, 1], vertical_alignment="bottom")
    label = left.selectbox("Candidate", labels, key="budget_candidate",
                           help="Fills the sidebar (size, architecture, E, K, router width; sparse dispatch) and "
                           "opens the Plan tab beside the dense model.")
    candidate = shown[labels.index(label)]
    pattern = candidate.token_block_pattern
    right.button("Open in Plan", key="budget_open", type="primary", icon=":material/open_in_new:",
                 on_click=_open_in_plan, args=(problem.size, {text: c.config for text, c in zip(labels, shown)}),
                 width="stretch",
                 disabled=pattern not in (None, PLAN_BLOCK_PATTERN))
    if pattern not in (None, PLAN_BLOCK_PATTERN):
        st.caption(f"Plan puts token_ffn experts in every second block; this candidate's {pattern} pattern has "
                   "no sidebar setting, so it cannot be opened there.")


def draw_budget(table: PlanTable, settings: Settings) -> None:
    st.markdown("The inverse question: which experts E, active experts K and router width R bring a base size "
                "closest to a target total while staying within a budget? Ranked by closeness to the target "
                "(then by budget use); every number is the planner's, at the sidebar's workload.")
    inputs = _draw_inputs(settings)
    solve = st.button("Solve", key="budget_solve", type="primary", icon=":material/calculate:")
    # A shared link to a solved view solves again on opening (the inputs are in the link too).
    opened_solved = st.query_params.get(SOLVED_PARAM) == "1" and "budget_result" not in st.session_state
    try:
        problem = build_problem(settings, inputs)
        workload = workload_of(settings)
        if solve or opened_solved:
            with st.spinner("Solving…"):
                result = solve_budget(problem.base, problem.target_total_params, problem.budget,
                                      problem.architectures, workload, problem.space, problem.tolerance)
            st.session_state["budget_result"] = ((problem, workload), result)
            st.query_params[SOLVED_PARAM] = "1"
    except ValueError as error:
        st.error(str(error), icon=":material/error:")
        return
    last_key, result = st.session_state.get("budget_result", (None, None))
    if result is None:
        return
    if last_key != (problem, workload):
        st.query_params.pop(SOLVED_PARAM, None)
        st.info("Inputs changed since the last solve: press Solve again.")
        return
    if not result.complete:
        st.warning(f"The search stopped at its time limit ({APP_SOLVE_TIME_LIMIT_S:g} s) after {result.evaluated:,} "
                   "shapes, in order of E: lower Max experts or Max top-k, or search fewer widths or "
                   "architectures, for a complete answer.", icon=":material/timer:")
    if not result.candidates:
        st.warning(f"None of the {result.evaluated:,} shapes searched fits: raise the limit, widen the tolerance "
                   "or the search space.")
        return
    st.success(f"{result.evaluated:,} shapes searched (architecture × E × router width or MoE blocks), each at "
               f"every K: {len(result.feasible):,} (shape, K) pairs within the budget, {len(result.pareto_front)} on "
               f"the Pareto front. Best: {result.candidates[0].describe}.")
    frame = candidates_frame(result, problem)
    unit = BUDGET_UNITS[problem.budget.kind]
    st.dataframe(
        frame.style.format({"Total params": format_count, "Active params": format_count, "Budget use": unit.shown,
                            "vs target": "{:+.1%}", "of limit": "{:.0%}"}, na_rep="—"),
        hide_index=True, key="budget_table", height=(len(frame) + 1) * 35 + 3,
        column_config={
            "Rank": st.column_config.NumberColumn(width=50), "E": st.column_config.NumberColumn(width=40),
            "K": st.column_config.NumberColumn(width=40),
            "vs target": st.column_config.NumberColumn(help="(total − target) ÷ target"),
            "Budget use": st.column_config.NumberColumn(help=f"{unit.label} of this configuration"),
            "of limit": st.column_config.NumberColumn(help="Budget use ÷ limit"),
            "Pareto": st.column_config.CheckboxColumn(help="No other feasible configuration has more total "
                                                      "parameters for no more active ones"),
        })
    _draw_open_in_plan(result, problem)
    st.plotly_chart(cached_pareto_figure(problem, workload, result), key="budget_pareto")
