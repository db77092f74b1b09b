"""An asyncio loop on virtual time: when nothing is ready, the clock jumps to the next timer.

Everything in memory (``FakeNetwork`` delivers with ``call_soon``) then runs as fast as
the CPU allows and gives the same answer on a loaded machine as on an idle one: a
``sleep(2.5)`` takes no wall time, and a timeout measured with ``loop.time()`` measures
the code, not the machine. Sockets and threads still work: the real selector is polled
without blocking first, and only blocks when no timer is pending at all.
"""

from __future__ import annotations

import asyncio
import selectors


class _Selector(selectors.DefaultSelector):
    """Polls without blocking; an idle wait moves the loop's clock instead of sleeping."""

    loop: VirtualTimeLoop | None = None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready or timeout is None or self.loop is None:
            return ready if ready or timeout is not None else super().select(None)
        if timeout > 0:
            self.loop.advance(timeout)
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """``time()`` starts at 0 and only moves when the loop has nothing else to do."""

    def __init__(self) -> None:
        self._now = 0.0
        sel = _Selector()
        super().__init__(selector=sel)
        sel.loop = self

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds
