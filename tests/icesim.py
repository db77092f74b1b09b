"""Test-only pure NAT and network simulator for ICE, on virtual time.

Each LAN sits behind one NAT (or none: the internet itself). A datagram to an address on
the sender's own LAN is delivered there (that is how a check to a peer's private host
candidate lands on the sender itself or on its LAN twin); anything else leaves through
the LAN's NAT and enters the destination LAN through its NAT, if that NAT lets it in:

* ``full``: endpoint-independent mapping and filtering (full cone);
* ``port-restricted``: endpoint-independent mapping, address-and-port-dependent filtering;
* ``symmetric``: a new public port per (source, destination), filtering as above
  (``nft masquerade random``).

Delivery takes ``latency`` seconds. :meth:`Net.run` advances ``now`` to the earliest of the
next delivery and every checklist's ``next_deadline()``.
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field

from upmt_tun.ice.candidates import Addr, IceCandidate, TunnelSocket, gather
from upmt_tun.ice.checklist import (
    Action,
    Checklist,
    Failed,
    PairSucceeded,
    Selected,
    SendStun,
)

ANCHOR: Addr = ("198.18.0.1", 4500)


@dataclass
class Nat:
    kind: str
    public_ip: str
    next_port: int = 50000
    mappings: dict[tuple[Addr, ...], int] = field(default_factory=dict)
    inside: dict[int, Addr] = field(default_factory=dict)
    permitted: set[tuple[int, Addr]] = field(default_factory=set)

    def out(self, src: Addr, dst: Addr) -> Addr:
        key = (src, dst) if self.kind == "symmetric" else (src,)
        port = self.mappings.get(key)
        if port is None:
            port = self.mappings[key] = self.next_port
            self.inside[port] = src
            self.next_port += 7
        self.permitted.add((port, dst))
        return (self.public_ip, port)

    def inbound(self, port: int, remote: Addr) -> Addr | None:
        inside = self.inside.get(port)
        if inside is None:
            return None
        if self.kind != "full" and (port, remote) not in self.permitted:
            return None
        return inside


@dataclass
class Host:
    name: str
    sockets: list[tuple[int, str, str, Addr]]     # (socket id, lan, interface, address)
    checklist: Checklist | None = None
    events: list[tuple[float, Action]] = field(default_factory=list)

    def of(self, kind: type) -> list[Action]:
        return [a for _, a in self.events if isinstance(a, kind)]


class Net:
    def __init__(self, nats: dict[str, Nat | None], latency: float = 0.01,
                 loss: float = 0.0, seed: int = 0) -> None:
        self.nats = nats                       # lan -> its NAT (None: public)
        self.latency = latency
        self.loss = loss                       # each datagram lost with this probability
        self.rng = random.Random(seed)
        self.hosts: dict[str, Host] = {}
        self.where: dict[tuple[str, Addr], tuple[str, int]] = {}
        self.queue: list[tuple[float, int, str, int, Addr, bytes]] = []
        self.seq = itertools.count()
        self.now = 0.0
        self.lost = 0

    def add(self, host: Host) -> Host:
        self.hosts[host.name] = host
        for sid, lan, _, addr in host.sockets:
            self.where[(lan, addr)] = (host.name, sid)
        return host

    def _socket(self, host: str, sid: int) -> tuple[str, Addr]:
        for s, lan, _, addr in self.hosts[host].sockets:
            if s == sid:
                return lan, addr
        raise KeyError(sid)

    def reflexive(self, host: str, sid: int) -> Addr:
        """What the anchor sees for this socket (the tunnel opened the mapping)."""
        lan, addr = self._socket(host, sid)
        nat = self.nats[lan]
        return nat.out(addr, ANCHOR) if nat else addr

    def candidates(self, host: str) -> tuple[IceCandidate, ...]:
        h = self.hosts[host]
        return gather([TunnelSocket(sid, ifname, addr, self.reflexive(host, sid))
                       for sid, _, ifname, addr in h.sockets])

    def resolve(self, lan_from: str, dst: Addr) -> tuple[str, int] | None:
        """Which socket an address reaches from a LAN, ignoring NAT filtering."""
        if (lan_from, dst) in self.where:
            return self.where[(lan_from, dst)]
        for lan, nat in self.nats.items():
            if nat is not None and nat.public_ip == dst[0]:
                inside = nat.inside.get(dst[1])
                return self.where.get((lan, inside)) if inside else None
            if nat is None and (lan, dst) in self.where:
                return self.where[(lan, dst)]
        return None

    def send(self, host: str, sid: int, data: bytes, dst: Addr) -> None:
        lan, src = self._socket(host, sid)
        at = self.now + self.latency
        if self.loss and self.rng.random() < self.loss:
            self.lost += 1
            return
        if (lan, dst) in self.where:                          # on the sender's own LAN
            to = self.where[(lan, dst)]
            heapq.heappush(self.queue, (at, next(self.seq), to[0], to[1], src, data))
            return
        nat = self.nats[lan]
        pub = nat.out(src, dst) if nat else src
        for lan2, nat2 in self.nats.items():
            if nat2 is not None and nat2.public_ip == dst[0]:
                inside = nat2.inbound(dst[1], pub)
                to2 = self.where.get((lan2, inside)) if inside else None
                break
            if nat2 is None and (lan2, dst) in self.where:
                to2 = self.where[(lan2, dst)]
                break
        else:
            to2 = None
        if to2 is None:
            self.lost += 1
            return
        heapq.heappush(self.queue, (at, next(self.seq), to2[0], to2[1], pub, data))

    def _carry(self, host: Host, actions: list[Action]) -> None:
        for a in actions:
            host.events.append((self.now, a))
            if isinstance(a, SendStun):
                self.send(host.name, a.socket_id, a.data, a.addr)

    def run(self, until: float, max_steps: int = 200_000) -> None:
        for _ in range(max_steps):
            times = [self.queue[0][0]] if self.queue else []
            for h in self.hosts.values():
                d = h.checklist.next_deadline() if h.checklist else None
                if d is not None:
                    times.append(d)
            if not times or min(times) > until:
                self.now = until
                return
            self.now = max(self.now, min(times))
            while self.queue and self.queue[0][0] <= self.now:
                _, _, name, sid, src, data = heapq.heappop(self.queue)
                h = self.hosts[name]
                if h.checklist is not None:
                    self._carry(h, h.checklist.on_stun(data, sid, src, self.now))
            for h in self.hosts.values():
                d = h.checklist.next_deadline() if h.checklist else None
                if h.checklist is not None and d is not None and d <= self.now:
                    self._carry(h, h.checklist.on_timer(self.now))
        raise AssertionError("simulation did not settle (a deadline that never advances?)")


def first(host: Host, kind: type) -> tuple[float, Action] | None:
    return next(((t, a) for t, a in host.events if isinstance(a, kind)), None)


__all__ = ["ANCHOR", "Failed", "Host", "Nat", "Net", "PairSucceeded", "Selected", "first"]
