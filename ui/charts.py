"""Plotly figures of the planner's numbers against the expert count E, one panel per size.

Values are the planner's, only rescaled to the axis unit (M parameters, GiB); every hover shows the exact
number. E = 0 is the dense model, drawn in every architecture's chart as the baseline: a marker of its own,
never joined by a line to E > 0 (no model lies between). Legends sit below the panels, so every item shows
whatever the number of panels. Built with
graph_objects rather than plotly.express: express takes about four times as long for these facet grids,
and the Charts tab redraws on every settings change.
"""

from __future__ import annotations

from typing import Callable, Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ui.compute import Variant
from planner.units import to_gib, to_millions

PANEL_COLUMNS = 3
# Component -> colour: one hue per part of the model (grey embedding, blue encoder, green decoder,
# purple router, warm experts), so the stacks read at a glance.
COMPONENT_COLORS = {
    "embedding": "#9e9e9e",
    "encoder_attention": "#1f4e9c", "encoder_ffn": "#3f7fd6", "encoder_norm": "#8db6ee",
    "encoder_position_bias": "#c6dbf7",
    "decoder_self_attention": "#1b6e3a", "decoder_cross_attention": "#2e9a55", "decoder_ffn": "#5cc47f",
    "decoder_norm": "#a4e0b6", "decoder_position_bias": "#d3f0dc",
    "router": "#7b3fb0",
    "expert_encoder": "#d9480f", "expert_ffn": "#f08c00", "expert_head": "#f5b041",
}
# Line series: the same colour and dash in every panel (Streamlit's theme would cycle colours per trace).
SERIES_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")
SERIES_DASH = ("solid", "dash", "dot", "dashdot", "longdash")


def _in_chart(variants: Sequence[Variant], architecture: str) -> list[Variant]:
    """The dense rows and the MoE rows of one architecture, by size in the grid's order."""
    return [v for v in variants if v.plan.architecture in ("dense", architecture)]


def _panels(variants: Sequence[Variant], title: str, x_title: str, y_title: str,
            from_zero: bool = True) -> tuple[go.Figure, list[str]]:
    sizes = list(dict.fromkeys(v.plan.size for v in variants))
    rows = (len(sizes) + PANEL_COLUMNS - 1) // PANEL_COLUMNS
    figure = make_subplots(rows=rows, cols=min(len(sizes), PANEL_COLUMNS), subplot_titles=sizes,
                           horizontal_spacing=0.07, vertical_spacing=0.16 if rows > 1 else 0.1)
    figure.update_layout(title=title, height=300 * rows + 200, legend_title_text="", margin=dict(t=90, b=10),
                         legend=dict(orientation="h", yanchor="top", y=-0.22 / rows, x=0, xanchor="left"))
    figure.update_xaxes(title_text=x_title)
    figure.update_yaxes(rangemode="tozero" if from_zero else "normal")
    figure.update_yaxes(title_text=y_title, col=1)  # once per row: the panels share the unit
    return figure, sizes


def _add_series(figure: go.Figure, sizes: list[str], variants: Sequence[Variant], series: dict[str, Callable],
                make_trace: Callable[..., go.BaseTraceType]) -> None:
    """One trace per (series, size); `series` maps a name to variant -> exact value."""
    for i, size in enumerate(sizes):
        in_size = [v for v in variants if v.plan.size == size]
        for j, (name, value_of) in enumerate(series.items()):
            values = [value_of(v) for v in in_size]
            figure.add_trace(make_trace(name, j, [v.plan.config.num_experts for v in in_size], values, i == 0),
                             row=i // PANEL_COLUMNS + 1, col=i % PANEL_COLUMNS + 1)


def params_figure(variants: Sequence[Variant], architecture: str) -> go.Figure:
    """Stacked parameters by component vs E, one panel per size."""
    shown = _in_chart(variants, architecture)
    components = [c for c in COMPONENT_COLORS if any(v.plan.params.components()[c] for v in shown)]
    figure, sizes = _panels(shown, f"Parameters by component vs experts E ({architecture}; E = 0 is dense)",
                            "experts E", "parameters (M)")

    def bar(name, _, experts, values, first):
        return go.Bar(x=[str(e) for e in experts], y=[to_millions(v) for v in values], name=name.replace("_", " "),
                      marker_color=COMPONENT_COLORS[name], legendgroup=name, showlegend=first,
                      customdata=[f"{v:,}" for v in values], hovertemplate="E=%{x}: %{customdata} parameters")

    _add_series(figure, sizes, shown, {c: (lambda v, c=c: v.plan.params.components()[c]) for c in components}, bar)
    figure.update_layout(barmode="stack")
    figure.update_xaxes(type="category")  # E values as labels, not positions on a number line
    return figure


def _line(unit: str, scale: Callable[[float], float] = lambda v: v):
    """A series vs E: the MoE points joined by a line, the dense point (E = 0) a marker of its own."""
    def line(name, j, experts, values, first):
        # The None between the dense point and the MoE points breaks the line there (connectgaps is off).
        points = [(e, v) for e, v in zip(experts, values) if e == 0] + [(None, None)] + \
                 [(e, v) for e, v in zip(experts, values) if e != 0]
        return go.Scatter(x=[e for e, _ in points], y=[None if v is None else scale(v) for _, v in points],
                          name=name, mode="lines+markers", connectgaps=False,
                          line=dict(color=SERIES_COLORS[j % len(SERIES_COLORS)], dash=SERIES_DASH[j % len(SERIES_DASH)]),
                          legendgroup=name, showlegend=first,
                          customdata=["" if v is None else f"{v:,}" for _, v in points],
                          hovertemplate=f"E=%{{x}}: %{{customdata}} {unit}")
    return line


def flop_ratio_figure(variants: Sequence[Variant], architecture: str) -> go.Figure:
    """Forward, training and forecast FLOPs over the dense model's, vs E, one panel per size."""
    shown = _in_chart(variants, architecture)
    figure, sizes = _panels(shown, f"FLOPs relative to dense vs experts E ({architecture}); training = 3 × "
                            "forward, so their ratios coincide", "experts E", "FLOPs / dense FLOPs (×)",
                            from_zero=False)
    series = {label: (lambda v, key=key: v.row[f"{key}_vs_dense"])
              for label, key in (("forward", "forward_flops"), ("training", "train_flops"),
                                 ("forecast", "forecast_flops"))}
    _add_series(figure, sizes, shown, series, _line("× dense"))
    return figure


def memory_figure(variants: Sequence[Variant], architecture: str, dtype: str, precision: str) -> go.Figure:
    """Weights in each dtype, a training step and a forecast, in GiB vs E, one panel per size."""
    shown = _in_chart(variants, architecture)
    figure, sizes = _panels(shown, f"Memory vs experts E ({architecture}; every expert resident)", "experts E",
                            "memory (GiB = 2^30 bytes)")
    series = {
        "weights fp32": lambda v: v.plan.memory.weights.fp32_bytes,
        "weights fp16 / bf16": lambda v: v.plan.memory.weights.fp16_bytes,
        "weights int8": lambda v: v.plan.memory.weights.int8_bytes,
        f"training step ({precision})": lambda v: v.plan.memory.training.total_bytes,
        f"forecast ({dtype})": lambda v: v.plan.memory.forecast.total_bytes,
    }
    _add_series(figure, sizes, shown, series, _line("bytes", to_gib))
    return figure


# Quantities the architecture comparison offers: label -> (row key, axis title, unit, axis scale).
COMPARED = {
    "total parameters": ("total_params", "total parameters (M)", "parameters", to_millions),
    "active parameters per series": ("active_params", "active parameters (M)", "parameters", to_millions),
    "forward FLOPs ÷ dense": ("forward_flops_vs_dense", "forward FLOPs / dense FLOPs (×)", "× dense", lambda v: v),
    "training-step memory": ("train_memory_bytes", "training memory (GiB = 2^30 bytes)", "bytes", to_gib),
    "forecast memory": ("forecast_memory_bytes", "forecast memory (GiB = 2^30 bytes)", "bytes", to_gib),
}


def architectures_figure(variants: Sequence[Variant], quantity: str) -> go.Figure:
    """The three architectures side by side: one `quantity` (a COMPARED label) vs E, one line per
    architecture and the dense model's marker at E = 0, one panel per size."""
    key, axis_title, unit, scale = COMPARED[quantity]
    architectures = list(dict.fromkeys(v.plan.architecture for v in variants if v.plan.architecture != "dense"))
    figure, sizes = _panels(variants, f"Architectures compared: {quantity} vs experts E (E = 0 is dense)",
                            "experts E", axis_title, from_zero=key != "forward_flops_vs_dense")
    line = _line(unit, scale)
    for i, size in enumerate(sizes):
        in_size = [v for v in variants if v.plan.size == size]
        place = dict(row=i // PANEL_COLUMNS + 1, col=i % PANEL_COLUMNS + 1)
        for j, architecture in enumerate(architectures):
            chosen = [v for v in in_size if v.plan.architecture == architecture]
            figure.add_trace(line(architecture, j, [v.plan.config.num_experts for v in chosen],
                                  [v.row[key] for v in chosen], i == 0), **place)
        for dense in (v for v in in_size if v.plan.architecture == "dense"):
            figure.add_trace(go.Scatter(x=[0], y=[scale(dense.row[key])], name="dense", mode="markers",
                                        marker=dict(color="#222", size=9, symbol="diamond"), legendgroup="dense",
                                        showlegend=i == 0, customdata=[f"{dense.row[key]:,}"],
                                        hovertemplate=f"dense: %{{customdata}} {unit}<extra></extra>"), **place)
    return figure


def params_bars(variant: Variant) -> go.Figure:
    """One variant's parameters by component, largest first, on a log axis: the router's few thousand
    parameters show beside the experts' millions (a treemap's area hides them)."""
    components = sorted(((name, value) for name, value in variant.plan.params.components().items() if value),
                        key=lambda item: item[1])
    total = sum(value for _, value in components)
    figure = go.Figure(go.Bar(
        y=[name.replace("_", " ") for name, _ in components], x=[value for _, value in components],
        orientation="h", marker_color=[COMPONENT_COLORS[name] for name, _ in components],
        text=[f"{100 * value / total:.3g}%" for _, value in components], textposition="outside", cliponaxis=False,
        customdata=[f"{value:,}" for _, value in components],
        hovertemplate="%{y}: %{customdata} parameters (%{text})<extra></extra>",
    ))
    figure.update_layout(title=f"Parameters of {variant.label} by component", height=60 + 28 * len(components),
                         xaxis=dict(type="log", title="parameters (log scale)"), margin=dict(t=50, l=10, r=40),
                         showlegend=False)
    return figure


def memory_bars(frame: pd.DataFrame) -> go.Figure:
    """Stacked bars of where a training step's and a forecast's bytes go (frame from tables.memory_frame)."""
    figure = go.Figure([
        go.Bar(y=[row.Phase], x=[to_gib(row.Bytes)], name=f"{row.Phase.lower()}: {row.Part}", orientation="h",
               customdata=[f"{row.Bytes:,}"], hovertemplate=f"{row.Part}: %{{customdata}} bytes<extra></extra>")
        for row in frame.itertuples()
    ])
    figure.update_layout(barmode="stack", title="Where the memory goes", height=340, legend_title_text="",
                         xaxis_title="memory (GiB = 2^30 bytes)", margin=dict(t=50))
    return figure


def figure_html(figure: go.Figure) -> str:
    """A standalone page (plotly.js inlined, so it opens offline)."""
    return figure.to_html(include_plotlyjs=True, full_html=True)
