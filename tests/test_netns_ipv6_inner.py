"""IPv6 inside the tunnels, real daemons in network namespaces (root; marked netns).

The access networks are IPv4 only (behind their NATs); the anchor and the correspondent
are dual stack (``Topology(inner_v6=True)``); the anchor hands out IPv6 VIpAs from
``vipa6_pool``. A legacy ``curl -6`` from the mobile host goes through the tunnel and the
correspondent sees the anchor's IPv6 address (``curl -4`` beside it, and an IPv6 flow
moved between an IPv4 and an IPv6-only access network: tests/test_netns_outer_ipv6.py); a uid
rule selects an IPv6 flow; an IPv6 packet over the TUN's MTU gets no further than the host
(Packet Too Big, path MTU); a killed agent's IPv6 steering is removed by the next start;
the host is as before once the daemons stop.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from upmt_tun.lab import DEFAULT_RULES, Lab, exe
from upmt_tun.testbed import Topology, host_state, tool_missing

from .conftest import netns_missing

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(netns_missing() is not None, reason=str(netns_missing())),
    pytest.mark.skipif(bool(tool_missing("curl", "ping", "setpriv")),
                       reason="needs curl, ping and setpriv"),
]

CH6 = "2001:db8:113::100"
RULES6 = f"""
[[rule]]
name = "nobody6"
uid = 65534
dst = "{CH6}/128"
via = ["wan2"]
""" + DEFAULT_RULES + f"""
[[rule]]
name = "web6"
protocol = "tcp"
dst = "{CH6}/128"
dst_port = 8080
via = ["wan1", "wan2"]
"""


@pytest.fixture
def topo() -> Iterator[Topology]:
    t = Topology(inner_v6=True)
    t.up()
    try:
        yield t
    finally:
        t.down()


def test_curl6_through_the_tunnel_uid_rule_ptb_host_restored(topo: Topology,
                                                               tmp_path: Path) -> None:
    before_mh, before_an = host_state(topo, "mh"), host_state(topo, "an")
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "f").write_bytes(b"x" * 100_000)
    log = tmp_path / "http.log"
    # one dual-stack server (IPv4 clients would show as ::ffff:a.b.c.d)
    topo.popen("ch", "python3", "-u", "-m", "http.server", "8080", "--bind", "::",
               "--directory", str(tmp_path / "www"), stdout=open(log, "w"),
               stderr=subprocess.STDOUT)
    lab = Lab(topo, tmp_path / "lab", rules=RULES6,
              anchor_extra='vipa6_pool = "fd64:6464::/112"\n').start()
    try:
        st = lab.agent_status()
        assert st["vipa6_fix"] == "fd55:504d:5400::1"
        assert st["anchors"][0]["vipa6"] == "fd64:6464::2", lab.log_tail("agent")
        r = topo.run("mh", "curl", "-6", "-sS", "-m", "10", "-o", "/dev/null", "-w",
                     "%{http_code} %{size_download}", f"http://[{CH6}]:8080/f", check=False,
                     timeout=15)
        assert r.stdout == "200 100000", (r.stdout, r.stderr, lab.log_tail("agent"))
        deadline = time.monotonic() + 3
        while log.read_text().count('"GET ') < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        clients = [ln.split(" ")[0] for ln in log.read_text().splitlines() if '"GET ' in ln]
        assert clients[:1] == ["2001:db8:113::1"]  # the anchor
        # a uid rule: the IPv6 flow's rule is read back from conntrack (its ct mark)
        r = topo.run("mh", "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                     "curl", "-6", "-sS", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}",
                     f"http://[{CH6}]:8080/f", check=False, timeout=15)
        assert r.stdout == "200", r.stderr
        flows = {f["rule"]: f for f in lab.agent_status()["flows"]}
        assert {"web6", "nobody6"} <= set(flows)
        assert flows["web6"]["dst"] == CH6 and flows["web6"]["rx_packets"] > 10
        assert flows["nobody6"]["interface"] == "wan2" and flows["web6"]["interface"] == "wan1"
        # ICMPv6 echo through the tunnel (no rule: the TUN's fallback route), then one
        # over the TUN's MTU: IPv6 never fragments on the way, the sender learns the MTU
        ok = topo.run("mh", "ping", "-6", "-c", "1", "-W", "3", "-s", "1200", "-M", "do", CH6,
                      check=False)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        big = topo.run("mh", "ping", "-6", "-c", "1", "-W", "3", "-s", "1400", "-M", "do", CH6,
                       check=False)
        assert big.returncode != 0 and "too long" in (big.stdout + big.stderr).lower() \
            and "1440" in big.stdout + big.stderr, big.stdout + big.stderr
        assert lab.anchor_status()["associations"][0]["vipa6"] == "fd64:6464::2"
        # a killed agent leaves its IPv6 steering behind; the next start removes it
        lab.procs["agent"].send_signal(signal.SIGKILL)
        lab.procs["agent"].wait(5)
        assert "upmt_agent6" in topo.run("mh", "nft", "list", "tables").stdout
        lab._start("agent", "mh",  # noqa: SLF001
                   [*exe("upmt-agent"), "up", "--config", str(lab.dir / "agent.toml")])
        r = topo.run("mh", "curl", "-6", "-sS", "-m", "10", "-o", "/dev/null", "-w",
                     "%{http_code}", f"http://[{CH6}]:8080/f", check=False, timeout=15)
        assert r.stdout == "200", r.stderr
    finally:
        codes = lab.stop()
    assert codes == {"anchor0": 0, "agent": 0}
    assert host_state(topo, "mh") == before_mh
    assert host_state(topo, "an") == before_an
