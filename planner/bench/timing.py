"""Synchronised timing after warm-up, and what the times give: median, p95, throughput, achieved FLOP/s.

Each timed step also records the process's CPU time (user + system, every thread, read exactly:
`process_cpu_s`): each kernel's time × the threads it keeps busy (a serial kernel, such as dropout's draws,
leaves the others asleep). When other processes share the cores the wall time grows and the CPU time mostly
does not, so a ratio of CPU times survives a noisy machine better than a ratio of wall times. And the bytes of new pages it faulted in (minor
page faults × the page size): on a CPU each costs the kernel a zero-fill, and how many the allocator needs
varies from step to step.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

# on_step(stage, done, total): stage is "warmup" or "measure".
StepCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class StepTimes:
    wall_s: list[float]
    cpu_s: list[float]
    fault_bytes: list[int]  # new pages each step touched first (the process's minor faults × the page size)


def measure_step_times(
    step: Callable[[], object],
    *,
    warmup: int,
    repeats: int,
    synchronize: Callable[[], None],
    on_step: Optional[StepCallback] = None,
    after_warmup: Optional[Callable[[], None]] = None,
) -> StepTimes:
    """Run `step` warmup + repeats times; time the repeats, each between two synchronisations (queued GPU
    work would otherwise be charged to the next step or to nobody). `after_warmup` runs between the two."""
    for done in range(1, warmup + 1):
        step()
        synchronize()
        if on_step:
            on_step("warmup", done, warmup)
    if after_warmup:
        after_warmup()
    times = StepTimes([], [], [])
    for done in range(1, repeats + 1):
        synchronize()
        clocks = other_thread_clocks()
        start_faults, start_cpu, start = minor_faults(), process_cpu_s(clocks), time.perf_counter()
        step()
        synchronize()
        times.wall_s.append(time.perf_counter() - start)
        times.cpu_s.append(process_cpu_s(clocks) - start_cpu)
        times.fault_bytes.append((minor_faults() - start_faults) * PAGE_BYTES)
        if on_step:
            on_step("measure", done, repeats)
    return times


PAGE_BYTES = resource.getpagesize()
THREAD_LIST = "/proc/self/task"  # Linux: one entry per thread of this process, named by its thread id
# Linux's clock id of a thread's CPU time: MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED) in its posix-timers.h.
CPUCLOCK_PERTHREAD, CPUCLOCK_SCHED = 4, 2


def thread_cpu_clock(thread_id: int) -> int:
    """The clock id `time.clock_gettime` reads a thread's CPU time (user + system) by, from its thread id."""
    return ((~thread_id) << 3) | CPUCLOCK_PERTHREAD | CPUCLOCK_SCHED


def other_thread_clocks() -> list[int]:
    """The CPU-time clocks of this process's threads but the calling one (`thread_cpu_clock`), for
    `process_cpu_s`; none where the OS lists no threads or Python reads no clock by id (macOS, Windows)."""
    if not sys.platform.startswith("linux") or not hasattr(time, "clock_gettime"):
        return []
    try:
        thread_ids = [int(name) for name in os.listdir(THREAD_LIST)]
    except (OSError, ValueError):
        return []
    return [thread_cpu_clock(tid) for tid in thread_ids if tid != threading.get_native_id()]


def process_cpu_s(other_clocks: Sequence[int]) -> float:
    """The process's CPU seconds so far (every thread, user + system), exact to the microsecond. The process's
    own clock counts the calling thread exactly but every other running thread only as of its last scheduler
    tick or switch (4 ms apart on a 2-core Zen 5 VM): an idle pool thread spinning through a 2 ms step was
    counted at the tick or the sleep after it, often outside the step (debug's forward at batch 1, context 64
    read 1.21 threads busy that way, 2.02 exactly). Reading another thread's own clock brings its count up to
    date, so each of `other_clocks` (other_thread_clocks, listed before the timing starts: listing costs 5 µs,
    reading 0.4 µs a thread) is read first. A thread that has exited since is skipped; its time stays in the
    process's."""
    for clock in other_clocks:
        try:
            time.clock_gettime(clock)
        except OSError:
            pass
    return time.process_time()


def minor_faults() -> int:
    """The process's minor page faults so far: each a new page touched first (× PAGE_BYTES)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def percentile(values: Sequence[float], q: int) -> float:
    """The q-th percentile (an integer 1–99), linear between order statistics (numpy's default, which is
    statistics.quantiles' "inclusive" method)."""
    if not values:
        raise ValueError("percentile of no values")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


@dataclass(frozen=True)
class TimingSummary:
    """Step times of one run, and the rates they give at the median step time."""

    times_s: tuple[float, ...]
    cpu_times_s: tuple[float, ...]
    median_s: float
    p95_s: float
    min_s: float  # the least disturbed repeat, when other processes share the device
    cpu_median_s: float
    series_per_s: float
    tokens_per_s: float
    achieved_flops_per_s: float


def busy_threads(wall_s: Sequence[float], cpu_s: Sequence[float]) -> float:
    """Threads busy over timed runs: their CPU time (every thread) ÷ their wall time, over all of them (0 when
    no time passed). Summed, not per run: a run's reading may be the process clock's, which counts another
    thread's CPU time in scheduler ticks (process_cpu_s)."""
    return sum(cpu_s) / sum(wall_s) if sum(wall_s) > 0 else 0.0


def summarise_times(times_s: Sequence[float], cpu_times_s: Sequence[float], *, series: int, tokens: int,
                    flops: int) -> TimingSummary:
    """Median, p95 and minimum of the step times; series/s, tokens/s and FLOP/s (the planner's FLOPs) at the
    median; the median step's CPU time: the median time × the threads busy over all steps (their CPU time ÷
    their wall time), as the probe reads a kernel's (kernel_probes.median_timing), whose kernels are timed on
    the process clock."""
    median = statistics.median(times_s)
    return TimingSummary(
        times_s=tuple(times_s),
        cpu_times_s=tuple(cpu_times_s),
        median_s=median,
        p95_s=percentile(times_s, 95),
        min_s=min(times_s),
        cpu_median_s=median * busy_threads(times_s, cpu_times_s),
        series_per_s=series / median,
        tokens_per_s=tokens / median,
        achieved_flops_per_s=flops / median,
    )
