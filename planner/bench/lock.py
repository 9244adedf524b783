"""One benchmark at a time across processes (CLI runs, every browser session of the app), and a cancel path.

Two runs at once would share the device and both measure nonsense, so a run holds an exclusive `flock` on
bench.lock in the cache folder while it runs; the kernel drops it when the last process holding the open
file dies, so a crashed run never blocks the next. The runner passes the locked file to its worker, so the
lock lasts as long as the measuring process, even when the parent is killed first. The holder writes who
it is into the file, for others to show while they wait.

Waiting is first come, first served: each waiter leaves a ticket (its start time and pid) in bench.queue/
and takes the lock only when its ticket is the oldest of live processes, so a grid of runs cannot re-take
the lock between its own runs while another process waits. A wait ends at its time limit or when
cancelled; a stopped holder therefore delays others by at most their limit.

Cancelling: in-process through a `threading.Event`; from another process through `request_cancel(pid)`, a
marker naming the holder's pid, which only that benchmark obeys.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from typing import Callable, Optional

from planner.bench.cache import cache_dir

LOCK_FILE = "bench.lock"
CANCEL_FILE = "bench.cancel"
QUEUE_DIR = "bench.queue"
POLL_S = 0.1  # how often a waiting run retries the lock and looks for a cancel: feels immediate, costs nothing


def request_cancel(pid: int) -> None:
    """Ask the benchmark holding the lock in process `pid` to stop (it is killed and reported cancelled)."""
    (cache_dir() / CANCEL_FILE).write_text(str(int(pid)))


def cancel_requested() -> bool:
    """Whether another process asked this one's benchmark to stop."""
    try:
        return (cache_dir() / CANCEL_FILE).read_text().strip() == str(os.getpid())
    except (OSError, ValueError):
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


class _Ticket:
    """This waiter's place in the queue: a file named by its start time and pid."""

    def __init__(self) -> None:
        self.folder = cache_dir() / QUEUE_DIR
        self.folder.mkdir(exist_ok=True)
        self.path = self.folder / f"{time.time_ns():020d}-{os.getpid()}-{threading.get_ident()}"
        self.path.touch()

    def first(self) -> bool:
        """True when no live waiter came before this one (tickets of dead processes are cleared)."""
        for path in sorted(self.folder.iterdir()):
            if path == self.path:
                return True
            try:
                pid = int(path.name.split("-")[1])
            except (IndexError, ValueError):
                pid = -1
            if pid <= 0 or not _alive(pid):
                path.unlink(missing_ok=True)
                continue
            return False
        return True  # our ticket vanished (a cleaner raced us): we are no worse than first

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


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
        max_wait_s: Optional[float] = None,
    ) -> None:
        self.label = label
        self.cancel_event = cancel_event
        self.on_wait = on_wait  # called once per poll while another run holds the lock, with its holder
        self.max_wait_s = max_wait_s
        self.acquired = False
        self.timed_out = False  # the wait reached max_wait_s
        self.holder: dict = {}  # who held the lock when the wait ended without it
        self._handle = None

    def _cancelled(self) -> bool:
        return self.cancel_event is not None and self.cancel_event.is_set()

    def fileno(self) -> int:
        """The locked file's descriptor, for a child process to hold the lock too."""
        return self._handle.fileno()

    def _take(self, ticket: _Ticket) -> bool:
        if not ticket.first():
            return False
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def acquire(self) -> bool:
        # "a+" creates the file without truncating what the holder wrote into it.
        self._handle = open(cache_dir() / LOCK_FILE, "a+")
        deadline = None if self.max_wait_s is None else time.monotonic() + self.max_wait_s
        ticket = _Ticket()
        taken = False
        try:
            while not self._cancelled():
                taken = self._take(ticket)
                if taken:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    self.timed_out = True
                    break
                if self.on_wait:
                    self.on_wait(_read_holder(self._handle))
                if self.cancel_event is not None:
                    self.cancel_event.wait(POLL_S)
                else:
                    time.sleep(POLL_S)
        finally:
            ticket.remove()
        if not taken:
            self.holder = _read_holder(self._handle)
            self._handle.close()
            self._handle = None
            return False
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(json.dumps({"pid": os.getpid(), "label": self.label, "since": time.time()}))
        self._handle.flush()
        self.acquired = True
        return True

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
