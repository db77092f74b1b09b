"""The anchor node (or UPMT-aware fixed host): drives forwarder + signalling with asyncio.

One UDP socket carries tunnels and SIP; one TUN carries the inner packets to and
from the kernel, which masquerades them to the Internet (role "anchor") or
delivers them to local applications (role "fixed-host"). Embeddable: the seams
are passed in, so tests run it over in-memory fakes.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .config import AnchorConfig, format_host_port
from .dataplane import shedfilter
from .dataplane.crypto import Session
from .dataplane.forwarder import AnchorForwarder
from .dataplane.io import Path, Tun, gro_reader
from .dataplane.packet import (
    KIND_SIP,
    TYPE_CONTROL,
    TYPE_DATA,
    TYPE_HS_INIT,
    TYPE_PATH_RESPONSE,
    TYPE_PING,
    TYPE_RELAY,
    classify,
)
from .signalling.anchor_side import AnchorSignalling
from .signalling.handshake import COOKIE, QUEUED, HandshakeGate, RateLimiter, Responder
from .tables import seq_of

__all__ = ["Anchor"]

log = logging.getLogger(__name__)

SESSION_LIFE = 180.0      # a session older than this opens nothing (the host rekeys at 120 s)
SESSIONS_PER_HOST = 3
SWEEP_EVERY = 5.0
TUNNEL_IDLE = 90.0        # no keepalive or data for this long: the tunnel is gone
ASSOC_IDLE = 300.0
FLOW_IDLE = 600.0
HS_PER_TURN = 4           # DH work (about 1 ms each) per event-loop turn: forwarding goes between
# sealed signalling per authenticated peer: a host with 16 tunnels sends a KeepAlive per tunnel
# every few seconds (one per second each at the most eager setting), setups and handovers in
# bursts; a flood beyond this is dropped before any SIP parsing
SIGNAL_RATE = 50.0
SIGNAL_BURST = 200.0
SHED_EVERY = 1.0          # seconds between two updates of the kernel's shed filter
SO_MEMINFO = 55           # (linux/socket.h; its 9th u32 is the socket's drop count)


class Anchor:
    def __init__(self, cfg: AnchorConfig, *, tun: Tun, path: Path,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.tun = tun
        self.path = path
        self.clock = clock
        self.fwd = AnchorForwarder(max_flows_per_host=cfg.max_flows_per_host)
        self.fwd.emit = path.sendto
        self.sig = AnchorSignalling(self.fwd, cfg.vipa_pool, role=cfg.role,
                                    listen=(cfg.listen_host, cfg.listen_port),
                                    max_associations=cfg.max_associations,
                                    plain_data=cfg.plaintext_data, peers=cfg.peers,
                                    mesh=cfg.mesh, pool6=cfg.vipa6_pool)
        self.responder = Responder(cfg.private_key, {p.public_key: p.name for p in cfg.peers})
        self.gate = HandshakeGate()
        self.signal_limiter = RateLimiter(SIGNAL_RATE, SIGNAL_BURST,
                                          max_keys=max(1024, 2 * len(cfg.peers)))
        self._hs_wake = asyncio.Event()
        self._hs_worker: asyncio.Task[None] | None = None
        self._shedder: asyncio.Task[None] | None = None
        self._shed_keep = 1.0                   # the kernel filter's share (1.0: none)
        self._generation = 0
        self._peer_sessions: dict[str, deque[Session]] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def _on_datagram(self, data: bytes, src: tuple[str, int]) -> None:
        """Silence to strangers: only a valid handshake or a packet that opens gets an answer."""
        b0 = data[0] if len(data) >= 16 else 0
        if b0 == TYPE_DATA:
            pkt = self.fwd.from_path(data, src, self.clock())
            if pkt is not None:
                self.tun.write(pkt)
        elif b0 == TYPE_CONTROL:
            opened = self.fwd.open(data)
            if opened is not None:
                s, _, counter, sip_bytes = opened
                now = self.clock()
                if not self.signal_limiter.allow(s.peer, now):   # before any SIP parsing
                    self.fwd.drops["signalling_rate_limited"] += 1
                    return
                resp = self.sig.handle(sip_bytes, src, now, s, seq_of(s.generation, counter))
                if resp is not None:
                    self.path.sendto(s.seal(TYPE_CONTROL, resp), src)
        elif b0 == TYPE_HS_INIT:
            self._handshake(data, src)
        elif b0 == TYPE_PING:
            out = self.fwd.ping(data, src, self.clock())
            if out is not None:
                self.path.sendto(out[1], out[0])
        elif b0 == TYPE_PATH_RESPONSE:
            self.fwd.path_response(data, src)
        elif b0 == TYPE_RELAY:
            out = self.fwd.relay(data, src, self.clock())
            if out is not None:
                self.path.sendto(out[1], out[0])
        elif classify(data) == KIND_SIP:
            self.fwd.drops["plaintext_sip"] += 1
        else:
            self.fwd.drops["junk"] += 1

    def _handshake(self, data: bytes, src: tuple[str, int]) -> None:
        """Cheap checks only (no DH here, on the data path): under load with no cookie
        budget left, an initiation without mac2 is shed unchecked; then mac1 (nothing for
        who does not know our key), then the gate (see :class:`HandshakeGate`): into the
        handshake queue, or under load a cookie reply (bounded), or a counted drop."""
        responder, gate = self.responder, self.gate
        now = self.clock()
        if gate.shed(data, now):                    # most of a flood: no mac1 even
            self.fwd.drops["handshake_shed"] += 1
            return
        if not responder.mac_ok(data):
            self.fwd.drops["handshake_bad_mac"] += 1
            return
        cookie = b""

        def proven() -> bool:
            nonlocal cookie
            cookie = responder.cookie(src, now)
            return responder.mac2_ok(data, src, now, cookie)

        verdict = gate.offer(data, src, now, proven)
        if verdict == QUEUED:
            self._hs_wake.set()
        elif verdict == COOKIE:
            self.fwd.drops["handshake_cookie_sent"] += 1
            self.path.sendto(responder.cookie_reply(data, src, now, cookie), src)
        else:
            self.fwd.drops["handshake_" + verdict] += 1

    def drain_handshakes(self, n: int = HS_PER_TURN) -> int:
        """The DH work of up to ``n`` queued initiations; how many still wait. The worker
        calls it once per event-loop turn (tests over fakes call it directly)."""
        for data, src in self.gate.take(n):
            self._accept(data, src, self.clock())
        return len(self.gate.queue)

    async def _handshakes(self) -> None:
        wake = self._hs_wake
        while True:
            await wake.wait()
            wake.clear()
            while self.drain_handshakes():
                await asyncio.sleep(0)          # forwarding's turn between two batches

    async def _shed_control(self) -> None:
        while True:
            await asyncio.sleep(SHED_EVERY)
            self.shed_control(self.clock())

    def shed_control(self, now: float) -> None:
        """Attach, update or detach the kernel's shed filter (dataplane/shedfilter.py) as
        the gate's load says; only on a real socket (the fakes have none)."""
        keep = self.gate.keep_fraction(now)
        old = self._shed_keep
        if keep == old or (keep < 1.0 and old < 1.0 and 0.8 < keep / old < 1.25):
            return
        sock = getattr(self.path, "sock", None)
        if not isinstance(sock, socket.socket):
            return
        try:
            if keep >= 1.0:
                shedfilter.detach(sock)
            else:
                shedfilter.attach(sock, keep)
        except OSError as e:                    # no BPF here: the Python-side shed goes on
            self.fwd.drops["shed_filter_error"] += 1
            log.debug("shed filter: %s", e)
            return
        self._shed_keep = keep

    def socket_drops(self) -> int | None:
        """Datagrams the kernel dropped at our socket (the shed filter's, a full queue's):
        SO_MEMINFO's drop count, None without a real socket."""
        sock = getattr(self.path, "sock", None)
        if not isinstance(sock, socket.socket):
            return None
        try:
            info = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 9 * 4)
        except OSError:
            return None
        return int.from_bytes(info[32:36], "little") if len(info) >= 36 else None

    def _accept(self, data: bytes, src: tuple[str, int], now: float) -> None:
        acc = self.responder.accept(data, now, self._new_index)
        if acc is None:
            self.fwd.drops["handshake_refused"] += 1
            return
        s = acc.session
        self._generation += 1
        s.generation = self._generation
        s.plain_data = self.cfg.plaintext_data
        self.fwd.sessions[s.local_index] = s
        live = self._peer_sessions.setdefault(acc.peer, deque())
        live.append(s)
        while len(live) > SESSIONS_PER_HOST:        # a key holder cannot pile up sessions
            self.fwd.sessions.pop(live.popleft().local_index, None)
        self.path.sendto(acc.response, src)

    def reconfigure(self, cfg: AnchorConfig, ended: tuple[str, ...]) -> None:
        """``reload``: peers, mesh and limits of ``cfg`` from now on; the peers in
        ``ended`` (removed or re-keyed) lose their association now. Other associations
        are not touched."""
        self.cfg = cfg
        # the responder reads this map for every initiation: replaced, not mutated
        self.responder.peers = {p.public_key: p.name for p in cfg.peers}
        self.sig.set_peers(cfg.peers, mesh=cfg.mesh, max_associations=cfg.max_associations,
                           lease_life=cfg.lease_days * 86400.0)
        self.fwd.paft.per_source_cap = cfg.max_flows_per_host
        for name in ended:
            self.end_peer(name)

    def end_peer(self, name: str) -> None:
        """Host ``name`` is no longer authorized (or must authenticate again): its
        sessions, association, tunnels and flows go now. Its lease stays until the next
        compaction (a re-keyed host gets its VIpA back)."""
        for idx, s in list(self.fwd.sessions.items()):
            if s.peer == name:
                del self.fwd.sessions[idx]
        self._peer_sessions.pop(name, None)
        a = self.fwd.by_mh.get(name)
        if a is not None:
            self.fwd.remove_association(a)
            log.info("association of %s (VIpA %s) ended by reload", name, a.vipa)

    def _new_index(self) -> int:
        while True:
            idx = secrets.randbits(32)
            if idx and idx not in self.fwd.sessions:
                return idx

    def _on_tun(self, pkt: bytes) -> None:
        out = self.fwd.from_tun(pkt, self.clock())
        if out is not None:
            self.path.queue(out[1], out[0])     # leaves at the flush after this TUN read

    def _on_super(self, pkt: memoryview, gso_size: int) -> None:
        out = self.fwd.from_tun_super(pkt, gso_size, self.clock())
        if out is not None:
            self.path.queue_run(out[1], out[2], out[0])

    def _on_packets(self, pkts: list[bytes]) -> None:
        """One TUN wake-up's packets (ACKs, small UDP): routed once per run of one flow,
        each run sealed for one UDP GSO send."""
        for to, data, size in self.fwd.from_tun_many(pkts, self.clock()):
            if size:
                self.path.queue_run(data, size, to)
            else:
                self.path.queue(data, to)

    async def start(self) -> None:
        self.tun.start(self._on_tun, self.path.flush, self._on_super, self._on_packets)
        self.path.start(self._on_datagram, self.tun.flush, gro_reader(
            lambda data, size, src: self.fwd.from_path_many(data, size, src, self.clock()),
            self.tun.write, self._on_datagram))
        self._sweeper = asyncio.create_task(self._sweep())
        self._hs_worker = asyncio.create_task(self._handshakes())
        self._shedder = asyncio.create_task(self._shed_control())

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            self.sweep(self.clock())

    def sweep(self, now: float) -> None:
        """Call every SWEEP_EVERY seconds: forget the sessions, tunnels, associations and
        flows that went silent (benchmarks on a simulated clock call it themselves)."""
        self.sig.expire(now, TUNNEL_IDLE, ASSOC_IDLE, FLOW_IDLE, SESSION_LIFE)
        for peer, live in list(self._peer_sessions.items()):
            while live and live[0].local_index not in self.fwd.sessions:
                live.popleft()
            if not live:
                del self._peer_sessions[peer]

    async def stop(self) -> None:
        tasks = [t for t in (self._sweeper, self._hs_worker, self._shedder) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.tun.close()
        self.path.close()

    def status(self) -> dict[str, Any]:
        now = self.clock()
        assocs = []
        for a in self.fwd.by_mh.values():
            tunnels = []
            for t in a.tunnels.values():
                j = t.json()
                j["anchor"] = None
                j["mh"] = a.mh
                j["idle_s"] = round(now - t.last_rx, 3)
                tunnels.append(j)
            assocs.append({"mh": a.mh, "vipa": a.vipa, "vipa6": a.vipa6 or None,
                           "tunnels": tunnels, "mesh": a.mesh,
                           "relay_rx_bytes": a.relay_rx_bytes,
                           "relay_tx_bytes": a.relay_tx_bytes,
                           "session_age_s": None if a.session is None
                           else round(now - a.session.created, 1)})
        def iface_of(tid: int | None) -> str | None:
            t = self.fwd.tunnels.get(tid) if tid is not None else None
            return t.interface if t is not None else None

        flows = [{**f.json(now, iface_of(f.tunnel), iface_of), "mh": f.anchor}
                 for f in self.fwd.paft.flows()]
        return {"role": self.cfg.role, "mesh": self.cfg.mesh,
                "listen": format_host_port(self.cfg.listen_host, self.cfg.listen_port),
                "vipa_pool": str(self.cfg.vipa_pool), "associations": assocs, "flows": flows,
                "drops": dict(self.fwd.drops), "paths": dict(self.fwd.events),
                "signalling": dict(self.sig.stats),
                "handshake": {"queued": len(self.gate.queue),
                              "under_load": self.gate.under_load(now),
                              "kernel_keeps": self._shed_keep,
                              "socket_drops": self.socket_drops()}}
