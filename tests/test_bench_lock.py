"""The benchmark lock and its worker under processes that are killed, stopped or queued (failures 4, 5 and
18 of the fail-safe issue): the worker holds the lock and dies with its parent, waits are first come, first
served and end at the run's time limit, and only the process named may be asked to cancel."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from planner.bench import BenchSpec, run_benchmark
from planner.bench.lock import BenchLock, cancel_requested, lock_holder, request_cancel
from planner.bench.runner import _crash_message

PROJECT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CHRONOS_MOE_PLANNER_CACHE_DIR", str(tmp_path / "cache"))


SLOW_RUN = dict(size="debug", mode="train", batch_size=1, context_length=16, prediction_length=4, warmup=1,
                repeats=1_000, time_limit_s=60.0, device="cpu")


def _start_benchmark_process(tmp_path) -> subprocess.Popen:
    script = textwrap.dedent(f"""
        from planner.bench import BenchSpec, run_benchmark
        run_benchmark(BenchSpec(**{SLOW_RUN!r}))
    """)
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    return subprocess.Popen([sys.executable, "-c", script], env=env, cwd=PROJECT)


def _wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_benchmark_takes_its_worker_and_the_lock_with_it(tmp_path, how):
    parent = _start_benchmark_process(tmp_path)
    try:
        assert _wait_for(lambda: psutil.Process(parent.pid).children(), 30)
        (worker,) = psutil.Process(parent.pid).children()
        assert _wait_for(lambda: lock_holder() is not None, 30)
        parent.send_signal(how)
        parent.wait(10)
        assert _wait_for(lambda: not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE, 10)
        assert _wait_for(lambda: lock_holder() is None, 10)
    finally:
        for process in psutil.Process().children(recursive=True):
            process.kill()


def test_the_worker_holds_the_lock_while_it_runs(tmp_path):
    parent = _start_benchmark_process(tmp_path)
    try:
        assert _wait_for(lambda: psutil.Process(parent.pid).children(), 30)
        (worker,) = psutil.Process(parent.pid).children()
        lock_path = str(Path(os.environ["CHRONOS_MOE_PLANNER_CACHE_DIR"]) / "bench.lock")
        assert _wait_for(lambda: any(f.path == lock_path for f in worker.open_files()), 30)
    finally:
        parent.kill()
        parent.wait()


def test_waiting_for_a_stopped_holder_ends_at_the_time_limit(tmp_path):
    script = ("from planner.bench.lock import BenchLock\nimport time\n"
              "with BenchLock('stuck run'):\n    print('held', flush=True)\n    time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(PROJECT)},
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        holder.send_signal(signal.SIGSTOP)
        start = time.monotonic()
        result = run_benchmark(BenchSpec(**{**SLOW_RUN, "repeats": 1, "time_limit_s": 1.5}))
        assert time.monotonic() - start < 10
        assert result.status == "timeout" and "stuck run" in result.message and "nothing was measured" in result.message
    finally:
        holder.kill()
        holder.wait()


def test_waiters_take_the_lock_in_the_order_they_came():
    order: list[str] = []
    first = BenchLock("first")
    assert first.acquire()

    def wait(name: str) -> None:
        with BenchLock(name) as lock:
            assert lock.acquired
            order.append(name)

    waiters = []
    for name in ("second", "third"):
        waiters.append(threading.Thread(target=wait, args=(name,)))
        waiters[-1].start()
        time.sleep(0.3)  # each in the queue before the next
    first.release()
    again = threading.Thread(target=wait, args=("first again",))  # a grid's next run: behind the others
    again.start()
    for thread in (*waiters, again):
        thread.join(10)
    assert order == ["second", "third", "first again"]


def test_a_cancel_request_stops_only_the_benchmark_it_names():
    request_cancel(os.getpid() + 1)
    assert not cancel_requested()
    request_cancel(os.getpid())
    assert cancel_requested()


def test_a_killed_worker_says_how_it_died():
    assert "killed by SIGKILL (out of memory" in _crash_message(-9, "")
    assert _crash_message(-9, "").endswith("before reporting a result")
    assert "exited with status 3" in _crash_message(3, "boom") and "boom" in _crash_message(3, "boom")
