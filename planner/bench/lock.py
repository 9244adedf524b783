"""One benchmark at a time across processes (CLI runs, every browser session of the app), and a cancel path.

Two runs at once would share the device and both measure nonsense, so a run holds an exclusive `flock` on
bench.lock in the cache folder while it runs; the kernel drops it when the holder dies, so a crashed run
never blocks the next. The holder writes who it is into the file, for others to show while they wait.

Cancelling: in-process through a `threading.Event`; across processes (a cancel button in another browser
session, another shell) through `request_cancel()`, a marker file the running benchmark polls.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from planner.bench.cache import cache_dir

LOCK_FILE = "bench.lock"
CANCEL_FILE = "bench.cancel"
POLL_S = 0.1  # how often a waiting run retries the lock and looks for a cancel: feels immediate, costs nothing


def request_cancel() -> None:
    """Ask the benchmark running now, in whatever process, to stop (it is killed and reported cancelled)."""
    (cache_dir() / CANCEL_FILE).touch()


def cancel_requested() -> bool:
    return (cache_dir() / CANCEL_FILE).exists()


def clear_cancel_request() -> None:
    """Called by a run once it holds the lock: a request meant for an earlier run must not stop this one."""
    (cache_dir() / CANCEL_FILE).unlink(missing_ok=True)


def _read_holder(handle) -> dict:
    handle.seek(0)
    try:
        return json.loads(handle.read())
    except ValueError:  # empty, or caught between the holder's truncate and write
        return {}


def lock_holder() -> Optional[dict]:
    """Who holds the lock now ({"pid", "label", "since"}), or None when no benchmark runs."""
    try:
        with open(cache_dir() / LOCK_FILE, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return _read_holder(handle)
            fcntl.flock(handle, fcntl.LOCK_UN)
            return None
    except OSError:
        return None


class BenchLock:
    """`with BenchLock(label) as lock:` waits for the lock; `lock.acquired` is False if cancelled meanwhile."""

    def __init__(
        self,
        label: str,
        cancel_event: Optional[threading.Event] = None,
        on_wait: Optional[Callable[[dict], None]] = None,
    ) -> None:
        self.label = label
        self.cancel_event = cancel_event
        self.on_wait = on_wait  # called once per poll while another run holds the lock, with its holder
        self.acquired = False
        self._handle = None

    def _cancelled(self) -> bool:
        return self.cancel_event is not None and self.cancel_event.is_set()

    def acquire(self) -> bool:
        # "a+" creates the file without truncating what the holder wrote into it.
        self._handle = open(cache_dir() / LOCK_FILE, "a+")
        while not self._cancelled():
            try:
                fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if self.on_wait:
                    self.on_wait(_read_holder(self._handle))
                if self.cancel_event is not None:
                    self.cancel_event.wait(POLL_S)
                else:
                    time.sleep(POLL_S)
                continue
            self._handle.seek(0)
            self._handle.truncate()
            self._handle.write(json.dumps({"pid": os.getpid(), "label": self.label, "since": time.time()}))
            self._handle.flush()
            self.acquired = True
            return True
        self._handle.close()
        self._handle = None
        return False

    def release(self) -> None:
        if self._handle is None:
            return
        if self.acquired:
            self._handle.truncate(0)
            fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()
        self._handle = None
        self.acquired = False

    def __enter__(self) -> "BenchLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
