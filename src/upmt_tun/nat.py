"""Internal NAT of the Mobile Host: rewrite IPv4 addresses in place.

The MH's applications use ``vipa_fix``; each tunnel server (anchor) hands out a VIpA.
On the way out, :func:`rewrite_src` turns ``IP.src`` from ``vipa_fix`` into the VIpA of the
chosen tunnel; on the way in, :func:`rewrite_dst` turns ``IP.dst`` back into ``vipa_fix``.
:func:`five_tuple` extracts the flow key used by the PAFT.

Everything here is pure (no I/O) and sits on the per-packet hot path: headers are read and
written with precompiled :class:`struct.Struct` objects directly in the caller's
``bytearray``, and every checksum is updated incrementally (RFC 1624, eqn. 3,
``HC' = ~(~HC + ~m + m')``) instead of being recomputed.

Checksum arithmetic. The one's complement sum of 16-bit words is congruent to the plain
integer sum modulo 0xFFFF (because 0x10000 == 1 mod 0xFFFF). A change of a 32-bit address
from ``old`` to ``new`` is therefore the single number ``d = (~old + new) mod 0xFFFF``,
computed once per packet and added to every checksum whose coverage contains the address
(the IPv4 header checksum, the TCP/UDP pseudo-header, and for ICMP errors the embedded
copies). A stored checksum ``HC`` stands for the sum ``S = ~HC``; ``S`` is taken as 0xFFFF
when ``~HC`` is 0, since a sum over data that is not all zero never folds to +0. With
``S`` in 1..0xFFFF one end-around fold of ``S + d`` lands in 1..0xFFFF again, so the new
checksum is exactly the value a from-scratch RFC 1071 computation gives (including the
``0x0000`` vs ``0xFFFF`` choice), and UDP's "computed 0 is sent as 0xFFFF" rule is applied
on top.

Not handled here: checksums left partial by TUN offloads (``IFF_VNET_HDR`` with
``VIRTIO_NET_HDR_F_NEEDS_CSUM``) hold the uncomplemented pseudo-header sum, not a final
checksum; the TUN reader completes them first (``dataplane/offload.py``).

The ``py_*`` functions are the reference. :func:`rewrite_src`, :func:`rewrite_dst` and
:func:`five_tuple` run the compiled common case (TCP/UDP, ``dataplane/_fast.pyx``) when it
was built and fall back to the reference for everything else (ICMP errors, garbage) and
when it was not; tests check both agree.
"""

from __future__ import annotations

import struct

__all__ = [
    "ICMP_ERROR_TYPES",
    "five_tuple",
    "ipv4_checksum",
    "ones_sum",
    "py_five_tuple",
    "py_rewrite_dst",
    "py_rewrite_src",
    "rewrite_dst",
    "rewrite_src",
]

#: ICMP types whose body embeds the IP header and first bytes of the offending packet:
#: destination unreachable, source quench, redirect, time exceeded, parameter problem.
ICMP_ERROR_TYPES = frozenset((3, 4, 5, 11, 12))

_PROTO_ICMP = 1
_PROTO_TCP = 6
_PROTO_UDP = 17

# version/IHL, total length, flags/fragment offset, protocol, header checksum, src, dst
_IP = struct.Struct("!BxHxxHxBHII")
# same, addresses as 4-byte strings (for five_tuple, which returns them as bytes)
_IP_KEY = struct.Struct("!BxHxxHxB2x4s4s")
# header checksum, src, dst: written together at offset 10 of an IPv4 header
_CK_ADDRS = struct.Struct("!HII")
_U16 = struct.Struct("!H")
_PORTS = struct.Struct("!HH")
# ICMP type, then the identifier at offset 4 (echo request/reply)
_ICMP_ID = struct.Struct("!B3xH")

_ip_unpack = _IP.unpack_from
_ip_key_unpack = _IP_KEY.unpack_from
_ck_addrs_pack = _CK_ADDRS.pack_into
_u16_unpack = _U16.unpack_from
_u16_pack = _U16.pack_into
_ports_unpack = _PORTS.unpack_from
_icmp_id_unpack = _ICMP_ID.unpack_from

_OFFSET_MASK = 0x1FFF
_M16 = 0xFFFF
_M32 = 0xFFFFFFFF


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """One's complement sum of ``data`` as big-endian 16-bit words (odd length padded with
    a zero byte), not complemented, in 0..0xFFFF. Computed without a Python loop: the sum
    is congruent to the whole buffer read as one big integer, modulo 0xFFFF."""
    value = int.from_bytes(data, "big")
    if len(data) & 1:
        value <<= 8
    total = value % _M16
    return _M16 if total == 0 and value else total  # non-zero data: "negative zero"


def ipv4_checksum(data: bytes | bytearray | memoryview) -> int:
    """RFC 1071 Internet checksum of ``data``: the value to store in a checksum field
    (the one's complement of :func:`ones_sum`)."""
    return ones_sum(data) ^ _M16


def py_rewrite_src(pkt: bytearray, new_src: bytes) -> bool:
    """Rewrite ``IP.src`` of the IPv4 packet in ``pkt`` to ``new_src``, in place.

    Updates the IPv4 header checksum and, for an unfragmented packet or a first fragment,
    the TCP/UDP checksum (pseudo-header). For an outgoing ICMP error whose embedded packet
    was addressed to the old source, the embedded destination is rewritten too, together
    with the embedded IP and TCP/UDP checksums and the ICMP checksum.

    Returns False and leaves ``pkt`` untouched when it does not hold a well-formed IPv4
    header (version != 4, IHL < 5, header or total length beyond ``len(pkt)``, or total
    length shorter than the header). Raises ValueError if ``new_src`` is not 4 bytes.
    """
    # rewrite_src and rewrite_dst are deliberately written out in full (no shared helper
    # call, struct methods bound at module level): about 25% faster per packet.
    if len(new_src) != 4:
        raise ValueError(f"an IPv4 address is 4 bytes, got {len(new_src)}")
    size = len(pkt)
    if size < 20:
        return False
    ver_ihl, total, frag, proto, ck, old, dst = _ip_unpack(pkt, 0)
    hlen = (ver_ihl & 0x0F) << 2
    if ver_ihl >> 4 != 4 or hlen < 20 or hlen > size or total > size or total < hlen:
        return False
    addr = int.from_bytes(new_src, "big")
    if old == addr:
        return True
    d = ((old ^ _M32) + addr) % _M16
    s = ((ck ^ _M16) or _M16) + d
    _ck_addrs_pack(pkt, 10, ((s & _M16) + (s >> 16)) ^ _M16, addr, dst)
    if frag & _OFFSET_MASK:
        return True  # non-first fragment: no L4 header here
    if proto == _PROTO_TCP:
        at = hlen + 16
        if at + 2 <= total:
            s = ((_u16_unpack(pkt, at)[0] ^ _M16) or _M16) + d
            _u16_pack(pkt, at, ((s & _M16) + (s >> 16)) ^ _M16)
    elif proto == _PROTO_UDP:
        at = hlen + 6
        if at + 2 <= total:
            c = _u16_unpack(pkt, at)[0]
            if c:  # 0 means "no checksum" and stays 0; a computed 0 is sent as 0xFFFF
                s = ((c ^ _M16) or _M16) + d
                _u16_pack(pkt, at, (((s & _M16) + (s >> 16)) ^ _M16) or _M16)
    elif proto == _PROTO_ICMP:
        _rewrite_icmp_error(pkt, hlen, total, old, addr, d, True)
    return True


def py_rewrite_dst(pkt: bytearray, new_dst: bytes) -> bool:
    """Rewrite ``IP.dst`` of the IPv4 packet in ``pkt`` to ``new_dst``, in place.

    The mirror of :func:`rewrite_src`: for an incoming ICMP error whose embedded packet was
    sent from the old destination (that is, by us), the embedded source is rewritten too.
    Same return value and error behaviour as :func:`rewrite_src`.
    """
    if len(new_dst) != 4:
        raise ValueError(f"an IPv4 address is 4 bytes, got {len(new_dst)}")
    size = len(pkt)
    if size < 20:
        return False
    ver_ihl, total, frag, proto, ck, src, old = _ip_unpack(pkt, 0)
    hlen = (ver_ihl & 0x0F) << 2
    if ver_ihl >> 4 != 4 or hlen < 20 or hlen > size or total > size or total < hlen:
        return False
    addr = int.from_bytes(new_dst, "big")
    if old == addr:
        return True
    d = ((old ^ _M32) + addr) % _M16
    s = ((ck ^ _M16) or _M16) + d
    _ck_addrs_pack(pkt, 10, ((s & _M16) + (s >> 16)) ^ _M16, src, addr)
    if frag & _OFFSET_MASK:
        return True
    if proto == _PROTO_TCP:
        at = hlen + 16
        if at + 2 <= total:
            s = ((_u16_unpack(pkt, at)[0] ^ _M16) or _M16) + d
            _u16_pack(pkt, at, ((s & _M16) + (s >> 16)) ^ _M16)
    elif proto == _PROTO_UDP:
        at = hlen + 6
        if at + 2 <= total:
            c = _u16_unpack(pkt, at)[0]
            if c:
                s = ((c ^ _M16) or _M16) + d
                _u16_pack(pkt, at, (((s & _M16) + (s >> 16)) ^ _M16) or _M16)
    elif proto == _PROTO_ICMP:
        _rewrite_icmp_error(pkt, hlen, total, old, addr, d, False)
    return True


def _rewrite_icmp_error(
    pkt: bytearray, hlen: int, total: int, old: int, new: int, d: int, is_src: bool
) -> None:
    """Rewrite the packet embedded in an ICMP error, if it carries the rewritten address.

    ``hlen`` is the outer header length, ``total`` the outer total length (end of the
    captured bytes), ``old``/``new`` the outer address change and ``d`` its checksum delta.
    The embedded packet travelled the other way, so an outer source change maps to its
    destination and vice versa. A truncated or malformed embedded header is left alone, and
    so is an embedded L4 checksum field cut in half by the capture (its new first byte
    depends, through the carry, on the byte that was not captured).
    """
    inner = hlen + 8
    if inner + 20 > total or pkt[hlen] not in ICMP_ERROR_TYPES:
        return
    ver_ihl, _, frag, proto, ck, src, dst = _ip_unpack(pkt, inner)
    ihlen = (ver_ihl & 0x0F) << 2
    if ver_ihl >> 4 != 4 or ihlen < 20 or inner + ihlen > total:
        return
    if is_src:
        if dst != old:
            return
        dst = new
    else:
        if src != old:
            return
        src = new

    # The ICMP checksum covers every embedded byte that changes: the address (delta d),
    # the embedded IP checksum and the embedded L4 checksum. All sit at even offsets of
    # the ICMP message, so their plain differences are valid one's complement deltas.
    s = ((ck ^ _M16) or _M16) + d
    new_ck = ((s & _M16) + (s >> 16)) ^ _M16
    _ck_addrs_pack(pkt, inner + 10, new_ck, src, dst)
    delta = d + new_ck - ck

    if not frag & _OFFSET_MASK:
        if proto == _PROTO_TCP:
            at = inner + ihlen + 16
            if at + 2 <= total:
                c = _u16_unpack(pkt, at)[0]
                s = ((c ^ _M16) or _M16) + d
                c2 = ((s & _M16) + (s >> 16)) ^ _M16
                _u16_pack(pkt, at, c2)
                delta += c2 - c
        elif proto == _PROTO_UDP:
            at = inner + ihlen + 6
            if at + 2 <= total:
                c = _u16_unpack(pkt, at)[0]
                if c:
                    s = ((c ^ _M16) or _M16) + d
                    c2 = (((s & _M16) + (s >> 16)) ^ _M16) or _M16
                    _u16_pack(pkt, at, c2)
                    delta += c2 - c

    at = hlen + 2
    s = ((_u16_unpack(pkt, at)[0] ^ _M16) or _M16) + delta % _M16
    _u16_pack(pkt, at, ((s & _M16) + (s >> 16)) ^ _M16)


def py_five_tuple(
    pkt: bytes | bytearray | memoryview,
) -> tuple[int, bytes, bytes, int, int] | None:
    """Flow key ``(protocol, src, dst, sport, dport)`` of an IPv4 packet, or None.

    ``src``/``dst`` are 4-byte ``bytes``. Ports are those of TCP/UDP (0, 0 when the ports
    are not within the packet or for a non-first fragment); for ICMP echo request/reply
    both are the identifier; for an ICMP error the key is that of the embedded packet,
    reversed (src/dst and sport/dport swapped), i.e. the key of a packet travelling in the
    same direction as the error, so the error follows its flow. Other ICMP messages and
    other protocols get ports 0. None when the outer IPv4 header is not well-formed (same
    checks as :func:`rewrite_src`). A memoryview must have a byte format.
    """
    size = len(pkt)
    if size < 20:
        return None
    ver_ihl, total, frag, proto, src, dst = _ip_key_unpack(pkt, 0)
    hlen = (ver_ihl & 0x0F) << 2
    if ver_ihl >> 4 != 4 or hlen < 20 or hlen > size or total > size or total < hlen:
        return None
    if frag & _OFFSET_MASK:
        return (proto, src, dst, 0, 0)
    if proto == _PROTO_TCP or proto == _PROTO_UDP:
        if hlen + 4 <= total:
            sport, dport = _ports_unpack(pkt, hlen)
            return (proto, src, dst, sport, dport)
        return (proto, src, dst, 0, 0)
    if proto == _PROTO_ICMP and hlen + 8 <= total:
        icmp_type, ident = _icmp_id_unpack(pkt, hlen)
        if icmp_type == 8 or icmp_type == 0:
            return (proto, src, dst, ident, ident)
        if icmp_type in ICMP_ERROR_TYPES:
            key = _embedded_key(pkt, hlen + 8, total)
            if key is not None:
                return key
    return (proto, src, dst, 0, 0)


def _embedded_key(
    pkt: bytes | bytearray | memoryview, inner: int, total: int
) -> tuple[int, bytes, bytes, int, int] | None:
    """Reversed 5-tuple of the packet embedded at ``inner`` in an ICMP error, or None."""
    if inner + 20 > total:
        return None
    ver_ihl, _, frag, proto, src, dst = _ip_key_unpack(pkt, inner)
    ihlen = (ver_ihl & 0x0F) << 2
    if ver_ihl >> 4 != 4 or ihlen < 20 or inner + ihlen > total:
        return None
    l4 = inner + ihlen
    if frag & _OFFSET_MASK:
        return (proto, dst, src, 0, 0)
    if proto == _PROTO_TCP or proto == _PROTO_UDP:
        if l4 + 4 <= total:
            sport, dport = _ports_unpack(pkt, l4)
            return (proto, dst, src, dport, sport)
    elif proto == _PROTO_ICMP and l4 + 8 <= total:
        icmp_type, ident = _icmp_id_unpack(pkt, l4)
        if icmp_type == 8 or icmp_type == 0:
            return (proto, dst, src, ident, ident)
    return (proto, dst, src, 0, 0)


try:   # the compiled common case, when pip built it
    from .dataplane._fast import five_tuple_tcpudp as _c_five_tuple
    from .dataplane._fast import rewrite_addr as _c_rewrite
except ImportError:   # pragma: no cover - depends on the build
    rewrite_src = py_rewrite_src
    rewrite_dst = py_rewrite_dst
    five_tuple = py_five_tuple
else:
    def rewrite_src(pkt: bytearray, new_src: bytes) -> bool:
        """See :func:`py_rewrite_src` (compiled for TCP/UDP)."""
        r = _c_rewrite(pkt, new_src, True)
        return r > 0 if r >= 0 else py_rewrite_src(pkt, new_src)

    def rewrite_dst(pkt: bytearray, new_dst: bytes) -> bool:
        """See :func:`py_rewrite_dst` (compiled for TCP/UDP)."""
        r = _c_rewrite(pkt, new_dst, False)
        return r > 0 if r >= 0 else py_rewrite_dst(pkt, new_dst)

    def five_tuple(pkt: bytes | bytearray | memoryview
                   ) -> tuple[int, bytes, bytes, int, int] | None:
        """See :func:`py_five_tuple` (compiled for TCP/UDP)."""
        return _c_five_tuple(pkt) or py_five_tuple(pkt)

