"""Sealed tunnel packets: AES-256-GCM with a counter nonce, and a replay window.

A :class:`Session` holds one direction pair of transport keys from a Noise
handshake. Every packet is sealed with the 16-byte tunnel header as associated
data (so the receiver index and the counter are authenticated too) and the
header's counter as nonce. :class:`ReplayWindow` is RFC 6479's ring of bitmap
blocks: :meth:`ReplayWindow.check` before the tag is verified,
:meth:`ReplayWindow.update` only after it verified, so a forged packet with a
huge counter cannot move the window.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .packet import HEADER, HEADER_LEN, TAG_LEN, TYPE_DATA, pack_header

log = logging.getLogger(__name__)

__all__ = ["PyReplayWindow", "ReplayWindow", "Session", "REJECT_AFTER_MESSAGES",
           "py_open_many", "py_seal_run"]

_NONCE = struct.Struct("!4xQ")     # as Noise's AESGCM: 32 zero bits, big-endian counter
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1   # as WireGuard: never wrap the nonce
BLOCK_BITS = 64
BLOCKS = 32                                        # window = (32 - 1) * 64 = 1984 packets


class PyReplayWindow:
    """RFC 6479 anti-replay window over 64-bit counters (the reference; the compiled
    ``_fast.ReplayWindow`` gives the same answers)."""

    __slots__ = ("blocks", "highest", "seen_any")
    WINDOW = (BLOCKS - 1) * BLOCK_BITS

    def __init__(self) -> None:
        self.blocks = [0] * BLOCKS
        self.highest = 0
        self.seen_any = False

    def check(self, counter: int) -> bool:
        """Could ``counter`` be new? (Cheap; call before verifying the tag.)"""
        if counter >= REJECT_AFTER_MESSAGES:
            return False
        if counter > self.highest or not self.seen_any:
            return True
        if self.highest - counter >= self.WINDOW:
            return False
        return not (self.blocks[(counter >> 6) % BLOCKS] >> (counter & 63)) & 1

    def update(self, counter: int) -> None:
        """Mark ``counter`` seen; call only after its tag verified and check() said yes."""
        if counter > self.highest or not self.seen_any:
            cur = self.highest >> 6 if self.seen_any else -1
            diff = min((counter >> 6) - cur, BLOCKS)
            for i in range(1, diff + 1):
                self.blocks[(cur + i) % BLOCKS] = 0
            self.highest = counter
            self.seen_any = True
        self.blocks[(counter >> 6) % BLOCKS] |= 1 << (counter & 63)


def py_seal_run(aead: Aead, word0: int, receiver: int, counter: int, payloads: list[bytes],
                plain: bool) -> bytes:
    """header + body per payload, back to back, counters from ``counter``; body =
    ``aead.encrypt(nonce, payload, header)`` or, ``plain``, the payload itself. The
    payloads are all of one size but a shorter last (a run, as one UDP GSO send carries
    it), else ValueError."""
    sizes = [len(p) for p in payloads]
    if not sizes:
        return b""
    if any(x > sizes[0] for x in sizes) or any(x < sizes[0] for x in sizes[:-1]):
        raise ValueError("payloads of one run: all of one size but a shorter last")
    pack = HEADER.pack
    out: list[bytes] = []
    add = out.append
    nonce, encrypt = _NONCE.pack, aead.encrypt
    for p in payloads:
        hdr = pack(word0, receiver, counter)
        add(hdr)
        add(bytes(p) if plain else encrypt(nonce(counter), p, hdr))
        counter += 1
    return b"".join(out)


def py_open_many(aead: Aead, window: Window, me: int, plain: bool, data: bytes, size: int
                 ) -> tuple[list[int], list[bytes], list[bytes], int]:
    """The DATA datagrams to session ``me`` among ``data``'s run of ``size``-byte
    datagrams, opened and checked against ``window``: (their counters, their plaintexts,
    the other datagrams, how many were dropped)."""
    if size <= 0:
        raise ValueError("size must be positive")
    counters: list[int] = []
    pts: list[bytes] = []
    others: list[bytes] = []
    bad = 0
    minimum = HEADER_LEN + (0 if plain else TAG_LEN)
    unpack, nonce, decrypt = HEADER.unpack_from, _NONCE.pack, aead.decrypt
    total = len(data)
    for at in range(0, total, size):
        end = min(at + size, total)
        if end - at < minimum or data[at] != TYPE_DATA:
            others.append(data[at:end])          # for the per-datagram path
            continue
        _, receiver, counter = unpack(data, at)
        if receiver != me:
            others.append(data[at:end])
            continue
        if not window.check(counter):
            bad += 1
            continue
        if plain:
            pt = data[at + HEADER_LEN:end]
        else:
            try:
                pt = decrypt(nonce(counter), data[at + HEADER_LEN:end], data[at:at + HEADER_LEN])
            except InvalidTag:
                bad += 1
                continue
        window.update(counter)
        counters.append(counter)
        pts.append(pt)
    return counters, pts, others, bad


class Aead(Protocol):
    """cryptography's AESGCM, or the compiled ``_fast.Aead`` (one key, one direction)."""

    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes: ...
    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes: ...


def new_aead(key: bytes, seal: bool) -> Aead:
    """AES-256-GCM for ``key``: on the system's libcrypto with one context per key when
    ``_fast`` loaded it (no per-packet key setup), else cryptography's AESGCM (the same
    bytes). ``UPMT_AEAD=cryptography`` in the environment forces the latter
    (``UPMT_AEAD=evp``: libcrypto through EVP, see ``_fast.AEAD_PATH``)."""
    if _FastAead is not None and os.environ.get("UPMT_AEAD") != "cryptography" \
            and _fast_aead_works():
        return _FastAead(key, seal)
    return AESGCM(key)


_fast_checked: list[bool] = []


def _fast_aead_works() -> bool:
    """Once per process: does the libcrypto AEAD give cryptography's bytes, and open
    them? (A libcrypto that refuses, e.g. one in FIPS mode that will not take our nonce,
    or anything else odd, means cryptography's AESGCM for every session, not a failure.)"""
    if not _fast_checked:
        key, nonce, ad, msg = bytes(range(32)), bytes(range(12)), b"upmt", bytes(range(100))
        try:
            assert _FastAead is not None
            ct = _FastAead(key, True).encrypt(nonce, msg, ad)
            ok = ct == AESGCM(key).encrypt(nonce, msg, ad) and \
                _FastAead(key, False).decrypt(nonce, ct, ad) == msg
        except Exception as e:  # noqa: BLE001 - whatever it is, do not use it
            log.info("libcrypto AES-GCM not usable (%s): using cryptography's", e)
            ok = None
        if ok is False:
            log.info("libcrypto AES-GCM disagrees with cryptography's: using cryptography's")
        _fast_checked.append(bool(ok))
    return _fast_checked[0]


class Window(Protocol):
    def check(self, counter: int) -> bool: ...
    def update(self, counter: int) -> None: ...


try:   # the compiled loops around the AEAD calls, when pip built them
    from ._fast import LIBCRYPTO as _LIBCRYPTO
    from ._fast import Aead as _CAead
    from ._fast import ReplayWindow as _CReplayWindow
    from ._fast import open_many as _c_open_many
    from ._fast import seal_run as _c_seal_run
except ImportError:   # pragma: no cover - depends on the build
    ReplayWindow: type[PyReplayWindow] | type[_CReplayWindow] = PyReplayWindow
    _seal_run = py_seal_run
    _open_many: Callable[..., tuple[list[int], list[bytes], list[bytes], int]] = py_open_many
    _FastAead: type[_CAead] | None = None
else:
    _FastAead = _CAead if _LIBCRYPTO else None
    ReplayWindow = _CReplayWindow
    _seal_run = _c_seal_run
    _open_many = _c_open_many


class Session:
    """Transport keys of one handshake: seal towards the peer, open what it sent."""

    __slots__ = ("local_index", "remote_index", "_send", "_recv", "send_counter", "window",
                 "created", "peer", "rx_packets", "generation", "plain_data", "plain_window")

    def __init__(self, local_index: int, remote_index: int, send_key: bytes, recv_key: bytes,
                 created: float, peer: str = "", generation: int = 0,
                 plain_data: bool = False) -> None:
        self.local_index = local_index
        self.remote_index = remote_index
        self._send = new_aead(send_key, True)
        self._recv = new_aead(recv_key, False)
        self.send_counter = 0
        self.window = ReplayWindow()
        self.created = created
        self.peer = peer
        self.rx_packets = 0
        self.generation = generation     # orders sessions of one association (rekeys)
        self.plain_data = plain_data     # insecure_plaintext_for_benchmarks: DATA unsealed
        # unsealed DATA gets its own window: a forged one must not block sealed signalling
        self.plain_window = ReplayWindow()

    def seal(self, ptype: int, payload: bytes | bytearray, path: int = 0) -> bytes:
        """Header (to the peer's index, on the peer's tunnel ``path``) + ciphertext + tag."""
        n = self.send_counter
        if n >= REJECT_AFTER_MESSAGES:
            raise OverflowError("session exhausted: rekey")
        self.send_counter = n + 1
        hdr = pack_header(ptype, self.remote_index, n, path)
        if self.plain_data and ptype == TYPE_DATA:
            return hdr + payload
        return hdr + self._send.encrypt(_NONCE.pack(n), bytes(payload), hdr)

    def seal_run(self, ptype: int, payloads: list[bytes], path: int = 0) -> bytes:
        """:meth:`seal` of each payload, back to back in one buffer, counters consecutive:
        a run of datagrams that one UDP GSO send carries (``PathSocket.queue_run``) and a
        GRO read hands over (:meth:`open_many`). The payloads are all of one size but a
        shorter last (``offload.tso_split``'s segments), else ValueError."""
        n = self.send_counter
        end = n + len(payloads)
        if end > REJECT_AFTER_MESSAGES:
            raise OverflowError("session exhausted: rekey")
        out = _seal_run(self._send, ptype << 24 | path, self.remote_index, n,
                        payloads, self.plain_data and ptype == TYPE_DATA)
        self.send_counter = end
        return out

    def open_many(self, data: bytes, size: int
                  ) -> tuple[list[int], list[bytes], list[bytes], int]:
        """Open the DATA datagrams to this session in ``data``, a run of datagrams of
        ``size`` bytes (the last may be shorter) as UDP GRO hands them over: (their
        counters, their plaintexts, the datagrams that are something else (the caller's
        per-datagram path), how many were dropped (replayed, forged)). Same checks as
        :meth:`open`, in order."""
        plain = self.plain_data
        res = _open_many(self._recv, self.plain_window if plain else self.window,
                         self.local_index, plain, data, size)
        self.rx_packets += len(res[0])
        return res

    def open(self, data: bytes) -> tuple[int, bytes] | None:
        """(counter, plaintext) of a packet addressed to this session, or None (drop)."""
        plain = self.plain_data and data[0] == TYPE_DATA
        if len(data) < HEADER_LEN + (0 if plain else TAG_LEN):
            return None
        counter = HEADER.unpack_from(data)[2]
        if plain:
            if not self.plain_window.check(counter):
                return None
            self.plain_window.update(counter)
            self.rx_packets += 1
            return counter, data[HEADER_LEN:]
        if not self.window.check(counter):
            return None
        try:
            pt = self._recv.decrypt(_NONCE.pack(counter), data[HEADER_LEN:], data[:HEADER_LEN])
        except InvalidTag:
            return None
        self.window.update(counter)
        self.rx_packets += 1
        return counter, pt
