"""Link events from the kernel (rtnetlink), without pyroute2: callable from the event loop.

:class:`LinkWatch` binds a NETLINK_ROUTE socket to the link group and reports, for
each RTM_NEWLINK/RTM_DELLINK, ``(ifindex, usable)`` where usable = administratively
up *and* carrier (IFF_UP and IFF_LOWER_UP). :func:`parse` is pure (tested on bytes).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable, Iterator

__all__ = ["LinkWatch", "parse"]

RTMGRP_LINK = 1
RTM_NEWLINK = 16
RTM_DELLINK = 17
IFF_UP = 0x1
IFF_LOWER_UP = 0x10000
_NLMSG = struct.Struct("=IHHII")          # len, type, flags, seq, pid
_IFINFO = struct.Struct("=BxHiII")        # family, type, index, flags, change


def parse(data: bytes) -> Iterator[tuple[int, bool]]:
    """(ifindex, usable) for every link message in one netlink datagram; ignores the rest."""
    off = 0
    while off + _NLMSG.size <= len(data):
        length, mtype, _, _, _ = _NLMSG.unpack_from(data, off)
        if length < _NLMSG.size or off + length > len(data):
            return
        if mtype in (RTM_NEWLINK, RTM_DELLINK) and length >= _NLMSG.size + _IFINFO.size:
            _, _, index, flags, _ = _IFINFO.unpack_from(data, off + _NLMSG.size)
            usable = mtype == RTM_NEWLINK and flags & IFF_UP and flags & IFF_LOWER_UP
            yield index, bool(usable)
        off += (length + 3) & ~3


class LinkWatch:
    def __init__(self, loop: asyncio.AbstractEventLoop,
                 on_change: Callable[[int, bool], None]) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.setblocking(False)
        self.sock.bind((0, RTMGRP_LINK))
        self.on_change = on_change
        self.loop = loop
        loop.add_reader(self.sock.fileno(), self.readable)

    def readable(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:       # ENOBUFS: events lost; the keepalives still catch up
                return
            for index, usable in parse(data):
                self.on_change(index, usable)

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
