"""Progress on stderr: one line per phase with elapsed seconds; a live spinner on a TTY.

Library code reports through a Progress object handed to it; it never prints by itself.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import IO

from . import testhooks
from .textsafe import clean


class Progress:
    def __init__(self, stream: IO[str] | None = None, *, prefix: str = "", log: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.prefix = prefix
        self.log = log
        self.start = time.monotonic()
        self.timings_s: dict[str, float] = {}
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._lock = threading.Lock()
        self._status: str | None = None

    def elapsed_s(self) -> float:
        return time.monotonic() - self.start

    def line(self, message: str) -> None:
        text = f"[{self.elapsed_s():6.1f}s] {self.prefix}{clean(message)}"  # lines may quote the guest
        with self._lock:
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

    def last_phase(self, default: str) -> str:
        """The phase that ran (or failed) last: where an error belongs in the report."""
        return next(reversed(self.timings_s), default)

    @contextlib.contextmanager
    def phase(self, name: str, detail: str = "") -> Iterator[None]:
        """Time a phase; its duration lands in timings_s[name]."""
        began = time.monotonic()
        self.line(f"{name}: {detail}" if detail else f"{name} ...")
        testhooks.pause_at(name, self.line)  # inert unless a fault test set NVMPROV_TEST_PAUSE_AT
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


class Quiet(Progress):
    """Progress that records timings but prints nothing (tests, library use)."""

    def line(self, message: str) -> None:
        if self.log is not None:
            self.log.write(clean(message) + "\n")
