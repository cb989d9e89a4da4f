"""Undo log for transactional operations: each side effect registers how to undo itself."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .progress import Progress


@dataclass
class Rollback:
    progress: Progress
    _undo: list[tuple[str, Callable[[], None]]] = field(default_factory=list)

    def add(self, what: str, undo: Callable[[], None]) -> None:
        self._undo.append((what, undo))

    def commit(self) -> None:
        self._undo.clear()

    def run(self) -> list[str]:
        """Undo in reverse order; an undo that fails is reported and the rest still run."""
        problems = []
        with self.progress.rolling_back():  # a fleet's cancel never cuts an undo short
            while self._undo:
                what, undo = self._undo.pop()
                try:
                    undo()
                    self.progress.line(f"rolled back: {what}")
                except Exception as exc:  # noqa: BLE001 - keep undoing the rest
                    problems.append(f"{what}: {exc}")
                    self.progress.line(f"could not roll back {what}: {exc}")
        return problems
