"""The Devices tab: what each of N devices holds during a training step under data parallel, ZeRO-1/2/3
(FSDP) and expert parallelism, with and without activation checkpointing, and whether it fits a chosen GPU;
what each device sends per step and how long that takes on an interconnect; and a measurement of the same on
N local processes (ui.devices_measure).

The numbers are planner.parallel's and planner.communication's (cached in ui.compute); the workload is the
sidebar's, its batch per device.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from planner.communication import Link
from planner.cost.interconnects import DEFAULT_INTRA, INTERCONNECTS
from planner.cost.links import run_link
from planner.parallel import DEVICE_MEMORY, GPU_MEMORY_BYTES
from planner.workload import PRECISION_REGIMES
from ui.compute import PlanTable, Variant, device_plans, step_communication, strategy_bytes_sent, workload_of
from ui.devices_measure import draw_measure
from ui.exports import draw_downloads
from planner.units import GIB, format_bytes, format_seconds
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
    "Gathered layer": "Weights gathered whole during the step, beside the resident shard: ZeRO-2 (FSDP2, "
                      "reshard_after_forward=False) every unit's weights, kept from its forward to its backward; "
                      "ZeRO-3 the largest layer's weights and gradients while it runs (mixed_fp16 ZeRO-2 "
                      "keeps its fp16 weights whole, so gathers nothing)",
    "Activations": "Saved for backward at the sidebar's batch (per device); checkpointing keeps block inputs only",
}
PART_COLORS = ("#1f4e9c", "#3f7fd6", "#7b3fb0", "#9e9e9e", "#f08c00")
FIT_LABELS = {"fits": "✓ fits", "tight": "⚠ tight", "does not fit": "✗ does not fit"}
FIT_COLORS = {"✓ fits": "#1b6e3a", "⚠ tight": "#a05a00", "✗ does not fit": "#b00020"}
LIMIT_OFF_CHART = 3  # a device limit this many times the tallest bar is written, not drawn (bars would vanish)
GPU_KEYS = {label: key for key, (label, _) in DEVICE_MEMORY.items()}
CUSTOM_LINK = "pcie4"  # a custom device's default interconnect: the common PCIe card's
# Shown column -> (row key of ui.compute.step_communication, help).
COMMUNICATION_COLUMNS = {
    "Strategy": ("strategy", None),
    "Collective": ("collective", "NCCL-style ring collective"),
    "Purpose": ("purpose", "What travels"),
    "Phase": ("phase", "The compute it could overlap with"),
    "When": ("when", "Every micro-step, or once per optimizer step (after gradient accumulation)"),
    "Calls": ("calls", "Separate calls it is split into (DDP's 25 MiB buckets, FSDP's units), each paying the "
              "ring's latency"),
    "Devices": ("devices", "Devices in its group"),
    "Buffer": ("buffer_bytes", "The full buffer: all-reduce and reduce-scatter input, all-gather output, all-to-all "
               "what is sent"),
    "Sent per device": ("bytes_sent_per_device", "By the ring: all-reduce 2(n−1)/n of the buffer, the others "
                        "(n−1)/n"),
    "Time": ("seconds", "α-β ring time on the chosen interconnect"),
}


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
    variant = table.variants[labels.index(label)]
    load = 1.0
    if variant.plan.config.is_moe:
        load = st.number_input(
            "Expert load (× balanced)", value=1.0, step=0.25, key="devices_expert_load", bind=BIND,
            help="Expert parallel: routing slots device 0's experts receive relative to balanced routing (1.0). "
            "A fresh router sends most series to a few experts; at most N × min(K, experts held) / K.")
    return variant, int(num_devices), gpu, memory_bytes, precision, float(load)


def interconnect_link(gpu: str, preset: str, num_devices: int) -> Link:
    """The preset as planner.cost.links builds a run's link: an intra-node preset carries a ring inside one node
    of the N devices; an inter-node preset one with a device per node (the node's own link faster)."""
    gpu_key = GPU_KEYS.get(gpu, CUSTOM_GPU)
    if INTERCONNECTS[preset].scope == "intra":
        return run_link(gpu_key, num_devices, num_devices, intra=preset)
    return run_link(gpu_key, num_devices, 1, intra=DEFAULT_INTRA.get(gpu_key, CUSTOM_LINK), inter=preset)


def communication_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per collective of each strategy's step, exact bytes and seconds (the Styler formats them)."""
    shown = [{**row, "when": "every micro-step" if row["every_micro_step"] else "per optimizer step"}
             for row in rows]
    return pd.DataFrame([{name: row[key] for name, (key, _) in COMMUNICATION_COLUMNS.items()} for row in shown],
                        columns=list(COMMUNICATION_COLUMNS))


def least_sent_line(totals: pd.DataFrame, link: Link) -> str:
    """Which strategy sends least per device per step (ties named together), and which is quickest on `link`."""
    least = totals[totals["Sent per device"] == totals["Sent per device"].min()]
    quickest = totals.loc[totals["Time"].idxmin()]
    names = ", ".join(least["Strategy"])
    return (f"{names} {'sends' if len(least) == 1 else 'send'} least: "
            f"{format_bytes(least['Sent per device'].iloc[0])} per device per step; on {link.name} the quickest is "
            f"{quickest['Strategy']} ({format_seconds(quickest['Time'])}, its calls' latency included).")


def _draw_communication(variant: Variant, settings: Settings, gpu: str, num_devices: int, precision: str) -> None:
    st.subheader("Communication per training step")
    presets = list(INTERCONNECTS)
    default = DEFAULT_INTRA.get(GPU_KEYS.get(gpu, ""), CUSTOM_LINK)
    left, right = st.columns([2, 3])
    preset = left.selectbox(
        "Interconnect", presets, index=presets.index(default), key="devices_link", bind=BIND,
        help="planner.cost.interconnects' presets (default: the GPU's own link inside one node). "
        + "; ".join(f"{key}: {link.name}" for key, link in INTERCONNECTS.items()))
    try:
        link = interconnect_link(gpu, preset, num_devices)
        rows = step_communication(variant.plan.config, workload_of(settings), num_devices, precision, link)
    except ValueError as error:
        st.error(str(error), icon=":material/error:")
        return
    ring = "inside one node" if INTERCONNECTS[preset].scope == "intra" else "one device per node"
    left.caption(f"{link.name}, {ring}: {link.bytes_per_s / 1e9:.1f} GB/s bus bandwidth (the datasheet's rate × "
                 f"the share NCCL reaches), {link.latency_s * 1e6:.1f} µs per ring step. What one of {num_devices} "
                 "devices sends in a training step (planner.communication.step_collectives) at the sidebar's batch "
                 "per device, without gradient accumulation.")
    if not rows:
        right.info("One device sends nothing: choose N above 1.", icon=":material/info:")
        return
    frame = communication_frame(rows)
    totals = frame.groupby("Strategy", sort=False, as_index=False)[["Calls", "Sent per device", "Time"]].sum()
    # The planner's own per-step total (one micro-step: the caption's "without gradient accumulation").
    sent = strategy_bytes_sent(variant.plan.config, workload_of(settings), num_devices, precision)
    totals["Sent per device"] = totals["Strategy"].map(sent)
    formats = {"Buffer": format_bytes, "Sent per device": format_bytes, "Time": format_seconds}
    right.dataframe(totals.style.format(formats, subset=["Sent per device", "Time"]), hide_index=True,
                    key="devices_comm_totals", height=(len(totals) + 1) * 35 + 3,
                    column_config={"Calls": st.column_config.NumberColumn(help="Every collective's calls"),
                                   "Sent per device": st.column_config.NumberColumn(help="Per step, all collectives"),
                                   "Time": st.column_config.NumberColumn(help=f"Per step on {link.name}")})
    st.info(least_sent_line(totals, link), icon=":material/swap_horiz:")
    st.dataframe(frame.style.format(formats), hide_index=True, key="devices_comm_table",
                 height=(min(len(frame), 24) + 1) * 35 + 3,
                 column_config={name: st.column_config.Column(help=text, width=300 if name == "Purpose" else None)
                                for name, (_, text) in COMMUNICATION_COLUMNS.items() if text})
    export = [{"variant": variant.label, "num_devices": num_devices, "precision": precision, "interconnect": preset,
               **row} for row in rows]
    draw_downloads(export, settings, f"communication per training step of {variant.label}", key="devices_comm",
                   extra={"link": link.name, "link_bytes_per_s": link.bytes_per_s, "link_latency_s": link.latency_s})


def draw_devices(table: PlanTable, settings: Settings) -> None:
    st.markdown("What one of N devices holds during a training step: data parallel replicates everything; "
                "ZeRO-1/2/3 shard optimizer states, then gradients, then weights (ZeRO-3 = FSDP); expert "
                "parallel splits the experts across devices. Each with and without activation checkpointing.")
    variant, num_devices, gpu, memory_bytes, precision, expert_load = _draw_inputs(table, settings)
    try:
        rows = device_plans(variant.plan.config, workload_of(settings), num_devices, memory_bytes, precision,
                            expert_load)
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
    load = {"expert_load_factor": expert_load} if variant.plan.config.is_moe else {}
    export = [{"variant": variant.label, "gpu": gpu, "device_memory_bytes": memory_bytes, "precision": precision,
               **load, **row} for row in rows]
    draw_downloads(export, settings, f"per-device training memory of {variant.label}", key="devices")
    _draw_communication(variant, settings, gpu, num_devices, precision)
    draw_measure(variant, settings, precision)
