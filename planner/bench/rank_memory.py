"""A rank's memory in the distributed benchmark beyond the probe's single peak: /proc/self/status fields, each
step's own peak (`StepPeaks`), and the step an expert-parallel rank's peak is predicted at (`peak_step`)."""

from __future__ import annotations

from typing import Optional


def status_bytes(*fields: str) -> dict[str, int]:
    """Fields of /proc/self/status in bytes (VmRSS, VmHWM, RssFile, ...); empty where there is no /proc."""
    values: dict[str, int] = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in fields:
                    values[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return values


class StepPeaks:
    """Each step's peak above the probe's baseline (planner.bench.memory_probe.PeakMemoryProbe): its high-water
    mark restarted at the step's start and read at its end, on CPU less the file-backed pages mapped since the
    baseline (RssFile: library code paged in, not memory the step allocates). `peaks[0]` is the set-up's (the
    model built and wrapped), then one per step. None where the mark cannot be restarted or there is no
    /proc: the probe's single peak stands."""

    def __init__(self, probe) -> None:
        self.probe, self.cuda = probe, probe.device == "cuda"
        self.file_backed = None if self.cuda else status_bytes("RssFile").get("RssFile")
        self.peaks: Optional[list[int]] = [] if self.cuda or self.file_backed is not None else None

    def close(self) -> None:
        """The peak since the last restart (the set-up's, or a step's), and a fresh high-water mark."""
        if self.peaks is None:
            return
        peak = self.probe.peak_bytes()
        if not self.cuda:
            file_backed = status_bytes("RssFile").get("RssFile")
            if file_backed is None:
                self.peaks = None
                return
            peak -= max(0, file_backed - self.file_backed)
        self.peaks.append(max(0, peak))
        if not self.probe.restart_peak():
            self.peaks = None


def peak_step(routed: list[tuple[int, int]], step_peaks: Optional[list[int]]) -> int:
    """The step whose routing load the rank's peak is predicted at: the one that set the peak (the first of
    equal peaks), or without per-step peaks the one whose experts received the most. A later step can peak
    higher at a lower load: the first step's peak comes before AdamW's moments exist."""
    steps = range(len(routed))
    if step_peaks:
        return max(steps, key=step_peaks.__getitem__)
    return max(steps, key=routed.__getitem__)
