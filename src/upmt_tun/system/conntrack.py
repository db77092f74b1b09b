"""A minimal ctnetlink client (socket module only) to read a connection's ct mark.

The agent sees a packet on its TUN with no mark; the conntrack entry whose reply
tuple is that packet reversed tells which rule steered it (see DESIGN.md). One
request and one answer over a netlink socket: it blocks for microseconds and may be
called from inside a running asyncio loop. Not thread-safe.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct

from upmt_tun.system.errors import SystemSetupError
from upmt_tun.system.nlmsg import NLMSGHDR as _NLMSGHDR
from upmt_tun.system.nlmsg import messages

log = logging.getLogger(__name__)

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
NLM_F_REQUEST = 0x1
NLMSG_ERROR = 2
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF
NFNETLINK_V0 = 0

CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_MARK = 8
CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_IP_V4_SRC = 1
CTA_IP_V4_DST = 2
CTA_IP_V6_SRC = 3
CTA_IP_V6_DST = 4
CTA_PROTO_NUM = 1
CTA_PROTO_SRC_PORT = 2
CTA_PROTO_DST_PORT = 3
CTA_PROTO_ICMP_ID = 4
CTA_PROTO_ICMP_TYPE = 5
CTA_PROTO_ICMP_CODE = 6
CTA_PROTO_ICMPV6_ID = 7
CTA_PROTO_ICMPV6_TYPE = 8
CTA_PROTO_ICMPV6_CODE = 9

IPPROTO_ICMP = 1
ICMP_ECHOREPLY = 0
IPPROTO_ICMPV6 = 58
ICMPV6_ECHOREPLY = 129

_NFGENMSG = struct.Struct("=BBH")
_NLATTR = struct.Struct("=HH")
_RECV_SIZE = 65536


def _attr(kind: int, payload: bytes, nested: bool = False) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    header = _NLATTR.pack(_NLATTR.size + len(payload), kind | (NLA_F_NESTED if nested else 0))
    return header + payload + b"\0" * (-len(payload) % 4)


def _attrs(data: bytes) -> dict[int, bytes]:
    """Parse a run of netlink attributes into {type: payload} (last one wins)."""
    found: dict[int, bytes] = {}
    offset = 0
    while offset + _NLATTR.size <= len(data):
        length, kind = _NLATTR.unpack_from(data, offset)
        if length < _NLATTR.size or offset + length > len(data):
            break
        found[kind & NLA_TYPE_MASK] = data[offset + _NLATTR.size : offset + length]
        offset += (length + 3) & ~3
    return found


def reply_tuple(proto: int, src: str, dst: str, sport: int, dport: int) -> bytes:
    """CTA_TUPLE_REPLY attribute for (proto, src, dst, sport, dport).

    For ICMP (ICMPv6), ``sport`` is the echo id and the tuple is that of an echo reply.
    IPv6 addresses (a ``:`` in ``src``) make an IPv6 tuple.
    """
    if ":" in src:
        ip = (_attr(CTA_IP_V6_SRC, socket.inet_pton(socket.AF_INET6, src))
              + _attr(CTA_IP_V6_DST, socket.inet_pton(socket.AF_INET6, dst)))
    else:
        ip = (_attr(CTA_IP_V4_SRC, socket.inet_aton(src))
              + _attr(CTA_IP_V4_DST, socket.inet_aton(dst)))
    l4 = _attr(CTA_PROTO_NUM, struct.pack("B", proto))
    if proto == IPPROTO_ICMP:
        l4 += _attr(CTA_PROTO_ICMP_ID, struct.pack("!H", sport))
        l4 += _attr(CTA_PROTO_ICMP_TYPE, struct.pack("B", ICMP_ECHOREPLY))
        l4 += _attr(CTA_PROTO_ICMP_CODE, struct.pack("B", 0))
    elif proto == IPPROTO_ICMPV6:
        l4 += _attr(CTA_PROTO_ICMPV6_ID, struct.pack("!H", sport))
        l4 += _attr(CTA_PROTO_ICMPV6_TYPE, struct.pack("B", ICMPV6_ECHOREPLY))
        l4 += _attr(CTA_PROTO_ICMPV6_CODE, struct.pack("B", 0))
    else:
        l4 += _attr(CTA_PROTO_SRC_PORT, struct.pack("!H", sport))
        l4 += _attr(CTA_PROTO_DST_PORT, struct.pack("!H", dport))
    tuple_ = _attr(CTA_TUPLE_IP, ip, nested=True) + _attr(CTA_TUPLE_PROTO, l4, nested=True)
    return _attr(CTA_TUPLE_REPLY, tuple_, nested=True)


def parse_entry(payload: bytes) -> tuple[int, str] | None:
    """(ct mark, original source) from a CT_NEW message body (after nfgenmsg)."""
    top = _attrs(payload)
    orig = _attrs(top.get(CTA_TUPLE_ORIG, b""))
    ips = _attrs(orig.get(CTA_TUPLE_IP, b""))
    src = ips.get(CTA_IP_V4_SRC)
    src6 = ips.get(CTA_IP_V6_SRC)
    if src is not None and len(src) == 4:
        text = socket.inet_ntoa(src)
    elif src6 is not None and len(src6) == 16:
        text = socket.inet_ntop(socket.AF_INET6, src6)
    else:
        return None
    mark_raw = top.get(CTA_MARK)
    mark = struct.unpack("!I", mark_raw)[0] if mark_raw and len(mark_raw) == 4 else 0
    return mark, text


class Conntrack:
    """A ctnetlink socket answering "which ct mark has the flow of this TUN packet"."""

    def __init__(self, timeout: float = 0.05) -> None:
        try:
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        except OSError as exc:
            raise SystemSetupError(f"cannot open a ctnetlink socket: {exc.strerror}") from None
        try:
            self._sock.bind((0, 0))
            self._sock.settimeout(timeout)
        except OSError as exc:
            self._sock.close()
            raise SystemSetupError(f"cannot bind a ctnetlink socket: {exc.strerror}") from None
        self._seq = 0

    def lookup_reply(
        self, proto: int, src: str, dst: str, sport: int, dport: int
    ) -> tuple[int, str] | None:
        """(ct mark, original-direction source) of the entry with this reply tuple (IPv4,
        or IPv6 when the addresses are).

        None if there is no such entry or anything fails. For ICMP pass the echo id
        as ``sport`` (``dport`` is ignored).
        """
        try:
            request = reply_tuple(proto, src, dst, sport, dport)
        except (OSError, struct.error, ValueError) as exc:
            log.debug("conntrack lookup: bad tuple: %s", exc)
            return None
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        family = socket.AF_INET6 if ":" in src else socket.AF_INET
        body = _NFGENMSG.pack(family, NFNETLINK_V0, 0) + request
        kind = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
        header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST, self._seq, 0)
        try:
            self._sock.send(header + body)
            return self._answer(self._seq)
        except OSError as exc:  # includes the socket timeout
            log.debug("conntrack lookup failed: %s", exc)
            return None

    def _answer(self, seq: int) -> tuple[int, str] | None:
        """Read until the answer to ``seq`` (stale answers of timed-out requests are skipped)."""
        while True:
            data = self._sock.recv(_RECV_SIZE)
            for kind, msg_seq, payload in messages(data):
                if msg_seq != seq:
                    continue
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else 0
                    if code and code != errno.ENOENT:
                        log.debug("conntrack lookup: %s", errno.errorcode.get(code, code))
                    return None
                if kind & 0xFF == IPCTNL_MSG_CT_NEW and kind >> 8 == NFNL_SUBSYS_CTNETLINK:
                    return parse_entry(payload[_NFGENMSG.size :])
                return None

    def close(self) -> None:
        """Close the netlink socket."""
        self._sock.close()

    def __enter__(self) -> Conntrack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
