"""The anchor's UPMT signalling: association, tunnel setup, path validation, keepalive.

Pure: :meth:`AnchorSignalling.handle` takes a SIP message that arrived inside a
sealed CONTROL packet, the session it opened under (which names the
authenticated peer), its outer source and ``now``, and returns the SIP
response (or None). The driver seals the response with the same session.

Identity: the sipId in every signal must be the session's peer name (403
otherwise), so one host can never speak for another. Tunnels are created or
moved only here, and a tunnel at a new outer address carries no data until the
host echoes the challenge of the answer from that address (path validation).
Retransmitted requests get the cached response and change nothing twice.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import logging
import secrets
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from ..config import Peer
from ..dataplane.crypto import Session
from ..dataplane.forwarder import AnchorForwarder, Association
from ..flowtable import pack_key
from ..leases import DEFAULT_LEASE_DAYS, Leases
from ..logbudget import LogBudget
from ..tables import Tunnel
from . import sip, upmt

__all__ = ["AnchorSignalling", "Refused"]

log = logging.getLogger(__name__)

MAX_TUNNELS_PER_HOST = 16
LEASE_SWEEP = 3600.0        # seconds between lease compactions (and last_seen refreshes)


class Refused(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _flow_key(item: object) -> tuple[int, bytes, bytes, int, int] | None:
    """A HandoverReq flow ``[proto, src, dst, sport, dport]`` -> its 5-tuple key, or None.

    Strict JSON types (integers, not floats such as 6.0 or 1e999; not booleans), ranges
    checked: whatever the JSON holds, the answer is a key or None, never an exception."""
    if not isinstance(item, list) or len(item) != 5:
        return None
    proto, fsrc, dst, sport, dport = item
    if not all(type(v) is int for v in (proto, sport, dport)):
        return None
    if not (0 <= proto <= 255 and 0 <= sport <= 0xFFFF and 0 <= dport <= 0xFFFF):
        return None
    if not isinstance(fsrc, str) or not isinstance(dst, str):
        return None
    try:
        a, b = ipaddress.ip_address(fsrc), ipaddress.ip_address(dst)
    except ValueError:
        return None
    return (proto, a.packed, b.packed, sport, dport) if a.version == b.version else None


class AnchorSignalling:
    def __init__(self, fwd: AnchorForwarder, pool: ipaddress.IPv4Network, *, role: str,
                 listen: tuple[str, int], max_associations: int = 1024,
                 plain_data: bool = False, leases: Leases | None = None,
                 peers: tuple[Peer, ...] = (), mesh: bool = False,
                 pool6: ipaddress.IPv6Network | None = None) -> None:
        self.fwd = fwd
        # IPv6 VIpAs (None: IPv4 only): the host at offset i of ``pool`` gets offset i of
        # ``pool6``, so its IPv4 lease keeps its IPv6 VIpA across restarts too
        if pool6 is not None and pool6.num_addresses < pool.num_addresses:
            raise ValueError(f"vipa6_pool {pool6} is smaller than vipa_pool {pool}")
        self.pool6 = pool6
        self.peers = {p.name: p for p in peers}
        self.mesh = mesh
        self.pool = pool
        self.role = role
        self.listen = listen
        self.max_associations = max_associations
        self.plain_data = plain_data
        self.reserved = {pool.network_address, pool.broadcast_address, next(pool.hosts())}
        self._hosts: Iterator[ipaddress.IPv4Address] = pool.hosts()
        # host name -> VIpA, kept across restarts when the store has a file (leases.py)
        self.leases = leases if leases is not None else Leases.memory()
        self._lease_peers: frozenset[str] | None = None      # None: never compacted
        self._lease_life = DEFAULT_LEASE_DAYS * 86400.0
        self._lease_sweep: float | None = None               # next compaction (monotonic)
        self.cache = sip.ResponseCache()
        self.stats: Counter[str] = Counter()
        self._seq = 0
        # lines a host's signalling can cause (it may repeat them in a loop): bounded
        self._log = LogBudget(log)

    def use_leases(self, leases: Leases, *, peers: Iterable[str], max_age: float) -> list[str]:
        """Keep VIpAs in ``leases`` (call before the anchor starts). Leases of hosts that are
        not ``peers``, not seen for ``max_age`` seconds, or outside the pool are dropped now
        and every :data:`LEASE_SWEEP` seconds; returns the names dropped now."""
        self.leases = leases
        self._lease_peers = frozenset(peers)
        self._lease_life = max_age
        return self._compact_leases()

    def set_peers(self, peers: tuple[Peer, ...], *, mesh: bool, max_associations: int,
                  lease_life: float) -> None:
        """``reload``: who may associate from now on, and the limits. Associations of
        peers still listed take their new ``mesh`` flag (relaying follows at once);
        ending those of peers removed is the driver's (:meth:`Anchor.end_peer`)."""
        self.peers = {p.name: p for p in peers}
        self.mesh = mesh
        self.max_associations = max_associations
        self._lease_life = lease_life
        if self._lease_peers is not None:
            self._lease_peers = frozenset(self.peers)
        for a in self.fwd.by_mh.values():
            p = self.peers.get(a.mh)
            if p is not None:
                a.mesh = p.mesh

    def _compact_leases(self) -> list[str]:
        if self._lease_peers is None:
            return []
        live = self.fwd.by_mh
        self.leases.touch(live)          # a host associated for months keeps its lease
        dropped = self.leases.compact(peers=self._lease_peers | live.keys(), pool=self.pool,
                                      reserved=self.reserved, max_age=self._lease_life)
        if dropped:
            log.info("dropped %d expired or stale VIpA lease(s)", len(dropped))
        return dropped

    @property
    def tun_address(self) -> str:
        """The anchor TUN's own address: the first host of the pool."""
        return str(next(self.pool.hosts()))

    def handle(self, data: bytes, src: tuple[str, int], now: float,
               session: Session, seq: int = 0) -> bytes | None:
        """``seq``: tables.seq_of(session generation, counter) of the sealed packet that
        carried it."""
        self._seq = seq
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
        # only an identical retransmission (same peer, same bytes) gets the cached answer
        key = (*tkey, session.peer, hashlib.blake2s(data, digest_size=16).digest())
        cached = self.cache.get((key, src), now)
        if cached is not None:
            self.stats["retransmission"] += 1
            return cached
        if msg.method != "MESSAGE":
            resp = sip.build_response(msg, 405, "Method Not Allowed", received=src)
        else:
            resp = self._message(msg, src, now, session)
        self.cache.put((key, src), now, resp)
        return resp

    def _message(self, msg: sip.SipRequest, src: tuple[str, int], now: float,
                 session: Session) -> bytes:
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
                if content.get("sipId") != session.peer:
                    raise Refused(403, "Forbidden: sipId is not the authenticated peer")
                answers.append(handler(content, src, now, session))
        except Refused as r:
            # a counter, not a line per message: the host sees the reason in the answer
            self.stats["refused"] += 1
            log.debug("refused %s from %s:%d: %d %s", session.peer, *src, r.code, r.reason)
            return sip.build_response(msg, r.code, r.reason, received=src)
        except Exception as e:  # noqa: BLE001 - remote input never raises out of here
            # a bug reached by remote input: answer 500, count it, one bounded line (no
            # traceback per message); what the handlers changed before stays consistent
            self.stats["internal_error"] += 1
            self._log.log(logging.WARNING, now, "signal from %s raised %s: %s", session.peer,
                          type(e).__name__, str(e)[:80])
            return sip.build_response(msg, 500, "Server Internal Error", received=src)
        self.stats["ok"] += 1
        return sip.build_response(msg, 200, "OK", upmt.encode(answers), received=src)

    # -- signals ---------------------------------------------------------------------------
    def _on_AssociationReq(self, c: dict[str, Any], src: tuple[str, int], now: float,
                           session: Session) -> tuple[str, dict[str, Any]]:
        if bool(c.get("dataPlaintext", False)) != self.plain_data:
            raise Refused(403, "Forbidden: insecure_plaintext_for_benchmarks differs")
        a = self.fwd.by_mh.get(session.peer)
        if a is None:
            if len(self.fwd.by_mh) >= self.max_associations:
                raise Refused(503, "too many associations")
            vipa = self._allocate(session.peer)
            if vipa is None:
                raise Refused(503, "VIpA pool exhausted")
            # committed before the answer: after a restart the host gets this VIpA again
            self.leases.put(session.peer, str(vipa))
            peer = self.peers.get(session.peer)
            a = Association(session.peer, str(vipa), vipa.packed, created=now, last_rx=now,
                            plain_data=self.plain_data, mesh=peer is not None and peer.mesh)
            vipa6 = self.vipa6_of(vipa)
            if vipa6 is not None:
                a.vipa6, a.vipa6_b = str(vipa6), vipa6.packed
            self.fwd.add_association(a)
            self._log.log(logging.INFO, now, "associated %s from %s:%d: VIpA %s", a.mh, *src,
                          a.vipa)
        elif self.leases.owner(a.vipa) in (None, a.mh):
            self.leases.put(a.mh, a.vipa)       # writes only if its last_seen is old
        if a.session is None or session.generation >= a.session.generation:
            a.session = session
        resp = {"associationSuccess": True, "vipa": a.vipa, "role": self.role, "reason": "",
                "addressesInUse": [], "dataPlaintext": self.plain_data, "mesh": a.mesh}
        if a.mesh:
            resp["meshPool"] = str(self.pool)
        if a.vipa6:
            resp["vipa6"] = a.vipa6
        return "AssociationResp", resp

    def vipa6_of(self, vipa: ipaddress.IPv4Address) -> ipaddress.IPv6Address | None:
        """The IPv6 VIpA that goes with IPv4 VIpA ``vipa`` (same offset in the pools)."""
        if self.pool6 is None:
            return None
        return self.pool6.network_address + (int(vipa) - int(self.pool.network_address))

    def _allocate(self, name: str) -> ipaddress.IPv4Address | None:
        """The VIpA of host ``name``'s lease when it has a usable one (whatever order hosts
        come back in after a restart), else a free address: neither associated nor leased
        to another host. Only when the pool has no such address left is the lease of the
        host seen longest ago that is not associated now taken over (a pool too small for
        the peers; one line says so): better than refusing the host."""
        used = self.fwd.by_vipa
        mine = self.leases.get(name)
        if mine is not None:
            ip = ipaddress.IPv4Address(mine)
            if ip in self.pool and ip not in self.reserved and ip.packed not in used:
                return ip
        leased = self.leases.in_use()
        for _ in range(2):
            for ip in self._hosts:
                if ip not in self.reserved and ip.packed not in used and str(ip) not in leased:
                    return ip
            self._hosts = self.pool.hosts()   # wrap around once, reusing freed addresses
        stale = sorted((seen, other, vipa) for other, (vipa, seen) in self.leases.items().items()
                       if other != name and other not in self.fwd.by_mh
                       and ipaddress.IPv4Address(vipa) in self.pool
                       and ipaddress.IPv4Address(vipa) not in self.reserved
                       and ipaddress.IPv4Address(vipa).packed not in used)
        if not stale:
            return None
        _, other, vipa = stale[0]
        log.warning("VIpA pool %s exhausted: %s gets %s, leased to %s (seen longest ago)",
                    self.pool, name, vipa, other)
        self.leases.forget([other])
        return ipaddress.IPv4Address(vipa)

    def _assoc(self, session: Session) -> Association:
        a = self.fwd.by_mh.get(session.peer)
        if a is None:
            raise Refused(501, "not registered")
        return a

    def _move(self, a: Association, t: Tunnel, src: tuple[str, int]) -> None:
        """(Re)place tunnel ``t`` at outer address ``src``, unvalidated until it echoes."""
        if a.by_addr.get(t.remote) is t:
            del a.by_addr[t.remote]
        other = a.by_addr.get(src)
        if other is not None and other is not t:
            self.fwd.drop_tunnel(a, other)       # that address now belongs to this tunnel
        t.remote = src
        a.by_addr[src] = t
        t.state = "validating"
        t.challenge = secrets.token_hex(16)
        t.probe_addr = None
        if a.last_tunnel is t:
            a.last_tunnel = self.fwd.best(a)

    def _on_TunnelSetupReq(self, c: dict[str, Any], src: tuple[str, int], now: float,
                           session: Session) -> tuple[str, dict[str, Any]]:
        """A host keeps one tunnel per interface (its agent has one link per (interface,
        peer)): a setup for interface X with a tunnelId we do not have for X replaces the
        host's tunnel of X (a restarted agent numbers its tunnels afresh; the old one
        would otherwise wait out TUNNEL_IDLE, and hold a slot of MAX_TUNNELS_PER_HOST)."""
        a = self._assoc(session)
        if c["vipa"] != a.vipa:
            raise Refused(501, "not registered")
        iface = str(c.get("interface", ""))[:32]
        t = next((t for t in a.tunnels.values() if t.un_tid == c["tunnelId"]), None)
        if iface:
            for old in [o for o in a.tunnels.values() if o.interface == iface and o is not t]:
                self.fwd.drop_tunnel(a, old)
                self._log.log(logging.INFO, now, "tunnel %d of %s (%s) replaced", old.tid,
                              a.mh, iface)
            if t is not None:
                t.interface = iface              # its number now names another interface
        if t is None:
            if len(a.tunnels) >= MAX_TUNNELS_PER_HOST:
                self.fwd.drop_tunnel(a, min(a.tunnels.values(), key=lambda x: x.last_rx))
            t = Tunnel(self.fwd.tunnels.new_tid(), iface, self.listen,
                       src, a.mh, a.vipa, a.vipa_b, c["tunnelId"], created=now)
            self.fwd.tunnels.add(t)
            a.tunnels[t.tid] = t
            self._move(a, t, src)
            self._log.log(logging.INFO, now, "tunnel %d of %s (%s) from %s:%d", t.tid, a.mh,
                          t.interface, *src)
        elif t.remote != src:
            self._move(a, t, src)
        t.last_rx = a.last_rx = now
        return "TunnelSetupResp", {"serverTunnelID": t.tid, "yourAddress": src[0],
                                   "yourPort": src[1], "challenge": self._challenge(t)}

    def _on_KeepAlive(self, c: dict[str, Any], src: tuple[str, int], now: float,
                      session: Session) -> tuple[str, dict[str, Any]]:
        a = self._assoc(session)
        t = a.tunnels.get(c["tunnelId"])
        if t is None:
            raise Refused(501, "dead tunnel")
        echo = str(c.get("challenge", "")).encode()
        challenge = ""
        if t.remote != src and t.state == "up":
            # NAT rebinding of a validated tunnel: it keeps its address (and data) until
            # the new one echoes a challenge sent there
            token = self.fwd.probe(t, src).hex().encode()
            if secrets.compare_digest(echo, token):
                self.fwd.rebind(a, t, src)
            else:
                challenge = token.decode()
        elif t.remote != src:
            self._log.log(logging.INFO, now, "tunnel %d of %s moved %s:%d -> %s:%d", t.tid,
                          a.mh, *t.remote, *src)
            self._move(a, t, src)
            challenge = t.challenge
        elif t.probe_addr is not None and t.state == "up":
            self.fwd.end_probe(t)                # the validated address is alive
            self.fwd.events["rebind_abandoned"] += 1
        elif t.state != "up":
            if secrets.compare_digest(echo, t.challenge.encode()):
                t.state = "up"                   # path validated: it may carry data now
                if a.last_tunnel is None or a.last_tunnel.state != "up":
                    a.last_tunnel = t
            else:
                challenge = t.challenge
        t.last_rx = a.last_rx = now
        return "KeepAliveResp", {"tunnelId": t.tid, "yourAddress": src[0], "yourPort": src[1],
                                 "challenge": challenge}

    def _on_HandoverReq(self, c: dict[str, Any], src: tuple[str, int], now: float,
                        session: Session) -> tuple[str, dict[str, Any]]:
        """Signalled handover (the original's HandoverReq): move these flows' downlink to
        this (validated) tunnel now, for flows that send nothing upstream to learn from.
        It came sealed through that very tunnel: its counter counts as the flows' newest."""
        a = self._assoc(session)
        t = a.tunnels.get(c["tunnelId"])
        if t is None or t.state != "up" or t.remote != src:
            raise Refused(501, "dead tunnel")
        flows = c["flows"]
        if len(flows) > 64:
            raise Refused(501, "bad UPMT signal: at most 64 flows per HandoverReq")
        moved = 0
        for item in flows:
            key = _flow_key(item)
            if key is None:
                raise Refused(501, "bad UPMT signal: flows are [proto, src, dst, sport, dport]")
            packed = pack_key(key)
            if key[1] != a.vipa_b and (not a.vipa6_b or key[1] != a.vipa6_b):
                raise Refused(403, "Forbidden: not this host's flow")
            got = self.fwd.paft.handover(packed, t.tid, self._seq, now)
            if got < 0 and self.fwd.paft.get(packed) is None:
                # a flow we do not know (we restarted and the host announces its flows
                # again): learn it on this tunnel, as its first uplink packet would
                # (the same caps); a downlink-only flow has no other way back
                got = 1 if self.fwd.paft.up(packed, t.tid, self._seq, now, 0) == 0 else 0
                if not got:
                    self.fwd.drops["flow_cap"] += 1
            if got > 0:
                moved += 1
        a.last_tunnel = t
        return "HandoverResp", {"moved": moved}

    def _on_PeerReq(self, c: dict[str, Any], src: tuple[str, int], now: float,
                    session: Session) -> tuple[str, dict[str, Any]]:
        """Mesh rendezvous: the name and public key of the host at a VIpA of this anchor,
        vouched for by the anchor (it authenticated that key). Only between mesh hosts;
        anything else is simply "not found" (no way to probe who is associated)."""
        a = self._assoc(session)
        if not a.mesh:
            raise Refused(403, "Forbidden: this host is not in the anchor's mesh")
        try:
            b = self.fwd.by_vipa.get(ipaddress.IPv4Address(c["vipa"]).packed)
        except ValueError:
            b = None
        peer = self.peers.get(b.mh) if b is not None else None
        if b is None or b is a or not b.mesh or peer is None:
            return "PeerResp", {"found": False}
        return "PeerResp", {"found": True, "name": b.mh, "vipa": b.vipa,
                            "publicKey": base64.b64encode(peer.public_key).decode()}

    @staticmethod
    def _challenge(t: Tunnel) -> str:
        return "" if t.state == "up" else t.challenge

    def expire(self, now: float, tunnel_idle: float, assoc_idle: float, flow_idle: float,
               session_life: float) -> None:
        """Forget sessions, tunnels, associations and flows that went silent (periodically);
        every :data:`LEASE_SWEEP` seconds, drop expired leases too."""
        if self._lease_sweep is None:
            self._lease_sweep = now + LEASE_SWEEP
        elif now >= self._lease_sweep:
            self._lease_sweep = now + LEASE_SWEEP
            self._compact_leases()
        for idx, s in list(self.fwd.sessions.items()):
            if now - s.created > session_life:
                del self.fwd.sessions[idx]
                a = self.fwd.by_mh.get(s.peer)
                if a is not None and a.session is s:
                    a.session = None
        for a in list(self.fwd.by_mh.values()):
            for t in list(a.tunnels.values()):
                if now - t.last_rx > tunnel_idle:
                    self.fwd.drop_tunnel(a, t)
            if (not a.tunnels or a.session is None) and now - a.last_rx > assoc_idle:
                log.info("association of %s (VIpA %s) expired", a.mh, a.vipa)
                self.fwd.remove_association(a)
        self.fwd.paft.expire(now, flow_idle)
