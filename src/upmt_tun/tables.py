"""The paper's tables (section 4): the Per-Application Forwarding Table and the Tunnel Table.

PAFT: ``app_flow`` (protocol, ip src, ip dst, src port, dst port) -> ``local_tid``.
Tunnel Table: ``local_tid`` -> ``local_tun`` (interface, local port), ``remote_tun``
(end point, port), ``vip_nat`` (the VIpA this tunnel's server assigned) and
``un_tid`` (the peer's id for this tunnel, carried as receiver index).

Keys are always written in the *uplink* direction (mobile host -> correspondent),
the way the first packet of a flow leaves the mobile host; a downlink packet's
5-tuple is reversed before lookup. Pure data, no I/O, ``now`` passed in.

:class:`Paft` of :class:`Flow` objects is the agent's (a host has few flows); the anchor
holds up to 100 000 and keeps them in columns (``flowtable.AnchorPaft``), with the same
status JSON (:func:`flow_json`).
"""

from __future__ import annotations

import ipaddress
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["FlowKey", "Flow", "History", "Tunnel", "Paft", "TunnelTable", "flow_json",
           "reverse_key", "seq_of"]

FlowKey = tuple[int, bytes, bytes, int, int]
PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp"}
HISTORY_LEN = 8
TID_MAX = 0xFFFFFF                # tunnel ids travel in the header's 24-bit path id


def seq_of(generation: int, counter: int) -> int:
    """A packet's place in its association's order: session generation, then counter
    (one int, compared without building a tuple per packet)."""
    return generation << 64 | counter


def reverse_key(k: FlowKey) -> FlowKey:
    """The uplink key of a downlink packet's 5-tuple (and vice versa)."""
    return (k[0], k[2], k[1], k[4], k[3])


def ip_str(b: bytes) -> str:
    """The text form of a 4- or 16-byte address."""
    return str(ipaddress.ip_address(b))


History = tuple[tuple[float, int | None, int, str], ...]
# (what: "new" | "moved" | "closed", flow, its tunnel before, why)
FlowWatcher = Callable[[str, "Flow", int | None, str], None]


def flow_json(fid: int, key: FlowKey, tunnel: int, tx_packets: int, rx_packets: int,
              history: History, now: float, interface: str | None,
              iface_of: Callable[[int | None], str | None] = lambda tid: None
              ) -> dict[str, Any]:
    """A flow's status view, the same for both ends (each adds its own fields) and for
    both table layouts (``Flow`` here, the anchor's columns in ``flowtable.py``). History
    entries name tunnels (``from``/``to``) and their interfaces, oldest first."""
    return {
        "id": fid, "protocol": PROTO_NAMES.get(key[0], str(key[0])), "src": ip_str(key[1]),
        "sport": key[3], "dst": ip_str(key[2]), "dport": key[4], "tunnel": tunnel,
        "interface": interface, "tx_packets": tx_packets, "rx_packets": rx_packets,
        "history": [{"age_s": round(now - ts, 3), "from": a, "to": b, "reason": r,
                     "from_interface": iface_of(a), "to_interface": iface_of(b)}
                    for ts, a, b, r in history],
    }


def _hostport(host: str, port: int) -> str:
    """``ip:port``, an IPv6 address in brackets (an outer IPv6 tunnel's ends)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

@dataclass(slots=True, eq=False)
class Tunnel:
    """One row of the Tunnel Table."""

    tid: int                      # local_tid
    interface: str                # local_tun: interface name ...
    local: tuple[str, int]        # ... and (address, port) of its socket
    remote: tuple[str, int]       # remote_tun: end point and port
    peer: str                     # anchor name (agent side) or mobile host name (anchor side)
    vipa: str = ""                # vip_nat
    vipa_b: bytes = b""
    un_tid: int = 0               # the peer's id for this tunnel (receiver index we send)
    iface_index: int = 0          # which path socket carries it (agent side)
    state: str = "down"
    rtt_ms: float | None = None
    tx_packets: int = 0
    rx_packets: int = 0
    tx_bytes: int = 0
    rx_bytes: int = 0
    last_rx: float = 0.0
    created: float = 0.0
    challenge: str = ""           # anchor: path validation token for its current address
    # anchor, NAT rebinding: the newest (session generation, counter) received on this
    # tunnel, and a new outer address that sent a newer one but has not answered its
    # challenge yet: it may receive at most ``probe_credit`` bytes until it does
    newest: int = -1
    probe_addr: tuple[str, int] | None = None
    probe_token: bytes = b""
    probe_credit: int = 0
    probe_sent: float = float("-inf")
    vipa_peer: bytes = b""        # agent: a relay path to the mesh peer at this VIpA

    def json(self) -> dict[str, Any]:
        return {
            "id": self.tid, "interface": self.interface, "anchor": self.peer,
            "local": _hostport(*self.local),
            "remote": _hostport(*self.remote),
            "vipa": self.vipa or None, "un_tid": self.un_tid, "state": self.state,
            "rtt_ms": None if self.rtt_ms is None else round(self.rtt_ms, 3),
            "tx_packets": self.tx_packets, "rx_packets": self.rx_packets,
            "tx_bytes": self.tx_bytes, "rx_bytes": self.rx_bytes,
        }


@dataclass(slots=True, eq=False)
class Flow:
    """One PAFT entry: an application flow bound to a tunnel. The agent's; the anchor keeps
    its many flows in columns instead (``flowtable.AnchorPaft``)."""

    fid: int
    key: FlowKey
    tunnel: int                   # local_tid
    rule: str = ""
    anchor: str = ""              # fixed when the flow starts (its public address)
    app_src: str = ""             # the application's own source address, if known
    policy: Any = None            # the agent's FlowClass (rule's via/anchor), for failover
    tx_packets: int = 0
    rx_packets: int = 0
    created: float = 0.0
    last_seen: float = 0.0
    first_tunnel: int = 0
    # moves, made on the first one: most flows never move, and an empty deque alone costs
    # ~760 bytes (its first block)
    moves: deque[tuple[float, int | None, int, str]] | None = None
    counted: Counter[str] | None = None   # its table's handovers by reason (metrics)
    # its table's watchers (events.py through api.py): empty unless someone subscribed
    watchers: list[FlowWatcher] | None = None

    def __post_init__(self) -> None:
        self.first_tunnel = self.tunnel

    @property
    def history(self) -> History:
        """(when, from tunnel, to tunnel, why), oldest first: the flow's start, then its
        moves; the last HISTORY_LEN of them."""
        if self.moves is None:
            return ((self.created, None, self.first_tunnel, "new flow"),)
        return tuple(self.moves)

    def json(self, now: float, interface: str | None,
             iface_of: Callable[[int | None], str | None] = lambda tid: None) -> dict[str, Any]:
        """The status view both ends share (each adds its own fields): :func:`flow_json`."""
        return flow_json(self.fid, self.key, self.tunnel, self.tx_packets, self.rx_packets,
                         self.history, now, interface, iface_of)

    def move(self, now: float, tid: int, reason: str) -> None:
        """Re-point the flow to tunnel ``tid``, remembering why (bounded history)."""
        if self.moves is None:
            self.moves = deque(self.history, maxlen=HISTORY_LEN)
        self.moves.append((now, self.tunnel, tid, reason))
        before, self.tunnel = self.tunnel, tid
        if self.counted is not None:
            self.counted[reason] += 1
        if self.watchers:
            for w in self.watchers:
                w("moved", self, before, reason)


class Paft:
    """Per-Application Forwarding Table: uplink 5-tuple -> Flow."""

    def __init__(self, cap: int = 100_000, per_source_cap: int | None = None) -> None:
        self.by_key: dict[FlowKey, Flow] = {}
        self.by_id: dict[int, Flow] = {}
        self.cap = cap
        self.per_source_cap = per_source_cap or cap
        self.per_source: dict[bytes, int] = {}   # flows per source address (per host)
        self._next = 1
        self.handovers: Counter[str] = Counter()  # every move of every flow, by reason
        # called ("new" | "moved" | "closed", flow, previous tunnel, reason): the embedding
        # API's events; a flow move is rare next to its packets, so a plain list is enough
        self.watchers: list[FlowWatcher] = []

    def __len__(self) -> int:
        return len(self.by_key)

    @property
    def flows_created(self) -> int:
        """Flows ever added (ids are handed out in order from 1): the metrics' counter."""
        return self._next - 1

    def get(self, key: FlowKey) -> Flow | None:
        return self.by_key.get(key)

    def add(self, key: FlowKey, tid: int, now: float, *, rule: str = "", anchor: str = ""
            ) -> Flow | None:
        """Insert a flow; None when the table, or its source's share, is full (the caller
        counts the drop): one host at its cap cannot take the table from the others."""
        n = self.per_source.get(key[1], 0)
        if len(self.by_key) >= self.cap or n >= self.per_source_cap:
            return None
        self.per_source[key[1]] = n + 1
        f = Flow(self._next, key, tid, rule, anchor, created=now, last_seen=now)
        f.counted = self.handovers
        f.watchers = self.watchers
        self._next += 1
        self.by_key[key] = f
        self.by_id[f.fid] = f
        for w in self.watchers:
            w("new", f, None, "new flow")
        return f

    def remove(self, f: Flow, reason: str = "expired") -> None:
        if self.by_id.get(f.fid) is f:
            for w in self.watchers:
                w("closed", f, f.tunnel, reason)
        if self.by_key.pop(f.key, None) is not None:
            n = self.per_source.get(f.key[1], 1) - 1
            if n:
                self.per_source[f.key[1]] = n
            else:
                self.per_source.pop(f.key[1], None)
        self.by_id.pop(f.fid, None)

    def expire(self, now: float, idle: float) -> int:
        """Drop flows idle for more than ``idle`` seconds; return how many."""
        old = [f for f in self.by_key.values() if now - f.last_seen > idle]
        for f in old:
            self.remove(f)
        return len(old)

    def flows(self) -> list[Flow]:
        return list(self.by_id.values())


class TunnelTable:
    """Tunnel Table: local_tid -> Tunnel, ids allocated here: 24-bit (they travel as the
    header's path id), never 0, never one in use, not reused soon."""

    def __init__(self, first_id: int = 1) -> None:
        self.by_tid: dict[int, Tunnel] = {}
        self._next = first_id

    def __len__(self) -> int:
        return len(self.by_tid)

    def get(self, tid: int) -> Tunnel | None:
        return self.by_tid.get(tid)

    def new_tid(self) -> int:
        if len(self.by_tid) >= TID_MAX:
            raise OverflowError("tunnel table full")
        while True:
            tid = self._next
            self._next = tid % TID_MAX + 1
            if tid not in self.by_tid:
                return tid

    def add(self, t: Tunnel) -> Tunnel:
        self.by_tid[t.tid] = t
        return t

    def remove(self, tid: int) -> Tunnel | None:
        return self.by_tid.pop(tid, None)

    def tunnels(self) -> list[Tunnel]:
        return list(self.by_tid.values())
