"""What happened, for embedders and for ``upmt-agent events``: frozen dataclasses and a bus.

Every event has ``event`` (its name, a class constant), ``time`` (wall clock, seconds
since the epoch, as a log line would show it) and ``to_json()`` (a dict with at least
``"event"`` and ``"time"``: what the control socket streams, one JSON object per line).

The bus never slows the data path down: :meth:`EventBus.publish` appends to each
subscriber's bounded queue and returns; a subscriber that does not keep up loses
events, and finds one :class:`Dropped` (how many) where they went missing. A
subscription nobody holds any more is forgotten (weak references): breaking out of an
``async for`` leaks nothing. Pure apart from the asyncio wake-up; no clock read here.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

__all__ = [
    "AnchorAssociated", "AnchorLost", "Dropped", "Event", "EventBus", "FlowClosed",
    "FlowMoved", "FlowNew", "HostAssociated", "HostLost", "PathQuality", "PeerPath",
    "Subscription", "TunnelDown", "TunnelUp", "move_reason",
]

DEFAULT_QUEUE = 1024


@dataclass(frozen=True, slots=True)
class Event:
    """Base of all events: ``time`` is wall-clock seconds (``time.time()``)."""

    event: ClassVar[str] = "event"
    time: float

    def to_json(self) -> dict[str, Any]:
        """``{"event": name, "time": ..., <fields>}``: JSON-ready (plain types only)."""
        return {"event": self.event, **asdict(self)}


@dataclass(frozen=True, slots=True)
class TunnelUp(Event):
    """A tunnel carries data now. ``peer``: the other end (an anchor's name at the agent,
    a host's name at the anchor); ``remote``: ``"ip:port"``."""

    event: ClassVar[str] = "tunnel_up"
    tunnel: int
    interface: str | None
    peer: str
    remote: str


@dataclass(frozen=True, slots=True)
class TunnelDown(Event):
    """A tunnel stopped carrying data; ``reason`` as the log says it (``probe loss``,
    ``keepalive loss``, ``link down``, ``expired`` ...)."""

    event: ClassVar[str] = "tunnel_down"
    tunnel: int
    interface: str | None
    peer: str
    reason: str


@dataclass(frozen=True, slots=True)
class PathQuality(Event):
    """A tunnel's probe measurements (agent): smoothed RTT in ms and the loss share of
    the recent probes (None until measured). Sent when they change noticeably, and at
    least every few seconds while the tunnel is up; never more than once a second."""

    event: ClassVar[str] = "path_quality"
    tunnel: int
    interface: str
    peer: str
    rtt_ms: float | None
    loss: float | None


@dataclass(frozen=True, slots=True)
class FlowNew(Event):
    """The agent saw a new application flow and bound it to ``tunnel``."""

    event: ClassVar[str] = "flow_new"
    flow: int
    protocol: int
    src: str
    sport: int
    dst: str
    dport: int
    rule: str
    tunnel: int
    interface: str | None


@dataclass(frozen=True, slots=True)
class FlowMoved(Event):
    """A flow moved to another tunnel. ``reason``: one of ``manual`` (a move command),
    ``rule`` (back to its rule's preferred interface, or its tunnel came up), ``probe``
    (the tunnel stopped answering probes or keepalives), ``link down`` (the interface
    went away or the tunnel was taken down), ``implicit`` (its next packet found its
    tunnel down), ``policy`` (the application's policy hook), ``direct`` (a mesh
    peer's direct path); ``detail``: the agent's own words (as in ``status`` history)."""

    event: ClassVar[str] = "flow_moved"
    flow: int
    from_tunnel: int | None
    to_tunnel: int
    from_interface: str | None
    to_interface: str | None
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class FlowClosed(Event):
    """A flow left the agent's table."""

    event: ClassVar[str] = "flow_closed"
    flow: int
    reason: str


@dataclass(frozen=True, slots=True)
class AnchorAssociated(Event):
    """The agent associated with ``anchor`` and holds ``vipa`` there."""

    event: ClassVar[str] = "anchor_associated"
    anchor: str
    vipa: str


@dataclass(frozen=True, slots=True)
class AnchorLost(Event):
    """The agent lost its association with ``anchor`` (every tunnel silent, or it said
    "not registered"); it associates again by itself."""

    event: ClassVar[str] = "anchor_lost"
    anchor: str
    reason: str


@dataclass(frozen=True, slots=True)
class PeerPath(Event):
    """How a mesh peer is reached changed: ``path`` "relay" or "direct" (or "none"),
    through ``interface``."""

    event: ClassVar[str] = "peer_path"
    peer: str
    anchor: str
    vipa: str
    path: str
    interface: str | None


@dataclass(frozen=True, slots=True)
class HostAssociated(Event):
    """(anchor) Host ``host`` associated and holds ``vipa``."""

    event: ClassVar[str] = "host_associated"
    host: str
    vipa: str


@dataclass(frozen=True, slots=True)
class HostLost(Event):
    """(anchor) Host ``host``'s association ended (expired or replaced)."""

    event: ClassVar[str] = "host_lost"
    host: str
    vipa: str


@dataclass(frozen=True, slots=True)
class Dropped(Event):
    """This subscriber was too slow: ``count`` events were dropped here."""

    event: ClassVar[str] = "dropped"
    count: int


_REASONS = {
    "operator": "manual",
    "preference restored": "rule",
    "tunnel up": "rule",
    "probe loss": "probe",
    "keepalive loss": "probe",
    "direct path lost": "probe",
    "direct path": "direct",
    "tunnel down": "implicit",
    "policy": "policy",
}


def move_reason(detail: str) -> str:
    """The kind of a flow move (see :class:`FlowMoved`) from the agent's own words;
    anything else took a tunnel down on purpose or with its interface: ``link down``."""
    return _REASONS.get(detail, "link down")


class Subscription:
    """One subscriber's bounded queue; an async iterator of events (and :class:`Dropped`
    markers). Ends after :meth:`EventBus.close` once drained, or after :meth:`close`."""

    def __init__(self, maxsize: int, clock: Any) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.maxsize = maxsize
        self.dropped = 0            # lost since the last marker
        self.dropped_total = 0
        self._q: deque[Event] = deque()
        self._wake = asyncio.Event()
        self._closed = False
        self._clock = clock

    def put(self, ev: Event) -> None:
        if self._closed:
            return
        if len(self._q) >= self.maxsize:
            self.dropped += 1
            self.dropped_total += 1
            return
        if self.dropped:
            self._q.append(Dropped(self._clock(), self.dropped))
            self.dropped = 0
        self._q.append(ev)
        self._wake.set()

    def close(self) -> None:
        """No more events (the ones queued are still given out)."""
        self._closed = True
        self._wake.set()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        while True:
            if self._q:
                return self._q.popleft()
            if self.dropped:
                n, self.dropped = self.dropped, 0
                return Dropped(self._clock(), n)
            if self._closed:
                raise StopAsyncIteration
            self._wake.clear()
            await self._wake.wait()

    def pending(self) -> int:
        return len(self._q)


class EventBus:
    """Fan-out of events to any number of subscribers. ``active`` is False while nobody
    listens: publishers check it before building an event, so events cost nothing then."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock          # wall clock for Dropped markers (time.time)
        self._subs: weakref.WeakSet[Subscription] = weakref.WeakSet()
        self._closed = False

    @property
    def active(self) -> bool:
        return bool(self._subs)

    def subscribe(self, maxsize: int = DEFAULT_QUEUE) -> Subscription:
        sub = Subscription(maxsize, self.clock)
        if self._closed:
            sub.close()
        else:
            self._subs.add(sub)
        return sub

    def publish(self, ev: Event) -> None:
        for sub in list(self._subs):
            sub.put(ev)

    def close(self) -> None:
        """The agent or anchor stopped: every subscription ends once drained."""
        self._closed = True
        for sub in list(self._subs):
            sub.close()
        self._subs.clear()
