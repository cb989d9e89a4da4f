"""Progress on stderr: one line per phase with elapsed seconds; a live spinner on a TTY.

Library code reports through a Progress object handed to it; it never prints by itself. A
Progress with a SINK hands each line to that callable instead of writing to a stream (nvmprov.api:
a caller's callback, or `logging`; no spinner then). A Progress may also carry a fleet's
CancelToken: checkpoint() raises Interrupted once it is cancelled, at each phase's start (a stage
boundary) and between SSH attempts, but never while rolling_back() (an undo must run to its end).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import IO

from .errors import Interrupted
from .textsafe import clean


class CancelToken:
    """Set once by whoever stops a fleet (the main thread, on a signal); read by every guest's run
    at its checkpoints. Nothing else cancels: no progress line or message text does."""

    def __init__(self, reason: str = "interrupted: the fleet was cancelled") -> None:
        self._event = threading.Event()
        self.reason = reason

    def cancel(self, reason: str | None = None) -> None:
        if reason:
            self.reason = reason
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


class Progress:
    def __init__(
        self,
        stream: IO[str] | None = None,
        *,
        prefix: str = "",
        log: IO[str] | None = None,
        cancel: CancelToken | None = None,
        sink: Callable[[str], None] | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.sink = sink  # gets each line (prefix + message, no elapsed time) instead of the stream
        self.prefix = prefix
        self.log = log
        self.cancel = cancel
        self._undoing = 0  # rolling_back() depth: no checkpoint raises inside
        self._raised = False  # a cancel raises once; what follows is the run's own way out
        self.start = time.monotonic()
        self.timings_s: dict[str, float] = {}
        self._tty = sink is None and bool(getattr(self.stream, "isatty", lambda: False)())
        self._lock = threading.Lock()
        self._status: str | None = None

    def elapsed_s(self) -> float:
        return time.monotonic() - self.start

    def line(self, message: str) -> None:
        body = f"{self.prefix}{clean(message)}"  # lines may quote the guest
        text = f"[{self.elapsed_s():6.1f}s] {body}"
        if self.sink is not None:
            # Best effort like the stream: a caller's callback that fails must not cut a run, or its
            # rollback, short. Called outside the lock: a callback may report through this Progress.
            with contextlib.suppress(Exception):
                self.sink(body)
        with self._lock:
            if self.sink is None:
                # Progress is best effort: a reader that went away (closed pipe, dead terminal) once
                # raised BrokenPipeError out of a rollback and left the guest's volumes behind.
                with contextlib.suppress(OSError, ValueError):
                    if self._tty and self._status is not None:
                        self.stream.write("\r\x1b[2K")
                    self.stream.write(text + "\n")
                    self.stream.flush()
            if self.log is not None:
                with contextlib.suppress(OSError, ValueError):
                    self.log.write(text + "\n")
                    self.log.flush()

    def __call__(self, message: str) -> None:
        self.line(message)

    def checkpoint(self) -> None:
        """A stage boundary: raise Interrupted when the fleet was cancelled (once, never mid-rollback)."""
        if self.cancel is not None and self.cancel.cancelled and not self._undoing and not self._raised:
            self._raised = True
            raise Interrupted(self.cancel.reason)

    @contextlib.contextmanager
    def rolling_back(self) -> Iterator[None]:
        """An undo in progress: checkpoints inside do not raise, and none after it either."""
        self._undoing += 1
        try:
            yield
        finally:
            self._undoing -= 1
            self._raised = True  # cancelled or not, the run is on its way out

    def last_phase(self, default: str) -> str:
        """The phase that ran (or failed) last: where an error belongs in the report."""
        return next(reversed(self.timings_s), default)

    @contextlib.contextmanager
    def phase(self, name: str, detail: str = "") -> Iterator[None]:
        """Time a phase; its duration lands in timings_s[name]."""
        self.checkpoint()
        began = time.monotonic()
        self.line(f"{name}: {detail}" if detail else f"{name} ...")
        stop = threading.Event()
        spinner = None
        if self._tty:
            self._status = name
            spinner = threading.Thread(target=self._spin, args=(name, began, stop), daemon=True)
            spinner.start()
        try:
            yield
        except BaseException:
            self.timings_s[name] = round(time.monotonic() - began, 2)
            raise
        finally:
            stop.set()
            if spinner is not None:
                spinner.join()
                self._status = None
        took = time.monotonic() - began
        self.timings_s[name] = round(took, 2)
        self.line(f"{name} done in {took:.1f}s")

    def _spin(self, name: str, began: float, stop: threading.Event) -> None:
        frames = "|/-\\"
        i = 0
        while not stop.wait(0.2):
            with self._lock:
                self.stream.write(f"\r\x1b[2K{frames[i % 4]} {self.prefix}{name} {time.monotonic() - began:5.1f}s")
                self.stream.flush()
            i += 1
        with self._lock:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
