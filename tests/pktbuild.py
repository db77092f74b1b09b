"""Test-only packet builders with checksums computed from scratch (RFC 1071)."""

from __future__ import annotations

import ipaddress
import struct


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ip(a: str) -> bytes:
    return ipaddress.IPv4Address(a).packed


def ipv4(src: str, dst: str, proto: int, payload: bytes, ident: int = 1, ttl: int = 64) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0x4000, ttl, proto, 0,
                      ip(src), ip(dst))
    hdr = hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:]
    return hdr + payload


def _pseudo(src: str, dst: str, proto: int, length: int) -> bytes:
    return ip(src) + ip(dst) + struct.pack("!BBH", 0, proto, length)


def tcp(src: str, dst: str, sport: int, dport: int, payload: bytes = b"", flags: int = 0x18,
        seq: int = 1) -> bytes:
    h = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, flags, 65535, 0, 0)
    c = csum(_pseudo(src, dst, 6, len(h) + len(payload)) + h + payload)
    h = h[:16] + struct.pack("!H", c) + h[18:]
    return ipv4(src, dst, 6, h + payload)


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes = b"", zero_csum: bool = False
        ) -> bytes:
    h = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    c = 0 if zero_csum else (csum(_pseudo(src, dst, 17, len(h) + len(payload)) + h + payload)
                             or 0xFFFF)
    return ipv4(src, dst, 17, h[:6] + struct.pack("!H", c) + payload)


def icmp_echo(src: str, dst: str, ident: int, seq: int = 1, reply: bool = False,
              payload: bytes = b"ping") -> bytes:
    h = struct.pack("!BBHHH", 0 if reply else 8, 0, 0, ident, seq)
    c = csum(h + payload)
    return ipv4(src, dst, 1, h[:2] + struct.pack("!H", c) + h[4:] + payload)


def checksums_ok(pkt: bytes) -> bool:
    """IPv4 header checksum and TCP/UDP/ICMP checksum all valid."""
    ihl = (pkt[0] & 15) * 4
    if csum(pkt[:ihl]) != 0:
        return False
    proto, src, dst = pkt[9], pkt[12:16], pkt[16:20]
    l4 = pkt[ihl:]
    if proto in (6, 17):
        if proto == 17 and l4[6:8] == b"\0\0":
            return True
        ps = src + dst + struct.pack("!BBH", 0, proto, len(l4))
        return csum(ps + l4) == 0
    if proto == 1:
        return csum(l4) == 0
    return True
