"""Rows out: an aligned text table, CSV, Markdown, JSON or XLSX, each carrying the export's metadata.

Where the metadata goes (workload, versions, conventions):
- table, md: `key: value` lines above the table;
- csv: `# key: value` comment lines above the header (read back with `pandas.read_csv(path, comment="#")`);
- xlsx: a second sheet "metadata" (key, value) beside the sheet "rows";
- json: a list of rows; every row carries the same `metadata` object.
Metadata comes partly from users (a config's keys, a file name, a share link), so each line is kept one line
(control characters shown as spaces) and no spreadsheet cell is ever a formula: text starting with `=`
stays text. Integers beyond 2^53, which a spreadsheet would round to a double, are stored as their digits.
Computation and formatting stay apart: these functions never count anything.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path
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
EXACT_FLOAT_INTEGER = 2**53  # larger integers lose digits as a spreadsheet's doubles
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]")


def one_line(value: Any) -> str:
    """`value` as text on one line: newlines, tabs and other control characters become spaces."""
    return _CONTROL.sub(" ", str(value))


def plain(value: Any) -> Any:
    """A setting as a reader writes it: ('small', 'base') -> 'small, base'; (('d_model', 512),) ->
    'd_model=512'; None -> 'none'; numbers and text as they are."""
    if value is None:
        return "none"
    if isinstance(value, Mapping):
        return ", ".join(f"{key}={plain(item)}" for key, item in value.items())
    if isinstance(value, (list, tuple)):
        if all(isinstance(item, tuple) and len(item) == 2 for item in value) and value:
            return ", ".join(f"{key}={plain(item)}" for key, item in value)
        return ", ".join(str(plain(item)) for item in value)
    return value


@functools.lru_cache(maxsize=1)
def project_commit() -> str:
    """The checkout's commit (with "+changes" when the tree differs from it), or "unknown" outside git."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+changes" if dirty else "")


def library_versions() -> dict[str, str]:
    """Versions of the libraries the numbers come from, read without importing them."""
    versions = {}
    for name in ("torch", "transformers", "chronos-forecasting", "streamlit"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def export_metadata(extra: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Conventions, versions and the project's commit every export carries, plus `extra` (the workload, the
    counters used...), every value plain (see `plain`)."""
    return {
        **{f"convention_{key}": text for key, text in CONVENTIONS.items()},
        "python": platform.python_version(),
        **library_versions(),
        "project_commit": project_commit(),
        **{key: plain(value) for key, value in (extra or {}).items()},
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


def columns_of(rows: Sequence[Row]) -> list[str]:
    """Every column any row has, so rows of different kinds export together (a benchmark's error row —
    label, status, message — beside the measured ones; a cell a row lacks is left empty). The order does not
    depend on where the odd rows fall: the widest row's columns first (the first of them if several), then
    the others in the order they first appear."""
    if not rows:
        return []
    widest = max(rows, key=len)  # max keeps the first of equal lengths
    return list(dict.fromkeys([*widest, *(column for row in rows for column in row)]))


def format_table(rows: Sequence[Row], metadata: Mapping[str, Any]) -> str:
    columns = columns_of(rows)
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c), *(len(line[i]) for line in cells)]) for i, c in enumerate(columns)]
    lines = [f"{one_line(key)}: {one_line(value)}" for key, value in metadata.items()] + [""]
    lines.append("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in cells]
    return "\n".join(lines) + "\n"


def format_markdown(rows: Sequence[Row], metadata: Mapping[str, Any]) -> str:
    columns = columns_of(rows)
    lines = [f"- **{one_line(key)}**: {one_line(value)}" for key, value in metadata.items()] + [""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def format_csv(rows: Sequence[Row], metadata: Mapping[str, Any]) -> str:
    buffer = io.StringIO()
    for key, value in metadata.items():
        buffer.write(f"# {one_line(key)}: {one_line(value)}\n")
    writer = csv.DictWriter(buffer, fieldnames=columns_of(rows), restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def format_json(rows: Sequence[Row], metadata: Mapping[str, Any]) -> str:
    return json.dumps([{**row, "metadata": dict(metadata)} for row in rows], indent=2) + "\n"


def _write_sheet(sheet, table: Sequence[Sequence[Any]]) -> None:
    for row_index, values in enumerate(table, start=1):
        for column_index, value in enumerate(values, start=1):
            if isinstance(value, (list, tuple, dict)):
                value = json.dumps(value)
            elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > EXACT_FLOAT_INTEGER:
                value = str(value)  # the exact digits, as text
            cell = sheet.cell(row=row_index, column=column_index, value=value)
            if isinstance(value, str):
                cell.data_type = "s"  # text, never a formula (openpyxl makes "=..." one)


def xlsx_bytes(rows: Sequence[Row], metadata: Mapping[str, Any]) -> bytes:
    from openpyxl import Workbook  # only this format needs it

    workbook = Workbook()
    sheet = workbook.active
    sheet.title = "rows"
    columns = columns_of(rows)
    _write_sheet(sheet, [columns, *([row.get(c) for c in columns] for row in rows)])
    _write_sheet(workbook.create_sheet("metadata"),
                 [["key", "value"], *([one_line(key), one_line(value)] for key, value in metadata.items())])
    buffer = io.BytesIO()
    workbook.save(buffer)
    return buffer.getvalue()


_TEXT_FORMATTERS = {"table": format_table, "csv": format_csv, "md": format_markdown, "json": format_json}


def render(rows: Sequence[Row], fmt: str, metadata: Mapping[str, Any]) -> bytes:
    """The export as bytes (UTF-8 for the text formats)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "xlsx":
        return xlsx_bytes(rows, metadata)
    return _TEXT_FORMATTERS[fmt](rows, metadata).encode("utf-8")
