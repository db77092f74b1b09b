"""Outer IPv6 with real daemons: one access network IPv6-only, one IPv4-only (issue 14,
item 1 and the outer parts of items 3 and 6).

           ns mh (upmt-agent up; the anchor is "anchor.upmt.test": an A and an AAAA record)
        wan1 10.1.0.2                wan2 2001:db8:2::2 (no IPv4), default via fe80::1
            |                             |
        ns nat1 (IPv4 masquerade)     ns nat2: IPv6 router, firewall: only outgoing and
        203.0.113.11                  replies (ip6 testbed_fw), 2001:db8:113::12
              \\                           /
               ns inet: bridge br0
              /                 \\
   ns an 203.0.113.1 + 2001:db8:113::1      ns ch 203.0.113.100 (IPv4 only)
   upmt-anchor, listen = "[::]:5060"

A legacy curl through the IPv6-only interface (rule ``v6web`` via wan2 only) reaches the
CH from the anchor's address; a paced TCP stream moves wan1 -> wan2 -> wan1 with
``upmt-agent move`` and arrives whole; after the agent is killed, ``upmt-agent cleanup``
leaves the host (IPv4 and IPv6 rules, routes, nft) as it was, and so does the stop.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from upmt_tun.lab import DEFAULT_RULES, Lab, exe
from upmt_tun.testbed import V6_SEGMENT, Topology, host_state, tool_missing

from .conftest import netns_missing
from .paced_server import paced_tcp_server
from .test_netns_leases import CLIENT

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(netns_missing() is not None, reason=str(netns_missing()))]

CH = "203.0.113.100"
NAME = "anchor.upmt.test"
LINES, EVERY = 500, 0.01          # 5 s of 100-byte lines on port 8080 (the "web" rule)
RULES = DEFAULT_RULES + f"""
[[rule]]
name = "v6web"
protocol = "tcp"
dst = "{CH}/32"
dst_port = 8081
via = ["wan2"]
"""


@pytest.fixture
def topo() -> Iterator[Topology]:
    t = Topology(v6_access=True)
    t.up()
    # the anchor's name, both records, for the agent's namespace only (ip netns exec
    # mounts /etc/netns/<ns>/hosts over /etc/hosts)
    etc = Path("/etc/netns") / t.ns("mh")
    try:
        etc.mkdir(parents=True)
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n{t.addresses['an']} {NAME}\n"
                                   f"{V6_SEGMENT['an']} {NAME}\n")
        yield t
    finally:
        t.down()
        shutil.rmtree(etc, ignore_errors=True)
        with contextlib.suppress(OSError):
            etc.parent.rmdir()               # only if no one else's is in it


def state6(topo: Topology) -> dict[str, str]:
    """host_state plus the IPv6 rules and routes (what the IPv6 interface adds)."""
    out = host_state(topo, "mh")
    out["rules6"] = topo.run("mh", "ip", "-6", "rule").stdout
    out["routes6"] = topo.run("mh", "ip", "-6", "route", "show", "table", "all").stdout
    return out


def wait_for(what: str, check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_ipv6_only_access_carries_tunnels_and_flows_move_across_families(
        topo: Topology, tmp_path: Path) -> None:
    if tool_missing("curl"):
        pytest.skip("needs curl")
    # the premise: nothing unsolicited gets in to the IPv6-only network
    assert topo.run("an", "ping", "-6", "-c", "1", "-W", "1", "2001:db8:2::2",
                    check=False).returncode != 0
    before = state6(topo)
    www = tmp_path / "www"
    www.mkdir()
    (www / "f.bin").write_bytes(b"u" * 300_000)
    http_log = tmp_path / "http.log"
    topo.popen("ch", "python3", "-m", "http.server", "8081", "--bind", CH, "--directory",
               str(www), stdout=subprocess.DEVNULL, stderr=open(http_log, "w"))
    server = topo.popen("ch", sys.executable, "-u", "-c", paced_tcp_server(8080, LINES, EVERY),
                        stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdout.readline().strip() == "listening"
    lab = Lab(topo, tmp_path / "lab", rules=RULES, listen="[::]:5060",
              anchor_address=f"{NAME}:5060")
    lab.start()
    try:
        st = lab.agent_status()
        assert st["anchors"][0]["address"] == "203.0.113.1:5060 [2001:db8:113::1]:5060", st
        tun = {t["interface"]: t for t in st["tunnels"]}
        assert tun["wan1"]["remote"] == "203.0.113.1:5060"
        assert tun["wan2"]["remote"] == "[2001:db8:113::1]:5060"
        assert tun["wan2"]["local"].startswith("[2001:db8:2::2]:")
        wait_for("both tunnels up",
                 lambda: all(t["state"] == "up" for t in lab.agent_status()["tunnels"]))
        # the IPv6 tunnel socket's own table and ip -6 rule
        table6 = topo.run("mh", "ip", "-6", "route", "show", "table", "5552").stdout
        assert "default via fe80::1 dev wan2" in table6, table6
        assert "fwmark 0x5552/0xffff lookup 5552" in topo.run("mh", "ip", "-6", "rule").stdout
        # the anchor sees one host from an IPv4 (NAT) and an IPv6 address, plainly written
        an = json.dumps(lab.anchor_status())
        assert "2001:db8:2::2" in an and "203.0.113.11" in an and "::ffff:" not in an, an

        # a legacy curl through the IPv6-only interface, seen by the CH from the anchor
        got = tmp_path / "got.bin"
        r = topo.run("mh", "curl", "-sS", "-m", "15", "-o", str(got), "-w", "%{http_code}",
                     f"http://{CH}:8081/f.bin", check=False)
        assert r.stdout == "200", (r.stderr, lab.log_tail("agent"))
        assert got.read_bytes() == (www / "f.bin").read_bytes()
        assert http_log.read_text().startswith("203.0.113.1 - "), http_log.read_text()
        fw = topo.run("nat2", "nft", "list", "counter", "ip6", "testbed_fw", "refused").stdout
        print(f"\n[v6 firewall] {' '.join(fw.split())}")

        # a paced stream: wan1 (IPv4) -> wan2 (IPv6) -> wan1, moved by hand
        client = topo.popen("mh", sys.executable, "-u", "-c", CLIENT, stdout=subprocess.PIPE,
                            text=True)

        def web_on(iface: str) -> bool:
            flows = [f for f in lab.agent_status()["flows"] if f["rule"] == "web"]
            return bool(flows) and all(f["interface"] == iface for f in flows)

        wait_for("the stream's flow on wan1", lambda: web_on("wan1"))
        time.sleep(1.0)
        lab.agent_cli("move", "--rule", "web", "--via", "wan2")
        wait_for("the flow on wan2", lambda: web_on("wan2"), 3)
        time.sleep(1.5)
        lab.agent_cli("move", "--rule", "web", "--via", "wan1")
        wait_for("the flow back on wan1", lambda: web_on("wan1"), 3)
        out, _ = client.communicate(timeout=30)
        assert client.returncode == 0, out
        c = json.loads(out)
        assert c["bytes"] == LINES * 100, c
        print(f"[v4 -> v6 -> v4] {c['bytes']} bytes whole, longest gap {c['gap'] * 1000:.0f} ms")
        tun = {t["interface"]: t for t in lab.agent_status()["tunnels"]}
        assert tun["wan2"]["rx_packets"] > 50, tun     # the stream did come over IPv6

        # a killed agent leaves its IPv6 rule and route; cleanup removes them exactly
        agent = lab.procs["agent"]
        os.killpg(agent.pid, signal.SIGKILL)
        agent.wait(10)
        assert "lookup 5552" in topo.run("mh", "ip", "-6", "rule").stdout
        topo.run("mh", *exe("upmt-agent"), "cleanup", "--config", str(lab.dir / "agent.toml"))
        assert state6(topo) == before
    finally:
        codes = lab.stop()
    assert codes == {"anchor0": 0, "agent": -signal.SIGKILL}, codes
    assert state6(topo) == before
