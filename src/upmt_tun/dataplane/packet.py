"""Tunnel packet codec and the demultiplexer of the shared UDP port.

Wire format (DESIGN.md): one UDP port carries tunnel packets, STUN and SIP.
The first byte decides, data first:

* ``>= 0x80``   ours: 0x80 DATA, 0x83 CONTROL (sealed SIP), 0x85 PATH_CHALLENGE,
  0x86 PATH_RESPONSE, 0x87 PING and 0x88 PONG are a 16-byte header, the
  AES-256-GCM ciphertext and its 16-byte tag::

      0      1                    4               8                      16
      | type | path id (u24)      | receiver index| counter (u64)        | ciphertext | tag

  The path id is the receiver's id for the tunnel the packet travels on (0: none),
  so a tunnel is recognised when a NAT rebinding changes its outer address. The
  receiver index is the receiving end's *session* index; the header is the AEAD's
  associated data and the counter its nonce (``crypto.Session``). 0x81, 0x82 and
  0x84 are the handshake packets (``signalling.handshake``). The MTU budget
  (:data:`OVERHEAD`) counts the tag.
  0x89 RELAY carries a datagram between two hosts of one anchor's mesh (UPMT-DAM): its
  payload is the other host's VIpA (4 bytes: the destination on the way up, the source
  on the way down) and that datagram, which the two hosts sealed end to end; the anchor
  opens and re-seals only the hop (as DERP forwards WireGuard packets it cannot read).
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
    "OVERHEAD6",
    "TYPE_DATA",
    "PATH_MAX",
    "PROBE",
    "TYPE_PATH_CHALLENGE",
    "TYPE_PATH_RESPONSE",
    "TYPE_PING",
    "TYPE_PONG",
    "TYPE_RELAY",
    "MalformedPacket",
    "classify",
    "datagrams",
    "decode_header",
    "encode_data",
    "pack_header",
    "path_id",
]

TYPE_DATA = 0x80
TYPE_HS_INIT = 0x81
TYPE_HS_RESP = 0x82
TYPE_CONTROL = 0x83      # a sealed SIP message
TYPE_COOKIE = 0x84       # a cookie reply to a handshake initiation (signalling/handshake.py)
TYPE_PATH_CHALLENGE = 0x85   # anchor -> host: prove you receive at this new outer address
TYPE_PATH_RESPONSE = 0x86    # host -> anchor: the challenge's token, from that address
TYPE_PING = 0x87             # host -> anchor: path probe (its send time), also a NAT keepalive
TYPE_PONG = 0x88             # anchor -> host: the probe's payload, echoed
TYPE_RELAY = 0x89            # host <-> anchor: a mesh peer's datagram, relayed (see below)
TYPE_LAST = TYPE_RELAY
RELAY_ADDR_LEN = 4           # the other host's VIpA at the head of a RELAY payload
HEADER = struct.Struct("!IIQ")   # (type << 24 | path id), receiver index, counter
HEADER_LEN = HEADER.size  # 16
PROBE = struct.Struct("!d")      # a PING's payload: the sender's send time, echoed in the PONG
PATH_MAX = 0xFFFFFF
TAG_LEN = 16
IPV4_UDP = 28
OVERHEAD = IPV4_UDP + HEADER_LEN + TAG_LEN  # 60: keep encryption from changing the MTU
OVERHEAD6 = OVERHEAD + 20                   # 80: over IPv6 (40-byte header, not 20)
STUN_COOKIE = b"\x21\x12\xa4\x42"

KIND_TUNNEL = 1          # one of our types 0x80..0x88: look at data[0]
KIND_DATA = KIND_TUNNEL
KIND_STUN = 2
KIND_SIP = 3
KIND_JUNK = 0

_SIP_FIRST = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def datagrams(data: bytes, size: int) -> list[bytes]:
    """The datagrams of one UDP GRO read: ``size`` bytes each, the last maybe shorter."""
    return [data[at:at + size] for at in range(0, len(data), size)]


class MalformedPacket(ValueError):
    """Remote garbage: count and drop, never raise out of a callback."""


def classify(data: bytes | bytearray | memoryview) -> int:
    """Which protocol a datagram on the shared port belongs to (one comparison for data)."""
    if not data:
        return KIND_JUNK
    b0 = data[0]
    if b0 >= 0x80:
        return KIND_TUNNEL if b0 <= TYPE_LAST and len(data) >= HEADER_LEN else KIND_JUNK
    if b0 < 0x40:
        if len(data) >= 20 and data[4:8] == STUN_COOKIE:
            return KIND_STUN
        return KIND_JUNK
    if b0 in _SIP_FIRST:
        return KIND_SIP
    return KIND_JUNK


def pack_header(ptype: int, receiver: int, counter: int, path: int = 0) -> bytes:
    """The 16-byte header of a sealed packet."""
    return HEADER.pack(ptype << 24 | path, receiver, counter)


def path_id(data: bytes | bytearray | memoryview) -> int:
    """The path id of a packet at least HEADER_LEN long."""
    return int.from_bytes(data[1:4], "big")


def encode_data(receiver: int, counter: int, inner: bytes | bytearray, path: int = 0) -> bytes:
    """An unsealed DATA packet (benchmark-only plaintext mode, tests)."""
    return pack_header(TYPE_DATA, receiver, counter, path) + inner


def decode_header(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(receiver index, counter) of a packet already classified as KIND_TUNNEL."""
    _, receiver, counter = HEADER.unpack_from(data)
    return receiver, counter
