"""The mobile host's agent: a driver around the links, the forwarder and the seams.

Embeddable: :class:`Agent` takes its seams (a TUN, one path socket per
interface, a flow classifier), so tests run it over in-memory fakes and
``runtime.py`` runs it over the real ones.

The decisions live in pure cores; the agent carries them out:

* one :class:`link.Link` per (interface, peer) keeps that tunnel alive (handshake,
  association, setup, path validation, keepalives, probes, backoff; ``link.py`` has
  the state diagram). Links are added and removed at run time (:meth:`Agent.add_link`);
* the forwarder (``dataplane/forwarder.py``) moves packets and flows.

What is left here: demultiplexing datagrams to the forwarder or to a link, one timer
task that calls :meth:`link.Link.on_timer` at the earliest deadline of any link,
carrying out the links' actions (sends, sessions, tunnels up and down, flows moved
and announced to the anchor), link events, operator commands and status.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import math
import os
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from .config import AgentConfig, AnchorRef, Rule, format_host_port
from .dataplane.forwarder import AgentForwarder, FlowClass, UpLane
from .dataplane.io import FastUplink, Path, Tun, gro_reader
from .dataplane.packet import (
    TYPE_CONTROL,
    TYPE_COOKIE,
    TYPE_DATA,
    TYPE_HS_INIT,
    TYPE_HS_RESP,
    TYPE_PATH_CHALLENGE,
    TYPE_PATH_RESPONSE,
    TYPE_PING,
    TYPE_PONG,
    TYPE_RELAY,
)
from .ice.candidates import IceCandidate, TunnelSocket, gather
from .ice.checklist import Role as IceRole
from .ice.checklist import SendStun
from .ice.demux import is_stun
from .ice.driver import DirectPath, IcePeer, IcePhase, NoDirect, PairUp, SendSip
from .keys import public_of
from .link import (
    SIP_STATS,
    Action,
    Associated,
    Drop,
    DropSession,
    Env,
    Link,
    LinkConfig,
    LinkState,
    NewSession,
    Peer,
    PeerFound,
    PeerKind,
    Role,
    Send,
    Settled,
    TunnelDown,
    TunnelUp,
)
from .mesh import MeshDirectory, MeshPeer, is_relay_addr
from .paths import TICK, ProbeParams
from .resolve import Addrs, Endpoint, as_addrs
from .signalling import sip
from .tables import Flow, FlowKey, Tunnel, ip_str

__all__ = ["Agent", "IfaceSeam", "MoveError", "UsageError", "rule_classifier"]

log = logging.getLogger(__name__)
FLOW_IDLE = 600.0      # a flow silent this long is forgotten, as the anchor forgets its own
FLOW_SWEEP_EVERY = 60.0
HELD_PACKETS = 8       # first packets kept per mesh peer while its relay comes up
HELD_PEERS = 32
MAX_DIRECT = 8         # direct paths per mesh peer (ours per interface, and the peer's)
UNRESOLVED = ("0.0.0.0", 0)   # the address of an anchor whose name does not resolve yet

@dataclass
class IfaceSeam:
    """One access network as the agent sees it: its name, index and tunnel socket."""

    name: str
    index: int
    path: Path
    # the address families it reaches the Internet with (4, 6): an IPv6-only cellular
    # interface has {6} and a dual-stack socket; a link takes the anchor's address of the
    # first family both have, IPv4 first (see :meth:`Agent.addr_for`)
    families: frozenset[int] = frozenset({4})


def rule_classifier(rules: tuple[Rule, ...],
                    lookup_mark: Callable[[FlowKey], tuple[int, str] | None] | None,
                    fwmark: int, slots: Mapping[str, int] | None = None
                    ) -> Callable[[FlowKey], FlowClass]:
    """Classify a new flow: the conntrack mark if available (it covers uid/cgroup
    rules), else the first rule whose header fields match. ``slots``: rule name -> the
    number its ct marks carry (reload.py; default: the rule's position)."""
    by_index = {(slots or {}).get(r.name, r.index): r for r in rules}

    def classify_flow(key: FlowKey) -> FlowClass:
        app_src = ""
        if lookup_mark is not None:
            hit = lookup_mark(key)
            if hit is not None:
                mark, app_src = hit
                r = by_index.get((mark >> 16) - 1) if mark & 0xFFFF == fwmark else None
                if r is not None:
                    return FlowClass(r.name, r.via, r.anchor, app_src)
        for r in rules:
            if r.uid is None and r.cgroup is None and r.matches(key[0], key[2], key[3], key[4]):
                return FlowClass(r.name, r.via, r.anchor, app_src)
        return FlowClass("", (), None, app_src)

    return classify_flow


def _nowhere(data: bytes, addr: tuple[str, int]) -> None:
    """The send of a removed interface's place (nothing routes there any more)."""


def _nowhere_run(data: bytes, size: int, addr: tuple[str, int]) -> None:
    """As :func:`_nowhere`, for a run of datagrams."""


class UsageError(ValueError):
    """A command named something that does not exist (exit 2)."""


class MoveError(RuntimeError):
    """A move that cannot be done now (exit 1)."""


class Agent:
    def __init__(self, cfg: AgentConfig, *, tun: Tun, ifaces: list[IfaceSeam],
                 anchors: Mapping[str, Endpoint | Addrs | None],
                 classify_flow: Callable[[FlowKey], FlowClass],
                 clock: Callable[[], float] = time.monotonic,
                 wall_ns: Callable[[], int] = time.time_ns,
                 cgroup_of: Callable[[str], str | None] | None = None,
                 mesh_route: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.cgroup_of = cgroup_of
        self.link_up: dict[str, bool] = {i.name: True for i in ifaces}
        # interface entry -> the device behind it now (a pattern's match; None: none yet),
        # kept by the runtime's hotplug driver; shown by status
        self.devices: dict[str, str | None] = {i.name: i.name for i in ifaces}
        self.tun = tun
        self.ifaces = sorted(ifaces, key=lambda x: x.index)
        self._seam = {i.name: i for i in self.ifaces}
        # name -> resolved ((ip, port), ...) one per family, IPv4 first; None: its name
        # does not resolve yet, so it has no links (set_anchor_address adds them)
        self.anchors: dict[str, Addrs | None] = {
            a: None if addr is None else as_addrs(addr) for a, addr in anchors.items()}
        self.clock = clock
        self.fwd = AgentForwarder(cfg.vipa_fix, [i.name for i in self.ifaces], list(anchors),
                                  classify_flow, cfg.vipa6_fix, cfg.mtu or 0)
        self.fwd.to_tun = tun.write         # ICMPv6 Packet Too Big back to the sender
        self.drops = self.fwd.drops
        self.sip_stats: dict[str, int] = dict.fromkeys(SIP_STATS, 0)
        keys = {a.name: a.public_key for a in cfg.anchors}
        self.peers = {a: Peer(a, addr[0] if addr else UNRESOLVED, keys[a], self.fwd.links[a])
                      for a, addr in self.anchors.items()}
        self.link_cfg = LinkConfig(me=cfg.name, static=cfg.private_key,
                                   keepalive_s=cfg.keepalive_s,
                                   return_after_s=cfg.return_after_s,
                                   plaintext_data=cfg.plaintext_data,
                                   probe=ProbeParams(idle_max=cfg.keepalive_s))
        self.env = Env(new_index=self._new_index, wall_ns=wall_ns, random_bytes=os.urandom)
        self.links: dict[tuple[str, str], Link] = {}     # (interface, peer) -> link
        self._by_tid: dict[int, Link] = {}
        self._ready = asyncio.Event()     # every link up or past its first attempt
        self._kick = asyncio.Event()      # deadlines changed: the timer task looks again
        self._quiet = False               # some link's probe tick sleeps: wake it on traffic
        self._timer: asyncio.Task[None] | None = None
        self._rank_at = -math.inf          # next anchor ranking by RTT (one per probe tick)
        self._sweep_at = math.inf          # next sweep of idle flows (from start())
        # by socket index (an interface's ``index``: a reload adds new ones at the end
        # and leaves a removed one's place unused, see :meth:`add_iface`)
        self._at: dict[int, IfaceSeam] = {i.index: i for i in self.ifaces}
        self._sends: list[Callable[[bytes, tuple[str, int]], None]] = [
            i.path.sendto for i in self.ifaces]
        self._queues: list[Callable[[bytes, tuple[str, int]], None]] = [
            i.path.queue for i in self.ifaces]     # data: leaves at flush
        self._queues_run: list[Callable[[bytes, int, tuple[str, int]], None]] = [
            i.path.queue_run for i in self.ifaces]
        if UpLane is not None and not os.environ.get("UPMT_NO_LANE"):   # off: A/B, tests
            self.fwd.lane = UpLane(self.fwd, self._queues, self._queues_run)
        self._started = False
        # mesh (UPMT-DAM): other hosts of mesh anchors, one relay link per peer
        self.mesh = MeshDirectory(order=list(anchors))
        self.mesh_links: dict[str, Link] = {}             # peer key -> its link
        self.mesh_cfg = replace(self.link_cfg, plaintext_data=False)   # never readable
        self.mesh_route = mesh_route      # routes a mesh pool into the TUN (host set-up)
        self._routed: set[str] = set()
        try:                              # glare between two initiators: the lower key wins
            self.public_key = base64.b64decode(public_of(base64.b64encode(cfg.private_key)))
        except ValueError:
            self.public_key = b""
        self.fwd.mesh_miss = self._mesh_miss
        self.fwd.mesh_hold = self._mesh_hold
        self._held: dict[bytes, list[bytes]] = {}          # peer VIpA -> first packets
        self.ice: dict[str, IcePeer] = {}                  # peer key -> ICE with it
        self._direct_dead: list[str] = []                  # direct paths to forget
        self._direct_key = self.fwd.direct_peer            # direct record -> peer key
        self._path_link: dict[str, Link] = {}              # direct record -> its link
        # called with every action but sends, before it is carried out (api.py: events)
        self.observe: Callable[[Action, float], None] | None = None

    # -- data path callbacks -----------------------------------------------------------
    def _on_tun(self, pkt: bytes) -> None:
        out = self.fwd.from_tun(pkt, self.clock())
        if out is not None:
            self._queues[out[0]](out[2], out[1])

    def _on_super(self, pkt: memoryview, gso_size: int) -> None:
        out = self.fwd.from_tun_super(pkt, gso_size, self.clock())
        if out is not None:
            self._queues_run[out[0]](out[2], out[3], out[1])

    def _on_packets(self, pkts: list[bytes]) -> None:
        """One TUN wake-up's packets: routed once per run of one flow, each run sealed
        for one UDP GSO send."""
        now = self.clock()
        if self.fwd.lane is not None:       # learnt flows: compiled, the rest below
            pkts = self.fwd.lane.run(pkts, now)
            if not pkts:
                return
        self._python_packets(pkts, now)

    def _rest(self, pkts: list[bytes]) -> None:
        """What the compiled TUN reader's lane handed back: the Python path."""
        self._python_packets(pkts, self.clock())

    def _python_packets(self, pkts: list[bytes], now: float) -> None:
        for index, to, data, size in self.fwd.from_tun_many(pkts, now):
            if size:
                self._queues_run[index](data, size, to)
            else:
                self._queues[index](data, to)

    def _flush(self) -> None:
        """After each TUN read: what it became leaves together (one UDP GSO send), and
        what it wrote back to the TUN (an ICMPv6 Packet Too Big) goes now."""
        for i in self.ifaces:
            i.path.flush()
        self.tun.flush()
        if self._quiet:
            self._wake_quiet()

    def _path_flush(self) -> None:
        """After each burst of tunnel-socket reads: the TUN's writes go out merged."""
        self.tun.flush()
        if self._quiet:
            self._wake_quiet()

    def _wake_quiet(self) -> None:
        """Packets moved while some links' probe ticks slept (idle, nothing due before
        their next keepalive): tick them now, so a path that died while idle is noticed
        as fast as a busy one. One flag test per wake-up of the data path otherwise."""
        self._quiet = False
        now = self.clock()
        for link in self._all_links():
            link.wake_tick(now)
        self._kick.set()

    def _on_datagram_for(self, index: int) -> Callable[[bytes, tuple[str, int]], None]:
        fwd, tun, clock = self.fwd, self.tun, self.clock

        def on_datagram(data: bytes, src: tuple[str, int]) -> None:
            b0 = data[0] if len(data) >= 16 else 0
            if b0 == TYPE_DATA:
                pkt = fwd.from_path(index, data, src, clock())
                if pkt is not None:
                    tun.write(pkt)
            elif b0 == TYPE_CONTROL:
                opened = fwd.open(index, data, src)
                if opened is not None:
                    self._on_sip(opened[3], opened[1])
            elif b0 == TYPE_HS_RESP or b0 == TYPE_COOKIE:
                idx = int.from_bytes(data[4:8] if b0 == TYPE_COOKIE else data[8:12], "big")
                link = next((x for x in self.links.values() if idx and x.hs_index == idx),
                            None)
                if link is None:
                    fwd.drops["stray_handshake"] += 1
                else:
                    self._do(link.on_handshake(data, src, clock()))
            elif b0 == TYPE_PONG:
                pong = fwd.pong(index, data, src)
                link = self._by_tid.get(pong[0].tid) if pong is not None else None
                if link is not None and pong is not None:
                    link.on_pong(pong[1], clock())
                    if pong[0].tid in fwd.suspect:
                        self._direct_alive(pong[0])
            elif b0 == TYPE_RELAY:
                self._on_relay(index, data, src)
            elif b0 == TYPE_HS_INIT:
                self._direct_init(index, data, src)
            elif b0 == TYPE_PING or b0 == TYPE_PATH_RESPONSE:
                self._direct_datagram(index, data, src)
            elif b0 < 0x40 and is_stun(data):
                self._on_stun(index, data, src)
            elif b0 == TYPE_PATH_CHALLENGE:     # our NAT rebound: answer from this socket
                opened = fwd.open(index, data, src)
                link = self._by_tid.get(opened[1].tid) if opened is not None else None
                if link is not None and opened is not None:
                    self._do(link.on_path_challenge(opened[3], src, clock()))
            else:
                fwd.drops["junk"] += 1

        return on_datagram

    def _on_batch_for(self, index: int, on_datagram: Callable[[bytes, tuple[str, int]], None]
                      ) -> Callable[[bytes, int, tuple[str, int]], None]:
        fwd, clock = self.fwd, self.clock
        return gro_reader(lambda data, size, src: fwd.from_path_many(index, data, size, src,
                                                                     clock()),
                          self.tun.write, on_datagram)

    def _on_sip(self, data: bytes, t: Tunnel) -> None:
        """A sealed SIP message that came on tunnel ``t``: a response completes the
        transaction of the link that sent its request."""
        stats = self.sip_stats
        try:
            msg = sip.parse(data)
        except sip.MalformedSip:
            stats["malformed"] += 1
            return
        if not isinstance(msg, sip.SipResponse) or msg.status_code < 200:
            stats["stray"] += 1   # we serve no requests; provisional answers ignored
            return
        key = sip.transaction_key(msg)
        branch = key[0] if key else ""
        link = self._by_tid.get(t.tid)
        if link is None or not link.owns(branch):
            link = next((x for x in self.links.values() if x.owns(branch)), None)
        if link is None:
            stats["stray"] += 1
            return
        self._do(link.on_sip_response(msg, self.clock()))

    # -- carrying out what the links decide ----------------------------------------------
    def _do(self, actions: list[Action], at: float | None = None) -> None:
        """``at``: the ``now`` the link decided at (a timer fires for its deadline, maybe
        a hair before the clock reaches it); up-for times are measured there too, or a
        tunnel the link found settled could still miss return_after by a rounding error,
        and its flows would never come back (Settled comes once)."""
        now = self.clock() if at is None else at
        fwd = self.fwd

        def up_for(t: Tunnel) -> float:
            return self._up_for(t, now)

        observe = self.observe
        for a in actions:
            if observe is not None and not isinstance(a, Send):
                observe(a, now)              # the embedding API's events (api.py)
            if isinstance(a, Send):
                if is_relay_addr(a.addr):
                    self._relay_send(a)
                else:
                    self._sends[self._seam[a.iface].index](a.data, a.addr)
            elif isinstance(a, Drop):
                fwd.drops[a.reason] += 1
            elif isinstance(a, NewSession):
                fwd.add_session(a.peer, a.session)
            elif isinstance(a, DropSession):
                fwd.drop_session(a.index)
            elif isinstance(a, Associated):
                fwd.set_association(a.peer, a.vipa, a.role, a.serves, a.vipa6)
                self._mesh_pool(a.peer, a.mesh_pool)
            elif isinstance(a, PeerFound):
                self._peer_found(a, now)
            elif isinstance(a, (TunnelUp, TunnelDown, Settled)) and a.tunnel.tid == 0:
                self._sync_relays(now)           # a mesh peer's relay link
            elif isinstance(a, TunnelUp) and a.tunnel.peer in self._direct_key:
                fwd.tunnel_up(a.tunnel, a.un_tid, now)
                key = self._direct_key[a.tunnel.peer]
                moved = fwd.to_direct(key, now)
                log.info("mesh peer %s: direct path up via %s to %s:%d (%d flow(s) moved)",
                         key, a.tunnel.interface, *a.tunnel.remote, len(moved))
            elif isinstance(a, TunnelDown) and a.tunnel.peer in self._direct_key:
                fwd.tunnel_down(a.tunnel)
                key = self._direct_key[a.tunnel.peer]
                for d in self._paths_of(key):   # a silent death: its cause (the peer's NAT,
                    if d.tunnel is not a.tunnel and a.reason == "probe loss":   # the peer)
                        d.peer.suspect_at = now     # may have cut them too: they probe at
                        fwd.suspect.add(d.tunnel.tid)   # once, carry flows once they answer
                fwd.fail_over(a.tunnel, now, "direct path lost")
                ice = self.ice.get(key)
                if ice is not None and ice.checklist is not None:
                    ice.dead.add((a.tunnel.iface_index, a.tunnel.remote))
                left = [d for d in fwd.direct_of.get(key, ())
                        if d != a.tunnel.peer and d not in self._direct_dead]
                log.warning("mesh peer %s: direct path via %s lost (%s): %s", key,
                            a.tunnel.interface, a.reason,
                            "other direct paths remain" if left else "back to the relay")
                if not left and ice is not None:
                    ice.lost(now)
                self._direct_dead.append(a.tunnel.peer)
            elif isinstance(a, TunnelUp):
                fwd.tunnel_up(a.tunnel, a.un_tid, now)
                # flows without a working tunnel come at once; the others after return_after
                moved = fwd.restore_preferences(now, up_for, self.cfg.return_after_s)
                # and the flows it had are announced again: the anchor may have lost them
                # (it restarted), and a downlink-only flow would never tell it
                ids = {f.fid for f in moved}
                self.announce(moved + [f for f in fwd.paft.flows()
                                       if f.tunnel == a.tunnel.tid and f.fid not in ids])
                self._mesh_hops(a.tunnel.peer, now)
            elif isinstance(a, TunnelDown):
                fwd.tunnel_down(a.tunnel)
                self.announce(fwd.fail_over(a.tunnel, now, a.reason))
                self._mesh_hops(a.tunnel.peer, now)
            elif isinstance(a, Settled):
                self.announce(fwd.restore_preferences(now, up_for,
                                                      self.cfg.return_after_s))
        while self._direct_dead:
            self._drop_path(self._direct_dead.pop())
        if not self._ready.is_set() and all(x.tried for x in self.links.values()):
            self._ready.set()
        self._kick.set()

    async def _timers(self) -> None:
        """The one timer of all links: sleep until the earliest deadline (or until an
        event changed them), then call ``on_timer`` of every link that is due."""
        fired = -math.inf
        while True:
            # a timer may fire a hair before its deadline (the loop's clock resolution,
            # float rounding): it fired for ``due``, so ``due`` is reached
            now = max(self.clock(), fired)
            due = min((x.next_deadline() for x in self._all_links()), default=math.inf)
            due = min([due, self._sweep_at, *(i.next_deadline() for i in self.ice.values())])
            if due > now:
                self._kick.clear()
                try:
                    await asyncio.wait_for(self._kick.wait(), min(due - now, 60.0))
                except TimeoutError:
                    fired = due
                continue
            for link in list(self.links.values()):
                if link.next_deadline() <= now:
                    self._do(link.on_timer(now), now)
            if now >= self._rank_at:
                self._rank(now)
            if now >= self._sweep_at:
                self._sweep_at = now + FLOW_SWEEP_EVERY
                self.sweep(now)
            for key, ice in list(self.ice.items()):
                if ice.next_deadline() <= now and self.ice.get(key) is ice:
                    self._ice_do(key, ice.on_timer(now))
            for key, link in list(self.mesh_links.items()):
                if link.next_deadline() <= now and self.mesh_links.get(key) is link:
                    self._do(link.on_timer(now), now)
                    if link.state is LinkState.BACKOFF and key in self.mesh.by_key:
                        # no session: maybe another host has that VIpA now; ask again
                        self._remove_peer(self.mesh.by_key[key], "no session")
            self._quiet = any(link.quiet for link in self._all_links())

    def _rank(self, now: float) -> None:
        """Once per probe tick: new flows of rules without ``anchor`` go to the anchor
        with the best smoothed probe RTT (policy.HomeAnchor's hysteresis); existing flows
        keep theirs."""
        self._rank_at = now + TICK

        def rtt_of(t: Tunnel) -> float | None:
            link = self._by_tid.get(t.tid)
            m = link.monitor if link is not None else None
            return m.srtt if m is not None else None

        before = list(self.fwd.anchor_order)
        if before != self.fwd.rank_anchors(now, rtt_of):
            log.info("new flows go to anchor %s first (best RTT)", self.fwd.anchor_order[0])

    def _all_links(self) -> list[Link]:
        return [*self.links.values(), *self.mesh_links.values()]

    def _up_for(self, t: Tunnel, now: float) -> float:
        if t.vipa_peer:                  # a relay path: as long as its hop
            hop = self.fwd.by_path.get((t.interface, self.fwd.relay_anchor(t)))
            t = hop if hop is not None else t
        link = self._by_tid.get(t.tid)
        return link.up_for(now) if link is not None else 0.0

    def _new_index(self) -> int:
        pending = {x.hs_index for x in self._all_links()}
        while True:
            idx = secrets.randbits(32)
            if idx and idx not in self.fwd.sessions and idx not in pending:
                return idx

    # -- mesh peers (UPMT-DAM relay; mesh.py) --------------------------------------------
    def _mesh_pool(self, anchor: str, pool: str | None) -> None:
        """An association said whether ``anchor`` makes us a mesh host (and its pool)."""
        if pool is None:
            had = anchor in self.mesh.pools
            for p in self.mesh.drop_anchor(anchor):
                self._remove_peer(p, "anchor left the mesh")
            if had:      # a pool it displaced may be used now (config order first)
                for other in [a for a in self.mesh.order if a in self.mesh.refused]:
                    self._mesh_pool(other, str(self.mesh.offered[other]))
            return
        known = anchor in self.mesh.pools
        ok = self.mesh.set_pool(anchor, pool)
        while self.mesh.displaced:
            for p in self.mesh.drop_anchor(self.mesh.displaced.pop(), left=False):
                self._remove_peer(p, "its anchor's mesh pool overlaps another's")
        if not ok or known:
            return
        self.fwd.mesh_anchor_of = self.mesh.anchor_of
        log.info("anchor %s: mesh pool %s (its other hosts are reachable at their VIpAs)",
                 anchor, pool)
        if self.mesh_route is not None and pool not in self._routed:
            self._routed.add(pool)       # (routes stay until the stop; one per pool)
            self.mesh_route(pool)

    def _mesh_miss(self, vipa_b: bytes) -> None:
        """A new flow to a mesh address whose host is not known yet: ask its anchor."""
        now = self.clock()
        anchor = self.mesh.want(vipa_b, now)
        if anchor is not None:
            self._peer_request(anchor, vipa_b, now)

    def _mesh_hold(self, vipa_b: bytes, pkt: bytes) -> None:
        """Keep a few first packets of new flows to a peer whose relay is not up yet (a
        TCP SYN lost here would cost the application a second); sent when it is up,
        dropped (counted) when the lookup or the handshake fails."""
        held = self._held.get(vipa_b)
        if held is None and self.mesh.unknown.get(vipa_b, -1.0) > self.clock():
            self.drops["mesh_peer_pending"] += 1       # nobody there a moment ago
            return
        if held is None and len(self._held) < HELD_PEERS:
            held = self._held[vipa_b] = []
        if held is None or len(held) >= HELD_PACKETS:
            self.drops["mesh_peer_pending"] += 1
            return
        held.append(bytes(pkt))

    def _release(self, vipa_b: bytes, send: bool) -> None:
        held = self._held.pop(vipa_b, [])
        if not send:
            self.drops["mesh_peer_pending"] += len(held)
            return
        for pkt in held:
            self._on_tun(pkt)
        if held:
            self._flush()

    def _peer_request(self, anchor: str, vipa_b: bytes, now: float) -> None:
        link = next((x for (_i, a), x in self.links.items()
                     if a == anchor and x.state is LinkState.UP), None)
        if link is None:
            self.mesh.pending.pop(vipa_b, None)
            self.mesh.stash.pop(vipa_b, None)
            self.drops["mesh_no_anchor"] += 1
            self._release(vipa_b, False)
            return
        self._do(link.peer_request(ip_str(vipa_b), now))

    def _peer_found(self, a: PeerFound, now: float) -> None:
        try:
            vipa_b = ipaddress.IPv4Address(a.vipa).packed
        except ValueError:
            return
        stash = self.mesh.stash.pop(vipa_b, None)
        old = self.mesh.by_vipa.get(vipa_b)
        p = self.mesh.found(a.anchor, a.vipa, a.name, a.public_key, now)
        if old is not None and old is not p:
            self._remove_peer(old, "another host at its VIpA")
        if p is None:
            self._release(vipa_b, False)
            return
        link = self.mesh_links.get(p.key)
        if link is None:
            log.info("mesh peer %s: %s at anchor %s (relayed)", p.name, p.vipa, p.anchor)
            link = self._add_mesh_link(p, Role.INITIATOR if stash is None else Role.RESPONDER,
                                       now)
        if stash is not None:
            self._mesh_init(p.anchor, vipa_b, stash, now)

    def _add_mesh_link(self, p: MeshPeer, role: Role, now: float) -> Link:
        fwd = self.fwd
        rec = fwd.add_peer(p.key, p.anchor)
        peer = Peer(p.key, p.addr, p.public_key, rec, kind=PeerKind.AGENT)
        first = self.ifaces[0]
        ctl = Tunnel(0, first.name, first.path.local, p.addr, p.key, vipa_peer=p.vipa_b)
        link = Link(first.name, peer, ctl, self.mesh_cfg, self.env, self.sip_stats, role)
        self.mesh_links[p.key] = link
        for i in self.ifaces:          # one relay path per interface: rules' via apply
            fwd.add_tunnel(i.name, i.index, p.key, i.path.local, p.addr, now,
                           vipa_peer=p.vipa_b)
        fwd.mesh_dst[p.vipa_b] = p.key
        self._do(link.start(now, self._hop_up(p.anchor)))
        return link

    def _remove_peer(self, p: MeshPeer, why: str) -> None:
        log.info("mesh peer %s (%s at %s) forgotten: %s", p.name, p.vipa, p.anchor, why)
        self._release(p.vipa_b, False)
        ice = self.ice.pop(p.key, None)
        if ice is not None and ice.checklist is not None:
            self._ice_do(p.key, [SendSip(ice.bye())])
        self._drop_direct(p.key)
        link = self.mesh_links.pop(p.key, None)
        if link is not None:
            self._do(link.stop(self.clock()))
        self.fwd.remove_peer(p.key)
        self.mesh.forget(p)

    def _hop_up(self, anchor: str) -> bool:
        return any(self.fwd.usable(i.name, anchor) is not None for i in self.ifaces)

    def _mesh_hops(self, anchor: str, now: float) -> None:
        """An anchor tunnel went up or down: so may the relay links through that anchor."""
        if not self.mesh_links:
            return
        up = self._hop_up(anchor)
        for key, link in list(self.mesh_links.items()):
            p = self.mesh.by_key.get(key)
            if p is not None and p.anchor == anchor:
                self._do(link.on_link(up, now, "relay down"))
        self._sync_relays(now)

    def _sync_relays(self, now: float) -> None:
        """A relay path carries data while its peer's link is up and the anchor tunnel of
        its interface is: bring the paths up and down (their flows move) accordingly."""
        fwd = self.fwd
        came = False
        for key, link in self.mesh_links.items():
            p = self.mesh.by_key.get(key)
            if p is None:
                continue
            for i in self.ifaces:
                t = fwd.by_path.get((i.name, key))
                if t is None:
                    continue
                if link.state is LinkState.UP and key not in self.ice:
                    self._ice_for(p, now)
                want = link.state is LinkState.UP and fwd.usable(i.name, p.anchor) is not None
                if want and t.state != "up":
                    fwd.tunnel_up(t, 0, now)
                    came = True
                elif not want and t.state == "up":
                    fwd.tunnel_down(t)
                    fwd.fail_over(t, now, "relay down")
        if came:
            fwd.restore_preferences(now, lambda t: self._up_for(t, now),
                                    self.cfg.return_after_s)
            for key in list(self.mesh_links):
                p = self.mesh.by_key.get(key)
                if p is not None and p.vipa_b in self._held:
                    self._release(p.vipa_b, True)

    def _relay_send(self, a: Send) -> None:
        """A mesh link's datagram: wrapped in a RELAY datagram to the peer's anchor, through
        the link's interface if its anchor tunnel is up, else any up one."""
        p = self.mesh.by_key.get(a.addr[0])
        if p is None:
            return
        fwd = self.fwd
        names = [a.iface] + [i.name for i in self.ifaces if i.name != a.iface]
        hop = next((t for n in names if (t := fwd.usable(n, p.anchor)) is not None), None)
        s = fwd.links[p.anchor].session
        if hop is None or s is None:
            fwd.drops["relay_down"] += 1
            return
        hop.tx_packets += 1
        self._sends[hop.iface_index](s.seal(TYPE_RELAY, p.vipa_b + a.data, hop.un_tid),
                                     hop.remote)

    def _on_relay(self, index: int, data: bytes, src: tuple[str, int]) -> None:
        """A RELAY datagram from an anchor: the datagram inside is a mesh peer's, handled
        as if it came from that peer (data, handshake, validation, probes)."""
        now = self.clock()
        got = self.fwd.from_relay(index, data, src, now)
        if got is None:
            return
        anchor, vipa_b, inner = got
        p = self.mesh.by_vipa.get(vipa_b)
        if p is not None and p.anchor != anchor:
            self.drops["relay_wrong_anchor"] += 1
            return
        b0 = inner[0]
        if b0 == TYPE_HS_INIT:
            self._mesh_init(anchor, vipa_b, inner, now)
            return
        if p is None:
            self.drops["relay_unknown_peer"] += 1
            return
        if b0 == TYPE_DATA:
            pkt = self.fwd.relay_data(index, p.key, inner, now)
            if pkt is not None:
                self.tun.write(pkt)
            return
        if b0 == TYPE_CONTROL:
            self._mesh_sip(p, inner, now)
            return
        link = self.mesh_links.get(p.key)
        if link is None:
            self.drops["relay_unknown_peer"] += 1
            return
        self._do(link.on_datagram(inner, p.addr, now))

    def _mesh_init(self, anchor: str, vipa_b: bytes, init: bytes, now: float) -> None:
        """A handshake initiation from the host at ``vipa_b`` of ``anchor``: answered once
        the anchor vouched for its key (a PeerReq first if that host is not known)."""
        if self.mesh.anchor_of(vipa_b) != anchor:
            self.drops["relay_not_mesh"] += 1
            return
        p = self.mesh.by_vipa.get(vipa_b)
        if p is None:
            ask = self.mesh.want(vipa_b, now)
            if vipa_b in self.mesh.pending:
                self.mesh.stash[vipa_b] = init     # one per host: the newest
            if ask is not None:
                self._peer_request(ask, vipa_b, now)
            return
        link = self.mesh_links.get(p.key)
        if link is not None and link.role is Role.INITIATOR:
            # both ends initiated: the end with the lower public key stays the initiator
            if self.public_key < p.public_key:
                self.drops["handshake_glare"] += 1
                return
            self._do(link.stop(now))
            del self.mesh_links[p.key]
            link = None
        if link is None:
            link = self._add_mesh_link(p, Role.RESPONDER, now)
        self._do(link.on_handshake(init, p.addr, now))

    # -- direct paths to mesh peers (ICE; ice/driver.py) ----------------------------------
    def _ice_for(self, p: MeshPeer, now: float) -> IcePeer:
        ice = self.ice.get(p.key)
        if ice is not None:
            return ice
        link = self.mesh_links[p.key]
        ice = IcePeer(me=self.cfg.name, controlling=link.role is Role.INITIATOR,
                      enabled=self.cfg.direct,
                      local=lambda: self._candidates(p.anchor),
                      my_vipa=self.fwd.links[p.anchor].vipa, my_key=self.public_key,
                      peer_vipa=p.vipa, peer_key=p.public_key)
        self.ice[p.key] = ice
        self._ice_do(p.key, ice.start(now))
        return ice

    def _candidates(self, anchor: str) -> tuple[IceCandidate, ...]:
        """Each tunnel socket's address and what the anchor saw of it (server reflexive).
        IPv4 only for now: an IPv6-only interface offers no candidate (its mesh traffic
        goes through the relay)."""
        socks = []
        for i in self.ifaces:
            if ":" in i.path.local[0]:
                continue
            link = self.links.get((i.name, anchor))
            seen = link.seen_as if link is not None else None
            socks.append(TunnelSocket(i.index, i.name, i.path.local, seen))
        return gather(socks)

    def _ice_do(self, key: str, actions: list[Any]) -> None:
        p = self.mesh.by_key.get(key)
        if p is None:
            return
        for a in actions:
            if isinstance(a, SendSip):
                s = self.fwd.links[key].session if key in self.fwd.links else None
                if s is not None:
                    self._relay_send(Send(self.ifaces[0].name, s.seal(TYPE_CONTROL, a.data),
                                          p.addr))
            elif isinstance(a, SendStun):
                if 0 <= a.socket_id < len(self._sends):
                    self._sends[a.socket_id](a.data, a.addr)
            elif isinstance(a, DirectPath):
                self._direct(p, a, self.clock())
            elif isinstance(a, NoDirect):
                ice = self.ice.get(key)
                if ice is None or ice.phase is not IcePhase.FAILED:
                    self._drop_direct(key)     # BYE, declined: not a failed retry
            elif isinstance(a, PairUp):
                self._fill_direct(p, self.clock())   # maybe a socket without a direct path

    def _mesh_sip(self, p: MeshPeer, inner: bytes, now: float) -> None:
        """A SIP message the peer sealed end to end (the rendezvous): to its ICE."""
        hit = self.fwd.sessions.get(int.from_bytes(inner[4:8], "big"))
        opened = hit[1].open(inner) if hit is not None and hit[0].name == p.key else None
        if opened is None or p.key not in self.mesh_links:
            self.drops["bad_packet"] += 1
            return
        self._ice_do(p.key, self._ice_for(p, now).on_sip(opened[1], now))

    def _on_stun(self, index: int, data: bytes, src: tuple[str, int]) -> None:
        now = self.clock()
        running = [(k, i) for k, i in self.ice.items() if i.checklist is not None]
        if not running:
            self.drops["stray_stun"] += 1
        for key, ice in running:
            self._ice_do(key, ice.on_stun(data, index, src, now))

    def _direct(self, p: MeshPeer, a: DirectPath, now: float) -> None:
        """Both ends selected a pair: a direct path there (the ICE controlling end
        initiates, the other answers), then one on each other interface that reaches the
        peer (:meth:`_fill_direct`)."""
        ice = self.ice.get(p.key)
        if a.socket_id not in self._at or ice is None:
            return
        role = Role.INITIATOR if ice.role is IceRole.CONTROLLING else Role.RESPONDER
        self._add_direct(p, a.socket_id, a.remote, role, now)
        self._fill_direct(p, now)

    def _paths_of(self, key: str) -> list[Link]:
        """The direct paths' links of mesh peer ``key``."""
        return [self._path_link[d] for d in self.fwd.direct_of.get(key, ())
                if d in self._path_link]

    def _fill_direct(self, p: MeshPeer, now: float) -> None:
        """Once ICE selected, each interface of ours without a direct path to ``p`` gets
        one where a check succeeded (its best pair): we open it, the peer answers it
        (ICE saw our checks from there). So a flow moved to another interface (a rule's
        ``via``, ``move``, a handover) stays direct. At most one per interface of ours
        that we open; the peer's own interfaces are its to fill."""
        ice = self.ice.get(p.key)
        cl = ice.checklist if ice is not None else None
        if ice is None or cl is None or ice.phase is not IcePhase.SELECTED:
            return
        have = {link.iface for link in self._paths_of(p.key)}
        for sid, remote in cl.valid().items():
            if sid in self._at and self._at[sid].name not in have \
                    and (sid, remote) not in ice.dead:
                self._add_direct(p, sid, remote, Role.INITIATOR, now)

    def _add_direct(self, p: MeshPeer, sid: int, remote: tuple[str, int], role: Role,
                    now: float) -> Link | None:
        """A direct path to ``p`` from socket ``sid`` to ``remote``: its own record,
        Noise session and tunnel, validated (PATH_CHALLENGE) before it carries data."""
        seam = self._at.get(sid)
        if seam is None:
            return None
        dkey = f"{p.key}~{seam.name}~{remote[0]}:{remote[1]}"
        old = self.links.get((seam.name, dkey))
        if old is not None:
            return old
        paths = self.fwd.direct_of.setdefault(p.key, [])
        if len(paths) >= MAX_DIRECT:
            self.drops["direct_path_cap"] += 1
            return None
        rec = self.fwd.add_peer(dkey, p.anchor)
        peer = Peer(dkey, remote, p.public_key, rec, kind=PeerKind.AGENT)
        t = self.fwd.add_tunnel(seam.name, seam.index, dkey, seam.path.local, remote, now)
        link = Link(seam.name, peer, t, self.mesh_cfg, self.env, self.sip_stats, role)
        self.peers[dkey] = peer
        self.links[(seam.name, dkey)] = link
        self._by_tid[t.tid] = link
        self._direct_key[dkey] = p.key
        self._path_link[dkey] = link
        paths.append(dkey)
        log.info("mesh peer %s: direct path %s -> %s:%d (%s), validating", p.key,
                 seam.name, *remote, role.value)
        self._do(link.start(now, self.link_up[seam.name]))
        return link

    def _direct_alive(self, t: Tunnel) -> None:
        """A suspect direct path (another to its peer died) answered a probe: it carries
        flows again, and the peer's flows that went to the relay meanwhile come back."""
        self.fwd.suspect.discard(t.tid)
        key = self._direct_key.get(t.peer)
        if key is not None and t.state == "up":
            moved = self.fwd.to_direct(key, self.clock())
            if moved:
                log.info("mesh peer %s: direct path via %s still answers: %d flow(s) back",
                         key, t.interface, len(moved))

    def _drop_direct(self, key: str) -> None:
        """Forget every direct path to ``key`` (on purpose: their flows go to the relay
        as from any removed link, and ICE is not told they were lost)."""
        for dkey in list(self.fwd.direct_of.get(key, ())):
            self._drop_path(dkey)
        self.fwd.direct_of.pop(key, None)

    def _drop_path(self, dkey: str) -> None:
        """Forget one direct path (its flows move to the next path of their peer)."""
        key = self._direct_key.pop(dkey, None)
        if key is None:
            return
        paths = self.fwd.direct_of.get(key, [])
        if dkey in paths:
            paths.remove(dkey)
        link = self._path_link.pop(dkey, None)
        if link is not None:
            self.fwd.suspect.discard(link.tunnel.tid)
            del self.links[(link.iface, dkey)]
            self._by_tid.pop(link.tunnel.tid, None)
            self._do(link.stop(self.clock()))
        self.fwd.remove_peer(dkey)
        self.peers.pop(dkey, None)

    def _direct_init(self, index: int, data: bytes, src: tuple[str, int]) -> None:
        """An HS_INIT on a tunnel socket: a direct path's answering end takes it, the
        one of that address, else a new one if a mesh peer's ICE proved that address on
        this socket (the peer opens a direct path from another interface of its own);
        an initiation that crosses one of ours to the same address: the lower public
        key stays the initiator (as on the relay)."""
        seam = self._at.get(index)
        iface = seam.name if seam is not None else ""
        now = self.clock()
        mine = [x for (i, k), x in self.links.items()
                if i == iface and k in self._direct_key and x.tunnel.remote == src]
        for link in mine:
            if link.role is Role.INITIATOR and link.state is not LinkState.UP:
                p = self.mesh.by_key.get(self._direct_key[link.peer.name])
                if p is None or self.public_key < p.public_key:
                    self.drops["handshake_glare"] += 1
                    return
                self._drop_path(link.peer.name)        # the peer's initiation wins
                mine = []
                break
        cands = [x for x in mine if x.role is Role.RESPONDER]
        if not cands:
            for key, ice in self.ice.items():
                p = self.mesh.by_key.get(key)
                if p is not None and ice.checklist is not None \
                        and ice.checklist.reaches(index, src):
                    new = self._add_direct(p, index, src, Role.RESPONDER, now)
                    if new is not None:
                        cands.append(new)
        if not cands:        # the selected pair's answering end, the peer's address changed
            cands = [x for (i, k), x in self.links.items()
                     if i == iface and k in self._direct_key and x.role is Role.RESPONDER
                     and x.state is not LinkState.UP]
        for link in cands:
            acts = link.on_handshake(data, src, now)
            if not any(isinstance(x, Drop) for x in acts):
                self._do(acts)
                return
        self.drops["stray_handshake"] += 1

    def _direct_datagram(self, index: int, data: bytes, src: tuple[str, int]) -> None:
        """PING or PATH_RESPONSE: for a direct path's link (its session says which)."""
        hit = self.fwd.sessions.get(int.from_bytes(data[4:8], "big"))
        seam = self._at.get(index)
        iface = seam.name if seam is not None else ""
        link = self.links.get((iface, hit[0].name)) if hit is not None else None
        if link is None or link.peer.kind is not PeerKind.AGENT:
            self.drops["junk"] += 1
            return
        self._do(link.on_datagram(data, src, self.clock()))

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        lane = self.fwd.lane
        self.tun.start(self._on_tun, self._flush, self._on_super, self._on_packets,
                       None if lane is None else FastUplink(lane, self.clock, self, self._rest))
        self._started = True
        for i in self.ifaces:
            self._start_path(i)
        self._sweep_at = self.clock() + FLOW_SWEEP_EVERY
        self._timer = asyncio.create_task(self._timers())
        for a, addr in self.anchors.items():
            if addr is not None:
                self._add_links(a)
        if not self.links:
            self._ready.set()

    def sweep(self, now: float) -> int:
        """Forget the flows silent for :data:`FLOW_IDLE` (and the lane's routes for them):
        how many. Without it the PAFT only grew, and after 100 000 flows (a long uptime)
        every new flow was refused (``paft_full``). A flow forgotten here and seen again
        is a new flow: its rule places it again, and the anchor, which forgets its own
        after as long, follows it."""
        n = self.fwd.paft.expire(now, FLOW_IDLE)
        if n and self.fwd.lane is not None:
            self.fwd.lane.prune()
        return n

    def _start_path(self, i: IfaceSeam) -> None:
        on_datagram = self._on_datagram_for(i.index)
        i.path.start(on_datagram, self._path_flush, self._on_batch_for(i.index, on_datagram))

    def add_iface(self, seam: IfaceSeam, usable: bool = False) -> None:
        """``reload``: a new access interface (its socket index never used before in
        this run). Its socket starts reading now; its links to every anchor start (down
        while ``usable`` is False: the driver says :meth:`on_link` once its device is up),
        and it carries a relay path to each mesh peer."""
        if seam.name in self._seam or seam.index in self._at:
            raise UsageError(f"interface {seam.name!r} exists")
        self.ifaces.append(seam)
        self._seam[seam.name], self._at[seam.index] = seam, seam
        self.link_up[seam.name] = usable
        self.devices.setdefault(seam.name, None)
        fwd = self.fwd
        while len(fwd.interfaces) <= seam.index:     # index -> name; "" for unused places
            fwd.interfaces.append("")
            self._sends.append(_nowhere)
            self._queues.append(_nowhere)
            self._queues_run.append(_nowhere_run)
        fwd.interfaces[seam.index] = seam.name
        self._sends[seam.index] = seam.path.sendto
        self._queues[seam.index] = seam.path.queue
        self._queues_run[seam.index] = seam.path.queue_run
        if not self._started:
            return
        self._start_path(seam)
        now = self.clock()
        for key in self.mesh_links:
            p = self.mesh.by_key.get(key)
            if p is not None:
                fwd.add_tunnel(seam.name, seam.index, key, seam.path.local, p.addr, now,
                               vipa_peer=p.vipa_b)
        for a, addr in self.anchors.items():
            if addr is not None and self.addr_for(seam.name, a) is not None:
                self.add_link(seam.name, a)
        log.info("interface %s added", seam.name)

    def remove_iface(self, name: str) -> IfaceSeam | None:
        """``reload``: interface ``name`` is no longer used. Its flows move first (as on
        a link down: to the next interface of their rule's ``via``, else any), then its
        links stop (closing their tunnels), its direct and relay paths go, and a
        ``move`` preference for it is forgotten. Returns its seam (the caller closes the
        socket), None when there was none."""
        seam = self._seam.get(name)
        if seam is None:
            return None
        self.on_link(name, False, "interface removed")
        for (iface, peer) in [k for k in self.links if k[0] == name]:
            if peer in self._path_link:
                self._drop_path(peer)
            else:
                self.remove_link(iface, peer)
        fwd = self.fwd
        for key in list(self.mesh_links):
            t = fwd.by_path.get((name, key))
            if t is not None:
                fwd.remove_tunnel(t)
        for rule, (iface, _a) in list(fwd.prefer.items()):
            if iface == name:
                del fwd.prefer[rule]
        self.ifaces.remove(seam)
        del self._seam[name], self._at[seam.index], self.link_up[name]
        self.devices.pop(name, None)
        fwd.interfaces[seam.index] = ""
        self._sends[seam.index] = _nowhere
        self._queues[seam.index] = _nowhere
        self._queues_run[seam.index] = _nowhere_run
        if not self._ready.is_set() and all(x.tried for x in self.links.values()):
            self._ready.set()
        log.info("interface %s removed", name)
        return seam

    def add_link(self, iface: str, peer: str, role: Role = Role.INITIATOR) -> Link:
        """Keep a tunnel through ``iface`` to ``peer`` from now on (it starts at once)."""
        seam = self._seam.get(iface)
        p = self.peers.get(peer)
        if seam is None or p is None:
            raise UsageError(f"no interface {iface!r} or no peer {peer!r}")
        link = self.links.get((iface, peer))
        if link is not None:
            return link
        now = self.clock()
        addr = self.addr_for(iface, peer) or p.addr
        t = self.fwd.add_tunnel(iface, seam.index, peer, seam.path.local, addr, now)
        link = Link(iface, p, t, self.link_cfg, self.env, self.sip_stats, role, addr)
        self.links[(iface, peer)] = link
        self._by_tid[t.tid] = link
        self._do(link.start(now, self.link_up[iface]))
        return link

    def addr_for(self, iface: str, anchor: str) -> tuple[str, int] | None:
        """The anchor's address that ``iface`` reaches it at: of the first family (IPv4
        first) that both have; None when they share none (an IPv6-only interface and an
        anchor without an IPv6 address: no link there)."""
        seam, addrs = self._seam.get(iface), self.anchors.get(anchor)
        if seam is None or not addrs:
            return None
        return next((a for a in addrs if (6 if ":" in a[0] else 4) in seam.families), None)

    def _add_links(self, anchor: str) -> None:
        for i in self.ifaces:
            if self.addr_for(i.name, anchor) is not None:
                self.add_link(i.name, anchor)
            else:
                fams = " or ".join(f"IPv{f}" for f in sorted(i.families))
                log.warning("anchor %s has no %s address for interface %s: no tunnel there",
                            anchor, fams, i.name)

    def set_anchor_address(self, name: str, addr: Endpoint | Addrs) -> None:
        """Anchor ``name``'s name resolved (first time: its links start now) or now
        resolves elsewhere (its links take the new address: an UP one probes it at once,
        the same anchor keeps the association, another one fails the probes and the links
        associate again as after a restart; one still trying tries there at once).
        ``addr``: one address, or one per family."""
        addrs = as_addrs(addr)
        if name not in self.anchors or self.anchors[name] == addrs:
            return
        first = self.anchors[name] is None
        self.anchors[name] = addrs
        p = self.peers[name]
        p.addr = addrs[0]
        if first:
            self._add_links(name)
            return
        log.info("anchor %s moved to %s", name,
                 " and ".join(format_host_port(*a) for a in addrs))
        now = self.clock()
        for (iface, peer), link in list(self.links.items()):
            if peer == name:
                new = self.addr_for(iface, name)
                if new is None or new == link.remote:
                    continue        # this family's address did not change (or is gone)
                link.addr = link.tunnel.remote = new
                self._do(link.on_peer_moved(now))
        for i in self.ifaces:       # a family the anchor did not have before
            if (i.name, name) not in self.links and self.addr_for(i.name, name) is not None:
                self.add_link(i.name, name)

    def set_rules(self, cfg: AgentConfig, classify: Callable[[FlowKey], FlowClass]) -> None:
        """``reload``: new flows are classified by ``classify`` (``cfg``'s rules) from now
        on. Existing flows keep what they were given (rule name, interface preference,
        anchor) until they end; a ``move --rule`` preference of a removed rule is
        forgotten."""
        self.cfg = cfg
        self.fwd.classify = classify
        names = {r.name for r in cfg.rules}
        for rule in [r for r in self.fwd.prefer if r not in names]:
            del self.fwd.prefer[rule]

    def add_anchor(self, ref: AnchorRef, addr: Endpoint | Addrs | None) -> None:
        """``reload``: a new anchor; its links start now (or when its name resolves:
        :meth:`set_anchor_address`)."""
        if ref.name in self.anchors:
            raise UsageError(f"anchor {ref.name!r} exists")
        self.anchors[ref.name] = None
        rec = self.fwd.add_anchor(ref.name)
        self.peers[ref.name] = Peer(ref.name, UNRESOLVED, ref.public_key, rec)
        if addr is not None:
            self.set_anchor_address(ref.name, addr)

    def remove_anchor(self, name: str) -> None:
        """``reload``: anchor ``name`` is no longer used: its links stop (closing its
        tunnels), its flows end (their public address was that anchor's), and so does
        the mesh through it."""
        if name not in self.anchors:
            return
        for p in self.mesh.drop_anchor(name):
            self._remove_peer(p, "its anchor was removed")
        for iface, peer in list(self.links):
            if peer == name:
                self.remove_link(iface, peer)
        self.fwd.remove_anchor(name)
        del self.anchors[name], self.peers[name]
        if not self._ready.is_set() and all(x.tried for x in self.links.values()):
            self._ready.set()
        log.info("anchor %s removed", name)

    def remove_link(self, iface: str, peer: str) -> None:
        """Stop keeping that tunnel: it goes down now (its flows move) and is forgotten."""
        link = self.links.get((iface, peer))
        if link is None:
            return
        self._do(link.stop(self.clock()))
        del self.links[(iface, peer)]
        del self._by_tid[link.tunnel.tid]
        self.fwd.remove_tunnel(link.tunnel)

    async def wait_ready(self) -> None:
        """Every (interface, anchor) tunnel is up or failed its first attempt."""
        await self._ready.wait()

    async def stop(self) -> None:
        for key, ice in list(self.ice.items()):     # BYE: the peers stop checking at once
            if ice.checklist is not None:
                self._ice_do(key, [SendSip(ice.bye())])
        # Cancel the timer task until it ends: Python 3.11's ``wait_for`` swallows a
        # cancellation that lands as the event it waits for is set (gh-86296), and an
        # event (any link action kicks it) right before a stop would leave it running and
        # the stop waiting forever.
        t = self._timer
        if t is not None:
            while not t.done():
                t.cancel()
                await asyncio.wait({t}, timeout=0.1)
            self._timer = None
        self.tun.close()
        for i in self.ifaces:
            i.path.close()

    # -- link events -------------------------------------------------------------------
    def on_link(self, name: str, usable: bool, why: str = "link down") -> None:
        """Call when an access interface became unusable (no carrier, no address) or usable
        again (its route re-made): its tunnels go down and their flows move at once, or
        its tunnels are retried at once."""
        if name not in self.link_up or self.link_up[name] == usable:
            return
        self.link_up[name] = usable
        if usable:
            log.info("link %s back up", name)
        now = self.clock()
        for (iface, _peer), link in list(self.links.items()):
            if iface == name:
                self._do(link.on_link(usable, now, why))
        if usable:
            self._ice_restart(name, now)

    def path_changed(self, name: str) -> None:
        """Same link, new address or gateway (so a new NAT mapping): probe its tunnels now
        (the anchor follows the new mapping after a challenge) and retry down ones now."""
        now = self.clock()
        for (iface, _peer), link in list(self.links.items()):
            if iface == name:
                self._do(link.on_path_changed(now))
        self._ice_restart(name, now)

    def _ice_restart(self, name: str, now: float) -> None:
        """Interface ``name`` came back or its NAT mapping may have changed: new
        candidates, so a re-INVITE (ICE restart) to each peer, from either end (crossing
        offers: ice/driver.py). Direct paths that work stay up meanwhile; the restart's
        checks give ``name`` its own again."""
        for key, ice in list(self.ice.items()):
            if not ice.enabled or ice.phase is IcePhase.DECLINED:
                continue
            out: list[Any] = []
            ice.restart(now, out)
            self._ice_do(key, out)

    # -- operator commands ---------------------------------------------------------------
    def move(self, *, via: str, rule: str | None = None, flow: int | None = None,
             anchor: str | None = None) -> int:
        """Explicit handover (``upmt-agent move``): returns how many flows moved now.
        UsageError for names that do not exist; MoveError when the path is not usable.
        The anchor follows each moved flow by itself on its next uplink packet."""
        names = [i.name for i in self.ifaces]
        if via not in names:
            raise UsageError(f"no interface {via!r} (this agent uses {', '.join(names)})")
        if anchor is not None and anchor not in self.anchors:
            raise UsageError(f"no anchor {anchor!r}")
        now = self.clock()
        if rule is not None:
            if rule not in {r.name for r in self.cfg.rules}:
                raise UsageError(f"no rule {rule!r}")
            moved = self.fwd.move_rule(rule, via, anchor, now)
            self.announce(moved)
            return len(moved)
        f = self.fwd.paft.by_id.get(flow if flow is not None else -1)
        if f is None:
            raise UsageError(f"no flow {flow} (see upmt-agent status)")
        before = f.tunnel
        if not self.fwd.move_one(f, via, now):
            raise MoveError(f"interface {via} has no usable tunnel to anchor {f.anchor}")
        if f.tunnel != before:
            self.announce([f])
        return 1

    def announce(self, flows: list[Flow]) -> None:
        """Tell each anchor, through the flows' new tunnel, that they moved (HandoverReq):
        a flow that sends nothing upstream gives the anchor nothing to learn from."""
        by_tunnel: dict[int, list[Flow]] = {}
        for f in flows:
            by_tunnel.setdefault(f.tunnel, []).append(f)
        for tid, group in by_tunnel.items():
            t = self.fwd.tunnels.get(tid)
            if t is None or t.state != "up":
                continue
            link = self._by_tid.get(tid)
            if link is None:
                continue
            peer = self.fwd.links[t.peer]
            # each flow under the VIpA of its family (an IPv6 flow under the IPv6 one)
            keyed = [(peer.vipa6 if len(f.key[2]) == 16 else peer.vipa, f) for f in group]
            keyed = [(v, f) for v, f in keyed if v]
            for n in range(0, len(keyed), 64):
                items = [[f.key[0], vipa, ip_str(f.key[2]), f.key[3], f.key[4]]
                         for vipa, f in keyed[n:n + 64]]
                self._do(link.handover(items, self.clock()))

    async def control(self, req: dict[str, Any]) -> dict[str, Any] | None:
        """Agent-specific control commands; None: not one of ours."""
        if req.get("cmd") == "cgroup":
            rule = req.get("rule")
            if rule not in {r.name for r in self.cfg.rules}:
                return {"ok": False, "usage": True, "error": f"no rule {rule!r}"}
            path = self.cgroup_of(str(rule)) if self.cgroup_of is not None else None
            if path is None:
                return {"ok": False, "error": "per-program steering needs cgroup v2"}
            return {"ok": True, "path": path}
        if req.get("cmd") != "move":
            return None
        try:
            flow = req.get("flow")
            moved = self.move(via=str(req.get("via")), rule=req.get("rule"),
                              flow=int(flow) if flow is not None else None,
                              anchor=req.get("anchor"))
        except UsageError as e:
            return {"ok": False, "usage": True, "error": str(e)}
        except (MoveError, ValueError, TypeError) as e:
            return {"ok": False, "error": str(e)}
        return {"ok": True, "moved": moved}

    # -- status ------------------------------------------------------------------------
    def _iface_of(self, tid: int | None) -> str | None:
        t = self.fwd.tunnels.get(tid) if tid is not None else None
        return t.interface if t is not None else None

    def tunnel_json(self, t: Tunnel, now: float) -> dict[str, Any]:
        j = t.json()
        if t.vipa_peer:
            j["remote"] = f"relay via {self.fwd.relay_anchor(t)}"
        link = self._by_tid.get(t.tid)
        m = link.monitor if link is not None else None
        if m is not None:
            if m.srtt is not None:
                j["rtt_ms"] = round(m.srtt * 1000.0, 3)     # from the probes
            loss = m.loss()
            j["probe"] = {"every_s": m.interval, "loss": None if loss is None else round(loss, 3),
                          "silent_s": round(now - m.last_rx, 3),
                          "up_for_s": round(now - m.started, 1)}
        return j

    def flow_json(self, f: Flow) -> dict[str, Any]:
        t = self.fwd.tunnels.get(f.tunnel)
        j = f.json(self.clock(), t.interface if t else None, self._iface_of)
        j.update(rule=f.rule, anchor=f.anchor)
        p = self.mesh.by_key.get(f.anchor)
        if p is not None:
            j.update(anchor=p.anchor, peer=p.name)
        if f.app_src:
            j["src"] = f.app_src       # the application's own source, before the SNAT
        return j

    def status(self) -> dict[str, Any]:
        return {
            "vipa_fix": self.cfg.vipa_fix,
            "vipa6_fix": self.fwd.vipa6_fix or None,
            "name": self.cfg.name,
            "anchors": [{"name": a, "address": None if addr is None
                         else " ".join(format_host_port(*x) for x in addr),
                         "state": "unresolved" if addr is None else self.peers[a].state.value,
                         "vipa": self.fwd.links[a].vipa or None,
                         "vipa6": self.fwd.links[a].vipa6 or None,
                         "role": self.fwd.links[a].role,
                         **({"mesh": m} if (m := self.mesh.mesh_state(a)) else {})}
                        for a, addr in self.anchors.items()],
            "interfaces": [{"name": i.name, "device": self.devices.get(i.name),
                            "up": self.link_up[i.name]} for i in self.ifaces],
            "tunnels": [self.tunnel_json(t, self.clock()) for t in self.fwd.tunnels.tunnels()],
            "flows": [self.flow_json(f) for f in self.fwd.paft.flows()],
            "peers": self.peers_json(),
            "drops": dict(self.drops),
            # the compiled uplink: packets it carried, routes it holds (None: not in use)
            "lane": None if self.fwd.lane is None else {
                "packets": self.fwd.lane.hits, "flows": len(self.fwd.lane)},
            "signalling": dict(self.sip_stats),
            "flows_created": self.fwd.paft.flows_created,
            "handovers": dict(self.fwd.paft.handovers),
        }


    def peers_json(self) -> list[dict[str, Any]]:
        """The mesh peers: how each is reached now (SPEC "Added": ``peers``), and
        ``paths``: every path to it (the relay per interface, each direct path)."""
        out = []
        for key, link in self.mesh_links.items():
            p = self.mesh.by_key.get(key)
            if p is None:
                continue
            up = [t for i in self.ifaces
                  if (t := self.fwd.by_path.get((i.name, key))) is not None and t.state == "up"]
            m = link.monitor
            addrs = self.anchors.get(p.anchor)
            relay_remote = format_host_port(*addrs[0]) if addrs else None
            remote = relay_remote
            rtt = m.srtt if m is not None else None
            paths: list[dict[str, Any]] = []
            for i in self.ifaces:
                t = self.fwd.by_path.get((i.name, key))
                if t is not None:
                    paths.append({"path": "relay", "interface": i.name, "remote": relay_remote,
                                  "state": t.state,
                                  "rtt_ms": None if rtt is None else round(rtt * 1000.0, 3)})
            path = "relay"
            best = self.fwd.peer_path((), key) if key in self.fwd.direct_of else None
            for d in self._paths_of(key):
                dm = d.monitor
                r = d.tunnel.remote
                paths.append({"path": "direct", "interface": d.iface,
                              "remote": format_host_port(*r), "state": d.tunnel.state,
                              "rtt_ms": round(dm.srtt * 1000.0, 3)
                              if dm is not None and dm.srtt is not None else None})
                if best is not None and d.tunnel is best:
                    path, rtt, up = "direct", dm.srtt if dm is not None else None, [best]
                    remote = format_host_port(*r)
            ice = self.ice.get(key)
            out.append({"name": p.name, "anchor": p.anchor, "vipa": p.vipa, "path": path,
                        "state": link.state.value,
                        "interface": up[0].interface if up else None,
                        "remote": remote,
                        "rtt_ms": round(rtt * 1000.0, 3) if rtt is not None else None,
                        "ice": None if ice is None else ice.phase.value,
                        "why_relay": None if path == "direct" or ice is None
                        else ice.reason or None,
                        "paths": paths})
        return out
