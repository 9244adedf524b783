"""Where the benchmark keeps what outlives a run: the device probe's results and the cross-process lock."""

from __future__ import annotations

import os
from pathlib import Path

# Tests (and users with a read-only home) point this elsewhere.
CACHE_DIR_ENV = "CHRONOS_MOE_PLANNER_CACHE_DIR"


def cache_dir() -> Path:
    """~/.cache/chronos-moe-planner (or $CHRONOS_MOE_PLANNER_CACHE_DIR), created on first use."""
    path = Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "chronos-moe-planner")
    path.mkdir(parents=True, exist_ok=True)
    return path
