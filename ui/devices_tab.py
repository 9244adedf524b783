"""The Devices tab: what each of N devices holds during a training step under data parallel, ZeRO-1/2/3
(FSDP) and expert parallelism, with and without activation checkpointing, and whether it fits a chosen GPU.

The numbers are planner.parallel's (cached in ui.compute); the workload is the sidebar's, its batch per device.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from planner.parallel import GPU_MEMORY_BYTES
from planner.workload import PRECISION_REGIMES
from ui.compute import PlanTable, device_plans, workload_of
from ui.exports import draw_downloads
from planner.units import GIB, format_bytes
from ui.sidebar import BIND, Settings

CUSTOM_GPU = "custom"
PRECISIONS = (*PRECISION_REGIMES, "mixed_fp16")
# Row key -> column shown, in stacking order (bottom first).
PARTS = {
    "weights_bytes": "Weights",
    "gradients_bytes": "Gradients",
    "optimizer_states_bytes": "Optimizer states",
    "gathered_layer_bytes": "Gathered layer",
    "activations_bytes": "Activations",
}
PART_HELP = {
    "Weights": "This device's weights: whole, or a 1/N shard under ZeRO-3; expert parallel keeps ceil(E/N) experts",
    "Gradients": "Whole, or a 1/N shard from ZeRO-2 on",
    "Optimizer states": "Whole, or a 1/N shard from ZeRO-1 on (with mixed_fp16 also the fp32 master weights "
                        "and gradient copy)",
    "Gathered layer": "ZeRO-3: the largest layer's weights and gradients, gathered whole while it runs",
    "Activations": "Saved for backward at the sidebar's batch (per device); checkpointing keeps block inputs only",
}
PART_COLORS = ("#1f4e9c", "#3f7fd6", "#7b3fb0", "#9e9e9e", "#f08c00")
FIT_LABELS = {"fits": "✓ fits", "tight": "⚠ tight", "does not fit": "✗ does not fit"}
FIT_COLORS = {"✓ fits": "#1b6e3a", "⚠ tight": "#a05a00", "✗ does not fit": "#b00020"}
LIMIT_OFF_CHART = 3  # a device limit this many times the tallest bar is written, not drawn (bars would vanish)


def _row_label(row: dict[str, Any]) -> str:
    return row["strategy"] + (" + ckpt" if row["activation_checkpointing"] else "")


def devices_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per strategy × checkpointing, exact bytes (the Styler shows GiB)."""
    return pd.DataFrame([{
        "Strategy": row["strategy"], "Checkpointing": row["activation_checkpointing"],
        **{name: row[key] for key, name in PARTS.items()}, "Total": row["total_bytes"],
        "Beside the plan": row["needed_bytes"] - row["total_bytes"], "Headroom": row["headroom_bytes"],
        "Fits": FIT_LABELS[row["fit_status"]],
    } for row in rows])


def devices_figure(rows: list[dict[str, Any]], memory_bytes: int, gpu: str):
    """Stacked bars of where each strategy's per-device bytes go, the device's memory as a line (or, when it
    is far above every bar, as a note, so the bars stay readable). MiB when every bar is under 1 GiB."""
    import plotly.graph_objects as go  # plotly loads only once a chart tab opens

    tallest = max(row["total_bytes"] for row in rows)
    unit, scale = ("MiB", 2**20) if tallest < GIB else ("GiB", GIB)
    labels = [_row_label(row) for row in rows]
    figure = go.Figure([
        go.Bar(x=labels, y=[row[key] / scale for row in rows], name=name, marker_color=color,
               customdata=[f"{row[key]:,}" for row in rows],
               hovertemplate=f"%{{x}}<br>{name}: %{{customdata}} bytes<extra></extra>")
        for (key, name), color in zip(PARTS.items(), PART_COLORS)
    ])
    limit = f"{gpu}: {format_bytes(memory_bytes)}"
    if memory_bytes <= LIMIT_OFF_CHART * tallest:
        figure.add_hline(y=memory_bytes / scale, line=dict(color="#d62728", dash="dash", width=2),
                         annotation_text=limit, annotation_position="top left",
                         annotation=dict(font=dict(color="#d62728"), bgcolor="rgba(255, 255, 255, 0.85)"))
    else:
        figure.add_annotation(text=f"{limit}, far above every bar", xref="paper", yref="paper", x=0, y=1.06,
                              showarrow=False, xanchor="left", font=dict(color="#d62728"))
    num_devices = rows[0]["num_devices"]
    figure.update_layout(barmode="stack", title=f"Memory per device of a training step on {num_devices} device(s)",
                         yaxis_title=f"memory per device ({unit} = 2^{20 if unit == 'MiB' else 30} bytes)",
                         xaxis_title="strategy (+ ckpt: activation checkpointing)", height=460, legend_title_text="",
                         margin=dict(t=80))
    return figure


def _draw_inputs(table: PlanTable, settings: Settings) -> tuple:
    labels = [v.label for v in table.variants]
    first_moe = next((i for i, v in enumerate(table.variants) if v.plan.config.is_moe), 0)
    columns = st.columns([3, 1, 2, 2])
    label = columns[0].selectbox("Variant", labels, index=first_moe, key="devices_variant", bind=BIND)
    num_devices = columns[1].number_input("Devices N", min_value=1, value=8, step=1, key="devices_count",
                                          bind=BIND,
                                          help="Data-parallel ranks; the sidebar's batch is per device.")
    gpu = columns[2].selectbox("GPU", [*GPU_MEMORY_BYTES, CUSTOM_GPU], key="devices_gpu", bind=BIND,
                               help="Memory a program can allocate, as torch.cuda reports it (a little under "
                               "the marketed size).")
    if gpu == CUSTOM_GPU:
        memory_gib = columns[2].number_input("Memory per device (GiB)", value=40.0, step=8.0,
                                             key="devices_memory_gib", bind=BIND)
        memory_bytes = int(memory_gib * GIB)
    else:
        memory_bytes = GPU_MEMORY_BYTES[gpu]
    precision = columns[3].selectbox(
        "Training precision", PRECISIONS, index=PRECISIONS.index(settings.precision), key="devices_precision",
        bind=BIND, help="The sidebar's regimes, plus mixed_fp16: DeepSpeed's fp16 weights and gradients with "
        "fp32 master weights, gradient copy and Adam moments (2 + 2 + 16 bytes per parameter).")
    return table.variants[labels.index(label)], int(num_devices), gpu, memory_bytes, precision


def draw_devices(table: PlanTable, settings: Settings) -> None:
    st.markdown("What one of N devices holds during a training step: data parallel replicates everything; "
                "ZeRO-1/2/3 shard optimizer states, then gradients, then weights (ZeRO-3 = FSDP); expert "
                "parallel splits the experts across devices. Each with and without activation checkpointing.")
    variant, num_devices, gpu, memory_bytes, precision = _draw_inputs(table, settings)
    try:
        rows = device_plans(variant.plan.config, workload_of(settings), num_devices, memory_bytes, precision)
    except ValueError as error:
        st.error(str(error), icon=":material/error:")
        return
    fitting = [row for row in rows if row["fits"]]
    if fitting:
        best = min(fitting, key=lambda row: row["total_bytes"])
        tight = sum(row["tight"] for row in fitting)
        st.success(f"{len(fitting)} of {len(rows)} plans fit on {gpu} ({format_bytes(memory_bytes)})"
                   + (f", {tight} of them tight (under 10% left)" if tight else "") + f"; the leanest is "
                   f"{_row_label(best)} at {format_bytes(best['total_bytes'])} per device, "
                   f"{format_bytes(best['headroom_bytes'])} left with the CUDA context, the allocator's reserve "
                   "and communication buffers beside it.")
    else:
        st.warning(f"None of the {len(rows)} plans fits on {gpu} ({format_bytes(memory_bytes)}): add devices, a "
                   "smaller batch, a half-precision regime or a larger GPU.")
    frame = devices_frame(rows)
    st.dataframe(
        frame.style.format({name: format_bytes for name in [*PARTS.values(), "Total", "Beside the plan", "Headroom"]})
        .map(lambda text: f"color: {FIT_COLORS[text]}; font-weight: 600", subset=["Fits"]),
        hide_index=True, key="devices_table", height=(len(frame) + 1) * 35 + 3,
        column_config={
            "Checkpointing": st.column_config.CheckboxColumn(help="Activation checkpointing per block"),
            **{name: st.column_config.NumberColumn(help=text) for name, text in PART_HELP.items()},
            "Total": st.column_config.NumberColumn(help="Everything one device holds; exact bytes in the export"),
            "Beside the plan": st.column_config.NumberColumn(
                help="The CUDA context, the caching allocator's reserve and communication buffers (planner.headroom)"),
            "Headroom": st.column_config.NumberColumn(help=f"What is left of {gpu}'s {format_bytes(memory_bytes)}"),
            "Fits": st.column_config.TextColumn(help="Total and what stands beside it within the device; tight "
                                                "when under 10% of it is left"),
        })
    st.plotly_chart(devices_figure(rows, memory_bytes, gpu), key="devices_chart")
    export = [{"variant": variant.label, "gpu": gpu, "device_memory_bytes": memory_bytes, "precision": precision,
               **row} for row in rows]
    draw_downloads(export, settings, f"per-device training memory of {variant.label}", key="devices")
