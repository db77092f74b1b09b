"""Small JSON state files next to the control socket (the rules' mark slots, the flows'
chosen interfaces across a restart). Only our own file is read: a regular file (no
symlink) owned by this user, writable by nobody else, parsed by a strict parser that
raises ValueError; anything else is ignored with one line, never trusted in part. A
save writes the whole file (a temporary file renamed over it); a failure is one line."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_SIZE = 1 << 22


class StateFile:
    """``path``: the file; ``what``: how a failed save names its content."""

    def __init__(self, path: str, what: str) -> None:
        self.path = path
        self.what = what

    def load(self, parse: Callable[[object], T]) -> T | None:
        """The parsed content, or None (no file, or one that is ignored: one line)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("%s: ignored (%s)", self.path, e.strerror or e)
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() \
                    or st.st_mode & 0o022:
                raise ValueError("not this user's own file")
            with os.fdopen(fd, "rb", closefd=False) as f:
                return parse(json.loads(f.read(MAX_SIZE)))
        except (OSError, ValueError) as e:
            log.warning("%s: ignored (%s)", self.path, e)
            return None
        finally:
            os.close(fd)

    def take(self, parse: Callable[[object], T]) -> T | None:
        """:meth:`load`, then remove the file: what it holds is used once."""
        try:
            return self.load(parse)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def save(self, content: object) -> bool:
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(content, f)
            os.replace(tmp, self.path)
            return True
        except OSError as e:
            log.warning("cannot save %s to %s: %s", self.what, self.path, e.strerror or e)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return False
