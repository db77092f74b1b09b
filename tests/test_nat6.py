"""Tests of the internal NAT for IPv6 (upmt_tun.nat, flowtable keys): pure, no root.

As in test_nat.py, packets are built from scratch here with the naive reference checksum
(a loop over 16-bit words with end-around carry), now over the IPv6 pseudo-header
(RFC 8200, 8.1), never with the module under test. The main oracle: rewriting a packet
built with the old addresses gives, byte for byte, the packet built with the new ones.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from upmt_tun import flowtable, nat

from .test_nat import ref_cksum, ref_sum

TCP, UDP, ICMP6 = 6, 17, 58

VIPA6_FIX = bytes.fromhex("fd000075707400000000000000000001")
VIPA6_A = bytes.fromhex("fd64ff9b0000000000000000000a0007")
SERVER6 = bytes.fromhex("20010db8000000000000000000000020")
ROUTER6 = bytes.fromhex("20010db80000000000000000000000fe")


def pseudo6(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    """IPv6 pseudo-header: src, dst, upper-layer length (32 bits), 3 zeros, next header."""
    return src + dst + length.to_bytes(4, "big") + bytes(3) + bytes([proto])


def ip6(src: bytes, dst: bytes, nh: int, payload: bytes) -> bytearray:
    """IPv6 header (flow label 0x12345, hop limit 64) around ``payload``."""
    return bytearray(struct.pack("!IHBB16s16s", 0x60012345, len(payload), nh, 64, src, dst)
                     + payload)


def tcp6(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    seg = bytearray(struct.pack("!HHIIBBHHH", sport, dport, 1000, 2000, 5 << 4, 0x18, 65535,
                                0, 0) + payload)
    seg[16:18] = ref_cksum(pseudo6(src, dst, TCP, len(seg)) + bytes(seg)).to_bytes(2, "big")
    return bytes(seg)


def udp6(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    seg = bytearray(struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)
    c = ref_cksum(pseudo6(src, dst, UDP, len(seg)) + bytes(seg)) or 0xFFFF
    seg[6:8] = c.to_bytes(2, "big")
    return bytes(seg)


def icmp6(src: bytes, dst: bytes, icmp_type: int, code: int, rest: bytes, body: bytes) -> bytes:
    msg = bytearray(bytes([icmp_type, code, 0, 0]) + rest + body)
    msg[2:4] = ref_cksum(pseudo6(src, dst, ICMP6, len(msg)) + bytes(msg)).to_bytes(2, "big")
    return bytes(msg)


def echo6(src: bytes, dst: bytes, icmp_type: int, ident: int, seq: int, payload: bytes) -> bytes:
    return icmp6(src, dst, icmp_type, 0, struct.pack("!HH", ident, seq), payload)


def l4_for(kind: str, src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    if kind == "tcp":
        return tcp6(src, dst, sport, dport, payload)
    if kind == "udp":
        return udp6(src, dst, sport, dport, payload)
    if kind == "echo":
        return echo6(src, dst, 128, sport, dport, payload)
    raise AssertionError(kind)


PROTO_OF = {"tcp": TCP, "udp": UDP, "echo": ICMP6}


def packet6(kind: str, src: bytes, dst: bytes, sport: int, dport: int, payload: bytes,
            ext: bytes = b"", first_nh: int | None = None) -> bytearray:
    """A whole IPv6 packet; ``ext``: extension headers in front of the L4 header (the
    caller sets their next-header bytes; ``first_nh`` the IPv6 header's)."""
    l4 = l4_for(kind, src, dst, sport, dport, payload)
    return ip6(src, dst, PROTO_OF[kind] if first_nh is None else first_nh, ext + l4)


def error6(src: bytes, dst: bytes, original: bytes, captured: int, icmp_type: int = 2
           ) -> bytearray:
    """ICMPv6 error from ``src`` to ``dst`` quoting the first 40 + ``captured`` bytes of
    ``original`` (default: Packet Too Big, MTU 1280)."""
    rest = (1280).to_bytes(4, "big") if icmp_type == 2 else bytes(4)
    return ip6(src, dst, ICMP6, icmp6(src, dst, icmp_type, 0, rest, original[:40 + captured]))


def l4_ok6(pkt: bytes) -> bool:
    """The whole-packet TCP/UDP/ICMPv6 checksum over the pseudo-header (no ext headers)."""
    end = 40 + int.from_bytes(pkt[4:6], "big")
    seg = bytes(pkt[40:end])
    return ref_sum(pseudo6(bytes(pkt[8:24]), bytes(pkt[24:40]), pkt[6], len(seg)) + seg) \
        == 0xFFFF


addresses6 = st.binary(min_size=16, max_size=16)
ports = st.integers(0, 0xFFFF)
payloads = st.binary(max_size=80)
kinds = st.sampled_from(["tcp", "udp", "echo"])


# ------------------------------------------------------------------------------ basics


def test_tcp_rewrite_src_and_dst() -> None:
    pkt = packet6("tcp", VIPA6_FIX, SERVER6, 40000, 443, b"hello")
    assert nat.rewrite_src(pkt, VIPA6_A) is True
    assert pkt == packet6("tcp", VIPA6_A, SERVER6, 40000, 443, b"hello")
    assert l4_ok6(pkt)
    reply = packet6("tcp", SERVER6, VIPA6_A, 443, 40000, b"world")
    assert nat.rewrite_dst(reply, VIPA6_FIX) is True
    assert reply == packet6("tcp", SERVER6, VIPA6_FIX, 443, 40000, b"world")


def test_udp_and_echo() -> None:
    for kind in ("udp", "echo"):
        pkt = packet6(kind, VIPA6_FIX, SERVER6, 5353, 53, b"q")
        assert nat.rewrite_src(pkt, VIPA6_A)
        assert pkt == packet6(kind, VIPA6_A, SERVER6, 5353, 53, b"q") and l4_ok6(pkt)


def test_udp_checksum_zero_is_refused() -> None:
    """UDP checksum 0 is illegal in IPv6 (RFC 8200 8.1): not NATed, no flow key."""
    pkt = packet6("udp", VIPA6_FIX, SERVER6, 1, 2, b"x")
    pkt[46:48] = b"\0\0"
    before = bytes(pkt)
    assert nat.rewrite_src(pkt, VIPA6_A) is False and bytes(pkt) == before
    assert nat.five_tuple(pkt) is None and nat.py_five_tuple(pkt) is None


def test_udp_computed_zero_is_sent_as_ffff() -> None:
    # find a payload whose checksum from VIPA6_A computes to 0
    seg0 = udp6(VIPA6_A, SERVER6, 1111, 2222, b"\0\0ab")
    s = ref_sum(pseudo6(VIPA6_A, SERVER6, UDP, len(seg0)) + seg0[:6] + b"\0\0" + seg0[8:])
    fill = ((0xFFFF - s) & 0xFFFF or 0xFFFF).to_bytes(2, "big")
    payload = fill + b"ab"
    assert ref_cksum(pseudo6(VIPA6_A, SERVER6, UDP, 12)
                     + struct.pack("!HHHH", 1111, 2222, 12, 0) + payload) == 0
    pkt = packet6("udp", VIPA6_FIX, SERVER6, 1111, 2222, payload)
    original = bytes(pkt)
    assert nat.rewrite_src(pkt, VIPA6_A)
    assert pkt[46:48] == b"\xff\xff" and l4_ok6(pkt)
    assert nat.rewrite_src(pkt, VIPA6_FIX) and bytes(pkt) == original


def test_family_mismatch_and_bad_lengths() -> None:
    pkt = packet6("tcp", VIPA6_FIX, SERVER6, 1, 2, b"")
    before = bytes(pkt)
    assert nat.rewrite_src(pkt, bytes(4)) is False and bytes(pkt) == before
    v4 = bytearray(bytes.fromhex("45000014000000004006") + bytes(10))
    v4[10:12] = ref_cksum(bytes(v4)).to_bytes(2, "big")
    assert nat.rewrite_src(bytearray(v4), bytes(16)) is False
    for bad in (bytes(3), bytes(15), bytes(17)):
        with pytest.raises(ValueError):
            nat.rewrite_dst(pkt, bad)


@pytest.mark.parametrize("raw", [
    b"\x60" + bytes(38),                                           # 39 bytes
    bytes(ip6(VIPA6_FIX, SERVER6, TCP, b"abcd"))[:42],             # payload length > buffer
    bytes(ip6(VIPA6_FIX, SERVER6, 0, b"\x06\x05" + bytes(6))),    # hop-by-hop past the end
    bytes(ip6(VIPA6_FIX, SERVER6, 43, bytes([6, 0, 0, 1]) + bytes(4) + bytes(20))),  # SL 1
    bytes(ip6(VIPA6_FIX, SERVER6, 60, bytes([60, 0]) + bytes(6)) * 1),  # ext chain runs out
])
def test_malformed_or_refused_untouched(raw: bytes) -> None:
    for fn in (nat.rewrite_src, nat.rewrite_dst):
        pkt = bytearray(raw)
        assert fn(pkt, VIPA6_A) is False and bytes(pkt) == raw
    assert nat.five_tuple(raw) is None


def test_extension_headers_are_walked() -> None:
    """Hop-by-hop and destination options in front of TCP: the TCP checksum is found and
    updated, the key has the ports; a routing header with segments left 0 is fine."""
    for first, ext in ((0, bytes([60, 0, 1, 4]) + bytes(4) + bytes([TCP, 0, 1, 4]) + bytes(4)),
                       (43, bytes([TCP, 0, 0, 0]) + bytes(4))):
        pkt = packet6("tcp", VIPA6_FIX, SERVER6, 40000, 80, b"x", ext, first)
        assert nat.five_tuple(pkt) == (TCP, VIPA6_FIX, SERVER6, 40000, 80)
        assert nat.rewrite_src(pkt, VIPA6_A)
        assert pkt == packet6("tcp", VIPA6_A, SERVER6, 40000, 80, b"x", ext, first)


def frag6(kind: str, src: bytes, dst: bytes, payload: bytes, cut: int) -> list[bytearray]:
    """The L4 datagram cut in two fragments (fragment header, id 7)."""
    l4 = l4_for(kind, src, dst, 1000, 2000, payload)
    proto = PROTO_OF[kind]
    h1 = struct.pack("!BBHI", proto, 0, 0 | 1, 7)
    h2 = struct.pack("!BBHI", proto, 0, cut | 0, 7)
    return [ip6(src, dst, 44, h1 + l4[:cut]), ip6(src, dst, 44, h2 + l4[cut:])]


@pytest.mark.parametrize("kind", ["tcp", "udp"])
def test_fragments(kind: str) -> None:
    """A first fragment gets its L4 checksum updated, a later one only the address; both
    have the same flow key, ports 0 (one tunnel, one anchor for the whole datagram)."""
    old = frag6(kind, VIPA6_FIX, SERVER6, b"y" * 40, 24)
    new = frag6(kind, VIPA6_A, SERVER6, b"y" * 40, 24)
    keys = {nat.five_tuple(p) for p in old}
    assert keys == {(PROTO_OF[kind], VIPA6_FIX, SERVER6, 0, 0)}
    for p, want in zip(old, new, strict=True):
        assert nat.rewrite_src(p, VIPA6_A) and p == want


# --------------------------------------------------------------- property: from scratch


@given(kinds, addresses6, addresses6, addresses6, ports, ports, payloads)
@settings(max_examples=400)
def test_rewrite_src_equals_from_scratch(kind: str, old: bytes, new: bytes, peer: bytes,
                                         sport: int, dport: int, payload: bytes) -> None:
    pkt = packet6(kind, old, peer, sport, dport, payload)
    assert nat.rewrite_src(pkt, new)
    assert pkt == packet6(kind, new, peer, sport, dport, payload)
    pkt = packet6(kind, old, peer, sport, dport, payload)
    assert nat.py_rewrite_src(pkt, new)
    assert pkt == packet6(kind, new, peer, sport, dport, payload)


@given(kinds, addresses6, addresses6, addresses6, ports, ports, payloads)
@settings(max_examples=400)
def test_rewrite_dst_equals_from_scratch(kind: str, old: bytes, new: bytes, peer: bytes,
                                         sport: int, dport: int, payload: bytes) -> None:
    pkt = packet6(kind, peer, old, sport, dport, payload)
    assert nat.rewrite_dst(pkt, new)
    assert pkt == packet6(kind, peer, new, sport, dport, payload)


def half_field_kept(kind: str, new_pkt: bytes, old_pkt: bytes, captured: int) -> bytes:
    """A checksum field cut in half by the capture keeps its old first byte (as in
    test_nat.py: the new value depends on the byte that was not captured)."""
    field = {"tcp": 16, "udp": 6, "echo": 2}[kind]
    if captured != field + 1:
        return new_pkt
    at = 40 + field
    return new_pkt[:at] + old_pkt[at:at + 1] + new_pkt[at + 1:]


@given(kinds, addresses6, addresses6, addresses6, addresses6, ports, ports, payloads,
       st.integers(0, 100), st.sampled_from([1, 2, 3, 4]))
@settings(max_examples=300)
def test_icmp6_error_rewrites_equal_from_scratch(
    kind: str, old: bytes, new: bytes, peer: bytes, router: bytes, sport: int, dport: int,
    payload: bytes, captured: int, icmp_type: int,
) -> None:
    """The quote's address and its L4 checksum (which covers the quote's own
    pseudo-header: TCP, UDP and ICMPv6 alike) and the outer ICMPv6 checksum."""
    def sent_by(me: bytes) -> bytes:
        return bytes(packet6(kind, me, peer, sport, dport, payload))

    err = error6(router, old, sent_by(old), captured, icmp_type)
    assert nat.rewrite_dst(err, new)
    want = half_field_kept(kind, sent_by(new), sent_by(old), captured)
    assert err == error6(router, new, want, captured, icmp_type)
    if kind != "echo" and captured >= 4:      # the key of the reply: the error follows it
        assert nat.five_tuple(err) == (PROTO_OF[kind], peer, new, dport, sport)

    def sent_to(me: bytes) -> bytes:
        return bytes(packet6(kind, peer, me, sport, dport, payload))

    err = error6(old, peer, sent_to(old), captured, icmp_type)
    assert nat.rewrite_src(err, new)
    want = half_field_kept(kind, sent_to(new), sent_to(old), captured)
    assert err == error6(new, peer, want, captured, icmp_type)


def test_error_about_someone_else_leaves_quote_alone() -> None:
    quote = bytes(packet6("udp", SERVER6, ROUTER6, 1, 2, b"zz"))
    err = error6(ROUTER6, VIPA6_A, quote, 30, 1)
    assert nat.rewrite_dst(err, VIPA6_FIX)
    assert err == error6(ROUTER6, VIPA6_FIX, quote, 30, 1)


@given(kinds, addresses6, addresses6, addresses6, ports, ports, payloads)
def test_round_trip(kind: str, vfix: bytes, vipa: bytes, peer: bytes, sport: int, dport: int,
                    payload: bytes) -> None:
    pkt = packet6(kind, vfix, peer, sport, dport, payload)
    original = bytes(pkt)
    assert nat.rewrite_src(pkt, vipa) and nat.rewrite_src(pkt, vfix)
    assert bytes(pkt) == original


# ------------------------------------------------------------------------- flow keys


def test_five_tuple_and_packed_keys() -> None:
    pkt = packet6("tcp", VIPA6_FIX, SERVER6, 40000, 443, b"")
    key = (TCP, VIPA6_FIX, SERVER6, 40000, 443)
    assert nat.five_tuple(pkt) == nat.py_five_tuple(pkt) == key
    packed = flowtable.pack_key(key)
    assert flowtable.unpack_key(packed) == key
    assert flowtable.flow_key(pkt) == flowtable.py_flow_key(pkt) == packed
    reply = packet6("tcp", SERVER6, VIPA6_FIX, 443, 40000, b"")
    assert flowtable.flow_key(reply, True) == flowtable.py_flow_key(reply, True) == packed
    assert flowtable.uplink_key(pkt, VIPA6_FIX) == packed
    assert flowtable.uplink_key(pkt, VIPA6_A) is None
    assert flowtable.uplink_key(pkt, VIPA6_FIX[:4]) is None
    assert flowtable.source_bytes(flowtable.key_source(packed)) == VIPA6_FIX
    # an IPv4 key of the same bytes never collides with an IPv6 one
    assert flowtable.key_source(flowtable.pack_key((TCP, bytes(4), bytes(4), 0, 0))) \
        != flowtable.key_source(flowtable.pack_key((TCP, bytes(16), bytes(16), 0, 0)))
    with pytest.raises(ValueError):
        flowtable.pack_key((TCP, bytes(16), bytes(4), 0, 0))
    echo = packet6("echo", VIPA6_FIX, SERVER6, 77, 1, b"")
    assert nat.five_tuple(echo) == (ICMP6, VIPA6_FIX, SERVER6, 77, 77)


def test_uplink_key_refuses_a_planted_quote() -> None:
    """An ICMPv6 error from the host's VIpA quoting another host's packet: no key."""
    other = bytes.fromhex("fd64ff9b0000000000000000000a0099")
    quote = bytes(packet6("udp", SERVER6, other, 53, 1000, b""))
    err = error6(VIPA6_A, SERVER6, quote, 8, 1)
    assert flowtable.uplink_key(err, VIPA6_A) is None


def test_paft_caps_per_family() -> None:
    """One host's IPv4 and IPv6 VIpAs are two sources: each has its own cap."""
    paft = flowtable.AnchorPaft(10, 2)
    v4 = bytes([100, 100, 0, 2])
    for i in range(3):
        assert paft.up(flowtable.pack_key((UDP, v4, bytes(4), i, 1)), 1, i, 0.0) == (
            -1 if i == 2 else 0)
        assert paft.up(flowtable.pack_key((UDP, VIPA6_A, SERVER6, i, 1)), 1, i, 0.0) == (
            -1 if i == 2 else 0)
    assert paft.remove_source(VIPA6_A) == 2 and len(paft) == 2
    assert paft.remove_source(v4) == 2 and len(paft) == 0


# ----------------------------------------------------------- garbage, compiled vs Python


@st.composite
def plausible6(draw: st.DrawFn) -> bytearray:
    """An IPv6 header that passes validation, maybe extension headers, random bytes."""
    nh = draw(st.sampled_from([TCP, UDP, ICMP6, 0, 44, 60, 43, 51, 59, 47]))
    body = bytearray(draw(st.binary(max_size=120)))
    if nh == ICMP6 and body:
        body[0] = draw(st.sampled_from([1, 2, 3, 4, 128, 129, 135]))
        if len(body) >= 9 and draw(st.booleans()):
            body[8] = 0x60
            if len(body) >= 15:
                body[14] = draw(st.sampled_from([TCP, UDP, ICMP6, 44]))
    pkt = ip6(draw(addresses6), draw(addresses6), nh, bytes(body))
    if draw(st.booleans()):
        pkt += draw(st.binary(max_size=8))      # trailing bytes beyond the payload length
    return pkt


@given(st.one_of(st.binary(max_size=160).map(lambda b: b"\x60" + b), plausible6().map(bytes)),
       addresses6)
@settings(max_examples=800)
def test_compiled_and_reference_agree(raw: bytes, addr: bytes) -> None:
    for fast, ref in ((nat.rewrite_src, nat.py_rewrite_src),
                      (nat.rewrite_dst, nat.py_rewrite_dst)):
        a, b = bytearray(raw), bytearray(raw)
        ok = fast(a, addr)
        assert ok == ref(b, addr) and a == b
        assert ok or a == bytearray(raw)
    key = nat.five_tuple(raw)
    assert key == nat.py_five_tuple(raw) == nat.five_tuple(memoryview(raw))
    assert key is None or len(key[1]) == len(key[2]) == 16
    for rev in (False, True):
        assert flowtable.flow_key(raw, rev) == flowtable.py_flow_key(raw, rev)
    assert flowtable.uplink_key(raw, addr) == flowtable.py_uplink_key(raw, addr)
    if len(raw) >= 24:
        src = raw[8:24]
        assert flowtable.uplink_key(raw, src) == flowtable.py_uplink_key(raw, src)


@given(plausible6(), addresses6, st.booleans())
@settings(max_examples=400)
def test_rewrite_keeps_the_key_consistent(pkt: bytearray, addr: bytes, use_src: bool) -> None:
    """Whatever the NAT accepts has a flow key, and what it refuses has none."""
    before = bytes(pkt)
    ok = (nat.rewrite_src if use_src else nat.rewrite_dst)(pkt, addr)
    assert ok == (nat.py_five_tuple(before) is not None)
    if ok:
        assert pkt[8:24] == (addr if use_src else before[8:24])
        assert pkt[24:40] == (before[24:40] if use_src else addr)


def test_the_compiled_v6_nat_is_used_when_built() -> None:
    try:
        from upmt_tun.dataplane import _fast
    except ImportError:
        pytest.skip("compiled hot path not built (test_offload checks CI builds it)")
    pkt = packet6("tcp", VIPA6_FIX, SERVER6, 1, 2, b"x")
    assert _fast.rewrite_addr(pkt, VIPA6_A, True) == 1
    assert pkt == packet6("tcp", VIPA6_A, SERVER6, 1, 2, b"x")
    assert _fast.rewrite_addr(packet6("echo", VIPA6_FIX, SERVER6, 1, 2, b""), VIPA6_A, True) \
        == -1       # ICMPv6: the Python code
    assert _fast.five_tuple_tcpudp(bytes(pkt)) == (TCP, VIPA6_A, SERVER6, 1, 2)


def test_finish_csum_v6_udp_computed_zero_is_ffff() -> None:
    """A partial IPv6 UDP checksum (TUN offload) that completes to 0 is sent as 0xFFFF:
    IPv6 has no protocol byte at offset 9, UDP is told by its checksum offset (6)."""
    from upmt_tun.dataplane import offload
    seg0 = udp6(VIPA6_FIX, SERVER6, 1111, 2222, b"\0\0ab")
    s = ref_sum(pseudo6(VIPA6_FIX, SERVER6, UDP, len(seg0)) + seg0[:6] + b"\0\0" + seg0[8:])
    payload = ((0xFFFF - s) & 0xFFFF or 0xFFFF).to_bytes(2, "big") + b"ab"
    pkt = packet6("udp", VIPA6_FIX, SERVER6, 1111, 2222, payload)
    assert pkt[46:48] == b"\xff\xff"
    part = bytearray(pkt)
    part[46:48] = ref_sum(pseudo6(VIPA6_FIX, SERVER6, UDP, 12)).to_bytes(2, "big")
    impls = [offload.py_finish_csum]
    try:
        from upmt_tun.dataplane import _fast
        impls.append(_fast.finish_csum)
    except ImportError:
        pass
    for finish in impls:
        b = bytearray(part)
        assert finish(b, 40, 6) and b == pkt
    tcp = packet6("tcp", VIPA6_FIX, SERVER6, 1, 2, b"abc")
    part = bytearray(tcp)
    part[56:58] = ref_sum(pseudo6(VIPA6_FIX, SERVER6, TCP, 23)).to_bytes(2, "big")
    for finish in impls:
        b = bytearray(part)
        assert finish(b, 40, 16) and b == tcp


# ------------------------------------------------------------- TCP segmentation (TSO6)


@given(st.binary(min_size=1, max_size=5000), st.integers(1, 1500), st.booleans(),
       st.sampled_from([0x18, 0x19, 0x98, 0x10]))
@settings(max_examples=150)
def test_tso_split6_segments_are_valid_and_compiled_agrees(payload: bytes, gso: int,
                                                           nat_it: bool, flags: int) -> None:
    """An IPv6/TCP super-packet cut into segments: each a valid packet (payload length,
    sequence number, TCP checksum over the pseudo-header of the NATed source), FIN/PSH
    only on the last, CWR only on the first; payload intact; both implementations."""
    from upmt_tun.dataplane import offload
    hdr = bytearray(tcp6(VIPA6_FIX, SERVER6, 40000, 443, b""))
    hdr[4:8] = (1000).to_bytes(4, "big")
    hdr[13] = flags
    sup = bytes(ip6(VIPA6_FIX, SERVER6, TCP, bytes(hdr) + payload))
    new = VIPA6_A if nat_it else None
    segs = offload.py_tso_split(sup, gso, new)
    assert b"".join(s[60:] for s in segs) == payload
    assert len(segs) == -(-len(payload) // gso)
    for i, s in enumerate(segs):
        assert s[8:24] == (VIPA6_A if nat_it else VIPA6_FIX) and l4_ok6(s)
        assert int.from_bytes(s[44:48], "big") == 1000 + i * gso
        last = i == len(segs) - 1
        assert s[53] == flags & ~(0 if last else 0x09) & ~(0x80 if i else 0)
    try:
        from upmt_tun.dataplane import _fast
    except ImportError:
        return
    assert _fast.tso_split(sup, gso, new) == segs
    assert _fast.tso_split(memoryview(sup), gso, new) == segs
    with pytest.raises(ValueError):
        _fast.tso_split(sup, gso, bytes(4))
    with pytest.raises(ValueError):
        offload.py_tso_split(sup, gso, bytes(4))
    ext = bytes(ip6(VIPA6_FIX, SERVER6, 0, bytes([TCP, 0]) + bytes(6) + bytes(hdr) + payload))
    assert offload.py_tso_split(ext, gso) == _fast.tso_split(ext, gso) == []


def test_packets_and_tso_of_take_tcpv6_super_packets() -> None:
    from upmt_tun.dataplane import offload
    hdr = tcp6(VIPA6_FIX, SERVER6, 1, 2, b"")
    sup = bytes(ip6(VIPA6_FIX, SERVER6, TCP, hdr + b"a" * 3000))
    read = offload.VNET_HDR.pack(offload.NEEDS_CSUM, offload.GSO_TCPV6, 60, 1000, 40, 16) + sup
    got = offload.packets(read)
    assert len(got) == 3 and all(l4_ok6(p) for p in got)
    view = offload.tso_of(read)
    assert view is not None and view[1] == 1000 and bytes(view[0]) == sup


# ------------------------------------------------- GRO towards the TUN, runs, batched NAT


def segments6(payload: bytes, gso: int = 1428, sport: int = 40000, seq: int = 5000
              ) -> list[bytes]:
    """What TSO makes of one IPv6/TCP write (ACK, PSH on the last)."""
    from upmt_tun.dataplane import offload
    hdr = bytearray(tcp6(SERVER6, VIPA6_A, sport, 443, b""))
    hdr[4:8] = seq.to_bytes(4, "big")
    return offload.py_tso_split(bytes(ip6(SERVER6, VIPA6_A, TCP, bytes(hdr) + payload)), gso)


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(1, 6000), min_size=1, max_size=5),
       gso=st.integers(500, 1428), swap=st.integers(0, 50))
def test_coalesce6_implementations_agree_and_lose_nothing(sizes: list[int], gso: int,
                                                          swap: int) -> None:
    """IPv6/TCP segments of one flow become one GSO_TCPV6 super-packet (the kernel
    finishes the checksum); cut again they are the same segments; both implementations
    give the same bytes, and IPv4 beside them is untouched."""
    from upmt_tun.dataplane import offload as O
    from upmt_tun.dataplane.offload import VNET_HDR, VNET_HDR_LEN
    flows = [segments6(bytes([i]) * s, gso=gso, sport=i + 1) for i, s in enumerate(sizes)]
    stream = [s for f in flows for s in f]
    if len(stream) > 3:
        k = swap % (len(stream) - 1)
        stream[k], stream[k + 1] = stream[k + 1], stream[k]
    ref = O.py_coalesce(stream)
    try:
        from upmt_tun.dataplane import _fast
        assert _fast.coalesce(stream) == ref
    except ImportError:
        pass
    back = []
    for w in ref:
        hdr = VNET_HDR.unpack_from(w)
        pkt = w[VNET_HDR_LEN:]
        if hdr[1] == O.GSO_TCPV6:
            assert (hdr[2], hdr[4], hdr[5]) == (60, 40, 16)
            done = bytearray(pkt)
            assert O.py_finish_csum(done, 40, 16) and l4_ok6(bytes(done))
            back += O.py_tso_split(pkt, hdr[3])
        else:
            assert hdr == (0, 0, 0, 0, 0, 0)
            back.append(pkt)
    assert back == stream
    if len(sizes) == 1 and 1 < len(stream) <= 3:
        assert len(ref) == 1                 # one flow in order (not swapped): one write


def test_flow_runs_and_rewrite_run_take_ipv6() -> None:
    from upmt_tun.dataplane import offload as O
    a = [bytes(packet6("udp", SERVER6, VIPA6_A, 53, 1000 + (i > 2), b"x")) for i in range(5)]
    ext = bytes(packet6("udp", SERVER6, VIPA6_A, 53, 1000, b"", bytes([UDP, 0]) + bytes(6), 0))
    impls = [(O.py_flow_runs, O.py_rewrite_run)]
    try:
        from upmt_tun.dataplane import _fast
        impls.append((_fast.flow_runs, _fast.rewrite_run))
    except ImportError:
        pass
    for runs, rewrite in impls:
        assert runs(a + [ext, ext]) == [3, 2, 1, 1]
        got = rewrite(a + [ext], 0, 6, VIPA6_FIX, False)
        assert got[:5] == [bytes(packet6("udp", SERVER6, VIPA6_FIX, 53, 1000 + (i > 2), b"x"))
                           for i in range(5)]
        assert got[5] == bytes(packet6("udp", SERVER6, VIPA6_FIX, 53, 1000, b"",
                                       bytes([UDP, 0]) + bytes(6), 0))
        with pytest.raises(ValueError):
            rewrite(a, 0, 1, bytes(5), False)
