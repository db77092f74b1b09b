"""The per-packet pipelines of the mobile host (agent) and of the anchor node.

No I/O here: methods take bytes, the tables and ``now``, and return what to
write where (or None: dropped, and a counter says why). The asyncio drivers in
``agent.py``/``anchor.py`` carry the results out. Every tunnel packet is sealed
with the association's session (``crypto.Session``); the header's receiver
index is the receiving end's *session* index.

Agent, uplink (:meth:`AgentForwarder.from_tun`), a packet read from the TUN:
  1. parse the IPv4 5-tuple (anything else: drop ``not_ipv4``);
  2. the source must be ``vipa_fix`` (nft SNATs steered traffic to it);
  3. PAFT lookup; on a miss, classify the flow (its rule) and choose its tunnel
     (``policy.choose_tunnel``), then insert it;
  4. if the flow's tunnel is down, move the flow to the next usable one of its
     rule on the same anchor (its public address must not change);
  5. internal NAT: IP.src ``vipa_fix`` -> the tunnel's ``vip_nat``;
  6. seal with the anchor's current session (one counter space per association,
     shared by all its tunnels); send on the tunnel's socket to its end point.

Agent, downlink (:meth:`AgentForwarder.from_path`), a DATA datagram:
  1. receiver index -> session; it must open (tag, replay window);
  2. it must have come on a tunnel's socket from that tunnel's end point;
  3. the inner destination must be the VIpA; NAT it back to ``vipa_fix``;
  4. account it to its flow; write it to the TUN.

Anchor, uplink (:meth:`AnchorForwarder.from_path`):
  1. receiver index -> session; it must open; its host's association;
  2. the outer source must be a *validated* tunnel of that association, or (NAT
     rebinding) the packet names a validated tunnel in its authenticated path id
     and is newer than everything that tunnel received: then it is accepted, the
     new address gets a PATH_CHALLENGE, and until it answers it may receive at
     most REBIND_CREDIT times the bytes it sent (QUIC's anti-amplification rule);
  3. the inner source and the flow key's source must be the host's VIpA;
  4. PAFT: add the flow, or re-point it to this tunnel (implicit handover) if
     this packet is newer than every earlier packet of the flow;
  5. write the inner packet to the TUN (the kernel NATs it to the Internet).

Anchor, downlink (:meth:`AnchorForwarder.from_tun`):
  1. destination VIpA -> association; reverse 5-tuple -> PAFT flow -> tunnel,
     else the association's most recently heard validated tunnel;
  2. seal with the association's current session; send to the tunnel's end point
     (to its unvalidated new address instead, while that address has credit).

Batches, the same steps decided once for many packets (results identical to the
per-packet methods, which the tests check):

* ``from_tun_super`` (both ends): a TCP super-packet read from the TUN (``offload``)
  is one flow: steps 1-4 once, then ``offload.tso_split`` cuts it into real segments
  (the agent's source NAT folded in) and ``Session.seal_run`` seals them for one
  UDP GSO send.
* ``from_path_many`` (both ends): what UDP GRO coalesced from one sender is opened by
  ``Session.open_many`` when its first datagram names a session whose tunnel is at
  that sender (else, and for other types, datagram by datagram); the opened packets
  are grouped into runs of one flow (``offload.flow_runs``), each run checked, learnt
  (implicit handover with its newest counter) and counted once.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import nat
from ..flowtable import KEY6, AnchorPaft, flow_key, uplink_key
from ..paths import should_return
from ..policy import HomeAnchor, choose_tunnel
from ..tables import Flow, FlowKey, Paft, Tunnel, TunnelTable, seq_of
from . import offload
from .crypto import Session
from .packet import (
    HEADER,
    HEADER_LEN,
    PROBE,
    RELAY_ADDR_LEN,
    TAG_LEN,
    TYPE_DATA,
    TYPE_PATH_CHALLENGE,
    TYPE_PONG,
    TYPE_RELAY,
    datagrams,
    path_id,
)

try:
    from ._fast import UpLane
except ImportError:  # pragma: no cover - depends on the build
    UpLane = None  # type: ignore[assignment,misc]

__all__ = ["AgentForwarder", "UpLane", "AnchorForwarder", "AnchorLink", "Association", "FlowClass",
           "MESH_PEER", "REBIND_CREDIT"]

log = logging.getLogger(__name__)

_unpack_hdr = HEADER.unpack_from
REBIND_CREDIT = 3          # bytes an unvalidated new address may receive per byte it sent
CHALLENGE_EVERY = 0.2      # seconds between PATH_CHALLENGEs to one unvalidated address
MESH_PEER = "mesh-peer"    # AnchorLink.role of another host of a mesh anchor (relayed)


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
    session: Session | None = None           # current: seals everything we send
    vipa6: str = ""                          # its IPv6 VIpA ("": it carries no IPv6)
    vipa6_b: bytes = b""


def even_runs(pkts: list[bytes], i: int, j: int) -> list[tuple[int, int]]:
    """``pkts[i:j]`` cut into pieces that ``Session.seal_run`` takes and one UDP GSO send
    carries: consecutive packets of one length, the piece ended by a shorter one."""
    out = []
    while i < j:
        size = len(pkts[i])
        k = i + 1
        while k < j and len(pkts[k]) == size:
            k += 1
        if k < j and len(pkts[k]) < size:
            k += 1
        out.append((i, k))
        i = k
    return out


def sealed_runs(s: Session, pkts: list[bytes], i: int, j: int, un_tid: int
                ) -> list[tuple[bytes, int]]:
    """``pkts[i:j]`` sealed as DATA for UDP GSO sends, cut by :func:`even_runs`: (the
    datagrams back to back, the size of each but the last), size 0 for a lone one."""
    out = []
    for a, b in even_runs(pkts, i, j):
        if b - a == 1:
            out.append((s.seal(TYPE_DATA, pkts[a], un_tid), 0))
        else:
            piece = pkts[a:b]
            data = s.seal_run(TYPE_DATA, piece, un_tid)
            out.append((data, len(piece[0]) + (len(data) - sum(map(len, piece))) // (b - a)))
    return out


def _steerable6(src: bytes, dst: bytes) -> bool:
    """Whether an IPv6 packet from the TUN may go into a tunnel: not multicast (ND, MLD,
    RS), not to or from a link-local or unspecified address (ND/RA and link-local
    traffic belong to the link, which the TUN is not)."""
    return (dst[0] != 0xFF and not (dst[0] == 0xFE and dst[1] & 0xC0 == 0x80)
            and not (src[0] == 0xFE and src[1] & 0xC0 == 0x80) and any(src))


CHOICES_KEPT_FOR = 300.0   # s a restarted agent waits for a saved flow to show up again


def parse_choices(data: object) -> tuple[dict[str, tuple[str, str | None]],
                                         dict[FlowKey, str]]:
    """What :meth:`AgentForwarder.choices` saved (JSON): (rule -> (interface, anchor),
    flow key -> interface); ValueError when it is not exactly that."""
    if not isinstance(data, dict) or set(data) != {"rules", "flows"}:
        raise ValueError("not a choices file")
    rules, flows = data["rules"], data["flows"]
    if not isinstance(rules, dict) or not isinstance(flows, list):
        raise ValueError("bad rules or flows")
    prefer: dict[str, tuple[str, str | None]] = {}
    for name, choice in rules.items():
        if not (isinstance(choice, list) and len(choice) == 2 and isinstance(choice[0], str)
                and (choice[1] is None or isinstance(choice[1], str))):
            raise ValueError(f"bad choice for rule {name[:64]!r}")
        prefer[name] = (choice[0], choice[1])
    keys: dict[FlowKey, str] = {}
    for row in flows:
        if not (isinstance(row, list) and len(row) == 6 and type(row[0]) is int
                and all(isinstance(x, str) for x in (row[1], row[2], row[5]))
                and all(type(x) is int and 0 <= x <= 0xFFFF for x in (row[3], row[4]))):
            raise ValueError("bad flow")
        try:
            src, dst = bytes.fromhex(row[1]), bytes.fromhex(row[2])
        except ValueError:
            raise ValueError("bad flow address") from None
        if len(src) not in (4, 16) or len(dst) != len(src):
            raise ValueError("bad flow address")
        keys[(row[0], src, dst, row[3], row[4])] = row[5]
    return prefer, keys


class AgentForwarder:
    """Mobile-host data path: TUN <-> tunnels, per-flow, with internal NAT."""

    def __init__(self, vipa_fix: str, interfaces: list[str], anchors: list[str],
                 classify: Classifier, vipa6_fix: str = "", mtu: int = 0) -> None:
        self.vipa_fix = vipa_fix
        self.vipa_fix_b = ipaddress.IPv4Address(vipa_fix).packed
        # IPv6 inside the tunnels ("": off): the TUN's fixed IPv6 address, NATed to each
        # anchor's IPv6 VIpA as vipa_fix is to its IPv4 one
        self.vipa6_fix = vipa6_fix
        self.vipa6_fix_b = ipaddress.IPv6Address(vipa6_fix).packed if vipa6_fix else b""
        # >0: an IPv6 packet longer than this gets an ICMPv6 Packet Too Big back into the
        # TUN (``to_tun``) instead of being sent: IPv6 routers never fragment
        self.mtu = mtu
        self.to_tun: Callable[[bytes], None] = lambda pkt: None
        self.interfaces = list(interfaces)
        self.anchor_order = list(anchors)      # new flows of rules without anchor try these
        self.home = HomeAnchor(anchors)         # ... in this order: best RTT first
        self.links: dict[str, AnchorLink] = {a: AnchorLink(a) for a in anchors}
        self.classify = classify
        self.tunnels = TunnelTable()
        self.paft = Paft()
        self.by_path: dict[tuple[str, str], Tunnel] = {}   # (interface, anchor) -> tunnel
        self.sessions: dict[int, tuple[AnchorLink, Session]] = {}   # receive side
        self.prefer: dict[str, tuple[str, str | None]] = {}   # rule -> (interface, anchor)
        # flow key -> the interface it had been moved to, saved by the run before a restart
        # (choices/resume): applied when the flow shows up again, forgotten after a while
        self.resumed: dict[FlowKey, str] = {}
        self.resumed_until = 0.0
        self.flow_moves: dict[FlowKey, str] = {}    # move_one's, for choices()
        self.drops: Counter[str] = Counter()
        # mesh (UPMT-DAM): destination VIpA -> peer name for peers with a session; a new
        # flow to another address of a mesh pool calls ``mesh_miss`` (the driver looks
        # the peer up) and is dropped until the peer is known
        self.mesh_dst: dict[bytes, str] = {}
        self.mesh_anchor_of: Callable[[bytes], str | None] = lambda dst: None
        self.mesh_miss: Callable[[bytes], None] = lambda dst: None
        # a new flow's packet to a mesh peer whose relay is not up yet: given to
        # ``mesh_hold`` (the driver keeps a few and sends them once it is up)
        self.held = b""
        self.mesh_hold: Callable[[bytes, bytes], None] = \
            lambda dst, pkt: self.drops.update(("mesh_peer_pending",))
        self.mesh_mtu = 0                      # >0: relayed packets longer are dropped
        # mesh peer -> the records of its direct paths (one per validated pair: our
        # socket, the peer's address), and back
        self.direct_of: dict[str, list[str]] = {}
        self.direct_peer: dict[str, str] = {}
        # direct paths not chosen for flows until they answer a probe: another direct
        # path to the same peer just died, maybe of the same cause (its NAT, its host)
        self.suspect: set[int] = set()
        # the application's own choices (api.Policy), given the built-in answer: None =
        # the built-in ones. (rule, via, anchors, dst, built-in tunnel, now) -> tunnel
        self.choice_hook: Callable[[str, tuple[str, ...], tuple[str, ...], bytes,
                                    Tunnel | None, float], Tunnel | None] | None = None
        # (rule, via, current, candidate, candidate_up_for, return_after, built-in, now)
        self.return_hook: Callable[[str, tuple[str, ...], str | None, str, float, float,
                                    bool, float], bool] | None = None
        # the compiled uplink (_fast.UpLane, set by the agent once its sockets exist):
        # _route teaches it each route it finds, and it carries the learnt flows' next
        # packets without coming back here (None: everything takes the Python path)
        self.lane: UpLane | None = None

    # -- anchor choice (multiAN) ----------------------------------------------------------
    def rank_anchors(self, now: float, rtt_of: Callable[[Tunnel], float | None]) -> list[str]:
        """Call after probes measured RTTs: reorder the anchors that new flows of rules
        without ``anchor`` try (best RTT first, with hysteresis: policy.HomeAnchor). An
        anchor's RTT is its best up tunnel's; fixed hosts keep their place (they carry
        only flows to themselves)."""
        rtts: dict[str, float | None] = {}
        for (_iface, a), t in self.by_path.items():
            if self.links[a].role == MESH_PEER:
                continue
            r = rtt_of(t) if t.state == "up" and self.links[a].role != "fixed-host" else None
            if r is not None and (rtts.get(a) is None or r < (rtts[a] or 0.0)):
                rtts[a] = r
            else:
                rtts.setdefault(a, None)
        fixed = {a for a, link in self.links.items() if link.role == "fixed-host"}
        ranked = iter([a for a in self.home.update(now, rtts) if a not in fixed])
        self.anchor_order = [a if a in fixed else next(ranked) for a in self.home.order]
        return self.anchor_order

    # -- operator moves (explicit handover) ---------------------------------------------
    def _preferred(self, fc: FlowClass, iface: str, anchor: str | None) -> FlowClass:
        rest = tuple(v for v in (fc.via or tuple(self.interfaces)) if v != iface)
        return FlowClass(fc.rule, (iface, *rest), anchor or fc.anchor, fc.app_src)

    def move_rule(self, rule: str, iface: str, anchor: str | None, now: float) -> list[Flow]:
        """Make ``iface`` the first choice of ``rule`` (and ``anchor`` its anchor for new
        flows); move its flows there now where that path is usable; return the moved ones.
        Failover stays on: the rule's other interfaces still take over if ``iface`` fails."""
        self.prefer[rule] = (iface, anchor)
        moved = []
        for f in self.paft.flows():
            if f.rule != rule or not isinstance(f.policy, FlowClass):
                continue
            self.flow_moves.pop(f.key, None)       # the rule's move overrides the flow's
            f.policy = self._preferred(f.policy, iface, None)
            t = self.usable_for(iface, f.anchor)
            if t is not None and t.tid != f.tunnel:
                f.move(now, t.tid, "operator")
                moved.append(f)
        return moved

    def move_one(self, f: Flow, iface: str, now: float) -> bool:
        """Move one flow to ``iface`` (same anchor: its public address stays)."""
        fc = f.policy if isinstance(f.policy, FlowClass) else self.classify(f.key)
        f.policy = self._preferred(fc, iface, None)
        if len(self.flow_moves) >= len(self.paft):      # drop those of flows gone
            self.flow_moves = {k: i for k, i in self.flow_moves.items()
                               if self.paft.get(k) is not None}
        self.flow_moves[f.key] = iface
        t = self.usable_for(iface, f.anchor)
        if t is None:
            return False
        if t.tid != f.tunnel:
            f.move(now, t.tid, "operator")
        return True

    def restore_preferences(self, now: float, up_for: Callable[[Tunnel], float],
                            return_after: float) -> list[Flow]:
        """Flows whose tunnel is down take their first usable choice at once; the others
        go back to a better-preferred interface once its tunnel has been up for
        ``return_after`` seconds (``up_for``: how long a tunnel has been up)."""
        moved = []
        for f in self.paft.flows():
            fc = f.policy if isinstance(f.policy, FlowClass) else self.classify(f.key)
            best = self._candidates(fc, f.key[2], f.anchor, now)
            if best is None or best.tid == f.tunnel:
                continue
            cur = self.tunnels.by_tid.get(f.tunnel)
            current = cur.interface if cur is not None and cur.state == "up" else None
            via = fc.via or tuple(self.interfaces)
            back = should_return(via, current, best.interface, up_for(best), return_after)
            if self.return_hook is not None:     # the embedding application's (api.Policy)
                back = self.return_hook(fc.rule, via, current, best.interface, up_for(best),
                                        return_after, back, now)
            if back:
                f.move(now, best.tid, "preference restored" if current else "tunnel up")
                moved.append(f)
        return moved

    def fail_over(self, t: Tunnel, now: float, reason: str) -> list[Flow]:
        """Call when tunnel ``t`` went down: move its flows now (not on their next packet,
        which a downlink-only flow never sends) to their next usable tunnel."""
        moved = []
        for f in self.paft.flows():
            if f.tunnel != t.tid:
                continue
            fc = f.policy if isinstance(f.policy, FlowClass) else self.classify(f.key)
            to = self._candidates(fc, f.key[2], f.anchor, now)
            if to is not None and to.tid != f.tunnel:
                f.move(now, to.tid, reason)
                moved.append(f)
        return moved

    # -- control-plane hooks (called by the signalling driver) --------------------------
    def add_tunnel(self, interface: str, iface_index: int, anchor: str,
                   local: tuple[str, int], remote: tuple[str, int], now: float,
                   vipa_peer: bytes = b"") -> Tunnel:
        """Create (or return) the tunnel of (interface, anchor); it starts down.
        ``vipa_peer``: a relay path to the mesh peer at that VIpA (``anchor`` its name)."""
        t = self.by_path.get((interface, anchor))
        if t is None:
            t = Tunnel(self.tunnels.new_tid(), interface, local, remote, anchor,
                       iface_index=iface_index, created=now, vipa_peer=vipa_peer)
            t.vipa, t.vipa_b = self.links[anchor].vipa, self.links[anchor].vipa_b
            self.tunnels.add(t)
            self.by_path[(interface, anchor)] = t
        return t

    def add_session(self, anchor: str, s: Session) -> None:
        """A handshake with ``anchor`` completed: seal with it from now on."""
        link = self.links[anchor]
        link.session = s
        self.sessions[s.local_index] = (link, s)

    def drop_session(self, index: int) -> None:
        self.sessions.pop(index, None)

    def set_association(self, anchor: str, vipa: str, role: str, serves: frozenset[bytes],
                        vipa6: str = "") -> None:
        """``vipa6``: the IPv6 VIpA the anchor gave ("": none, it carries IPv4 only)."""
        link = self.links[anchor]
        link.vipa, link.vipa_b = vipa, ipaddress.IPv4Address(vipa).packed
        link.role, link.serves = role, serves
        link.vipa6 = vipa6 if self.vipa6_fix else ""
        link.vipa6_b = ipaddress.IPv6Address(link.vipa6).packed if link.vipa6 else b""
        for t in self.tunnels.tunnels():
            if t.peer == anchor:
                t.vipa, t.vipa_b = link.vipa, link.vipa_b

    def tunnel_up(self, t: Tunnel, un_tid: int, now: float) -> None:
        """Call after the anchor answered this tunnel's setup (and its path is validated)."""
        link = self.links[t.peer]
        t.un_tid, t.vipa, t.vipa_b = un_tid, link.vipa, link.vipa_b
        t.state = "up"
        t.last_rx = now

    def tunnel_down(self, t: Tunnel) -> None:
        """Call when a tunnel stopped working; its flows move on their next packet."""
        t.state = "down"

    def remove_tunnel(self, t: Tunnel) -> None:
        """Forget tunnel ``t`` (its link was removed); its flows move on their next packet."""
        t.state = "down"
        if self.by_path.get((t.interface, t.peer)) is t:
            del self.by_path[(t.interface, t.peer)]
        self.tunnels.remove(t.tid)

    def usable(self, interface: str, anchor: str) -> Tunnel | None:
        t = self.by_path.get((interface, anchor))
        return t if t is not None and t.state == "up" else None

    def usable_for(self, interface: str, anchor: str) -> Tunnel | None:
        """The tunnel to ``anchor`` on ``interface``; for a mesh peer a direct path
        there if one is up, else its relay path there."""
        for d in self.direct_of.get(anchor, ()):
            t = self.usable(interface, d)
            if t is not None and t.tid not in self.suspect:
                return t
        return self.usable(interface, anchor)

    # -- uplink -------------------------------------------------------------------------
    def from_tun(self, pkt: bytes, now: float) -> tuple[int, tuple[str, int], bytes] | None:
        """A packet read from the TUN -> (socket index, destination, datagram) or None."""
        route = self._route(pkt, now)
        if route is None:
            if self.held:                     # a new flow to a mesh peer not reachable yet
                self.mesh_hold(self.held, pkt)
                self.held = b""
            return None
        flow, t, s = route
        buf = bytearray(pkt)
        if pkt[0] >> 4 == 6:
            if 0 < self.mtu < len(pkt):       # IPv6: no fragmentation on the way
                self.drops["too_big"] += 1
                self.to_tun(nat.icmp6_error(pkt, 2, 0, self.mtu, self.vipa6_fix_b))
                return None
            nat.rewrite_src(buf, self.links[t.peer].vipa6_b)
        else:
            nat.rewrite_src(buf, t.vipa_b)
        if t.remote[1] == 0:                  # a relay path (mesh.relay_addr)
            if 0 < self.mesh_mtu < len(pkt):
                self.drops["mesh_too_big"] += 1
                return None
            hop = self.relay_hop(t)
            if hop is None:
                return None
            flow.tx_packets += 1
            t.tx_packets += 1
            t.tx_bytes += len(pkt)
            return self.relay_wrap(hop, t, [s.seal(TYPE_DATA, buf, t.un_tid)])[:3]
        flow.tx_packets += 1
        t.tx_packets += 1
        t.tx_bytes += len(pkt)
        return t.iface_index, t.remote, s.seal(TYPE_DATA, buf, t.un_tid)

    def from_tun_many(self, pkts: list[bytes], now: float
                      ) -> list[tuple[int, tuple[str, int], bytes, int]]:
        """The packets of one TUN wake-up, in order -> (socket index, destination,
        datagrams, size): one datagram when size is 0, else datagrams of ``size`` bytes
        back to back (the last may be shorter) for one UDP GSO send. The same datagrams,
        counters and drops as :meth:`from_tun` per packet, deciding once per run of one
        flow's packets (``offload.flow_runs``: TCP/UDP of one 5-tuple)."""
        out: list[tuple[int, tuple[str, int], bytes, int]] = []
        i = 0
        for n in offload.flow_runs(pkts):
            if n == 1:
                one = self.from_tun(pkts[i], now)
                if one is not None:
                    out.append((*one, 0))
            else:
                self._from_tun_run(pkts, i, i + n, now, out)
            i += n
        return out

    def _from_tun_run(self, pkts: list[bytes], i: int, j: int, now: float,
                      out: list[tuple[int, tuple[str, int], bytes, int]]) -> None:
        """:meth:`from_tun` of ``pkts[i:j]``, one flow's packets, routed once."""
        route = self._route(pkts[i], now)
        if route is None:           # the drop, the mesh hold: what each packet would get
            if self.held:
                self.mesh_hold(self.held, pkts[i])
                self.held = b""
            for pkt in pkts[i + 1:j]:
                one = self.from_tun(pkt, now)
                if one is not None:
                    out.append((*one, 0))
            return
        flow, t, s = route
        six = pkts[i][0] >> 4 == 6
        longest = max(map(len, pkts[i:j]))
        relay = t.remote[1] == 0
        if (six and 0 < self.mtu < longest) or (relay and 0 < self.mesh_mtu < longest):
            for pkt in pkts[i:j]:     # some too big: each its own answer (routed again)
                one = self.from_tun(pkt, now)
                if one is not None:
                    out.append((*one, 0))
            return
        hop = self.relay_hop(t) if relay else None
        if relay and hop is None:
            self.drops["relay_down"] += j - i - 1     # relay_hop counted the first
            return
        inner = offload.rewrite_run(pkts, i, j, self.links[t.peer].vipa6_b if six
                                    else t.vipa_b, True)
        k = j - i
        flow.tx_packets += k
        t.tx_packets += k
        t.tx_bytes += sum(map(len, inner))
        for data, size in sealed_runs(s, inner, 0, k, t.un_tid):
            if hop is not None:         # a relay path: sealed end to end, then wrapped
                out.append(self.relay_wrap(hop, t, datagrams(data, size) if size else [data]))
            else:
                out.append((t.iface_index, t.remote, data, size))

    # -- anchors added and removed at run time (``reload``) -----------------------------
    def add_anchor(self, name: str) -> AnchorLink:
        """A new anchor: new flows of rules without ``anchor`` may go there (last, until
        its RTT ranks it)."""
        link = self.links.get(name)
        if link is None:
            link = self.links[name] = AnchorLink(name)
        for order in (self.anchor_order, self.home.order):
            if name not in order:
                order.append(name)
        return link

    def remove_anchor(self, name: str) -> None:
        """Forget anchor ``name``: its tunnels, sessions and flows (and it as the anchor
        a ``move --rule --anchor`` preferred: the rule's own choice again)."""
        self.remove_peer(name)
        for rule, (iface, anchor) in list(self.prefer.items()):
            if anchor == name:
                self.prefer[rule] = (iface, None)
        for order in (self.anchor_order, self.home.order):
            if name in order:
                order.remove(name)
        if self.home.home == name:
            self.home.home = None

    # -- mesh relay: a peer's datagrams wrapped in RELAY datagrams to its anchor ----------
    def add_peer(self, key: str, anchor: str) -> AnchorLink:
        """A mesh peer of ``anchor``: its record (the end-to-end session; our VIpA at that
        anchor as the NAT source)."""
        a = self.links[anchor]
        link = self.links.get(key)
        if link is None:
            link = self.links[key] = AnchorLink(key, MESH_PEER, a.vipa, a.vipa_b)
        link.serves = frozenset({anchor.encode()})      # the anchor it is relayed by
        return link

    def remove_peer(self, key: str) -> None:
        """Forget mesh peer ``key``: its tunnels, sessions and flows (a new packet to it
        starts over with a lookup)."""
        for t in [t for t in self.tunnels.tunnels() if t.peer == key]:
            self.remove_tunnel(t)
        for f in [f for f in self.paft.flows() if f.anchor == key]:
            self.paft.remove(f, "mesh peer forgotten")
        for idx in [i for i, (link, _) in self.sessions.items() if link.name == key]:
            del self.sessions[idx]
        self.links.pop(key, None)
        for dst in [d for d, k in self.mesh_dst.items() if k == key]:
            del self.mesh_dst[dst]

    def to_direct(self, peer: str, now: float) -> list[Flow]:
        """The direct path to mesh peer ``peer`` came up: its flows move there now."""
        moved = []
        for f in self.paft.flows():
            if f.anchor != peer:
                continue
            fc = f.policy if isinstance(f.policy, FlowClass) else self.classify(f.key)
            best = self._candidates(fc, f.key[2], peer, now)
            if best is not None and best.tid != f.tunnel and best.vipa_peer == b"" \
                    and best.remote[1] != 0:
                f.move(now, best.tid, "direct path")
                moved.append(f)
        return moved

    def relay_anchor(self, t: Tunnel) -> str:
        return next(iter(self.links[t.peer].serves)).decode()

    def relay_hop(self, t: Tunnel) -> Tunnel | None:
        """The anchor tunnel on ``t``'s interface that carries relay path ``t``."""
        hop = self.by_path.get((t.interface, self.relay_anchor(t)))
        if hop is None or hop.state != "up" or self.links[hop.peer].session is None:
            self.drops["relay_down"] += 1
            return None
        return hop

    def relay_wrap(self, hop: Tunnel, t: Tunnel, dgs: list[bytes]
                   ) -> tuple[int, tuple[str, int], bytes, int]:
        """End-to-end sealed datagrams for relay path ``t`` -> (socket index, the anchor's
        end point, RELAY datagrams back to back, the size of each but the last)."""
        s = self.links[hop.peer].session
        assert s is not None
        to = t.vipa_peer
        hop.tx_packets += len(dgs)
        if len(dgs) == 1:
            return hop.iface_index, hop.remote, s.seal(TYPE_RELAY, to + dgs[0], hop.un_tid), 0
        data = s.seal_run(TYPE_RELAY, [to + d for d in dgs], hop.un_tid)
        return hop.iface_index, hop.remote, data, len(dgs[0]) + len(to) + HEADER_LEN + TAG_LEN

    def from_relay(self, index: int, data: bytes, src: tuple[str, int], now: float
                   ) -> tuple[str, bytes, bytes] | None:
        """A RELAY datagram from an anchor -> (the anchor, the other host's VIpA, the
        datagram that host sealed for us), or None (counted)."""
        opened = self.open(index, data, src)
        if opened is None:
            return None
        link, t, _, payload = opened
        if link.role == MESH_PEER or len(payload) < RELAY_ADDR_LEN + HEADER_LEN:
            self.drops["bad_relay"] += 1
            return None
        t.last_rx = now
        t.rx_packets += 1           # the hop is alive: its probes need not say so
        return link.name, payload[:RELAY_ADDR_LEN], payload[RELAY_ADDR_LEN:]

    def relay_data(self, index: int, key: str, inner: bytes, now: float) -> bytes | None:
        """A DATA datagram that mesh peer ``key`` sealed for us, relayed to socket
        ``index`` -> the packet for the TUN, or None (counted)."""
        hit = self.sessions.get(_unpack_hdr(inner)[1])
        if hit is None or hit[0].name != key:
            self.drops["unknown_session"] += 1
            return None
        opened = hit[1].open(inner)
        t = self.by_path.get((self.interfaces[index], key)) \
            if index < len(self.interfaces) else None
        if opened is None or t is None:
            self.drops["bad_packet" if opened is None else "unknown_path"] += 1
            return None
        pkt = self._downlink(t, opened[1], now)
        if pkt is not None:
            t.rx_packets += 1
            t.rx_bytes += len(pkt)
            t.last_rx = now
        return pkt

    def from_tun_super(self, pkt: memoryview, gso_size: int, now: float
                       ) -> tuple[int, tuple[str, int], bytes, int] | None:
        """A TCP super-packet read from the TUN (``offload.tso_of``): one decision for
        all its segments -> (socket index, destination, their datagrams back to back
        (``Session.seal_run``), the size of each but the last)."""
        route = self._route(pkt, now)
        if route is None:
            if self.held:                     # not kept: a super-packet is no first packet
                self.drops["mesh_peer_pending"] += 1
                self.held = b""
            return None
        flow, t, s = route
        six = pkt[0] >> 4 == 6
        segs = offload.tso_split(pkt, gso_size,                 # NAT included
                                 self.links[t.peer].vipa6_b if six else t.vipa_b)
        if not segs:
            self.drops["bad_offload"] += 1
            return None
        k = len(segs)
        inner = sum(map(len, segs))
        if t.remote[1] == 0:                  # a relay path: each sealed, then wrapped
            if 0 < self.mesh_mtu < len(segs[0]):
                self.drops["mesh_too_big"] += k
                return None
            hop = self.relay_hop(t)
            if hop is None:
                return None
            flow.tx_packets += k
            t.tx_packets += k
            t.tx_bytes += inner
            one = s.seal_run(TYPE_DATA, segs, t.un_tid)
            size = len(segs[0]) + HEADER_LEN + TAG_LEN
            return self.relay_wrap(hop, t, datagrams(one, size))
        flow.tx_packets += k
        t.tx_packets += k
        t.tx_bytes += inner
        data = s.seal_run(TYPE_DATA, segs, t.un_tid)
        return t.iface_index, t.remote, data, len(segs[0]) + (len(data) - inner) // k

    def _route(self, pkt: bytes | memoryview, now: float) -> tuple[Flow, Tunnel, Session] | None:
        """The flow of ``pkt`` and the tunnel and session that carry it (steps 1-4)."""
        key = nat.five_tuple(pkt)
        if key is None:
            self.drops["bad_ipv6" if pkt and pkt[0] >> 4 == 6 else "not_ipv4"] += 1
            return None
        if len(key[1]) == 16:                 # the outer header's addresses, as for IPv4
            src6 = bytes(pkt[8:24])
            if not _steerable6(src6, bytes(pkt[24:40])):
                self.drops["ipv6_local"] += 1  # ND, RA, MLD, link-local: never steered
                return None
            if src6 != self.vipa6_fix_b or not self.vipa6_fix_b:
                self.drops["bad_source"] += 1
                return None
        elif pkt[12:16] != self.vipa_fix_b:
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
        link = self.links[t.peer]
        s = link.session
        if s is None:
            self.drops["no_session"] += 1
            return None
        flow.last_seen = now
        if self.lane is not None:
            self.lane.learn(key, flow, t, link, s)
        return flow, t, s

    def _candidates(self, fc: FlowClass, dst: bytes, anchor: str | None, now: float
                    ) -> Tunnel | None:
        via = fc.via or tuple(self.interfaces)
        if anchor in self.direct_of:       # a mesh peer: its direct paths, then the relay
            anchors: tuple[str, ...] = (anchor,)
            t = self.peer_path(fc.via, anchor)
        else:
            if anchor:
                anchors = (anchor,)
            else:
                anchors = (fc.anchor,) if fc.anchor else tuple(self.anchor_order)
            t = choose_tunnel(via=via, anchors=anchors, dst=dst, links=self.links,
                              usable=self.usable if len(dst) == 4 else self._usable6)
        if self.choice_hook is not None:    # the embedding application's (api.Policy)
            t = self.choice_hook(fc.rule, via, anchors, dst, t, now)
        return t

    def _usable6(self, interface: str, anchor: str) -> Tunnel | None:
        """:meth:`usable` for an IPv6 flow: only anchors that gave an IPv6 VIpA (no mesh
        relay or direct path: those carry IPv4 only)."""
        link = self.links.get(anchor)
        if link is None or not link.vipa6_b or link.role == MESH_PEER:
            return None
        t = self.usable(interface, anchor)
        return t if t is not None and t.vipa_peer == b"" and t.remote[1] != 0 else None

    def peer_path(self, via: tuple[str, ...], peer: str) -> Tunnel | None:
        """The path for a flow to mesh peer ``peer``. A rule's ``via`` (or a move) names
        interfaces: that interface first, direct there if a direct path is up, else its
        relay path, then the next interface. Without ``via``: a direct path on any
        interface (config order) before any relay path. The relay is the fallback."""
        directs = self.direct_of.get(peer, ())
        if via:
            for iface in via:
                t = self.usable_for(iface, peer)
                if t is not None:
                    return t
            return None
        for iface in self.interfaces:
            for d in directs:
                t = self.usable(iface, d)
                if t is not None and t.tid not in self.suspect:
                    return t
        for iface in self.interfaces:
            t = self.usable(iface, peer)
            if t is not None:
                return t
        return None

    def _class_of(self, key: FlowKey) -> FlowClass:
        """A new flow's class: its rule's, with the rule's preferred interface first."""
        fc = self.classify(key)
        pref = self.prefer.get(fc.rule)
        return fc if pref is None else self._preferred(fc, *pref)

    def choices(self) -> dict[str, object]:
        """What a restart should keep of the operator's choices (JSON): each rule's
        preferred interface (``move --rule``) and the interface of each live flow moved
        on its own (``move --flow``). Not a failover: that flow's preference is still its
        rule's, and the restarted agent lets it return."""
        flows = [[k[0], k[1].hex(), k[2].hex(), k[3], k[4], iface]
                 for k, iface in self.flow_moves.items() if self.paft.get(k) is not None]
        return {"rules": {r: [i, a] for r, (i, a) in self.prefer.items()}, "flows": flows}

    def resume(self, rules: dict[str, tuple[str, str | None]], flows: dict[FlowKey, str],
               now: float) -> None:
        """Take over what :meth:`choices` saved before a restart, for the interfaces
        that are still configured; a saved flow that has not shown up again within
        ``CHOICES_KEPT_FOR`` s is forgotten."""
        self.prefer.update((r, c) for r, c in rules.items() if c[0] in self.interfaces)
        self.resumed = {k: i for k, i in flows.items() if i in self.interfaces}
        self.resumed_until = now + CHOICES_KEPT_FOR

    def _new_flow(self, key: FlowKey, now: float) -> Flow | None:
        fc = self._class_of(key)
        resumed = None
        if self.resumed:
            if now > self.resumed_until:
                self.resumed.clear()
            elif (resumed := self.resumed.get(key)) is not None:
                fc = self._preferred(fc, resumed, None)
        peer = self.mesh_dst.get(key[2])
        if peer is None and len(key[2]) == 4 and self.mesh_anchor_of(key[2]) is not None:
            self.mesh_miss(key[2])             # another host of a mesh: look it up
            self.held = key[2]
            return None
        t = self._candidates(fc, key[2], peer, now)
        if t is None:
            if peer is not None:
                self.held = key[2]             # its session is on the way
            else:
                self.drops["no_tunnel"] += 1
            return None
        f = self.paft.add(key, t.tid, now, rule=fc.rule, anchor=peer or t.peer)
        if f is None:
            self.drops["paft_full"] += 1
            return None
        f.app_src = fc.app_src
        f.policy = fc
        if resumed is not None:            # (not before: a flow may wait for its tunnel)
            del self.resumed[key]
            self.flow_moves[key] = resumed               # kept by the next restart too
        return f

    def _failover(self, flow: Flow, now: float) -> Tunnel | None:
        fc = flow.policy if isinstance(flow.policy, FlowClass) else self.classify(flow.key)
        t = self._candidates(fc, flow.key[2], flow.anchor, now)
        if t is not None:
            flow.move(now, t.tid, "tunnel down")
        return t

    # -- downlink -----------------------------------------------------------------------
    def open(self, index: int, data: bytes, src: tuple[str, int]
             ) -> tuple[AnchorLink, Tunnel, int, bytes] | None:
        """Open a sealed DATA/CONTROL datagram that came on socket ``index`` from ``src``:
        (anchor link, tunnel, counter, plaintext), or None (dropped and counted)."""
        hit = self.sessions.get(_unpack_hdr(data)[1])
        if hit is None:
            self.drops["unknown_session"] += 1
            return None
        link, s = hit
        opened = s.open(data)
        if opened is None:
            self.drops["bad_packet"] += 1
            return None
        t = self.by_path.get((self.interfaces[index], link.name)) \
            if index < len(self.interfaces) else None
        if t is None or t.remote != src:
            self.drops["unknown_path"] += 1
            return None
        return link, t, opened[0], opened[1]

    def from_path(self, index: int, data: bytes, src: tuple[str, int], now: float) -> bytes | None:
        """A DATA datagram received on socket ``index`` -> packet for the TUN, or None."""
        opened = self.open(index, data, src)
        if opened is None:
            return None
        t = opened[1]
        pkt = self._downlink(t, opened[3], now)
        if pkt is not None:
            t.rx_packets += 1
            t.rx_bytes += len(pkt)
            t.last_rx = now
        return pkt

    def from_path_many(self, index: int, data: bytes, size: int, src: tuple[str, int],
                       now: float) -> tuple[list[bytes], list[bytes]]:
        """Datagrams of ``size`` bytes back to back (UDP GRO) from ``src`` on socket
        ``index`` -> (packets for the TUN, the datagrams left for :meth:`from_path`
        and the other per-datagram handlers: other types, other sessions, and all of
        them when the first names no session of a tunnel from ``src``)."""
        hit = self.sessions.get(_unpack_hdr(data)[1]) if len(data) >= 16 else None
        t = None
        if hit is not None and index < len(self.interfaces):
            t = self.by_path.get((self.interfaces[index], hit[0].name))
        if hit is None or t is None or t.remote != src:
            return [], datagrams(data, size)
        _, pts, others, bad = hit[1].open_many(data, size)
        if bad:
            self.drops["bad_packet"] += bad
        out: list[bytes] = []
        i = 0
        for n in offload.flow_runs(pts):     # one decision per run of one flow's packets
            if n == 1:
                pkt = self._downlink(t, pts[i], now)
                if pkt is not None:
                    out.append(pkt)
            else:
                out += self._downlink_run(t, pts, i, i + n, now)
            i += n
        if out:
            t.rx_packets += len(out)
            t.rx_bytes += sum(map(len, out))
            t.last_rx = now
        return out, others

    def _downlink(self, t: Tunnel, inner: bytes, now: float) -> bytes | None:
        """Steps 3-4 of the downlink for a packet that came on tunnel ``t``."""
        buf = bytearray(inner)
        key = nat.five_tuple(buf)
        fix = None if key is None else self._local_fix(t, buf, key)
        if key is None or fix is None:
            self.drops["bad_inner"] += 1
            return None
        nat.rewrite_dst(buf, fix)
        self._account_rx(t, key, now, 1)
        return bytes(buf)

    def _downlink_run(self, t: Tunnel, pts: list[bytes], i: int, j: int, now: float
                      ) -> list[bytes]:
        """:meth:`_downlink` of ``pts[i:j]``, packets of one flow (``offload.flow_runs``)."""
        key = nat.five_tuple(pts[i])
        fix = None if key is None else self._local_fix(t, pts[i], key)
        if key is None or fix is None:
            self.drops["bad_inner"] += j - i
            return []
        self._account_rx(t, key, now, j - i)
        return offload.rewrite_run(pts, i, j, fix, False)

    def _local_fix(self, t: Tunnel, pkt: bytes | bytearray, key: FlowKey) -> bytes | None:
        """The local address (``vipa_fix`` or ``vipa6_fix``) a packet from tunnel ``t`` is
        rewritten to, or None when its destination is not this host's VIpA of that
        family on ``t`` (IPv6: only from an anchor that gave one, never a mesh path)."""
        if len(key[1]) == 16:
            link = self.links.get(t.peer)     # none for a mesh peer's path: no IPv6 there
            vipa6 = link.vipa6_b if link is not None else b""
            if not vipa6 or pkt[24:40] != vipa6 or t.remote[1] == 0:
                return None
            return self.vipa6_fix_b
        return self.vipa_fix_b if pkt[16:20] == t.vipa_b else None

    def _account_rx(self, t: Tunnel, key: FlowKey, now: float, n: int) -> None:
        fix = self.vipa_fix_b if len(key[1]) == 4 else self.vipa6_fix_b
        flow = self.paft.get((key[0], fix, key[1], key[4], key[3]))
        if flow is not None:
            flow.rx_packets += n
            flow.last_seen = now
            if flow.tunnel != t.tid and t.peer in self.direct_peer:
                self._follow(flow, t, now)

    def _follow(self, flow: Flow, t: Tunnel, now: float) -> None:
        """A flow's packet came from its mesh peer on direct path ``t``, not on the path
        the flow uses: the peer moved it (to another of its interfaces). Follow it when
        ``t`` is on the same interface of ours as the flow's path (our own ``via`` stays
        ours), as the anchor follows a host's flow (implicit handover)."""
        cur = self.tunnels.by_tid.get(flow.tunnel)
        if (cur is not None and cur.state == "up" and t.state == "up"
                and cur.interface == t.interface
                and self.direct_peer.get(cur.peer, cur.peer) == self.direct_peer[t.peer]):
            flow.move(now, t.tid, "peer moved")

    def pong(self, index: int, data: bytes, src: tuple[str, int]) -> tuple[Tunnel, float] | None:
        """A PONG received on socket ``index``: (its tunnel, the probe's send time)."""
        opened = self.open(index, data, src)
        if opened is None:
            return None
        if len(opened[3]) != PROBE.size:
            self.drops["bad_packet"] += 1
            return None
        return opened[1], PROBE.unpack(opened[3])[0]


@dataclass(eq=False)
class Association:
    """An anchor's view of one mobile host (keyed by its authenticated peer name)."""

    mh: str
    vipa: str
    vipa_b: bytes
    created: float
    tunnels: dict[int, Tunnel] = field(default_factory=dict)       # server tid -> tunnel
    by_addr: dict[tuple[str, int], Tunnel] = field(default_factory=dict)
    last_tunnel: Tunnel | None = None
    session: Session | None = None       # current: seals the downlink
    last_rx: float = 0.0
    plain_data: bool = False
    mesh: bool = False                   # may reach the anchor's other mesh hosts (relay)
    relay_rx_bytes: int = 0              # mesh datagrams this host sent through the anchor
    relay_tx_bytes: int = 0              # ... and received through it
    vipa6: str = ""                      # its IPv6 VIpA ("": IPv4 only)
    vipa6_b: bytes = b""


class AnchorForwarder:
    """Anchor data path: tunnels <-> TUN, PAFT auto-learning (implicit handover)."""

    def __init__(self, max_flows: int = 100_000, max_flows_per_host: int = 4096) -> None:
        self.tunnels = TunnelTable()
        # the columns layout (flowtable.py): 100 000 flows of many hosts; a flow's host is
        # the association of its source address
        self.paft = AnchorPaft(max_flows, max_flows_per_host,
                               lambda src: a.mh if (a := self.by_vipa.get(src)) else "")
        self.by_vipa: dict[bytes, Association] = {}
        self.by_mh: dict[str, Association] = {}
        self.sessions: dict[int, Session] = {}
        self.drops: Counter[str] = Counter()
        self.events: Counter[str] = Counter()    # path rebinding, counted not logged
        # sends a datagram the data path itself originates (PATH_CHALLENGE)
        self.emit: Callable[[bytes, tuple[str, int]], None] = lambda data, addr: None

    def add_association(self, a: Association) -> None:
        self.by_vipa[a.vipa_b] = a
        if a.vipa6_b:
            self.by_vipa[a.vipa6_b] = a
        self.by_mh[a.mh] = a

    def remove_association(self, a: Association) -> None:
        for tid in list(a.tunnels):
            self.tunnels.remove(tid)
        a.tunnels.clear()
        a.by_addr.clear()
        self.paft.remove_source(a.vipa_b)
        self.by_vipa.pop(a.vipa_b, None)
        if a.vipa6_b:
            self.paft.remove_source(a.vipa6_b)
            if self.by_vipa.get(a.vipa6_b) is a:
                del self.by_vipa[a.vipa6_b]
        self.by_mh.pop(a.mh, None)

    def open(self, data: bytes) -> tuple[Session, Association | None, int, bytes] | None:
        """Open a sealed datagram: (session, its host's association if any, counter,
        plaintext) or None (counted)."""
        s = self.sessions.get(_unpack_hdr(data)[1])
        if s is None:
            self.drops["unknown_session"] += 1
            return None
        opened = s.open(data)
        if opened is None:
            self.drops["bad_packet"] += 1
            return None
        a = self.by_mh.get(s.peer)
        if a is not None and (a.session is None or s.generation > a.session.generation):
            a.session = s        # the host used its new session: key confirmed, switch to it
        return s, a, opened[0], opened[1]

    def from_path(self, data: bytes, src: tuple[str, int], now: float) -> bytes | None:
        """A DATA datagram from a mobile host -> inner packet for the TUN, or None."""
        opened = self.open(data)
        if opened is None:
            return None
        s, a, counter, inner = opened
        seq = s.generation << 64 | counter        # tables.seq_of, inlined
        t = self._path_of(a, s, data, src, seq, now)
        if a is None or t is None:
            return None
        return inner if self._uplink(a, t, inner, seq, now, 1, len(inner)) else None

    def from_path_many(self, data: bytes, size: int, src: tuple[str, int], now: float
                       ) -> tuple[list[bytes], list[bytes]]:
        """Datagrams of ``size`` bytes back to back (UDP GRO) from ``src`` -> (inner
        packets for the TUN, the datagrams left for the per-datagram handlers: other
        types and sessions, and all of them unless the first names a session whose host
        has a validated tunnel at ``src``: rebinding is decided packet by packet)."""
        s = self.sessions.get(_unpack_hdr(data)[1]) if len(data) >= 16 else None
        a = self.by_mh.get(s.peer) if s is not None else None
        t = a.by_addr.get(src) if a is not None else None
        if s is None or a is None or t is None or t.state != "up":
            return [], datagrams(data, size)
        counters, pts, others, bad = s.open_many(data, size)
        if bad:
            self.drops["bad_packet"] += bad
        if not pts:
            return [], others
        if a.session is None or s.generation > a.session.generation:
            a.session = s
        gen = s.generation << 64
        newest = gen | max(counters)
        if newest > t.newest:                     # as _path_of, once for the run
            t.newest = newest
            if t.probe_addr is not None:
                self.end_probe(t)
                self.events["rebind_abandoned"] += 1
        out: list[bytes] = []
        i = 0
        for n in offload.flow_runs(pts):     # one decision per run of one flow's packets
            j = i + n
            if n == 1:
                if self._uplink(a, t, pts[i], gen | counters[i], now, 1, len(pts[i])):
                    out.append(pts[i])
            else:
                run = pts[i:j]
                if self._uplink(a, t, run[0], gen | max(counters[i:j]), now, n,
                                sum(map(len, run))):
                    out += run
            i = j
        return out, others

    def _uplink(self, a: Association, t: Tunnel, inner: bytes, seq: int, now: float,
                n: int, nbytes: int) -> bool:
        """Steps 3-4 of the uplink for ``n`` opened packets of one flow that came on
        tunnel ``t`` (``inner`` the first, ``seq`` the newest): may they go to the TUN?"""
        # Both the outer source and the flow key's source (for an ICMP error: the quoted
        # packet's) must be this host's VIpA, or a host could plant another host's flow key.
        src = a.vipa6_b if inner and inner[0] >> 4 == 6 else a.vipa_b
        key = uplink_key(inner, src) if src else None
        if key is None:
            self.drops["spoofed_inner"] += n
            return False
        # PAFT: learn the flow, or re-point it here if ``seq`` is its newest
        if self.paft.up(key, t.tid, seq, now, n) < 0:
            self.drops["flow_cap"] += n
            return False
        t.rx_packets += n
        t.rx_bytes += nbytes
        t.last_rx = a.last_rx = now
        a.last_tunnel = t
        return True

    def ping(self, data: bytes, src: tuple[str, int], now: float
             ) -> tuple[tuple[str, int], bytes] | None:
        """A host's path probe -> (where, the PONG), or None. Answered on a validated tunnel
        (or, within its credit, at an address that is being validated)."""
        opened = self.open(data)
        if opened is None:
            return None
        s, a, counter, payload = opened
        t = self._path_of(a, s, data, src, seq_of(s.generation, counter), now)
        if a is None or t is None or a.session is None or len(payload) != PROBE.size:
            return None
        t.last_rx = a.last_rx = now
        pong = a.session.seal(TYPE_PONG, payload, t.un_tid)
        if t.remote != src and not self._spend(t, len(pong)):
            return None
        return src, pong

    # -- mesh relay (UPMT-DAM: hosts of one anchor reach one another) -------------------
    def relay(self, data: bytes, src: tuple[str, int], now: float
              ) -> tuple[tuple[str, int], bytes] | None:
        """A RELAY datagram from a host -> (where, the RELAY datagram for the other host), or
        None (counted). Both hosts must be mesh hosts; the datagram inside was sealed end to
        end by the two hosts, so the anchor can read nothing of it (only the hop is opened
        and re-sealed). It goes to the tunnel the other host was last heard on: per host,
        not per flow, since the anchor cannot see the flows of a relayed datagram."""
        opened = self.open(data)
        if opened is None:
            return None
        s, a, counter, payload = opened
        t = self._path_of(a, s, data, src, seq_of(s.generation, counter), now)
        if a is None or t is None:
            return None
        if not a.mesh:
            self.drops["relay_not_mesh"] += 1
            return None
        b = self.by_vipa.get(payload[:RELAY_ADDR_LEN]) if len(payload) > RELAY_ADDR_LEN \
            else None
        if b is None or not b.mesh or b is a:
            self.drops["relay_no_peer"] += 1
            return None
        t.last_rx = a.last_rx = now
        a.last_tunnel = t
        a.relay_rx_bytes += len(payload) - RELAY_ADDR_LEN
        tb = b.last_tunnel
        if tb is None or tb.state != "up" or b.session is None:
            self.drops["relay_peer_unreachable"] += 1
            return None
        out = b.session.seal(TYPE_RELAY, a.vipa_b + payload[RELAY_ADDR_LEN:], tb.un_tid)
        b.relay_tx_bytes += len(payload) - RELAY_ADDR_LEN
        if tb.probe_addr is not None and self._spend(tb, len(out)):
            return tb.probe_addr, out
        return tb.remote, out

    # -- NAT rebinding (QUIC-style path validation on the data path) --------------------
    def _path_of(self, a: Association | None, s: Session, data: bytes, src: tuple[str, int],
                 seq: int, now: float) -> Tunnel | None:
        """The tunnel an opened packet from ``src`` came on (validated, or being validated
        after a NAT rebinding), or None (counted)."""
        t = a.by_addr.get(src) if a is not None else None
        if t is None or t.state != "up":
            t = self._rebinding(a, s, data, src, seq, now) if a is not None else None
            if t is None:
                self.drops["unvalidated_path"] += 1
            return t
        if seq > t.newest:
            t.newest = seq
            if t.probe_addr is not None:     # the validated address is alive and newest
                self.end_probe(t)
                self.events["rebind_abandoned"] += 1
        return t

    def _rebinding(self, a: Association, s: Session, data: bytes, src: tuple[str, int],
                   seq: int, now: float) -> Tunnel | None:
        """An authenticated packet from an address that is no validated tunnel of ``a``:
        the tunnel it names (its path id), if that tunnel is validated and the packet is
        newer than all it received; then challenge ``src`` (paced) and give it credit."""
        if s.plain_data and data[0] == TYPE_DATA:
            return None                      # unsealed data proves nothing
        t = a.tunnels.get(path_id(data))
        if t is None or t.state != "up" or seq <= t.newest:
            return None
        t.newest = seq
        self.probe(t, src)
        t.probe_credit += REBIND_CREDIT * len(data)
        if now - t.probe_sent >= CHALLENGE_EVERY and a.session is not None:
            challenge = a.session.seal(TYPE_PATH_CHALLENGE, t.probe_token, t.un_tid)
            if self._spend(t, len(challenge)):
                t.probe_sent = now
                self.events["path_challenge_sent"] += 1
                self.emit(challenge, src)
        return t

    @staticmethod
    def _spend(t: Tunnel, n: int) -> bool:
        """Take ``n`` bytes from the credit of ``t``'s unvalidated address, if it has them."""
        if t.probe_credit < n:
            return False
        t.probe_credit -= n
        return True

    def probe(self, t: Tunnel, src: tuple[str, int]) -> bytes:
        """Signalling saw validated tunnel ``t`` at a new address: the token that address
        must echo (the same while it stays the candidate)."""
        if t.probe_addr != src:
            t.probe_addr, t.probe_token = src, secrets.token_bytes(16)
            t.probe_credit, t.probe_sent = 0, float("-inf")
            self.events["rebind_seen"] += 1
        return t.probe_token

    def path_response(self, data: bytes, src: tuple[str, int]) -> None:
        """A PATH_RESPONSE: if it echoes the token from the address it was sent to, the
        tunnel moves there (its old address is forgotten)."""
        opened = self.open(data)
        if opened is None:
            return
        a, token = opened[1], opened[3]
        t = a.tunnels.get(path_id(data)) if a is not None else None
        if a is None or t is None or t.probe_addr != src \
                or not secrets.compare_digest(token, t.probe_token):
            self.drops["bad_path_response"] += 1
            return
        self.rebind(a, t, src)

    def rebind(self, a: Association, t: Tunnel, src: tuple[str, int]) -> None:
        """Validated tunnel ``t`` proved it receives at ``src``: it lives there now."""
        log.info("tunnel %d of %s rebound %s:%d -> %s:%d", t.tid, a.mh, *t.remote, *src)
        if a.by_addr.get(t.remote) is t:
            del a.by_addr[t.remote]
        other = a.by_addr.get(src)
        if other is not None and other is not t:
            self.drop_tunnel(a, other)       # that address belongs to this tunnel now
        t.remote = src
        a.by_addr[src] = t
        self.end_probe(t)
        self.events["path_rebound"] += 1

    @staticmethod
    def end_probe(t: Tunnel) -> None:
        t.probe_addr, t.probe_token, t.probe_credit = None, b"", 0

    def drop_tunnel(self, a: Association, t: Tunnel) -> None:
        a.tunnels.pop(t.tid, None)
        if a.by_addr.get(t.remote) is t:
            del a.by_addr[t.remote]
        self.tunnels.remove(t.tid)
        if a.last_tunnel is t:
            a.last_tunnel = self.best(a)

    @staticmethod
    def best(a: Association) -> Tunnel | None:
        """The association's most recently heard validated tunnel."""
        up = [t for t in a.tunnels.values() if t.state == "up"]
        return max(up, key=lambda x: x.last_rx, default=None)

    def from_tun(self, pkt: bytes, now: float) -> tuple[tuple[str, int], bytes] | None:
        """A packet read from the TUN (to a VIpA) -> (end point, datagram), or None."""
        route = self._route(pkt, now, 1)
        if route is None:
            return None
        a, t = route
        t.tx_bytes += len(pkt)
        dg = a.session.seal(TYPE_DATA, pkt, t.un_tid)  # type: ignore[union-attr]
        if t.probe_addr is not None and self._spend(t, len(dg)):
            return t.probe_addr, dg          # NAT rebinding: the new address, within credit
        return t.remote, dg

    def from_tun_many(self, pkts: list[bytes], now: float
                      ) -> list[tuple[tuple[str, int], bytes, int]]:
        """The packets of one TUN wake-up, in order -> (end point, datagrams, size): one
        datagram when size is 0, else datagrams of ``size`` bytes back to back (the last
        may be shorter) for one UDP GSO send. The same datagrams, counters and drops as
        :meth:`from_tun` per packet, routed once per run of one flow's packets."""
        out: list[tuple[tuple[str, int], bytes, int]] = []
        i = 0
        for n in offload.flow_runs(pkts):
            j = i + n
            if n == 1:
                one = self.from_tun(pkts[i], now)
                if one is not None:
                    out.append((*one, 0))
                i = j
                continue
            route = self._route(pkts[i], now, n)
            i, b = j, i
            if route is None:
                continue
            a, t = route
            s = a.session
            assert s is not None                      # _route checked it
            t.tx_bytes += sum(map(len, pkts[b:j]))
            if t.probe_addr is not None:    # rebinding: each datagram spends credit (rare)
                for pkt in pkts[b:j]:
                    dg = s.seal(TYPE_DATA, pkt, t.un_tid)
                    to = t.probe_addr if t.probe_addr is not None and \
                        self._spend(t, len(dg)) else t.remote
                    out.append((to, dg, 0))
                continue
            out += [(t.remote, data, size)
                    for data, size in sealed_runs(s, pkts, b, j, t.un_tid)]
        return out

    def from_tun_super(self, pkt: memoryview, gso_size: int, now: float
                       ) -> tuple[tuple[str, int], bytes, int] | None:
        """A TCP super-packet read from the TUN: one decision for all its segments ->
        (end point, their datagrams back to back, the size of each but the last), or
        None."""
        segs = offload.tso_split(pkt, gso_size)
        if not segs:
            self.drops["bad_offload"] += 1
            return None
        k = len(segs)
        route = self._route(pkt, now, k)
        if route is None:
            return None
        a, t = route
        inner = sum(map(len, segs))
        t.tx_bytes += inner
        data = a.session.seal_run(TYPE_DATA, segs, t.un_tid)  # type: ignore[union-attr]
        size = len(segs[0]) + (len(data) - inner) // k
        if t.probe_addr is not None and self._spend(t, len(data)):
            return t.probe_addr, data, size
        return t.remote, data, size

    def _route(self, pkt: bytes | memoryview, now: float, n: int
               ) -> tuple[Association, Tunnel] | None:
        """Step 1 of the downlink: the association (its session is set) and tunnel of
        ``pkt``, counting ``n`` packets."""
        key = flow_key(pkt, True)           # the uplink direction's key
        if key is None:
            self.drops["not_ipv4"] += n
            return None
        a = self.by_vipa.get(bytes(pkt[24:40] if key >= KEY6 else pkt[16:20]))
        if a is None:
            self.drops["no_association"] += n
            return None
        t = self.tunnels.by_tid.get(self.paft.down(key, now, n))    # no flow: tunnel id 0
        if t is None or t.state != "up":
            t = a.last_tunnel
            if t is None or t.state != "up" or t.tid not in self.tunnels.by_tid:
                self.drops["no_tunnel"] += n
                return None
        if a.session is None:
            self.drops["no_session"] += n
            return None
        t.tx_packets += n
        return a, t
