"""Log lines that remote peers can trigger, bounded: a token bucket per logger call site.

Anything a remote peer can cause once per packet or per message must cost at most a
counter (README, *Security*). State changes still deserve a line for the operator
(a tunnel moved, a host associated), but an authorized host that repeats them in a loop
must not fill the disk: :class:`LogBudget` lets ``burst`` lines through, then one line
per ``1/rate`` seconds, and says how many it held back in the next line it lets through.

Pure: the caller passes ``now``.
"""

from __future__ import annotations

import logging

__all__ = ["LogBudget"]


class LogBudget:
    def __init__(self, logger: logging.Logger, rate: float = 1.0, burst: float = 20.0) -> None:
        self.logger = logger
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._last: float | None = None
        self.suppressed = 0

    def log(self, level: int, now: float, msg: str, *args: object) -> bool:
        """Log ``msg % args`` at ``level`` if the budget allows; True if it was logged."""
        if not self.logger.isEnabledFor(level):
            return False
        if self._last is not None:
            self._tokens = min(self.burst, self._tokens + max(0.0, now - self._last) * self.rate)
        self._last = now
        if self._tokens < 1.0:
            self.suppressed += 1
            return False
        self._tokens -= 1.0
        if self.suppressed:
            msg += f" ({self.suppressed} similar line(s) suppressed)"
            self.suppressed = 0
        self.logger.log(level, msg, *args)
        return True
