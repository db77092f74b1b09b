#!/usr/bin/env python3
"""How the anchor scales with flows and hosts, and what a flow costs in memory.

    python benchmarks/anchor_scale.py [--quick] [--no-netns] [--json PATH]
                                      [--flows 1,1000,10000,100000] [--hosts 1,10,200]
                                      [--packets N] [--repeat R] [--plaintext]

In process, no root (except the optional idle-RSS part): a real ``upmt_tun.anchor.Anchor``
over fake seams (a counting/recording path and ``dataplane.io.FakeTun``), with a real X25519
key and one ``[[peer]]`` per simulated host. Each simulated host does what an agent does: a
real Noise IK handshake, sealed SIP signalling (AssociationReq, TunnelSetupReq, KeepAlive
echoing the path challenge until the tunnel is validated), then sealed DATA. Everything goes
through ``Anchor._on_datagram`` (uplink) and ``Anchor._on_tun`` (downlink), as in the daemon.

Per scenario (flows x hosts; flow ``i`` belongs to host ``i % hosts``; a row with fewer
flows than hosts is measured with one flow per host, e.g. 1 x 200 as 200 flows, so that
every host is active in every row of that host count):

* setup: new flows/s, a fresh anchor per repetition, one sealed 64-byte UDP packet per new
  5-tuple, interleaved over the hosts. A first, untimed repetition runs under tracemalloc:
  bytes allocated per flow going from 0 to N flows (the column ``B/flow``);
* forwarding, on the anchor of the last setup repetition (holding N flows): uplink packets/s
  (sealed DATA of existing flows, 64 and 1400-byte inner packets, round robin over the
  flows) and downlink packets/s (packets to the hosts' VIpAs, reverse 5-tuples of the
  flows, 64 and 1400 bytes), each the best of R repetitions of P packets;
* ratios of each rate to the baseline of the same host count (1 flow, or one per host),
  whose anchor is kept and measured again interleaved with each larger one, repetition by
  repetition (goal >= 0.9 at 10 000 flows), from wall time and from CPU time;
* memory breakdown at the largest flow count: tracemalloc grouped by source line, an
  object walk over sampled PAFT entries (what each part of a flow costs, shared objects
  counted once), every per-flow container's own size, and the RSS growth measured in a
  fresh subprocess;
* the agent's per-flow memory (``AgentForwarder`` PAFT with N flows, tracemalloc);
* idle RSS (root, netns testbed; ``--no-netns`` skips it): a real agent + anchor
  (``testbed.Topology`` + ``lab.Lab``), 5 s idle, VmRSS of the agent's Python process,
  next to a bare ``python -c "import upmt_tun.agent, upmt_tun.runtime"``.

Timing: ``time.perf_counter`` around a plain ``for`` loop over pre-built datagrams (sealed
outside the timed region, in the order they are fed, so every counter passes the replay
window). The cyclic garbage collector stays ON while timing, as in the daemon; the time it
took during each timed loop is measured (``gc.callbacks``) and reported. The anchor's clock
is a fake one that returns a fresh float per call (as ``time.monotonic`` does), so flows
store their own float objects, as in the daemon.

After every step the script checks that the packets really went through: the flows are in
the anchor's PAFT with the right tunnel, every uplink packet was written to the fake TUN,
every downlink packet was sent to its host's address and hit its flow (not the
association's fallback tunnel), and no drop counter moved. Failed checks are errors (exit
1); missed goals are results, not errors.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import gc
import ipaddress
import json
import linecache
import logging
import os
import platform
import random
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import tracemalloc
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (  # noqa: E402 (benchmarks/ dir)
    BenchError,
    interruptible,
    loadavg,
    proc_cmdline,
    render,
    source_version,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
HERE = Path(__file__).resolve()

LISTEN = ("203.0.113.1", 5060)
GOAL_RATIO_10K = 0.9
GOAL_BYTES_PER_FLOW = 200
GOAL_IDLE_AGENT_MB = 64
IDLE_SECONDS = 5.0

Addr = tuple[str, int]



try:
    from upmt_tun import keys, nat
    from upmt_tun.anchor import Anchor
    from upmt_tun.config import ConfigError, load_anchor_config
    from upmt_tun.dataplane.crypto import Session
    from upmt_tun.dataplane.io import FakeTun
    from upmt_tun.dataplane.packet import TYPE_CONTROL, TYPE_DATA, TYPE_HS_RESP
    from upmt_tun.signalling import sip, upmt
    from upmt_tun.signalling.handshake import Initiation
except ImportError as _e:       # not installed: say so in one line
    print(f"error: cannot import upmt_tun ({_e}); run `pip install -e .` first",
          file=sys.stderr)
    sys.exit(2)


# -- fake seams ---------------------------------------------------------------------------

class CountingPath:
    """The anchor's UDP socket. While ``capture`` is a list, datagrams are recorded there
    (signalling); otherwise ``sendto`` only counts them per destination. ``queue`` (the
    data path's batched send, where the anchor has one) appends to a list as the real
    socket does; ``flush`` (untimed here: it is the system call) counts and forgets them."""

    local = LISTEN

    def __init__(self) -> None:
        self.capture: list[tuple[bytes, Addr]] | None = None
        self.sent: Counter[Addr] = Counter()
        self.queued: list[tuple[bytes, Addr]] = []

    def start(self, on_datagram: Callable[[bytes, Addr], None], on_flush: object = None,
              on_batch: object = None) -> None:
        pass

    def sendto(self, data: bytes, addr: Addr) -> None:
        if self.capture is not None:
            self.capture.append((bytes(data), addr))
        else:
            self.sent[addr] += 1

    def queue(self, data: bytes, addr: Addr) -> None:
        self.queued.append((data, addr))

    def flush(self) -> None:
        sent = self.sent
        for _, addr in self.queued:
            sent[addr] += 1
        self.queued = []

    def close(self) -> None:
        pass


class TunCount:
    """Counts what the anchor wrote to its TUN (packets, bytes). ``FakeTun.sink`` is the
    C-level ``append`` of ``pending`` (cheap while timing); :meth:`drain` counts it."""

    __slots__ = ("n", "nbytes", "pending")

    def __init__(self) -> None:
        self.n = 0
        self.nbytes = 0
        self.pending: list[bytes] = []

    def __call__(self, pkt: bytes) -> None:     # the sink while tracemalloc runs: holds nothing
        self.n += 1
        self.nbytes += len(pkt)

    def drain(self) -> int:
        self.n += len(self.pending)
        self.nbytes += sum(map(len, self.pending))
        self.pending.clear()          # in place: the sink is this list's append
        return self.n


class GcTimer:
    """Time spent in cyclic GC collections while ``active`` (via ``gc.callbacks``)."""

    def __init__(self) -> None:
        self.total = 0.0
        self.collections: Counter[int] = Counter()
        self._t0 = 0.0
        self.active = False

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if not self.active:
            return
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._t0
            self.collections[info.get("generation", -1)] += 1

    def reset(self) -> None:
        self.total = 0.0
        self.collections = Counter()


GC_TIMER = GcTimer()


# -- packets ------------------------------------------------------------------------------

_IPUDP = struct.Struct("!BBHHHBBH4s4sHHHH")
_PAYLOAD = {n: bytes(n) for n in (0, 64, 1400)}


def ip_udp(src: bytes, dst: bytes, sport: int, dport: int, size: int) -> bytes:
    """An IPv4/UDP packet of ``size`` bytes, valid IP header checksum, UDP checksum 0."""
    pay = size - 28
    hdr = bytearray(_IPUDP.pack(0x45, 0, size, 1, 0x4000, 64, 17, 0, src, dst,
                                sport, dport, size - 20, 0))
    struct.pack_into("!H", hdr, 10, nat.ipv4_checksum(hdr[:20]))
    payload = _PAYLOAD.get(pay) or bytes(pay)
    return bytes(hdr) + payload


def flow_far_end(k: int) -> tuple[bytes, int, int]:
    """The ``k``-th flow of a host: (correspondent address, host's port, far port)."""
    return bytes((198, 51, 100 + k // 50_000, 7)), 10_000 + k % 50_000, 443


# -- simulated hosts and the anchor rig ---------------------------------------------------

@dataclass(eq=False)
class SimHost:
    name: str
    priv: bytes
    addr: Addr
    session: Session | None = None
    vipa: str = ""
    vipa_b: bytes = b""
    tid: int = 0                    # the anchor's id of this host's tunnel (path id)
    n_sip: int = 0

    @property
    def s(self) -> Session:
        assert self.session is not None
        return self.session


def host_addr(i: int) -> Addr:
    return f"198.18.{i // 200}.{i % 200 + 1}", 40_000 + i % 20_000


class Rig:
    """An Anchor over fake seams with ``len(host_keys)`` associated hosts, one validated
    tunnel each."""

    def __init__(self, workdir: Path, an_key: tuple[str, str],
                 host_keys: list[tuple[str, str]], *, max_flows: int, plaintext: bool) -> None:
        self.plaintext = plaintext
        cfgp = workdir / "anchor.toml"
        per_host = min(1_000_000, max(16, max_flows))
        cfgp.write_text(textwrap.dedent(f'''
            listen = "{LISTEN[0]}:{LISTEN[1]}"
            vipa_pool = "100.100.0.0/16"
            nat_interface = "eth0"
            private_key = "{an_key[0]}"
            max_associations = {max(1024, len(host_keys))}
            max_flows_per_host = {per_host}
            insecure_plaintext_for_benchmarks = {str(plaintext).lower()}
            ''') + "".join(f'[[peer]]\nname = "h{i:04d}"\npublic_key = "{pub}"\n'
                           for i, (_, pub) in enumerate(host_keys)))
        try:
            self.cfg = load_anchor_config(str(cfgp))
        except ConfigError as e:
            raise BenchError(f"the anchor refused the benchmark's config: {e}") from None
        self.an_pub = base64.b64decode(an_key[1])
        self.path = CountingPath()
        self.tun = FakeTun()
        self.tun_count = TunCount()
        self.tun.sink = self.tun_count.pending.append
        self.now = 1000.0
        self.wall_ns = 1_700_000_000 * 10**9
        self.rng = random.Random(len(host_keys))
        self.anchor = Anchor(self.cfg, tun=self.tun, path=self.path, clock=self.clock)
        self.cap_note = ""
        self.rr_next = 0                # uplink round robin: the next flow, across tests
        paft = self.anchor.fwd.paft
        cap = getattr(paft, "cap", None)
        if isinstance(cap, int) and cap < max_flows:   # Anchor() keeps the forwarder's default
            self.cap_note = f"PAFT cap raised from {cap} to {max_flows}"
            paft.cap = max_flows
        per_source = getattr(paft, "per_source_cap", None)
        if isinstance(per_source, int) and per_source < max_flows:
            paft.per_source_cap = max_flows
        self.hosts = [SimHost(f"h{i:04d}", base64.b64decode(priv), host_addr(i))
                      for i, (priv, _) in enumerate(host_keys)]
        for h in self.hosts:
            self.establish(h)

    def clock(self) -> float:
        return self.now + 0.0          # a fresh float per call, as time.monotonic()

    @property
    def fwd(self) -> Any:
        return self.anchor.fwd

    # -- signalling, as the agent does it -------------------------------------------------
    def _exchange(self, data: bytes, src: Addr) -> list[tuple[bytes, Addr]]:
        self.path.capture = []
        try:
            self.anchor._on_datagram(data, src)        # noqa: SLF001 (the code measured)
            self.anchor.drain_handshakes(1 << 20)      # (the worker's DH work, at once)
            return self.path.capture
        finally:
            self.path.capture = None

    def handshake(self, h: SimHost) -> None:
        self.now += 0.02             # 50 handshakes/s: below the anchor's global bound
        self.wall_ns += 1_000_000
        init = Initiation(static=h.priv, remote_static=self.an_pub,
                          local_index=self.rng.randrange(1, 1 << 32), wall_ns=self.wall_ns)
        sent = self._exchange(init.packet, h.addr)
        if len(sent) != 1 or sent[0][1] != h.addr or sent[0][0][0] != TYPE_HS_RESP:
            raise BenchError(f"handshake of {h.name}: the anchor answered {len(sent)} "
                             f"datagram(s), drops {dict(self.fwd.drops)}")
        s = init.consume(sent[0][0], self.now, "anchor")
        if s is None:
            raise BenchError(f"handshake of {h.name}: the anchor's response does not verify")
        s.plain_data = self.plaintext
        h.session = s

    def ask(self, h: SimHost, signals: list[tuple[str, dict[str, Any]]]
            ) -> dict[str, dict[str, Any]]:
        h.n_sip += 1
        req = sip.build_request(target=LISTEN, from_user=h.name, via=h.addr,
                                call_id=f"{h.name}-{h.n_sip:06d}", cseq=h.n_sip,
                                branch=f"z9hG4bK{h.name}{h.n_sip:010d}",
                                body=upmt.encode(signals))
        sent = self._exchange(h.s.seal(TYPE_CONTROL, req), h.addr)
        what = signals[0][0]
        if len(sent) != 1 or sent[0][1] != h.addr or sent[0][0][0] != TYPE_CONTROL:
            raise BenchError(f"{what} of {h.name}: expected one sealed answer, got "
                             f"{len(sent)}; drops {dict(self.fwd.drops)}")
        opened = h.s.open(sent[0][0])
        if opened is None:
            raise BenchError(f"{what} of {h.name}: the answer does not open")
        msg = sip.parse(opened[1])
        if not isinstance(msg, sip.SipResponse) or msg.status_code != 200:
            code = getattr(msg, "status_code", "?")
            raise BenchError(f"{what} of {h.name}: refused ({code} "
                             f"{getattr(msg, 'reason_phrase', '')})")
        return dict(upmt.decode(msg.body))

    def establish(self, h: SimHost) -> None:
        self.handshake(h)
        ar = self.ask(h, [("AssociationReq", {"sipId": h.name, "addressInUse": [],
                                              "dataPlaintext": self.plaintext})])
        h.vipa = ar["AssociationResp"]["vipa"]
        h.vipa_b = ipaddress.IPv4Address(h.vipa).packed
        tr = self.ask(h, [("TunnelSetupReq", {"sipId": h.name, "vipa": h.vipa, "tunnelId": 7,
                                              "interface": "wan1"})])["TunnelSetupResp"]
        h.tid, challenge = tr["serverTunnelID"], tr.get("challenge", "")
        for _ in range(3):
            c: dict[str, Any] = {"sipId": h.name, "tunnelId": h.tid, "lastDelay": 1.0}
            if challenge:
                c["challenge"] = challenge
            challenge = self.ask(h, [("KeepAlive", c)])["KeepAliveResp"].get("challenge", "")
            if not challenge:
                break
        t = self.fwd.tunnels.get(h.tid)
        if t is None or t.state != "up":
            raise BenchError(f"the tunnel of {h.name} was never validated")

    # -- flows ----------------------------------------------------------------------------
    def flow(self, i: int) -> tuple[SimHost, int]:
        return self.hosts[i % len(self.hosts)], i // len(self.hosts)

    def key(self, i: int) -> tuple[int, bytes, bytes, int, int]:
        h, k = self.flow(i)
        dst, sport, dport = flow_far_end(k)
        return 17, h.vipa_b, dst, sport, dport

    def uplink(self, idx: Iterable[int], size: int) -> list[tuple[bytes, Addr]]:
        """Sealed DATA datagrams (with their source address) for flows ``idx``, sealed in
        this order (feed them in this order: the counters pass the replay window)."""
        out = []
        for i in idx:
            h, k = self.flow(i)
            dst, sport, dport = flow_far_end(k)
            out.append((h.s.seal(TYPE_DATA, ip_udp(h.vipa_b, dst, sport, dport, size), h.tid),
                        h.addr))
        return out

    def downlink(self, idx: Iterable[int], size: int) -> list[bytes]:
        out = []
        for i in idx:
            h, k = self.flow(i)
            dst, sport, dport = flow_far_end(k)
            out.append(ip_udp(dst, h.vipa_b, dport, sport, size))
        return out

    def drops(self) -> dict[str, int]:
        return {k: v for k, v in self.fwd.drops.items() if v}


def feed_uplink(rig: Rig, items: list[tuple[bytes, Addr]]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) to push ``items`` through the anchor's
    receive path."""
    on_dg = rig.anchor._on_datagram                    # noqa: SLF001
    GC_TIMER.active = True
    c0 = time.process_time()
    t0 = time.perf_counter()
    for dg, src in items:
        on_dg(dg, src)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    GC_TIMER.active = False
    return wall, cpu


def feed_downlink(rig: Rig, pkts: list[bytes]) -> tuple[float, float]:
    on_tun = rig.anchor._on_tun                        # noqa: SLF001
    GC_TIMER.active = True
    c0 = time.process_time()
    t0 = time.perf_counter()
    for p in pkts:
        on_tun(p)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    GC_TIMER.active = False
    return wall, cpu


def harness_cost(n: int = 200_000) -> dict[str, float]:
    """What the timed loops cost by themselves, per packet (not subtracted)."""
    items = [(b"", ("0.0.0.0", 0))] * n
    pkts = [b""] * n

    def nop2(a: bytes, b: Addr) -> None:
        pass

    def nop1(a: bytes) -> None:
        pass

    best1 = best2 = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for dg, src in items:
            nop2(dg, src)
        best2 = min(best2, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for p in pkts:
            nop1(p)
        best1 = min(best1, time.perf_counter() - t0)
    path, tun, sink = CountingPath(), FakeTun(), TunCount()
    tun.sink = sink.pending.append
    addr = ("198.18.0.1", 40000)
    t_path = t_tun = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for p in pkts:
            path.queue(p, addr)
        t_path = min(t_path, time.perf_counter() - t0)
        path.queued = []
        t0 = time.perf_counter()
        for p in pkts:
            tun.write(p)
        t_tun = min(t_tun, time.perf_counter() - t0)
        sink.pending.clear()
    return {"uplink_loop_us": best2 / n * 1e6, "downlink_loop_us": best1 / n * 1e6,
            "fake_path_queue_us": t_path / n * 1e6, "fake_tun_write_us": t_tun / n * 1e6}


class OthersCpu:
    """CPU seconds the rest of the machine used meanwhile: all non-idle time in /proc/stat
    minus this process and its waited-for children (the machine may be shared)."""

    def __init__(self) -> None:
        self.t0 = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float] | None:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = (sum(v) - v[3] - (v[4] if len(v) > 4 else 0)) / os.sysconf("SC_CLK_TCK")
        t = os.times()
        return busy, t.user + t.system + t.children_user + t.children_system

    def seconds(self) -> float | None:
        t1 = self._sample()
        if self.t0 is None or t1 is None:
            return None
        return max(0.0, (t1[0] - self.t0[0]) - (t1[1] - self.t0[1]))


# -- the measurements ---------------------------------------------------------------------

@dataclass
class Ctx:
    args: argparse.Namespace
    workdir: Path
    an_key: tuple[str, str]
    host_keys: list[tuple[str, str]]
    max_flows: int
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def rig(self, hosts: int) -> Rig:
        d = self.workdir / f"rig{hosts}"
        d.mkdir(exist_ok=True)
        return Rig(d, self.an_key, self.host_keys[:hosts], max_flows=self.max_flows,
                   plaintext=self.args.plaintext)

    def check(self, ok: bool, what: str) -> bool:
        if not ok:
            self.errors.append(what)
            print(f"    CHECK FAILED: {what}", file=sys.stderr)
        return ok


def snapshot_traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def setup_flows(ctx: Ctx, rig: Rig, n: int, label: str) -> float:
    """Feed ``n`` new flows (64 B) into ``rig`` (timed) and check they are all in the
    PAFT, on their host's tunnel, and written to the TUN."""
    items = rig.uplink(range(n), 64)
    before_tun, before_len = rig.tun_count.drain(), len(rig.fwd.paft)
    secs, _ = feed_uplink(rig, items)
    del items
    paft = rig.fwd.paft
    ctx.check(len(paft) - before_len == n,
              f"{label}: PAFT grew by {len(paft) - before_len}, expected {n}")
    got = rig.tun_count.drain() - before_tun
    ctx.check(got == n, f"{label}: {got} packets written to the TUN, expected {n}")
    ctx.check(not rig.drops(), f"{label}: drop counters moved: {rig.drops()}")
    return secs


FlowRow = tuple[tuple[int, bytes, bytes, int, int], int, int, int]   # key, tunnel, tx, rx
_PROTO = {"icmp": 1, "tcp": 6, "udp": 17}


def flow_rows(rig: Rig) -> list[FlowRow]:
    """Every flow of the anchor as (uplink 5-tuple, tunnel id, tx packets, rx packets):
    from ``paft.flows()`` when its entries have those attributes (``tables.Flow`` objects,
    or the views of the anchor's column table; fast), else from ``Anchor.status()`` (the
    public view; slower), so that these checks survive a new table layout."""
    flows = getattr(rig.fwd.paft, "flows", None)
    if callable(flows):
        try:
            rows = [(f.key, f.tunnel, f.tx_packets, f.rx_packets) for f in flows()]
            if all(isinstance(r[0], tuple) and len(r[0]) == 5 for r in rows[:10]):
                return rows
        except AttributeError:
            pass
    out: list[FlowRow] = []
    for f in rig.anchor.status()["flows"]:
        key = (_PROTO.get(f["protocol"], 0) or int(f["protocol"]),
               ipaddress.IPv4Address(f["src"]).packed, ipaddress.IPv4Address(f["dst"]).packed,
               int(f["sport"]), int(f["dport"]))
        out.append((key, f["tunnel"], f["tx_packets"], f["rx_packets"]))
    return out


def check_all_flows(ctx: Ctx, rig: Rig, n: int, label: str) -> None:
    tunnel_of = {r[0]: r[1] for r in flow_rows(rig)}
    missing = wrong = 0
    for i in range(n):
        tid = tunnel_of.get(rig.key(i))
        if tid is None:
            missing += 1
        elif tid != rig.flow(i)[0].tid:
            wrong += 1
    ctx.check(missing == 0 and wrong == 0,
              f"{label}: {missing} flows missing from the PAFT, {wrong} on a wrong tunnel")


def flow_counters(rig: Rig) -> tuple[int, int]:
    tx = rx = 0
    for _, _, t, r in flow_rows(rig):
        tx += t
        rx += r
    return tx, rx


Sub = tuple["Rig", int, str]        # (rig, flows in it, label)


def measure_uplink(ctx: Ctx, subs: list[Sub], size: int) -> list[dict[str, Any]]:
    """Uplink packets/s of each rig in ``subs``, their repetitions interleaved (a paired
    measurement: a slow phase of a shared machine hits all of them alike; many short
    repetitions, best one kept: some of them land in quiet moments)."""
    P, R = ctx.args.packets, ctx.args.repeat
    warm = min(P, 2000)
    st = [{"rates": [], "cpu_rates": [], "gc": [], "tx0": flow_counters(rig)[0],
           "tun0": rig.tun_count.drain(), "len0": len(rig.fwd.paft)} for rig, _, _ in subs]
    for rep in range(R + 1):          # the first, shorter round warms up (untimed)
        m = warm if rep == 0 else P
        for (rig, n, _), x in zip(subs, st, strict=True):
            start = rig.rr_next % n
            items = rig.uplink(((start + j) % n for j in range(m)), size)
            rig.rr_next = (start + m) % n
            GC_TIMER.reset()
            secs, cpu = feed_uplink(rig, items)
            rig.tun_count.drain()
            if rep:
                x["rates"].append(P / secs)
                x["cpu_rates"].append(P / max(cpu, 1e-9))
                x["gc"].append(GC_TIMER.total)
            del items
    out = []
    total = P * R + warm
    for (rig, _, label), x in zip(subs, st, strict=True):
        tx1 = flow_counters(rig)[0]
        written = rig.tun_count.drain() - x["tun0"]
        lab = f"{label} uplink {size} B"
        ok = ctx.check(written == total, f"{lab}: {written} of {total} packets written to the TUN")
        ok &= ctx.check(tx1 - x["tx0"] == total, f"{lab}: flows counted {tx1 - x['tx0']} of "
                        f"{total}")
        ok &= ctx.check(len(rig.fwd.paft) == x["len0"], f"{lab}: the PAFT changed size")
        ok &= ctx.check(not rig.drops(), f"{lab}: drop counters moved: {rig.drops()}")
        best = max(x["rates"])
        out.append({"pps": best, "us_per_pkt": 1e6 / best, "rates": x["rates"],
                    "cpu_pps": max(x["cpu_rates"]), "cpu_rates": x["cpu_rates"],
                    "gc_seconds": x["gc"], "packets": total, "written_to_tun": written,
                    "counted_by_flows": tx1 - x["tx0"], "ok": ok})
    return out


def measure_downlink(ctx: Ctx, subs: list[Sub], size: int) -> list[dict[str, Any]]:
    """Downlink packets/s of each rig in ``subs``, repetitions interleaved."""
    P, R = ctx.args.packets, ctx.args.repeat
    warm = min(P, 2000)
    st: list[dict[str, Any]] = []
    for rig, n, _ in subs:
        want: Counter[Addr] = Counter()
        for j in range(P):
            want[rig.flow(j % n)[0].addr] += R
        for j in range(warm):
            want[rig.flow(j % n)[0].addr] += 1
        rig.path.flush()
        st.append({"pkts": rig.downlink(((j % n) for j in range(P)), size), "want": want,
                   "sent0": Counter(rig.path.sent), "rx0": flow_counters(rig)[1],
                   "rates": [], "cpu_rates": [], "gc": []})
    for rep in range(R + 1):          # the first, shorter round warms up (untimed)
        for (rig, _, _), x in zip(subs, st, strict=True):
            GC_TIMER.reset()
            secs, cpu = feed_downlink(rig, x["pkts"][:warm] if rep == 0 else x["pkts"])
            rig.path.flush()
            if rep:
                x["rates"].append(P / secs)
                x["cpu_rates"].append(P / max(cpu, 1e-9))
                x["gc"].append(GC_TIMER.total)
    out = []
    total = P * R + warm
    for (rig, _, label), x in zip(subs, st, strict=True):
        rx1 = flow_counters(rig)[1]
        got = rig.path.sent - x["sent0"]
        lab = f"{label} downlink {size} B"
        ok = ctx.check(got == x["want"], f"{lab}: sent {sum(got.values())} datagrams to "
                       f"{len(got)} addresses, expected {total} to {len(x['want'])} host "
                       "addresses")
        ok &= ctx.check(rx1 - x["rx0"] == total, f"{lab}: {rx1 - x['rx0']} of {total} "
                        "packets hit their flow in the PAFT")
        ok &= ctx.check(not rig.drops(), f"{lab}: drop counters moved: {rig.drops()}")
        best = max(x["rates"])
        out.append({"pps": best, "us_per_pkt": 1e6 / best, "rates": x["rates"],
                    "cpu_pps": max(x["cpu_rates"]), "cpu_rates": x["cpu_rates"],
                    "gc_seconds": x["gc"], "packets": total,
                    "sent_to_hosts": sum(got.values()), "flow_hits": rx1 - x["rx0"], "ok": ok})
    return out


def scenario(ctx: Ctx, n: int, hosts: int, breakdown: bool, base: Sub | None
             ) -> tuple[dict[str, Any], Rig]:
    """One row. ``base``: the baseline rig of the same host count (its fewest flows: one,
    or one per host), measured again next to this one (interleaved) for the ratios."""
    label = f"{n} flows x {hosts} hosts"
    print(f"  {label} ...", file=sys.stderr, flush=True)
    others, t_row = OthersCpu(), time.perf_counter()
    row: dict[str, Any] = {"flows": n, "hosts": hosts, "hosts_with_flows": min(n, hosts),
                           "flows_per_host_max": -(-n // hosts)}
    # rep 0, untimed, under tracemalloc: bytes per flow from 0 to n flows
    t_build = time.perf_counter()
    rig = ctx.rig(hosts)
    row["rig_build_s"] = time.perf_counter() - t_build
    if rig.cap_note and rig.cap_note not in ctx.notes:
        ctx.notes.append(rig.cap_note)
    items = rig.uplink(range(n), 64)
    rig.tun.sink = rig.tun_count          # keeps no packet alive while tracing
    tracemalloc.start(1)
    traced0 = snapshot_traced()
    snap0 = tracemalloc.take_snapshot() if breakdown else None
    feed_uplink(rig, items)
    after = snapshot_traced()
    snap1 = tracemalloc.take_snapshot() if breakdown else None
    tracemalloc.stop()
    del items
    ctx.check(len(rig.fwd.paft) == n and rig.tun_count.n == n,
              f"{label} (tracemalloc run): PAFT holds {len(rig.fwd.paft)} flows, "
              f"{rig.tun_count.n} packets written to the TUN, expected {n}")
    row["memory"] = {"traced_bytes": after - traced0,
                     "bytes_per_flow": (after - traced0) / n}
    if snap0 is not None and snap1 is not None:
        row["memory"]["by_line"] = by_line(snap0, snap1, n)
    del snap0, snap1, rig
    gc.collect()
    # timed setup repetitions, each on a fresh anchor
    rates, gc_s, rig_last = [], [], None
    for rep in range(ctx.args.setup_repeat):
        rig_last = None
        gc.collect()
        rig = ctx.rig(hosts)
        GC_TIMER.reset()
        secs = setup_flows(ctx, rig, n, f"{label} setup #{rep + 1}")
        rates.append(n / secs)
        gc_s.append(GC_TIMER.total)
        rig_last = rig
    assert rig_last is not None
    rig = rig_last
    check_all_flows(ctx, rig, n, f"{label} setup")
    best = max(rates)
    row["setup"] = {"flows_per_s": best, "us_per_flow": 1e6 / best, "rates": rates,
                    "gc_seconds": gc_s, "gc_share_best": gc_s[rates.index(best)] * best / n,
                    "inner_size": 64}
    row["paft_len"] = len(rig.fwd.paft)
    row["flows_in_paft"] = sum(1 for _, tid, _, _ in flow_rows(rig)
                               if rig.fwd.tunnels.get(tid) is not None)
    # forwarding with n flows in the tables (and the baseline rig again, interleaved)
    subs: list[Sub] = [(rig, n, label)] + ([base] if base is not None else [])
    row["uplink"], row["downlink"], row["paired_base"] = {}, {}, {}
    if base is not None:
        row["paired_base"]["flows"] = base[1]
    for d, fn in (("uplink", measure_uplink), ("downlink", measure_downlink)):
        for size in (64, 1400):
            res = fn(ctx, subs, size)
            row[d][str(size)] = res[0]
            if base is not None:
                row["paired_base"][f"{d}_{size}"] = res[1]["pps"]
                row["paired_base"][f"{d}_{size}_cpu"] = res[1]["cpu_pps"]
                row["paired_base"][f"{d}_{size}_rates"] = res[1]["rates"]
    if breakdown:       # steady state: the flows have carried traffic both ways
        row["memory"]["objects"] = object_walk(rig, n)
    row["drops"] = rig.drops()
    row["written_to_tun_total"] = rig.tun_count.drain()
    row["sent_to_host_addrs_total"] = sum(rig.path.sent[h.addr] for h in rig.hosts)
    row["seconds"] = time.perf_counter() - t_row
    row["others_cpu_s"] = others.seconds()
    u, d = row["uplink"], row["downlink"]
    print(f"    setup {best:,.0f}/s  up {u['64']['pps']:,.0f}/{u['1400']['pps']:,.0f} pps  "
          f"down {d['64']['pps']:,.0f}/{d['1400']['pps']:,.0f} pps  "
          f"{row['memory']['bytes_per_flow']:,.0f} B/flow", file=sys.stderr, flush=True)
    return row, rig


# -- memory breakdown ---------------------------------------------------------------------

def by_line(snap0: tracemalloc.Snapshot, snap1: tracemalloc.Snapshot, n: int
            ) -> list[dict[str, Any]]:
    out = []
    for st in snap1.compare_to(snap0, "lineno"):
        if st.size_diff <= 0:
            continue
        fr = st.traceback[0]
        fn = fr.filename
        short = fn.split("/src/", 1)[-1] if "/src/" in fn else os.path.basename(fn)
        out.append({"where": f"{short}:{fr.lineno}",
                    "code": linecache.getline(fn, fr.lineno).strip()[:90],
                    "bytes_per_flow": st.size_diff / n, "blocks_per_flow": st.count_diff / n})
    out.sort(key=lambda r: -r["bytes_per_flow"])
    return out


_CONTAINERS = (tuple, list, deque, set, frozenset)


def _slot_names(obj: Any) -> list[str]:
    names: list[str] = []
    for cls in type(obj).__mro__:
        s = cls.__dict__.get("__slots__", ())
        names.extend([s] if isinstance(s, str) else s)
    if hasattr(obj, "__dict__"):
        names.extend(vars(obj))
    return [n for n in names if not n.startswith("__")]


def _walk(obj: Any, path: str, depth: int, out: list[tuple[str, int, int, bool]],
          seen: set[int]) -> None:
    """(path, id, size, GC-tracked) of ``obj`` and what it holds (containers, objects
    with slots or a __dict__), ``depth`` levels down."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    out.append((path, id(obj), sys.getsizeof(obj), gc.is_tracked(obj)))
    if depth <= 0:
        return
    if isinstance(obj, _CONTAINERS):
        for j, v in enumerate(obj):
            sub = f"{path}[{j}]" if isinstance(obj, tuple) and len(obj) <= 8 else f"{path}[]"
            _walk(v, sub, depth - 1, out, seen)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _walk(k, f"{path}{{key}}", depth - 1, out, seen)
            _walk(v, f"{path}{{value}}", depth - 1, out, seen)
    elif not isinstance(obj, (int, float, str, bytes, bool, type(None), array)):
        for name in _slot_names(obj):
            with contextlib.suppress(AttributeError):
                _walk(getattr(obj, name), f"{path}.{name}", depth - 1, out, seen)


def _per_flow_containers(owner: Any, n: int) -> list[tuple[str, Any]]:
    out = []
    for name in _slot_names(owner):
        v = getattr(owner, name, None)
        if isinstance(v, (dict, list, set, array, bytearray)) and len(v) >= max(1, n // 2):
            out.append((name, v))
    return out


def object_walk(rig: Rig, n: int, sample: int = 2000) -> dict[str, Any]:
    """What one flow costs, by part (sys.getsizeof over sampled flows), whatever the
    table's layout: every container of the PAFT (and forwarder) holding about one entry
    per flow counts with its own size / N; the entries of the largest dict among them
    (key and value, 3 levels deep) are walked. An object reached from more than one
    sampled entry (a shared string, a cached small int, None) counts once for the whole
    sample, i.e. nothing per flow."""
    fwd = rig.fwd
    conts = [(f"paft.{k}", v) for k, v in _per_flow_containers(fwd.paft, n)]
    conts += [(f"fwd.{k}", v) for k, v in _per_flow_containers(fwd, n)
              if all(v is not c for _, c in conts)]
    tables = [{"table": name, "type": type(v).__name__, "entries": len(v),
               "bytes": sys.getsizeof(v),
               "bytes_per_flow": sys.getsizeof(v) / n} for name, v in conts]
    dicts = [(name, v) for name, v in conts if isinstance(v, dict)]
    res: dict[str, Any] = {"tables": tables,
                           "tables_bytes_per_flow": sum(t["bytes_per_flow"] for t in tables)}
    if not dicts:
        res.update(sample_flows=0, parts=[], objects_bytes_per_flow=0.0,
                   objects_alloc_bytes_per_flow=0.0, gc_tracked_per_flow=0.0,
                   note="no per-flow dict in the PAFT: containers only")
        return res
    primary_name, primary = max(dicts, key=lambda x: len(x[1]))
    items = list(primary.items())
    picked = items[::max(1, len(items) // sample)][:sample]
    refs: Counter[int] = Counter()
    per_flow: list[list[tuple[str, int, int, bool]]] = []
    # a dict of rows (the column layout) maps keys to row numbers: name them so
    value_name = "row number (dict value)" if isinstance(picked[0][1], int) else ""
    for key, value in picked:
        out: list[tuple[str, int, int, bool]] = []
        seen: set[int] = set()
        _walk(value, value_name or type(value).__name__, 3, out, seen)
        _walk(key, f"key ({type(key).__name__})", 2, out, seen)
        per_flow.append(out)
        for _, oid, _, _ in out:
            refs[oid] += 1
    m = len(picked)
    size: Counter[str] = Counter()
    count: Counter[str] = Counter()
    alloc: Counter[str] = Counter()
    tracked = 0
    for out in per_flow:
        for path, oid, sz, gct in out:
            if refs[oid] != 1:
                continue
            size[path] += sz
            count[path] += 1
            # pymalloc hands out 16-byte multiples (sizes <= 512): what the heap spends
            alloc[path] += (sz + 15) // 16 * 16 if sz <= 512 else sz
            tracked += gct
    rows = [{"part": p, "bytes_per_flow": size[p] / m, "objects_per_flow": count[p] / m,
             "alloc_bytes_per_flow": alloc[p] / m} for p in size]
    rows.sort(key=lambda r: -r["bytes_per_flow"])
    res.update(sample_flows=m, walked=primary_name, parts=rows,
               objects_bytes_per_flow=sum(r["bytes_per_flow"] for r in rows),
               objects_alloc_bytes_per_flow=sum(r["alloc_bytes_per_flow"] for r in rows),
               gc_tracked_per_flow=tracked / m)
    if all(hasattr(v, "key") for _, v in picked):      # entries are flow objects
        res["paft_key_is_flow_key"] = all(k is v.key for k, v in picked)
    return res


def rss_kb(pid: int | str = "self") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for ln in f:
                if ln.startswith("VmRSS:"):
                    return int(ln.split()[1])
    except OSError:
        return None
    return None


def rss_probe(n: int, hosts: int, plaintext: bool) -> dict[str, Any]:
    """In a fresh process: RSS growth from 0 to ``n`` flows (the cross-check)."""
    with tempfile.TemporaryDirectory(prefix="anchor-scale-") as d:
        an_key = keys.keypair()
        hk = [keys.keypair() for _ in range(hosts)]
        rig = Rig(Path(d), an_key, hk, max_flows=n, plaintext=plaintext)
        items = rig.uplink(range(n), 64)
        rig.tun.sink = rig.tun_count          # counts, keeps no packet alive (as tracemalloc's)
        gc.collect()
        before = rss_kb()
        feed_uplink(rig, items)
        gc.collect()
        after = rss_kb()
        ok = len(rig.fwd.paft) == n
        return {"flows": n, "hosts": hosts, "rss_before_kb": before, "rss_after_kb": after,
                "bytes_per_flow": None if before is None or after is None
                else (after - before) * 1024 / n, "paft_len": len(rig.fwd.paft), "ok": ok}


def run_rss_probe(ctx: Ctx, n: int, hosts: int) -> dict[str, Any]:
    cmd = [sys.executable, str(HERE), "--rss-probe", f"{n},{hosts}"]
    if ctx.args.plaintext:
        cmd.append("--plaintext")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    try:
        res: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": "no result"}
    ctx.check(bool(res.get("ok")), f"RSS probe {n} flows x {hosts} hosts: PAFT holds "
              f"{res.get('paft_len')}")
    return res


# -- agent side ---------------------------------------------------------------------------

def agent_side(ctx: Ctx, n: int) -> dict[str, Any]:
    """Bytes per flow of an AgentForwarder's PAFT going from 0 to ``n`` flows (its uplink
    from the TUN, sealed to an anchor over a session from a real handshake)."""
    from upmt_tun.dataplane.forwarder import AgentForwarder, FlowClass
    from upmt_tun.signalling.handshake import Responder

    an_priv = base64.b64decode(ctx.an_key[0])
    mh_priv, mh_pub = (base64.b64decode(x) for x in ctx.host_keys[0])
    r = Responder(an_priv, {mh_pub: "h0000"})
    init = Initiation(static=mh_priv, remote_static=base64.b64decode(ctx.an_key[1]),
                      local_index=1234, wall_ns=1_700_000_000 * 10**9)
    acc = r.accept(init.packet, 0.0, lambda: 4321)
    s = init.consume(acc.response, 0.0, "an1") if acc is not None else None
    if s is None:
        return {"error": "handshake failed"}
    via = ("wan1", "wan2")

    def classify(key: Any) -> Any:      # as the agent's: a FlowClass per flow, its app_src
        return FlowClass("web", via, None, f"10.1.0.{2 + key[3] % 200}")

    vipa_fix = "100.64.0.1"
    agent = AgentForwarder(vipa_fix, list(via), ["an1"], classify)
    t = agent.add_tunnel("wan1", 0, "an1", ("10.1.0.2", 40000), LISTEN, 0.0)
    agent.set_association("an1", "100.100.0.2", "anchor", frozenset())
    agent.tunnel_up(t, un_tid=1, now=0.0)
    agent.add_session("an1", s)
    if isinstance(getattr(agent.paft, "cap", None), int) and agent.paft.cap < n:
        agent.paft.cap = n
    fix = ipaddress.IPv4Address(vipa_fix).packed
    pkts = []
    for k in range(n):
        dst, sport, dport = flow_far_end(k)
        pkts.append(ip_udp(fix, dst, sport, dport, 64))
    clock = [5.0]
    tracemalloc.start(1)
    base = snapshot_traced()
    t0 = time.perf_counter()
    sent = 0
    for p in pkts:
        if agent.from_tun(p, clock[0] + 0.0) is not None:
            sent += 1
    secs = time.perf_counter() - t0
    after = snapshot_traced()
    tracemalloc.stop()
    ctx.check(len(agent.paft) == n and sent == n,
              f"agent side: {len(agent.paft)} flows in its PAFT, {sent} sealed, expected {n}")
    return {"flows": n, "bytes_per_flow": (after - base) / n, "paft_len": len(agent.paft),
            "sealed": sent, "setup_flows_per_s_under_tracemalloc": n / secs}


# -- idle RSS (netns) ---------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out



def python_process(pid: int) -> int:
    """The Python process of a daemon started as ``ip netns exec ... upmt-agent``: ``ip``
    normally execs into it (same pid); else it is a descendant."""
    todo, seen = [pid], set()
    while todo:
        p = todo.pop(0)
        if p in seen:
            continue
        seen.add(p)
        try:
            exe = os.path.basename(os.readlink(f"/proc/{p}/exe"))
        except OSError:
            exe = ""
        if exe.startswith("python"):
            return p
        todo += _children(p)
    return pid


def bare_import_rss(code: str) -> int | None:
    prog = (f"{code}\nfor ln in open('/proc/self/status'):\n"
            "    if ln.startswith('VmRSS:'): print(ln.split()[1])")
    try:
        r = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True,
                           timeout=60)
        return int(r.stdout.split()[-1]) if r.returncode == 0 else None
    except (subprocess.SubprocessError, OSError, ValueError, IndexError):
        return None


def idle_rss(ctx: Ctx) -> dict[str, Any]:
    out: dict[str, Any] = {
        "bare_python_kb": bare_import_rss("pass"),
        "bare_import_agent_kb": bare_import_rss("import upmt_tun.agent, upmt_tun.runtime"),
        "bare_import_anchor_kb": bare_import_rss("import upmt_tun.anchor, upmt_tun.runtime"),
    }
    if ctx.args.no_netns:
        out["skipped"] = "--no-netns"
        return out
    try:
        from upmt_tun.lab import Lab, LabError
        from upmt_tun.testbed import Topology, tool_missing
    except ImportError as e:
        out["skipped"] = f"cannot import the testbed: {e}"
        return out
    why = None
    if os.geteuid() != 0:
        why = "needs root"
    elif not os.path.exists("/dev/net/tun"):
        why = "needs /dev/net/tun"
    elif tool_missing("ip", "nft"):
        why = f"needs {', '.join(tool_missing('ip', 'nft'))}"
    if why:
        out["skipped"] = why
        print(f"  idle RSS: skipped ({why})", file=sys.stderr)
        return out
    print(f"  idle RSS: agent + anchor in the netns testbed, {IDLE_SECONDS:.0f} s idle ...",
          file=sys.stderr, flush=True)
    topo = Topology()
    lab = None
    try:
        topo.up()
        lab = Lab(topo, ctx.workdir / "lab").start()
        time.sleep(IDLE_SECONDS)
        for key in ("agent", "anchor0"):
            p = lab.procs.get(key)
            if p is None:
                continue
            pid = python_process(p.pid)
            st: dict[str, int] = {}
            with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
                for ln in f:
                    if ln.startswith(("VmRSS:", "VmHWM:", "RssAnon:", "RssFile:")):
                        st[ln.split(":")[0]] = int(ln.split()[1])
            out[key] = {"popen_pid": p.pid, "pid": pid, "cmdline": proc_cmdline(pid)[:200],
                        "rss_kb": st.get("VmRSS"), "hwm_kb": st.get("VmHWM"),
                        "rss_anon_kb": st.get("RssAnon"), "rss_file_kb": st.get("RssFile"),
                        "alive": p.poll() is None}
        ag = out.get("agent", {})
        ctx.check(bool(ag.get("alive")) and ag.get("rss_kb") is not None,
                  "idle RSS: the agent is not running / its RSS is unreadable")
        out["exit_codes"] = lab.stop()
        lab = None
    except (LabError, RuntimeError, OSError, subprocess.SubprocessError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        out["error"] = msg
        ctx.errors.append(f"idle RSS: {msg}")
        print(f"  idle RSS: error: {msg}", file=sys.stderr)
    finally:
        if lab is not None:
            with contextlib.suppress(Exception):
                lab.stop()
        with contextlib.suppress(Exception):
            topo.down()
    return out


# -- reporting ----------------------------------------------------------------------------

def k(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rate with N flows / rate of the baseline rig of the same host count (1 flow, or one
    per host), measured in the same run, interleaved with it (``paired_base``)."""
    out = []
    for r in sorted(rows, key=lambda x: (x["hosts"], x["flows"])):
        pb = r.get("paired_base")
        if not pb:
            continue
        ent: dict[str, Any] = {"flows": r["flows"], "hosts": r["hosts"],
                               "baseline_flows": pb["flows"]}
        for d in ("uplink", "downlink"):
            for s in ("64", "1400"):
                ent[f"{d}_{s}"] = r[d][s]["pps"] / pb[f"{d}_{s}"]
                ent[f"{d}_{s}_cpu"] = r[d][s]["cpu_pps"] / pb[f"{d}_{s}_cpu"]
                pairs = [a / b for a, b in zip(r[d][s]["rates"], pb[f"{d}_{s}_rates"],
                                               strict=False)]
                ent[f"{d}_{s}_median_pair"] = statistics.median(pairs) if pairs else None
        ent["min"] = min(ent[f"{d}_{s}"] for d in ("uplink", "downlink") for s in ("64", "1400"))
        ent["min_cpu"] = min(ent[f"{d}_{s}_cpu"] for d in ("uplink", "downlink")
                             for s in ("64", "1400"))
        out.append(ent)
    return out


def machine() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                     "?")
    return {"nproc": os.cpu_count(), "cpu": model, "kernel": platform.release(),
            "python": platform.python_version()}


def _code(x: dict[str, Any]) -> str:
    if x["where"].startswith("anchor_scale.py"):
        return "(the anchor's clock(): a float per call, kept where a flow stores it as is)"
    return str(x["code"])


def print_breakdown(bd: dict[str, Any], full: bool) -> None:
    ob = bd["objects"]
    walk_total = ob["objects_bytes_per_flow"] + ob["tables_bytes_per_flow"]
    walk_alloc = ob["objects_alloc_bytes_per_flow"] + ob["tables_bytes_per_flow"]
    rss = bd.get("rss") or {}
    rss_txt = f"{rss['bytes_per_flow']:,.0f}" if rss.get("bytes_per_flow") is not None else "-"
    print(f"\nmemory per flow at the anchor, {bd['flows']:,} flows x {bd['hosts']} host(s) "
          f"(goal <= {GOAL_BYTES_PER_FLOW} B): tracemalloc {bd['bytes_per_flow']:,.0f} B "
          f"(0 -> N flows); object walk {walk_total:,.0f} B ({walk_alloc:,.0f} B as pymalloc "
          f"allocates it); RSS growth {rss_txt} B (fresh process)")
    if not full:
        return
    print("  by allocating source line (tracemalloc, while the flows were set up):")
    print(textwrap.indent(render(
        ["where", "B/flow", "blocks/flow", "code"],
        [[x["where"], k(x["bytes_per_flow"], 1), f"{x['blocks_per_flow']:.2f}", _code(x)[:72]]
         for x in bd["by_line"] if x["bytes_per_flow"] >= 0.5][:14]), "    "))
    print(f"  by object (sys.getsizeof, {ob['sample_flows']:,} sampled entries of "
          f"{ob.get('walked', '-')} after the forwarding tests; alloc = rounded up to "
          "pymalloc's 16-byte sizes; dicts and arrays: their size / N):")
    print(textwrap.indent(render(
        ["part", "B/flow", "alloc B/flow", "objects/flow"],
        [[x["part"], k(x["bytes_per_flow"], 1), k(x["alloc_bytes_per_flow"], 1),
          f"{x['objects_per_flow']:.2f}"] for x in ob["parts"]]
        + [[f"{t.get('type', '')} {t['table']} ({t['entries']:,} entries)",
            k(t["bytes_per_flow"], 1),
            k(t["bytes_per_flow"], 1), "-"] for t in ob["tables"]]
        + [["total", k(walk_total, 1), k(walk_alloc, 1), "-"]]), "    "))
    if ob.get("note"):
        print(f"  ({ob['note']})")
    print(f"  GC-tracked objects per flow: {ob['gc_tracked_per_flow']:.1f}"
          + (f"; the PAFT key is the Flow's own key object: {ob['paft_key_is_flow_key']}"
             if "paft_key_is_flow_key" in ob else ""))


def print_report(res: dict[str, Any]) -> None:
    m, meta = res["meta"]["machine"], res["meta"]
    print(f"\nanchor scale: {m['cpu']}, nproc {m['nproc']}, Python {m['python']}; "
          f"loadavg {meta['loadavg_start'].split()[0]} at start, "
          f"{meta['loadavg_end'].split()[0]} at end; other processes used "
          f"{k(meta['others_cpu_s'], 1)} CPU s during the {meta['seconds']:.0f} s run")
    src = meta["source"]
    print(f"source: commit {src['commit']}" + (
        f", uncommitted changes in {', '.join(src['src_changes'])}" if src["src_changes"]
        else ""))
    mode = "plaintext DATA (insecure_plaintext_for_benchmarks)" if meta["plaintext"] \
        else "sealed DATA (AES-256-GCM)"
    print(f"{mode}; forwarding: best of {meta['repeat']} x {meta['packets']:,} packets after "
          f"a warm-up; setup: best of {meta['setup_repeat']} fresh anchors, 64-byte packets. "
          "Cyclic GC ON while timing (the daemon runs with it); 'setup gc' = its share of "
          "the setup time. Flow i belongs to host i % hosts; a row with fewer flows than "
          "hosts has one flow per host.")
    hc = meta["harness"]
    print(f"harness per packet (included, not subtracted): loop {hc['uplink_loop_us']:.3f} us,"
          f" fake path queue {hc['fake_path_queue_us']:.3f} us, fake TUN write "
          f"{hc['fake_tun_write_us']:.3f} us")
    body = []
    for r in res["scenarios"]:
        u, d = r["uplink"], r["downlink"]
        body.append([k(r["flows"]), k(r["hosts"]),
                     k(r["setup"]["flows_per_s"]) + ("*" if r["flows"] <= r["hosts"] else ""),
                     f"{100 * r['setup']['gc_share_best']:.0f} %",
                     k(u["64"]["pps"]), k(u["1400"]["pps"]), k(d["64"]["pps"]),
                     k(d["1400"]["pps"]), k(r["memory"]["bytes_per_flow"]),
                     "-" if r.get("others_cpu_s") is None
                     else f"{100 * r['others_cpu_s'] / r['seconds']:.0f} %"])
    print()
    print(render(["flows", "hosts", "setup flows/s", "setup gc", "up pps 64 B",
                  "up pps 1400 B", "down pps 64 B", "down pps 1400 B", "B/flow", "others"],
                 body))
    print("* one packet per host timed: first-flow latency more than a rate. B/flow: "
          "tracemalloc, 0 -> N flows, right after setup (small N: includes the tables' "
          "first allocation). others: CPU the rest of the machine used during that row, in % "
          "of one CPU (a busy machine makes the rates noisy)")
    if res["ratios"]:
        print(f"\nrate with N flows / rate with the baseline's flows, same hosts (goal >= "
              f"{GOAL_RATIO_10K} at 10,000 flows)")
        print(render(["flows", "hosts", "baseline", "up 64", "up 1400", "down 64", "down 1400",
                      "min", "min (CPU time)"],
                     [[k(x["flows"]), k(x["hosts"]), k(x["baseline_flows"]),
                       *(f"{x[c]:.2f}" for c in ("uplink_64", "uplink_1400", "downlink_64",
                                                 "downlink_1400", "min", "min_cpu"))]
                      for x in res["ratios"]]))
        print("baseline: the same host count's anchor with 1 flow (1 host) or one flow per "
              "host, measured interleaved with it (paired); 'CPU time': the same from "
              "time.process_time(), which a busy machine disturbs less (time this process did "
              "not run is not counted)")
    mem = res["memory"]
    for i, bd in enumerate(mem.get("breakdowns", [])):
        print_breakdown(bd, full=i == 0)
    for p in mem.get("rss", []):
        if "error" in p:
            print(f"  RSS cross-check: error: {p['error']}")
        elif p.get("bytes_per_flow") is not None:
            print(f"  RSS cross-check (fresh process, {p['flows']:,} flows x {p['hosts']} "
                  f"hosts): {p['rss_before_kb']:,} -> {p['rss_after_kb']:,} kB = "
                  f"{p['bytes_per_flow']:,.0f} B/flow")
    ag = res.get("agent_side")
    if ag:
        if "error" in ag:
            print(f"\nagent side: error: {ag['error']}")
        else:
            print(f"\nagent side: {ag['bytes_per_flow']:,.0f} B/flow in AgentForwarder with "
                  f"{ag['flows']:,} flows (tracemalloc, 0 -> N flows through from_tun)")
    ir = res.get("idle_rss", {})
    if ir:
        print(f"\nidle RSS: bare python {k(ir.get('bare_python_kb'))} kB, "
              f"`import upmt_tun.agent, upmt_tun.runtime` {k(ir.get('bare_import_agent_kb'))}"
              f" kB, `import upmt_tun.anchor, upmt_tun.runtime` "
              f"{k(ir.get('bare_import_anchor_kb'))} kB")
        if "skipped" in ir:
            print(f"  agent in the testbed: skipped ({ir['skipped']})")
        elif "error" in ir:
            print(f"  agent in the testbed: error: {ir['error']}")
        for key in ("agent", "anchor0"):
            if key in ir:
                x = ir[key]
                print(f"  {key} after {IDLE_SECONDS:.0f} s idle: VmRSS {k(x['rss_kb'])} kB "
                      f"(anon {k(x['rss_anon_kb'])}, file {k(x['rss_file_kb'])}, peak "
                      f"{k(x['hwm_kb'])}), pid {x['pid']}"
                      + (f" (child of {x['popen_pid']})" if x["pid"] != x["popen_pid"] else ""))
    goals = res.get("goals", {})
    if goals:
        print("\ngoals:")
        for name, g in goals.items():
            print(f"  {name}: {g}")
    if res["notes"]:
        print("\nnotes:", *res["notes"], sep="\n  ")
    if res["errors"]:
        print("\nerrors:", *res["errors"], sep="\n  ")


def goals(out: dict[str, Any]) -> dict[str, str]:
    g: dict[str, str] = {}
    at10k = [x for x in out["ratios"] if x["flows"] == 10_000]
    if at10k:
        worst = min(at10k, key=lambda x: x["min"])
        worst_c = min(at10k, key=lambda x: x["min_cpu"])
        g["rate at 10,000 flows >= 0.9 x 1 flow"] = (
            f"{'met' if worst['min'] >= GOAL_RATIO_10K else 'missed'} (worst ratio "
            f"{worst['min']:.2f}, {worst['hosts']} hosts; by CPU time "
            f"{worst_c['min_cpu']:.2f}, {worst_c['hosts']} hosts)")
    big = [r for r in out["scenarios"] if r["flows"] == 100_000]
    if big:
        worst_b = max(r["memory"]["bytes_per_flow"] for r in big)
        g[f"<= {GOAL_BYTES_PER_FLOW} B/flow at 100,000 flows"] = (
            f"{'met' if worst_b <= GOAL_BYTES_PER_FLOW else 'missed'} ({worst_b:,.0f} B/flow "
            "tracemalloc)")
    ag = (out.get("idle_rss") or {}).get("agent") or {}
    if ag.get("rss_kb"):
        mb = ag["rss_kb"] / 1024
        g[f"idle agent < {GOAL_IDLE_AGENT_MB} MB"] = (
            f"{'met' if mb < GOAL_IDLE_AGENT_MB else 'missed'} ({mb:.1f} MB VmRSS)")
    return g


# -- main ---------------------------------------------------------------------------------

def int_list(s: str) -> list[int]:
    try:
        out = [int(x.replace("_", "")) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {s!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError("numbers must be >= 1")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flows", type=int_list, default=None,
                   help="flow counts (default 1,1000,10000,100000)")
    p.add_argument("--hosts", type=int_list, default=None, help="host counts (default 1,10,200)")
    p.add_argument("--packets", type=int, default=None,
                   help="packets per forwarding repetition (5000)")
    p.add_argument("--repeat", type=int, default=None, help="forwarding repetitions (16)")
    p.add_argument("--setup-repeat", type=int, default=None,
                   help="timed setup repetitions, each on a fresh anchor (2)")
    p.add_argument("--quick", action="store_true",
                   help="small sizes (a smoke run, < 20 s; numbers mean little)")
    p.add_argument("--no-netns", action="store_true", help="skip the idle-RSS part (root)")
    p.add_argument("--no-agent", action="store_true", help="skip the agent-side memory part")
    p.add_argument("--plaintext", action="store_true",
                   help="insecure_plaintext_for_benchmarks on both ends (DATA unsealed)")
    p.add_argument("--json", type=Path, default=None,
                   help="where to save the results (benchmarks/results/anchor_scale-<ts>.json)")
    p.add_argument("--workdir", type=Path, default=None, help="configs and lab files (a temp dir)")
    p.add_argument("--rss-probe", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.flows = a.flows or [1, 100, 1000]
        a.hosts = a.hosts or [1, 3]
        a.packets = a.packets or 500
        a.repeat = a.repeat or 2
        a.setup_repeat = a.setup_repeat or 1
    a.flows = sorted(set(a.flows or [1, 1000, 10_000, 100_000]))
    a.hosts = sorted(set(a.hosts or [1, 10, 200]))
    a.packets = a.packets or 5_000
    a.repeat = a.repeat or 16
    a.setup_repeat = a.setup_repeat or 2
    if min(a.packets, a.repeat, a.setup_repeat) < 1:
        p.error("counts must be >= 1")
    if max(a.flows) > 10_000_000 or max(a.hosts) > 60_000:
        p.error("at most 10,000,000 flows and 60,000 hosts")
    return a


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    for name in ("upmt_tun", "aiosipua"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    gc.callbacks.append(GC_TIMER)
    max_flows = max(args.flows)
    print(f"anchor scale: flows {args.flows} x hosts {args.hosts}; generating "
          f"{max(args.hosts) + 1} key pairs ...", file=sys.stderr, flush=True)
    ctx = Ctx(args, workdir, keys.keypair(), [keys.keypair() for _ in range(max(args.hosts))],
              max_flows)
    t_start = time.perf_counter()
    harness = harness_cost()
    rows = []
    big = max(args.flows)
    for hosts in args.hosts:
        base: Sub | None = None
        done: set[int] = set()
        for req in args.flows:
            n = max(req, hosts)        # fewer flows than hosts: one flow per host
            if n in done:
                ctx.notes.append(f"{req} flows x {hosts} hosts: same as {n} flows, skipped")
                continue
            if n != req:
                ctx.notes.append(f"{req} flow(s) x {hosts} hosts measured as {n} flows, one "
                                 "per host (every host active)")
            done.add(n)
            breakdown = n == big and n > 1 and hosts in (min(args.hosts), max(args.hosts))
            row, rig = scenario(ctx, n, hosts, breakdown, base)
            row["flows_requested"] = req
            rows.append(row)
            if base is None:
                base = (rig, n, f"{n} flows x {hosts} hosts (the paired baseline)")
            del rig
            gc.collect()
    breakdowns = []
    for r in rows:
        if "by_line" in r["memory"]:
            breakdowns.append({"flows": r["flows"], "hosts": r["hosts"],
                               "bytes_per_flow": r["memory"]["bytes_per_flow"],
                               "by_line": r["memory"].pop("by_line"),
                               "objects": r["memory"].pop("objects")})
    print("  RSS cross-check in a fresh process ...", file=sys.stderr, flush=True)
    rss = [run_rss_probe(ctx, big, h) for h in sorted({min(args.hosts), max(args.hosts)})]
    for b in breakdowns:
        b["rss"] = next((x for x in rss if x.get("hosts") == b["hosts"]), None)
    agent = None
    if not args.no_agent:
        print("  agent side ...", file=sys.stderr, flush=True)
        agent = agent_side(ctx, min(big, 100_000))
    in_process_s = time.perf_counter() - t_start
    idle = idle_rss(ctx)
    out: dict[str, Any] = {
        "scenarios": rows, "ratios": ratios(rows),
        "memory": {"breakdowns": breakdowns, "rss": rss,
                   "goal_bytes_per_flow": GOAL_BYTES_PER_FLOW},
        "agent_side": agent, "idle_rss": idle, "harness": harness,
        "in_process_seconds": in_process_s, "errors": ctx.errors, "notes": ctx.notes}
    out["goals"] = goals(out)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rss_probe:
        n, h = (int(x) for x in args.rss_probe.split(","))
        for name in ("upmt_tun", "aiosipua"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        try:
            print(json.dumps(rss_probe(n, h, args.plaintext)))
        except BenchError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path: Path = args.json or RESULTS_DIR / f"anchor_scale-{stamp}.json"
    try:
        json_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: cannot create {json_path.parent}: {e.strerror}", file=sys.stderr)
        return 2
    interruptible()
    load_start, source = loadavg(), source_version()
    others = OthersCpu()
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="anchor-scale-")
        workdir = Path(tmp.name)
    else:
        workdir = args.workdir
        workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        out = run(args, workdir)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if tmp is not None:
            tmp.cleanup()
    harness = out.pop("harness")
    res: dict[str, Any] = {
        "meta": {"timestamp": dt.datetime.now().isoformat(timespec="seconds"),
                 "argv": sys.argv[1:] if argv is None else argv, "quick": args.quick,
                 "flows": args.flows, "hosts": args.hosts, "packets": args.packets,
                 "repeat": args.repeat, "setup_repeat": args.setup_repeat,
                 "plaintext": args.plaintext, "gc_during_timing": "enabled",
                 "clock": "fake, fresh float per call", "harness": harness,
                 "loadavg_start": load_start, "loadavg_end": loadavg(), "source": source,
                 "others_cpu_s": others.seconds(),
                 "machine": machine(), "seconds": time.perf_counter() - t0},
        **out}
    json_path.write_text(json.dumps(res, indent=2) + "\n")
    print_report(res)
    print(f"\nsaved {json_path} ({res['meta']['seconds']:.0f} s)")
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
