"""Pure unit tests: tunnel header and demux, tables, tunnel choice."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from upmt_tun.dataplane import packet as P
from upmt_tun.policy import choose_tunnel
from upmt_tun.signalling.sip import build_request
from upmt_tun.tables import Paft, Tunnel, TunnelTable, reverse_key

from . import pktbuild as pb


def test_header_layout_is_16_bytes_and_overhead_reserves_the_tag() -> None:
    d = P.encode_data(0x01020304, 0x1122334455667788, b"\x45" + bytes(19))
    assert d[:16] == bytes.fromhex("80000000" "01020304" "1122334455667788")
    assert P.decode_header(d) == (0x01020304, 0x1122334455667788)
    assert P.OVERHEAD == 20 + 8 + 16 + 16


@pytest.mark.parametrize("data,kind", [
    (b"", P.KIND_JUNK),
    (P.encode_data(1, 1, pb.udp("1.1.1.1", "2.2.2.2", 1, 2)), P.KIND_DATA),
    (b"\x80" + bytes(10), P.KIND_JUNK),                         # shorter than a header
    (b"\x81" + bytes(40), P.KIND_TUNNEL),                       # handshake initiation
    (b"\x83" + bytes(40), P.KIND_TUNNEL),                       # sealed signalling
    (b"\x84" + bytes(40), P.KIND_TUNNEL),                       # cookie reply
    (b"\x89" + bytes(40), P.KIND_TUNNEL),                       # RELAY (mesh)
    (b"\x8a" + bytes(40), P.KIND_JUNK),                         # unknown tunnel type
    (b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes(12), P.KIND_STUN),
    (b"\x00\x01\x00\x00\xde\xad\xbe\xef" + bytes(12), P.KIND_JUNK),  # no magic cookie
    (b"\x01\x00\x00\x00" + bytes(28), P.KIND_JUNK),             # WireGuard initiation
    (b"SIP/2.0 200 OK\r\n\r\n", P.KIND_SIP),
    (b"MESSAGE sip:x SIP/2.0\r\n", P.KIND_SIP),
    (b"message lower-case", P.KIND_JUNK),
    (b"\x7f", P.KIND_JUNK),
])
def test_classify(data: bytes, kind: int) -> None:
    assert P.classify(data) == kind


def test_classify_a_real_sip_request() -> None:
    req = build_request(target=("203.0.113.1", 5060), from_user="mh", via=("10.0.0.1", 4000),
                        call_id="c", cseq=1, branch="z9hG4bKx", body=b"[]")
    assert P.classify(req) == P.KIND_SIP


def test_reverse_key() -> None:
    k = (6, b"\1\1\1\1", b"\2\2\2\2", 1000, 80)
    assert reverse_key(k) == (6, b"\2\2\2\2", b"\1\1\1\1", 80, 1000)
    assert reverse_key(reverse_key(k)) == k


def test_paft_add_move_history_cap_and_expiry() -> None:
    paft = Paft(cap=2)
    k1 = (6, b"a" * 4, b"b" * 4, 1, 2)
    k2 = (17, b"a" * 4, b"b" * 4, 1, 2)
    f1 = paft.add(k1, 1, now=0.0, rule="web")
    f2 = paft.add(k2, 1, now=5.0)
    assert f1 is not None and f2 is not None and f1.fid != f2.fid
    assert paft.add((1, b"x" * 4, b"y" * 4, 0, 0), 1, now=0.0) is None   # full: refused
    for i in range(20):
        f1.move(float(i), 2 + i % 2, "test")
    assert len(f1.history) == 8 and f1.tunnel == 3                      # bounded history
    f1.last_seen = 0.0
    f2.last_seen = 100.0
    assert paft.expire(now=100.0, idle=50.0) == 1
    assert paft.get(k1) is None and paft.get(k2) is f2 and len(paft) == 1


def test_tunnel_table_ids_are_24_bit_never_zero_never_in_use() -> None:
    tt = TunnelTable(first_id=0xFFFFFF)
    assert tt.new_tid() == 0xFFFFFF               # the largest header path id
    tt.add(Tunnel(2, "wan1", ("10.0.0.1", 1), ("203.0.113.1", 5060), "an1"))
    assert tt.new_tid() == 1
    assert tt.new_tid() == 3                      # 2 is in use: skipped
    t = Tunnel(7, "wan1", ("10.0.0.1", 1), ("203.0.113.1", 5060), "an1")
    tt.add(t)
    assert tt.get(7) is t and tt.remove(7) is t and tt.get(7) is None
    assert t.json()["local"] == "10.0.0.1:1" and t.json()["state"] == "down"


@dataclass
class L:
    role: str = "anchor"
    serves: frozenset[bytes] = frozenset()


FH = b"\xcb\x00\x71\x02"
OTHER = b"\xcb\x00\x71\x64"
LINKS = {"an1": L(), "an2": L(), "fh": L("fixed-host", frozenset({FH}))}


@pytest.mark.parametrize("via,anchors,dst,up,expect", [
    # first usable interface of via, on the first anchor that has one
    (("wan1", "wan2"), ("an1", "an2"), OTHER, {("wan1", "an1"), ("wan2", "an1")}, ("wan1", "an1")),
    (("wan2", "wan1"), ("an1", "an2"), OTHER, {("wan1", "an1"), ("wan2", "an1")}, ("wan2", "an1")),
    (("wan1", "wan2"), ("an1", "an2"), OTHER, {("wan2", "an1")}, ("wan2", "an1")),
    # first anchor unreachable on every via interface: the next anchor
    (("wan1",), ("an1", "an2"), OTHER, {("wan2", "an1"), ("wan1", "an2")}, ("wan1", "an2")),
    # nothing usable: None (the caller drops, never leaks)
    (("wan1",), ("an1",), OTHER, {("wan2", "an1")}, None),
    # a fixed host carries only flows to itself ...
    (("wan1",), ("fh",), OTHER, {("wan1", "fh")}, None),
    # ... and is preferred for them over relaying through an anchor
    (("wan1",), ("an1", "fh"), FH, {("wan1", "an1"), ("wan1", "fh")}, ("wan1", "fh")),
    (("wan1",), ("an1", "fh"), OTHER, {("wan1", "an1"), ("wan1", "fh")}, ("wan1", "an1")),
    # unknown anchor names are ignored
    (("wan1",), ("nope", "an1"), OTHER, {("wan1", "an1")}, ("wan1", "an1")),
])
def test_choose_tunnel(via: tuple[str, ...], anchors: tuple[str, ...], dst: bytes,
                       up: set[tuple[str, str]], expect: tuple[str, str] | None) -> None:
    got = choose_tunnel(via=via, anchors=anchors, dst=dst, links=LINKS,
                        usable=lambda i, a: (i, a) if (i, a) in up else None)
    assert got == expect


def test_paft_per_source_cap_protects_other_hosts() -> None:
    paft = Paft(cap=100, per_source_cap=3)
    a, b = b"\x64\x64\0\2", b"\x64\x64\0\3"
    flows = [paft.add((6, a, b"x" * 4, p, 80), 1, 0.0) for p in range(5)]
    assert [f is not None for f in flows] == [True, True, True, False, False]
    assert paft.add((6, b, b"x" * 4, 1, 80), 2, 0.0) is not None     # the other host is fine
    first = flows[0]
    assert first is not None
    paft.remove(first)
    assert paft.add((6, a, b"x" * 4, 99, 80), 1, 0.0) is not None    # a freed slot is reusable
    assert paft.per_source[a] == 3 and paft.per_source[b] == 1


def test_linkwatch_parse_link_address_and_default_route_messages() -> None:
    import struct as s

    from upmt_tun.system import linkwatch as lw

    def nl(mtype: int, body: bytes) -> bytes:
        return s.pack("=IHHII", 16 + len(body), mtype, 0, 0, 0) + body

    def link(mtype: int, index: int, flags: int, extra: bytes = b"") -> bytes:
        return nl(mtype, s.pack("=BxHiII", 2, 1, index, flags, 0) + extra)

    def addr(mtype: int, index: int, family: int = 2) -> bytes:
        return nl(mtype, s.pack("=BBBBI", family, 24, 0, 0, index))

    def route(mtype: int, oif: int | None, dst_len: int = 0, table: int = 254,
              big_table: int | None = None) -> bytes:
        attrs = b""
        if oif is not None:
            attrs += s.pack("=HHI", 8, lw.RTA_OIF, oif)
        if big_table is not None:
            attrs += s.pack("=HHI", 8, lw.RTA_TABLE, big_table)
        return nl(mtype, s.pack("=BBBBBBBBI", 2, dst_len, 0, 0, table, 3, 0, 1, 0) + attrs)

    data = (link(lw.RTM_NEWLINK, 3, lw.IFF_UP | lw.IFF_LOWER_UP)
            + link(lw.RTM_NEWLINK, 4, lw.IFF_UP)
            + nl(30, b"\0" * 16)                                    # another type: ignored
            + link(lw.RTM_DELLINK, 6, lw.IFF_UP | lw.IFF_LOWER_UP, b"\0" * 4)
            + addr(lw.RTM_NEWADDR, 7) + addr(lw.RTM_DELADDR, 8) + addr(lw.RTM_NEWADDR, 9, 10)
            + route(lw.RTM_NEWROUTE, 3) + route(lw.RTM_DELROUTE, None)
            + route(lw.RTM_NEWROUTE, 4, dst_len=24)                 # not a default route
            + route(lw.RTM_NEWROUTE, 5, table=100)                  # not the main table
            + route(lw.RTM_NEWROUTE, 6, table=252, big_table=254))  # main, via RTA_TABLE
    parse = lw.parse
    assert list(parse(data)) == [("link", 3, True), ("link", 4, False), ("link", 6, False),
                                 ("addr", 7, False), ("addr", 8, False),
                                 ("addr", 9, False),       # IPv6 too: an IPv6-only interface
                                 ("route", 3, False), ("route", 0, False), ("route", 6, False)]
    assert list(parse(b"\xff" * 7)) == []
    assert list(parse(data[:-3]))[-1] == ("route", 0, False)      # the cut one is ignored


def test_log_budget_bounds_lines_and_counts_the_rest() -> None:
    import logging

    from upmt_tun.logbudget import LogBudget

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    lg = logging.getLogger("upmt_tun.test_budget")
    lg.setLevel(logging.INFO)
    lg.propagate = False
    lg.addHandler(Keep())
    b = LogBudget(lg, rate=1.0, burst=3.0)
    logged = [b.log(logging.INFO, 100.0, "moved %d", i) for i in range(10)]
    assert logged == [True] * 3 + [False] * 7 and b.suppressed == 7
    assert b.log(logging.INFO, 101.0, "moved %d", 10)          # one token back after 1 s
    assert records[-1] == "moved 10 (7 similar line(s) suppressed)" and b.suppressed == 0
    assert not b.log(logging.DEBUG, 500.0, "not enabled")       # costs no token
    assert b.log(logging.INFO, 500.0, "x") and b.log(logging.INFO, 500.0, "y")
