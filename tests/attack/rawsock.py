"""Packet builders (RFC 1071 checksums) and a raw IPv4 sender that can forge the source.

``RawSender`` opens ``socket(AF_INET, SOCK_RAW, IPPROTO_RAW)`` with ``IP_HDRINCL``: the
kernel sends our IPv4 header as is (it only fills in a zero ID/checksum if we leave them
zero; we fill them in ourselves), so the source address can be anybody's -- e.g. a NAT's
public address and the port the victim's binding uses. Needs CAP_NET_RAW (root in the
attacker's namespace).
"""

from __future__ import annotations

import itertools
import socket
import struct

__all__ = ["RawSender", "checksum", "icmp_error", "ipv4", "tcp", "udp"]

_ids = itertools.count(0x1000)


def checksum(data: bytes) -> int:
    """The Internet checksum (one's complement of the one's complement sum)."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return (~total) & 0xFFFF


def ipv4(src: str, dst: str, proto: int, payload: bytes, *, ttl: int = 64,
         ident: int | None = None) -> bytes:
    """An IPv4 header (DF set, header checksum computed) + ``payload``."""
    ident = next(_ids) & 0xFFFF if ident is None else ident
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0x4000, ttl, proto,
                      0, socket.inet_aton(src), socket.inet_aton(dst))
    return hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:] + payload


def _pseudo(src: str, dst: str, proto: int, length: int) -> bytes:
    return socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, proto, length)


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes, *,
        with_checksum: bool = True) -> bytes:
    """A whole IPv4/UDP packet; ``with_checksum=False`` leaves the (optional) UDP sum 0."""
    length = 8 + len(payload)
    hdr = struct.pack("!HHHH", sport, dport, length, 0)
    csum = 0
    if with_checksum:
        csum = checksum(_pseudo(src, dst, 17, length) + hdr + payload) or 0xFFFF
    return ipv4(src, dst, 17, hdr[:6] + struct.pack("!H", csum) + payload)


def tcp(src: str, dst: str, sport: int, dport: int, *, seq: int, ack: int = 0,
        flags: int = 0x10, window: int = 65535, payload: bytes = b"") -> bytes:
    """A whole IPv4/TCP packet (no options) with a correct TCP checksum."""
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 5 << 4,
                      flags, window, 0, 0)
    csum = checksum(_pseudo(src, dst, 6, len(hdr) + len(payload)) + hdr + payload)
    return ipv4(src, dst, 6, hdr[:16] + struct.pack("!H", csum) + hdr[18:] + payload)


def icmp_error(src: str, dst: str, quoted: bytes, *, icmp_type: int = 3, code: int = 3
               ) -> bytes:
    """An ICMP error (default: port unreachable) quoting the first bytes of ``quoted``."""
    body = struct.pack("!BBHI", icmp_type, code, 0, 0) + quoted[:28]
    body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
    return ipv4(src, dst, 1, body)


class RawSender:
    """Send whole IPv4 packets we built (any source address) out of the routing table."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)

    def send(self, packet: bytes) -> None:
        dst = socket.inet_ntoa(packet[16:20])
        self.sock.sendto(packet, (dst, 0))

    def send_udp(self, src: tuple[str, int], dst: tuple[str, int], payload: bytes) -> None:
        self.send(udp(src[0], dst[0], src[1], dst[1], payload, with_checksum=False))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
