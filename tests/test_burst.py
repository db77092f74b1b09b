"""Burst I/O on the TUN: many reads per call, one decision per run of one flow's packets.

The compiled reader and write loop must do what their pure-Python references do, and
the forwarders' ``from_tun_many`` must produce exactly what ``from_tun`` produces packet
by packet: the same datagrams (same keys, so the same bytes), in the same order, with the
same counters and drops. Each test compares the two."""

from __future__ import annotations

import errno
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from upmt_tun.dataplane import io as dio
from upmt_tun.dataplane import offload as O
from upmt_tun.dataplane.crypto import Session
from upmt_tun.dataplane.forwarder import (
    AgentForwarder,
    AnchorForwarder,
    FlowClass,
    even_runs,
)
from upmt_tun.dataplane.packet import HEADER_LEN, TAG_LEN, TYPE_DATA, TYPE_RELAY, datagrams
from upmt_tun.tables import FlowKey

from . import pktbuild as pb
from .conftest import netns_missing
from .test_batch import K1 as HOST_K1
from .test_batch import K2 as HOST_K2
from .test_batch import MH_A, _Loop, anchor_with_host, vnet_tso
from .test_e2e_memory import CH, RULES, World
from .test_nat6 import TCP, UDP, ip6
from .test_nat6 import tcp6 as _tcp6
from .test_nat6 import udp6 as _udp6
from .test_offload import partial

try:
    from upmt_tun.dataplane import _fast
except ImportError:  # pragma: no cover - the build decides
    _fast = None  # type: ignore[assignment]

K1, K2 = bytes(range(32)), bytes(range(32, 64))
FIX, FIX6 = "100.64.0.1", "fd00:64::1"
VIPA, VIPA6 = "100.100.0.2", "fd00:100::2"
CH6 = bytes.fromhex("20010db8000000000000000000000007")
FIX6_B = bytes.fromhex("fd000064000000000000000000000001")

def udp6(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    return bytes(ip6(src, dst, UDP, _udp6(src, dst, sport, dport, payload)))


def tcp6(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    return bytes(ip6(src, dst, TCP, _tcp6(src, dst, sport, dport, payload)))


READERS: list[Any] = [dio.PyBurstReader]
WRITERS: list[Callable[[int, list[bytes]], int]] = [dio.py_write_all]
if _fast is not None:
    READERS.append(_fast.BurstReader)
    WRITERS.append(_fast.write_all)


def seqpacket() -> tuple[socket.socket, socket.socket]:
    """A stand-in for /dev/net/tun: one message per read, EAGAIN when drained."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    b.setblocking(False)
    return a, b


@pytest.mark.parametrize("reader", READERS)
def test_burst_reader_reads_until_drained_limit_or_cap(reader: Any) -> None:
    a, b = seqpacket()
    try:
        msgs = [os.urandom(n) for n in (1, 60, 1500, 7, 3000, 64)]
        for m in msgs:
            b.send(m)
        r = reader(a.fileno(), 4096, 1 << 16, 4)
        assert r.read() == (msgs[:4], -1, 0)               # max_n first
        assert r.read(1) == (msgs[4:5], -1, 0)             # the call's limit
        assert r.read() == (msgs[5:], 0, 0)                # then drained: EAGAIN
        assert r.read() == ([], 0, 0)
        for m in msgs:
            b.send(m)
        small = reader(a.fileno(), 4096, 1500, 100)        # the byte cap: stop past it
        assert small.read() == (msgs[:3], -1, 0)
        assert small.read() == (msgs[3:5], -1, 0)
        assert small.read() == (msgs[5:], 0, 0)
        b.send(b"x" * 5000)
        assert reader(a.fileno(), 100, 0, 3).read() == ([b"x" * 100], -1, 0)  # cut: read(2)
    finally:
        a.close()
        b.close()
    with pytest.raises(ValueError):
        reader(0, 0, 10, 1)


@pytest.mark.parametrize("reader", READERS)
def test_burst_reader_ends_with_the_errno_of_a_failed_read(reader: Any) -> None:
    fd = os.open("/", os.O_RDONLY)
    try:
        assert reader(fd, 100, 1000, 8).read() == ([], errno.EISDIR, 0)
    finally:
        os.close(fd)


def vnet_reads() -> list[bytes]:
    """TUN reads with a virtio-net header: ordinary packets (complete, or with a partial
    checksum to finish), a super-packet, and reads offload.packets refuses."""
    plain = pb.udp(FIX, CH, 1, 2, b"p" * 30)
    part_udp = bytes(partial(pb.udp(FIX, CH, 1, 2, b"q" * 33)))
    part_tcp = bytes(partial(pb.tcp(FIX, CH, 1, 2, b"r" * 41)))
    csum = O.VNET_HDR.pack(O.NEEDS_CSUM, 0, 0, 0, 20, 6)
    return [bytes(O.VNET_HDR_LEN) + plain, csum + part_udp,
            O.VNET_HDR.pack(O.NEEDS_CSUM, O.GSO_ECN, 0, 0, 20, 16) + part_tcp,  # ECN bit only
            vnet_tso(pb.tcp(FIX, CH, 1, 2, os.urandom(3000)), 40, 1000),
            bytes([0, 3]) + bytes(8) + plain,                        # UFO: never offered
            O.VNET_HDR.pack(O.NEEDS_CSUM, 0, 0, 0, 20, 60) + part_udp,  # offset past the end
            bytes(O.VNET_HDR_LEN), bytes(4)]                         # nothing after the header


@pytest.mark.parametrize("reader", READERS)
def test_burst_reader_strips_and_completes_ordinary_vnet_reads(reader: Any) -> None:
    a, b = seqpacket()
    reads = vnet_reads()
    try:
        for m in reads:
            b.send(m)
        r = reader(a.fileno(), O.VNET_HDR_LEN + 65535, 1 << 20, 64, True)
        calls = [r.read() for _ in range(6)]
    finally:
        a.close()
        b.close()
    # a read that keeps its header ends the call (a super-packet is handled at once)
    assert [(len(got), err, special) for got, err, special in calls] == [
        (4, -1, 1), (1, -1, 1), (1, -1, 1), (1, -1, 1), (1, -1, 1), (0, 0, 0)]
    got = [p for c in calls for p in c[0]]
    assert got[:3] == [O.packets(r, O.py_tso_split, O.py_finish_csum)[0] for r in reads[:3]]
    assert all(pb.checksums_ok(p) for p in got[:3])
    assert got[3:] == reads[3:]                              # kept whole, header and all


@pytest.mark.parametrize("write_all", WRITERS)
def test_write_all_writes_in_order_and_counts_failures(
        write_all: Callable[[int, list[bytes]], int]) -> None:
    a, b = seqpacket()
    try:
        pkts = [os.urandom(n) for n in (1, 100, 1400)]
        assert write_all(a.fileno(), pkts) == 0
        assert [b.recv(2000) for _ in pkts] == pkts
        assert write_all(a.fileno(), []) == 0
        big = [b"y" * 60000] * 40                          # more than the socket buffer
        failed = write_all(a.fileno(), big)
        got = 0
        while True:
            try:
                assert b.recv(70000) == big[0]
            except BlockingIOError:
                break
            got += 1
        assert failed > 0 and got + failed == len(big)     # EAGAIN: counted, not raised
    finally:
        a.close()
        b.close()
    r, w = os.pipe()
    try:
        assert write_all(r, [b"a", b"b"]) == 2             # EBADF each
    finally:
        os.close(r)
        os.close(w)


def test_even_runs_cut_where_seal_run_needs() -> None:
    pkts = [b"a" * n for n in (100, 100, 60, 100, 100, 120, 120, 120)]
    assert even_runs(pkts, 0, 8) == [(0, 3), (3, 5), (5, 8)]
    assert even_runs(pkts, 3, 6) == [(3, 5), (5, 6)]
    assert even_runs(pkts, 2, 2) == []


@pytest.mark.parametrize("reader", READERS)
def test_tun_reader_hands_a_wake_ups_packets_over_together(
        reader: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``on_packets``: the small packets of a wake-up in one list (those before a
    super-packet before it), the super-packet whole, flushed at once; the same with the
    compiled reader and its pure-Python fallback."""
    monkeypatch.setattr(dio, "BurstReader", reader)
    a, b = seqpacket()
    tun = dio.TunDevice.__new__(dio.TunDevice)
    tun.loop, tun.fd, tun.vnet_hdr, tun.dropped, tun.name = _Loop(), a.fileno(), True, 0, "t"
    events: list[str] = []
    tun.start(lambda p: events.append(f"pkt{len(p)}"), lambda: events.append("flush"),
              lambda sp, gso: events.append(f"super{gso}"),
              lambda ps: events.append("pkts" + ",".join(str(len(p)) for p in ps)))
    small = [pb.udp(FIX, CH, 1, 2, b"x" * n) for n in (1, 2, 3)]
    big = pb.tcp(FIX, CH, 1, 2, os.urandom(3000))
    try:
        for p in small:
            b.send(bytes(O.VNET_HDR_LEN) + p)
        b.send(vnet_tso(big, 40, 1000))
        b.send(bytes(O.VNET_HDR_LEN) + small[0])
        b.send(b"\0\x03" + bytes(O.VNET_HDR_LEN))           # an offload never offered
        tun.loop.readers[a.fileno()]()
        assert events == ["pkts29,30,31", "super1000", "flush", "pkts29", "flush"]
        assert tun.dropped == 1
    finally:
        a.close()
        b.close()


# -- from_tun_many == from_tun packet by packet ---------------------------------------------


def agent_fwd(mtu: int = 0) -> tuple[AgentForwarder, list[bytes]]:
    """An agent forwarder with one anchor (IPv4 and IPv6 VIpA) up on wan1, and a mesh
    peer "phone" (VIpA 100.100.0.3) reached through a relay path on wan2; what it writes
    back into the TUN (Packet Too Big) goes to the list."""
    def classify(key: FlowKey) -> FlowClass:
        return FlowClass("r", ("wan2",) if key[4] == 9999 else (), None)
    fwd = AgentForwarder(FIX, ["wan1", "wan2"], ["an1"], classify, vipa6_fix=FIX6, mtu=mtu)
    fwd.set_association("an1", VIPA, "anchor", frozenset(), vipa6=VIPA6)
    fwd.add_session("an1", Session(1, 2, K1, K2, 0.0))
    for i, iface in enumerate(("wan1", "wan2")):
        t = fwd.add_tunnel(iface, i, "an1", ("10.1.0.2", 4000 + i), ("203.0.113.1", 5060), 0.0)
        fwd.tunnel_up(t, 7 + i, 0.0)
    fwd.add_peer("phone", "an1")
    fwd.add_session("phone", Session(3, 4, K2, K1, 0.0))
    phone = pb.ip("100.100.0.3")
    fwd.mesh_dst[phone] = "phone"
    t = fwd.add_tunnel("wan2", 1, "phone", ("10.1.0.2", 4001), ("100.100.0.3", 0), 0.0,
                       vipa_peer=phone)
    fwd.tunnel_up(t, 11, 0.0)
    back: list[bytes] = []
    fwd.to_tun = back.append
    return fwd, back


def mixed_burst() -> list[bytes]:
    """A wake-up's worth: runs of one flow (equal sizes, a shorter one, a longer one),
    ICMP, interleaved flows, a spoofed source, IPv6 runs, a mesh peer's run."""
    u = [pb.udp(FIX, CH, 5000, 6000, bytes([i]) * 36) for i in range(6)]
    t = [pb.tcp(FIX, CH, 40000, 80, b"t" * n) for n in (100, 100, 60, 100, 100, 120)]
    u6 = [udp6(FIX6_B, CH6, 7000, 53, bytes([i]) * 50) for i in range(4)]
    t6 = [tcp6(FIX6_B, CH6, 41000, 443, b"s" * n) for n in (500, 500, 200)]
    mesh = [pb.udp(FIX, "100.100.0.3", 1234, 9999, b"m" * n) for n in (80, 80, 80, 40)]
    return [*u[:4], pb.icmp_echo(FIX, CH, 7, 1), *t, u[4], u[5],
            pb.udp("10.9.9.9", CH, 1, 2, b"spoof"), pb.udp("10.9.9.9", CH, 1, 2, b"spoof"),
            *u6, *t6, *mesh, pb.udp(FIX, CH, 5000, 6001, b"z" * 36)]


def _datagrams(outs: list[tuple[int, tuple[str, int], bytes, int]]
               ) -> list[tuple[int, tuple[str, int], bytes]]:
    return [(i, to, d) for i, to, data, size in outs
            for d in (datagrams(data, size) if size else [data])]


def _agent_state(fwd: AgentForwarder) -> Any:
    return (sorted((f.key, f.tunnel, f.tx_packets, f.rule, f.anchor) for f in fwd.paft.flows()),
            sorted((t.tid, t.tx_packets, t.tx_bytes) for t in fwd.tunnels.tunnels()),
            dict(fwd.drops), {k: link.session.send_counter for k, link in fwd.links.items()
                              if link.session is not None})


@pytest.mark.parametrize("mtu", [0, 300])
def test_agent_from_tun_many_is_from_tun_per_packet(mtu: int) -> None:
    per, per_back = agent_fwd(mtu)
    many, many_back = agent_fwd(mtu)
    burst = mixed_burst()
    want = [(*o, 0) for p in burst if (o := per.from_tun(p, 1.0)) is not None]
    got = many.from_tun_many(burst, 1.0)
    assert _datagrams(got) == _datagrams(want)
    assert _agent_state(many) == _agent_state(per)
    assert many_back == per_back
    assert len(per_back) == (2 if mtu else 0)             # the two 500-byte IPv6 segments
    # fewer, larger sends: the 64-byte run is one GSO run, the relay run too
    assert len(got) < len(want)
    relayed = [d for _, to, d in _datagrams(got) if to == ("203.0.113.1", 5060)
               and d[0] == TYPE_RELAY]
    assert len(relayed) == 4
    sizes = {size for _, _, _, size in got}
    assert len(u := pb.udp(FIX, CH, 5000, 6000, b"\0" * 36)) + HEADER_LEN + TAG_LEN in sizes, u


def test_agent_from_tun_many_drops_and_holds_as_per_packet() -> None:
    """No tunnel up: every packet of a run counted; a new flow to an unknown mesh host:
    the lookup asked once per packet and the first packet held, as per packet."""
    outs = []
    for batch in (False, True):
        fwd, _ = agent_fwd()
        for t in fwd.tunnels.tunnels():
            fwd.tunnel_down(t)
        misses: list[bytes] = []
        held: list[bytes] = []
        fwd.mesh_anchor_of = lambda dst: "an1" if dst == pb.ip("100.100.0.9") else None
        fwd.mesh_miss = misses.append
        fwd.mesh_hold = lambda dst, pkt, held=held: held.append(pkt)
        burst = [pb.udp(FIX, CH, 1, 2, b"a" * 20)] * 3 + \
            [pb.udp(FIX, "100.100.0.9", 1, 2, bytes([i]) * 20) for i in range(3)]
        if batch:
            out = fwd.from_tun_many(burst, 1.0)
        else:
            out = [(*o, 0) for p in burst if (o := fwd.from_tun(p, 1.0)) is not None]
        outs.append((out, dict(fwd.drops), misses, held))
    assert outs[0] == outs[1]
    assert outs[0][1] == {"no_tunnel": 3} and len(outs[0][3]) == 3


def _anchor_state(fwd: AnchorForwarder) -> Any:
    return (sorted((f.key, f.tunnel, f.tx_packets, f.rx_packets) for f in fwd.paft.flows()),
            sorted((t.tid, t.tx_packets, t.tx_bytes, t.probe_credit)
                   for t in fwd.tunnels.tunnels()),
            dict(fwd.drops), fwd.sessions[2].send_counter)


@pytest.mark.parametrize("rebinding", [False, True])
def test_anchor_from_tun_many_is_from_tun_per_packet(rebinding: bool) -> None:
    """Downlink ACKs and small UDP of several flows; one flow's tunnel is being rebound
    (its datagrams spend the new address's credit one by one, then go to the old)."""
    up = [pb.tcp(VIPA, CH, 40000, 80, b"u"), pb.udp(VIPA, CH, 5000, 6000, b"v")]
    burst = [pb.tcp(CH, VIPA, 80, 40000, b"") for _ in range(5)] + \
        [pb.udp(CH, VIPA, 6000, 5000, bytes([i]) * n) for i, n in enumerate((30, 30, 10, 30))] + \
        [pb.icmp_echo(CH, VIPA, 3, 1, reply=True), pb.tcp(CH, "100.100.9.9", 80, 1, b""),
         pb.tcp(CH, "100.100.9.9", 80, 1, b"")]
    outs, states = [], []
    for batch in (False, True):
        fwd, ta, tb = anchor_with_host()
        tx = Session(1, 2, HOST_K1, HOST_K2, 0.0)     # anchor_with_host's keys
        for p in up:                                    # the host's flows, learnt
            assert fwd.from_path(tx.seal(TYPE_DATA, p), MH_A, 0.5) is not None
        if rebinding:
            fwd.probe(ta, ("198.51.100.1", 1))
            ta.probe_credit = 200
        if batch:
            out = fwd.from_tun_many(burst, 1.0)
        else:
            out = [(*o, 0) for p in burst if (o := fwd.from_tun(p, 1.0)) is not None]
        outs.append([(to, d) for to, data, size in out
                     for d in (datagrams(data, size) if size else [data])])
        states.append(_anchor_state(fwd))
        if batch and not rebinding:
            assert len(out) == 4             # the ACKs, the UDP run (cut at 10), the ping
    assert outs[0] == outs[1] and states[0] == states[1]
    assert states[0][2] == {"no_association": 2}


def body(p: bytes) -> bytes:
    """What the NAT leaves alone: protocol, ports and payload (not the checksums)."""
    return bytes([p[9]]) + (p[20:24] + p[28:] if p[9] == 17 else
                            p[20:24] + p[40:] if p[9] == 6 else p[24:])


async def test_a_burst_crosses_the_tunnel_both_ways(tmp_path: Path) -> None:
    """The daemons' drivers: a wake-up's packets at the host's TUN (one flow's run, another
    flow, ICMP) reach the anchor's TUN in order, NATed; the anchor's burst back too."""
    w = World(tmp_path, rules=RULES)
    await w.start()
    try:
        vipa = w.agent.status()["anchors"][0]["vipa"]
        up = [pb.udp(FIX, CH, 5000, 6000, bytes([i]) * 36) for i in range(5)] + \
            [pb.tcp(FIX, CH, 40000, 80, b"GET"), pb.icmp_echo(FIX, CH, 7, 1)]
        w.mh_tun.inject_burst(up)
        await w.settle()
        got = w.an_tuns[0].written
        assert [body(p) for p in got] == [body(p) for p in up]
        assert all(p[12:16] == pb.ip(vipa) and pb.checksums_ok(p) for p in got)
        flows = {f["rule"]: f for f in w.agent.status()["flows"]}
        assert flows["video"]["tx_packets"] == 5 and flows["web"]["tx_packets"] == 1
        down = [pb.udp(CH, vipa, 6000, 5000, bytes([i]) * 36) for i in range(4)]
        w.an_tuns[0].inject_burst(down)
        await w.settle()
        assert [body(p) for p in w.mh_tun.written] == [body(p) for p in down]
        assert all(p[16:20] == pb.ip(FIX) for p in w.mh_tun.written)
        assert not w.agent.fwd.drops and not w.anchors[0].fwd.drops
    finally:
        await w.stop()


# -- UDP segmentation offload on the TUN (GSO_UDP_L4) ---------------------------------------

COALESCE: list[Any] = [O.py_coalesce]
if _fast is not None:
    COALESCE.append(_fast.coalesce)


def udp_run(n: int, size: int, last: int = 0, sport: int = 5000, ident: int = 100
            ) -> list[bytes]:
    """``n`` datagrams of one flow, consecutive IP ids (what the kernel's cut gives)."""
    out = []
    for k in range(n):
        body = os.urandom(last if last and k == n - 1 else size)
        p = bytearray(pb.udp(FIX, CH, sport, 53, body))
        p[4:6] = (ident + k).to_bytes(2, "big")
        p[10:12] = b"\0\0"
        p[10:12] = pb.csum(bytes(p[:20])).to_bytes(2, "big")
        out.append(bytes(p))
    return out


@pytest.mark.parametrize("coalesce", COALESCE)
def test_uso_coalesce_merges_one_udp_flow_and_the_split_gives_it_back(coalesce: Any) -> None:
    run = udp_run(5, 100, last=40)
    (w,) = coalesce(run, True)
    hdr = O.VNET_HDR.unpack_from(w)
    assert hdr == (O.NEEDS_CSUM, O.GSO_UDP_L4, 28, 100, 20, 6)
    pkt = w[O.VNET_HDR_LEN:]
    assert len(pkt) == 28 + 440 and pb.csum(pkt[:20]) == 0
    assert O.packets(w) == run                           # cut again: the same datagrams
    assert all(pb.checksums_ok(p) for p in O.uso_split(pkt, 100))
    assert coalesce(run, False) == [bytes(10) + p for p in run]   # no USO: as before


@pytest.mark.parametrize("coalesce", COALESCE)
def test_uso_coalesce_keeps_order_and_merges_only_what_it_may(coalesce: Any) -> None:
    a, b = udp_run(3, 64, sport=1), udp_run(2, 64, sport=2)
    longer = udp_run(1, 80, sport=1, ident=103)
    ttl = bytearray(udp_run(1, 64, sport=1, ident=104)[0])
    ttl[8] = 3
    frag = bytearray(udp_run(1, 64, sport=1, ident=105)[0])
    frag[6] |= 0x20                                      # more fragments
    many = udp_run(70, 32, sport=9)
    writes = coalesce([*a, *longer, bytes(ttl), *b, bytes(frag), *many], True)
    kinds = [(w[1], O.VNET_HDR.unpack_from(w)[3]) for w in writes]
    assert kinds == [(O.GSO_UDP_L4, 64), (0, 0), (0, 0), (O.GSO_UDP_L4, 64), (0, 0),
                     (O.GSO_UDP_L4, 32), (O.GSO_UDP_L4, 32)]
    back = [p for w in writes for p in O.packets(w)]
    assert back == [*a, *longer, bytes(ttl), *b, bytes(frag), *many]
    assert len(O.packets(writes[5])) == 64               # at most 64 datagrams a write


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 70), st.integers(0, 1)),
                min_size=1, max_size=12))
def test_uso_coalesce_implementations_agree_and_lose_nothing(
        picks: list[tuple[int, int, int]]) -> None:
    stream: list[bytes] = []
    for flow, size, tcp in picks:
        stream += segments_tcp(flow, size) if tcp else udp_run(2, size, sport=flow)
    ref = O.py_coalesce(stream, True)
    if _fast is not None:
        assert _fast.coalesce(stream, True) == ref
    back = [p for w in ref for p in O.packets(w, O.py_tso_split, O.py_finish_csum)]

    def no_id(p: bytes) -> bytes:    # a write's datagrams get consecutive IP ids, as TSO's
        return p[:4] + p[6:10] + p[12:]
    assert [no_id(p) for p in back] == [no_id(p) for p in stream]
    assert all(pb.checksums_ok(p) for p in back)


def segments_tcp(flow: int, size: int) -> list[bytes]:
    return [pb.tcp(FIX, CH, flow, 80, b"t" * size)]


def test_uso_split_cuts_ipv4_and_ipv6_udp_and_refuses_the_rest() -> None:
    body = os.urandom(250)
    v4 = pb.udp(FIX, CH, 1, 2, body)
    segs = O.uso_split(v4, 100)
    assert [len(s) - 28 for s in segs] == [100, 100, 50]
    assert b"".join(s[28:] for s in segs) == body and all(pb.checksums_ok(s) for s in segs)
    assert [int.from_bytes(s[4:6], "big") for s in segs] == [1, 2, 3]
    v6 = udp6(FIX6_B, CH6, 1, 2, body)
    segs6 = O.uso_split(v6, 120)
    assert [len(s) - 48 for s in segs6] == [120, 120, 10]
    assert b"".join(s[48:] for s in segs6) == body
    for s in segs6:       # each a whole datagram: the same as building it anew
        assert s == udp6(FIX6_B, CH6, 1, 2, s[48:])[:8] + s[8:]
        assert s == udp6(FIX6_B, CH6, 1, 2, s[48:])
    assert O.uso_split(pb.tcp(FIX, CH, 1, 2, body), 100) == []
    assert O.uso_split(v4[:28], 100) == [] and O.uso_split(v4, 0) == []
    assert O.packets(O.VNET_HDR.pack(O.NEEDS_CSUM, O.GSO_UDP_L4, 28, 100, 20, 6) + v4) == segs


USO_SCRIPT = r"""
import asyncio, os, socket, subprocess, sys
from upmt_tun.dataplane import io, offload as O
loop = asyncio.new_event_loop()
tun = io.TunDevice("uso0", loop, offload=True)
if not tun.uso:
    print("no USO"); sys.exit(0)
for cmd in ("ip link set lo up", "ip addr add 10.77.0.1/24 dev uso0", "ip link set uso0 up"):
    subprocess.run(cmd.split(), check=True)
rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
rx.bind(("10.77.0.1", 5353))
rx.settimeout(3)
sys.path.insert(0, sys.argv[1])
from tests import pktbuild as pb
bodies = [bytes([k]) * (300 if k < 4 else 120) for k in range(5)]
run = [pb.udp("10.77.0.2", "10.77.0.1", 4000, 5353, b) for b in bodies]
for pkt in run:
    tun.write(pkt)
tun.flush()                          # one GSO_UDP_L4 write
got = [rx.recv(2000) for _ in bodies]
print("write", got == bodies, tun.write_errors)
tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
tx.setsockopt(17, 103, 100)          # UDP_SEGMENT: one send, cut at 100 bytes
tx.sendto(os.urandom(250), ("10.77.0.2", 9))
reader = io.BurstReader(tun.fd, io.READ_SIZE, 1 << 20, 64, True)
for _ in range(100):
    reads, err, special = reader.read()
    uso = [r for r in reads if special and r is reads[-1] and r[1] == O.GSO_UDP_L4]
    if uso:
        segs = O.packets(uso[0])
        print("read", [len(x) - 28 for x in segs], all(pb.checksums_ok(x) for x in segs))
        break
    import time; time.sleep(0.02)
else:
    print("read none")
"""


@pytest.mark.netns
@pytest.mark.skipif(netns_missing() is not None, reason=str(netns_missing()))
def test_the_kernel_takes_our_uso_writes_and_we_cut_its_uso_reads() -> None:
    """A real TUN in a fresh namespace: a run of one UDP flow written as one GSO_UDP_L4
    packet reaches a local socket as its datagrams; a local UDP_SEGMENT send read from the
    TUN is cut into its datagrams, checksums valid."""
    ns = f"uso{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", USO_SCRIPT,
                            str(Path(__file__).resolve().parent.parent)],
                           capture_output=True, text=True, timeout=60)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    if r.stdout.strip() == "no USO":
        pytest.skip("this kernel has no TUN USO (Linux < 6.2)")
    assert r.stdout.splitlines() == ["write True 0", "read [100, 100, 50] True"], r.stdout
