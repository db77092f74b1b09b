"""Outer and inner IPv6 together with real daemons (issue 14, item 6 in one topology; item 1
and the outer parts of item 3): one access network IPv6-only, one IPv4-only, IPv6 inside.

           ns mh (upmt-agent up, vipa6_fix; the anchor is "anchor.upmt.test": A and AAAA)
        wan1 10.1.0.2                wan2 2001:db8:2::2 (no IPv4), default via fe80::1
            |                             |
        ns nat1 (IPv4 masquerade)     ns nat2: IPv6 router, firewall: only outgoing and
        203.0.113.11                  replies (ip6 testbed_fw), 2001:db8:113::12
              \\                           /
               ns inet: bridge br0
              /                 \\
   ns an 203.0.113.1 + 2001:db8:113::1      ns ch 203.0.113.100 + 2001:db8:113::100
   upmt-anchor, listen = "[::]:5060",       (dual-stack correspondent)
   vipa6_pool = "fd64:6464::/112"

Legacy ``curl -4`` and ``curl -6`` through the IPv6-only interface (rules via wan2 only)
reach the CH from the anchor's address of the right family; a paced TCP stream over IPv6
moves wan1 -> wan2 -> wan1 with ``upmt-agent move`` (inner IPv6 over outer IPv4, IPv6,
IPv4) and arrives whole; after the agent is killed, ``upmt-agent cleanup`` leaves the host
(IPv4 and IPv6 rules, routes, nft) as it was, and so does the stop (the anchor's too).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from upmt_tun.lab import DEFAULT_RULES, Lab, exe
from upmt_tun.testbed import V6_SEGMENT, Topology, host_state, tool_missing

from .conftest import netns_missing
from .paced_server import paced_tcp_server

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(netns_missing() is not None, reason=str(netns_missing()))]

CH, CH6 = "203.0.113.100", "2001:db8:113::100"
NAME = "anchor.upmt.test"
LINES, EVERY = 500, 0.01          # 5 s of 100-byte lines on port 8080 (the "web6" rule)
CLIENT = textwrap.dedent(f"""
    import json, socket, time
    s = socket.create_connection(("{CH6}", 8080), timeout=10)
    s.settimeout(60)
    got, last, gap = 0, time.time(), 0.0
    while d := s.recv(65536):
        gap, last = max(gap, time.time() - last), time.time()
        got += len(d)
    print(json.dumps({{"bytes": got, "gap": gap, "last": last}}), flush=True)
    """)
RULES = DEFAULT_RULES + f"""
[[rule]]
name = "v6web"
protocol = "tcp"
dst = "{CH}/32"
dst_port = 8081
via = ["wan2"]

[[rule]]
name = "v6web6"
protocol = "tcp"
dst = "{CH6}/128"
dst_port = 8081
via = ["wan2"]

[[rule]]
name = "web6"
protocol = "tcp"
dst = "{CH6}/128"
dst_port = 8080
via = ["wan1", "wan2"]
"""


@pytest.fixture
def topo() -> Iterator[Topology]:
    t = Topology(v6_access=True, inner_v6=True)
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


def test_ipv6_only_access_carries_tunnels_and_ipv6_flows_move_across_families(
        topo: Topology, tmp_path: Path) -> None:
    if tool_missing("curl"):
        pytest.skip("needs curl")
    # the premise: nothing unsolicited gets in to the IPv6-only network
    assert topo.run("an", "ping", "-6", "-c", "1", "-W", "1", "2001:db8:2::2",
                    check=False).returncode != 0
    before, before_an = state6(topo), host_state(topo, "an")
    www = tmp_path / "www"
    www.mkdir()
    (www / "f.bin").write_bytes(b"u" * 300_000)
    http_log = tmp_path / "http.log"
    # one dual-stack server: IPv4 clients show as ::ffff:a.b.c.d
    topo.popen("ch", "python3", "-m", "http.server", "8081", "--bind", "::", "--directory",
               str(www), stdout=subprocess.DEVNULL, stderr=open(http_log, "w"))
    server = topo.popen("ch", sys.executable, "-u", "-c",
                        paced_tcp_server(8080, LINES, EVERY, host="::"),
                        stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdout.readline().strip() == "listening"
    lab = Lab(topo, tmp_path / "lab", rules=RULES, listen="[::]:5060",
              anchor_address=f"{NAME}:5060", anchor_extra='vipa6_pool = "fd64:6464::/112"\n')
    lab.start()
    try:
        st = lab.agent_status()
        assert st["vipa6_fix"] == "fd55:504d:5400::1"
        assert st["anchors"][0]["vipa6"] == "fd64:6464::2", lab.log_tail("agent")
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

        # legacy curl -4 and -6 through the IPv6-only interface, seen by the CH from the
        # anchor's address of the right family
        got = tmp_path / "got.bin"
        for family, url in (("-4", f"http://{CH}:8081/f.bin"),
                            ("-6", f"http://[{CH6}]:8081/f.bin")):
            got.unlink(missing_ok=True)
            r = topo.run("mh", "curl", family, "-sS", "-m", "15", "-o", str(got), "-w",
                         "%{http_code}", url, check=False)
            assert r.stdout == "200", (family, r.stderr, lab.log_tail("agent"))
            assert got.read_bytes() == (www / "f.bin").read_bytes()
        deadline = time.monotonic() + 3
        while http_log.read_text().count('"GET ') < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        clients = [ln.split(" ")[0] for ln in http_log.read_text().splitlines()
                   if '"GET ' in ln]
        assert clients == ["::ffff:203.0.113.1", "2001:db8:113::1"], http_log.read_text()
        flows = {f["rule"]: f for f in lab.agent_status()["flows"]}
        assert flows["v6web"]["interface"] == flows["v6web6"]["interface"] == "wan2", flows
        fw = topo.run("nat2", "nft", "list", "counter", "ip6", "testbed_fw", "refused").stdout
        print(f"\n[v6 firewall] {' '.join(fw.split())}")

        # a paced stream over IPv6: wan1 (IPv4) -> wan2 (IPv6) -> wan1, moved by hand
        rx6 = {t["interface"]: t for t in lab.agent_status()["tunnels"]}["wan2"]["rx_packets"]
        client = topo.popen("mh", sys.executable, "-u", "-c", CLIENT, stdout=subprocess.PIPE,
                            text=True)

        def web_on(iface: str) -> bool:
            flows = [f for f in lab.agent_status()["flows"] if f["rule"] == "web6"]
            return bool(flows) and all(f["interface"] == iface for f in flows)

        wait_for("the stream's flow on wan1", lambda: web_on("wan1"))
        time.sleep(0.5)
        lab.agent_cli("move", "--rule", "web6", "--via", "wan2")
        wait_for("the flow on wan2", lambda: web_on("wan2"), 3)
        time.sleep(1.0)
        lab.agent_cli("move", "--rule", "web6", "--via", "wan1")
        back = time.time()                        # moved back by now (the CLI waits)
        wait_for("the flow back on wan1", lambda: web_on("wan1"), 3)
        out, _ = client.communicate(timeout=30)
        assert client.returncode == 0, out
        c = json.loads(out)
        assert c["bytes"] == LINES * 100, c
        assert c["last"] - back > 0.3, (c, back)   # it went on over IPv4 after the move back
        peer = server.stdout.readline()           # the CH saw the anchor's IPv6 address
        assert peer.startswith("peer [2001:db8:113::1]:"), peer
        print(f"[v4 -> v6 -> v4] {c['bytes']} bytes whole, longest gap {c['gap'] * 1000:.0f} ms,"
              f" {c['last'] - back:.1f} s more after the move back")
        tun = {t["interface"]: t for t in lab.agent_status()["tunnels"]}
        assert tun["wan2"]["rx_packets"] - rx6 > 50, tun   # the stream came over IPv6 too

        # a killed agent leaves its IPv6 rule and route; cleanup removes them exactly
        agent = lab.procs["agent"]
        os.killpg(agent.pid, signal.SIGKILL)
        agent.wait(10)
        assert "lookup 5552" in topo.run("mh", "ip", "-6", "rule").stdout
        assert "upmt_agent6" in topo.run("mh", "nft", "list", "tables").stdout
        topo.run("mh", *exe("upmt-agent"), "cleanup", "--config", str(lab.dir / "agent.toml"))
        assert state6(topo) == before
    finally:
        codes = lab.stop()
    assert codes == {"anchor0": 0, "agent": -signal.SIGKILL}, codes
    assert state6(topo) == before
    assert host_state(topo, "an") == before_an
