"""Frames for st.dataframe: exact values underneath (so sorting is numeric and exports are exact),
readable units on screen through a pandas Styler, and a help text on every column header."""

from __future__ import annotations

from typing import Callable, Sequence

import pandas as pd
import streamlit as st

from ui.compute import Variant, memory_parts
from planner.units import column_format

# Grid column -> (plan row key, header help, unit kind for planner.units.column_format), in display order.
# Headers are short so the grid fits a laptop screen; the help spells each one out. Each column shows one
# unit, its largest value's: SI prefixes for counts ("5.61 G"), binary prefixes for bytes.
GRID_COLUMNS: dict[str, tuple[str, str, str]] = {
    "Total params": ("total_params", "Total parameters: every registered tensor, all E experts, tied embedding "
                     "once", "count"),
    "Active": ("active_params", "Active parameters per series: shared parts, router, K experts", "count"),
    "Trainable": ("trainable_params", "Parameters the fine-tuning regime trains (the sidebar's Trainable): only they "
                  "get gradients and optimizer states. Shown when not every parameter trains", "count"),
    "+ vs dense": ("params_increase_over_dense", "Total parameters minus the dense model's", "signed_count"),
    "Fwd FLOPs": ("forward_flops", "Forward FLOPs: teacher-forced forward of one batch (S = context + 1, "
                  "T = prediction + 1); FLOPs = 2 × multiply-accumulates", "count"),
    "Fwd ×dense": ("forward_flops_vs_dense", "Forward FLOPs over the dense model's", "ratio"),
    "Train FLOPs": ("train_flops", "Training-step FLOPs: forward + backward; 3 × forward when every parameter "
                    "trains, less with a frozen backbone (only the gradients the trainable parts need)", "count"),
    "Fcst FLOPs": ("forecast_flops", "Forecast FLOPs: encode the batch once, then N × prediction cached decoder "
                   "steps", "count"),
    "Fcst ×dense": ("forecast_flops_vs_dense", "Forecast FLOPs over the dense model's", "ratio"),
    "Weights": ("weights_fp32_bytes", "Weights in fp32: all parameters × 4 bytes, every expert resident "
                "(fp16/bf16: half; in the exports); GiB = 2^30 bytes", "bytes"),
    "Train mem": ("train_memory_bytes", "Training-step memory: weights + gradients + optimizer states + "
                  "activations saved for backward, in the chosen precision and optimizer", "bytes"),
    "Fcst mem": ("forecast_memory_bytes", "Forecast memory: weights in the inference dtype + KV cache + "
                 "encoder output per sample path + largest live activation", "bytes"),
}
_VARIANT_COLUMNS = {"Size": "size", "Architecture": "architecture", "E": "num_experts", "K": "top_k"}


def grid_frame(variants: Sequence[Variant]) -> pd.DataFrame:
    """Exact values, one row per variant, display headers. "Trainable" only when some parameters are frozen
    (with everything trained it repeats "Total params"); it then takes the place of "+ vs dense", so the grid
    still fits a laptop screen (the export keeps both)."""
    frozen = any(v.row["trainable_params"] != v.row["total_params"] for v in variants)
    hidden = "+ vs dense" if frozen else "Trainable"
    columns = {**_VARIANT_COLUMNS, **{name: key for name, (key, _, _) in GRID_COLUMNS.items() if name != hidden}}
    return pd.DataFrame([{name: v.row[key] for name, key in columns.items()} for v in variants])


def _shown(frame: pd.DataFrame) -> list[tuple[str, tuple[str, str, str]]]:
    """The GRID_COLUMNS this frame has."""
    return [(name, spec) for name, spec in GRID_COLUMNS.items() if name in frame.columns]


INT64_MAX = 2**63 - 1  # Arrow, which draws every table, holds no larger integer
EXACT_IN_BROWSER = 2**53  # the browser's numbers are doubles: larger integers it would round
CHAR_PX, CELL_PADDING_PX = 6.8, 12  # the grid's font (14 px Source Sans, digits 6.8 px wide) and a cell's padding


def _holds_integers_beyond(frame: pd.DataFrame, name: str, limit: int) -> bool:
    return any(isinstance(v, int) and abs(v) > limit for v in frame[name])


def arrow_safe(frame: pd.DataFrame, exact: bool = False) -> pd.DataFrame:
    """`frame` ready to draw. Absurd workloads pass int64 (bytes of a 10,000-series batch at context 100,000):
    such columns become floats. With `exact`, every column holding integers the browser would round (beyond
    2^53) becomes their exact digits instead, as text."""
    limit = EXACT_IN_BROWSER if exact else INT64_MAX
    huge = [name for name in frame.columns if _holds_integers_beyond(frame, name, limit)]
    if not huge:
        return frame
    frame = frame.copy()
    for name in huge:
        frame[name] = [f"{v:,}" if exact else float(v) for v in frame[name]]
    return frame


def _cell_texts(frame: pd.DataFrame, exact: bool) -> dict[str, list[str]]:
    """Every grid column's cells as they are drawn, to size the columns."""
    texts = {name: [str(v) for v in frame[name]] for name in frame.columns if name not in GRID_COLUMNS}
    for name, (_, _, kind) in _shown(frame):
        if exact:
            texts[name] = [f"{v:,}" if isinstance(v, int) else f"{v:,.4g}" for v in frame[name]]
        else:
            shown = column_format(kind, frame[name])
            texts[name] = [shown(v) for v in frame[name]]
    return texts


def grid_display(frame: pd.DataFrame, exact: bool):
    """The frame as drawn: readable units, one per bytes column (a Styler), or with `exact` the integers
    themselves; integers beyond 2^53 as their exact digits (text: the browser would round them)."""
    if exact:
        return arrow_safe(frame, exact=True)
    return arrow_safe(frame).style.format({name: column_format(kind, frame[name])
                                           for name, (_, _, kind) in _shown(frame)})


def _width_px(header: str, cells: Sequence[str]) -> int:
    """Pixels that show the header and the longest cell whole (a cut first digit misreads a count)."""
    return round(max(len(header), *(len(cell) for cell in cells)) * CHAR_PX + CELL_PADDING_PX)


def grid_column_config(exact: bool, frame: pd.DataFrame) -> dict[str, object]:
    """Header help and a width fitted to the content for every column; exact mode shows thousands
    separators."""
    texts = _cell_texts(frame, exact)
    config: dict[str, object] = {
        "Size": st.column_config.TextColumn("Size", help="Chronos-T5 size", pinned=True,
                                            width=_width_px("Size", texts["Size"])),
        "Architecture": st.column_config.TextColumn("Architecture", help="dense, or where the experts go", pinned=True,
                                                    width=_width_px("Architecture", texts["Architecture"])),
        "E": st.column_config.NumberColumn("E", help="Experts (0 = dense)", width=_width_px("E", texts["E"])),
        "K": st.column_config.NumberColumn("K", help="Experts active per series / token",
                                           width=_width_px("K", texts["K"])),
    }
    for name, (_, help_text, _) in _shown(frame):
        suffix = " Exact value: turn on Exact values, or export." if not exact else ""
        width = _width_px(name, texts[name])
        if exact and _holds_integers_beyond(frame, name, EXACT_IN_BROWSER):
            config[name] = st.column_config.TextColumn(name, help=help_text + ".", width=width)
        else:
            config[name] = st.column_config.NumberColumn(name, help=help_text + "." + suffix, width=width,
                                                         format="localized" if exact else None)
    return config


def component_frame(components: dict[str, int], value_name: str) -> pd.DataFrame:
    """Component -> value, the zero ones left out (not every architecture has every part)."""
    rows = [{"Component": name.replace("_", " "), value_name: value} for name, value in components.items() if value]
    return pd.DataFrame(rows, columns=["Component", value_name])


def flops_frame(variant: Variant) -> pd.DataFrame:
    """Component -> forward and forecast FLOPs of one batch, parts neither pass uses left out."""
    forward, forecast = variant.plan.flops.forward.components(), variant.plan.flops.forecast.components()
    rows = [{"Component": name, "Forward": forward[name], "Forecast": forecast[name]}
            for name in forward if forward[name] or forecast[name]]
    return pd.DataFrame(rows, columns=["Component", "Forward", "Forecast"])


def memory_frame(variant: Variant) -> pd.DataFrame:
    """Phase, part, bytes: where the memory of a training step and of a forecast goes."""
    phases = {"train_memory_bytes": "Training step", "forecast_memory_bytes": "Forecast"}
    rows = [
        {"Phase": phases[phase], "Part": part, "Bytes": value}
        for phase, parts in memory_parts(variant.plan.memory).items()
        for part, value in parts.items()
    ]
    return pd.DataFrame(rows)


def styled(frame: pd.DataFrame, formats: dict[str, Callable[[float], str]]):
    return arrow_safe(frame).style.format(formats)
