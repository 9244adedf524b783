"""The Benchmark tab's charts: measured against predicted, where the time goes, MoE ÷ dense against the FLOP
ratio, and expert usage. Plotly loads when a chart is drawn."""

from __future__ import annotations

from typing import Any, Sequence

from planner.bench import BenchResult
from planner.steptime import TERMS

TERM_COLOURS = {"matmul": "#1f77b4", "memory-bound": "#ff7f0e", "overhead": "#7f7f7f", "sync": "#d62728"}


def measured_figure(results: Sequence[BenchResult]):
    """Measured against predicted, time and peak memory, on log axes with the line of perfect prediction."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    done = [r for r in results if r.ok]
    figure = make_subplots(rows=1, cols=2, subplot_titles=("step time (s)", "peak memory (MiB = 2^20 bytes)"),
                           horizontal_spacing=0.1)
    for col, (measured, predicted, scale) in enumerate((
            (lambda r: r.timing.median_s, lambda r: r.predicted_time_s, 1.0),
            (lambda r: r.peak_memory_bytes, lambda r: r.predicted_peak_bytes, 2.0**-20)), start=1):
        x = [predicted(r) * scale for r in done]
        y = [measured(r) * scale for r in done]
        span = [min(x + y) / 2, max(x + y) * 2]
        figure.add_trace(go.Scatter(x=span, y=span, mode="lines", line=dict(dash="dash", color="#999"),
                                    name="measured = predicted", showlegend=col == 1), row=1, col=col)
        figure.add_trace(go.Scatter(x=x, y=y, mode="markers", marker=dict(size=10, color="#1f77b4"),
                                    text=[r.spec.label for r in done], name="runs", showlegend=col == 1,
                                    hovertemplate="%{text}<br>predicted %{x:.3g}<br>measured %{y:.3g}<extra></extra>"),
                         row=1, col=col)
    figure.update_xaxes(type="log", dtick="D2", title_text="predicted")  # labels at 1, 2, 5 of each decade
    figure.update_yaxes(type="log", dtick="D2", title_text="measured")
    figure.update_layout(title="Measured vs predicted (above the dashed line: slower or larger than predicted)",
                         height=420, margin=dict(t=90))
    return figure


def time_split_figure(labels: Sequence[str], splits: Sequence[dict[str, float]],
                      measured_s: Sequence[float | None] = ()):
    """Where the time goes: each run's predicted step split into matmul, memory-bound, overhead and sync,
    with the measured median as a marker where there is one."""
    import plotly.graph_objects as go

    figure = go.Figure([go.Bar(y=list(labels), x=[split[term] for split in splits], name=term, orientation="h",
                               marker_color=TERM_COLOURS[term],
                               hovertemplate="%{y}<br>" + term + " %{x:.3g} s<extra></extra>") for term in TERMS])
    measured = [(label, value) for label, value in zip(labels, measured_s) if value]
    if measured:
        figure.add_trace(go.Scatter(y=[label for label, _ in measured], x=[value for _, value in measured],
                                    mode="markers", name="measured median", marker=dict(symbol="line-ns-open",
                                                                                        size=22, color="black")))
    figure.update_layout(title="Where the time goes (predicted step, split by what bounds it)", barmode="stack",
                         xaxis_title="seconds per step", height=max(260, 60 + 42 * len(labels)),
                         legend=dict(orientation="h", yanchor="bottom", y=1.02), margin=dict(t=90, l=10))
    figure.update_yaxes(autorange="reversed")
    return figure


def ratio_figure(comparison: Sequence[dict[str, Any]]):
    """MoE ÷ dense measured time against the planner's FLOP ratio: sparse dispatch should stay near the line."""
    import plotly.graph_objects as go

    values = [row["flops_vs_dense"] for row in comparison] + [row["time_vs_dense"] for row in comparison]
    span = [0.0, max(values) * 1.1]
    figure = go.Figure([
        go.Scatter(x=span, y=span, mode="lines", line=dict(dash="dash", color="#999"), name="time ratio = FLOP ratio"),
        go.Scatter(x=[row["flops_vs_dense"] for row in comparison], y=[row["time_vs_dense"] for row in comparison],
                   mode="markers", marker=dict(size=11), text=[row["label"] for row in comparison], name="MoE runs",
                   hovertemplate="%{text}<br>FLOPs ×%{x:.2f}<br>time ×%{y:.2f}<extra></extra>"),
    ])
    figure.update_layout(title="MoE ÷ dense: measured time ratio vs the planner's FLOP ratio",
                         xaxis_title="FLOPs ÷ dense FLOPs (×)", yaxis_title="median time ÷ dense median time (×)",
                         height=420, margin=dict(t=60))
    return figure


def usage_figure(results: Sequence[BenchResult]):
    """Routing slots per expert (summed over MoE layers), one group of bars per run."""
    import plotly.graph_objects as go

    figure = go.Figure([go.Bar(x=[f"expert {i}" for i in range(len(r.usage_counts))], y=list(r.usage_counts),
                               name=r.spec.label) for r in results if r.ok and r.usage_counts])
    figure.update_layout(title="Expert usage: routed slots per expert (balanced: equal bars)", barmode="group",
                         showlegend=True,
                         yaxis_title="routed slots (series or tokens × K, all MoE layers)", height=380,
                         legend=dict(orientation="h", yanchor="top", y=-0.15), margin=dict(t=60))
    return figure
