"""Peak memory of one run above the process's baseline (the worker is a fresh process, so the baseline is
the interpreter, torch and the libraries, nothing of the model).

- cuda: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`: live tensors, without the caching
  allocator's reserve or the CUDA context, which is what the planner predicts.
- cpu: the process's peak resident memory minus its resident memory at the start. On Linux the high-water
  mark is reset at the start (/proc/self/clear_refs), so a transient peak of the imports cannot hide the
  run's; elsewhere the peak since the process began is the baseline (`ru_maxrss`).
- mps: `torch.mps.current_allocated_memory` sampled after every step, a lower bound (a peak inside a step
  is not seen; Metal offers no high-water mark).

On CPU the peak resident memory follows the live tensors only because the runner pins glibc's mmap threshold
in the worker's environment (see runner.WORKER_ENVIRONMENT).
"""

from __future__ import annotations

import platform
import resource
from pathlib import Path

import psutil
import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_RESET_HIGH_WATER_MARK = "5"  # proc(5): "reset the peak resident set size to the current one"


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class PeakMemoryProbe:
    """`start()` before the model is built, `sample()` after each step, `peak_bytes()` at the end."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.method = {
            "cuda": "cuda max_memory_allocated",
            "mps": "mps current_allocated_memory sampled per step (lower bound)",
        }.get(device, "cpu peak RSS minus baseline RSS")
        self.baseline_bytes = 0
        self._sampled_peak_bytes = 0

    def start(self) -> None:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.baseline_bytes = torch.cuda.memory_allocated()
        elif self.device == "mps":
            self.baseline_bytes = torch.mps.current_allocated_memory()
        else:
            try:
                _CLEAR_REFS.write_text(_RESET_HIGH_WATER_MARK)
                self.baseline_bytes = psutil.Process().memory_info().rss
            except OSError:  # not Linux, or /proc read-only: the peak so far is the baseline
                self.baseline_bytes = _peak_rss_bytes()

    def sample(self) -> None:
        if self.device == "mps":
            self._sampled_peak_bytes = max(self._sampled_peak_bytes, torch.mps.current_allocated_memory())

    def peak_bytes(self) -> int:
        if self.device == "cuda":
            peak = torch.cuda.max_memory_allocated()
        elif self.device == "mps":
            self.sample()
            peak = self._sampled_peak_bytes
        else:
            peak = _peak_rss_bytes()
        return max(0, peak - self.baseline_bytes)
