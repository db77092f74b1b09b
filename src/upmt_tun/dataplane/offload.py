"""TUN offloads: the virtio-net header, TCP segmentation and checksum completion.

With ``IFF_VNET_HDR`` and ``TUNSETOFFLOAD(TUN_F_CSUM | TUN_F_TSO4)`` the kernel hands the
TUN reader TCP "super-packets" of up to 64 KB (one read instead of ~45) preceded by a
10-byte ``struct virtio_net_hdr`` (native byte order)::

    flags u8 | gso_type u8 | hdr_len u16 | gso_size u16 | csum_start u16 | csum_offset u16

and leaves checksums *partial*: the L4 checksum field holds the uncomplemented
pseudo-header sum, to be completed over ``pkt[csum_start:]``. :func:`packets` turns one
such read into ordinary, complete IPv4 packets — segments cut at ``gso_size`` with their
own IP id, total length, IP checksum, TCP sequence number, flags and a full TCP checksum
(as wireguard-go's tun/offload_linux.go does; never blind chunks: each segment is a
packet the peer's stack accepts on its own), so everything after the TUN reader, the
tunnel's wire format included, is unchanged.

The per-byte work (checksums over the payload) runs in the Cython extension
``_fast`` when it was built (``pip install .`` builds it); this module's pure-Python
functions are the reference and the fallback, with identical results (tests run both).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Protocol

from ..nat import ipv4_checksum, ones_sum, py_rewrite_dst, py_rewrite_src

__all__ = [
    "GSO_NONE",
    "GSO_TCPV4",
    "GSO_TCPV6",
    "GSO_UDP_L4",
    "NEEDS_CSUM",
    "VNET_HDR",
    "VNET_HDR_LEN",
    "coalesce",
    "finish_csum",
    "flow_runs",
    "implementation",
    "packets",
    "rewrite_run",
    "tso_of",
    "tso_split",
    "uso_split",
]

VNET_HDR = struct.Struct("=BBHHHH")   # flags, gso_type, hdr_len, gso_size, csum_start, off
VNET_HDR_LEN = VNET_HDR.size          # 10
NEEDS_CSUM = 1                        # VIRTIO_NET_HDR_F_NEEDS_CSUM
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_TCPV6 = 4                         # offered with TUN_F_TSO6: IPv6 inside the tunnels
GSO_UDP_L4 = 5                        # offered with TUN_F_USO4|6 (Linux 6.2): UDP runs
GSO_ECN = 0x80
NO_VNET_HDR = bytes(VNET_HDR_LEN)     # prefix of a write: a complete, ordinary packet

_TCP_FIN, _TCP_PSH, _TCP_CWR = 0x01, 0x08, 0x80
_U16 = struct.Struct("!H")


def _fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def py_finish_csum(pkt: bytearray, csum_start: int, csum_offset: int) -> bool:
    """Complete a partial checksum in place: the field at ``csum_start + csum_offset``
    holds the pseudo-header sum; the checksum covers ``pkt[csum_start:]``."""
    at = csum_start + csum_offset
    if csum_start < 20 or at + 2 > len(pkt):
        return False
    c = ipv4_checksum(memoryview(pkt)[csum_start:])
    # UDP: a computed 0 is sent as 0xFFFF (IPv6 has no protocol byte at 9: UDP is the
    # one whose checksum sits 6 bytes into its header)
    if c == 0 and (pkt[9] == 17 if pkt[0] >> 4 != 6 else csum_offset == 6):
        c = 0xFFFF
    _U16.pack_into(pkt, at, c)
    return True


def py_tso_split(pkt: bytes | bytearray | memoryview, gso_size: int,
                 new_src: bytes | None = None) -> list[bytes]:
    """Cut an IPv4/TCP super-packet (or an IPv6/TCP one without extension headers) into
    segments of ``gso_size`` payload bytes, each a complete packet with correct headers
    and checksums. [] when it is not TCP of those or its headers do not fit. ``new_src``
    (4 or 16 bytes, the packet's family), if given, replaces the source address of every
    segment (the internal NAT, free here: the checksums are computed anyway).

    IPv4 and IPv6 differ only in the IP header: its length (IHL, or 40), where the
    addresses sit (12:20, or 8:40), the length field (total at 2, or payload at 4), and
    IPv4's id and header checksum per segment; the TCP part and its pseudo-header sum
    (addresses + protocol + TCP length) are the same."""
    n = len(pkt)
    six = bool(n) and pkt[0] >> 4 == 6
    if new_src is not None and len(new_src) != (16 if six else 4):
        raise ValueError(f"an IPv{6 if six else 4} address is {16 if six else 4} bytes, "
                         f"got {len(new_src)}")
    if six:
        if n < 60 or pkt[6] != 6 or gso_size <= 0:
            return []
        ihl, addrs = 40, slice(8, 40)
    else:
        if n < 40 or pkt[0] >> 4 != 4 or pkt[9] != 6 or gso_size <= 0:
            return []
        ihl, addrs = (pkt[0] & 15) * 4, slice(12, 20)
        if ihl < 20 or ihl + 20 > n:
            return []
    thl = (pkt[ihl + 12] >> 4) * 4
    hlen = ihl + thl
    if thl < 20 or hlen > n:
        return []
    ident = 0 if six else _U16.unpack_from(pkt, 4)[0]
    seq = int.from_bytes(pkt[ihl + 4:ihl + 8], "big")
    flags = pkt[ihl + 13]
    half = (addrs.stop - addrs.start) // 2       # the source, then the destination
    src_dst = bytes(pkt[addrs]) if new_src is None \
        else bytes(new_src) + bytes(pkt[addrs.start + half:addrs.stop])
    pseudo_base = ones_sum(src_dst) + 6
    out = []
    payload_len = n - hlen
    offset = 0
    i = 0
    while True:
        size = min(gso_size, payload_len - offset)
        last = offset + size >= payload_len
        seg = bytearray(pkt[:hlen])
        seg[addrs] = src_dst
        seg += pkt[hlen + offset:hlen + offset + size]
        total = hlen + size
        if six:
            _U16.pack_into(seg, 4, total - 40)
        else:
            _U16.pack_into(seg, 2, total)
            _U16.pack_into(seg, 4, (ident + i) & 0xFFFF)
            seg[10:12] = b"\0\0"
            _U16.pack_into(seg, 10, ipv4_checksum(seg[:ihl]))
        seg[ihl + 4:ihl + 8] = ((seq + offset) & 0xFFFFFFFF).to_bytes(4, "big")
        f = flags
        if not last:
            f &= ~(_TCP_FIN | _TCP_PSH)
        if i:
            f &= ~_TCP_CWR
        seg[ihl + 13] = f
        seg[ihl + 16:ihl + 18] = b"\0\0"
        s = pseudo_base + (total - ihl) + ones_sum(memoryview(seg)[ihl:])
        _U16.pack_into(seg, ihl + 16, _fold(s) ^ 0xFFFF)
        out.append(bytes(seg))
        offset += size
        i += 1
        if last:
            return out


def uso_split(pkt: bytes | bytearray | memoryview, gso_size: int) -> list[bytes]:
    """Cut a UDP super-packet (GSO_UDP_L4: what a local application sending with
    ``UDP_SEGMENT`` hands the TUN once USO is offered) into datagrams of ``gso_size``
    payload bytes, each a complete packet (IPv4: total length, IP id + k, header checksum;
    IPv6 without extension headers: payload length; UDP length and a full checksum).
    [] when it is not one. Rare (only such applications), so pure Python."""
    n = len(pkt)
    six = n > 0 and pkt[0] >> 4 == 6
    hl = 40 if six else (pkt[0] & 15) * 4 if n else 0
    if (gso_size <= 0 or n <= hl + 8 or (six and pkt[6] != 17)
            or (not six and (pkt[0] >> 4 != 4 or hl < 20 or pkt[9] != 17))):
        return []
    src_dst = bytes(pkt[8:40]) if six else bytes(pkt[12:20])
    ident = pkt[4] << 8 | pkt[5]
    out = []
    for k, at in enumerate(range(hl + 8, n, gso_size)):
        body = pkt[at:at + gso_size]
        seg = bytearray(pkt[:hl + 8]) + body
        ulen = 8 + len(body)
        if six:
            _U16.pack_into(seg, 4, ulen)
        else:
            _U16.pack_into(seg, 2, hl + ulen)
            _U16.pack_into(seg, 4, (ident + k) & 0xFFFF)
            seg[10:12] = b"\0\0"
            _U16.pack_into(seg, 10, ipv4_checksum(seg[:hl]))
        _U16.pack_into(seg, hl + 4, ulen)
        seg[hl + 6:hl + 8] = b"\0\0"
        c = _fold(ones_sum(src_dst) + 17 + ulen + ones_sum(memoryview(seg)[hl:])) ^ 0xFFFF
        _U16.pack_into(seg, hl + 6, c or 0xFFFF)
        out.append(bytes(seg))
    return out


_USO_MAX_SEGS = 64


def _mergeable_udp(p: bytes) -> bool:
    """An IPv4/UDP datagram a USO write may carry: no IP options, not a fragment, whole,
    with a payload."""
    n = len(p)
    return (n > 28 and p[0] == 0x45 and p[9] == 17 and not (p[6] & 0x3F or p[7])
            and (p[2] << 8 | p[3]) == n and (p[24] << 8 | p[25]) == n - 20)


def _coalesce_udp(pkts: list[bytes], i: int, out: list[bytes]) -> int:
    """:func:`py_coalesce` of the IPv4/UDP run starting at ``pkts[i]``: datagrams of one
    flow (same addresses, ports, TOS, TTL and DF), of one payload size but a shorter last,
    at most 64 and 64 KB, become one GSO_UDP_L4 write (UDP checksum partial: the
    pseudo-header sum over the whole length; the kernel cuts it up with each datagram's
    length and checksum). Returns the index after the run."""
    p = pkts[i]
    n = len(pkts)
    j = i + 1
    size = len(p) - 28
    total = len(p)
    while j < n and j - i < _USO_MAX_SEGS:
        q = pkts[j]
        qs = len(q) - 28
        if (not _mergeable_udp(q) or qs > size or total + qs > _MAX_SUPER
                or q[12:24] != p[12:24] or q[1] != p[1] or q[8] != p[8] or q[6] != p[6]):
            break
        total += qs
        j += 1
        if qs < size:
            break
    if j - i == 1:
        out.append(NO_VNET_HDR + p)
        return j
    head = bytearray(p[:28])
    _U16.pack_into(head, 2, total)
    head[10:12] = b"\0\0"
    _U16.pack_into(head, 10, ipv4_checksum(head[:20]))
    _U16.pack_into(head, 24, total - 20)
    _U16.pack_into(head, 26, _fold(ones_sum(head[12:20]) + 17 + total - 20))
    vnet = VNET_HDR.pack(NEEDS_CSUM, GSO_UDP_L4, 28, size, 20, 6)
    out.append(vnet + bytes(head) + b"".join(q[28:] for q in pkts[i:j]))
    return j
_TCP_SYN, _TCP_RST, _TCP_ACK, _TCP_URG, _TCP_ECE = 0x02, 0x04, 0x10, 0x20, 0x40
_NO_MERGE = _TCP_FIN | _TCP_SYN | _TCP_RST | _TCP_URG | _TCP_ECE | _TCP_CWR
_MAX_SUPER = 65535


def _mergeable(p: bytes) -> int:
    """Header length of an IPv4/TCP segment GRO may merge (no IP options, not a
    fragment, payload, plain ACK or ACK|PSH), else 0."""
    n = len(p)
    if n < 41 or p[0] != 0x45 or p[9] != 6 or (p[6] & 0x3F) or p[7]:
        return 0
    if (p[2] << 8 | p[3]) != n:
        return 0
    hl = 20 + (p[32] >> 4) * 4
    flags = p[33]
    if hl < 40 or hl >= n or not flags & _TCP_ACK or flags & _NO_MERGE:
        return 0
    return hl


def _mergeable6(p: bytes) -> int:
    """:func:`_mergeable` for IPv6/TCP without extension headers (whole packet, payload,
    plain ACK or ACK|PSH): its header length, else 0."""
    n = len(p)
    if n < 61 or p[0] >> 4 != 6 or p[6] != 6 or 40 + (p[4] << 8 | p[5]) != n:
        return 0
    hl = 40 + (p[52] >> 4) * 4
    flags = p[53]
    if hl < 60 or hl >= n or not flags & _TCP_ACK or flags & _NO_MERGE:
        return 0
    return hl


def _coalesce6(pkts: list[bytes], i: int, hl: int, out: list[bytes]) -> int:
    """:func:`py_coalesce` of the IPv6 run starting at ``pkts[i]`` (``hl``: its header
    length): appends one packet to ``out``, returns the index after the run. Merged: the
    same version/class/flow label, hop limit, addresses and ports, ACK, window and options,
    contiguous sequence numbers (GSO_TCPV6, csum_start 40)."""
    p = pkts[i]
    n = len(pkts)
    j = i + 1
    size = len(p) - hl
    total = len(p)
    nxt = (int.from_bytes(p[44:48], "big") + size) & 0xFFFFFFFF
    last = p
    while j < n and not last[53] & _TCP_PSH:
        q = pkts[j]
        qs = len(q) - hl
        if (_mergeable6(q) != hl or qs > size or total + qs > _MAX_SUPER
                or q[0:4] != p[0:4] or q[7] != p[7] or q[8:44] != p[8:44]
                or q[48:52] != p[48:52] or q[54:56] != p[54:56] or q[60:hl] != p[60:hl]
                or int.from_bytes(q[44:48], "big") != nxt):
            break
        total += qs
        nxt = (nxt + qs) & 0xFFFFFFFF
        last = q
        j += 1
        if qs < size:
            break
    if j - i == 1:
        out.append(NO_VNET_HDR + p)
        return j
    head = bytearray(p[:hl])
    _U16.pack_into(head, 4, total - 40)
    head[53] |= last[53] & _TCP_PSH
    _U16.pack_into(head, 56, _fold(ones_sum(head[8:40]) + 6 + total - 40))
    vnet = VNET_HDR.pack(NEEDS_CSUM, GSO_TCPV6, hl, size, 40, 16)
    out.append(vnet + bytes(head) + b"".join(q[hl:] for q in pkts[i:j]))
    return j


def py_coalesce(pkts: list[bytes], uso: bool = False) -> list[bytes]:
    """GRO towards the TUN: consecutive segments of one TCP flow (contiguous sequence
    numbers, same ACK, window and options, equal sizes but a shorter last, no PSH before
    the last) become one super-packet with a virtio-net header (GSO_TCPV4, or GSO_TCPV6
    for IPv6 without extension headers; checksum partial: the kernel finishes it, or
    cuts it up again if it forwards). With ``uso`` (the TUN took TUN_F_USO4|6), runs of
    one IPv4/UDP flow become one GSO_UDP_L4 write (:func:`_coalesce_udp`). Everything
    else is passed as is, behind an empty header. Order is kept."""
    out: list[bytes] = []
    i, n = 0, len(pkts)
    while i < n:
        p = pkts[i]
        hl = _mergeable(p)
        if not hl and (hl6 := _mergeable6(p)):
            i = _coalesce6(pkts, i, hl6, out)
            continue
        if not hl and uso and _mergeable_udp(p):
            i = _coalesce_udp(pkts, i, out)
            continue
        j = i + 1
        if hl:
            size = len(p) - hl
            total = len(p)
            nxt = (int.from_bytes(p[24:28], "big") + size) & 0xFFFFFFFF
            last = p
            while j < n and not last[33] & _TCP_PSH:
                q = pkts[j]
                qs = len(q) - hl
                if (_mergeable(q) != hl or qs > size or total + qs > _MAX_SUPER
                        or q[12:24] != p[12:24] or q[28:32] != p[28:32]
                        or q[34:36] != p[34:36] or q[40:hl] != p[40:hl]
                        or int.from_bytes(q[24:28], "big") != nxt):
                    break
                total += qs
                nxt = (nxt + qs) & 0xFFFFFFFF
                last = q
                j += 1
                if qs < size:
                    break                     # a shorter segment ends the run
        if j - i == 1:
            out.append(NO_VNET_HDR + p)
            i = j
            continue
        head = bytearray(p[:hl])
        _U16.pack_into(head, 2, total)
        head[10:12] = b"\0\0"
        _U16.pack_into(head, 10, ipv4_checksum(head[:20]))
        head[33] |= last[33] & _TCP_PSH
        _U16.pack_into(head, 36, _fold(ones_sum(head[12:20]) + 6 + total - 20))
        vnet = VNET_HDR.pack(NEEDS_CSUM, GSO_TCPV4, hl, len(p) - hl, 20, 16)
        out.append(vnet + bytes(head) + b"".join(q[hl:] for q in pkts[i:j]))
        i = j
    return out


def _run_key(p: bytes) -> bytes | None:
    if len(p) >= 24 and p[0] == 0x45 and p[9] in (6, 17) and not (p[6] & 0x3F or p[7]):
        return p[9:10] + p[12:24]
    if len(p) >= 44 and p[0] >> 4 == 6 and p[6] in (6, 17):
        return p[6:7] + p[8:44]           # IPv6 without extension headers
    return None


def py_flow_runs(pkts: list[bytes]) -> list[int]:
    """Lengths of the runs of consecutive packets of one flow: IPv4 TCP or UDP without IP
    options or fragmentation, same protocol, addresses and ports (bytes 9 and 12-23), or
    IPv6 TCP or UDP without extension headers (bytes 6 and 8-43). Anything else is a run
    of its own. The batch paths decide once per run."""
    runs: list[int] = []
    prev = None
    for p in pkts:
        k = _run_key(p)
        if k is not None and k == prev:
            runs[-1] += 1
        else:
            runs.append(1)
        prev = k
    return runs


def py_rewrite_run(pkts: list[bytes], start: int, end: int, new: bytes, is_src: bool
                   ) -> list[bytes]:
    """Copies of ``pkts[start:end]`` (one flow's run) with IP.src (``is_src``) or IP.dst
    rewritten to ``new`` (nat.py's incremental checksum update; 16 bytes: IPv6)."""
    if len(new) not in (4, 16):
        raise ValueError(f"an address is 4 or 16 bytes, got {len(new)}")
    rewrite = py_rewrite_src if is_src else py_rewrite_dst
    out = []
    for p in pkts[start:end]:
        b = bytearray(p)
        rewrite(b, new)
        out.append(bytes(b))
    return out


class Splitter(Protocol):
    def __call__(self, pkt: bytes | bytearray | memoryview, gso_size: int,
                 new_src: bytes | None = None) -> list[bytes]: ...


try:   # the compiled hot path, when pip built it
    from ._fast import coalesce as _c_coalesce
    from ._fast import finish_csum as _c_finish_csum
    from ._fast import flow_runs as _c_flow_runs
    from ._fast import rewrite_run as _c_rewrite_run
    from ._fast import tso_split as _c_tso_split
except ImportError:   # pragma: no cover - depends on the build
    finish_csum: Callable[[bytearray, int, int], bool] = py_finish_csum
    tso_split: Splitter = py_tso_split
    coalesce: Callable[[list[bytes], bool], list[bytes]] = py_coalesce
    flow_runs: Callable[[list[bytes]], list[int]] = py_flow_runs
    rewrite_run: Callable[[list[bytes], int, int, bytes, bool], list[bytes]] = py_rewrite_run
    implementation = "python"
else:
    finish_csum = _c_finish_csum
    tso_split = _c_tso_split
    coalesce = _c_coalesce
    flow_runs = _c_flow_runs
    rewrite_run = _c_rewrite_run
    implementation = "cython"



def tso_of(data: bytes) -> tuple[memoryview, int] | None:
    """(the super-packet, its gso_size) when a TUN read is a TCP/IPv4 super-packet (the
    caller cuts it with :func:`tso_split`, deciding once for all its segments)."""
    if len(data) <= VNET_HDR_LEN or data[1] & ~GSO_ECN not in (GSO_TCPV4, GSO_TCPV6):
        return None
    return memoryview(data)[VNET_HDR_LEN:], VNET_HDR.unpack_from(data)[3]


def packets(data: bytes, split: Splitter | None = None,
            finish: Callable[[bytearray, int, int], bool] | None = None) -> list[bytes]:
    """One TUN read (virtio-net header + packet) -> complete IPv4 packets ([] = drop)."""
    if len(data) <= VNET_HDR_LEN:
        return []
    flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(data)
    gso_type &= ~GSO_ECN
    if gso_type == GSO_TCPV4 or gso_type == GSO_TCPV6:
        return (split or tso_split)(memoryview(data)[VNET_HDR_LEN:], gso_size)
    if gso_type == GSO_UDP_L4:
        return uso_split(memoryview(data)[VNET_HDR_LEN:], gso_size)
    if gso_type != GSO_NONE:
        return []                     # not offered (UFO): never sent to us
    if not flags & NEEDS_CSUM:
        return [data[VNET_HDR_LEN:]]
    pkt = bytearray(memoryview(data)[VNET_HDR_LEN:])
    if not (finish or finish_csum)(pkt, csum_start, csum_offset):
        return []
    return [bytes(pkt)]
