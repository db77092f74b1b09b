"""Anchor names resolved while the agent runs: retries with backoff, periodic refresh.

An agent may start before the network (a laptop booting before its Wi-Fi connects):
an anchor's ``address = "anchor.example.net:4500"`` may not resolve yet. Refusing to
start would make the operator restart it by hand; instead the anchor stays
``unresolved`` (its tunnels do not exist yet, so they neither fail nor count against
``ready``) and its name is tried again: after 1, 2, 4 ... up to :data:`RETRY_MAX`
seconds while it fails, every :data:`REFRESH` seconds once it resolved (a moved
anchor is followed), and at once (at most every :data:`KICK_MIN` s) when an access
interface came up or changed, since that is when a failed look-up may start working.

:class:`ResolveSchedule` is pure (``now`` passed in); :class:`AnchorResolver` drives
it on the event loop and runs the blocking ``getaddrinfo`` in a worker thread.

An anchor has one address per family at most (:data:`Addrs`, IPv4 first): a name with A
and AAAA records gives both, and each of the agent's interfaces uses the family it has
(``Agent``: an IPv6-only cellular interface reaches the anchor over IPv6 while the
Wi-Fi, IPv4-only, uses IPv4). A literal is one address of its family.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["FIRST_WAIT", "Addrs", "AnchorResolver", "Endpoint", "Offload", "Resolve",
           "ResolveSchedule", "as_addrs", "first_lookups", "getaddrinfo_both", "is_literal",
           "normalise"]

log = logging.getLogger(__name__)

RETRY_FIRST = 1.0
RETRY_MAX = 60.0
REFRESH = 300.0
KICK_MIN = 1.0
FIRST_WAIT = 3.0       # the look-ups before start wait this long at most (ready: ~10 s)

Endpoint = tuple[str, int]
Addrs = tuple[Endpoint, ...]       # one (ip, port) per family at most, IPv4 first
Resolve = Callable[[str, int], Addrs]
Offload = Callable[[Resolve, str, int], Awaitable[Addrs]]


def is_literal(host: str) -> bool:
    """An IPv4 or IPv6 address needs no look-up (and is never re-resolved)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def normalise(addr: tuple[Any, ...]) -> Endpoint:
    """An endpoint as every comparison and message wants it: (host, port), an IPv4
    peer seen on a dual-stack socket (``::ffff:192.0.2.1``, and the 4-tuple of
    ``recvfrom`` on AF_INET6) as plain IPv4."""
    host = addr[0]
    if host.startswith("::ffff:") and "." in host:
        return host[7:], addr[1]
    return host, addr[1]


def as_addrs(addr: Endpoint | Addrs) -> Addrs:
    """One endpoint or one per family -> :data:`Addrs` (IPv4 first)."""
    one = addr and isinstance(addr[0], str)
    addrs: Addrs = (addr,) if one else addr  # type: ignore[assignment]
    return tuple(sorted(addrs, key=lambda a: ":" in a[0]))


def getaddrinfo_both(host: str, port: int) -> Addrs:
    """The first IPv4 and the first IPv6 address of ``host`` (blocking); OSError
    (gaierror) when it has neither. Link-local IPv6 answers are skipped (they need a
    scope, and an anchor is not on the link)."""
    if is_literal(host):
        return as_addrs((host, port))
    infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_DGRAM)
    found: dict[int, Endpoint] = {}
    for family, _t, _p, _c, sa in infos:
        ip = str(sa[0])
        if family == socket.AF_INET6 and ipaddress.IPv6Address(ip.split("%")[0]).is_link_local:
            continue
        found.setdefault(int(family), normalise((ip, port)))
    if not found:
        raise socket.gaierror(socket.EAI_NONAME, "no usable address")
    return as_addrs(tuple(found.values()))


@dataclass
class _Entry:
    host: str
    port: int
    addr: Addrs | None = None
    due: float = 0.0
    failures: int = 0
    last_try: float = -math.inf
    error: str = ""


class ResolveSchedule:
    """When to look up which anchor name, and what the answers mean (pure)."""

    def __init__(self, names: dict[str, tuple[str, int]], now: float) -> None:
        """``names``: anchor -> (host, port); literal addresses are resolved already."""
        self.entries: dict[str, _Entry] = {}
        for anchor, (host, port) in names.items():
            e = _Entry(host, port, due=now)
            if is_literal(host):
                e.addr, e.due = ((host, port),), math.inf
            self.entries[anchor] = e

    def add(self, anchor: str, host: str, port: int, now: float) -> None:
        """``reload``: a new anchor (or a new host:port for one): looked up now."""
        e = _Entry(host, port, due=now)
        if is_literal(host):
            e.addr, e.due = ((host, port),), math.inf
        self.entries[anchor] = e

    def remove(self, anchor: str) -> None:
        """``reload``: an anchor no longer used."""
        self.entries.pop(anchor, None)

    def due(self, now: float) -> list[str]:
        return [a for a, e in self.entries.items() if e.due <= now]

    def next_deadline(self) -> float:
        return min((e.due for e in self.entries.values()), default=math.inf)

    def resolved(self, anchor: str, addr: Endpoint | Addrs, now: float) -> bool:
        """A look-up answered (one address, or one per family); True when the addresses
        are new (first ones, or moved)."""
        addr = as_addrs(addr)
        e = self.entries[anchor]
        new = addr != e.addr
        e.addr, e.failures, e.error, e.last_try = addr, 0, "", now
        e.due = now + REFRESH
        return new

    def failed(self, anchor: str, error: str, now: float) -> float:
        """A look-up failed: returns the delay to the next one. A resolved anchor keeps
        its last address (a DNS outage does not take its tunnels down)."""
        e = self.entries[anchor]
        e.failures += 1
        e.error, e.last_try = error, now
        delay = min(RETRY_MAX, RETRY_FIRST * 2.0 ** (e.failures - 1))
        e.due = now + delay
        return delay

    def kick(self, now: float) -> bool:
        """An interface came up or changed: every name that is not resolved yet is
        tried now (not more often than every KICK_MIN s). True when one became due."""
        any_due = False
        for e in self.entries.values():
            if e.addr is None and e.due > now and now - e.last_try >= KICK_MIN:
                e.due = now
                any_due = True
        return any_due


def first_lookups(schedule: ResolveSchedule, now: float, *, resolve: Resolve = getaddrinfo_both,
                  wait: float = FIRST_WAIT) -> list[tuple[str, str]]:
    """Look every name up once before the agent starts, all at once, each in a daemon
    thread, waiting at most ``wait`` seconds in all: a resolver that does not answer
    (network up, name server silent: glibc waits 5 s per try and server) must not hold
    ``ready`` back. A name not answered in time counts as failed; its thread is left to
    end by itself. Returns (anchor, why) for each failure."""
    todo = {a: (e.host, e.port) for a, e in schedule.entries.items() if e.addr is None}
    results: dict[str, Addrs | str] = {}
    lock = threading.Lock()

    def one(anchor: str, host: str, port: int) -> None:
        try:
            got: Addrs | str = resolve(host, port)
        except (OSError, UnicodeError) as exc:
            got = getattr(exc, "strerror", None) or str(exc)
        with lock:
            results[anchor] = got

    threads = [threading.Thread(target=one, args=(a, h, p), daemon=True,
                                name=f"resolve {a}") for a, (h, p) in todo.items()]
    for t in threads:
        t.start()
    deadline = time.monotonic() + wait
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    failed = []
    with lock:
        for anchor in todo:
            got = results.get(anchor, f"no answer within {wait:g} s")
            if isinstance(got, tuple):
                schedule.resolved(anchor, got, now)
            else:
                schedule.failed(anchor, got, now)
                failed.append((anchor, got))
    return failed


class AnchorResolver:
    """The driver: a task that resolves due names in a worker thread and reports each
    new address with ``on_address(anchor, ((ip, port), ...))`` (one per family)."""

    def __init__(self, schedule: ResolveSchedule,
                 on_address: Callable[[str, Addrs], None], *,
                 resolve: Resolve = getaddrinfo_both,
                 offload: Offload = asyncio.to_thread,
                 clock: Callable[[], float] | None = None) -> None:
        """``offload(resolve, host, port)`` runs the blocking look-up off the loop (a
        worker thread; a test on virtual time passes one that calls it directly)."""
        self.schedule = schedule
        self.on_address = on_address
        self.resolve, self.offload = resolve, offload
        self.clock = clock
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def _now(self) -> float:
        return self.clock() if self.clock is not None else asyncio.get_running_loop().time()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def kick(self) -> None:
        """Interfaces changed: try the unresolved names again now."""
        if self._task is not None and self.schedule.kick(self._now()):
            self._wake.set()

    async def _run(self) -> None:
        while True:
            now = self._now()
            for anchor in self.schedule.due(now):
                await self._one(anchor)
            delay = self.schedule.next_deadline() - self._now()
            if delay > 0:
                self._wake.clear()
                timeout = None if math.isinf(delay) else delay
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except TimeoutError:
                    pass

    def wake(self) -> None:
        """The schedule changed (``reload``): look at it again now."""
        self._wake.set()

    async def _one(self, anchor: str) -> None:
        e = self.schedule.entries[anchor]
        try:
            addr = await self.offload(self.resolve, e.host, e.port)
        except (OSError, UnicodeError) as exc:
            if self.schedule.entries.get(anchor) is not e:
                return                    # removed or replaced by a reload meanwhile
            first = e.failures == 0
            why = getattr(exc, "strerror", None) or str(exc)
            delay = self.schedule.failed(anchor, why, self._now())
            if first:
                log.warning("anchor %s: cannot resolve %r (%s): retrying, next in %.0f s",
                            anchor, e.host, why, delay)
            return
        if self.schedule.entries.get(anchor) is not e:
            return
        addr = as_addrs(addr)
        if self.schedule.resolved(anchor, addr, self._now()):
            log.info("anchor %s: %s is %s", anchor, e.host, " and ".join(a[0] for a in addr))
            self.on_address(anchor, addr)

    async def close(self) -> None:
        t = self._task
        self._task = None
        if t is not None:
            t.cancel()
            await asyncio.gather(t, return_exceptions=True)
