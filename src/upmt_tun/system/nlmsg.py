"""Walking the messages of one netlink datagram (shared by conntrack.py and linkwatch.py)."""

from __future__ import annotations

import struct
from collections.abc import Iterator

__all__ = ["NLMSGHDR", "messages"]

NLMSGHDR = struct.Struct("=IHHII")       # length, type, flags, sequence, port id


def messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, sequence number, payload) of each message, in order; stops at a header whose
    length does not fit (a truncated or malformed datagram)."""
    offset = 0
    while offset + NLMSGHDR.size <= len(data):
        length, kind, _flags, seq, _pid = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size or offset + length > len(data):
            return
        yield kind, seq, data[offset + NLMSGHDR.size:offset + length]
        offset += (length + 3) & ~3
