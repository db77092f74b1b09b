"""A stack of undo actions: what setup did, teardown undoes in reverse."""

from __future__ import annotations

import logging
from collections.abc import Callable

from upmt_tun.system.errors import SystemSetupError

log = logging.getLogger(__name__)


class UndoStack:
    """Remembers how to undo each completed setup step."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], object]]] = []

    def __bool__(self) -> bool:
        return bool(self._steps)

    def push(self, what: str, undo: Callable[[], object]) -> None:
        """Record that ``what`` was done and ``undo()`` reverts it."""
        self._steps.append((what, undo))

    def unwind(self) -> None:
        """Run every undo action, newest first; failures are logged, never raised."""
        while self._steps:
            what, undo = self._steps.pop()
            try:
                undo()
            except Exception as exc:  # teardown must go on whatever happens
                log.warning("could not undo %s: %s", what, exc)

    def run(self, what: str, steps: Callable[[], None]) -> None:
        """Run ``steps`` (which push their undo actions here) all or nothing: on any
        failure undo what was done and raise SystemSetupError naming ``what``."""
        if self._steps:
            raise SystemSetupError(f"{what} configuration is already set up")
        try:
            steps()
        except BaseException as exc:
            self.unwind()
            if isinstance(exc, SystemSetupError | KeyboardInterrupt | SystemExit):
                raise
            raise SystemSetupError(f"{what} setup failed: {exc}") from None
