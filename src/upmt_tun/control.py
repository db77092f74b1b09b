"""The control socket: one JSON request per line, one JSON answer per line.

A path held by a live process is never taken over (``/run`` is shared by every
network namespace of a machine, TRAPS.md): we try to connect first and only
remove a socket nobody answers on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["ControlError", "ControlServer", "ensure_free", "remove_stale", "request"]

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
MAX_REQUEST = 65536


class ControlError(Exception):
    """One line for the user."""


def _why(e: OSError) -> str:
    return e.strerror or str(e)


def _alive(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def ensure_free(path: str) -> None:
    """Raise ControlError if a live process answers on ``path`` (call before touching the host:
    a second instance must not mistake the first one's state for leftovers)."""
    if os.path.exists(path) and _alive(path):
        raise ControlError(f"control socket {path} is in use by a running process "
                           "(use --control to pick another)")


def remove_stale(path: str, daemon: str) -> bool:
    """For ``cleanup``: remove the control socket a killed ``daemon`` left (True), or
    raise ControlError if a live one answers on it (its leftovers are not leftovers)."""
    if not os.path.lexists(path):
        return False
    if _alive(path):
        raise ControlError(f"a running {daemon} holds control socket {path}: stop it "
                           f"(cleanup is for what a killed one left)")
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise ControlError(f"{path} exists and is not a socket; not touching it")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return True


class ControlServer:
    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.server: asyncio.AbstractServer | None = None
        self._ino: int | None = None

    async def start(self) -> None:
        if os.path.lexists(self.path):
            ensure_free(self.path)
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise ControlError(f"{self.path} exists and is not a socket; not touching it")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, mode=0o755, exist_ok=True)
        old = os.umask(0o077)
        try:
            self.server = await asyncio.start_unix_server(self._client, path=self.path)
        except OSError as e:
            raise ControlError(f"cannot create control socket {self.path}: {_why(e)}") from None
        finally:
            os.umask(old)
        self._ino = os.stat(self.path).st_ino

    async def _client(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(r.readline(), 5.0)
            try:
                req = json.loads(line[:MAX_REQUEST])
                if not isinstance(req, dict):
                    raise ValueError
                answer = await self.handler(req)
            except ValueError:
                answer = {"ok": False, "error": "bad request"}
            w.write(json.dumps(answer).encode() + b"\n")
            await w.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception as e:  # a bug in a handler must not kill the process
            log.exception("control request failed: %s", e)
        finally:
            w.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        try:
            if self._ino is not None and os.stat(self.path).st_ino == self._ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass


def request(path: str, req: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Blocking client used by the CLI; ControlError with one line on failure."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(f"nothing is running on control socket {path}") from None
        except OSError as e:
            raise ControlError(f"cannot connect to {path}: {_why(e)}") from None
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            buf += chunk
    except TimeoutError:
        raise ControlError(f"no answer on {path}") from None
    finally:
        s.close()
    try:
        answer = json.loads(buf)
    except ValueError:
        raise ControlError(f"garbled answer on {path}") from None
    if not isinstance(answer, dict):
        raise ControlError(f"garbled answer on {path}")
    return answer
