"""The anchor's column PAFT (upmt_tun.flowtable): packed keys, caps, row reuse, implicit
and signalled handover, static flows, expiry, history, and the status JSON, which must be
exactly ``tables.Flow.json`` for the same flow. Pure, no root.

The model-based test drives an AnchorPaft and the object layout it replaced (``Paft`` of
``Flow``, with the forwarder's former per-packet code) with the same random operations and
compares everything observable after each one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from upmt_tun import flowtable, nat
from upmt_tun.flowtable import KEY_SRC_SHIFT, AnchorPaft, pack_key, unpack_key
from upmt_tun.tables import HISTORY_LEN, Flow, FlowKey, Paft, reverse_key, seq_of

from . import pktbuild as pb
from .test_nat import plausible_packets

A = bytes([100, 100, 0, 2])          # two hosts' VIpAs
B = bytes([100, 100, 0, 3])
CH = bytes([198, 51, 100, 7])


def key(src: bytes = A, sport: int = 5000, proto: int = 17, dport: int = 53) -> int:
    return pack_key((proto, src, CH, sport, dport))


# -- packed keys ----------------------------------------------------------------------------

@given(st.integers(0, 255), st.binary(min_size=4, max_size=4), st.binary(min_size=4, max_size=4),
       st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_pack_unpack_round_trip(proto: int, src: bytes, dst: bytes, sport: int,
                                dport: int) -> None:
    k = (proto, src, dst, sport, dport)
    packed = pack_key(k)
    assert unpack_key(packed) == k
    assert packed >> KEY_SRC_SHIFT == int.from_bytes(src, "big")
    assert packed == int.from_bytes(src + bytes([proto]) + dst + sport.to_bytes(2, "big")
                                    + dport.to_bytes(2, "big"), "big")


@pytest.mark.parametrize("bad", [
    (17 + 256, A, CH, 1, 2),          # would carry into the source: another host's flow
    (17, A, CH, 0x10000, 2), (17, A, CH, 1, 0x10000), (17, A, CH, -1, 2), (-1, A, CH, 1, 2),
    (17, A[:3], CH, 1, 2), (17, A, CH + b"\0", 1, 2),
])
def test_pack_key_refuses_fields_that_spill(bad: FlowKey) -> None:
    with pytest.raises(ValueError):
        pack_key(bad)


@given(st.one_of(st.binary(max_size=160), plausible_packets().map(bytes)), st.booleans())
@settings(max_examples=800)
def test_compiled_and_reference_flow_key_agree(raw: bytes, reverse: bool) -> None:
    """flow_key (compiled for TCP/UDP when built) is py_flow_key, which is the packed
    nat five-tuple (reversed: of the reversed five-tuple), on garbage and packets alike."""
    want = flowtable.py_flow_key(raw, reverse)
    assert flowtable.flow_key(raw, reverse) == want
    assert flowtable.flow_key(memoryview(raw), reverse) == want
    assert flowtable.flow_key(bytearray(raw), reverse) == want
    k = nat.py_five_tuple(raw)
    assert want == (None if k is None else pack_key(reverse_key(k) if reverse else k))


@given(st.one_of(st.binary(max_size=160), plausible_packets().map(bytes)),
       st.one_of(st.none(), st.binary(min_size=4, max_size=4)))
@settings(max_examples=800)
def test_compiled_and_reference_uplink_key_agree(raw: bytes, src: bytes | None) -> None:
    """uplink_key (compiled for TCP/UDP when built) is py_uplink_key: the packed key when
    both the packet's source and its flow key's source are ``src`` (None: the packet's
    own source), else None."""
    if src is None:
        src = raw[12:16] if len(raw) >= 16 else b"\0\0\0\0"
    want = flowtable.py_uplink_key(raw, src)
    assert flowtable.uplink_key(raw, src) == want
    assert flowtable.uplink_key(memoryview(raw), src) == want
    k = nat.py_five_tuple(raw)
    assert want == (pack_key(k) if k is not None and raw[12:16] == src and k[1] == src
                    else None)


def test_the_compiled_flow_key_is_used_when_built() -> None:
    try:
        from upmt_tun.dataplane import _fast
    except ImportError:
        pytest.skip("compiled hot path not built (test_offload checks CI builds it)")
    assert flowtable.flow_key is not flowtable.py_flow_key
    up = pb.udp("100.100.0.2", "198.51.100.7", 5000, 53, b"x")
    assert _fast.flow_key_tcpudp(up, False) == key()
    assert _fast.flow_key_tcpudp(pb.udp("198.51.100.7", "100.100.0.2", 53, 5000, b"y"),
                                 True) == key()
    assert _fast.flow_key_tcpudp(pb.tcp("100.100.0.2", "198.51.100.7", 5000, 53), False) \
        == key(proto=6)
    assert _fast.flow_key_tcpudp(b"\x45" + bytes(30), False) is None     # ICMP etc.: Python
    assert flowtable.uplink_key is not flowtable.py_uplink_key
    assert _fast.uplink_key_tcpudp(up, A) == key()
    assert _fast.uplink_key_tcpudp(up, B) == 0                           # another source
    assert _fast.uplink_key_tcpudp(b"\x45" + bytes(30), A) is None
    with pytest.raises(ValueError):
        _fast.uplink_key_tcpudp(up, b"\1")


# -- the table ------------------------------------------------------------------------------

def test_new_flow_counters_and_down() -> None:
    p = AnchorPaft()
    assert p.up(key(), 7, seq_of(1, 10), 100.0) == 0
    assert len(p) == 1
    assert p.down(key(), 101.0, n=3) == 7
    assert p.down(key(sport=1), 101.0) == 0             # no such flow: tunnel id 0
    assert p.up(key(), 7, seq_of(1, 11), 102.0, n=2) == 0
    (f,) = p.flows()
    assert (f.fid, f.key, f.tunnel, f.tx_packets, f.rx_packets) == (1, (17, A, CH, 5000, 53),
                                                                     7, 3, 3)
    assert (f.created, f.last_seen, f.last_seq) == (100.0, 102.0, seq_of(1, 11))
    assert f.history == ((100.0, None, 7, "new flow"),)
    assert p.get(key()) is not None and p.get(key(sport=1)) is None


def test_caps_global_and_per_source() -> None:
    p = AnchorPaft(cap=5, per_source_cap=3)
    assert [p.up(key(A, s), 1, 0, 0.0) for s in range(4)] == [0, 0, 0, -1]   # A's share
    assert [p.up(key(B, s), 2, 0, 0.0) for s in range(3)] == [0, 0, -1]      # the table
    assert len(p) == 5
    assert p.per_source == {int.from_bytes(A, "big"): 3, int.from_bytes(B, "big"): 2}
    assert p.up(key(A, 0), 9, 1, 1.0) == 1          # known flows still move when full
    assert p.remove(key(A, 1)) and not p.remove(key(A, 1))
    assert p.up(key(A, 99), 1, 0, 2.0) == 0         # a freed place is usable again
    assert p.up(key(A, 98), 1, 0, 2.0) == -1


def test_free_rows_are_reused_as_new_flows() -> None:
    p = AnchorPaft()
    for s in range(3):
        p.up(key(sport=s), 1, seq_of(1, 5), 10.0, n=4)
    p.down(key(sport=1), 11.0)
    p.up(key(sport=1), 2, seq_of(1, 6), 12.0)        # moves: history kept for its row
    old = p.get(key(sport=1))
    assert old is not None and len(old.history) == 2
    p.set_static(key(sport=1))
    r = p.rows[key(sport=1)]
    assert p.remove(key(sport=1))
    with pytest.raises(LookupError):
        _ = old.tunnel                               # a view of a gone flow says so
    assert p.free == [r]
    assert p.up(key(sport=7), 3, seq_of(0, 1), 20.0) == 0
    assert p.rows[key(sport=7)] == r and p.free == [] and len(p.fid) == 3
    new = p.get(key(sport=7))
    assert new is not None
    assert (new.fid, new.tunnel, new.tx_packets, new.rx_packets, new.last_seq, new.static) \
        == (4, 3, 1, 0, seq_of(0, 1), False)
    assert new.history == ((20.0, None, 3, "new flow"),)
    # the same key again after removal is another flow: an old view does not follow it
    p.remove(key(sport=0))
    p.up(key(sport=0), 5, 0, 30.0)
    assert [f.fid for f in p.flows()] == [3, 4, 5]   # oldest first, whatever the rows


def test_implicit_handover_follows_the_newest_packet() -> None:
    p = AnchorPaft()
    p.up(key(), 1, seq_of(1, 10), 0.0)
    assert p.up(key(), 2, seq_of(1, 12), 1.0) == 1   # newer, on another tunnel: moves
    assert p.up(key(), 1, seq_of(1, 11), 2.0) == 0   # older (reordered): counted, no move
    assert p.up(key(), 1, seq_of(1, 12), 2.5) == 0   # a duplicate is not newer
    assert p.down(key(), 3.0) == 2
    assert p.up(key(), 1, seq_of(2, 0), 4.0) == 1    # a new session's generation is newer
    assert p.up(key(), 2, seq_of(1, 999), 5.0) == 0  # than any counter of the old one
    (f,) = p.flows()
    assert f.tunnel == 1 and f.tx_packets == 6 and f.last_seq == seq_of(2, 0)
    assert f.history == ((0.0, None, 1, "new flow"), (1.0, 1, 2, "implicit handover"),
                         (4.0, 2, 1, "implicit handover"))


def test_static_flows_stay() -> None:
    p = AnchorPaft()
    p.up(key(), 1, seq_of(1, 1), 0.0)
    assert p.set_static(key()) and not p.set_static(key(sport=1))
    assert p.up(key(), 2, seq_of(1, 2), 1.0) == 0
    assert p.handover(key(), 2, seq_of(1, 3), 1.5) == -1
    (f,) = p.flows()
    assert f.static and f.tunnel == 1 and f.last_seq == seq_of(1, 2)
    f.static = False
    assert not f.static
    assert p.up(key(), 2, seq_of(1, 4), 2.0) == 1


def test_signalled_handover_counts_as_the_newest_packet() -> None:
    p = AnchorPaft()
    p.up(key(), 1, seq_of(1, 10), 0.0)
    assert p.handover(key(), 2, seq_of(1, 20), 1.0) == 1
    assert p.handover(key(), 2, seq_of(1, 21), 1.0) == 0     # there already
    assert p.handover(key(sport=1), 2, seq_of(1, 22), 1.0) == -1
    assert p.up(key(), 1, seq_of(1, 15), 2.0) == 0   # in flight before it: no move back
    assert p.handover(key(), 2, seq_of(1, 5), 3.0) == 0      # an older one lowers nothing
    (f,) = p.flows()
    assert f.tunnel == 2 and f.last_seq == seq_of(1, 21)
    assert f.history[-1] == (1.0, 1, 2, "signalled handover")


def test_history_is_bounded_and_keeps_the_newest() -> None:
    p = AnchorPaft()
    p.up(key(), 1, 0, 0.0)
    for i in range(1, 20):
        p.up(key(), 1 + i % 2 + 1, i, float(i))
    (f,) = p.flows()
    h = f.history
    assert len(h) == HISTORY_LEN and h[-1] == (19.0, 2, 3, "implicit handover")
    assert [e[0] for e in h] == [float(i) for i in range(12, 20)]
    f.move(20.0, 9, "operator")
    assert f.history[-1] == (20.0, 3, 9, "operator") and f.tunnel == 9


def test_expire_and_remove_source() -> None:
    p = AnchorPaft()
    p.up(key(A, 1), 1, 0, 0.0)
    p.up(key(A, 2), 1, 0, 0.0)
    p.up(key(B, 1), 2, 0, 0.0)
    p.up(key(A, 1), 1, 1, 50.0)                      # uplink keeps a flow alive
    p.down(key(B, 1), 60.0)                          # and so does downlink
    assert p.expire(now=90.0, idle=45.0) == 1
    assert sorted(p.rows) == sorted([key(A, 1), key(B, 1)])
    assert p.remove_source(B) == 1 and p.remove_source(B) == 0
    assert list(p.rows) == [key(A, 1)] and p.per_source == {int.from_bytes(A, "big"): 1}
    assert p.expire(now=200.0, idle=45.0) == 1 and len(p) == 0 and p.per_source == {}


def test_owner_names_the_host_of_the_source() -> None:
    p = AnchorPaft(owner=lambda src: {A: "laptop"}.get(src, ""))
    p.up(key(A), 1, 0, 0.0)
    (f,) = p.flows()
    assert f.anchor == "laptop" and f.rule == ""


def _flow_like(fid: int, k: FlowKey, first: int, created: float,
               moves: list[tuple[float, int, str]], tx: int, rx: int) -> Flow:
    f = Flow(fid, k, first, created=created, last_seen=created)
    for when, tid, why in moves:
        f.move(when, tid, why)
    f.tx_packets, f.rx_packets = tx, rx
    return f


@pytest.mark.parametrize("n_moves", [0, 1, HISTORY_LEN - 1, HISTORY_LEN + 3])
def test_json_is_flow_json(n_moves: int) -> None:
    k = (6, A, CH, 40000, 443)
    p = AnchorPaft()
    p.up(pack_key(k), 5, 0, 1000.25)
    moves = [(1000.25 + i * 1.5, 5 + (i + 1) % 3, "implicit handover" if i % 2 else "x")
             for i in range(n_moves)]
    (view,) = p.flows()
    for when, tid, why in moves:
        view.move(when, tid, why)
    for _ in range(6):
        p.up(pack_key(k), view.tunnel, 0, 1100.0)
    p.down(pack_key(k), 1100.0, n=4)
    want = _flow_like(1, k, 5, 1000.25, moves, 7, 4)

    def iface_of(tid: int | None) -> str | None:
        return None if tid is None else f"wan{tid}"

    for now in (1100.0, 1234.5678):
        assert view.json(now, "wan1", iface_of) == want.json(now, "wan1", iface_of)
        assert view.json(now, None) == want.json(now, None)


# -- against the layout it replaced -----------------------------------------------------------

KEYS = [(17, A, CH, 1, 53), (17, A, CH, 2, 53), (6, A, CH, 1, 80), (17, B, CH, 1, 53),
        (1, B, CH, 7, 7), (17, B, CH, 9, 9)]
OWNER = {A: "laptop", B: "phone"}


@dataclass
class Model:
    """The object layout and the forwarder's former per-flow code, as the oracle."""

    paft: Paft = field(default_factory=lambda: Paft(cap=4, per_source_cap=3))
    last: dict[FlowKey, int] = field(default_factory=dict)
    static: set[FlowKey] = field(default_factory=set)

    def up(self, k: FlowKey, tid: int, seq: int, now: float, n: int) -> int:
        f = self.paft.get(k)
        moved = 0
        if f is None:
            f = self.paft.add(k, tid, now, anchor=OWNER[k[1]])
            if f is None:
                return -1
            self.last[k] = seq
        elif seq > self.last[k]:
            self.last[k] = seq
            if f.tunnel != tid and k not in self.static:
                f.move(now, tid, "implicit handover")
                moved = 1
        f.tx_packets += n
        f.last_seen = now
        return moved

    def down(self, k: FlowKey, now: float, n: int) -> int:
        f = self.paft.get(k)
        if f is None:
            return 0
        f.rx_packets += n
        f.last_seen = now
        return f.tunnel

    def handover(self, k: FlowKey, tid: int, seq: int, now: float) -> int:
        f = self.paft.get(k)
        if f is None or k in self.static:
            return -1
        self.last[k] = max(self.last[k], seq)
        if f.tunnel == tid:
            return 0
        f.move(now, tid, "signalled handover")
        return 1

    def forget(self, k: FlowKey) -> None:
        self.last.pop(k, None)
        self.static.discard(k)


key_ix = st.integers(0, 5)
up_op = st.tuples(st.just("up"), key_ix, st.integers(1, 3), st.integers(0, 2), st.integers(0, 6),
                  st.integers(1, 3))
ops = st.lists(st.one_of(          # mostly packets; now and then the rare operations
    up_op, up_op, up_op, up_op,
    st.tuples(st.just("down"), key_ix, st.integers(1, 3)),
    st.tuples(st.just("handover"), key_ix, st.integers(1, 3), st.integers(0, 2),
              st.integers(0, 6)),
    st.tuples(st.just("static"), key_ix, st.booleans()),
    st.tuples(st.just("static"), key_ix, st.booleans()),
    st.tuples(st.just("expire"), st.floats(0.5, 30.0)),
    st.tuples(st.just("remove"), key_ix),
    st.tuples(st.just("remove_source"), st.booleans()),
), min_size=10, max_size=80)


@given(ops)
@settings(max_examples=500, deadline=None)
def test_behaves_as_the_object_layout(program: list[tuple[Any, ...]]) -> None:
    m = Model()
    p = AnchorPaft(cap=4, per_source_cap=3, owner=lambda src: OWNER.get(src, ""))
    now = 1000.0
    for op in program:
        now += 0.75
        name = op[0]
        if name == "up":
            _, i, tid, g, c, n = op
            k = KEYS[i]
            assert p.up(pack_key(k), tid, seq_of(g, c), now, n) \
                == m.up(k, tid, seq_of(g, c), now, n)
        elif name == "down":
            _, i, n = op
            k = KEYS[i]
            assert p.down(pack_key(k), now, n) == m.down(k, now, n)
        elif name == "handover":
            _, i, tid, g, c = op
            k = KEYS[i]
            assert p.handover(pack_key(k), tid, seq_of(g, c), now) \
                == m.handover(k, tid, seq_of(g, c), now)
        elif name == "static":
            _, i, on = op
            k = KEYS[i]
            assert p.set_static(pack_key(k), bool(on)) == (m.paft.get(k) is not None)
            if m.paft.get(k) is not None:
                (m.static.add if on else m.static.discard)(k)
        elif name == "expire":
            idle = op[1]
            gone = [f.key for f in m.paft.flows() if now - f.last_seen > idle]
            assert p.expire(now, idle) == m.paft.expire(now, idle)
            for k in gone:
                m.forget(k)
        elif name == "remove":
            k = KEYS[op[1]]
            f = m.paft.get(k)
            assert p.remove(pack_key(k)) == (f is not None)
            if f is not None:
                m.paft.remove(f)
                m.forget(k)
        else:
            src = A if op[1] else B
            mine = [f for f in m.paft.flows() if f.key[1] == src]
            assert p.remove_source(src) == len(mine)
            for f in mine:
                m.paft.remove(f)
                m.forget(f.key)
        got, want = p.flows(), m.paft.flows()
        assert len(p) == len(m.paft)
        assert [g.json(now, None) for g in got] == [w.json(now, None) for w in want]
        assert [(g.anchor, g.last_seen, g.static, g.last_seq) for g in got] \
            == [(w.anchor, w.last_seen, w.key in m.static, m.last[w.key]) for w in want]
        assert {k: v for k, v in p.per_source.items()} \
            == {int.from_bytes(s, "big"): v for s, v in m.paft.per_source.items()}
