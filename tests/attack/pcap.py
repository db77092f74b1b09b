"""Read UDP datagrams out of a classic pcap file (as written by ``tcpdump -w``).

Format: a 24-byte global header (magic, version, thiszone, sigfigs, snaplen, linktype),
then per packet a 16-byte record header (ts_sec, ts_frac, incl_len, orig_len) and
``incl_len`` captured bytes. Magic 0xa1b2c3d4 (microseconds) or 0xa1b23c4d (nanoseconds),
in either byte order. Link types: 1 Ethernet (optionally one 802.1Q tag), 113 Linux
cooked v1, 276 Linux cooked v2, 101/228 raw IPv4.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Datagram", "read_udp"]

LINK_ETHERNET = 1
LINK_RAW = 101
LINK_IPV4 = 228
LINK_SLL = 113
LINK_SLL2 = 276
ETH_P_IP = 0x0800
ETH_P_8021Q = 0x8100


@dataclass(frozen=True)
class Datagram:
    src: str
    sport: int
    dst: str
    dport: int
    payload: bytes
    ts: float


def _l3_offset(linktype: int, frame: bytes) -> int | None:
    """Offset of the IPv4 header in ``frame``, or None if it does not carry IPv4."""
    if linktype == LINK_ETHERNET:
        if len(frame) < 14:
            return None
        off, etype = 14, struct.unpack_from("!H", frame, 12)[0]
        if etype == ETH_P_8021Q and len(frame) >= 18:
            off, etype = 18, struct.unpack_from("!H", frame, 16)[0]
        return off if etype == ETH_P_IP else None
    if linktype == LINK_SLL:
        if len(frame) < 16:
            return None
        return 16 if struct.unpack_from("!H", frame, 14)[0] == ETH_P_IP else None
    if linktype == LINK_SLL2:
        if len(frame) < 20:
            return None
        return 20 if struct.unpack_from("!H", frame, 0)[0] == ETH_P_IP else None
    if linktype in (LINK_RAW, LINK_IPV4):
        return 0
    return None


def read_udp(path: str | Path) -> list[Datagram]:
    """Every complete, unfragmented IPv4/UDP datagram in the capture, in capture order."""
    data = Path(path).read_bytes()
    if len(data) < 24:
        return []
    magic = data[:4]
    if magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    elif magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    else:
        raise ValueError(f"{path}: not a pcap file (magic {magic.hex()})")
    nano = magic in (b"\xa1\xb2\x3c\x4d", b"\x4d\x3c\xb2\xa1")
    linktype = struct.unpack_from(endian + "I", data, 20)[0] & 0x0FFFFFFF
    rec = struct.Struct(endian + "IIII")
    out: list[Datagram] = []
    pos = 24
    while pos + rec.size <= len(data):
        ts_sec, ts_frac, incl, _orig = rec.unpack_from(data, pos)
        pos += rec.size
        frame = data[pos:pos + incl]
        pos += incl
        if len(frame) < incl:
            break                                # truncated last record (tcpdump killed)
        off = _l3_offset(linktype, frame)
        if off is None or len(frame) < off + 20:
            continue
        ip = frame[off:]
        ver_ihl, total, frag, proto = ip[0], struct.unpack_from("!H", ip, 2)[0], \
            struct.unpack_from("!H", ip, 6)[0], ip[9]
        ihl = (ver_ihl & 0x0F) * 4
        if ver_ihl >> 4 != 4 or proto != 17 or frag & 0x3FFF or total > len(ip) \
                or ihl < 20 or total < ihl + 8:
            continue                             # not IPv4/UDP, a fragment, or snapped
        sport, dport, ulen = struct.unpack_from("!HHH", ip, ihl)
        if ulen < 8 or ihl + ulen > total:
            continue
        out.append(Datagram(socket.inet_ntoa(ip[12:16]), sport, socket.inet_ntoa(ip[16:20]),
                            dport, bytes(ip[ihl + 8:ihl + ulen]),
                            ts_sec + ts_frac / (1e9 if nano else 1e6)))
    return out
