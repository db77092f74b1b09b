"""Tests of the internal NAT (upmt_tun.nat): pure, no root.

Packets are built here from scratch with a deliberately naive reference checksum (a loop
over 16-bit words with end-around carry), never with the module under test. The main
oracle: rewriting a packet built with the old addresses must give, byte for byte, the
packet built from scratch with the new addresses.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from upmt_tun import nat

TCP, UDP, ICMP = 6, 17, 1

VIPA_FIX = bytes([100, 64, 0, 1])
VIPA_A = bytes([10, 200, 0, 7])
VIPA_B = bytes([10, 201, 3, 9])
SERVER = bytes([198, 51, 100, 20])
ROUTER = bytes([192, 0, 2, 254])


# --------------------------------------------------------------------------- reference


def ref_sum(data: bytes) -> int:
    """One's complement sum of 16-bit words, end-around carry, the slow obvious way."""
    if len(data) % 2:
        data = data + b"\x00"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ref_cksum(data: bytes) -> int:
    """RFC 1071 checksum: complement of the one's complement sum."""
    return (~ref_sum(data)) & 0xFFFF


def pseudo(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    """IPv4 pseudo-header for TCP/UDP checksums."""
    return src + dst + bytes([0, proto]) + length.to_bytes(2, "big")


def ip_header(
    src: bytes,
    dst: bytes,
    proto: int,
    payload_len: int,
    *,
    ident: int = 0x1234,
    flags_off: int = 0,
    options: bytes = b"",
) -> bytes:
    """IPv4 header with a from-scratch checksum (``options`` padded by the caller)."""
    assert len(options) % 4 == 0
    hlen = 20 + len(options)
    hdr = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x40 | (hlen // 4),
            0,
            hlen + payload_len,
            ident,
            flags_off,
            64,
            proto,
            0,
            src,
            dst,
        )
        + options
    )
    hdr[10:12] = ref_cksum(bytes(hdr)).to_bytes(2, "big")
    return bytes(hdr)


def tcp_segment(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    """TCP segment (20-byte header, ACK|PSH) with its checksum over the pseudo-header."""
    hdr = struct.pack("!HHIIBBHHH", sport, dport, 1000, 2000, 5 << 4, 0x18, 65535, 0, 0)
    seg = bytearray(hdr + payload)
    seg[16:18] = ref_cksum(pseudo(src, dst, TCP, len(seg)) + bytes(seg)).to_bytes(2, "big")
    return bytes(seg)


def udp_datagram(
    src: bytes, dst: bytes, sport: int, dport: int, payload: bytes, *, checksum: bool = True
) -> bytes:
    """UDP datagram; checksum 0 ("none") if not ``checksum``, a computed 0 sent as 0xFFFF."""
    seg = bytearray(struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)
    if checksum:
        c = ref_cksum(pseudo(src, dst, UDP, len(seg)) + bytes(seg)) or 0xFFFF
        seg[6:8] = c.to_bytes(2, "big")
    return bytes(seg)


def icmp_message(icmp_type: int, code: int, rest: bytes, body: bytes) -> bytes:
    """ICMP message with its checksum (no pseudo-header)."""
    msg = bytearray(bytes([icmp_type, code, 0, 0]) + rest + body)
    msg[2:4] = ref_cksum(bytes(msg)).to_bytes(2, "big")
    return bytes(msg)


def echo(icmp_type: int, ident: int, seq: int, payload: bytes) -> bytes:
    """ICMP echo request (8) or reply (0)."""
    return icmp_message(icmp_type, 0, struct.pack("!HH", ident, seq), payload)


def l4_for(kind: str, src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    """Transport payload of one of the packet kinds used by the property tests."""
    if kind == "tcp":
        return tcp_segment(src, dst, sport, dport, payload)
    if kind == "udp":
        return udp_datagram(src, dst, sport, dport, payload)
    if kind == "udp0":
        return udp_datagram(src, dst, sport, dport, payload, checksum=False)
    if kind == "echo":
        return echo(8, sport, dport, payload)
    raise AssertionError(kind)


PROTO_OF = {"tcp": TCP, "udp": UDP, "udp0": UDP, "echo": ICMP}


def packet(src: bytes, dst: bytes, proto: int, l4: bytes, **kw: object) -> bytearray:
    """Whole IPv4 packet around ``l4``."""
    return bytearray(ip_header(src, dst, proto, len(l4), **kw) + l4)  # type: ignore[arg-type]


def icmp_error(
    src: bytes,
    dst: bytes,
    original: bytes,
    captured: int,
    *,
    icmp_type: int = 3,
    code: int = 4,
    mtu: int = 1400,
) -> bytearray:
    """ICMP error from ``src`` to ``dst`` quoting the first ``captured`` bytes of the
    original packet's payload after its IP header (default: frag needed, with an MTU)."""
    ihl = (original[0] & 0x0F) * 4
    quoted = original[: ihl + captured]
    rest = struct.pack("!HH", 0, mtu) if icmp_type == 3 else bytes(4)
    return packet(src, dst, ICMP, icmp_message(icmp_type, code, rest, quoted))


def fragments(src: bytes, dst: bytes, proto: int, l4: bytes, first: int) -> list[bytearray]:
    """Split a transport payload into a first fragment (MF) and a second one."""
    assert first % 8 == 0
    return [
        packet(src, dst, proto, l4[:first], flags_off=0x2000),
        packet(src, dst, proto, l4[first:], flags_off=first // 8),
    ]


# ------------------------------------------------------------------------------ checkers


def ip_ok(pkt: bytes) -> bool:
    hlen = (pkt[0] & 0x0F) * 4
    return ref_sum(bytes(pkt[:hlen])) == 0xFFFF


def l4_ok(pkt: bytes) -> bool:
    """Whole-packet TCP/UDP/ICMP checksum check (unfragmented packets)."""
    hlen = (pkt[0] & 0x0F) * 4
    total = int.from_bytes(pkt[2:4], "big")
    proto = pkt[9]
    seg = bytes(pkt[hlen:total])
    if proto == ICMP:
        return ref_sum(seg) == 0xFFFF
    if proto == UDP and seg[6:8] == b"\x00\x00":
        return True
    return ref_sum(pseudo(bytes(pkt[12:16]), bytes(pkt[16:20]), proto, len(seg)) + seg) == 0xFFFF


# ------------------------------------------------------------------------ basic rewrites


def test_ipv4_checksum_matches_reference() -> None:
    hdr = ip_header(VIPA_FIX, SERVER, TCP, 100)
    assert nat.ipv4_checksum(hdr) == 0  # valid header sums to 0xFFFF
    zeroed = hdr[:10] + b"\x00\x00" + hdr[12:]
    assert nat.ipv4_checksum(zeroed) == int.from_bytes(hdr[10:12], "big")
    assert nat.ipv4_checksum(b"") == 0xFFFF
    assert nat.ipv4_checksum(b"\x00\x00\x00") == 0xFFFF
    assert nat.ipv4_checksum(b"\xff\xff") == 0  # non-zero data summing to -0
    assert nat.ipv4_checksum(memoryview(b"\x01\x02\x03")) == ref_cksum(b"\x01\x02\x03")


@given(st.binary(max_size=300))
def test_ipv4_checksum_property(data: bytes) -> None:
    assert nat.ipv4_checksum(data) == ref_cksum(data)
    assert nat.ipv4_checksum(bytearray(data)) == ref_cksum(data)


def test_tcp_rewrite_src_and_dst() -> None:
    payload = b"GET / HTTP/1.1\r\n\r\n"
    pkt = packet(VIPA_FIX, SERVER, TCP, tcp_segment(VIPA_FIX, SERVER, 40000, 80, payload))
    assert nat.rewrite_src(pkt, VIPA_A) is True
    assert pkt == packet(VIPA_A, SERVER, TCP, tcp_segment(VIPA_A, SERVER, 40000, 80, payload))
    assert ip_ok(pkt) and l4_ok(pkt)

    reply = packet(SERVER, VIPA_A, TCP, tcp_segment(SERVER, VIPA_A, 80, 40000, b"200 OK"))
    assert nat.rewrite_dst(reply, VIPA_FIX) is True
    assert reply == packet(
        SERVER, VIPA_FIX, TCP, tcp_segment(SERVER, VIPA_FIX, 80, 40000, b"200 OK")
    )
    assert ip_ok(reply) and l4_ok(reply)


def test_ip_options_header() -> None:
    opts = b"\x01\x01\x01\x00"  # NOP NOP NOP EOL
    l4 = tcp_segment(VIPA_FIX, SERVER, 1, 2, b"x")
    pkt = packet(VIPA_FIX, SERVER, TCP, l4, options=opts)
    assert nat.rewrite_src(pkt, VIPA_B)
    assert pkt == packet(VIPA_B, SERVER, TCP, tcp_segment(VIPA_B, SERVER, 1, 2, b"x"), options=opts)


def test_udp_with_checksum() -> None:
    pkt = packet(VIPA_FIX, SERVER, UDP, udp_datagram(VIPA_FIX, SERVER, 5353, 53, b"query"))
    assert nat.rewrite_src(pkt, VIPA_A)
    assert pkt == packet(VIPA_A, SERVER, UDP, udp_datagram(VIPA_A, SERVER, 5353, 53, b"query"))
    assert ip_ok(pkt) and l4_ok(pkt)


def test_udp_without_checksum_stays_zero() -> None:
    l4 = udp_datagram(SERVER, VIPA_A, 53, 5353, b"answer", checksum=False)
    pkt = packet(SERVER, VIPA_A, UDP, l4)
    assert nat.rewrite_dst(pkt, VIPA_FIX)
    assert pkt[26:28] == b"\x00\x00"
    assert pkt == packet(SERVER, VIPA_FIX, UDP, l4)
    assert ip_ok(pkt)


def _udp_payload_summing_to_zero(src: bytes, dst: bytes) -> bytes:
    """A 2-byte-aligned payload making the UDP checksum from ``src`` to ``dst`` compute 0."""
    base = b"\x00\x00abcd"
    seg = struct.pack("!HHHH", 1111, 2222, 8 + len(base), 0) + base
    s = ref_sum(pseudo(src, dst, UDP, len(seg)) + seg)
    fill = (0xFFFF - s) & 0xFFFF or 0xFFFF  # make the sum 0xFFFF, so ~sum == 0
    payload = fill.to_bytes(2, "big") + base[2:]
    seg = struct.pack("!HHHH", 1111, 2222, 8 + len(payload), 0) + payload
    assert ref_cksum(pseudo(src, dst, UDP, len(seg)) + seg) == 0
    return payload


def test_udp_computed_zero_becomes_ffff_and_back() -> None:
    payload = _udp_payload_summing_to_zero(VIPA_A, SERVER)
    pkt = packet(VIPA_FIX, SERVER, UDP, udp_datagram(VIPA_FIX, SERVER, 1111, 2222, payload))
    original = bytes(pkt)
    assert nat.rewrite_src(pkt, VIPA_A)
    assert pkt[26:28] == b"\xff\xff"  # computed 0 is transmitted as 0xFFFF
    assert pkt == packet(VIPA_A, SERVER, UDP, udp_datagram(VIPA_A, SERVER, 1111, 2222, payload))
    assert l4_ok(pkt)
    # starting from the 0xFFFF form, going back gives the from-scratch checksum again
    assert nat.rewrite_src(pkt, VIPA_FIX)
    assert bytes(pkt) == original


def test_icmp_echo_checksum_untouched() -> None:
    msg = echo(8, 0xBEEF, 1, b"ping" * 8)
    pkt = packet(VIPA_FIX, SERVER, ICMP, msg)
    assert nat.rewrite_src(pkt, VIPA_A)
    assert pkt == packet(VIPA_A, SERVER, ICMP, msg)
    assert pkt[20:] == msg


def test_same_address_is_a_no_op() -> None:
    pkt = packet(VIPA_A, SERVER, TCP, tcp_segment(VIPA_A, SERVER, 1, 2, b""))
    before = bytes(pkt)
    assert nat.rewrite_src(pkt, VIPA_A) and bytes(pkt) == before
    assert nat.rewrite_dst(pkt, SERVER) and bytes(pkt) == before


def test_trailing_padding_is_not_covered() -> None:
    """Bytes after IP total length (e.g. Ethernet padding) are not part of the packet."""
    pkt = packet(VIPA_FIX, SERVER, UDP, udp_datagram(VIPA_FIX, SERVER, 7, 9, b"z"))
    pkt += b"\xaa" * 5
    assert nat.rewrite_src(pkt, VIPA_B)
    expected = packet(VIPA_B, SERVER, UDP, udp_datagram(VIPA_B, SERVER, 7, 9, b"z"))
    assert pkt == expected + b"\xaa" * 5


def test_l4_checksum_beyond_total_length_left_alone() -> None:
    """A TCP header cut before its checksum field: only the IP header changes."""
    l4 = tcp_segment(VIPA_FIX, SERVER, 1, 2, b"")[:16]
    pkt = packet(VIPA_FIX, SERVER, TCP, l4)
    assert nat.rewrite_src(pkt, VIPA_A)
    assert pkt == packet(VIPA_A, SERVER, TCP, l4)
    l4 = udp_datagram(VIPA_FIX, SERVER, 1, 2, b"")[:6]
    pkt = packet(VIPA_FIX, SERVER, UDP, l4)
    assert nat.rewrite_src(pkt, VIPA_A)
    assert pkt == packet(VIPA_A, SERVER, UDP, l4)


def test_bad_address_length_raises() -> None:
    pkt = packet(VIPA_FIX, SERVER, TCP, tcp_segment(VIPA_FIX, SERVER, 1, 2, b""))
    with pytest.raises(ValueError):
        nat.rewrite_src(pkt, b"\x01\x02\x03")
    with pytest.raises(ValueError):
        nat.rewrite_dst(pkt, b"\x01\x02\x03\x04\x05")


# ----------------------------------------------------------------------------- fragments


def test_first_fragment_with_mf_gets_l4_update() -> None:
    payload = bytes(range(256)) * 8
    first_old, second_old = fragments(
        VIPA_FIX, SERVER, TCP, tcp_segment(VIPA_FIX, SERVER, 4000, 443, payload), 1480
    )
    first_new, second_new = fragments(
        VIPA_A, SERVER, TCP, tcp_segment(VIPA_A, SERVER, 4000, 443, payload), 1480
    )
    assert nat.rewrite_src(first_old, VIPA_A)
    assert first_old == first_new
    assert ip_ok(first_old)


@pytest.mark.parametrize("kind", ["tcp", "udp"])
def test_non_first_fragment_only_ip_header(kind: str) -> None:
    # the second fragment's data begins with bytes that look like an L4 header
    payload = tcp_segment(VIPA_FIX, SERVER, 1, 2, b"inner") * 20
    l4 = l4_for(kind, VIPA_FIX, SERVER, 4000, 443, payload)
    proto = PROTO_OF[kind]
    _, second = fragments(VIPA_FIX, SERVER, proto, l4, 16)
    body = bytes(second[20:])
    assert nat.rewrite_src(second, VIPA_A)
    assert bytes(second[20:]) == body
    assert second[12:16] == VIPA_A
    assert ip_ok(second)
    assert nat.five_tuple(second) == (proto, VIPA_A, SERVER, 0, 0)


# ---------------------------------------------------------------------------- ICMP errors


@pytest.mark.parametrize("captured", [8, 20, 28, 200, 10_000])
def test_incoming_frag_needed_embedding_tcp(captured: int) -> None:
    """A router tells VIpA (via the anchor) that our TCP packet was too big."""
    payload = b"D" * 1300

    def orig(src: bytes) -> bytes:
        return bytes(packet(src, SERVER, TCP, tcp_segment(src, SERVER, 40000, 443, payload)))

    err = icmp_error(ROUTER, VIPA_A, orig(VIPA_A), captured)
    assert nat.rewrite_dst(err, VIPA_FIX)
    expected = icmp_error(ROUTER, VIPA_FIX, orig(VIPA_FIX), captured)
    assert err == expected
    assert ip_ok(err) and l4_ok(err)
    assert ip_ok(err[28:])  # embedded header checksum


@pytest.mark.parametrize("with_checksum", [True, False])
@pytest.mark.parametrize("captured", [8, 100])
def test_incoming_port_unreachable_embedding_udp(captured: int, with_checksum: bool) -> None:
    def orig(src: bytes) -> bytes:
        l4 = udp_datagram(src, SERVER, 5000, 9999, b"u" * 60, checksum=with_checksum)
        return bytes(packet(src, SERVER, UDP, l4))

    err = icmp_error(SERVER, VIPA_B, orig(VIPA_B), captured, code=3)
    assert nat.rewrite_dst(err, VIPA_FIX)
    assert err == icmp_error(SERVER, VIPA_FIX, orig(VIPA_FIX), captured, code=3)
    if not with_checksum:
        assert err[28 + 20 + 6 : 28 + 20 + 8] == b"\x00\x00"


@pytest.mark.parametrize("icmp_type", [3, 4, 5, 11, 12])
def test_outgoing_error_rewrites_embedded_dst(icmp_type: int) -> None:
    """Our stack answers a peer's UDP packet with an error; its quote was sent to us."""

    def orig(dst: bytes) -> bytes:
        return bytes(packet(SERVER, dst, UDP, udp_datagram(SERVER, dst, 53, 7000, b"q" * 30)))

    err = icmp_error(VIPA_FIX, SERVER, orig(VIPA_FIX), 38, icmp_type=icmp_type, code=0)
    assert nat.rewrite_src(err, VIPA_A)
    assert err == icmp_error(VIPA_A, SERVER, orig(VIPA_A), 38, icmp_type=icmp_type, code=0)


def test_error_quoting_embedded_fragment_and_echo() -> None:
    # embedded non-first fragment: only the embedded IP header (and the ICMP checksum)
    def frag(src: bytes) -> bytes:
        l4 = tcp_segment(src, SERVER, 1, 2, b"F" * 64)
        return bytes(fragments(src, SERVER, TCP, l4, 32)[1])

    err = icmp_error(ROUTER, VIPA_A, frag(VIPA_A), 8, icmp_type=11, code=1)
    assert nat.rewrite_dst(err, VIPA_FIX)
    assert err == icmp_error(ROUTER, VIPA_FIX, frag(VIPA_FIX), 8, icmp_type=11, code=1)

    # embedded echo request: no pseudo-header, only the address and its header checksum
    def ping(src: bytes) -> bytes:
        return bytes(packet(src, SERVER, ICMP, echo(8, 77, 3, b"p" * 20)))

    err = icmp_error(ROUTER, VIPA_A, ping(VIPA_A), 28, icmp_type=11, code=0)
    assert nat.rewrite_dst(err, VIPA_FIX)
    assert err == icmp_error(ROUTER, VIPA_FIX, ping(VIPA_FIX), 28, icmp_type=11, code=0)


def test_half_captured_checksum_field_left_alone() -> None:
    def orig(src: bytes) -> bytes:
        return bytes(packet(src, SERVER, TCP, tcp_segment(src, SERVER, 40000, 443, b"x")))

    err = icmp_error(ROUTER, VIPA_A, orig(VIPA_A), 17)
    assert nat.rewrite_dst(err, VIPA_FIX)
    assert err[28 + 20 + 16] == orig(VIPA_A)[36]
    assert ip_ok(err) and l4_ok(err) and ip_ok(err[28:])


def test_error_about_someone_else_leaves_quote_alone() -> None:
    other = bytes([10, 9, 9, 9])
    orig = bytes(packet(other, SERVER, TCP, tcp_segment(other, SERVER, 1, 2, b"x")))
    err = icmp_error(ROUTER, VIPA_A, orig, 28)
    quoted = bytes(err[20:])
    assert nat.rewrite_dst(err, VIPA_FIX)
    assert bytes(err[20:]) == quoted
    assert err == icmp_error(ROUTER, VIPA_FIX, orig, 28)


def test_truncated_or_bogus_quote_only_outer_rewritten() -> None:
    orig = bytes(packet(VIPA_A, SERVER, TCP, tcp_segment(VIPA_A, SERVER, 1, 2, b"x")))
    for bad in (orig[:12], b"\x65" + orig[1:], b"\x44" + orig[1:], b"\x4f" + orig[1:]):
        msg = icmp_message(3, 4, bytes(4), bad)
        err = packet(ROUTER, VIPA_A, ICMP, msg)
        assert nat.rewrite_dst(err, VIPA_FIX)
        assert err == packet(ROUTER, VIPA_FIX, ICMP, msg)


def test_non_error_icmp_types_do_not_touch_body() -> None:
    orig = bytes(packet(VIPA_A, SERVER, TCP, tcp_segment(VIPA_A, SERVER, 1, 2, b"x")))
    for icmp_type in (0, 8, 13, 42):
        msg = icmp_message(icmp_type, 0, bytes(4), orig)
        err = packet(ROUTER, VIPA_A, ICMP, msg)
        assert nat.rewrite_dst(err, VIPA_FIX)
        assert err == packet(ROUTER, VIPA_FIX, ICMP, msg)


# ------------------------------------------------------------------------------ malformed


GOOD = bytes(packet(VIPA_FIX, SERVER, TCP, tcp_segment(VIPA_FIX, SERVER, 1, 2, b"abc")))

MALFORMED = [
    b"",
    GOOD[:19],
    b"\x65" + GOOD[1:],  # version 6
    b"\x44" + GOOD[1:],  # IHL 4
    b"\x40" + GOOD[1:],  # IHL 0
    b"\x4f" + GOOD[1:],  # IHL 15: 60 bytes > len
    GOOD[:2] + (len(GOOD) + 1).to_bytes(2, "big") + GOOD[4:],  # total length > len
    GOOD[:2] + (19).to_bytes(2, "big") + GOOD[4:],  # total length < header
    GOOD[:30],  # truncated: total length says more
]


@pytest.mark.parametrize("raw", MALFORMED)
def test_malformed_rejected_and_untouched(raw: bytes) -> None:
    for fn in (nat.rewrite_src, nat.rewrite_dst):
        pkt = bytearray(raw)
        assert fn(pkt, VIPA_A) is False
        assert bytes(pkt) == raw
    assert nat.five_tuple(raw) is None


@given(st.binary(max_size=160), st.binary(min_size=4, max_size=4))
@settings(max_examples=400)
def test_random_bytes_never_raise(raw: bytes, addr: bytes) -> None:
    for fn in (nat.rewrite_src, nat.rewrite_dst):
        pkt = bytearray(raw)
        ok = fn(pkt, addr)
        assert isinstance(ok, bool)
        assert len(pkt) == len(raw)
        if not ok:
            assert bytes(pkt) == raw
    key = nat.five_tuple(raw)
    assert key is None or (len(key) == 5 and len(key[1]) == len(key[2]) in (4, 16))
    assert nat.five_tuple(memoryview(raw)) == key
    assert nat.five_tuple(bytearray(raw)) == key


# A header that passes validation, followed by random bytes: reaches the deep paths
# (L4 checksums, ICMP error quotes with random inner headers).
@st.composite
def plausible_packets(draw: st.DrawFn) -> bytearray:
    ihl = draw(st.integers(5, 7))
    body = bytearray(draw(st.binary(min_size=0, max_size=120)))
    proto = draw(st.sampled_from([TCP, UDP, ICMP, 47]))
    frag = draw(st.sampled_from([0, 0, 0x2000, 0x4000, 1, 0x2003]))
    if proto == ICMP and len(body) >= 1:
        body[0] = draw(st.sampled_from([0, 3, 8, 11, 12, 5, 4, 13]))
        if len(body) >= 9 and draw(st.booleans()):
            body[8] = 0x40 | draw(st.integers(0, 15))  # version 4, any IHL
            if len(body) >= 18:
                body[17] = draw(st.sampled_from([TCP, UDP, ICMP]))
                body[14:16] = b"\x00\x00" if draw(st.booleans()) else body[14:16]
    hlen = ihl * 4
    pkt = bytearray(draw(st.binary(min_size=hlen, max_size=hlen))) + body
    pkt[0] = 0x40 | ihl
    pkt[2:4] = len(pkt).to_bytes(2, "big")
    pkt[6:8] = frag.to_bytes(2, "big")
    pkt[9] = proto
    pkt[10:12] = b"\x00\x00"
    pkt[10:12] = ref_cksum(bytes(pkt[:hlen])).to_bytes(2, "big")
    return pkt


def _fix_l4_checksum(pkt: bytearray) -> None:
    """Make the outer L4 checksum valid (unfragmented packets, complete L4 header)."""
    hlen = (pkt[0] & 0x0F) * 4
    proto = pkt[9]
    seg = bytearray(pkt[hlen:])
    if proto == ICMP and len(seg) >= 4:
        seg[2:4] = b"\x00\x00"
        seg[2:4] = ref_cksum(bytes(seg)).to_bytes(2, "big")
    elif proto == TCP and len(seg) >= 20:
        seg[16:18] = b"\x00\x00"
        ps = pseudo(bytes(pkt[12:16]), bytes(pkt[16:20]), TCP, len(seg))
        seg[16:18] = ref_cksum(ps + bytes(seg)).to_bytes(2, "big")
    elif proto == UDP and len(seg) >= 8 and seg[6:8] != b"\x00\x00":
        seg[6:8] = b"\x00\x00"
        ps = pseudo(bytes(pkt[12:16]), bytes(pkt[16:20]), UDP, len(seg))
        seg[6:8] = (ref_cksum(ps + bytes(seg)) or 0xFFFF).to_bytes(2, "big")
    pkt[hlen:] = seg


@given(plausible_packets(), st.binary(min_size=4, max_size=4), st.booleans())
@settings(max_examples=600)
def test_plausible_packets_keep_valid_checksums(pkt: bytearray, addr: bytes, use_src: bool) -> None:
    fragmented = int.from_bytes(pkt[6:8], "big") & 0x3FFF  # MF or offset
    if not fragmented:
        _fix_l4_checksum(pkt)
    before = bytes(pkt)
    fn = nat.rewrite_src if use_src else nat.rewrite_dst
    assert fn(pkt, addr) is True
    assert len(pkt) == len(before)
    assert pkt[12:16] == (addr if use_src else before[12:16])
    assert pkt[16:20] == (before[16:20] if use_src else addr)
    assert ip_ok(pkt)
    if not fragmented:
        hlen = (pkt[0] & 0x0F) * 4
        seg_len = len(pkt) - hlen
        complete = {TCP: 20, UDP: 8, ICMP: 4}.get(pkt[9], 1 << 30)
        if seg_len >= complete:
            assert l4_ok(pkt)
    assert nat.five_tuple(pkt) is not None


# ------------------------------------------------------------------ property: from scratch

addresses = st.binary(min_size=4, max_size=4)
ports = st.integers(0, 0xFFFF)
payloads = st.binary(max_size=80)
kinds = st.sampled_from(["tcp", "udp", "udp0", "echo"])


@given(kinds, addresses, addresses, addresses, ports, ports, payloads)
@settings(max_examples=400)
def test_rewrite_src_equals_from_scratch(
    kind: str, old: bytes, new: bytes, peer: bytes, sport: int, dport: int, payload: bytes
) -> None:
    proto = PROTO_OF[kind]
    pkt = packet(old, peer, proto, l4_for(kind, old, peer, sport, dport, payload))
    assert nat.rewrite_src(pkt, new)
    assert pkt == packet(new, peer, proto, l4_for(kind, new, peer, sport, dport, payload))


@given(kinds, addresses, addresses, addresses, ports, ports, payloads)
@settings(max_examples=400)
def test_rewrite_dst_equals_from_scratch(
    kind: str, old: bytes, new: bytes, peer: bytes, sport: int, dport: int, payload: bytes
) -> None:
    proto = PROTO_OF[kind]
    pkt = packet(peer, old, proto, l4_for(kind, peer, old, sport, dport, payload))
    assert nat.rewrite_dst(pkt, new)
    assert pkt == packet(peer, new, proto, l4_for(kind, peer, new, sport, dport, payload))


def half_field_kept(kind: str, new_pkt: bytes, old_pkt: bytes, captured: int) -> bytes:
    """The quote of ``new_pkt``, except a checksum field cut in half by the capture keeps
    its old first byte: the new value depends on the missing byte (through the carry), so
    an incremental NAT can only leave a half-captured field alone."""
    field = {"tcp": 16, "udp": 6, "udp0": 6}.get(kind)
    if field is None or captured != field + 1:
        return new_pkt
    at = 20 + field
    return new_pkt[:at] + old_pkt[at : at + 1] + new_pkt[at + 1 :]


@given(
    kinds, addresses, addresses, addresses, addresses, ports, ports, payloads,
    st.integers(0, 100), st.sampled_from([3, 4, 5, 11, 12]),
)  # fmt: skip
@settings(max_examples=300)
def test_icmp_error_rewrites_equal_from_scratch(
    kind: str,
    old: bytes,
    new: bytes,
    peer: bytes,
    router: bytes,
    sport: int,
    dport: int,
    payload: bytes,
    captured: int,
    icmp_type: int,
) -> None:
    proto = PROTO_OF[kind]

    def sent_by(me: bytes) -> bytes:  # we sent it, the router complains to us
        return bytes(packet(me, peer, proto, l4_for(kind, me, peer, sport, dport, payload)))

    err = icmp_error(router, old, sent_by(old), captured, icmp_type=icmp_type)
    assert nat.rewrite_dst(err, new)
    want = half_field_kept(kind, sent_by(new), sent_by(old), captured)
    assert err == icmp_error(router, new, want, captured, icmp_type=icmp_type)

    def sent_to(me: bytes) -> bytes:  # a peer sent it to us, we complain
        return bytes(packet(peer, me, proto, l4_for(kind, peer, me, sport, dport, payload)))

    err = icmp_error(old, peer, sent_to(old), captured, icmp_type=icmp_type)
    assert nat.rewrite_src(err, new)
    want = half_field_kept(kind, sent_to(new), sent_to(old), captured)
    assert err == icmp_error(new, peer, want, captured, icmp_type=icmp_type)


# ------------------------------------------------------------------- property: round trip


@given(
    kinds, addresses, addresses, addresses, ports, ports, payloads,
    st.integers(0, 0xFFFF) | st.sampled_from([0, 0xFFFF]),
    st.integers(0, 0xFFFF) | st.sampled_from([0, 0xFFFF]),
)  # fmt: skip
@settings(max_examples=500)
def test_round_trip_restores_original(
    kind: str,
    vfix: bytes,
    vipa: bytes,
    peer: bytes,
    sport: int,
    dport: int,
    payload: bytes,
    ip_ck: int,
    l4_ck: int,
) -> None:
    """rewrite_src(new) then rewrite_src(old) gives back the original bytes.

    Exact for from-scratch checksums, and also for arbitrary (even wrong) checksum values,
    with one honest exception: a TCP/ICMP/IP checksum field holding 0xFFFF ("negative
    zero", never produced by a from-scratch computation over non-zero data) comes back as
    0x0000, the equivalent canonical form. UDP needs no exception: its 0xFFFF means
    "computed 0" and comes back as 0xFFFF, and its 0 means "none" and stays 0.
    """
    proto = PROTO_OF[kind]
    pkt = packet(vfix, peer, proto, l4_for(kind, vfix, peer, sport, dport, payload))
    original = bytes(pkt)
    assert nat.rewrite_src(pkt, vipa) and nat.rewrite_src(pkt, vfix)
    assert bytes(pkt) == original

    # now with arbitrary checksum values in the fields
    pkt[10:12] = ip_ck.to_bytes(2, "big")
    at = {TCP: 36, UDP: 26, ICMP: 22}[proto]
    pkt[at : at + 2] = l4_ck.to_bytes(2, "big")
    original = bytes(pkt)
    assert nat.rewrite_src(pkt, vipa) and nat.rewrite_src(pkt, vfix)
    expected = bytearray(original)
    if vipa != vfix:
        for off in (10,) + ((at,) if proto == TCP else ()):
            if expected[off : off + 2] == b"\xff\xff":
                expected[off : off + 2] = b"\x00\x00"
    assert bytes(pkt) == bytes(expected)


@given(addresses, addresses, addresses, ports, ports, payloads, st.integers(8, 60))
def test_round_trip_of_icmp_error(
    vfix: bytes, vipa: bytes, peer: bytes, sport: int, dport: int, payload: bytes, cap: int
) -> None:
    orig = bytes(packet(vipa, peer, UDP, udp_datagram(vipa, peer, sport, dport, payload)))
    err = icmp_error(ROUTER, vipa, orig, cap)
    before = bytes(err)
    assert nat.rewrite_dst(err, vfix) and nat.rewrite_dst(err, vipa)
    assert bytes(err) == before


def rfc1624_eqn3(hc: int, old: bytes, new: bytes) -> int:
    """HC' = ~(~HC + ~m + m') over the two 16-bit words of an address, literally."""
    s = ~hc & 0xFFFF
    for i in (0, 2):
        for word in (~int.from_bytes(old[i : i + 2], "big") & 0xFFFF, new[i : i + 2]):
            s += word if isinstance(word, int) else int.from_bytes(word, "big")
            s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


@given(st.integers(0, 0xFFFF), addresses, addresses)
@example(0xFFFF, bytes([10, 0, 0, 1]), bytes([0, 1, 10, 0]))  # same word sum, HC = -0
@example(0x0000, bytes([10, 0, 0, 1]), bytes([0, 1, 10, 0]))
@example(0xFFFF, b"\xff\xff\xff\xff", b"\x00\x00\x00\x00")  # the one corner
def test_tcp_update_is_rfc1624_eqn3(hc: int, old: bytes, new: bytes) -> None:
    """For any stored checksum (valid or not) the update is RFC 1624 eqn. 3, except the
    single all-zero-operands corner where eqn. 3 yields 0xFFFF and we yield 0x0000."""
    assume(old != new)
    pkt = packet(old, SERVER, TCP, tcp_segment(old, SERVER, 1, 2, b"abc"))
    pkt[36:38] = hc.to_bytes(2, "big")
    assert nat.rewrite_src(pkt, new)
    got = int.from_bytes(pkt[36:38], "big")
    if hc == 0xFFFF and old == b"\xff" * 4 and new == bytes(4):
        assert (got, rfc1624_eqn3(hc, old, new)) == (0x0000, 0xFFFF)
    else:
        assert got == rfc1624_eqn3(hc, old, new)


def test_round_trip_canonicalizes_negative_zero_explicitly() -> None:
    pkt = packet(VIPA_FIX, SERVER, TCP, tcp_segment(VIPA_FIX, SERVER, 1, 2, b"x"))
    pkt[36:38] = b"\xff\xff"
    assert nat.rewrite_src(pkt, VIPA_A) and nat.rewrite_src(pkt, VIPA_FIX)
    assert pkt[36:38] == b"\x00\x00"


# ------------------------------------------------------------------------------ five_tuple


def test_five_tuple_basic() -> None:
    pkt = packet(VIPA_FIX, SERVER, TCP, tcp_segment(VIPA_FIX, SERVER, 40000, 443, b""))
    assert nat.five_tuple(pkt) == (TCP, VIPA_FIX, SERVER, 40000, 443)
    key = nat.five_tuple(memoryview(bytes(pkt)))
    assert key is not None and type(key[1]) is bytes and type(key[2]) is bytes
    ping = packet(VIPA_FIX, SERVER, ICMP, echo(8, 0x4242, 9, b""))
    assert nat.five_tuple(ping) == (ICMP, VIPA_FIX, SERVER, 0x4242, 0x4242)
    other = packet(VIPA_FIX, SERVER, ICMP, icmp_message(13, 0, bytes(4), bytes(12)))
    assert nat.five_tuple(other) == (ICMP, VIPA_FIX, SERVER, 0, 0)
    gre = packet(VIPA_FIX, SERVER, 47, b"\x00" * 8)
    assert nat.five_tuple(gre) == (47, VIPA_FIX, SERVER, 0, 0)
    short = packet(VIPA_FIX, SERVER, UDP, b"\x00\x01\x00")
    assert nat.five_tuple(short) == (UDP, VIPA_FIX, SERVER, 0, 0)
    short_icmp = packet(VIPA_FIX, SERVER, ICMP, b"\x08\x00\x00\x00\x12")
    assert nat.five_tuple(short_icmp) == (ICMP, VIPA_FIX, SERVER, 0, 0)


@given(st.sampled_from(["tcp", "udp", "udp0"]), addresses, addresses, ports, ports, payloads)
def test_five_tuple_reply_is_swapped(
    kind: str, a: bytes, b: bytes, sport: int, dport: int, payload: bytes
) -> None:
    proto = PROTO_OF[kind]
    fwd = nat.five_tuple(packet(a, b, proto, l4_for(kind, a, b, sport, dport, payload)))
    rev = nat.five_tuple(packet(b, a, proto, l4_for(kind, b, a, dport, sport, payload)))
    assert fwd == (proto, a, b, sport, dport)
    assert rev == (proto, b, a, dport, sport)


@given(addresses, addresses, ports, ports, payloads)
def test_five_tuple_echo_reply_is_swapped(
    a: bytes, b: bytes, ident: int, seq: int, payload: bytes
) -> None:
    req = nat.five_tuple(packet(a, b, ICMP, echo(8, ident, seq, payload)))
    rep = nat.five_tuple(packet(b, a, ICMP, echo(0, ident, seq, payload)))
    assert req == (ICMP, a, b, ident, ident)
    assert rep == (ICMP, b, a, ident, ident)


@given(
    st.sampled_from(["tcp", "udp", "echo"]), addresses, addresses, addresses,
    ports, ports, payloads, st.sampled_from([3, 4, 5, 11, 12]), st.integers(8, 40),
)  # fmt: skip
def test_five_tuple_of_error_matches_reply_direction(
    kind: str,
    me: bytes,
    peer: bytes,
    router: bytes,
    sport: int,
    dport: int,
    payload: bytes,
    icmp_type: int,
    captured: int,
) -> None:
    """An error about our packet me->peer has the key of a reply peer->me."""
    proto = PROTO_OF[kind]
    sent = bytes(packet(me, peer, proto, l4_for(kind, me, peer, sport, dport, payload)))
    reply_key = nat.five_tuple(packet(peer, me, proto, l4_for(kind, peer, me, dport, sport, b"")))
    if kind == "echo":  # the reply to an echo request carries the same identifier
        reply_key = nat.five_tuple(packet(peer, me, ICMP, echo(0, sport, dport, b"")))
    err = icmp_error(router, me, sent, captured, icmp_type=icmp_type)
    assert nat.five_tuple(err) == reply_key


def test_five_tuple_error_with_bad_quote_falls_back() -> None:
    msg = icmp_message(3, 1, bytes(4), b"\x60" + bytes(27))
    err = packet(ROUTER, VIPA_A, ICMP, msg)
    assert nat.five_tuple(err) == (ICMP, ROUTER, VIPA_A, 0, 0)
    err = packet(ROUTER, VIPA_A, ICMP, icmp_message(3, 1, bytes(4), b"\x45" + bytes(10)))
    assert nat.five_tuple(err) == (ICMP, ROUTER, VIPA_A, 0, 0)
    sent = bytes(packet(VIPA_A, SERVER, TCP, tcp_segment(VIPA_A, SERVER, 5, 6, b"")))
    err = icmp_error(ROUTER, VIPA_A, sent, 2)  # ports not quoted
    assert nat.five_tuple(err) == (TCP, SERVER, VIPA_A, 0, 0)


# ------------------------------------------------------------- two anchors, the same VIpA


def test_two_tunnels_with_identical_vipa_rewrite_identically() -> None:
    """Two anchors may hand out the same VIpA: the NAT is a function of the address only."""
    vipa_from_anchor_1 = bytes([10, 8, 0, 2])
    vipa_from_anchor_2 = bytes([10, 8, 0, 2])
    template = packet(VIPA_FIX, SERVER, TCP, tcp_segment(VIPA_FIX, SERVER, 40000, 22, b"ssh"))
    via_1, via_2 = bytearray(template), bytearray(template)
    assert nat.rewrite_src(via_1, vipa_from_anchor_1)
    assert nat.rewrite_src(via_2, vipa_from_anchor_2)
    assert via_1 == via_2
    assert nat.five_tuple(via_1) == nat.five_tuple(via_2)
    back_1 = packet(
        SERVER, vipa_from_anchor_1, TCP, tcp_segment(SERVER, vipa_from_anchor_2, 22, 40000, b"")
    )
    back_2 = bytearray(back_1)
    assert nat.rewrite_dst(back_1, VIPA_FIX) and nat.rewrite_dst(back_2, VIPA_FIX)
    assert back_1 == back_2
    assert back_1 == packet(SERVER, VIPA_FIX, TCP, tcp_segment(SERVER, VIPA_FIX, 22, 40000, b""))


# -- the compiled common case (dataplane/_fast.pyx) against the reference -------------------

@given(st.one_of(st.binary(max_size=160), plausible_packets().map(bytes)),
       st.binary(min_size=4, max_size=4))
@settings(max_examples=800)
def test_compiled_and_reference_agree(raw: bytes, addr: bytes) -> None:
    """nat.rewrite_*/five_tuple (compiled for TCP/UDP when built) give exactly what the
    pure-Python reference gives, on garbage and on plausible packets alike."""
    for fast, ref in ((nat.rewrite_src, nat.py_rewrite_src),
                      (nat.rewrite_dst, nat.py_rewrite_dst)):
        a, b = bytearray(raw), bytearray(raw)
        assert fast(a, addr) == ref(b, addr)
        assert a == b
    assert nat.five_tuple(raw) == nat.py_five_tuple(raw)
    assert nat.five_tuple(memoryview(raw)) == nat.py_five_tuple(raw)


def test_the_compiled_nat_is_used_when_built() -> None:
    try:
        from upmt_tun.dataplane import _fast
    except ImportError:
        pytest.skip("compiled hot path not built (test_offload checks CI builds it)")
    assert nat.rewrite_src is not nat.py_rewrite_src
    pkt = bytearray(packet(b"\x0a\0\0\x01", b"\x0a\0\0\x02", 6,
                           tcp_segment(b"\x0a\0\0\x01", b"\x0a\0\0\x02", 1, 2, b"x")))
    assert _fast.rewrite_addr(pkt, b"\x0a\0\0\x09", True) == 1 and pkt[12:16] == b"\x0a\0\0\x09"
    with pytest.raises(ValueError):
        _fast.rewrite_addr(pkt, b"\x01", True)
