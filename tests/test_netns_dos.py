r"""Handshake and signalling floods against the real anchor (security issue 17, items 2 and 5).

Same topology as test_netns_attacks.py (the victim "laptop" in ns mh behind two NATs, the
anchor in ns an, the correspondent in ns ch, the attacker in ns atk on the anchor's
segment). The floods come from tests/attack/tool.py ``hsflood`` and evil_client.py
``--keepalive-flood``: pre-built packets sent with sendmmsg (tests/attack/fastsend.py), so
that the attacker's own CPU use does not decide the outcome on a 2-core box; each reports
the rate it achieved. The figures are printed (``pytest -s``).

* spoofed initiations from the victim's public NAT address, below the global load bound,
  must not delay the victim's handshakes (item 2);
* a handshake flood (flat out from random sources; then unknown keys at 150/s) must leave
  the victim at least half its unloaded download throughput, measured in the same run;
* an authorized host's flood of sealed KeepAlives must not cost another host's UDP stream
  more than a small loss.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from upmt_tun import keys
from upmt_tun.lab import Lab
from upmt_tun.testbed import Topology, tool_missing

from .conftest import netns_missing
from .test_netns_attacks import (
    ANCHOR_EP,
    ATTACK,
    CH,
    NAT1,
    STREAM_RULES,
    Sink,
    alive,
    note,
    running_lab,
    wait_for,
)

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(netns_missing() is not None, reason=str(netns_missing()))]

SPOOF_NET = "198.18.0.0/15"
# the rate of the attack run's handshake flood (its tool's limit). fastsend goes ~3.5
# times faster into a black hole, but on this 2-core box the kernel's own work for that
# (three namespaces, a bridge) then takes the machine, whatever the anchor does. For the
# same reason the flood runs at nice 19 here: the attacker stands for another machine,
# and the kernel's work for its packets is mostly done in its own context
FLOOD_PPS = 45_000
BULK_RULES = """
[[rule]]
name = "bulk"
protocol = "tcp"
dst = "203.0.113.100/32"
dst_port = 5201
via = ["wan1", "wan2"]
"""


@pytest.fixture
def topo() -> Iterator[Topology]:
    t = Topology(attacker=True)
    t.up()
    try:
        yield t
    finally:
        t.down()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (clock ticks of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """The anchor's CPU use (share of one core) between start() and stop()."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.t0 = self.c0 = 0.0

    def start(self) -> None:
        self.t0, self.c0 = time.monotonic(), cpu_seconds(self.pid)

    def stop(self) -> float:
        return round(100 * (cpu_seconds(self.pid) - self.c0) / (time.monotonic() - self.t0), 1)


def restart_agent(lab: Lab) -> float:
    """Stop the agent, start it again; seconds until it is associated with both tunnels up."""
    argv = [str(x) for x in lab.procs["agent"].args][4:]   # after "ip netns exec NS"
    lab.agent_cli("down")
    lab.procs["agent"].wait(10)
    t0 = time.monotonic()
    lab._start("agent", "mh", argv)   # noqa: SLF001 (returns once the agent is ready)
    wait_for("the restarted agent's tunnels up", lambda: (
        st if (st := lab.agent_status())["anchors"][0]["state"] == "associated"
        and len(st["tunnels"]) == 2 and {t["state"] for t in st["tunnels"]} == {"up"}
        else None), timeout=40, every=0.2)
    return round(time.monotonic() - t0, 2)


def hsflood(topo: Topology, lab: Lab, seconds: float, pps: float, *extra: str,
            nice: int = 0) -> subprocess.Popen[str]:
    """tool.py hsflood in ns atk, returned once it runs (SIGUSR1 pauses it, SIGUSR2
    resumes: ``ip netns exec`` and ``nice`` exec it, so the pid is the tool's)."""
    p = topo.popen("atk", "nice", "-n", str(nice), sys.executable, str(ATTACK / "tool.py"),
                   "--target", ANCHOR_EP,
                   "--pps", str(pps), "hsflood", "--seconds", str(seconds),
                   "--anchor-pub", lab.anchor_keys[0][1], *extra,
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready", p.stderr.read() if p.stderr else ""
    return p


def finish(flood: subprocess.Popen[str]) -> dict[str, Any]:
    """Stop a flood (it prints what it sent); its JSON result."""
    if flood.poll() is None:
        flood.terminate()
    out, err = flood.communicate(timeout=30)
    assert flood.returncode == 0, err[-2000:]
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


# -- item 2: spoofed initiations from the victim's address ------------------------------------
@pytest.mark.parametrize("pps", [190, 80])
def test_spoofed_initiations_from_the_victims_address_do_not_lock_it_out(
        topo: Topology, tmp_path: Path, pps: int) -> None:
    """190 initiations/s (valid mac1, a key that is no [[peer]]) spoofed from NAT1's public
    address -- the victim's wan1 address as the anchor sees it -- at random ports: below the
    old global bound (200/s), so the old anchor never went under load. Before issue 17 each was
    charged to that address's bucket (5/s), so the victim's own initiations through wan1
    were refused: after a restart its wan1 tunnel stayed down (>15 s; 44.5 s and >90 s in
    the attack run). Now no per-source limit applies unless under load, and then only to
    sources that proved with mac2 that they receive: the restart takes seconds, as without
    the flood (measured first, in the same run). At 190/s (beyond today's global bound of
    100/s) the anchor is under load and the victim goes through a cookie; at 80/s it is
    not, and every spoofed initiation costs a DH but nothing of the victim's."""
    t0 = time.monotonic()
    with running_lab(topo, tmp_path / "lab") as lab:
        quiet_s = restart_agent(lab)
        flood = hsflood(topo, lab, 60, pps, "--spoof", NAT1, "--distinct", "512")
        try:
            time.sleep(2.0)                              # the flood is on
            an0 = lab.anchor_status()
            flood_s = restart_agent(lab)
            an1 = lab.anchor_status()
            alive(lab)
        finally:
            fl = finish(flood)
    drops = {k: an1["drops"].get(k, 0) - an0["drops"].get(k, 0)
             for k in ("handshake_refused", "handshake_rate_limited", "handshake_cookie_sent",
                       "handshake_cookie_limited", "handshake_queue_full")}
    note(f"spoofed-from-victims-address-{pps}", flood_pps=fl["pps"], flood_sent=fl["sent"],
         restart_quiet_s=quiet_s, restart_under_flood_s=flood_s, anchor_drops=drops,
         test_s=round(time.monotonic() - t0, 1))
    assert 0.8 * pps <= fl["pps"] <= 1.2 * pps, fl
    assert flood_s <= max(6.0, quiet_s + 4.0), (flood_s, quiet_s, drops)


# -- item 5: handshake floods and the victim's throughput ---------------------------------------
IPERF_ERRORS: list[str] = []


def iperf_down(topo: Topology, seconds: int = 2) -> float:
    """The victim's download through its tunnel (iperf3 -R from the CH), Mbit/s; 0 if it
    could not even finish or failed (the old anchor under a flood)."""
    try:
        r = topo.run("mh", "iperf3", "-c", CH, "-p", "5201", "-R", "-t", str(seconds), "-O",
                     "1", "-J", check=False, timeout=seconds + 20)
    except subprocess.TimeoutExpired:
        return 0.0
    res = json.loads(r.stdout)
    if "error" in res:                        # e.g. its control connection reset
        IPERF_ERRORS.append(res["error"])
        return 0.0
    return round(res["end"]["sum_received"]["bits_per_second"] / 1e6, 1)


@pytest.mark.skipif(bool(tool_missing("iperf3")), reason="needs iperf3")
def test_handshake_floods_leave_the_victim_half_its_throughput(topo: Topology,
                                                               tmp_path: Path) -> None:
    """The victim's download (iperf3 -R through the tunnel) unloaded, then under a flood of
    valid-mac1 initiations from random spoofed sources sent as fast as the attack tool can
    (sendmmsg of pre-built packets), then under 150/s initiations of an unknown key (each
    one a DH unless the anchor is under load). Before issue 17 the DH and the cookie
    replies ran inside the datagram callback without bound: the anchor sat at 89-100 % CPU
    and the victim fell from ~700 to 213 Mbit/s. Now the callback only checks mac1 (and
    mac2 under load) and queues; a worker does a few DH per loop turn; cookie replies have
    their own bucket. Required: at least half the unloaded throughput, in the same run."""
    t0 = time.monotonic()
    for cmd in ("ip link add inet0 type veth peer name inet1", "ip link set inet0 arp off up",
                "ip link set inet1 up", f"ip route add {SPOOF_NET} dev inet0"):
        topo.run("an", *cmd.split())                    # the Internet where nobody listens
    topo.popen("ch", "iperf3", "-s", "-p", "5201", stdout=subprocess.DEVNULL,
               stderr=subprocess.DEVNULL)
    with running_lab(topo, tmp_path / "lab", rules=BULK_RULES) as lab:
        cpu = CpuMeter(lab.procs["anchor0"].pid)

        def one() -> tuple[float, float]:
            cpu.start()
            mbit = iperf_down(topo)
            return mbit, cpu.stop()

        def pairs(flood: subprocess.Popen[str], n: int
                  ) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
            """``n`` times: the flood paused, a measurement; resumed, a measurement. Each
            loaded figure is taken seconds from an unloaded one: the box is shared with
            other tests, and its load drifts within a run."""
            quiet, loaded = [], []
            for _ in range(n):
                flood.send_signal(signal.SIGUSR1)
                time.sleep(1.2)                  # the load state ends
                quiet.append(one())
                flood.send_signal(signal.SIGUSR2)
                time.sleep(1.2)                  # (the kernel filter follows within ~1 s)
                loaded.append(one())
            return quiet, loaded

        an0 = lab.anchor_status()
        flood = hsflood(topo, lab, 120, FLOOD_PPS, "--spoof-net", SPOOF_NET, "--paused",
                        nice=19)
        try:
            base1, fast = pairs(flood, 3)
            an1 = lab.anchor_status()
        finally:
            fl = finish(flood)
        slow = hsflood(topo, lab, 120, 150, "--spoof-net", SPOOF_NET, "--paused")
        try:
            base2, unknown = pairs(slow, 2)
        finally:
            sl = finish(slow)
        an2 = lab.anchor_status()
        alive(lab)
    d1 = {k: an1["drops"].get(k, 0) - an0["drops"].get(k, 0)
          for k in an1["drops"] if k.startswith("handshake")}
    d2 = {k: an2["drops"].get(k, 0) - an1["drops"].get(k, 0)
          for k in an2["drops"] if k.startswith("handshake")}

    def med(xs: list[tuple[float, float]], i: int = 0) -> float:
        return round(statistics.median(x[i] for x in xs), 1)

    fast_ratio = med(fast) / med(base1) if med(base1) else 0.0
    unknown_ratio = med(unknown) / med(base2) if med(base2) else 0.0
    note("handshake-flood-throughput", unloaded_mbit=[b for b, _ in base1 + base2],
         unloaded_anchor_cpu=[c for _, c in base1 + base2],
         flood_pps=fl["pps"], flood_sent=fl["sent"], flood_tool_cpu_s=fl["cpu_s"],
         flood_mbit=[m for m, _ in fast], flood_ratio=round(fast_ratio, 2),
         flood_anchor_cpu=[c for _, c in fast], flood_drops=d1,
         kernel_keeps=an1.get("handshake", {}).get("kernel_keeps"),
         unknown_pps=sl["pps"], unknown_mbit=[m for m, _ in unknown],
         unknown_ratio=round(unknown_ratio, 2), unknown_anchor_cpu=[c for _, c in unknown],
         unknown_drops=d2, iperf_errors=IPERF_ERRORS, test_s=round(time.monotonic() - t0, 1))
    assert min(med(base1), med(base2)) > 0, (base1, base2, IPERF_ERRORS)
    assert fl["pps"] >= 0.6 * FLOOD_PPS and 120 <= sl["pps"] <= 180, (fl, sl)
    assert fast_ratio >= 0.5, (fast, base1)
    assert unknown_ratio >= 0.5, (unknown, base2)


# -- item 5: an authorized host's signalling flood ----------------------------------------------
def stream_loss(topo: Topology, sink: Sink, pps: int, seconds: float) -> tuple[int, int]:
    """The victim's UDP stream (uplink through its tunnel): (sent, received distinct)."""
    before = len(sink.records())
    topo.run("mh", sys.executable, str(ATTACK / "udp_stream.py"), CH, "9999", str(pps),
             str(seconds), timeout=seconds + 20)
    time.sleep(0.5)
    seqs = {int(r["payload"].split()[1]) for r in sink.records()[before:]}
    return int(pps * seconds), len(seqs)


def test_authorized_keepalive_flood_costs_another_host_little(topo: Topology,
                                                              tmp_path: Path) -> None:
    """'evil' (a second [[peer]], in ns atk) associates, validates a tunnel, then floods the
    anchor with sealed KeepAlives for it (each a new transaction) while the victim streams
    UDP (1000 packets/s) through its tunnel; the same stream runs first without the flood.
    Before issue 17 every KeepAlive was parsed and answered (the attack run: 5.2 % loss
    for the other host); now each peer's sealed signalling has a token bucket, and the
    excess is dropped after the AEAD open, before any SIP parsing. Bound: the victim loses
    at most 1 % more than without the flood (the unloaded stream loses nothing here)."""
    peer_priv, peer_pub = keys.keypair()
    extra = f'\n[[peer]]\nname = "evil"\npublic_key = "{peer_pub}"\n'
    t0 = time.monotonic()
    pps, seconds, flood_pps = 1000, 5.0, 20000
    with running_lab(topo, tmp_path / "lab", rules=STREAM_RULES, anchor_extra=extra) as lab:
        sink = Sink(topo, tmp_path / "sink.log")
        try:
            stream_loss(topo, sink, 50, 1.0)                 # the flow exists at the anchor
            base_sent, base_got = stream_loss(topo, sink, pps, seconds)
            cpu = CpuMeter(lab.procs["anchor0"].pid)
            an0 = lab.anchor_status()
            flood = topo.popen("atk", sys.executable, str(ATTACK / "evil_client.py"),
                               "--anchor-pub", lab.anchor_keys[0][1], "--key", peer_priv,
                               "--keepalive-flood", str(seconds + 3), "--pps", str(flood_pps),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            wait_for("the flood to start", lambda: lab.anchor_status()["signalling"].get(
                "ok", 0) - an0["signalling"].get("ok", 0) > 50, timeout=20)
            cpu.start()
            sent, got = stream_loss(topo, sink, pps, seconds)
            flood_cpu = cpu.stop()
            out, err = flood.communicate(timeout=60)
            assert flood.returncode == 0, err[-2000:]
            fl = json.loads(out.strip().splitlines()[-1])
            an1 = lab.anchor_status()
            alive(lab)
        finally:
            sink.close()
    base_loss = round(100 * (1 - base_got / base_sent), 2)
    loss = round(100 * (1 - got / sent), 2)
    limited = an1["drops"].get("signalling_rate_limited", 0) - \
        an0["drops"].get("signalling_rate_limited", 0)
    parsed = sum(an1["signalling"].values()) - sum(an0["signalling"].values())
    note("keepalive-flood", flood_pps=fl["pps"], flood_sent=fl["sent"], answers=fl["answers"],
         anchor_parsed=parsed, anchor_rate_limited=limited, anchor_cpu=flood_cpu,
         victim_loss_unloaded_pct=base_loss, victim_loss_flood_pct=loss,
         test_s=round(time.monotonic() - t0, 1))
    assert fl["validated"] and fl["sent"] >= 0.5 * flood_pps * (seconds + 3), fl
    assert loss <= base_loss + 1.0, (loss, base_loss)
