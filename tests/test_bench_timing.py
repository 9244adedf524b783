"""The benchmark's timing (planner.bench.timing, pure): percentiles and the summary against hand-derived values,
the warm-up and repeats it runs, and the new pages each timed step faults."""

import pytest

from planner.bench.timing import measure_step_times, percentile, summarise_times


def test_percentile_and_summary_hand_derived():
    times = [4.0, 1.0, 3.0, 2.0, 5.0]
    assert percentile(times, 50) == 3.0
    assert percentile(times, 95) == pytest.approx(4.8)  # rank 0.95 · 4 = 3.8 between 4 and 5
    summary = summarise_times(times, [2 * t for t in times], series=8, tokens=600, flops=12_000_000_000)
    assert (summary.median_s, summary.min_s, summary.cpu_median_s) == (3.0, 1.0, 6.0)
    assert (summary.series_per_s, summary.tokens_per_s, summary.achieved_flops_per_s) == (8 / 3, 200.0, 4e9)


def test_median_steps_cpu_time_is_its_time_at_the_threads_busy_over_all_steps():
    """Another thread's CPU time comes in whole ticks: steps of 2 ms reading 2, 2, 2, 6 and 6 ms of CPU (the
    other thread charged a 4 ms tick in two of five) kept 18 / 10 = 1.8 threads busy, so the median step's
    CPU time is 2 × 1.8 = 3.6 ms, where the median of the readings would say 2 (one thread)."""
    summary = summarise_times([2.0] * 5, [2.0, 6.0, 2.0, 6.0, 2.0], series=1, tokens=1, flops=1)
    assert summary.cpu_median_s == pytest.approx(3.6)


def test_measure_step_times_counts_warmup_and_repeats():
    calls, stages = [], []
    times = measure_step_times(lambda: calls.append(1), warmup=2, repeats=3, synchronize=lambda: None,
                               on_step=lambda stage, done, total: stages.append((stage, done, total)),
                               after_warmup=lambda: stages.append("after warm-up"))
    assert len(calls) == 5 and len(times.wall_s) == len(times.cpu_s) == 3 and min(times.wall_s) >= 0
    assert stages == [("warmup", 1, 2), ("warmup", 2, 2), "after warm-up",
                      ("measure", 1, 3), ("measure", 2, 3), ("measure", 3, 3)]


def test_measure_step_times_counts_each_steps_new_pages():
    """A step that fills 16 MiB of newly mapped memory faults its 16 MiB (within a page table's worth); one that
    touches nothing new faults (almost) nothing."""
    import mmap

    import torch

    def fill_fresh_pages():
        region = mmap.mmap(-1, 16 * 2**20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        torch.frombuffer(region, dtype=torch.float32).fill_(1.0)

    fresh = measure_step_times(fill_fresh_pages, warmup=1, repeats=3, synchronize=lambda: None)
    assert all(16 * 2**20 <= faulted <= 17 * 2**20 for faulted in fresh.fault_bytes), fresh.fault_bytes
    mapped = torch.empty(2**20)
    warm = measure_step_times(lambda: mapped.fill_(1.0), warmup=1, repeats=3, synchronize=lambda: None)
    assert len(warm.fault_bytes) == 3 and max(warm.fault_bytes) < 2**20


def test_process_cpu_s_counts_a_running_threads_time_exactly():
    """A thread hashing 400 MB (hashlib lets go of the GIL) runs without a break through 30 ms of this thread's
    sleep, the process's other threads asleep: the process's CPU time over the sleep is that thread's time to the last fraction of a millisecond, as
    its own clock (Python's pthread_getcpuclockid) reads it; the process clock alone counts a running thread
    only at its scheduler ticks, up to 4 ms late."""
    import hashlib
    import threading
    import time

    from planner.bench.timing import other_thread_clocks, process_cpu_s

    started = threading.Event()

    def hash_data() -> None:
        started.set()
        hashlib.sha256(bytes(400 * 2**20)).digest()

    worker = threading.Thread(target=hash_data)
    worker.start()
    started.wait()
    time.sleep(0.02)  # longer than PyTorch's idle threads spin after an earlier test's op: they do not count
    worker_clock = time.pthread_getcpuclockid(worker.ident)
    clocks = other_thread_clocks()
    own_before, worker_before, before = time.thread_time(), time.clock_gettime(worker_clock), process_cpu_s(clocks)
    time.sleep(0.03)
    after = process_cpu_s(clocks)
    worker_after, own_after = time.clock_gettime(worker_clock), time.thread_time()
    alive = worker.is_alive()
    worker.join()
    assert alive, "the worker finished before the second reading: hash more"
    expected = (worker_after - worker_before) + (own_after - own_before)
    assert expected > 0.015
    assert after - before == pytest.approx(expected, abs=5e-4)


def test_other_thread_clocks_leave_out_the_caller_and_elsewhere_are_none(monkeypatch):
    import sys
    import threading
    import time

    from planner.bench import timing

    clocks = timing.other_thread_clocks()
    if sys.platform.startswith("linux"):
        own = ((~threading.get_native_id()) << 3) | 6
        assert own not in clocks and len(clocks) >= 1  # pytest's process has more threads than this one
        assert timing.thread_cpu_clock(threading.get_native_id()) == own == time.pthread_getcpuclockid(
            threading.get_ident())  # glibc's id for this thread's clock
    monkeypatch.setattr(timing.sys, "platform", "darwin")
    assert timing.other_thread_clocks() == []
    before = timing.process_cpu_s([])
    assert 0 <= timing.process_cpu_s([]) - before < 0.01 and before == pytest.approx(time.process_time(), abs=0.01)
