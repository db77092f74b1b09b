"""Tunnel packet codec and the demultiplexer of the shared UDP port.

Wire format (DESIGN.md): one UDP port carries tunnel packets, STUN and SIP.
The first byte decides, data first:

* ``>= 0x80``   ours: 0x80 DATA and 0x83 CONTROL (sealed SIP) are a 16-byte header,
  the ChaCha20-Poly1305 ciphertext and its 16-byte tag::

      0      1      2      3      4               8                      16
      | type | 0    | 0    | 0    | receiver index| counter (u64)        | ciphertext | tag

  The receiver index is the receiving end's *session* index; the header is the
  AEAD's associated data and the counter its nonce (``crypto.Session``). 0x81,
  0x82 and 0x84 are the handshake packets (``signalling.handshake``). The MTU
  budget (:data:`OVERHEAD`) counts the tag.
* top two bits ``00`` and the STUN magic cookie at offset 4: STUN.
* an ASCII letter: SIP text.

Everything else is :data:`KIND_JUNK`: counted and dropped by the caller.
"""

from __future__ import annotations

import struct

__all__ = [
    "HEADER",
    "HEADER_LEN",
    "KIND_DATA",
    "KIND_JUNK",
    "KIND_SIP",
    "KIND_STUN",
    "OVERHEAD",
    "TYPE_DATA",
    "MalformedPacket",
    "classify",
    "encode_data",
]

TYPE_DATA = 0x80
TYPE_HS_INIT = 0x81
TYPE_HS_RESP = 0x82
TYPE_CONTROL = 0x83      # a sealed SIP message
TYPE_COOKIE = 0x84       # a cookie reply to a handshake initiation (signalling/handshake.py)
HEADER = struct.Struct("!B3xIQ")
HEADER_LEN = HEADER.size  # 16
TAG_LEN = 16
IPV4_UDP = 28
OVERHEAD = IPV4_UDP + HEADER_LEN + TAG_LEN  # 60: keep encryption from changing the MTU
STUN_COOKIE = b"\x21\x12\xa4\x42"

KIND_TUNNEL = 1          # one of our types 0x80..0x84: look at data[0]
KIND_DATA = KIND_TUNNEL
KIND_STUN = 2
KIND_SIP = 3
KIND_JUNK = 0

_SIP_FIRST = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")


class MalformedPacket(ValueError):
    """Remote garbage: count and drop, never raise out of a callback."""


def classify(data: bytes | bytearray | memoryview) -> int:
    """Which protocol a datagram on the shared port belongs to (one comparison for data)."""
    if not data:
        return KIND_JUNK
    b0 = data[0]
    if b0 >= 0x80:
        return KIND_TUNNEL if b0 <= TYPE_COOKIE and len(data) >= HEADER_LEN else KIND_JUNK
    if b0 < 0x40:
        if len(data) >= 20 and data[4:8] == STUN_COOKIE:
            return KIND_STUN
        return KIND_JUNK
    if b0 in _SIP_FIRST:
        return KIND_SIP
    return KIND_JUNK


def encode_data(receiver: int, counter: int, inner: bytes | bytearray) -> bytes:
    """A DATA packet for the peer whose tunnel id is ``receiver``."""
    return HEADER.pack(TYPE_DATA, receiver, counter) + inner


def decode_header(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(receiver index, counter) of a DATA packet already classified as KIND_DATA."""
    _, receiver, counter = HEADER.unpack_from(data)
    return receiver, counter
