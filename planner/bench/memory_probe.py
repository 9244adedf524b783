"""Peak memory of one run above the process's baseline (the worker is a fresh process, so the baseline is
the interpreter, torch and the libraries, nothing of the model).

- cuda: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`: live tensors, without the caching
  allocator's reserve or the CUDA context, which is what the planner predicts.
- cpu: the process's peak resident memory minus its resident memory at the start. On Linux the high-water
  mark is reset at the start (/proc/self/clear_refs), so a transient peak of the imports cannot hide the
  run's; elsewhere the peak since the process began is the baseline (`ru_maxrss`).
- mps: `torch.mps.current_allocated_memory` sampled after every step, a lower bound (a peak inside a step
  is not seen; Metal offers no high-water mark).

glibc's malloc raises its mmap threshold after large frees; freed tensors then stay on the heap and resident
memory grows step after step with no more tensors alive (measured: +40% over three training steps of tiny at
batch 8). So while memory is measured (the warm-up steps) `pin_allocator` fixes the threshold at glibc's
initial 128 KiB: every large tensor is mmapped and given back when freed, and the peak resident memory
follows the live tensors. That costs page faults (about 5% of a tiny training step), so before the timed
steps `settle_allocator` sets what a long run settles to: the threshold at its dynamic maximum, 32 MiB, and
the trim threshold at twice it. Other allocators (macOS) have no mallopt and are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import resource
from pathlib import Path

import psutil
import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_RESET_HIGH_WATER_MARK = "5"  # proc(5): "reset the peak resident set size to the current one"


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
PINNED_MMAP_THRESHOLD_BYTES = 128 * 2**10
SETTLED_MMAP_THRESHOLD_BYTES = 32 * 2**20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
PROBE_MMAP_THRESHOLD_BYTES = 2**30


def _mallopt(parameter: int, value: int) -> None:
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).mallopt(parameter, value)
    except (OSError, AttributeError, TypeError):  # not glibc
        pass


def pin_allocator() -> None:
    """While memory is measured: large blocks are mmapped and returned to the system as soon as freed."""
    _mallopt(_M_MMAP_THRESHOLD, PINNED_MMAP_THRESHOLD_BYTES)


def settle_allocator() -> None:
    """While timing: glibc's steady state after a long run (freed blocks up to 32 MiB are reused)."""
    _mallopt(_M_MMAP_THRESHOLD, SETTLED_MMAP_THRESHOLD_BYTES)
    _mallopt(_M_TRIM_THRESHOLD, 2 * SETTLED_MMAP_THRESHOLD_BYTES)


def reuse_all_freed_memory() -> None:
    """For probes of kernel speed: every freed block is reused, so no timing includes fresh pages."""
    _mallopt(_M_MMAP_THRESHOLD, PROBE_MMAP_THRESHOLD_BYTES)
    _mallopt(_M_TRIM_THRESHOLD, 2 * PROBE_MMAP_THRESHOLD_BYTES)


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

    def restart_peak(self) -> bool:
        """A new high-water mark from the current use, the baseline kept: the next peak_bytes() is the peak
        since (a step's own). False where the mark cannot be reset (no writable /proc)."""
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        elif self.device == "mps":
            self._sampled_peak_bytes = torch.mps.current_allocated_memory()
        else:
            try:
                _CLEAR_REFS.write_text(_RESET_HIGH_WATER_MARK)
            except OSError:
                return False
        return True

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
