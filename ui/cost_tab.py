"""The Cost tab: whole training runs in hours and money, and forecasting services in devices and money.

Every number is planner.cost's (cached in ui.compute): the step-time model's traced steps priced on a GPU
preset, communication on the GPUs' links, headroom by planner.headroom. The sidebar gives the sizes,
architectures, experts and the context and prediction lengths; this tab the devices and the money. A single
run is priced at once; comparisons, the plan search and the service (many traces) run behind buttons and
stay in the session until an input changes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pandas as pd
import streamlit as st

from planner.cost.prices import PRICES
from planner.cost.service import SERVICE_DTYPES, ForecastService
from planner.cost.training import PRECISIONS, PRICED_GPUS, TrainingRun, global_batch_split
from planner.parallel import DEVICE_MEMORY, STRATEGIES
from planner.steptime import gpu_preset
from ui.compute import PlanTable, Variant, plan_search_rows, service_rows, training_run_row
from ui.exports import draw_downloads
from planner.units import format_bytes
from ui.sidebar import BIND, Settings

GPUS = PRICED_GPUS
SECTIONS = ("Training run", "Forecasting service")
DEVICE_COUNTS = (1, 2, 4, 8, 16, 32, 64)
BOUND_COLORS = {"compute": "#1f4e9c", "memory traffic": "#3f7fd6", "overhead": "#f08c00", "communication": "#7b3fb0",
                "data": "#9e9e9e"}
STATUS_TEXT = {"fits": "✓ fits", "tight": "⚠ tight", "does not fit": "✗ does not fit"}


def gpu_label(key: str) -> str:
    return f"{gpu_preset(key).name}, {format_bytes(DEVICE_MEMORY[key][1])}, ${PRICES[key].usd_per_device_hour:.2f}/h"


def format_hours(hours: float) -> str:
    return f"{hours:,.1f} h" if hours >= 1 else f"{hours * 60:,.1f} min"


def format_usd(usd: float) -> str:
    return f"${usd:,.2f}" if usd < 1000 else f"${usd:,.0f}"


def _variant(table: PlanTable, key: str, container) -> Variant:
    labels = [v.label for v in table.variants]
    label = container.selectbox("Variant", labels, key=key, bind=BIND)
    return table.variants[labels.index(label)]


def _training_inputs(table: PlanTable, settings: Settings) -> tuple[Variant, TrainingRun]:
    """The run the inputs describe; ValueError naming the field when they describe none."""
    columns = st.columns([3, 3, 1, 1])
    variant = _variant(table, "cost_variant", columns[0])
    gpu = columns[1].selectbox("GPU", GPUS, index=GPUS.index("a100-40gb"), key="cost_gpu", bind=BIND,
                               help="A GPU preset: datasheet rates, memory, usual interconnect, price")
    columns[1].caption(gpu_label(gpu))
    devices = columns[2].number_input("Devices", min_value=1, value=8, step=1, key="cost_devices", bind=BIND)
    per_node = columns[3].number_input("Per node", value=0, step=1, key="cost_per_node", bind=BIND,
                                       help="GPUs per node (0: 8, or all the devices when fewer); rings beyond a "
                                       "node use the network between nodes")
    columns = st.columns(4)
    global_batch = columns[0].number_input("Global batch", min_value=1, value=256, step=1, key="cost_global_batch",
                                           bind=BIND,
                                           help="Series per optimizer step = per-device batch × devices × accumulation")
    accumulation = columns[1].number_input("Accumulation", min_value=1, value=1, step=1, key="cost_accumulation",
                                           bind=BIND)
    steps = columns[2].number_input("Steps", min_value=1, value=200_000, step=1000, key="cost_steps", bind=BIND,
                                    help="Optimizer steps of the run")
    strategy = columns[3].selectbox("Strategy", STRATEGIES, key="cost_strategy", bind=BIND)
    columns = st.columns(4)
    precision = columns[0].selectbox("Precision", PRECISIONS, index=PRECISIONS.index("tf32"), key="cost_precision",
                                     bind=BIND, help="tf32: fp32 storage, TF32 matmuls (Chronos' training configs)")
    checkpointing = columns[1].toggle("Activation checkpointing", key="cost_checkpointing", bind=BIND)
    compiled = columns[2].toggle("torch.compile", key="cost_compiled", bind=BIND,
                                 help="The time model's compiled what-if: elementwise chains fused")
    overlap = columns[3].toggle("Overlap communication", value=True, key="cost_overlap", bind=BIND)
    columns = st.columns(2)
    price = columns[0].number_input(
        "Price per device-hour (USD, 0 = list price)", value=0.0, step=0.1, key="cost_price", bind=BIND,
        help=f"{gpu}: ${PRICES[gpu].usd_per_device_hour:.4f}/h, {PRICES[gpu].instance}. {PRICES[gpu].source}")
    ceiling = columns[1].number_input("Data pipeline ceiling (series/s, 0 = none)", value=0.0, step=100.0,
                                      key="cost_data_ceiling", bind=BIND)
    if price < 0 or ceiling < 0 or per_node < 0:
        raise ValueError("price_per_device_hour, devices_per_node and data_series_per_s must be 0 (default) or above")
    devices, per_node, accumulation = int(devices), int(per_node), int(accumulation)
    per_device = global_batch_split(int(global_batch), devices, accumulation)
    run = TrainingRun(variant.plan.config, gpu, num_devices=devices, devices_per_node=per_node or None,
                      per_device_batch=per_device,
                      gradient_accumulation=accumulation, steps=int(steps), context_length=settings.context_length,
                      prediction_length=settings.prediction_length, strategy=strategy,
                      activation_checkpointing=checkpointing, precision=precision, optimizer=settings.optimizer,
                      trainable=settings.trainable, compiled=compiled, overlap_communication=overlap, data_series_per_s=ceiling or None,
                      price_per_device_hour=price or None)
    return variant, run


def _metrics(row: dict[str, Any]) -> None:
    figures = {
        "Step time": (f"{row['step_time_s'] * 1000:,.1f} ms", f"{row['step_time_s']:.6g} s per optimizer step"),
        "Hours": (format_hours(row["hours"]), f"{row['hours']:.6g} h"),
        "Device-hours": (f"{row['device_hours']:,.0f}" if row["device_hours"] >= 100 else
                         f"{row['device_hours']:,.2g}", f"{row['device_hours']:.6g}"),
        "Cost": (format_usd(row["cost_usd"]), f"${row['cost_usd']:.6g} at ${row['price_per_device_hour']:.4g}/h"),
        "MFU": (f"{row['mfu']:.1%}", "model FLOPs ÷ (step × devices × datasheet peak)"),
        "Memory": (STATUS_TEXT[row["fit_status"]], f"{format_bytes(row['headroom_bytes'])} left of the device "
                   f"(peak {format_bytes(row['peak_bytes'])} + context, reserve, buffers)"),
    }
    for column, (label, (value, exact)) in zip(st.columns(len(figures)), figures.items()):
        column.metric(label, value, help=exact, border=True)


def step_split_figure(rows: list[dict[str, Any]], labels: list[str]):
    """Stacked bars of where each run's step goes (planner.cost.training.BOUNDS)."""
    import plotly.graph_objects as go

    figure = go.Figure([go.Bar(y=labels, x=[row[f"bound_{name.replace(' ', '_')}_s"] * 1000 for row in rows],
                               name=name, orientation="h", marker_color=color)
                        for name, color in BOUND_COLORS.items()])
    bound = f": bound by {rows[0]['bound']}" if len(rows) == 1 else ""
    figure.update_layout(barmode="stack", title=f"Where the step goes{bound}", xaxis_title="milliseconds per step",
                         height=230 + 40 * len(rows), legend_title_text="", margin=dict(t=60),
                         legend=dict(orientation="h", yanchor="top", y=-0.45, x=0))
    return figure


def sweep_figure(frame: pd.DataFrame, x: str, title: str, color: str | None = None):
    """Hours and cost against `x`, one line per `color` group."""
    import plotly.express as px
    from plotly.subplots import make_subplots

    figure = make_subplots(rows=1, cols=2, subplot_titles=("Hours", "Cost (USD)"))
    for column, value in ((1, "hours"), (2, "cost_usd")):
        for trace in px.line(frame, x=x, y=value, color=color, markers=True).data:
            trace.showlegend = column == 1 and color is not None
            figure.add_trace(trace, row=1, col=column)
    figure.update_xaxes(title_text=x)
    figure.update_layout(title=title, height=380)
    return figure


def pareto_figure(rows: list[dict[str, Any]]):
    import plotly.graph_objects as go

    frame = pd.DataFrame(rows)
    labels = frame["gpu"] + " × " + frame["devices"].astype(str) + " · " + frame["strategy"] + \
        frame["activation_checkpointing"].map({True: " + ckpt", False: ""}) + " · b=" + frame["per_device_batch"].astype(str)
    front = frame[frame["pareto"]].sort_values("hours")
    figure = go.Figure([
        go.Scatter(x=frame["hours"], y=frame["cost_usd"], mode="markers", name="plans that fit", text=labels,
                   marker=dict(color="#9e9e9e", size=7), hovertemplate="%{text}<br>%{x:.3g} h, $%{y:,.0f}<extra></extra>"),
        go.Scatter(x=front["hours"], y=front["cost_usd"], mode="lines+markers", name="Pareto front",
                   text=labels[front.index], marker=dict(color="#d62728", size=10),
                   hovertemplate="%{text}<br>%{x:.3g} h, $%{y:,.0f}<extra></extra>"),
    ])
    figure.update_layout(title="Hours against cost: every plan that fits, and the front", xaxis_title="hours",
                         yaxis_title="cost (USD)", height=440)
    return figure


def _sweep_rows(run: TrainingRun, table: PlanTable, variant: Variant, over: str) -> list[dict[str, Any]]:
    rows = []
    if over == "experts":
        size = variant.row["size"]
        for other in table.variants:
            if other.row["size"] != size:
                continue
            config = other.plan.config
            rows.append({"variant": other.label, "num_experts": config.num_experts,
                         "architecture": config.architecture if config.is_moe else "dense",
                         **training_run_row(dataclasses.replace(run, config=config))})
        return sorted(rows, key=lambda r: (r["architecture"], r["num_experts"]))
    for count in DEVICE_COUNTS:
        per_device, remainder = divmod(run.global_batch, count * run.gradient_accumulation)
        if remainder or per_device < 1:
            continue
        node = min(run.devices_per_node, count) if run.devices_per_node else None
        try:
            rows.append({"devices": count, **training_run_row(dataclasses.replace(
                run, num_devices=count, devices_per_node=node, per_device_batch=per_device))})
        except ValueError:
            continue  # e.g. more devices than a node, on a GPU with no usual network between nodes
    return rows


def _draw_comparisons(run: TrainingRun, table: PlanTable, variant: Variant, settings: Settings) -> None:
    left, right, search = st.columns(3)
    for column, over, label in ((left, "experts", "Hours and cost vs E"), (right, "devices", "vs device count")):
        if column.button(label, key=f"cost_sweep_{over}", icon=":material/show_chart:",
                         help="Device counts from 1 to 64 that divide the global batch; a count a GPU cannot "
                         "reach (no network between its nodes) is left out" if over == "devices" else
                         "Every variant of this size in the sidebar's grid, at these settings"):
            st.session_state[f"cost_sweep_{over}_result"] = (run, _sweep_rows(run, table, variant, over))
    for over, x, color, title in (("experts", "num_experts", "architecture", f"{variant.row['size']}: E experts"),
                                  ("devices", "devices", None, f"{variant.label}: devices at global batch "
                                                                f"{run.global_batch}")):
        kept_run, rows = st.session_state.get(f"cost_sweep_{over}_result", (None, None))
        if rows and kept_run == run:
            st.plotly_chart(sweep_figure(pd.DataFrame(rows), x, title, color), key=f"cost_sweep_{over}_chart")
            draw_downloads([{k: v for k, v in r.items() if k != "collectives"} for r in rows], settings,
                           f"training runs by {over}", key=f"cost_sweep_{over}")
    with search.popover("Fastest and cheapest plans", icon=":material/travel_explore:"):
        gpus = st.multiselect("GPUs", GPUS, default=[run.gpu], key="cost_search_gpus", bind=BIND)
        counts = st.multiselect("Device counts", DEVICE_COUNTS, default=[1, 2, 4, 8], key="cost_search_counts",
                                bind=BIND)
        if st.button("Search", key="cost_search", type="primary", disabled=not gpus or not counts):
            inputs = (run, tuple(gpus), tuple(sorted(counts)))
            rows, front, tried = plan_search_rows(run, run.global_batch, tuple(gpus), tuple(sorted(counts)))
            st.session_state["cost_search_result"] = (inputs, rows, front, tried)
    inputs, rows, front, tried = st.session_state.get("cost_search_result", (None, None, None, 0))
    if rows is None or inputs[0] != run:
        return
    if not rows:
        st.warning(f"None of the {tried} plans tried fits at global batch {run.global_batch}: add GPUs, devices or "
                   "a larger GPU.")
        return
    st.plotly_chart(pareto_figure(rows), key="cost_pareto")
    shown = ("pick", "gpu", "devices", "strategy", "activation_checkpointing", "per_device_batch",
             "gradient_accumulation", "hours", "cost_usd", "mfu", "bound", "fit_status", "headroom_bytes")
    st.dataframe(pd.DataFrame([{k: r[k] for k in shown} for r in front]), hide_index=True, key="cost_front")
    st.caption(f"The Pareto front of {len(rows)} plans that fit, of {tried} tried (micro-batches above the first "
               "that does not fit are not tried). Ties go to the larger headroom.")
    draw_downloads([{k: v for k, v in r.items() if k != "collectives"} for r in rows], settings,
                   "training plans that fit", key="cost_plans")


def draw_training(table: PlanTable, settings: Settings) -> None:
    try:
        variant, run = _training_inputs(table, settings)
        row = training_run_row(run)
    except ValueError as error:
        st.error(str(error), icon=":material/error:")
        return
    _metrics(row)
    st.plotly_chart(step_split_figure([row], [variant.label]), key="cost_split")
    if row["collectives"]:
        st.dataframe(pd.DataFrame(row["collectives"]), hide_index=True, key="cost_collectives")
        st.caption(f"Collectives per optimizer step on {row['link']}: ring all-reduce 2(n−1)/n of the buffer, "
                   "reduce-scatter, all-gather and all-to-all (n−1)/n, plus a latency per ring step.")
    export = [{"variant": variant.label, **{k: v for k, v in row.items() if k != "collectives"}}]
    draw_downloads(export, settings, f"training run of {variant.label}", key="cost_run")
    _draw_comparisons(run, table, variant, settings)


def _service_inputs(table: PlanTable, settings: Settings) -> tuple[Variant, ForecastService]:
    columns = st.columns([3, 3, 2, 2])
    variant = _variant(table, "serve_variant", columns[0])
    gpu = columns[1].selectbox("GPU", GPUS, index=GPUS.index("l4"), key="serve_gpu", bind=BIND)
    columns[1].caption(gpu_label(gpu))
    series = columns[2].number_input("Series", min_value=1, value=1_000_000, step=100_000, key="serve_series",
                                     bind=BIND)
    deadline = columns[3].number_input("Within (hours)", value=24.0, step=1.0, key="serve_deadline", bind=BIND)
    columns = st.columns(4)
    dtype = columns[0].selectbox("Dtype", SERVICE_DTYPES, index=SERVICE_DTYPES.index("bf16"), key="serve_dtype",
                                 bind=BIND)
    batch = columns[1].number_input("Batch (0 = best)", value=0, step=1, key="serve_batch", bind=BIND,
                                    help="Series per forecast call; 0 searches the throughput-maximising batch")
    price = columns[2].number_input("Price per device-hour (0 = list)", value=0.0, step=0.1, key="serve_price",
                                    bind=BIND)
    compiled = columns[3].toggle("torch.compile", key="serve_compiled", bind=BIND)
    if price < 0 or batch < 0:
        raise ValueError("price_per_device_hour and batch_size must be 0 (default) or above")
    service = ForecastService(variant.plan.config, gpu, series=int(series), deadline_hours=float(deadline),
                              num_samples=settings.num_samples, context_length=settings.context_length,
                              prediction_length=settings.prediction_length, dtype=dtype,
                              batch_size=int(batch) or None, compiled=compiled, price_per_device_hour=price or None)
    return variant, service


def draw_service(table: PlanTable, settings: Settings) -> None:
    try:
        variant, service = _service_inputs(table, settings)
    except ValueError as error:
        st.error(str(error), icon=":material/error:")
        return
    st.caption(f"{settings.num_samples} sample paths a series, context {settings.context_length}, horizon "
               f"{settings.prediction_length} (the sidebar's).")
    if st.button("Price the service", key="serve_run", type="primary", icon=":material/calculate:"):
        try:
            st.session_state["serve_result"] = (service, *service_rows(service))
        except ValueError as error:
            st.error(str(error), icon=":material/error:")
            return
    kept, row, options = st.session_state.get("serve_result", (None, None, None))
    if kept != service:
        return
    figures = {
        "Latency": (f"{row['latency_s'] * 1000:,.0f} ms", f"one batch of {row['batch_size']} series"),
        "Series/s per device": (f"{row['series_per_s_per_device']:,.1f}", "batch ÷ latency"),
        "Devices needed": (f"{row['devices_needed']:,}", f"{row['series']:,} series within {row['deadline_hours']} h"),
        "Per million": (format_usd(row["cost_per_million_usd"]), "busy device time only"),
        "Batch": (f"{row['batch_size']:,}", "series per call"),
        "Memory": (STATUS_TEXT[row["fit_status"]], f"{format_bytes(row['headroom_bytes'])} left"),
    }
    for column, (label, (value, exact)) in zip(st.columns(len(figures)), figures.items()):
        column.metric(label, value, help=exact, border=True)
    frame = pd.DataFrame(options)
    st.dataframe(frame, hide_index=True, key="serve_options")
    import plotly.express as px

    st.plotly_chart(px.line(frame, x="batch_size", y="series_per_s_per_device", markers=True, log_x=True,
                            title="Throughput per device against batch"), key="serve_chart")
    draw_downloads([{"variant": variant.label, **row}], settings, f"forecasting service of {variant.label}",
                   key="serve")


def draw_cost(table: PlanTable, settings: Settings) -> None:
    st.markdown("What a whole training run or a forecasting service costs: the step-time model's traced steps "
                "priced on a GPU preset, communication on its links, memory with headroom, at list prices you "
                "can change.")
    section = st.segmented_control("Price", SECTIONS, default=SECTIONS[0], key="cost_section", bind=BIND)
    if section == SECTIONS[1]:
        draw_service(table, settings)
    else:
        draw_training(table, settings)
