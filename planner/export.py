"""Rows out: an aligned text table, CSV, Markdown, JSON or XLSX, each carrying the export's metadata.

Where the metadata goes (workload, versions, conventions):
- table, md: `key: value` lines above the table;
- csv: `# key: value` comment lines above the header (read back with `pandas.read_csv(path, comment="#")`);
- xlsx: a second sheet "metadata" (key, value) beside the sheet "rows";
- json: a list of rows, as the issue asks; every row carries the same `metadata` object.
Computation and formatting stay apart: these functions never count anything.
"""

from __future__ import annotations

import csv
import io
import json
import platform
from typing import Any, Mapping, Optional, Sequence

FORMATS = ("table", "csv", "md", "json", "xlsx")

CONVENTIONS = {
    "flops": "FLOPs = 2 x multiply-accumulates; matrix products only (linear layers, attention scores and "
    "weighted sums); softmax, norms, activations and other elementwise work not counted; causal scores "
    "counted in full",
    "params": "unique tensors (tied embedding/LM head once), buffers excluded",
    "memory": "bytes; GiB = 2^30 bytes",
}

Row = Mapping[str, Any]


def export_metadata(extra: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Conventions and versions every export carries, plus `extra` (the workload, the counters used...)."""
    return {
        **{f"convention_{key}": text for key, text in CONVENTIONS.items()},
        "python": platform.python_version(),
        **(extra or {}),
    }


def _cell(value: Any) -> str:
    """Human text for the table and Markdown formats: thousands separators, 4 significant decimals."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.4g}" if abs(value) < 1e6 else f"{value:.4e}"


def format_table(rows: Sequence[Row], metadata: Mapping[str, Any]) -> str:
    columns = list(rows[0]) if rows else []
    cells = [[_cell(row[c]) for c in columns] for row in rows]
    widths = [max([len(c), *(len(line[i]) for line in cells)]) for i, c in enumerate(columns)]
    lines = [f"{key}: {value}" for key, value in metadata.items()] + [""]
    lines.append("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in cells]
    return "\n".join(lines) + "\n"


def format_markdown(rows: Sequence[Row], metadata: Mapping[str, Any]) -> str:
    columns = list(rows[0]) if rows else []
    lines = [f"- **{key}**: {value}" for key, value in metadata.items()] + [""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def format_csv(rows: Sequence[Row], metadata: Mapping[str, Any]) -> str:
    buffer = io.StringIO()
    for key, value in metadata.items():
        buffer.write(f"# {key}: {value}\n")
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def format_json(rows: Sequence[Row], metadata: Mapping[str, Any]) -> str:
    return json.dumps([{**row, "metadata": dict(metadata)} for row in rows], indent=2) + "\n"


def xlsx_bytes(rows: Sequence[Row], metadata: Mapping[str, Any]) -> bytes:
    import pandas as pd  # only this format needs pandas (and openpyxl)

    buffer = io.BytesIO()
    with pd.ExcelWriter(buffer, engine="openpyxl") as writer:
        pd.DataFrame(list(rows)).to_excel(writer, sheet_name="rows", index=False)
        meta = pd.DataFrame({"key": list(metadata), "value": [str(v) for v in metadata.values()]})
        meta.to_excel(writer, sheet_name="metadata", index=False)
    return buffer.getvalue()


_TEXT_FORMATTERS = {"table": format_table, "csv": format_csv, "md": format_markdown, "json": format_json}


def render(rows: Sequence[Row], fmt: str, metadata: Mapping[str, Any]) -> bytes:
    """The export as bytes (UTF-8 for the text formats)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "xlsx":
        return xlsx_bytes(rows, metadata)
    return _TEXT_FORMATTERS[fmt](rows, metadata).encode("utf-8")
