"""The anchor's UPMT signalling: association, tunnel setup and keepalive.

Pure: :meth:`AnchorSignalling.handle` takes a datagram, its source and ``now``
and returns the response datagram (or None). It changes the forwarder's tables
(associations, tunnels); retransmitted requests get the cached response and
change nothing twice.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

from ..dataplane.forwarder import AnchorForwarder, Association
from ..tables import Tunnel
from . import sip, upmt

__all__ = ["AnchorSignalling", "Refused"]

log = logging.getLogger(__name__)

MAX_TUNNELS_PER_HOST = 16


class Refused(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class AnchorSignalling:
    def __init__(self, fwd: AnchorForwarder, pool: ipaddress.IPv4Network, *, role: str,
                 listen: tuple[str, int], max_associations: int = 1024) -> None:
        self.fwd = fwd
        self.pool = pool
        self.role = role
        self.listen = listen
        self.max_associations = max_associations
        self.reserved = {pool.network_address, pool.broadcast_address, next(pool.hosts())}
        self._hosts: Iterator[ipaddress.IPv4Address] = pool.hosts()
        self.cache = sip.ResponseCache()
        self.stats: Counter[str] = Counter()

    @property
    def tun_address(self) -> str:
        """The anchor TUN's own address: the first host of the pool."""
        return str(next(self.pool.hosts()))

    def handle(self, data: bytes, src: tuple[str, int], now: float) -> bytes | None:
        try:
            msg = sip.parse(data)
        except sip.MalformedSip:
            self.stats["malformed"] += 1
            return None
        if not isinstance(msg, sip.SipRequest):
            self.stats["stray_response"] += 1
            return None
        tkey = sip.transaction_key(msg)
        if tkey is None:
            self.stats["malformed"] += 1
            return None
        # only an identical retransmission gets the cached answer
        key = (*tkey, hashlib.blake2s(data, digest_size=16).digest())
        cached = self.cache.get((key, src), now)
        if cached is not None:
            self.stats["retransmission"] += 1
            return cached
        if msg.method != "MESSAGE":
            resp = sip.build_response(msg, 405, "Method Not Allowed", received=src)
        else:
            resp = self._message(msg, src, now)
        self.cache.put((key, src), now, resp)
        return resp

    def _message(self, msg: sip.SipRequest, src: tuple[str, int], now: float) -> bytes:
        try:
            signals = upmt.decode(msg.body)
        except ValueError as e:
            self.stats["bad_signal"] += 1
            return sip.build_response(msg, 501, f"bad UPMT signal: {e}"[:80], received=src)
        answers: list[tuple[str, dict[str, Any]]] = []
        try:
            for mtype, content in signals:
                handler = getattr(self, "_on_" + mtype, None)
                if handler is None:
                    raise Refused(501, f"bad UPMT signal: {mtype} not accepted here")
                answers.append(handler(content, src, now))
        except Refused as r:
            self.stats["refused"] += 1
            return sip.build_response(msg, r.code, r.reason, received=src)
        self.stats["ok"] += 1
        return sip.build_response(msg, 200, "OK", upmt.encode(answers), received=src)

    # -- signals ---------------------------------------------------------------------------
    def _on_AssociationReq(self, c: dict[str, Any], src: tuple[str, int],
                           now: float) -> tuple[str, dict[str, Any]]:
        a = self.fwd.by_mh.get(c["sipId"])
        if a is None:
            if len(self.fwd.by_mh) >= self.max_associations:
                raise Refused(503, "too many associations")
            vipa = self._allocate()
            if vipa is None:
                raise Refused(503, "VIpA pool exhausted")
            a = Association(c["sipId"], str(vipa), vipa.packed, created=now, last_rx=now)
            self.fwd.add_association(a)
            log.info("associated %s from %s:%d: VIpA %s", a.mh, src[0], src[1], a.vipa)
        return "AssociationResp", {"associationSuccess": True, "vipa": a.vipa, "role": self.role,
                                   "reason": "", "addressesInUse": []}

    def _allocate(self) -> ipaddress.IPv4Address | None:
        used = self.fwd.by_vipa
        for _ in range(2):
            for ip in self._hosts:
                if ip not in self.reserved and ip.packed not in used:
                    return ip
            self._hosts = self.pool.hosts()   # wrap around once, reusing freed addresses
        return None

    def _assoc(self, c: dict[str, Any]) -> Association:
        a = self.fwd.by_mh.get(c["sipId"])
        if a is None:
            raise Refused(501, "not registered")
        return a

    def _on_TunnelSetupReq(self, c: dict[str, Any], src: tuple[str, int],
                           now: float) -> tuple[str, dict[str, Any]]:
        a = self._assoc(c)
        if c["vipa"] != a.vipa:
            raise Refused(501, "not registered")
        t = next((t for t in a.tunnels.values() if t.un_tid == c["tunnelId"]), None)
        if t is None:
            if len(a.tunnels) >= MAX_TUNNELS_PER_HOST:
                oldest = min(a.tunnels.values(), key=lambda x: x.last_rx)
                self._drop_tunnel(a, oldest)
            t = Tunnel(self.fwd.tunnels.new_tid(), str(c.get("interface", ""))[:32], self.listen,
                       src, a.mh, a.vipa, a.vipa_b, c["tunnelId"], state="up", created=now)
            self.fwd.tunnels.add(t)
            a.tunnels[t.tid] = t
            log.info("tunnel %d of %s (%s) from %s:%d", t.tid, a.mh, t.interface, *src)
        else:
            t.remote = src
        t.last_rx = a.last_rx = now
        if a.last_tunnel is None:
            a.last_tunnel = t
        return "TunnelSetupResp", {"serverTunnelID": t.tid, "yourAddress": src[0],
                                   "yourPort": src[1]}

    def _on_KeepAlive(self, c: dict[str, Any], src: tuple[str, int],
                      now: float) -> tuple[str, dict[str, Any]]:
        a = self._assoc(c)
        t = a.tunnels.get(c["tunnelId"])
        if t is None:
            raise Refused(501, "dead tunnel")
        if t.remote != src:
            log.info("tunnel %d of %s moved %s:%d -> %s:%d", t.tid, a.mh, *t.remote, *src)
            t.remote = src
        t.last_rx = a.last_rx = now
        return "KeepAliveResp", {"tunnelId": t.tid, "yourAddress": src[0], "yourPort": src[1]}

    def _drop_tunnel(self, a: Association, t: Tunnel) -> None:
        a.tunnels.pop(t.tid, None)
        self.fwd.tunnels.remove(t.tid)
        if a.last_tunnel is t:
            a.last_tunnel = max(a.tunnels.values(), key=lambda x: x.last_rx, default=None)

    def expire(self, now: float, tunnel_idle: float, assoc_idle: float, flow_idle: float) -> None:
        """Forget tunnels, associations and flows that went silent (call periodically)."""
        for a in list(self.fwd.by_mh.values()):
            for t in list(a.tunnels.values()):
                if now - t.last_rx > tunnel_idle:
                    self._drop_tunnel(a, t)
            if not a.tunnels and now - a.last_rx > assoc_idle:
                log.info("association of %s (VIpA %s) expired", a.mh, a.vipa)
                self.fwd.remove_association(a)
        self.fwd.paft.expire(now, flow_idle)
