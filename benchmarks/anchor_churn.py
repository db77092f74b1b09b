#!/usr/bin/env python3
"""Many hosts coming and going at one anchor, with one misbehaving (issue 13, item 5).

    python benchmarks/anchor_churn.py [--hosts 200] [--seconds 600] [--cycles 2]
                                      [--max-associations N] [--seed 13] [--json PATH]

In process, no root: the rig of ``anchor_scale.py`` (a real ``upmt_tun.anchor.Anchor`` over
fake seams, real Noise IK handshakes, sealed SIP signalling, sealed DATA), driven by an
injected clock: ``--seconds`` is *simulated* time (one round per simulated second), so the
anchor's idle timers (``anchor.TUNNEL_IDLE`` 90 s, ``ASSOC_IDLE`` 300 s, ``FLOW_IDLE``
600 s, the sweep every ``SWEEP_EVERY`` s) run in full without waiting for them. The VIpA
leases live in a real SQLite file (``leases.Leases.open``), as in the daemon.

Each well-behaved host (two interfaces, wan1 and wan2, one tunnel each, 2-6 UDP flows) is
a small state machine: away -> handshake (answers a cookie reply by trying again with the
cookie, as the agent does) -> AssociationReq (a 503 when the anchor is full: try again 5 s
later) -> two TunnelSetupReq + KeepAlive echoes -> present: every round one uplink packet
per flow and one downlink packet per flow (the correspondent's answer), a KeepAlive per
tunnel every 10 s, now and then a **NAT rebinding** (a tunnel's source port changes: the
anchor probes the new address, the host echoes, the anchor rebinds) or an **interface
change** (wan2 gets a new address: TunnelSetupReq from it, validated again), and **leaves**
(goes silent) after 30-240 s for 20-400 s. A host that comes back must get the VIpA it had
the first time (from its lease, whether or not its association expired meanwhile).

One more peer misbehaves in alternate blocks of 10 rounds: each round of a block ``on`` it
sends a **handshake storm** (300 initiations with a valid mac1: half without mac2, half with
the cookie its address earned), a **flow flood** (2 000 uplink packets of new 5-tuples
through its validated tunnel) and a **tunnel flood** (setups on 40 interfaces). The
datagrams of a round are shuffled together (one socket queue); the handshake worker gets
``HS_PER_TURN`` initiations every 8 datagrams (the daemon drains that many per event-loop
turn).

Measured:

* anchor memory: this process's VmRSS and the tracemalloc-free table sizes (associations,
  tunnels, sessions, flows, the rate limiters' keys, the signalling cache) at the baseline
  (anchor built, nobody associated), the peak, and after each cycle, when every host left
  and the clock ran past every idle timer (sweeping every ``SWEEP_EVERY`` s);
* caps, checked every round: associations <= ``max_associations`` (set below the number
  of peers so that it binds), tunnels per host <= ``MAX_TUNNELS_PER_HOST``, flows per host
  <= ``max_flows_per_host``;
* the well-behaved hosts beside the misbehaving one, blocks ``on`` against blocks ``off``
  of the same run: delivery (uplink packets written to the TUN, downlink packets sent to
  the host's current address, out of those offered), the service time of each of their
  data packets (wall time of the anchor's call), their packets per second of anchor time,
  and how many simulated seconds a returning host took from first initiation to a validated
  tunnel.

Verdict (exit 1, one line per reason): a cap exceeded; a returning host with another VIpA;
a table not empty after everybody left; the RSS after the last cycle above the RSS after the
first by more than max(8 MiB, 10 %) (growth across cycles: the allocator may keep the first
cycle's pages, it must not need more for the second); a well-behaved packet lost (beyond
the ones in flight across a move); the median service time with the misbehaving host above
``--max-slowdown`` (2.0; 0 does not judge it: the CI smoke test judges no timing) times
the one without; a returning host that needed more than 10
simulated seconds to get back while the storm ran.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import gc
import ipaddress
import json
import random
import statistics
import sys
import tempfile
import time
import tracemalloc
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from anchor_scale import LISTEN, Rig, SimHost, ip_udp  # noqa: E402 (benchmarks/ dir)
from common import BenchError, loadavg, source_version  # noqa: E402

from upmt_tun import keys  # noqa: E402
from upmt_tun.anchor import (  # noqa: E402
    ASSOC_IDLE,
    FLOW_IDLE,
    HS_PER_TURN,
    SESSION_LIFE,
    SWEEP_EVERY,
    TUNNEL_IDLE,
)
from upmt_tun.dataplane.packet import TYPE_CONTROL, TYPE_DATA  # noqa: E402
from upmt_tun.leases import Leases  # noqa: E402
from upmt_tun.signalling import sip, upmt  # noqa: E402
from upmt_tun.signalling.anchor_side import MAX_TUNNELS_PER_HOST  # noqa: E402
from upmt_tun.signalling.handshake import (  # noqa: E402
    HS_COOKIE,
    HS_RESP,
    MAC_LEN,
    Initiation,
)
from upmt_tun.signalling.handshake import _mac as hs_mac  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FLOWS_PER_HOST_CAP = 64            # the anchor's max_flows_per_host in this run
KEEPALIVE_EVERY = 10               # s, per tunnel (the agent's default)
BLOCK = 10                         # rounds per block of the misbehaving host, on / off
STORM_HS = 300                     # initiations per round (s) while on
FLOOD_FLOWS = 2000                 # new 5-tuples per round while on
FLOOD_TUNNELS = 40                 # interfaces set up per round while on
RETURN_BOUND = 10.0                # s: a returning host's way back while the storm runs
Addr = tuple[str, int]


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def traced_mib(peak: bool = False) -> float | None:
    """The Python heap in use (or its peak), with --tracemalloc; None without."""
    if not tracemalloc.is_tracing():
        return None
    return tracemalloc.get_traced_memory()[1 if peak else 0] / 2**20


def trim() -> None:
    """gc, then glibc's malloc_trim: what the allocator can give back, given back."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass(eq=False)
class Host:
    sim: SimHost
    bad: bool = False
    state: str = "away"             # away | hs | assoc | present
    until: float = 0.0              # away until / present until (simulated)
    first_vipa: str = ""
    ifaddr: dict[str, Addr] = field(default_factory=dict)   # interface -> outer address
    tids: dict[str, int] = field(default_factory=dict)      # interface -> anchor's tunnel id
    nflows: int = 0
    init: Initiation | None = None
    cookie: bytes | None = None
    cookie_at: float = -1e9
    hs_started: float = 0.0         # first initiation of this return
    next_ka: float = 0.0
    returns: int = 0


class ChurnRig(Rig):
    """The anchor_scale rig with nobody associated at the start (hosts come and go)."""

    _defer = True

    def establish(self, h: SimHost) -> None:
        if not self._defer:
            super().establish(h)


class Churn:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        an_key = keys.keypair()
        host_keys = [keys.keypair() for _ in range(args.hosts + 1)]     # + the bad one
        self.rig = ChurnRig(workdir, an_key, host_keys, max_flows=FLOWS_PER_HOST_CAP,
                            plaintext=False)
        self.rig._defer = False
        self.anchor = self.rig.anchor
        self.fwd = self.anchor.fwd
        # below the number of peers, so that the cap binds at the busiest moments
        self.anchor.sig.max_associations = args.max_associations
        self.leases = Leases.open(str(workdir / "leases.sqlite"))
        self.anchor.sig.use_leases(self.leases, peers=[h.name for h in self.rig.hosts],
                                   max_age=30 * 86400.0)
        self.hosts = [Host(s) for s in self.rig.hosts]
        self.bad = self.hosts[-1]
        self.bad.bad = True
        self.good = self.hosts[:-1]
        self.by_addr: dict[Addr, Host] = {}
        self.port = 20_000
        self.bad_inits: dict[int, Initiation] = {}
        self.failures: list[str] = []
        self.m: dict[str, Any] = {
            "assoc_refused": 0, "vipa_changed": 0, "returns": 0, "rebinds": 0,
            "iface_moves": 0, "cookie_retries": 0,
            "max_assoc_seen": 0, "max_tunnels_seen": 0, "max_flows_seen": 0,
            "bad_hs_sent": 0, "bad_flood_sent": 0, "bad_tunnel_setups": 0,
            "bad_refused": Counter_(),
        }
        # per block kind (on/off): offered/delivered, service times (s), anchor time (s)
        self.kind: dict[str, dict[str, Any]] = {
            k: {"up_offered": 0, "up_delivered": 0, "down_offered": 0, "down_delivered": 0,
                "service": Hist(), "good_time": 0.0, "good_packets": 0, "return_s": []}
            for k in ("off", "on")}
        self.rss_peak = 0.0

    # -- addresses ---------------------------------------------------------------------
    def new_addr(self, h: Host, iface: str, new_ip: bool) -> Addr:
        i = self.hosts.index(h)
        ip = (f"198.19.{self.rng.randrange(256)}.{self.rng.randrange(1, 255)}" if new_ip
              else h.ifaddr[iface][0] if iface in h.ifaddr
              else f"198.18.{i // 200}.{i % 200 + 1 + (100 if iface == 'wan2' else 0)}")
        self.port = self.port + 1 if self.port < 65_000 else 20_000
        addr = (ip, self.port)
        old = h.ifaddr.get(iface)
        if old is not None:
            self.by_addr.pop(old, None)
        h.ifaddr[iface] = addr
        self.by_addr[addr] = h
        return addr

    # -- anchor seams ------------------------------------------------------------------
    def feed(self, data: bytes, src: Addr) -> list[tuple[bytes, Addr]]:
        """One datagram into the anchor; what it sent at once (signalling, cookies)."""
        self.rig.path.capture = []
        try:
            self.anchor._on_datagram(data, src)        # noqa: SLF001 (the code measured)
            return self.rig.path.capture
        finally:
            self.rig.path.capture = None

    def ask(self, h: Host, src: Addr, signals: list[tuple[str, dict[str, Any]]]
            ) -> tuple[int, dict[str, Any]]:
        """A sealed SIP request; (status, UPMT answers), status 0 when nothing came."""
        s = h.sim
        s.n_sip += 1
        req = sip.build_request(target=LISTEN, from_user=s.name, via=src,
                                call_id=f"{s.name}-{s.n_sip:06d}", cseq=s.n_sip,
                                branch=f"z9hG4bK{s.name}{s.n_sip:010d}",
                                body=upmt.encode(signals))
        sent = self.feed(s.s.seal(TYPE_CONTROL, req), src)
        for data, dst in sent:
            if dst == src and data[0] == TYPE_CONTROL:
                opened = s.s.open(data)
                if opened is None:
                    continue
                msg = sip.parse(opened[1])
                if isinstance(msg, sip.SipResponse):
                    body = dict(upmt.decode(msg.body)) if msg.status_code == 200 else {}
                    return msg.status_code, body
        return 0, {}

    def tunnel(self, h: Host, iface: str, src: Addr, now: float) -> bool:
        """TunnelSetupReq for ``iface`` from ``src``, then KeepAlive echoes until up."""
        code, r = self.ask(h, src, [("TunnelSetupReq", {
            "sipId": h.sim.name, "vipa": h.sim.vipa, "tunnelId": 1 if iface == "wan1" else 2,
            "interface": iface})])
        if code != 200:
            return False
        tid, challenge = r["TunnelSetupResp"]["serverTunnelID"], \
            r["TunnelSetupResp"].get("challenge", "")
        h.tids[iface] = tid
        return self.keepalive(h, iface, challenge)

    def keepalive(self, h: Host, iface: str, challenge: str = "") -> bool:
        for _ in range(3):
            c: dict[str, Any] = {"sipId": h.sim.name, "tunnelId": h.tids[iface],
                                 "lastDelay": 1.0}
            if challenge:
                c["challenge"] = challenge
            code, r = self.ask(h, h.ifaddr[iface], [("KeepAlive", c)])
            if code != 200:
                return False
            challenge = r["KeepAliveResp"].get("challenge", "")
            if not challenge:
                t = self.fwd.tunnels.get(h.tids[iface])
                return t is not None and t.state == "up" and t.remote == h.ifaddr[iface]
        return False

    # -- host life ---------------------------------------------------------------------
    def initiation(self, h: Host, now: float) -> tuple[bytes, Addr]:
        self.rig.wall_ns += 1_000_000
        cookie = h.cookie if now - h.cookie_at < 100.0 else None
        h.init = Initiation(static=h.sim.priv, remote_static=self.rig.an_pub,
                            local_index=self.rng.randrange(1, 1 << 32),
                            wall_ns=self.rig.wall_ns, cookie=cookie)
        if "wan1" not in h.ifaddr:
            self.new_addr(h, "wan1", False)
        return h.init.packet, h.ifaddr["wan1"]

    def on_reply(self, h: Host, data: bytes, now: float) -> None:
        init = h.init
        if h.bad and len(data) >= 12:              # which of its storm's initiations
            at = 8 if data[0] == HS_RESP else 4    # (the receiver index: ours)
            init = self.bad_inits.get(int.from_bytes(data[at:at + 4], "big"), init)
        if init is None:
            return
        if data[0] == HS_COOKIE:
            c = init.consume_cookie(data)
            if c is not None:
                h.cookie, h.cookie_at = c, now
                self.m["cookie_retries"] += 1 if not h.bad else 0
        elif data[0] == HS_RESP:
            s = init.consume(data, now, "anchor")
            if s is not None:
                h.sim.session = s
                h.init = None
                if not h.bad:
                    h.state = "assoc"

    def associate(self, h: Host, now: float, kind: str) -> None:
        code, r = self.ask(h, h.ifaddr["wan1"], [("AssociationReq", {
            "sipId": h.sim.name, "addressInUse": [], "dataPlaintext": False})])
        if code == 503:
            self.m["assoc_refused"] += 1
            h.state, h.until = "away", now + 5.0
            return
        if code != 200:
            h.state, h.until = "away", now + 1.0
            return
        vipa = r["AssociationResp"]["vipa"]
        if h.first_vipa and vipa != h.first_vipa:
            self.m["vipa_changed"] += 1
            self.fail(f"{h.sim.name} came back with VIpA {vipa}, had {h.first_vipa}")
        h.first_vipa = h.first_vipa or vipa
        h.sim.vipa = vipa
        h.sim.vipa_b = ipaddress.IPv4Address(vipa).packed
        ok = all(self.tunnel(h, iface, h.ifaddr.get(iface) or self.new_addr(h, iface, False),
                             now) for iface in ("wan1", "wan2"))
        if not ok:
            h.state, h.until = "away", now + 1.0
            return
        if h.returns:
            self.kind[kind]["return_s"].append(now - h.hs_started)
        h.returns += 1
        h.state = "present"
        # (below SESSION_LIFE: the simulated hosts do not rekey, they leave first)
        h.until = now + self.rng.uniform(30, 170)
        h.nflows = self.rng.randint(2, 6)
        h.next_ka = now + KEEPALIVE_EVERY

    def leave(self, h: Host, now: float) -> None:
        h.state, h.until = "away", now + self.rng.uniform(20, 400)
        h.sim.session = None
        h.init = None

    def move(self, h: Host, now: float) -> None:
        if self.rng.random() < 0.6:                      # NAT rebinding: a new source port
            iface = self.rng.choice(("wan1", "wan2"))
            old = h.ifaddr[iface]
            src = self.new_addr(h, iface, False)
            c: dict[str, Any] = {"sipId": h.sim.name, "tunnelId": h.tids[iface],
                                 "lastDelay": 1.0}
            code, r = self.ask(h, src, [("KeepAlive", c)])
            token = r.get("KeepAliveResp", {}).get("challenge", "") if code == 200 else ""
            if token:
                c["challenge"] = token
                self.ask(h, src, [("KeepAlive", c)])
            t = self.fwd.tunnels.get(h.tids[iface])
            if t is not None and t.remote == src and t.state == "up":
                self.m["rebinds"] += 1
            else:
                self.fail(f"NAT rebinding of {h.sim.name} {iface} {old} -> {src} not taken")
        else:                                            # wan2 gets a new address
            src = self.new_addr(h, "wan2", True)
            if self.tunnel(h, "wan2", src, now):
                self.m["iface_moves"] += 1
            else:
                self.fail(f"interface change of {h.sim.name} (wan2 -> {src}) not validated")

    # -- the misbehaving host ----------------------------------------------------------
    def bad_round(self, now: float) -> list[tuple[bytes, Addr, Host | None]]:
        """Its storm and flood for this round (the datagrams, to be shuffled in)."""
        b = self.bad
        out: list[tuple[bytes, Addr, Host | None]] = []
        if b.sim.session is None or b.state != "present":
            return out
        src = b.ifaddr["wan1"]
        if not self.bad_inits:       # built once: a replaying attacker's DH costs it nothing
            for _ in range(STORM_HS):
                self.rig.wall_ns += 1_000_000
                init = Initiation(static=b.sim.priv, remote_static=self.rig.an_pub,
                                  local_index=self.rng.randrange(1, 1 << 32),
                                  wall_ns=self.rig.wall_ns)
                self.bad_inits[init.local_index] = init
        cookie = b.cookie if now - b.cookie_at < 100 else None
        for i, init in enumerate(self.bad_inits.values()):
            pkt = init.packet
            if i % 2 and cookie is not None:           # mac2 with the cookie it earned
                body = pkt[:-MAC_LEN]
                pkt = body + hs_mac(cookie, body)
            out.append((pkt, src, b))
        self.m["bad_hs_sent"] += STORM_HS
        base = self.m["bad_flood_sent"]
        s = b.sim
        for k in range(FLOOD_FLOWS):
            n = base + k
            dst = bytes((198, 51, 100 + (n // 60_000) % 50, 9))
            out.append((s.s.seal(TYPE_DATA, ip_udp(s.vipa_b, dst, 1024 + n % 60_000, 53, 64),
                                 b.tids["wan1"]), src, None))
        self.m["bad_flood_sent"] += FLOOD_FLOWS
        return out

    def bad_tunnels(self, now: float) -> None:
        b = self.bad
        for k in range(FLOOD_TUNNELS):
            iface = f"ppp{k}"
            src = self.new_addr(b, iface, True)
            code, r = self.ask(b, src, [("TunnelSetupReq", {
                "sipId": b.sim.name, "vipa": b.sim.vipa, "tunnelId": 100 + k,
                "interface": iface})])
            self.m["bad_tunnel_setups"] += 1
            if code != 200:
                self.m["bad_refused"][str(code)] += 1
        # its flood goes through wan1, set up last (the setups above push out the oldest)
        if not self.tunnel(b, "wan1", b.ifaddr["wan1"], now):
            self.fail("the misbehaving host's wan1 tunnel was not validated")
            b.state = "away"

    def bad_join(self, now: float) -> bool:
        """The misbehaving host associates like a good one (it holds a valid key), afresh at
        the start of each of its blocks (its storm's replays refresh no session); False
        when the anchor is full (it sits the block out)."""
        b = self.bad
        b.state, b.sim.session, b.init = "away", None, None
        for _ in range(20):
            self.rig.now = now
            pkt, src = self.initiation(b, now)
            for data, dst in self.feed(pkt, src) + self.drain(1 << 10):
                if dst == src:
                    self.on_reply(b, data, now)
            if b.sim.session is not None and b.init is None:
                break
            now += 0.5
        if b.sim.session is None:
            raise BenchError("the misbehaving host could not even handshake")
        code, r = self.ask(b, b.ifaddr["wan1"], [("AssociationReq", {
            "sipId": b.sim.name, "addressInUse": [], "dataPlaintext": False})])
        if code != 200:
            self.m["bad_refused"][str(code)] += 1
            return False
        b.sim.vipa = r["AssociationResp"]["vipa"]
        b.sim.vipa_b = ipaddress.IPv4Address(b.sim.vipa).packed
        b.state = "present"
        return True

    # -- rounds ------------------------------------------------------------------------
    def fail(self, why: str) -> None:
        if len(self.failures) < 50:
            self.failures.append(why)

    def sweep(self, now: float) -> None:
        """What the anchor's sweeper does every SWEEP_EVERY seconds."""
        self.anchor.sweep(now)

    def check_caps(self) -> None:
        n = len(self.fwd.by_mh)
        self.m["max_assoc_seen"] = max(self.m["max_assoc_seen"], n)
        if n > self.args.max_associations:
            self.fail(f"{n} associations > max_associations {self.args.max_associations}")
        nt = max((len(a.tunnels) for a in self.fwd.by_mh.values()), default=0)
        self.m["max_tunnels_seen"] = max(self.m["max_tunnels_seen"], nt)
        if nt > MAX_TUNNELS_PER_HOST:
            self.fail(f"a host holds {nt} tunnels > {MAX_TUNNELS_PER_HOST}")
        nf = max(self.fwd.paft.per_source.values(), default=0)
        self.m["max_flows_seen"] = max(self.m["max_flows_seen"], nf)
        if nf > FLOWS_PER_HOST_CAP:
            self.fail(f"a host holds {nf} flows > max_flows_per_host {FLOWS_PER_HOST_CAP}")

    def round(self, now: float, bad_on: bool) -> None:
        rig, rng = self.rig, self.rng
        kind = self.kind["on" if bad_on else "off"]
        stream: list[tuple[bytes, Addr, Host | None]] = []
        downlink: list[tuple[bytes, Host]] = []
        for h in self.good:
            rig.now = now
            if h.state == "away" and now >= h.until:
                if h.sim.session is None:
                    h.state, h.hs_started = "hs", now
                    self.m["returns"] += 1 if h.returns else 0
                else:                                    # refused by a full anchor: again
                    h.state = "assoc"
            if h.state == "hs":
                pkt, src = self.initiation(h, now)
                stream.append((pkt, src, h))
            elif h.state == "assoc":
                self.associate(h, now, "on" if bad_on else "off")
            elif h.state == "present":
                if now >= h.until:
                    self.leave(h, now)
                    continue
                if rng.random() < 0.01:
                    self.move(h, now)
                if now >= h.next_ka:
                    h.next_ka = now + KEEPALIVE_EVERY
                    for iface in ("wan1", "wan2"):
                        if not self.keepalive(h, iface):
                            self.fail(f"keepalive of {h.sim.name} {iface} refused")
                s = h.sim
                for k in range(h.nflows):
                    iface = "wan1" if k % 2 == 0 else "wan2"
                    dst = bytes((198, 51, 100, 7))
                    pkt = ip_udp(s.vipa_b, dst, 10_000 + k, 443, 200)
                    stream.append((s.s.seal(TYPE_DATA, pkt, h.tids[iface]),
                                   h.ifaddr[iface], None))
                    downlink.append((ip_udp(dst, s.vipa_b, 443, 10_000 + k, 200), h))
        if bad_on:
            stream.extend(self.bad_round(now))
        rng.shuffle(stream)
        # the round's datagrams arrive spread over its second
        step = 1.0 / max(1, len(stream))
        tun = rig.tun_count.pending
        on_dg = self.anchor._on_datagram                 # noqa: SLF001
        good_addr = self.by_addr
        pc = time.perf_counter
        service = kind["service"]
        for i, (data, src, h) in enumerate(stream):
            rig.now = now + i * step
            if h is not None:                            # an initiation: replies come later
                for reply, dst in self.feed(data, src):
                    owner = good_addr.get(dst)
                    if owner is not None:
                        self.on_reply(owner, reply, rig.now)
            elif (owner := good_addr.get(src)) is not None and not owner.bad:
                n0 = len(tun)
                t0 = pc()
                on_dg(data, src)
                dt_ = pc() - t0
                service.add(dt_)
                kind["good_time"] += dt_
                kind["good_packets"] += 1
                kind["up_offered"] += 1
                kind["up_delivered"] += len(tun) - n0
            else:
                on_dg(data, src)
            if i % 8 == 7:                               # the handshake worker's turn
                for reply, dst in self.drain():
                    owner = good_addr.get(dst)
                    if owner is not None:
                        self.on_reply(owner, reply, rig.now)
        while self.anchor.gate.queue:
            for reply, dst in self.drain():
                owner = good_addr.get(dst)
                if owner is not None:
                    self.on_reply(owner, reply, rig.now)
        tun.clear()
        # downlink: the correspondents answer; each must leave towards the host's tunnel
        on_tun = self.anchor._on_tun                     # noqa: SLF001
        q = rig.path.queued
        for pkt, h in downlink:
            if h.state != "present":
                continue
            n0 = len(q)
            t0 = pc()
            on_tun(pkt)
            dt_ = pc() - t0
            service.add(dt_)
            kind["good_time"] += dt_
            kind["good_packets"] += 1
            kind["down_offered"] += 1
            if len(q) > n0 and q[-1][1] in (h.ifaddr["wan1"], h.ifaddr["wan2"]):
                kind["down_delivered"] += 1
        q.clear()

    def drain(self, n: int = HS_PER_TURN) -> list[tuple[bytes, Addr]]:
        self.rig.path.capture = []
        try:
            self.anchor.drain_handshakes(n)
            return self.rig.path.capture
        finally:
            self.rig.path.capture = None

    def cycle(self, t0: float, seconds: int) -> float:
        """``seconds`` rounds of churn from simulated time ``t0``, then everybody leaves
        and the clock runs past every idle timer; the simulated time at the end."""
        now = t0
        for r in range(seconds):
            bad_on = (r // BLOCK) % 2 == 1
            if bad_on and r % BLOCK == 0 and self.bad_join(now):
                self.bad_tunnels(now)
            self.round(now, bad_on)
            if r % int(SWEEP_EVERY) == 0:
                self.rig.now = now
                self.sweep(now)
            self.check_caps()
            if r % 10 == 0:
                self.rss_peak = max(self.rss_peak, rss_mib())
            now += 1.0
        for h in self.hosts:                             # everybody goes silent
            if h.state != "away" or h.sim.session is not None:
                self.leave(h, now)
            h.until = float("inf")
            h.state = "away"
        self.rss_peak = max(self.rss_peak, rss_mib())
        end = now + max(TUNNEL_IDLE, ASSOC_IDLE, FLOW_IDLE, SESSION_LIFE) + 2 * SWEEP_EVERY
        while now < end:
            now += SWEEP_EVERY
            self.rig.now = now
            self.sweep(now)
        for h in self.hosts:                             # back to "away, may return"
            h.until = now + self.rng.uniform(0, 60)
        return now

    def tables(self) -> dict[str, int]:
        a, f = self.anchor, self.fwd
        return {
            "associations": len(f.by_mh), "vipas": len(f.by_vipa),
            "tunnels": len(f.tunnels), "sessions": len(f.sessions),
            "peer_sessions": len(a._peer_sessions),      # noqa: SLF001
            "flows": len(f.paft), "flow_sources": len(f.paft.per_source),
            "handshake_queue": len(a.gate.queue),
            "signal_limiter_keys": len(a.signal_limiter.buckets),
            "gate_source_keys": len(a.gate.sources.buckets),
            "sip_cache": len(a.sig.cache._d),            # noqa: SLF001
            "leases": len(self.leases),
        }


class Counter_(dict[str, int]):
    def __missing__(self, key: str) -> int:
        return 0


class Hist:
    """Service times in 0.1 µs bins up to 5 ms (one overflow bin): fixed memory, so that
    the measurement does not grow this process's RSS with the run's length."""

    BIN = 1e-7
    N = 50_000

    def __init__(self) -> None:
        self.bins = array("Q", bytes(8 * (self.N + 1)))
        self.n = 0

    def add(self, x: float) -> None:
        self.bins[min(self.N, int(x / self.BIN))] += 1
        self.n += 1

    def pct(self, p: float) -> float:
        if not self.n:
            return float("nan")
        want, seen = p * self.n, 0
        for i, c in enumerate(self.bins):
            seen += c
            if seen >= want and c:
                return (i + 0.5) * self.BIN
        return self.N * self.BIN


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hosts", type=int, default=200)
    ap.add_argument("--seconds", type=int, default=600,
                    help="simulated seconds of churn per cycle (default 600)")
    ap.add_argument("--cycles", type=int, default=2)
    ap.add_argument("--max-associations", type=int, default=0,
                    help="default: 90 %% of the hosts (it must bind)")
    ap.add_argument("--max-slowdown", type=float, default=2.0,
                    help="bound on the service-time ratio on/off (0: not judged, as in CI)")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--tracemalloc", action="store_true",
                    help="also the Python heap in use (tracemalloc; about 3x slower)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.hosts < 2 or args.seconds < 4 * BLOCK or args.cycles < 1:
        ap.error("--hosts >= 2, --seconds >= 40, --cycles >= 1")
    if not args.max_associations:
        args.max_associations = max(2, args.hosts * 9 // 10)
    wall0 = time.monotonic()
    load0 = loadavg()
    if args.tracemalloc:
        tracemalloc.start()
    with tempfile.TemporaryDirectory(prefix="upmt-churn-") as tmp:
        try:
            c = Churn(args, Path(tmp))
        except BenchError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for h in c.good:                                 # staggered first arrivals
            h.until = 1000.0 + c.rng.uniform(0, 30)
        trim()
        base_rss, base_tables, base_traced = rss_mib(), c.tables(), traced_mib()
        now = 1000.0
        ends: list[dict[str, Any]] = []
        try:
            for k in range(args.cycles):
                now = c.cycle(now, args.seconds)
                c.leases.compact(peers=[h.sim.name for h in c.hosts],
                                 pool=c.anchor.sig.pool, reserved=c.anchor.sig.reserved,
                                 max_age=30 * 86400.0)
                trim()
                ends.append({"cycle": k + 1, "rss_mib": rss_mib(), "tables": c.tables(),
                             "traced_mib": traced_mib()})
                print(f"cycle {k + 1}: RSS {ends[-1]['rss_mib']:.1f} MiB, "
                      f"tables {ends[-1]['tables']}", flush=True)
        except BenchError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        c.leases.close()
    wall = time.monotonic() - wall0

    # -- verdict -----------------------------------------------------------------------
    fails = list(c.failures)
    for e in ends:
        left = {k: v for k, v in e["tables"].items()
                if v and k not in ("leases", "gate_source_keys", "signal_limiter_keys",
                                   "sip_cache")}
        if left:
            fails.append(f"after cycle {e['cycle']} everybody left but {left} remain")
    first, last = ends[0]["rss_mib"], ends[-1]["rss_mib"]
    if last - first > max(8.0, 0.10 * first):
        fails.append(f"RSS grew across cycles: {first:.1f} -> {last:.1f} MiB")
    k_on, k_off = c.kind["on"], c.kind["off"]
    res: dict[str, Any] = {}
    for name, kd in (("off", k_off), ("on", k_on)):
        res[name] = {
            "uplink_delivered": f"{kd['up_delivered']}/{kd['up_offered']}",
            "downlink_delivered": f"{kd['down_delivered']}/{kd['down_offered']}",
            "service_us_p50": kd["service"].pct(0.5) * 1e6,
            "service_us_p99": kd["service"].pct(0.99) * 1e6,
            "good_pps_of_anchor_time": (kd["good_packets"] / kd["good_time"]
                                        if kd["good_time"] else float("nan")),
            "return_s_median": (statistics.median(kd["return_s"])
                                if kd["return_s"] else float("nan")),
            "return_s_max": max(kd["return_s"], default=float("nan")),
            "returns": len(kd["return_s"]),
        }
        for d in ("up", "down"):
            lost = kd[f"{d}_offered"] - kd[f"{d}_delivered"]
            if lost:
                fails.append(f"{lost} well-behaved {d}link packet(s) lost with the "
                             f"misbehaving host {name}")
    slow = res["on"]["service_us_p50"] / res["off"]["service_us_p50"]
    tput = res["on"]["good_pps_of_anchor_time"] / res["off"]["good_pps_of_anchor_time"]
    if args.max_slowdown and slow > args.max_slowdown:
        fails.append(f"well-behaved packets' median service time {slow:.2f}x with the "
                     f"misbehaving host (bound {args.max_slowdown})")
    if res["on"]["return_s_max"] > RETURN_BOUND:
        fails.append(f"a returning host took {res['on']['return_s_max']:.0f} s during the "
                     f"storm (bound {RETURN_BOUND:.0f})")
    if not c.m["returns"]:
        fails.append("no host came back (the run is too short)")
    drops = {k: v for k, v in c.fwd.drops.items() if v}
    out = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "version": source_version(), "args": {k: (str(v) if isinstance(v, Path) else v)
                                              for k, v in vars(args).items()},
        "load_start": load0, "load_end": loadavg(), "wall_s": wall,
        "rss_mib": {"baseline": base_rss, "peak": c.rss_peak,
                    "after_cycles": [e["rss_mib"] for e in ends]},
        "traced_mib": {"baseline": base_traced, "peak": traced_mib(peak=True),
                       "after_cycles": [e["traced_mib"] for e in ends]},
        "tables": {"baseline": base_tables, "after_cycles": [e["tables"] for e in ends]},
        "caps": {"max_associations": args.max_associations,
                 "max_associations_seen": c.m["max_assoc_seen"],
                 "max_tunnels_per_host": MAX_TUNNELS_PER_HOST,
                 "max_tunnels_seen": c.m["max_tunnels_seen"],
                 "max_flows_per_host": FLOWS_PER_HOST_CAP,
                 "max_flows_seen": c.m["max_flows_seen"]},
        "churn": {k: v for k, v in c.m.items() if not k.startswith("max_")},
        "misbehaving_off": res["off"], "misbehaving_on": res["on"],
        "ratios": {"service_p50_on_over_off": slow,
                   "service_p99_on_over_off": (res["on"]["service_us_p99"]
                                               / res["off"]["service_us_p99"]),
                   "good_pps_on_over_off": tput},
        "anchor_drops": drops,
        "failures": fails, "verdict": "ok" if not fails else "FAILED",
    }
    print(json.dumps({k: out[k] for k in ("rss_mib", "traced_mib", "caps", "churn",
                                          "misbehaving_off", "misbehaving_on", "ratios",
                                          "anchor_drops")},
                     indent=1, default=str))
    print(f"{args.hosts} hosts + 1 misbehaving, {args.cycles} x {args.seconds} simulated s "
          f"in {wall:.0f} s wall; load {load0} -> {out['load_end']}")
    path = args.json or RESULTS_DIR / (
        "anchor_churn-" + dt.datetime.now().strftime("%Y%m%d-%H%M%S") + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str) + "\n")
    for f in fails:
        print(f"FAIL: {f}")
    print(f"verdict: {out['verdict']} ({path})")
    return 0 if not fails else 1


if __name__ == "__main__":
    sys.exit(main())
