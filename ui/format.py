"""Readable units for the app: parameters and FLOPs with SI prefixes (K, M, G, T), bytes in binary
prefixes (KiB, MiB, GiB; never GB). Formatting only: the exact values travel in the exports."""

from __future__ import annotations

_SI_PREFIXES = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K"))
_BINARY_PREFIXES = ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"))
GIB = 2**30


def _three_digits(value: float) -> str:
    """Three significant digits, trailing zeros kept: 8.39, 20.5, 709."""
    return f"{value:.{2 if abs(value) < 10 else 1 if abs(value) < 100 else 0}f}"


def format_count(value: float, unit: str = "") -> str:
    """8_390_000 -> '8.39 M'; `unit` follows the prefix (unit 'FLOP' gives '12.3 GFLOP')."""
    for scale, prefix in _SI_PREFIXES:
        scaled = float(f"{value / scale:.3g}")  # rounded first, so 999_600 reads 1.00 M, not 1000 K
        if abs(scaled) >= 1:
            return f"{_three_digits(scaled)} {prefix}{unit}"
    return f"{value:,.0f} {unit}".rstrip()


def format_signed_count(value: float) -> str:
    """An increase over dense: '+3.15 M', '0' for none."""
    return "0" if value == 0 else ("+" if value > 0 else "−") + format_count(abs(value))


def format_bytes(value: float) -> str:
    """2_147_483_648 -> '2.00 GiB'."""
    for scale, prefix in _BINARY_PREFIXES:
        scaled = round(value / scale, 2)
        if abs(scaled) >= 1:
            return f"{scaled:.2f} {prefix}"
    return f"{value:,.0f} B"


def format_ratio(value: float) -> str:
    """A ratio to the dense model: '1.23×'."""
    return f"{value:.2f}×"


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
