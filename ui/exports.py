"""Downloads of what the app shows, through the planner's exporter (planner.export), so the app's files
and the CLI's carry the same columns and the same metadata (workload, versions, conventions)."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import pandas as pd
import plotly
import streamlit as st

from planner.export import export_metadata, render
from ui.sidebar import Settings

# Format -> (file extension, MIME type, button label).
DOWNLOADS = {
    "csv": ("csv", "text/csv", "CSV"),
    "xlsx": ("xlsx", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", "XLSX"),
    "md": ("md", "text/markdown", "Markdown"),
    "json": ("json", "application/json", "JSON"),
}


def app_metadata(settings: Settings, what: str, extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Every export's header: what it is, the settings that produced it, versions, conventions, and `extra`
    (how the rows were measured)."""
    chosen = {f"setting_{key}": value for key, value in dataclasses.asdict(settings).items()}
    return export_metadata({
        "export": what,
        "source": "Chronos-MoE capacity planner app",
        **chosen,
        **(extra or {}),
        "pandas": pd.__version__,
        "plotly": plotly.__version__,
    })


def export_bytes(rows: Sequence[dict[str, Any]], fmt: str, settings: Settings, what: str,
                 extra: Optional[dict[str, Any]] = None) -> bytes:
    return render(rows, fmt, app_metadata(settings, what, extra))


def draw_downloads(rows: Sequence[dict[str, Any]], settings: Settings, what: str, key: str,
                   extra: Optional[dict[str, Any]] = None) -> None:
    """One button per format. XLSX is built only when clicked (openpyxl is the slow one)."""
    columns = st.columns(len(DOWNLOADS))
    for column, (fmt, (extension, mime, label)) in zip(columns, DOWNLOADS.items()):
        if fmt == "xlsx":
            data = lambda: export_bytes(rows, "xlsx", settings, what, extra)  # noqa: E731
        else:
            data = export_bytes(rows, fmt, settings, what, extra)
        column.download_button(label, data, file_name=f"{key}.{extension}", mime=mime, key=f"{key}_{fmt}",
                               on_click="ignore", icon=":material/download:", width="stretch")
