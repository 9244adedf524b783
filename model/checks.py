"""The one check of an integer setting, shared by the model's config, the backbone presets and the
planner's inputs: a clear ValueError naming the field and the allowed range."""

from __future__ import annotations

SHOWN_CHARS = 40  # of a refused value quoted in the message


def check_int(name: str, value: object, low: int, high: int) -> None:
    """ValueError unless `value` is an integer (not a bool) from `low` to `high`."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        shown = repr(value) if not isinstance(value, int) else f"{value:,}"
        shown = shown if len(shown) <= SHOWN_CHARS else shown[:SHOWN_CHARS] + "…"
        raise ValueError(f"{name} must be an integer from {low:,} to {high:,}, got {shown}")
