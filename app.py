"""Chronos-MoE capacity planner: the browser front end. It draws; the planner computes (ui.compute).

Tabs are drawn only when open (on_change="rerun"), so a rerun after a widget change pays for one tab.
"""

import streamlit as st

from ui.bench_tab import draw_bench
from ui.budget_tab import SOLVED_PARAM, draw_budget
from ui.compute import PlanTable, Variant, breakdown_export_rows, export_rows, plan_table, reachability
from ui.conventions import CONVENTIONS_MARKDOWN
from ui.cost_tab import draw_cost
from ui.devices_tab import draw_devices
from ui.exports import draw_downloads
from planner.units import format_bytes, format_count
from ui.share_link import check_share_link, draw_share_link_problems, one_of
from ui.sidebar import BIND, Settings, draw_sidebar
from ui.tables import (component_frame, flops_frame, grid_column_config, grid_display, grid_frame, memory_frame,
                       styled)
from ui.verify_tab import draw_verify

TABS = ("Plan", "Breakdown", "Charts", "Verify", "Budget", "Devices", "Benchmark", "Cost")
ROW_PX = 35  # st.dataframe's row height, to size tables to their rows


def fit_height(rows: int, most: int = 20) -> int:
    """Pixels for a table of `rows` rows (scrolling beyond `most`)."""
    return (min(rows, most) + 1) * ROW_PX + 3


def draw_plan(table: PlanTable, settings: Settings) -> None:
    exact = st.toggle("Exact values", key="exact", bind=BIND,
                      help="Show exact integers (parameters, FLOPs, bytes) instead of readable units.")
    frame = grid_frame(table.variants)
    st.dataframe(grid_display(frame, exact), column_config=grid_column_config(exact, frame), hide_index=True,
                 height=fit_height(len(frame)), key="grid")
    st.caption("FLOPs per batch of the workload; memory on one device; ×dense against the dense model of the "
               "same size. Exports hold every value exactly, with the workload and conventions.")
    draw_downloads(export_rows(table), settings, "comparison grid", key="grid")


def _metrics(variant: Variant) -> None:
    params, memory = variant.plan.params, variant.plan.memory
    figures = {
        "Total params": (format_count(params.total_params), f"{params.total_params:,} parameters"),
        "Active params": (format_count(params.active_params), f"{params.active_params:,} parameters"),
        "Forward FLOPs": (format_count(variant.plan.flops.forward_flops, "FLOP"),
                          f"{variant.plan.flops.forward_flops:,} FLOPs"),
        "Training memory": (format_bytes(memory.training.total_bytes), f"{memory.training.total_bytes:,} bytes"),
        "Forecast memory": (format_bytes(memory.forecast.total_bytes), f"{memory.forecast.total_bytes:,} bytes"),
    }
    for column, (label, (value, exact)) in zip(st.columns(len(figures)), figures.items()):
        column.metric(label, value, help=exact, border=True)


def draw_breakdown(table: PlanTable, settings: Settings) -> None:
    from ui.charts import memory_bars, params_bars  # plotly loads only once a chart tab opens

    labels = [v.label for v in table.variants]
    first_moe = next((i for i, v in enumerate(table.variants) if v.plan.config.is_moe), 0)
    label = st.selectbox("Variant", labels, index=first_moe, key="variant", bind=BIND)
    variant = table.variants[labels.index(label)]
    _metrics(variant)
    if settings.trainable != "all":
        ok, line = reachability(variant.plan.config, settings.trainable)
        (st.success if ok else st.warning)(f"Trainable {settings.trainable}: {line}.",
                                           icon=":material/check:" if ok else ":material/warning:")

    left, right = st.columns([2, 3])
    with left:
        st.markdown("**Parameters by component**")
        params = component_frame(variant.plan.params.components(), "Parameters")
        st.dataframe(styled(params, {"Parameters": format_count}), hide_index=True, height=fit_height(len(params)),
                     key="breakdown_params",
                     column_config={"Parameters": st.column_config.NumberColumn(help="Exact in the export")})
        st.markdown("**FLOPs by component** (one batch)")
        flops = flops_frame(variant)
        st.dataframe(styled(flops, {c: lambda v: format_count(v, "FLOP") for c in ("Forward", "Forecast")}),
                     hide_index=True, height=fit_height(len(flops)), key="breakdown_flops")
    right.plotly_chart(params_bars(variant), key="params_bars")

    st.markdown("**Where the memory goes**")
    memory = memory_frame(variant)
    left, right = st.columns([2, 3])
    left.dataframe(styled(memory, {"Bytes": format_bytes}), hide_index=True, height=fit_height(len(memory)),
                   key="breakdown_memory")
    right.plotly_chart(memory_bars(memory), key="memory_bars")
    forecast = variant.plan.memory.forecast
    st.caption(
        f"What-if, not the default: with only the experts this batch routes to resident (the rest paged in from "
        f"host memory), forecast memory would be {format_bytes(forecast.what_if_active_experts_total_bytes)}."
    )
    draw_downloads(breakdown_export_rows(variant), settings, f"breakdown of {variant.label}", key="breakdown")


@st.cache_resource(max_entries=32, show_spinner=False)
def chart_figures(settings: Settings, architecture: str) -> dict:
    """The Charts tab's figures; kept (not copied) because plotly rebuilds a figure slowly and
    st.plotly_chart only reads it."""
    from ui.charts import flop_ratio_figure, memory_figure, params_figure  # plotly loads once a chart tab opens

    variants = plan_table(settings).variants
    return {
        "params": params_figure(variants, architecture),
        "flop_ratios": flop_ratio_figure(variants, architecture),
        "memory": memory_figure(variants, architecture, settings.dtype, settings.precision),
    }


@st.cache_resource(max_entries=32, show_spinner=False)
def comparison_figure(settings: Settings, quantity: str):
    """The architecture comparison of one quantity (kept, as chart_figures)."""
    from ui.charts import architectures_figure

    return architectures_figure(plan_table(settings).variants, quantity)


def _chart(name: str, figure) -> None:
    from ui.charts import figure_html

    st.plotly_chart(figure, key=f"chart_{name}")
    st.download_button("Chart as HTML", lambda: figure_html(figure), file_name=f"{name}.html", mime="text/html",
                       key=f"chart_{name}_html", on_click="ignore", icon=":material/download:")


def draw_charts(table: PlanTable, settings: Settings) -> None:
    from ui.charts import COMPARED

    if len(settings.architectures) > 1:
        quantity = st.selectbox("Compare the architectures by", list(COMPARED), key="chart_compared", bind=BIND)
        _chart("architectures", comparison_figure(settings, quantity))
    architecture = st.selectbox("Architecture", list(settings.architectures) or ["dense"],
                                key="chart_architecture", bind=BIND)
    for name, figure in chart_figures(settings, architecture).items():
        _chart(name, figure)


st.set_page_config(page_title="Chronos-MoE capacity planner", page_icon="📐", layout="wide")
st.title("Chronos-MoE capacity planner")
st.caption("Parameters, FLOPs and memory of Mixture-of-Experts variants of Chronos-T5, counted from the real "
           "modules' shapes and checked against them in the Verify tab.")
check_share_link({"tab": one_of(TABS), SOLVED_PARAM: one_of(["1"])})
draw_share_link_problems()
settings = draw_sidebar()
with st.expander("Conventions: what each number counts"):
    st.markdown(CONVENTIONS_MARKDOWN)

# Tabs that ask their own questions (their inputs are their own) stay usable when the sidebar's grid is not.
OWN_INPUTS = ("Budget", "Benchmark")
try:
    table = plan_table(settings)
    sidebar_problem = None if table.variants else "no variant of the sidebar's grid can be planned (see above)"
except ValueError as error:
    table, sidebar_problem = None, str(error)
    st.error(sidebar_problem, icon=":material/error:")
for problem in table.problems if table else ():
    st.error(problem, icon=":material/error:")
if table and table.untrained:
    st.info(f"Trainable {settings.trainable}: nothing to train in {', '.join(table.untrained)}, so "
            f"{'it is' if len(table.untrained) == 1 else 'they are'} left out (ratios to dense still compare "
            "with the dense model fully trained).", icon=":material/info:")

tabs = dict(zip(TABS, st.tabs(TABS, key="tab", bind=BIND, on_change="rerun")))
for name, draw in zip(TABS, (draw_plan, draw_breakdown, draw_charts, draw_verify, draw_budget, draw_devices,
                             draw_bench, draw_cost)):
    with tabs[name]:
        if not tabs[name].open:
            continue
        if sidebar_problem and name not in OWN_INPUTS:
            st.info(f"This tab shows the sidebar's variants, and the sidebar has a problem: {sidebar_problem}. "
                    "Fix it there; Budget and Benchmark work meanwhile.", icon=":material/info:")
            continue
        draw(table, settings)
