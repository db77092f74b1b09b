"""The control socket: one JSON request per line, one JSON answer per line.

A path held by a live process is never taken over (``/run`` is shared by every
network namespace of a machine, TRAPS.md): we try to connect first and only
remove a socket nobody answers on.

Who may do what: the socket is the daemon user's alone (0600), or with ``group`` in the
config also that group's (0660, group-owned). Every request is checked against the
peer's credentials (``SO_PEERCRED``, taken by the kernel at connect time, not claimed by
the client): root (and the daemon's own user) may do everything; a member of ``group``
only :data:`GROUP_COMMANDS`: ``status`` and ``join`` (``upmt-agent run``: the server
moves *the connecting process itself* into the rule's cgroup; the client then execs the
program as the user it is). ``move``, ``down``, ``reload`` and ``cgroup`` stay root's:
they change the paths or the host for every user of the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .events import Subscription

__all__ = ["ControlError", "ControlServer", "GROUP_COMMANDS", "Peer", "ensure_free",
           "follow", "permitted", "remove_stale", "request"]

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
MAX_REQUEST = 65536


class ControlError(Exception):
    """One line for the user."""


GROUP_COMMANDS = frozenset({"status", "join", "events"})


@dataclass(frozen=True)
class Peer:
    """The connecting process, as the kernel saw it connect; ``groups`` from /proc."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()


def peer_of(sock: socket.socket) -> Peer | None:
    """SO_PEERCRED of a connected unix socket, with the peer's supplementary groups (None
    when the kernel gives nothing usable)."""
    try:
        pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET,
                                                            socket.SO_PEERCRED,
                                                            struct.calcsize("3i")))
    except OSError:
        return None
    groups: set[int] = set()
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    groups = {int(g) for g in line.split()[1:]}
                    break
    except (OSError, ValueError):
        pass
    return Peer(pid, uid, gid, frozenset(groups))


def permitted(cmd: object, peer: Peer | None, group: int | None,
              own_uid: int | None = None) -> bool:
    """May ``peer`` run ``cmd``? Root and the daemon's own user: anything. A member of
    ``group`` (primary or supplementary): :data:`GROUP_COMMANDS` only. Anyone else, or
    an unknown peer: nothing (the socket's mode keeps them out already; this holds even
    if the mode was changed)."""
    if peer is None:
        return False
    own = os.geteuid() if own_uid is None else own_uid
    if peer.uid in (0, own):
        return True
    member = group is not None and (peer.gid == group or group in peer.groups)
    return member and cmd in GROUP_COMMANDS


def _uid_of(pid: int) -> int | None:
    """The real uid of process ``pid`` now (None: gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _still_connected(fd: int, reader: asyncio.StreamReader) -> bool:
    """The client has not closed its end (so it still lives: it forks nothing that could
    hold the socket for it)."""
    if reader.at_eof():
        return False
    try:
        dup = socket.socket(fileno=os.dup(fd))
    except OSError:
        return False
    try:
        return dup.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True                           # nothing to read, not closed
    except OSError:
        return False
    finally:
        dup.close()


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
    """``stream``: a new event subscription for each ``{"cmd": "events"}`` client, which
    then gets ``{"ok": true}`` and one JSON object per event, per line, until it hangs up
    or the daemon stops (``upmt-agent events``)."""

    def __init__(self, path: str, handler: Handler, group: int | None = None,
                 stream: Callable[[], Subscription] | None = None) -> None:
        self.path = path
        self.handler = handler
        self.group = group
        self.stream = stream
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
        if self.group is not None:
            try:   # root without CAP_CHOWN may still give it to a group of its own
                os.chown(self.path, -1, self.group)
                os.chmod(self.path, 0o660)
            except OSError as e:
                await self.close()
                raise ControlError(
                    f"cannot give control socket {self.path} to group {self.group}: "
                    f"{_why(e)} (under systemd: SupplementaryGroups= with that group)"
                ) from None

    async def _answer(self, req: dict[str, Any], peer: Peer | None,
                      connected: Callable[[], bool] = lambda: True) -> dict[str, Any]:
        cmd = req.get("cmd")
        if not permitted(cmd, peer, self.group):
            return {"ok": False, "error": f"{str(cmd)[:40]}: permission denied (root only)"
                    if self.group is not None and cmd not in GROUP_COMMANDS
                    else "permission denied"}
        if cmd != "join":
            return await self.handler(req)
        # `upmt-agent run`: the connecting process joins the rule's cgroup. Its pid is
        # the kernel's (SO_PEERCRED): nobody names another process. Just before the
        # write, that pid still belongs to the peer's uid and the peer still holds the
        # connection (it waits for this answer), so the pid has not been given to
        # another process meanwhile (short of its death, reaping and the pid's reuse
        # in the microseconds between this check and the write).
        assert peer is not None
        if peer.pid <= 0:
            return {"ok": False, "error": "cannot tell which process connected"}
        answer = await self.handler({"cmd": "cgroup", "rule": req.get("rule")})
        if not answer.get("ok"):
            return answer
        if _uid_of(peer.pid) != peer.uid or not connected():
            return {"ok": False, "error": "the process that asked is gone"}
        try:
            with open(os.path.join(str(answer["path"]), "cgroup.procs"), "w") as f:
                f.write(str(peer.pid))
        except OSError as e:
            return {"ok": False, "error": f"cannot move pid {peer.pid} into cgroup "
                    f"{answer['path']}: {_why(e)}"}
        return {"ok": True, "path": answer["path"]}

    async def _client(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(r.readline(), 5.0)
            try:
                req = json.loads(line[:MAX_REQUEST])
                if not isinstance(req, dict):
                    raise ValueError
                sock = w.get_extra_info("socket")
                peer = peer_of(sock) if sock is not None else None
                if req.get("cmd") == "events" and self.stream is not None \
                        and permitted("events", peer, self.group):
                    await self._events(r, w)
                    return
                answer = await self._answer(
                    req, peer, lambda: sock is not None and _still_connected(sock.fileno(), r))
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

    async def _events(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        """Stream events to this client. A slow reader only fills its own bounded queue
        (the daemon goes on; it gets a ``dropped`` line); anything the client sends, or
        its hang-up, ends the stream."""
        assert self.stream is not None
        sub = self.stream()

        async def hang_up() -> None:
            with contextlib.suppress(Exception):
                await r.read(1)
            sub.close()

        eof = asyncio.ensure_future(hang_up())
        try:
            w.write(b'{"ok": true, "events": true}\n')
            await w.drain()
            async for ev in sub:
                w.write(json.dumps(ev.to_json()).encode() + b"\n")
                await w.drain()
        finally:
            sub.close()
            eof.cancel()

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


def follow(path: str, req: dict[str, Any]) -> Iterator[str]:
    """Blocking client of a stream (``events``): the lines after the daemon's ``{"ok":
    true}``, as they come, until the daemon stops. ControlError with one line when
    nothing answers or the daemon refuses (its error)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(f"nothing is running on control socket {path}") from None
        except OSError as e:
            raise ControlError(f"cannot connect to {path}: {_why(e)}") from None
        s.sendall(json.dumps(req).encode() + b"\n")
        f = s.makefile("rb")
        first = f.readline()
        try:
            answer = json.loads(first)
        except ValueError:
            raise ControlError(f"garbled answer on {path}") from None
        if not isinstance(answer, dict) or not answer.get("ok"):
            error = answer.get("error") if isinstance(answer, dict) else None
            raise ControlError(str(error or f"garbled answer on {path}"))
        for line in f:
            yield line.decode(errors="replace").rstrip("\n")
    finally:
        s.close()
