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
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .config import AnchorConfig
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
from .signalling.handshake import RateLimiter, Responder
from .tables import seq_of

__all__ = ["Anchor"]

log = logging.getLogger(__name__)

SESSION_LIFE = 180.0      # a session older than this opens nothing (the host rekeys at 120 s)
SESSIONS_PER_HOST = 3
SWEEP_EVERY = 5.0
TUNNEL_IDLE = 90.0        # no keepalive or data for this long: the tunnel is gone
ASSOC_IDLE = 300.0
FLOW_IDLE = 600.0


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
                                    mesh=cfg.mesh)
        self.responder = Responder(cfg.private_key, {p.public_key: p.name for p in cfg.peers})
        self.limiter = RateLimiter()
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
                resp = self.sig.handle(sip_bytes, src, self.clock(), s,
                                       seq_of(s.generation, counter))
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
        """mac1 first (no DH for who does not know our key). Not under load: the rate
        limiter. Under load (a flood, maybe from forged sources): only initiations whose
        mac2 proves that their source receives, limited per source; the others get a
        cookie reply (smaller than the initiation) and no DH."""
        now = self.clock()
        responder, limiter = self.responder, self.limiter
        if not responder.mac_ok(data):
            self.fwd.drops["handshake_bad_mac"] += 1
            return
        if not limiter.arrive(now):
            if limiter.allow(src[0], now):
                self._accept(data, src, now)
                return
            if not limiter.under_load(now):     # refused by its source's bucket only
                self.fwd.drops["handshake_rate_limited"] += 1
                return
        reply = responder.cookie_unless_proven(data, src, now)
        if reply is not None:
            self.fwd.drops["handshake_cookie_sent"] += 1
            self.path.sendto(reply, src)
            return
        if not limiter.allow_proven(src[0], now):
            self.fwd.drops["handshake_rate_limited"] += 1
            return
        self._accept(data, src, now)

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

    async def start(self) -> None:
        self.tun.start(self._on_tun, self.path.flush, self._on_super)
        self.path.start(self._on_datagram, self.tun.flush, gro_reader(
            lambda data, size, src: self.fwd.from_path_many(data, size, src, self.clock()),
            self.tun.write, self._on_datagram))
        self._sweeper = asyncio.create_task(self._sweep())

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            self.sig.expire(self.clock(), TUNNEL_IDLE, ASSOC_IDLE, FLOW_IDLE, SESSION_LIFE)
            for peer, live in list(self._peer_sessions.items()):
                while live and live[0].local_index not in self.fwd.sessions:
                    live.popleft()
                if not live:
                    del self._peer_sessions[peer]

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
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
            assocs.append({"mh": a.mh, "vipa": a.vipa, "tunnels": tunnels, "mesh": a.mesh,
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
                "listen": f"{self.cfg.listen_host}:{self.cfg.listen_port}",
                "vipa_pool": str(self.cfg.vipa_pool), "associations": assocs, "flows": flows,
                "drops": dict(self.fwd.drops), "paths": dict(self.fwd.events),
                "signalling": dict(self.sig.stats)}
