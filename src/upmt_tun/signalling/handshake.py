"""Handshake packets on the shared UDP port (Noise IK inside, WireGuard-style framing).

::

    HS_INIT    0x81 | 0 0 0 | sender idx (4) | Noise msg 1 (32 e + 48 s + 28 timestamp)
                    | mac1 (16) | mac2 (16)                                       148 bytes
    HS_RESP    0x82 | 0 0 0 | sender idx (4) | receiver idx (4) | Noise msg 2 (32 e + 16)
                    | mac1 (16)                                                    76 bytes
    HS_COOKIE  0x84 | 0 0 0 | receiver idx (4) = the initiation's sender idx | nonce (12)
                    | ChaCha20-Poly1305(cookie (16)) + tag (16)                    52 bytes

* ``mac1`` = keyed BLAKE2s-128 over the bytes before it, keyed with
  BLAKE2s("mac1----" || receiver's static public key): the anchor drops, before
  any DH, everything from senders who do not even know its public key.
* The initiation's encrypted payload is a TAI64N timestamp; the responder keeps
  the newest one per peer and ignores any initiation not newer (a replayed
  initiation creates nothing).
* :class:`HandshakeGate` decides which initiations get a DH and queues them for a
  worker apart from the data path (bounded queue); it says when the anchor is *under
  load* (the queue fills, or mac1-valid initiations arrive beyond the global rate, within
  the last second). Only then do cookies and per-source limits apply.

Cookies (WireGuard's mac2 / cookie reply, against floods from forged sources): mac1 only
proves that the sender knows the anchor's public key, which is no secret. Under load the
anchor does no DH for an initiation unless its ``mac2`` proves that its source address
can receive: ``mac2`` = keyed BLAKE2s-128(key = cookie, data = the initiation up to and
including mac1), sent as 16 zero bytes when the initiator has no cookie. To such an
initiation the anchor answers, only while under load, with HS_COOKIE (smaller than the
initiation: no amplification) and stays silent otherwise:

* cookie = keyed BLAKE2s-128(key = a random secret replaced every 2 minutes, data = the
  source's packed IP address and big-endian port): stateless at the anchor, different
  per source address and port, and no use after the secret changed;
* sealed with ChaCha20-Poly1305 under BLAKE2s("cookie--" || the anchor's static public
  key), with the initiation's mac1 as associated data: only the initiator of that very
  initiation accepts it (a third party cannot push a cookie onto it, and replaying a
  cookie reply to another initiation fails);
* the nonce: WireGuard uses XChaCha20-Poly1305 with a 24-byte random nonce; the
  ``cryptography`` package has no XChaCha, so this is plain ChaCha20-Poly1305 with a
  **12-byte random nonce** (the field is 12 bytes, not 24). The key never changes (it
  derives from the static key), so random 96-bit nonces repeat with probability about
  n^2 / 2^97 after n replies: ~2^-33 after 2^32 replies (a day of a 50 000/s flood). A
  repeat would let an eavesdropper forge cookie replies, which buys nothing an on-path
  attacker does not already have (it sees the cookies, and can drop the handshake).

Cookie replies are themselves bounded (a global token bucket, :class:`HandshakeGate`):
under a flood from many forged sources each costs the anchor a BLAKE2s, a seal and a
send, and beyond the bucket the initiation is a counted drop (a real host retries).

The initiator keeps a cookie for :data:`COOKIE_LIFE` seconds and adds mac2 to its
next initiations (the agent retries at once when a cookie arrives); forged sources never
see their cookies, so under load their initiations never reach the DH.

Pure: wall-clock time, monotonic ``now`` and randomness are passed in.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import socket
import struct
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from ..dataplane.crypto import Session
from ..dataplane.packet import TYPE_COOKIE
from .noise import HandshakeState, NoiseError

__all__ = ["COOKIE", "COOKIE_LEN", "COOKIE_LIFE", "COOKIE_LIMITED", "COOKIE_SECRET_LIFE",
           "HS_COOKIE", "HS_INIT", "HS_RESP", "INIT_LEN", "QUEUED", "QUEUE_FULL", "RATE_LIMITED",
           "RESP_LEN", "HandshakeGate", "Initiation", "RateLimiter", "Responder", "TokenBucket",
           "cookie_key", "mac1_key"]

HS_INIT = 0x81
HS_RESP = 0x82
HS_COOKIE = TYPE_COOKIE                                         # 0x84
_INIT_HDR = struct.Struct("!B3xI")
_RESP_HDR = struct.Struct("!B3xII")
_COOKIE_HDR = struct.Struct("!B3xI")
_TAI64N = struct.Struct("!QI")
TAI64_BASE = 0x400000000000000A
MAC_LEN = 16
COOKIE_NONCE_LEN = 12
INIT_LEN = _INIT_HDR.size + 32 + 48 + 12 + 16 + 2 * MAC_LEN   # 148
RESP_LEN = _RESP_HDR.size + 32 + 16 + MAC_LEN                 # 76
COOKIE_LEN = _COOKIE_HDR.size + COOKIE_NONCE_LEN + MAC_LEN + 16  # 52
COOKIE_SECRET_LIFE = 120.0     # the anchor replaces its cookie secret this often
COOKIE_LIFE = 120.0            # the initiator uses a cookie this long after it arrived
MIN_KEEP = 0.001               # the kernel filter keeps at least this share of a flood
_NO_MAC2 = bytes(MAC_LEN)


def mac1_key(static_pub: bytes) -> bytes:
    return hashlib.blake2s(b"mac1----" + static_pub).digest()


def cookie_key(static_pub: bytes) -> bytes:
    """The key that seals cookie replies of the responder whose static key is given."""
    return hashlib.blake2s(b"cookie--" + static_pub).digest()


def _mac(key: bytes, data: bytes) -> bytes:
    return hashlib.blake2s(data, key=key, digest_size=MAC_LEN).digest()


def _addr_bytes(src: tuple[str, int]) -> bytes:
    """The packed source address and port (the cookie's data); its text if not an IP."""
    host, port = src[0], src[1]
    try:
        packed = socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:                          # e.g. "fe80::1%eth0"
        packed = host.encode()
    return packed + (port & 0xFFFF).to_bytes(2, "big")


def _mac2_ok(data: bytes, cookie: bytes) -> bool:
    mac2 = data[-MAC_LEN:]                   # zero: no cookie (not worth a BLAKE2s)
    return mac2 != _NO_MAC2 and hmac.compare_digest(_mac(cookie, data[:-MAC_LEN]), mac2)


def tai64n(wall_ns: int) -> bytes:
    return _TAI64N.pack(TAI64_BASE + wall_ns // 1_000_000_000, wall_ns % 1_000_000_000)


class Initiation:
    """The mobile host's side of one handshake attempt with one anchor.

    ``cookie``: the anchor's latest cookie for our address (from :meth:`consume_cookie`
    of an earlier attempt, younger than COOKIE_LIFE), or None (mac2 is zero then)."""

    def __init__(self, *, static: bytes, remote_static: bytes, local_index: int, wall_ns: int,
                 ephemeral: bytes | None = None, cookie: bytes | None = None) -> None:
        self.hs = HandshakeState(initiator=True, static=static, remote_static=remote_static,
                                 ephemeral=ephemeral)
        self.local_index = local_index
        self.remote_static = remote_static
        self._resp_mac = mac1_key(self.hs.s_pub)
        body = _INIT_HDR.pack(HS_INIT, local_index) + self.hs.write_message1(tai64n(wall_ns))
        self.mac1 = _mac(mac1_key(remote_static), body)
        body += self.mac1
        self.packet = body + (_mac(cookie, body) if cookie else _NO_MAC2)

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

    def consume_cookie(self, data: bytes) -> bytes | None:
        """The anchor's HS_COOKIE for this initiation -> the cookie, else None."""
        if len(data) != COOKIE_LEN or data[0] != HS_COOKIE:
            return None
        if _COOKIE_HDR.unpack_from(data)[1] != self.local_index:
            return None
        nonce = data[_COOKIE_HDR.size:_COOKIE_HDR.size + COOKIE_NONCE_LEN]
        sealed = data[_COOKIE_HDR.size + COOKIE_NONCE_LEN:]
        try:
            return ChaCha20Poly1305(cookie_key(self.remote_static)).decrypt(nonce, sealed,
                                                                             self.mac1)
        except InvalidTag:
            return None


@dataclass
class Accepted:
    """A verified initiation: who it is, the session, and the HS_RESP to send back."""

    peer: str
    peer_key: bytes
    session: Session
    response: bytes


class Responder:
    """The anchor's side: verifies initiations from authorized peers only, and makes the
    cookies that prove a source address under load (``random_bytes``: the secret, nonces)."""

    def __init__(self, static: bytes, peers: dict[bytes, str], *,
                 random_bytes: Callable[[int], bytes] = os.urandom) -> None:
        self.static = static
        self.peers = peers                       # static public key -> peer name
        self.hs_probe = HandshakeState(initiator=False, static=static)
        self._mac1 = hashlib.blake2s(key=mac1_key(self.hs_probe.s_pub), digest_size=MAC_LEN)
        self._cookie_aead = ChaCha20Poly1305(cookie_key(self.hs_probe.s_pub))
        self._random = random_bytes
        self._nonces, self._nonce_at = b"", 0    # random nonces, fetched 256 at a time
        self._secret = b""
        self._secret_born = -math.inf
        self.newest: dict[bytes, bytes] = {}     # peer key -> newest TAI64N seen

    def mac_ok(self, data: bytes) -> bool:
        """Cheap pre-check (no DH): right length, type and mac1."""
        if len(data) != INIT_LEN or data[0] != HS_INIT:
            return False
        h = self._mac1.copy()                    # (cheaper than keying a new one)
        h.update(data[:-2 * MAC_LEN])
        return hmac.compare_digest(h.digest(), data[-2 * MAC_LEN:-MAC_LEN])

    def cookie(self, src: tuple[str, int], now: float) -> bytes:
        """The cookie of source address ``src`` (under the secret of the last 2 minutes)."""
        if now - self._secret_born >= COOKIE_SECRET_LIFE:
            self._secret = self._random(32)
            self._secret_born = now
        return _mac(self._secret, _addr_bytes(src))

    def mac2_ok(self, data: bytes, src: tuple[str, int], now: float,
                cookie: bytes | None = None) -> bool:
        """An initiation (mac1 already checked) whose mac2 proves that ``src`` receives
        (``cookie``: :meth:`cookie` of ``src`` at ``now``, if already computed)."""
        return _mac2_ok(data, cookie or self.cookie(src, now))

    def cookie_reply(self, data: bytes, src: tuple[str, int], now: float,
                     cookie: bytes | None = None) -> bytes:
        """HS_COOKIE for the initiation ``data`` (mac1 already checked) from ``src``."""
        at = self._nonce_at
        if at + COOKIE_NONCE_LEN > len(self._nonces):
            self._nonces, at = self._random(256 * COOKIE_NONCE_LEN), 0
        nonce = self._nonces[at:at + COOKIE_NONCE_LEN]
        self._nonce_at = at + COOKIE_NONCE_LEN
        return (_COOKIE_HDR.pack(HS_COOKIE, _INIT_HDR.unpack_from(data)[1]) + nonce +
                self._cookie_aead.encrypt(nonce, cookie or self.cookie(src, now),
                                          data[-2 * MAC_LEN:-MAC_LEN]))

    def accept(self, data: bytes, now: float, new_index: Callable[[], int],
               ephemeral: bytes | None = None) -> Accepted | None:
        """Full verification of an initiation whose mac1 is OK; None: ignore it silently."""
        hs = HandshakeState(initiator=False, static=self.static, ephemeral=ephemeral)
        try:
            ts = hs.read_message1(data[_INIT_HDR.size:-2 * MAC_LEN])
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


class TokenBucket:
    """``rate`` tokens per second up to ``burst`` (full at the first :meth:`take`). Pure."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = rate if burst is None else burst
        self.tokens = self.burst
        self.last: float | None = None

    def take(self, now: float) -> bool:
        """One token if there is one (the bucket refills since the last call)."""
        if not self.has(now):
            return False
        self.tokens -= 1.0
        return True

    def has(self, now: float) -> bool:
        """Is there a token (nothing taken)?"""
        if self.last is not None:
            self.tokens = min(self.burst, self.tokens + max(0.0, now - self.last) * self.rate)
        self.last = now
        return self.tokens >= 1.0


class RateLimiter:
    """One token bucket per key (a source address, a peer name), bounded in memory: the
    ``max_keys`` most recently seen keys are remembered (a forgotten key starts full)."""

    def __init__(self, rate: float = 5.0, burst: float = 10.0, max_keys: int = 4096) -> None:
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, key: str, now: float) -> bool:
        tokens, last = self.buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate)
        ok = tokens >= 1.0
        self.buckets[key] = (tokens - 1.0 if ok else tokens, now)
        if len(self.buckets) > self.max_keys:
            self.buckets.popitem(last=False)
        return ok


# what HandshakeGate.offer decided about one mac1-valid initiation
QUEUED = "queued"                    # in the queue: the worker will do its DH
COOKIE = "cookie"                    # under load, no valid mac2: send a cookie reply
COOKIE_LIMITED = "cookie_limited"    # ... but the cookie replies' own bucket is empty: drop
RATE_LIMITED = "rate_limited"        # under load, mac2 valid, its source's bucket is empty
QUEUE_FULL = "queue_full"            # no room in the handshake queue: drop


class HandshakeGate:
    """Which initiations (mac1 already valid) get a DH, and when (WireGuard's design).

    The datagram callback only does cheap checks and :meth:`offer`; the DH work (Noise
    IK, ~4 X25519) waits in a bounded queue that a worker drains a few per event-loop
    turn (:meth:`take`), so forwarding always gets its turn and a full queue drops.

    * **Under load** (:meth:`under_load`): the queue holds at least ``capacity // 8``
      initiations (wireguard-go's criterion), or mac1-valid initiations arrive beyond the
      global ``total``/s bucket (which counts every one, loaded or not); it lasts
      ``load_hold`` s after the last such moment.
    * Not under load: only the global bucket applies, no per-source limit: a forged
      source cannot spend a real host's budget (issue 17, item 2). The initiation that
      finds the global bucket empty puts the anchor under load and is handled so.
    * Under load: an initiation whose mac2 does not prove its source gets a cookie reply
      (no DH), as long as the cookie replies' own global bucket (``cookies``/s) lasts
      (beyond: a counted drop); one whose mac2 proves its source is charged to that
      source address's bucket (``per_source``/s, burst ``burst``): only sources that
      receive at their address can spend its budget.
    * Under load the bulk of a flood (no mac2, no cookie budget left) is shed before its
      mac1 is checked (:meth:`shed`), and :meth:`keep_fraction` tells the driver how much
      of it a kernel socket filter should let through at all.

    Pure: ``now`` and the mac2 check (``proven``, called only under load) are passed in.
    """

    def __init__(self, *, capacity: int = 256, total: float = 100.0, per_source: float = 5.0,
                 burst: float = 10.0, cookies: float = 3_000.0, load_hold: float = 1.0,
                 max_sources: int = 4096) -> None:
        self.capacity, self.load_hold = capacity, load_hold
        self.load_fill = max(1, capacity // 8)
        self.queue: deque[tuple[bytes, tuple[str, int]]] = deque()
        self.total = TokenBucket(total)
        self.cookies = TokenBucket(cookies)
        self.sources = RateLimiter(per_source, burst, max_sources)
        self.loaded_until = -math.inf
        self.unproven = 0              # mac2-less initiations seen under load, since ...
        self._keep_at: float | None = None          # ... keep_fraction's last call
        self.keep = 1.0

    def shed(self, data: bytes, now: float) -> bool:
        """Under load, an initiation without mac2 can earn nothing but a cookie reply: with
        the cookies' bucket empty it is dropped at once, before even its mac1 is checked
        (the cheapest drop, for the bulk of a flood). Takes nothing from any bucket."""
        if data[-MAC_LEN:] != _NO_MAC2 or not self.under_load(now):
            return False
        self.unproven += 1
        return not self.cookies.has(now)

    def keep_fraction(self, now: float) -> float:
        """Called about once a second: the fraction of mac2-less initiations that the
        kernel should keep (dataplane/shedfilter.py) so that about 1.5 times the cookie
        budget still reaches the anchor -- 1.0 (no filter) unless under load. The arrival
        rate before the filter is estimated from what passed it (:meth:`shed` counts them)."""
        last, self._keep_at = self._keep_at, now
        seen, self.unproven = self.unproven, 0
        if not self.under_load(now):
            self.keep = 1.0
        elif last is not None and now > last:
            arrivals = seen / (now - last) / self.keep
            target = 1.5 * self.cookies.rate
            self.keep = 1.0 if arrivals <= target else max(MIN_KEEP, target / arrivals)
        return self.keep

    def under_load(self, now: float) -> bool:
        if len(self.queue) >= self.load_fill:
            self.loaded_until = max(self.loaded_until, now + self.load_hold)
            return True
        return now < self.loaded_until

    def offer(self, data: bytes, src: tuple[str, int], now: float,
              proven: Callable[[], bool]) -> str:
        """Decide about one mac1-valid initiation from ``src``; QUEUED puts it in the queue."""
        loaded = self.under_load(now)
        if not self.total.take(now):          # (counted under load too: the load lasts
            self.loaded_until = now + self.load_hold    # as long as the flood goes on)
        elif not loaded:
            return self._put(data, src)
        if not proven():
            return COOKIE if self.cookies.take(now) else COOKIE_LIMITED
        if not self.sources.allow(src[0], now):
            return RATE_LIMITED
        return self._put(data, src)

    def _put(self, data: bytes, src: tuple[str, int]) -> str:
        if len(self.queue) >= self.capacity:
            return QUEUE_FULL
        self.queue.append((data, src))
        return QUEUED

    def take(self, n: int) -> list[tuple[bytes, tuple[str, int]]]:
        """Up to ``n`` queued initiations, oldest first."""
        q = self.queue
        return [q.popleft() for _ in range(min(n, len(q)))]
