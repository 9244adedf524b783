"""How much the machine's threads add together right now: the state a probe and a measurement must share.

A virtual machine's cores can be hyperthreads of one physical core whose sibling the host lends to a
neighbour. Then one thread runs as fast as ever, but all threads together run slower: on the 2-core CI
machine a fixed GEMM on two threads ran 1.9× its one-thread rate for a minute, then 1.5× the next, with no
load, steal time or frequency change visible inside the guest, and every step that keeps both threads busy
(PyTorch's idle threads spin) slowed by the same 1.2–1.3×. A probe taken in one state prices the other wrong
by that much. The speedup is cheap to measure (a fifth of a second), so the probe records it and every
benchmark run measures it before its timed steps: a run whose state differs from its probe's says so.
"""

from __future__ import annotations

import statistics
import time

import torch

REFERENCE_GEMM = (256, 1024, 1024)  # (m, n, k): large enough that every thread gets work, small enough to be quick
SPEEDUP_TIME_S = 0.08  # per thread count
SPEEDUP_TOLERANCE = 0.10  # a run's speedup this far from its probe's is a different machine state
# A run's re-timed host time per op beyond these multiples of its probe's is a busy machine, not a drift of its
# state. Quiet, it moved by up to 2.2× within a grid: tiny's MoE-16 shared_then_expert forward at batch 1 read
# 40.6 µs an op against its probe's 18.2 minutes before, and its steps ran 1.4× their price on the probe's
# (1.06× on its own). Under a test suite on both cores it read 20–350 ×.
HOST_DRIFT_RANGE = (0.2, 5.0)


def parallel_speedup() -> float:
    """Rate of the reference GEMM on every thread PyTorch uses ÷ its rate on one thread (1.0 with one)."""
    from planner.steptime.kernel_probes import typical_time_s  # the probe's timing statistic

    threads = torch.get_num_threads()
    if threads == 1:
        return 1.0
    m, n, k = REFERENCE_GEMM
    a, b = torch.ones(m, k), torch.ones(k, n)
    all_threads_s = typical_time_s(lambda: torch.mm(a, b), min_time_s=SPEEDUP_TIME_S)
    torch.set_num_threads(1)
    try:
        one_thread_s = typical_time_s(lambda: torch.mm(a, b), min_time_s=SPEEDUP_TIME_S)
    finally:
        torch.set_num_threads(threads)
    return one_thread_s / all_threads_s


class ReferenceGemm:
    """The reference GEMM on every thread, one timing at a time (each after an untimed run): timed after each of
    a benchmark's steps (`during_steps`) and again beside the timings its prediction makes (`beside_pricing`),
    the ratio of the two medians (`state_ratio`) says how much slower the machine ran GEMMs during the steps
    than when they were priced."""

    def __init__(self) -> None:
        m, n, k = REFERENCE_GEMM
        self.a, self.b = torch.ones(m, k), torch.ones(k, n)
        self.steps_s: list[float] = []
        self.pricing_s: list[float] = []

    def _time_once(self) -> float:
        torch.mm(self.a, self.b)
        start = time.perf_counter()
        torch.mm(self.a, self.b)
        return time.perf_counter() - start

    def during_steps(self) -> None:
        self.steps_s.append(self._time_once())

    def beside_pricing(self, repeats: int = 5) -> None:
        self.pricing_s += [self._time_once() for _ in range(repeats)]

    def state_ratio(self) -> float | None:
        if not self.steps_s or not self.pricing_s:
            return None
        return statistics.median(self.steps_s) / statistics.median(self.pricing_s)


def state_note(run_speedup: float, probe_speedup: float) -> str | None:
    """A one-line note when a run's speedup differs from its probe's by more than SPEEDUP_TOLERANCE."""
    if abs(run_speedup / probe_speedup - 1) <= SPEEDUP_TOLERANCE:
        return None
    return (f"the threads ran {run_speedup:.2f}× one thread's rate together during this run and "
            f"{probe_speedup:.2f}× when this device was probed (the host shares its cores): measured ÷ "
            f"predicted includes that difference; run again, or with --recalibrate")


def host_drift_note(run_s: float, probe_s: float) -> str | None:
    """A one-line note when a run's re-timed host time per op is outside HOST_DRIFT_RANGE of its probe's (the
    prediction then keeps the probe's); None when it may be used."""
    if HOST_DRIFT_RANGE[0] <= run_s / probe_s <= HOST_DRIFT_RANGE[1]:
        return None
    return (f"the host dispatched an op in {run_s * 1e6:.1f} µs at this run and {probe_s * 1e6:.1f} µs when this "
            f"device was probed: the machine is busy, so the prediction keeps the probe's; run again when it is "
            f"quiet")
