"""How a daemon talks to whoever started it: a terminal, a pipe, or systemd.

- :func:`say` prints a line on stdout (``ready``) and never raises: a terminal that was
  closed (EIO) or a reader that went away (EPIPE) must not turn a clean stop into a
  traceback or skip the teardown; the dead stream is pointed at /dev/null instead.
- :class:`ConsoleHandler` does the same for log lines on stderr and, when stderr is
  systemd's journal (``JOURNAL_STREAM`` names it), prefixes each line with its syslog
  priority (``<3>`` ... ``<7>``, sd-daemon(3)) so journald files it at the right level.
- :func:`notify` sends sd_notify(3) datagrams (``READY=1``, ``STOPPING=1``) to
  ``$NOTIFY_SOCKET`` for ``Type=notify`` units: a few lines, no libsystemd.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Mapping

__all__ = ["ConsoleHandler", "journal_priority", "mute", "notify", "on_journal", "say"]

log = logging.getLogger(__name__)


def mute(fd: int) -> None:
    """Point ``fd`` at /dev/null (its reader is gone): later writes and the final flush at
    exit succeed silently instead of raising EIO/EPIPE (or exiting 120)."""
    with contextlib.suppress(OSError):
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, fd)
        finally:
            os.close(null)


def say(line: str) -> bool:
    """Print ``line`` on stdout and flush; False (and stdout muted) if nobody reads it."""
    try:
        print(line, flush=True)
        return True
    except (OSError, ValueError):     # EIO, EPIPE; ValueError: stdout already closed
        mute(1)
        return False


def on_journal(environ: Mapping[str, str] = os.environ, fd: int = 2) -> bool:
    """True when ``fd`` is the stream systemd connected to the journal: JOURNAL_STREAM is
    ``DEV:INODE`` of it (a child whose stderr was redirected inherits the variable, so the
    device and inode must match, as systemd.exec(5) says)."""
    value = environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


def journal_priority(levelno: int) -> int:
    """syslog priority of a logging level: 2 crit, 3 err, 4 warning, 6 info, 7 debug."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class ConsoleHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """stderr log lines ``prog: LEVEL: message``, or ``<P>message`` on the journal
    (journald adds the name, pid and time itself); a dead stderr mutes, never raises."""

    def __init__(self, prog: str, journal: bool | None = None) -> None:
        super().__init__(sys.stderr)
        self.journal = on_journal() if journal is None else journal
        self.setFormatter(logging.Formatter(
            "%(message)s" if self.journal else f"{prog}: %(levelname)s: %(message)s"))

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if not self.journal:
            return text
        prio = f"<{journal_priority(record.levelno)}>"
        return "\n".join(prio + line for line in text.splitlines() or [""])

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], OSError):   # EIO/EPIPE: the terminal is gone
            mute(2)
            return
        super().handleError(record)


def notify(state: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to the service manager, if one asked for it
    (``$NOTIFY_SOCKET``: a path or ``@abstract`` name). False if there is none or the
    datagram could not be sent (logged; the daemon runs on either way)."""
    addr = environ.get("NOTIFY_SOCKET", "")
    if not addr:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]          # abstract namespace
    elif addr[0] != "/":
        log.warning("NOTIFY_SOCKET %r is not a unix socket path; not notifying", addr[:60])
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as e:
        log.warning("cannot notify the service manager on %s: %s", addr.lstrip("\0"),
                    e.strerror or e)
        return False
    return True
