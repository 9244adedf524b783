"""Refusing a setting: `SettingError`, a ValueError that carries the field it refuses (so the CLI can name
the flag and the app the widget that set it, without reading the message), and the one check of an integer
setting, shared by the model's config, the backbone presets and the planner's inputs."""

from __future__ import annotations

SHOWN_CHARS = 40  # of a refused value quoted in the message


class SettingError(ValueError):
    """A refused setting: the message says what is allowed; `field` names the setting."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def check_int(name: str, value: object, low: int, high: int) -> None:
    """SettingError unless `value` is an integer (not a bool) from `low` to `high`."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        shown = repr(value) if not isinstance(value, int) else f"{value:,}"
        shown = shown if len(shown) <= SHOWN_CHARS else shown[:SHOWN_CHARS] + "…"
        raise SettingError(name, f"{name} must be an integer from {low:,} to {high:,}, got {shown}")
