"""Link, address and default-route events from the kernel (rtnetlink), without pyroute2.

:class:`LinkWatch` binds a NETLINK_ROUTE socket to the link, IPv4 address and IPv4
route groups and reports :data:`Event` tuples ``(kind, ifindex, usable)``:

* ``("link", i, usable)`` for RTM_NEWLINK/RTM_DELLINK, usable = administratively up
  *and* carrier (IFF_UP and IFF_LOWER_UP);
* ``("addr", i, False)`` when an IPv4 address of interface i was added or removed;
* ``("route", i, False)`` when an IPv4 default route of the main table through
  interface i was added or removed (i = 0: a default route without an output
  interface, e.g. multipath: concerns every interface).

The caller re-reads the interface (address, gateway) on addr/route events. With
``on_name``, every RTM_NEWLINK/RTM_DELLINK is also reported as ``(ifindex, name,
exists)`` *before* its event (:func:`link_names`): devices created after the start, or
deleted and created again with a new index, are followed (:mod:`upmt_tun.hotplug`).
:func:`parse` and :func:`link_names` are pure (tested on bytes).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable, Iterator

from .nlmsg import messages

__all__ = ["Event", "LinkName", "LinkWatch", "link_names", "parse"]

RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_NEWROUTE = 24
RTM_DELROUTE = 25
IFF_UP = 0x1
IFF_LOWER_UP = 0x10000
AF_INET = 2
AF_INET6 = 10
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
RT_TABLE_MAIN = 254
RTA_OIF = 4
IFLA_IFNAME = 3
RTA_TABLE = 15
_IFINFO = struct.Struct("=BxHiII")        # family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")         # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")      # family, dst_len, src_len, tos, table, proto, ...
_RTA = struct.Struct("=HH")               # attribute length, type

Event = tuple[str, int, bool]
LinkName = tuple[int, str | None, bool]     # ifindex, name (None: not given), exists


def _route(body: bytes) -> Iterator[Event]:
    family, dst_len, _, _, table, _, _, _, _ = _RTMSG.unpack_from(body)
    if family not in (AF_INET, AF_INET6) or dst_len != 0:
        return
    oif = 0
    off = _RTMSG.size
    while off + _RTA.size <= len(body):
        alen, atype = _RTA.unpack_from(body, off)
        if alen < _RTA.size or off + alen > len(body):
            return
        if atype == RTA_OIF and alen >= 8:
            oif = struct.unpack_from("=I", body, off + 4)[0]
        elif atype == RTA_TABLE and alen >= 8:
            table = struct.unpack_from("=I", body, off + 4)[0]
        off += (alen + 3) & ~3
    if table == RT_TABLE_MAIN:
        yield "route", oif, False


def parse(data: bytes) -> Iterator[Event]:
    """The events in one netlink datagram; ignores everything else."""
    for mtype, _seq, body in messages(data):
        if mtype in (RTM_NEWLINK, RTM_DELLINK) and len(body) >= _IFINFO.size:
            _, _, index, flags, _ = _IFINFO.unpack_from(body)
            usable = mtype == RTM_NEWLINK and flags & IFF_UP and flags & IFF_LOWER_UP
            yield "link", index, bool(usable)
        elif mtype in (RTM_NEWADDR, RTM_DELADDR) and len(body) >= _IFADDR.size:
            family, _, _, _, index = _IFADDR.unpack_from(body)
            if family in (AF_INET, AF_INET6):
                yield "addr", index, False
        elif mtype in (RTM_NEWROUTE, RTM_DELROUTE) and len(body) >= _RTMSG.size:
            yield from _route(body)


def _ifname(body: bytes) -> str | None:
    off = _IFINFO.size
    while off + _RTA.size <= len(body):
        alen, atype = _RTA.unpack_from(body, off)
        if alen < _RTA.size or off + alen > len(body):
            return None
        if atype == IFLA_IFNAME and alen > _RTA.size:
            raw = body[off + _RTA.size:off + alen].split(b"\0", 1)[0]
            return raw.decode("utf-8", "replace") or None
        off += (alen + 3) & ~3
    return None


def link_names(data: bytes) -> Iterator[LinkName]:
    """(index, name, exists) of every RTM_NEWLINK (exists) / RTM_DELLINK in a datagram."""
    for mtype, _seq, body in messages(data):
        if mtype in (RTM_NEWLINK, RTM_DELLINK) and len(body) >= _IFINFO.size:
            index = _IFINFO.unpack_from(body)[2]
            yield index, _ifname(body), mtype == RTM_NEWLINK


class LinkWatch:
    def __init__(self, loop: asyncio.AbstractEventLoop,
                 on_event: Callable[[str, int, bool], None],
                 on_name: Callable[[int, str | None, bool], None] | None = None) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.setblocking(False)
        self.sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE
                        | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE))
        self.on_event = on_event
        self.on_name = on_name
        self.loop = loop
        loop.add_reader(self.sock.fileno(), self.readable)

    def readable(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:       # ENOBUFS: events lost; re-check every interface
                if self.on_name is not None:
                    self.on_name(0, None, False)      # 0: re-read every device
                self.on_event("route", 0, False)
                return
            if self.on_name is not None:
                for index, name, exists in link_names(data):
                    self.on_name(index, name, exists)
            for kind, index, usable in parse(data):
                self.on_event(kind, index, usable)

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
