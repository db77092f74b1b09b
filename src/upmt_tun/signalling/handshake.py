"""Handshake packets on the shared UDP port (Noise IK inside, WireGuard-style framing).

::

    HS_INIT  0x81 | 0 0 0 | sender idx (4) | Noise msg 1 (32 e + 48 s + 28 timestamp) | mac1 (16)
    HS_RESP  0x82 | 0 0 0 | sender idx (4) | receiver idx (4) | Noise msg 2 (32 e + 16) | mac1 (16)

* ``mac1`` = keyed BLAKE2s-128 over the bytes before it, keyed with
  BLAKE2s("mac1----" || receiver's static public key): the anchor drops, before
  any DH, everything from senders who do not even know its public key.
* The initiation's encrypted payload is a TAI64N timestamp; the responder keeps
  the newest one per peer and ignores any initiation not newer (a replayed
  initiation creates nothing).
* :class:`RateLimiter` bounds handshake work per source address and overall.

Pure: wall-clock time and monotonic ``now`` are passed in.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ..dataplane.crypto import Session
from .noise import HandshakeState, NoiseError

__all__ = ["HS_INIT", "HS_RESP", "Initiation", "RateLimiter", "Responder", "mac1_key"]

HS_INIT = 0x81
HS_RESP = 0x82
_INIT_HDR = struct.Struct("!B3xI")
_RESP_HDR = struct.Struct("!B3xII")
_TAI64N = struct.Struct("!QI")
TAI64_BASE = 0x400000000000000A
MAC_LEN = 16
INIT_LEN = _INIT_HDR.size + 32 + 48 + 12 + 16 + MAC_LEN     # 132
RESP_LEN = _RESP_HDR.size + 32 + 16 + MAC_LEN               # 76


def mac1_key(static_pub: bytes) -> bytes:
    return hashlib.blake2s(b"mac1----" + static_pub).digest()


def _mac(key: bytes, data: bytes) -> bytes:
    return hashlib.blake2s(data, key=key, digest_size=MAC_LEN).digest()


def tai64n(wall_ns: int) -> bytes:
    return _TAI64N.pack(TAI64_BASE + wall_ns // 1_000_000_000, wall_ns % 1_000_000_000)


class Initiation:
    """The mobile host's side of one handshake attempt with one anchor."""

    def __init__(self, *, static: bytes, remote_static: bytes, local_index: int, wall_ns: int,
                 ephemeral: bytes | None = None) -> None:
        self.hs = HandshakeState(initiator=True, static=static, remote_static=remote_static,
                                 ephemeral=ephemeral)
        self.local_index = local_index
        self._resp_mac = mac1_key(self.hs.s_pub)
        body = _INIT_HDR.pack(HS_INIT, local_index) + self.hs.write_message1(tai64n(wall_ns))
        self.packet = body + _mac(mac1_key(remote_static), body)

    def consume(self, data: bytes, now: float, peer: str = "") -> Session | None:
        """The anchor's HS_RESP -> the session, or None if it is not the answer to us."""
        if len(data) != RESP_LEN or data[0] != HS_RESP:
            return None
        body, mac = data[:-MAC_LEN], data[-MAC_LEN:]
        if not hmac.compare_digest(_mac(self._resp_mac, body), mac):
            return None
        _, sender, receiver = _RESP_HDR.unpack_from(data)
        if receiver != self.local_index:
            return None
        try:
            self.hs.read_message2(body[_RESP_HDR.size:])
        except NoiseError:
            return None
        send, recv = self.hs.split()
        return Session(self.local_index, sender, send, recv, now, peer)


@dataclass
class Accepted:
    """A verified initiation: who it is, the session, and the HS_RESP to send back."""

    peer: str
    peer_key: bytes
    session: Session
    response: bytes


class Responder:
    """The anchor's side: verifies initiations from authorized peers only."""

    def __init__(self, static: bytes, peers: dict[bytes, str]) -> None:
        self.static = static
        self.peers = peers                       # static public key -> peer name
        self.hs_probe = HandshakeState(initiator=False, static=static)
        self._mac1 = mac1_key(self.hs_probe.s_pub)
        self.newest: dict[bytes, bytes] = {}     # peer key -> newest TAI64N seen

    def mac_ok(self, data: bytes) -> bool:
        """Cheap pre-check (no DH): right length, type and mac1."""
        return (len(data) == INIT_LEN and data[0] == HS_INIT and
                hmac.compare_digest(_mac(self._mac1, data[:-MAC_LEN]), data[-MAC_LEN:]))

    def accept(self, data: bytes, now: float, new_index: Callable[[], int],
               ephemeral: bytes | None = None) -> Accepted | None:
        """Full verification of an initiation whose mac1 is OK; None: ignore it silently."""
        hs = HandshakeState(initiator=False, static=self.static, ephemeral=ephemeral)
        try:
            ts = hs.read_message1(data[_INIT_HDR.size:-MAC_LEN])
        except NoiseError:
            return None
        peer_key = hs.remote_static
        if peer_key is None or peer_key not in self.peers or len(ts) != 12:
            return None
        if ts <= self.newest.get(peer_key, b""):
            return None                          # replayed (or reordered old) initiation
        self.newest[peer_key] = ts
        sender = _INIT_HDR.unpack_from(data)[1]
        index = new_index()
        body = _RESP_HDR.pack(HS_RESP, index, sender) + hs.write_message2(b"")
        response = body + _mac(mac1_key(peer_key), body)
        recv, send = hs.split()
        peer = self.peers[peer_key]
        return Accepted(peer, peer_key, Session(index, sender, send, recv, now, peer), response)


class RateLimiter:
    """Token buckets per source address plus one global bucket, bounded in memory."""

    def __init__(self, per_source: float = 5.0, burst: float = 10.0, total: float = 200.0,
                 max_sources: int = 4096) -> None:
        self.rate, self.burst, self.total_rate = per_source, burst, total
        self.max_sources = max_sources
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self.total = (total, 0.0)

    def allow(self, source: str, now: float) -> bool:
        tokens, last = self.total
        tokens = min(self.total_rate, tokens + (now - last) * self.total_rate)
        if tokens < 1.0:
            self.total = (tokens, now)
            return False
        b_tokens, b_last = self.buckets.pop(source, (self.burst, now))
        b_tokens = min(self.burst, b_tokens + (now - b_last) * self.rate)
        ok = b_tokens >= 1.0
        self.buckets[source] = (b_tokens - 1.0 if ok else b_tokens, now)
        if len(self.buckets) > self.max_sources:
            self.buckets.popitem(last=False)
        self.total = (tokens - 1.0 if ok else tokens, now)
        return ok
