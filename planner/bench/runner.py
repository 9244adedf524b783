"""run_benchmark: one measured run in a subprocess with a time limit, serialised with every other run.

The caller never runs model code: a run that crashes, runs out of memory or hangs takes its subprocess with
it, and the caller gets a BenchResult saying what happened. The subprocess is a fresh interpreter (so the
CPU memory baseline is clean), in its own process group (so a kill reaches everything it started).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from planner.bench.lock import BenchLock, cancel_requested, clear_cancel_request
from planner.bench.work import count_step_flops, count_step_tokens
from planner.bench.preflight import estimate_peak_bytes
from planner.bench.results import BenchResult
from planner.steptime.predict import StepTime
from planner.bench.spec import BenchSpec
from planner.bench.timing import summarise_times

PROJECT_ROOT = Path(__file__).resolve().parents[2]
STDERR_TAIL_CHARS = 2_000  # of a crashed worker's stderr, enough for the last traceback
POLL_S = 0.1  # how often the time limit and a cancel are checked while the worker runs

# Share of the progress bar each stage ends at (the worker's steps fill warmup and measure in between).
_STAGE_SPAN = {"waiting": (0.0, 0.0), "starting": (0.0, 0.02), "preflight": (0.02, 0.05), "build": (0.05, 0.1),
               "warmup": (0.1, 0.3), "measure": (0.3, 0.9), "predict": (0.9, 1.0), "done": (1.0, 1.0)}


@dataclass(frozen=True)
class BenchProgress:
    """Where a run is: `stage` is one of waiting (for another run), starting, preflight, build, warmup,
    measure, predict (trace the step and probe the device, when not cached), done; `done`/`total` count the stage's steps; `fraction` is for a progress bar."""

    stage: str
    done: int = 0
    total: int = 1
    message: str = ""

    @property
    def fraction(self) -> float:
        start, end = _STAGE_SPAN[self.stage]
        return start + (end - start) * (self.done / self.total if self.total else 1.0)


ProgressCallback = Callable[[BenchProgress], None]


def _kill(process: subprocess.Popen) -> None:
    """SIGKILL the worker's whole process group (it may have started threads or processes of its own)."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _read_events(stream, events: "queue.Queue[Optional[dict]]") -> None:
    for line in stream:
        try:
            events.put(json.loads(line))
        except ValueError:  # not the protocol: ignore (the worker sends everything else to stderr)
            continue
    events.put(None)


def _run_worker(spec: BenchSpec, progress: ProgressCallback, cancel_event: Optional[threading.Event],
                lock_fd: int, deadline: float) -> tuple[str, dict, str]:
    """One single-process run in `planner.bench.worker` (see run_guarded)."""
    return run_guarded("planner.bench.worker", spec.to_dict(), progress, cancel_event, lock_fd, deadline)


def run_guarded(module: str, request: dict, progress: ProgressCallback, cancel_event: Optional[threading.Event],
                lock_fd: int, deadline: float) -> tuple[str, dict, str]:
    """Run `python -m module` with `request` (JSON) on its stdin and follow its events until `deadline`:
    (outcome, final event, stderr tail), outcome the final event's name, or timeout / cancelled / crashed.
    The worker inherits the locked file (`lock_fd`), so the lock lasts as long as it does, and dies with this
    process (worker.PARENT_PID_ENV)."""
    from planner.bench.worker import PARENT_PID_ENV

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env[PARENT_PID_ENV] = str(os.getpid())
    with tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", module], cwd=PROJECT_ROOT, env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, start_new_session=True,
            pass_fds=(lock_fd,),
        )
        events: queue.Queue = queue.Queue()
        reader = threading.Thread(target=_read_events, args=(process.stdout, events), daemon=True)
        reader.start()
        try:
            try:
                process.stdin.write(json.dumps(request))
                process.stdin.close()
            except BrokenPipeError:  # the worker died at once; its stderr will say why
                pass
            outcome, final = _follow(process, events, progress, cancel_event, deadline)
        finally:
            _kill(process)  # its whole process group (a launcher's ranks too), also when the caller's progress
            # callback raised (an app rerun, Ctrl-C)
            reader.join(timeout=5)  # the pipe reaches its end once the process group is gone
            process.stdout.close()
        stderr.seek(0)
        return outcome, final, stderr.read()[-STDERR_TAIL_CHARS:]


def _follow(process, events, progress, cancel_event, deadline: float) -> tuple[str, dict]:
    final: dict = {}
    while True:
        if time.monotonic() >= deadline:
            return "timeout", final
        if (cancel_event is not None and cancel_event.is_set()) or cancel_requested():
            return "cancelled", final
        try:
            event = events.get(timeout=max(0.0, min(POLL_S, deadline - time.monotonic())))
        except queue.Empty:
            continue
        if event is None:  # the worker closed stdout: it finished or died
            process.wait()
            return (final["event"], final) if final else ("crashed", {"returncode": process.returncode})
        if event["event"] == "progress":
            progress(BenchProgress(event["stage"], event["done"], event["total"]))
        else:
            final = event


def _result(spec: BenchSpec, outcome: str, final: dict, stderr_tail: str, wall_s: float) -> BenchResult:
    base: dict[str, Any] = {"spec": spec, "wall_s": wall_s, "flops": count_step_flops(spec)}
    if outcome == "timeout":
        return BenchResult(status="timeout", message=f"killed at its time limit of {spec.time_limit_s:g} s", **base)
    if outcome == "cancelled":
        return BenchResult(status="cancelled", message="cancelled by request; the run was killed", **base)
    if outcome == "refused":
        return BenchResult(status="refused", message=final["message"],
                           predicted_peak_bytes=final.get("predicted_peak_bytes"),
                           available_memory_bytes=final.get("available_memory_bytes"), device=final.get("device"),
                           **base)
    if outcome != "measured":
        message = final.get("message") or _crash_message(final.get("returncode"), stderr_tail)
        return BenchResult(status="error", message=message, traceback=final.get("traceback", stderr_tail), **base)
    return BenchResult(
        status="ok",
        device=final["device"],
        device_name=final["device_name"],
        threads=final["threads"],
        versions=final["versions"],
        timing=summarise_times(final["times_s"], final["cpu_times_s"], series=spec.batch_size,
                               tokens=count_step_tokens(spec), flops=base["flops"]),
        peak_memory_bytes=final["peak_memory_bytes"],
        memory_method=final["memory_method"],
        available_memory_bytes=final["available_memory_bytes"],
        predicted_peak_bytes=estimate_peak_bytes(spec, final["device"], final.get("trained_params")),
        trained_params=final.get("trained_params"),
        predicted=StepTime.from_dict(final["predicted"]) if final.get("predicted") else None,
        device_model=final.get("device_model"),
        notes=tuple(final.get("notes", ())),
        parallel_speedup=final.get("parallel_speedup"),
        probe_parallel_speedup=final.get("probe_parallel_speedup"),
        host_s_per_op=final.get("host_s_per_op"),
        probe_host_s_per_op=final.get("probe_host_s_per_op"),
        gemm_state_ratio=final.get("gemm_state_ratio"),
        usage_counts=tuple(final["usage_counts"]) if "usage_counts" in final else None,
        usage_entropy_nats=final.get("usage_entropy_nats"),
        balance_loss=final.get("balance_loss"),
        moe_layers=final.get("moe_layers"),
        loss=final.get("loss"),
        **base,
    )


def _crash_message(returncode: Optional[int], stderr_tail: str) -> str:
    """Why a worker ended without a result: the signal that killed it, or its exit status, and its last words."""
    if returncode is not None and returncode < 0:
        try:
            how = f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"killed by signal {-returncode}"
        if -returncode == signal.SIGKILL:
            how += " (out of memory, or killed from outside)"
    else:
        how = f"exited with status {returncode}"
    tail = stderr_tail.strip()[-500:]
    return f"the benchmark process {how} before reporting a result" + (f": {tail}" if tail else "")


def run_benchmark(
    spec: BenchSpec,
    progress: Optional[ProgressCallback] = None,
    cancel_event: Optional[threading.Event] = None,
) -> BenchResult:
    """Measure `spec` in a subprocess, after any run already going (one at a time across processes).

    `progress` is called with a BenchProgress as the run advances (also while it waits for another run);
    `cancel_event`, once set, stops the wait or kills the run. Never raises for what happens in the run:
    the result's status and message say it.
    """
    report = progress or (lambda update: None)

    def on_wait(holder: dict) -> None:
        report(BenchProgress("waiting", message=f"waiting for another benchmark: {holder.get('label', '?')}"))

    deadline = time.monotonic() + spec.time_limit_s  # the wait for another run counts against the time limit
    with BenchLock(spec.label, cancel_event, on_wait, max_wait_s=spec.time_limit_s) as lock:
        if lock.timed_out:
            holder = lock.holder
            return BenchResult(spec=spec, status="timeout", flops=count_step_flops(spec),
                               message=f"waited its time limit of {spec.time_limit_s:g} s for another benchmark "
                               f"({holder.get('label', 'unknown')}, pid {holder.get('pid', '?')}) that has not "
                               f"finished; nothing was measured")
        if not lock.acquired:
            return BenchResult(spec=spec, status="cancelled", message="cancelled while waiting for another benchmark",
                               flops=count_step_flops(spec))
        clear_cancel_request()
        report(BenchProgress("starting"))
        start = time.monotonic()
        outcome, final, stderr_tail = _run_worker(spec, report, cancel_event, lock.fileno(), deadline)
        result = _result(spec, outcome, final, stderr_tail, time.monotonic() - start)
        report(BenchProgress("done", message=result.status))  # still holding the lock: the run's last word
    return result
