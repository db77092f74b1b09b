"""Recognise STUN on the shared tunnel port (RFC 8489 section 6 and RFC 7983).

The driver demultiplexes data first (DESIGN.md, *Wire format*): a first byte ``>= 0x80``
is a tunnel packet and never reaches this function. What is left is STUN when the top two
bits of the first byte are 0, the magic cookie sits at offset 4, the length field counts
exactly the rest of the datagram in 4-byte words, and the datagram is no larger than any
check we or a peer would send. Everything here is a comparison on the first bytes: no
parsing, no allocation beyond one 4-byte slice.
"""

from __future__ import annotations

__all__ = ["MAX_STUN", "STUN_COOKIE", "STUN_HEADER_LEN", "is_stun"]

STUN_COOKIE = b"\x21\x12\xa4\x42"
STUN_HEADER_LEN = 20
MAX_STUN = 1200   # our checks are ~100 bytes; anything near an MTU is not a check


def is_stun(data: bytes | bytearray | memoryview) -> bool:
    """True when ``data`` is shaped like a STUN message (not yet parsed or authenticated)."""
    n = len(data)
    if n < STUN_HEADER_LEN or n > MAX_STUN or data[0] & 0xC0:
        return False
    if bytes(data[4:8]) != STUN_COOKIE:
        return False
    length = data[2] << 8 | data[3]
    return length == n - STUN_HEADER_LEN and not length & 3
