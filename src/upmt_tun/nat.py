"""Internal NAT of the Mobile Host: rewrite IPv4 and IPv6 addresses in place.

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

IPv6 (the section below): an address argument of 16 bytes rewrites an IPv6 packet (4
bytes: an IPv4 one; a packet of the other family is refused, False); :func:`five_tuple`
gives 16-byte addresses for IPv6. The compiled code covers IPv6 TCP/UDP without
extension headers; the rest (extension headers, fragments, ICMPv6) runs the reference.
"""

from __future__ import annotations

import struct

__all__ = [
    "ICMP6_ERROR_TYPES",
    "ICMP_ERROR_TYPES",
    "five_tuple",
    "icmp6_error",
    "ipv4_checksum",
    "ones_sum",
    "py_five_tuple",
    "py_five_tuple6",
    "py_rewrite_dst",
    "py_rewrite6",
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
        if len(new_src) == 16:
            return py_rewrite6(pkt, new_src, True)
        raise ValueError(f"an address is 4 or 16 bytes, got {len(new_src)}")
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
        if len(new_dst) == 16:
            return py_rewrite6(pkt, new_dst, False)
        raise ValueError(f"an address is 4 or 16 bytes, got {len(new_dst)}")
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
    if pkt[0] >> 4 == 6:
        return py_five_tuple6(pkt)
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
    return _reversed_key(pkt, proto, src, dst, inner + ihlen, frag & _OFFSET_MASK, total,
                         _PROTO_ICMP, (8, 0))


def _reversed_key(pkt: bytes | bytearray | memoryview, proto: int, src: bytes, dst: bytes,
                  l4: int, frag: int, end: int, icmp: int, echo: tuple[int, int]
                  ) -> tuple[int, bytes, bytes, int, int]:
    """The reversed 5-tuple of a packet quoted in an ICMP(v6) error, its IP header read
    (``l4``: where its transport header starts, ``frag``: not a first fragment): ports,
    or the echo id of an ICMP(v6) echo (``icmp`` its protocol, ``echo`` its types), or
    0, 0."""
    if not frag:
        if proto == _PROTO_TCP or proto == _PROTO_UDP:
            if l4 + 4 <= end:
                sport, dport = _ports_unpack(pkt, l4)
                return (proto, dst, src, dport, sport)
        elif proto == icmp and l4 + 8 <= end:
            icmp_type, ident = _icmp_id_unpack(pkt, l4)
            if icmp_type in echo:
                return (proto, dst, src, ident, ident)
    return (proto, dst, src, 0, 0)



# -- IPv6 -----------------------------------------------------------------------------------
#
# No header checksum; TCP, UDP and ICMPv6 checksums all cover a pseudo-header holding both
# 128-bit addresses (RFC 8200, 8.1), so an address change is one delta added to the L4
# checksum, as for IPv4's pseudo-header. The delta of a 128-bit change is again
# ``(new - old) mod 0xFFFF`` (the eight words' sum is the address modulo 0xFFFF).
#
# Extension headers are walked (hop-by-hop, routing, destination options, fragment, AH;
# at most ``_MAX_EXT`` of them) to the upper-layer header. What the NAT refuses (False /
# no flow key: the forwarders count it and drop it):
#   * a routing header with segments left: the pseudo-header then holds the *final*
#     destination, not IP.dst, and the packet is source-routed through us: not ours to NAT;
#   * a UDP datagram with checksum 0, illegal in IPv6 (RFC 8200 8.1: receivers discard it);
#   * an extension header that runs past the packet, or more than ``_MAX_EXT`` of them.
# Fragments: a first fragment's L4 checksum is updated (it covers the whole datagram, but
# the delta only depends on the address); later fragments only get the address. Every
# fragment of a datagram gets the same flow key, ports 0 (only the first holds them), so
# they all take one tunnel and one anchor, whose conntrack reassembles them before its NAT.

ICMP6_ERROR_TYPES = frozenset((1, 2, 3, 4))
_PROTO_ICMP6 = 58
_EXT_LEN8 = frozenset((0, 43, 60))     # hop-by-hop, routing, destination options
_EXT_FRAG = 44
_EXT_AH = 51
_MAX_EXT = 8
_IP6 = struct.Struct("!4xHB")          # payload length, next header


def _walk6(pkt: bytes | bytearray | memoryview, at: int, nh: int, end: int
           ) -> tuple[int, int, int] | None:
    """Walk the extension headers from offset ``at`` (``nh``: the first next-header value)
    to the upper layer, within ``end``: (protocol, its offset, fragment: 0 none, 1 first,
    2 a later one), or None (malformed, too many, or a routing header with segments left).
    """
    frag = 0
    for _ in range(_MAX_EXT):
        if nh in _EXT_LEN8:
            if at + 8 > end:
                return None
            if nh == 43 and pkt[at + 3]:
                return None
            nxt, at = pkt[at], at + ((pkt[at + 1] + 1) << 3)
        elif nh == _EXT_FRAG:
            if at + 8 > end:
                return None
            frag = 2 if (pkt[at + 2] << 8 | pkt[at + 3]) & 0xFFF8 else 1
            nxt, at = pkt[at], at + 8
        elif nh == _EXT_AH:
            if at + 8 > end:
                return None
            nxt, at = pkt[at], at + ((pkt[at + 1] + 2) << 2)
        else:
            return nh, at, frag
        if at > end:
            return None
        nh = nxt
        if frag == 2:
            return nh, at, frag      # nothing of the upper layer is in a later fragment
    return None


def _outer6(pkt: bytes | bytearray | memoryview) -> tuple[int, int, int, int] | None:
    """(protocol, L4 offset, fragment kind, end) of a well-formed IPv6 packet, or None
    (too short, not version 6, payload length beyond the buffer, or :func:`_walk6` None).
    """
    size = len(pkt)
    if size < 40 or pkt[0] >> 4 != 6:
        return None
    plen, nh = _IP6.unpack_from(pkt, 0)
    end = 40 + plen
    if end > size:
        return None
    walked = _walk6(pkt, 40, nh, end)
    if walked is None:
        return None
    return walked[0], walked[1], walked[2], end


def _l4_csum_at(proto: int, l4: int) -> int:
    """Offset of the checksum of a TCP/UDP/ICMPv6 header at ``l4``, or -1."""
    if proto == _PROTO_TCP:
        return l4 + 16
    if proto == _PROTO_UDP:
        return l4 + 6
    if proto == _PROTO_ICMP6:
        return l4 + 2
    return -1


def _adjust(pkt: bytearray, at: int, d: int, udp: bool) -> int:
    """Add ``d`` to the checksum at ``at`` (RFC 1624 eqn. 3, as above; for UDP a
    computed 0 is sent as 0xFFFF); returns the change of the field's value."""
    c: int = _u16_unpack(pkt, at)[0]
    s = ((c ^ _M16) or _M16) + d
    c2 = ((s & _M16) + (s >> 16)) ^ _M16
    if udp and not c2:
        c2 = _M16
    _u16_pack(pkt, at, c2)
    return c2 - c


def py_rewrite6(pkt: bytearray, new: bytes, is_src: bool) -> bool:
    """Rewrite IP.src (``is_src``) or IP.dst of the IPv6 packet in ``pkt`` to the 16-byte
    ``new``, in place, with the L4 checksum (and an ICMPv6 error's quote, as
    :func:`py_rewrite_src` does for ICMP) updated incrementally.

    False, ``pkt`` untouched, when it is no well-formed IPv6 packet or one the NAT refuses
    (the IPv6 notes above: routing header with segments left, UDP checksum 0)."""
    if len(new) != 16:
        raise ValueError(f"an IPv6 address is 16 bytes, got {len(new)}")
    o = _outer6(pkt)
    if o is None:
        return False
    proto, l4, frag, end = o
    at = _l4_csum_at(proto, l4) if frag != 2 else -1
    if proto == _PROTO_UDP and frag != 2 and at + 2 <= end and not pkt[at] | pkt[at + 1]:
        return False
    a = 8 if is_src else 24
    old = int.from_bytes(pkt[a:a + 16], "big")
    addr = int.from_bytes(new, "big")
    if old == addr:
        return True
    d = (addr - old) % _M16
    pkt[a:a + 16] = new
    if at < 0 or at + 2 > end:
        return True
    if proto == _PROTO_ICMP6 and pkt[l4] in ICMP6_ERROR_TYPES:
        d += _rewrite_icmp6_quote(pkt, l4 + 8, end, old, new, addr, d, is_src)
    _adjust(pkt, at, d % _M16, proto == _PROTO_UDP)
    return True


def _rewrite_icmp6_quote(pkt: bytearray, inner: int, end: int, old: int, new: bytes,
                         addr: int, d: int, is_src: bool) -> int:
    """The quote of an ICMPv6 error at ``inner``: if it travelled the other way with the
    rewritten address (its destination for ``is_src``, else its source), rewrite it and
    its L4 checksum (when captured whole). Returns the sum of the changes for the outer
    ICMPv6 checksum (0 when the quote is left alone: truncated, malformed, someone
    else's). Every field sits at an even offset of the ICMPv6 message."""
    if inner + 40 > end or pkt[inner] >> 4 != 6:
        return 0
    a = inner + (24 if is_src else 8)
    if int.from_bytes(pkt[a:a + 16], "big") != old:
        return 0
    pkt[a:a + 16] = new
    delta = d
    walked = _walk6(pkt, inner + 40, pkt[inner + 6], end)
    if walked is not None and walked[2] != 2:
        proto, l4 = walked[0], walked[1]
        at = _l4_csum_at(proto, l4)
        if at >= 0 and at + 2 <= end and not (proto == _PROTO_UDP and not pkt[at] | pkt[at + 1]):
            delta += _adjust(pkt, at, d, proto == _PROTO_UDP)
    return delta


def py_five_tuple6(pkt: bytes | bytearray | memoryview
                   ) -> tuple[int, bytes, bytes, int, int] | None:
    """Flow key of an IPv6 packet (see :func:`py_five_tuple`; addresses 16 bytes), or
    None when the NAT would refuse it. The protocol is the upper layer's (after the
    extension headers); ICMPv6 echo (128/129) has its identifier as both ports, an ICMPv6
    error (1-4) the reversed key of its quote; every fragment has ports 0."""
    o = _outer6(pkt)
    if o is None:
        return None
    proto, l4, frag, end = o
    src, dst = bytes(pkt[8:24]), bytes(pkt[24:40])
    if frag:
        if proto == _PROTO_UDP and frag == 1 and l4 + 8 <= end and not pkt[l4 + 6] | pkt[l4 + 7]:
            return None
        return (proto, src, dst, 0, 0)
    if proto == _PROTO_TCP or proto == _PROTO_UDP:
        if l4 + 4 > end:
            return (proto, src, dst, 0, 0)
        if proto == _PROTO_UDP and l4 + 8 <= end and not pkt[l4 + 6] | pkt[l4 + 7]:
            return None
        sport, dport = _ports_unpack(pkt, l4)
        return (proto, src, dst, sport, dport)
    if proto == _PROTO_ICMP6 and l4 + 8 <= end:
        icmp_type, ident = _icmp_id_unpack(pkt, l4)
        if icmp_type == 128 or icmp_type == 129:
            return (proto, src, dst, ident, ident)
        if icmp_type in ICMP6_ERROR_TYPES:
            key = _embedded_key6(pkt, l4 + 8, end)
            if key is not None:
                return key
    return (proto, src, dst, 0, 0)


def _embedded_key6(pkt: bytes | bytearray | memoryview, inner: int, end: int
                   ) -> tuple[int, bytes, bytes, int, int] | None:
    """Reversed 5-tuple of the IPv6 packet quoted at ``inner`` in an ICMPv6 error."""
    if inner + 40 > end or pkt[inner] >> 4 != 6:
        return None
    walked = _walk6(pkt, inner + 40, pkt[inner + 6], end)
    if walked is None:
        return None
    proto, l4, frag = walked
    src, dst = bytes(pkt[inner + 8:inner + 24]), bytes(pkt[inner + 24:inner + 40])
    return _reversed_key(pkt, proto, src, dst, l4, frag, end, _PROTO_ICMP6, (128, 129))



def icmp6_error(pkt: bytes | bytearray | memoryview, icmp_type: int, code: int,
                param: int, src: bytes) -> bytes:
    """An ICMPv6 error (RFC 4443) from ``src`` about the IPv6 packet ``pkt``, to its
    source: ``param`` is the 32-bit field after the checksum (the MTU of a Packet Too Big,
    type 2), the body as much of ``pkt`` as keeps the error within the IPv6 minimum MTU
    (1280 bytes); the checksum computed over the pseudo-header."""
    quote = bytes(pkt[:1280 - 48])
    dst = bytes(pkt[8:24])
    msg = bytearray(struct.pack("!BBHI", icmp_type, code, 0, param & _M32) + quote)
    pseudo = src + dst + struct.pack("!I3xB", len(msg), _PROTO_ICMP6)
    _u16_pack(msg, 2, ones_sum(pseudo + msg) ^ _M16)
    return struct.pack("!IHBB", 0x60000000, len(msg), _PROTO_ICMP6, 64) + src + dst + bytes(msg)

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

