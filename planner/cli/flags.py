"""The command line's flag types, each an argparse `type=` that turns the text into a value or refuses it
with one line saying what is allowed (argparse adds the flag's name): lists of names, lists of integers in a
range, counts, capacity factors and numbers with K/M/G/T suffixes."""

from __future__ import annotations

import argparse
import math
from typing import Callable, Sequence

from model.config import MAX_CAPACITY_FACTOR

SHOWN_CHARS = 40  # of a refused value, quoted back
_SUFFIXES = {"K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9, "T": 10**12}


def _shown(text: str) -> str:
    return repr(text[:SHOWN_CHARS])


def name_list(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    """Comma-separated names from `allowed`, each once, in the order given."""
    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in allowed]
        if not names or unknown:
            raise argparse.ArgumentTypeError(
                f"{', '.join(unknown)[:80] or _shown(text)} not allowed; choose comma-separated from "
                f"{', '.join(allowed)}")
        return list(dict.fromkeys(names))
    return parse


def integer_list(low: int, high: int) -> Callable[[str], list[int]]:
    """Comma-separated integers from `low` to `high`, each once, in the order given."""
    def parse(text: str) -> list[int]:
        parts = [part.strip() for part in text.split(",") if part.strip()]
        values = [int(part) for part in parts if part.isdigit() and len(part) <= 12]
        if not parts or len(values) != len(parts) or any(not low <= value <= high for value in values):
            raise argparse.ArgumentTypeError(
                f"expected comma-separated integers from {low:,} to {high:,}, got {_shown(text)}")
        return list(dict.fromkeys(values))
    return parse


def count(text: str) -> int:
    """An integer ≥ 1 (at most nine digits)."""
    if not (text.strip().isdigit() and len(text.strip()) <= 9 and int(text) >= 1):
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 1, got {_shown(text)}")
    return int(text)


def bounded_number(high: float, what: str = "a number") -> Callable[[str], float]:
    """A finite number above 0 and at most `high`; `what` names it in the refusal."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and 0 < value <= high):
            limit = "" if not math.isfinite(high) else f" and ≤ {high:,g}" if high < 1e6 else f" and ≤ {high:,.0f}"
            raise argparse.ArgumentTypeError(f"expected a finite {what.removeprefix('a ')} > 0{limit}, "
                                             f"got {_shown(text)}")
        return value
    return parse


positive_number = bounded_number(math.inf)
# --expert-capacity: checked even when no token_ffn row will use it (a typo must not pass unseen)
capacity_factor = bounded_number(MAX_CAPACITY_FACTOR, "a capacity factor")


def whole_number(text: str) -> int:
    """A whole number ≥ 1, K/M/G/T suffixes allowed (200K steps), at most 10^13."""
    value = parse_count(text)
    if value != int(value) or value > 10**13:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to 10^13, got {_shown(text)}")
    return int(value)


def parse_count(text: str) -> float:
    """'200M', '50e6', '1.5G' -> a finite number > 0 (K, M, G/B, T suffixes are powers of 1000)."""
    cleaned = str(text).strip().upper().replace("_", "").replace(",", "")
    multiplier = _SUFFIXES.get(cleaned[-1:], 1)
    number = cleaned[:-1] if cleaned[-1:] in _SUFFIXES else cleaned
    try:
        value = float(number) * multiplier
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number like 200M, 5e10 or 1.5G, got {_shown(text)}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {_shown(text)}")
    return value
