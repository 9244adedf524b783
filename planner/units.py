"""Readable units for people (the app's tables, the CLI's `--units human`): parameters and FLOPs with SI
prefixes (K … E), bytes with binary prefixes (KiB … EiB; never GB). Formatting only: the exact values
travel in the exports.

A column of bytes reads in one unit: `column_format` picks the unit of the column's largest value, so
512 MiB beside 8 GiB reads 0.50 GiB and 8.00 GiB, never two units in one column.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

SI_PREFIXES = ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K"))
BINARY_PREFIXES = ((2**60, "EiB"), (2**50, "PiB"), (2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"))
GIB = 2**30


def _three_digits(value: float) -> str:
    """Three significant digits, trailing zeros kept: 8.39, 20.5, 709."""
    return f"{value:.{2 if abs(value) < 10 else 1 if abs(value) < 100 else 0}f}"


def count_unit(value: float) -> tuple[float, str]:
    """(scale, prefix) that shows `value` with one to three digits before the point."""
    for scale, prefix in SI_PREFIXES:
        if abs(float(f"{value / scale:.3g}")) >= 1:  # rounded first, so 999_600 reads 1.00 M, not 1000 K
            return scale, prefix
    return 1.0, ""


def byte_unit(value: float) -> tuple[float, str]:
    """(scale, unit) that shows `value` bytes with one to four digits before the point."""
    for scale, prefix in BINARY_PREFIXES:
        if abs(round(value / scale, 2)) >= 1:
            return scale, prefix
    return 1.0, "B"


def format_count(value: float, unit: str = "", scale: Optional[tuple[float, str]] = None) -> str:
    """8_390_000 -> '8.39 M'; `unit` follows the prefix (unit 'FLOP' gives '12.3 GFLOP'); `scale` fixes the
    prefix (a column's)."""
    factor, prefix = scale or count_unit(value)
    if factor == 1.0:
        return f"{value:,.0f} {unit}".rstrip()
    scaled = float(f"{value / factor:.3g}")
    text = _three_digits(scaled) if abs(scaled) >= 1 else f"{value / factor:.3g}"  # below the column's unit
    return f"{text} {prefix}{unit}"


def format_signed_count(value: float, scale: Optional[tuple[float, str]] = None) -> str:
    """An increase over dense: '+3.15 M', '0' for none."""
    return "0" if value == 0 else ("+" if value > 0 else "−") + format_count(abs(value), scale=scale)


def format_bytes(value: float, scale: Optional[tuple[float, str]] = None) -> str:
    """2_147_483_648 -> '2.00 GiB'; `scale` fixes the unit (a column's)."""
    factor, unit = scale or byte_unit(value)
    if factor == 1.0:
        return f"{value:,.0f} B"
    scaled = value / factor
    return f"{scaled:.2f} {unit}" if abs(round(scaled, 2)) >= 1 or scaled == 0 else f"{scaled:#.3g} {unit}"


def format_ratio(value: float) -> str:
    """A ratio to the dense model: '1.23×'."""
    return f"{value:.2f}×"


def column_format(kind: str, values: Iterable[float]) -> Callable[[float], str]:
    """A formatter for a whole column of `kind` ('count', 'signed_count', 'bytes', 'ratio'). A bytes column
    reads in one unit, its largest value's (smaller values with three significant digits: 0.0328 GiB);
    counts keep each cell's SI prefix (8.39 M beside 1.20 G, as parameter counts are written)."""
    if kind == "bytes":
        numbers = [abs(v) for v in values if isinstance(v, (int, float)) and v == v]
        scale = byte_unit(max(numbers, default=0))
        return lambda v: format_bytes(v, scale)
    return {"count": format_count, "signed_count": format_signed_count, "ratio": format_ratio}[kind]


def to_gib(value: float) -> float:
    """Bytes as GiB, for chart axes (plotly has no binary-prefix ticks)."""
    return value / GIB


def to_millions(value: float) -> float:
    """Parameters in millions, for chart axes."""
    return value / 1e6


def format_seconds(value: float) -> str:
    """A duration with three significant digits: '1.23 s', '45.6 ms', '780 µs'."""
    for scale, unit in ((1.0, "s"), (1e-3, "ms")):
        scaled = float(f"{value / scale:.3g}")
        if abs(scaled) >= 1:
            return f"{_three_digits(scaled)} {unit}"
    return f"{_three_digits(float(f'{value / 1e-6:.3g}'))} µs"
