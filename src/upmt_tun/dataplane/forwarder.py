"""The per-packet pipelines of the mobile host (agent) and of the anchor node.

No I/O here: methods take bytes, the tables and ``now``, and return what to
write where (or None: dropped, and a counter says why). The asyncio drivers in
``agent.py``/``anchor.py`` carry the results out.

Agent, uplink (:meth:`AgentForwarder.from_tun`), a packet read from the TUN:
  1. parse the IPv4 5-tuple (anything else: drop ``not_ipv4``);
  2. the source must be ``vipa_fix`` (nft SNATs steered traffic to it);
  3. PAFT lookup; on a miss, classify the flow (its rule) and choose its tunnel
     (``policy.choose_tunnel``), then insert it;
  4. if the flow's tunnel is down, move the flow to the next usable one of its
     rule on the same anchor (its public address must not change);
  5. internal NAT: IP.src ``vipa_fix`` -> the tunnel's ``vip_nat``;
  6. prepend the tunnel header (receiver = the anchor's id of this tunnel,
     counter = this association's next value); send on the tunnel's socket.

Agent, downlink (:meth:`AgentForwarder.from_path`), a DATA datagram:
  1. receiver index -> tunnel; it must have come on that tunnel's socket, from
     its remote end point;
  2. the inner destination must be that tunnel's VIpA; NAT it back to ``vipa_fix``;
  3. account it to its flow; write it to the TUN.

Anchor, uplink (:meth:`AnchorForwarder.from_path`):
  1. receiver index -> tunnel, source must be the tunnel's remote end point;
  2. the inner source must be the VIpA this anchor gave that host (anti-spoofing);
  3. PAFT: add the flow, or re-point it to this tunnel (implicit handover);
  4. write the inner packet to the TUN (the kernel NATs it to the Internet).

Anchor, downlink (:meth:`AnchorForwarder.from_tun`):
  1. destination VIpA -> association; reverse 5-tuple -> PAFT flow -> tunnel,
     else the association's most recently heard tunnel;
  2. prepend the header for the host's tunnel id; send to its end point.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import nat
from ..policy import choose_tunnel
from ..tables import Flow, FlowKey, Paft, Tunnel, TunnelTable, reverse_key
from .packet import HEADER, HEADER_LEN, TYPE_DATA

__all__ = ["AgentForwarder", "AnchorForwarder", "Association", "FlowClass"]

_pack_hdr = HEADER.pack
_unpack_hdr = HEADER.unpack_from


@dataclass(frozen=True)
class FlowClass:
    """What the classifier says about a new flow: its rule and where it may go."""

    rule: str
    via: tuple[str, ...]           # interface preference order
    anchor: str | None             # None: the first reachable anchor
    app_src: str = ""


Classifier = Callable[[FlowKey], FlowClass]


@dataclass(eq=False)
class AnchorLink:
    """The agent's association with one tunnel server (anchor or fixed host)."""

    name: str
    role: str = "anchor"
    vipa: str = ""
    vipa_b: bytes = b""
    serves: frozenset[bytes] = frozenset()   # fixed host: the only destinations it carries
    counter: int = 0


class AgentForwarder:
    """Mobile-host data path: TUN <-> tunnels, per-flow, with internal NAT."""

    def __init__(self, vipa_fix: str, interfaces: list[str], anchors: list[str],
                 classify: Classifier) -> None:
        self.vipa_fix = vipa_fix
        self.vipa_fix_b = ipaddress.IPv4Address(vipa_fix).packed
        self.interfaces = list(interfaces)
        self.anchor_order = list(anchors)
        self.links: dict[str, AnchorLink] = {a: AnchorLink(a) for a in anchors}
        self.classify = classify
        self.tunnels = TunnelTable()
        self.paft = Paft()
        self.by_path: dict[tuple[str, str], Tunnel] = {}   # (interface, anchor) -> tunnel
        self.drops: Counter[str] = Counter()

    # -- control-plane hooks (called by the signalling driver) --------------------------
    def add_tunnel(self, interface: str, iface_index: int, anchor: str,
                   local: tuple[str, int], remote: tuple[str, int], now: float) -> Tunnel:
        """Create (or return) the tunnel of (interface, anchor); it starts down."""
        t = self.by_path.get((interface, anchor))
        if t is None:
            t = Tunnel(self.tunnels.new_tid(), interface, local, remote, anchor,
                       iface_index=iface_index, created=now)
            self.tunnels.add(t)
            self.by_path[(interface, anchor)] = t
        return t

    def set_association(self, anchor: str, vipa: str, role: str, serves: frozenset[bytes]) -> None:
        link = self.links[anchor]
        link.vipa, link.vipa_b = vipa, ipaddress.IPv4Address(vipa).packed
        link.role, link.serves = role, serves
        for t in self.tunnels.tunnels():
            if t.peer == anchor:
                t.vipa, t.vipa_b = link.vipa, link.vipa_b

    def tunnel_up(self, t: Tunnel, un_tid: int, now: float) -> None:
        """Call after the anchor answered this tunnel's setup."""
        link = self.links[t.peer]
        t.un_tid, t.vipa, t.vipa_b = un_tid, link.vipa, link.vipa_b
        t.state = "up"
        t.last_rx = now

    def tunnel_down(self, t: Tunnel) -> None:
        """Call when a tunnel stopped working; its flows move on their next packet."""
        t.state = "down"

    def usable(self, interface: str, anchor: str) -> Tunnel | None:
        t = self.by_path.get((interface, anchor))
        return t if t is not None and t.state == "up" else None

    # -- uplink -------------------------------------------------------------------------
    def from_tun(self, pkt: bytes, now: float) -> tuple[int, tuple[str, int], bytes] | None:
        """A packet read from the TUN -> (socket index, destination, datagram) or None."""
        key = nat.five_tuple(pkt)
        if key is None:
            self.drops["not_ipv4"] += 1
            return None
        if pkt[12:16] != self.vipa_fix_b:
            self.drops["bad_source"] += 1
            return None
        flow = self.paft.get(key)
        if flow is None:
            flow = self._new_flow(key, now)
            if flow is None:
                return None
        t = self.tunnels.by_tid.get(flow.tunnel)
        if t is None or t.state != "up":
            t = self._failover(flow, now)
            if t is None:
                self.drops["no_tunnel"] += 1
                return None
        buf = bytearray(pkt)
        nat.rewrite_src(buf, t.vipa_b)
        link = self.links[t.peer]
        link.counter += 1
        flow.tx_packets += 1
        flow.last_seen = now
        t.tx_packets += 1
        t.tx_bytes += len(pkt)
        return t.iface_index, t.remote, _pack_hdr(TYPE_DATA, t.un_tid, link.counter) + buf

    def _candidates(self, fc: FlowClass, dst: bytes, anchor: str | None) -> Tunnel | None:
        if anchor:
            anchors: tuple[str, ...] = (anchor,)
        else:
            anchors = (fc.anchor,) if fc.anchor else tuple(self.anchor_order)
        return choose_tunnel(via=fc.via or tuple(self.interfaces), anchors=anchors, dst=dst,
                             links=self.links, usable=self.usable)

    def _new_flow(self, key: FlowKey, now: float) -> Flow | None:
        fc = self.classify(key)
        t = self._candidates(fc, key[2], None)
        if t is None:
            self.drops["no_tunnel"] += 1
            return None
        f = self.paft.add(key, t.tid, now, rule=fc.rule, anchor=t.peer)
        if f is None:
            self.drops["paft_full"] += 1
            return None
        f.app_src = fc.app_src
        f.policy = fc
        return f

    def _failover(self, flow: Flow, now: float) -> Tunnel | None:
        fc = flow.policy if isinstance(flow.policy, FlowClass) else self.classify(flow.key)
        t = self._candidates(fc, flow.key[2], flow.anchor)
        if t is not None:
            flow.move(now, t.tid, "tunnel down")
        return t

    # -- downlink -----------------------------------------------------------------------
    def from_path(self, index: int, data: bytes, src: tuple[str, int], now: float) -> bytes | None:
        """A DATA datagram received on socket ``index`` -> packet for the TUN, or None."""
        receiver, _counter = _unpack_hdr(data)[1:]
        t = self.tunnels.by_tid.get(receiver)
        if t is None or t.iface_index != index or t.remote != src:
            self.drops["unknown_tunnel"] += 1
            return None
        buf = bytearray(data[HEADER_LEN:])
        key = nat.five_tuple(buf)
        if key is None or buf[16:20] != t.vipa_b:
            self.drops["bad_inner"] += 1
            return None
        nat.rewrite_dst(buf, self.vipa_fix_b)
        t.rx_packets += 1
        t.rx_bytes += len(buf)
        t.last_rx = now
        flow = self.paft.get((key[0], self.vipa_fix_b, key[1], key[4], key[3]))
        if flow is not None:
            flow.rx_packets += 1
            flow.last_seen = now
        return bytes(buf)

    def move_flow(self, flow: Flow, t: Tunnel, now: float, reason: str) -> None:
        flow.move(now, t.tid, reason)




@dataclass(eq=False)
class Association:
    """An anchor's view of one mobile host."""

    mh: str
    vipa: str
    vipa_b: bytes
    created: float
    tunnels: dict[int, Tunnel] = field(default_factory=dict)   # server tid -> tunnel
    last_tunnel: Tunnel | None = None
    counter: int = 0
    last_rx: float = 0.0


class AnchorForwarder:
    """Anchor data path: tunnels <-> TUN, PAFT auto-learning (implicit handover)."""

    def __init__(self, max_flows: int = 100_000) -> None:
        self.tunnels = TunnelTable()
        self.paft = Paft(cap=max_flows)
        self.by_vipa: dict[bytes, Association] = {}
        self.by_mh: dict[str, Association] = {}
        self.drops: Counter[str] = Counter()

    def add_association(self, a: Association) -> None:
        self.by_vipa[a.vipa_b] = a
        self.by_mh[a.mh] = a

    def remove_association(self, a: Association) -> None:
        for tid in list(a.tunnels):
            self.tunnels.remove(tid)
        for f in [f for f in self.paft.by_key.values() if f.key[1] == a.vipa_b]:
            self.paft.remove(f)
        self.by_vipa.pop(a.vipa_b, None)
        self.by_mh.pop(a.mh, None)

    def from_path(self, data: bytes, src: tuple[str, int], now: float) -> bytes | None:
        """A DATA datagram from a mobile host -> inner packet for the TUN, or None."""
        receiver = _unpack_hdr(data)[1]
        t = self.tunnels.by_tid.get(receiver)
        if t is None or t.remote != src:
            self.drops["unknown_tunnel"] += 1
            return None
        a = self.by_mh.get(t.peer)
        inner = data[HEADER_LEN:]
        key = nat.five_tuple(inner)
        # Both the outer source and the flow key's source (for an ICMP error: the quoted
        # packet's) must be this host's VIpA, or a host could plant another host's flow key.
        if a is None or key is None or inner[12:16] != a.vipa_b or key[1] != a.vipa_b:
            self.drops["spoofed_inner"] += 1
            return None
        flow = self.paft.get(key)
        if flow is None:
            flow = self.paft.add(key, t.tid, now, anchor=t.peer)
            if flow is None:
                self.drops["paft_full"] += 1
                return None
        elif flow.tunnel != t.tid and not flow.static:
            flow.move(now, t.tid, "implicit handover")
        flow.tx_packets += 1
        flow.last_seen = now
        t.rx_packets += 1
        t.rx_bytes += len(inner)
        t.last_rx = a.last_rx = now
        a.last_tunnel = t
        return inner

    def from_tun(self, pkt: bytes, now: float) -> tuple[tuple[str, int], bytes] | None:
        """A packet read from the TUN (to a VIpA) -> (end point, datagram), or None."""
        key = nat.five_tuple(pkt)
        if key is None:
            self.drops["not_ipv4"] += 1
            return None
        a = self.by_vipa.get(key[2])
        if a is None:
            self.drops["no_association"] += 1
            return None
        flow = self.paft.get(reverse_key(key))
        t = None
        if flow is not None:
            t = self.tunnels.by_tid.get(flow.tunnel)
            flow.rx_packets += 1
            flow.last_seen = now
        if t is None:
            t = a.last_tunnel
            if t is None or t.tid not in self.tunnels.by_tid:
                self.drops["no_tunnel"] += 1
                return None
        a.counter += 1
        t.tx_packets += 1
        t.tx_bytes += len(pkt)
        return t.remote, _pack_hdr(TYPE_DATA, t.un_tid, a.counter) + pkt
