"""The agent's compiled uplink (``_fast.UpLane``): a learnt flow's packets carried without
the Python path, with what ``AgentForwarder.from_tun_many`` would have sent.

The lane seals its hits before the Python path seals the rest of a burst, so the session
counters are handed out in another order than packet by packet: the tests open every
datagram with the anchor's side of the session and compare what each carries (socket,
destination, header, plaintext), flow by flow in order, the counters used (each once),
and the forwarder's counters."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from upmt_tun.dataplane.crypto import Session
from upmt_tun.dataplane.forwarder import AgentForwarder
from upmt_tun.dataplane.packet import HEADER, TYPE_DATA, datagrams
from upmt_tun.nat import five_tuple

from . import pktbuild as pb
from .test_batch import _Loop
from .test_burst import CH, FIX, K1, K2, _agent_state, agent_fwd, mixed_burst
from .test_e2e_memory import RULES, World

_fast = pytest.importorskip("upmt_tun.dataplane._fast")
if not hasattr(_fast, "UpLane"):   # pragma: no cover - an old build
    pytest.skip("no compiled lane", allow_module_level=True)

Out = tuple[int, tuple[str, int], bytes, int]


class Lane:
    """A forwarder with a lane whose queues record what it sends."""

    def __init__(self, fwd: AgentForwarder) -> None:
        self.fwd = fwd
        self.sent: list[Out] = []
        queues = [lambda d, to, i=i: self.sent.append((i, to, d, 0)) for i in range(2)]
        runs = [lambda d, size, to, i=i: self.sent.append((i, to, d, size)) for i in range(2)]
        self.lane = _fast.UpLane(fwd, queues, runs)
        fwd.lane = self.lane

    def burst(self, pkts: list[bytes], now: float) -> None:
        rest = self.lane.run(pkts, now)
        self.sent += self.fwd.from_tun_many(rest, now)


def opened(outs: list[Out]) -> tuple[dict[Any, list[Any]], dict[int, list[int]]]:
    """Each datagram opened by the anchor's side of its session: per flow (of the
    plaintext), in order, (socket, destination, header word, plaintext); and the counters
    used, per receiver index."""
    rx = {2: Session(2, 1, K2, K1, 0.0), 4: Session(4, 3, K1, K2, 0.0)}
    flows: dict[Any, list[Any]] = defaultdict(list)
    counters: dict[int, list[int]] = defaultdict(list)
    for i, to, data, size in outs:
        for d in datagrams(data, size) if size else [data]:
            word, receiver, counter = HEADER.unpack_from(d)
            counters[receiver].append(counter)
            if word >> 24 != TYPE_DATA:          # a relay wrapper: its type and path
                flows["relay"].append((i, to, d[:4]))
                continue
            got = rx[receiver].open(d)
            assert got is not None and got[0] == counter
            flows[five_tuple(got[1])].append((i, to, word, got[1]))
    return dict(flows), {r: sorted(c) for r, c in counters.items()}


def test_lane_carries_learnt_flows_as_the_python_path_does() -> None:
    ref, _ = agent_fwd()
    lane = Lane(agent_fwd()[0])
    want: list[Out] = []
    for now in (1.0, 2.0, 3.0):          # the first burst teaches, the next ones hit
        want += ref.from_tun_many(mixed_burst(), now)
        lane.burst(mixed_burst(), now)
    assert opened(lane.sent) == opened(want)
    assert _agent_state(lane.fwd) == _agent_state(ref)
    assert sorted((f.key, f.last_seen) for f in lane.fwd.paft.flows()) == \
        sorted((f.key, f.last_seen) for f in ref.paft.flows())
    # IPv4 TCP, UDP and ICMP echo runs of the last two bursts: 4+1+6+1+1+1 per burst
    assert lane.lane.hits == 2 * 14
    # nothing for the lane: IPv6, the spoofed source, the relayed mesh flow
    assert len(lane.lane) == 4


def test_lane_follows_every_change_of_a_route() -> None:
    """A flow moved, a tunnel down (failover), a new session (rekey), a flow expired, a
    new VIpA: each next burst goes where the Python path sends it."""
    ref, _ = agent_fwd()
    lane = Lane(agent_fwd()[0])
    burst = [pb.udp(FIX, CH, 5000, 6000, bytes([i]) * 40) for i in range(3)] + \
        [pb.tcp(FIX, CH, 40000, 80, b"t" * 100)] * 2 + [pb.icmp_echo(FIX, CH, 9, 1)]
    changes = [
        lambda f: None,
        lambda f: [x.move(2.0, f.by_path[("wan2", "an1")].tid, "test")
                   for x in f.paft.flows() if x.key[0] == 17],
        lambda f: f.tunnel_down(f.by_path[("wan1", "an1")]),
        lambda f: f.add_session("an1", Session(5, 6, K1, K2, 0.0, generation=1)),
        lambda f: [f.paft.remove(x) for x in f.paft.flows() if x.key[0] == 6],
        lambda f: f.set_association("an1", "100.100.0.9", "anchor", frozenset()),
    ]
    want: list[Out] = []
    hits = []
    for n, change in enumerate(changes):
        change(ref)
        change(lane.fwd)
        want += ref.from_tun_many(burst, 10.0 + n)
        lane.burst(burst, 10.0 + n)
        hits.append(lane.lane.hits)
    def by_flow(outs: list[Out]) -> dict[Any, list[Any]]:
        rx = {2: Session(2, 1, K2, K1, 0.0), 6: Session(6, 5, K2, K1, 0.0)}
        flows: dict[Any, list[Any]] = defaultdict(list)
        for i, to, data, size in outs:
            for d in datagrams(data, size) if size else [data]:
                got = rx[HEADER.unpack_from(d)[1]].open(d)
                assert got is not None
                flows[five_tuple(got[1])].append((i, to, got[1]))
        return dict(flows)

    assert by_flow(lane.sent) == by_flow(want)
    assert _agent_state(lane.fwd) == _agent_state(ref)
    assert ref.paft.flows_created == lane.fwd.paft.flows_created == 4
    # per burst, what hit (of UDP 3, TCP 2, ICMP 1): nothing yet; TCP+ICMP (UDP moved);
    # UDP (the others failed over); nothing (new session); UDP+ICMP (TCP expired); all
    # (a new VIpA is read at each hit, nothing to learn)
    assert [b - a for a, b in zip([0, *hits[:-1]], hits, strict=True)] == [0, 3, 3, 0, 4, 6]
    sources = {p[12:16] for _, _, p in sum(by_flow(lane.sent).values(), [])}
    assert sources == {pb.ip("100.100.0.2"), pb.ip("100.100.0.9")}


def test_lane_hands_back_what_it_cannot_carry_in_order() -> None:
    lane = Lane(agent_fwd()[0])
    frag = bytearray(pb.udp(FIX, CH, 1, 2, b"y" * 40))
    frag[6:8] = b"\x00\x05"                     # a non-first fragment: no ports
    odd = [b"", b"\x45" + bytes(10), pb.udp("10.9.9.9", CH, 1, 2, b"x"), bytes(frag),
           bytearray(pb.udp(FIX, CH, 1, 2, b"z")), pb.icmp_echo(FIX, CH, 3, 1)[:24]]
    assert lane.lane.run(odd, 1.0) == odd
    assert lane.sent == [] and lane.lane.hits == 0


@pytest.mark.parametrize("off", [False, True])
async def test_the_agent_carries_bursts_through_its_lane(tmp_path: Path, off: bool,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end in memory: a TUN burst of a flow crosses to the anchor's TUN NATed, the
    second one through the lane (``UPMT_NO_LANE=1``: none, the same packets arrive)."""
    if off:
        monkeypatch.setenv("UPMT_NO_LANE", "1")
    w = World(tmp_path, rules=RULES)
    await w.start()
    try:
        vipa = pb.ip(w.agent.status()["anchors"][0]["vipa"])
        sent = []
        for rnd in range(2):
            burst = [pb.udp("100.64.0.1", CH, 5000, 6000, bytes([rnd, i]) * 30) for i in range(5)]
            burst.append(pb.icmp_echo("100.64.0.1", CH, 77, rnd))
            w.mh_tun.inject_burst(burst)
            await w.settle()
            sent += burst
        got = w.an_tuns[0].written
        assert [p[28:] for p in got] == [p[28:] for p in sent]      # payloads, in order
        assert all(p[12:16] == vipa and pb.checksums_ok(p) for p in got)
        assert {(f["rule"], f["tx_packets"]) for f in w.agent.status()["flows"]} == {
            ("video", 10), ("", 2)}
        lane = w.agent.fwd.lane
        assert (lane is None) if off else (lane is not None and lane.hits == 6)
    finally:
        await w.stop()


class _Owner:
    _quiet = False          # the agent's: its links sleep (then a flush is due)


@pytest.mark.parametrize("family", ["ipv4", "dual-stack to ipv4", "ipv6"])
def test_the_compiled_tun_reader_sends_hits_itself_and_hands_back_the_rest(family: str) -> None:
    """_fast.TunPump on a stand-in TUN (a SEQPACKET pair) and real UDP sockets on
    loopback: the first wake-up goes through the Python path (then flush), the next
    ones are sent by the lane itself, GSO runs included, without a Python call; a
    datagram already waiting in the socket's queue keeps its place (the lane queues
    behind it and asks for the flush). On an IPv4 socket, and on a dual-stack one to an
    IPv4 (::ffff:) and an IPv6 anchor."""
    import socket

    from upmt_tun.dataplane import io as dio
    from upmt_tun.dataplane.forwarder import FlowClass

    from .test_outer_ipv6 import _has_ipv6_loopback
    if family != "ipv4" and not _has_ipv6_loopback():
        pytest.skip("no IPv6 on this host")
    v6 = family == "ipv6"
    rx = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("::1" if v6 else "127.0.0.1", 0))
    rx.settimeout(2)
    remote = rx.getsockname()[:2]
    tun_a, tun_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tun_a.setblocking(False)
    path = dio.PathSocket(dio.open_udp("127.0.0.1" if family == "ipv4" else "::", 0),
                          _Loop(), ("127.0.0.1", 0), offload=True)  # type: ignore[arg-type]
    fwd = AgentForwarder(FIX, ["wan1"], ["an1"], lambda key: FlowClass("r", (), None))
    fwd.set_association("an1", "100.100.0.2", "anchor", frozenset())
    fwd.add_session("an1", Session(1, 2, K1, K2, 0.0))
    fwd.tunnel_up(fwd.add_tunnel("wan1", 0, "an1", path.local, remote, 0.0), 7, 0.0)
    lane = _fast.UpLane(fwd, [path.queue], [path.queue_run])
    fwd.lane = lane
    calls: list[str] = []

    def rest(pkts: list[bytes]) -> None:
        calls.append("rest")
        for _, to, data, size in fwd.from_tun_many(pkts, 1.0):
            (path.queue_run(data, size, to) if size else path.queue(data, to))

    def flush() -> None:
        calls.append("flush")
        path.flush()

    pump = _fast.TunPump(_fast.BurstReader(tun_a.fileno(), 2048, 1 << 16, 64, False), lane,
                         lambda: 1.0, rest, lambda d: calls.append("odd"), flush,
                         lambda e: calls.append(f"failed {e}"), _Owner(), 256)
    receiver = Session(2, 1, K2, K1, 0.0)

    def received(n: int) -> list[bytes]:
        out = []
        while len(out) < n:
            data, _ = rx.recvfrom(65535)
            got = receiver.open(data)
            assert got is not None
            out.append(got[1])
        return out

    try:
        run = [pb.udp(FIX, CH, 5000, 6000, bytes([i]) * 64) for i in range(5)]
        for rnd in range(3):
            calls.clear()
            if rnd == 2:                     # something already queued on the socket
                path.queue(b"\x80" + bytes(40), remote)
            for p in [*run, pb.icmp_echo(FIX, CH, 5, rnd)]:
                tun_b.send(p)
            pump()
            if rnd == 2:
                assert rx.recvfrom(100)[0] == b"\x80" + bytes(40)   # first, as queued
            got = received(6)
            assert [p[28:] for p in got] == [p[28:] for p in [*run, pb.icmp_echo(FIX, CH, 5, rnd)]]
            assert all(p[12:16] == pb.ip("100.100.0.2") for p in got)
            assert calls == (["rest", "flush"] if rnd == 0 else [] if rnd == 1 else ["flush"])
        assert lane.hits == 12 and pump.wakeups == 3 and pump.python == 2
        assert path.send_errors == 0
    finally:
        path.close()
        rx.close()
        tun_a.close()
        tun_b.close()


def test_the_compiled_tun_reader_hands_special_reads_as_the_python_reader() -> None:
    """With IFF_VNET_HDR reads (test_burst.vnet_reads: ordinary packets, a super-packet,
    refused reads): the pump hands over what the Python reader of io.TunDevice does, in
    the same calls, in order (no lane route learnt: everything goes back)."""
    import socket

    from .test_burst import vnet_reads

    got: dict[str, list[Any]] = {}
    sent = vnet_reads() * 3
    for kind in ("python", "pump"):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        a.setblocking(False)
        calls: list[Any] = []
        got[kind] = calls
        reader = _fast.BurstReader(a.fileno(), 70000, 1 << 20, 256, True)
        for m in sent:
            b.send(m)
        if kind == "pump":
            fwd, _ = agent_fwd()
            add = calls.append
            pump = _fast.TunPump(reader, _fast.UpLane(fwd, [], []), lambda: 1.0,
                                 lambda rest, add=add: add(("hand", rest)),
                                 lambda d, add=add: add(("odd", d)),
                                 lambda add=add: add("flush"),
                                 lambda e, add=add: add(("failed", e)), _Owner(), 256)
            pump()
        else:                                # io.TunDevice.start's burst(), by hand
            while True:
                reads, err, special = reader.read(256)
                if special:
                    if len(reads) > 1:
                        calls.append(("hand", reads[:-1]))
                    calls.append(("odd", reads[-1]))
                elif reads:
                    calls.append(("hand", reads))
                if err >= 0:
                    break
            calls.append("flush")
        a.close()
        b.close()
    assert got["pump"] == got["python"]
    assert sum(1 for c in got["pump"] if c[0] == "odd") == 3 * 5


async def test_idle_flows_are_forgotten_and_their_routes_too(tmp_path: Path) -> None:
    """The agent's timer sweeps flows silent for FLOW_IDLE (its PAFT used to only grow,
    and refused every new flow once full) and the lane forgets their routes; a flow that
    comes back after that is a new flow, carried again."""
    from upmt_tun import agent as agent_mod

    w = World(tmp_path, rules=RULES)
    await w.start()
    try:
        def burst(sport: int) -> list[bytes]:
            return [pb.udp("100.64.0.1", CH, sport, 6000, bytes([i]) * 20) for i in range(3)]
        for sport in (5000, 5001):
            for _ in range(2):
                w.mh_tun.inject_burst(burst(sport))
                await w.settle()
        fwd = w.agent.fwd
        assert len(fwd.paft) == 2 and fwd.lane is not None and len(fwd.lane) == 2
        w.offset += agent_mod.FLOW_IDLE / 2
        w.mh_tun.inject_burst(burst(5001))          # 5001 stays busy, 5000 goes quiet
        await w.settle()
        w.offset += agent_mod.FLOW_IDLE / 2 + agent_mod.FLOW_SWEEP_EVERY
        w.agent._kick.set()                         # noqa: SLF001 - the timer looks now
        for _ in range(50):
            await asyncio.sleep(0.01)
            if len(fwd.paft) == 1:
                break
        assert [f.key[3] for f in fwd.paft.flows()] == [5001]
        assert len(fwd.lane) == 1
        created = fwd.paft.flows_created
        w.mh_tun.inject_burst(burst(5000))          # back: a new flow
        await w.settle()
        assert fwd.paft.flows_created == created + 1 and len(fwd.paft) == 2
        hits = fwd.lane.hits
        w.mh_tun.inject_burst(burst(5000))
        await w.settle()
        assert fwd.lane.hits == hits + 3
    finally:
        await w.stop()
