"""Tests of the network-namespace testbed (root, ip netns, nft, ping, curl)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from upmt_tun.testbed import Topology, tool_missing

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(
        bool(tool_missing("ip", "nft", "ping", "curl")), reason="needs ip, nft, ping, curl"
    ),
]


def _our_namespaces(topo: Topology) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    names = {line.split()[0] for line in out.stdout.splitlines() if line.strip()}
    return sorted(n for n in names if n.startswith(f"{topo.prefix}-"))


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def topo() -> Iterator[Topology]:
    t = Topology(attacker=True)
    with t:
        yield t
    assert _our_namespaces(t) == []


def test_tool_missing() -> None:
    assert tool_missing("ip", "surely-not-a-program-xyz") == ["surely-not-a-program-xyz"]


def test_ping_through_nat1(topo: Topology) -> None:
    assert set(_our_namespaces(topo)) == {
        topo.ns(r) for r in ("mh", "nat1", "nat2", "inet", "an", "ch", "atk")
    }
    routes = topo.run("mh", "ip", "route", "show", "default").stdout
    assert "via 10.1.0.1 dev wan1 metric 100" in routes
    assert "via 10.2.0.1 dev wan2 metric 200" in routes
    rp = topo.run("mh", "sysctl", "-n", "net.ipv4.conf.all.rp_filter").stdout.strip()
    assert rp == "1"
    topo.run("mh", "ping", "-c1", "-W1", topo.addresses["ch"])
    topo.run("mh", "ping", "-c1", "-W1", topo.addresses["atk"])
    # The masqueraded source is checked in the HTTP test; here fail over to wan2 / NAT2.
    topo.set_link("mh", "wan1", False)
    topo.run("mh", "ping", "-c1", "-W1", topo.addresses["an"])  # now via wan2 / NAT2
    topo.set_link("mh", "wan1", True)


def test_http_from_mh_to_ch_is_masqueraded(topo: Topology, tmp_path: Path) -> None:
    log = tmp_path / "http.log"
    with log.open("wb") as logf:
        server = topo.popen(
            "ch",
            sys.executable,
            "-u",
            "-m",
            "http.server",
            "--bind",
            "0.0.0.0",
            "--directory",
            str(tmp_path),
            "8080",
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
    url = f"http://{topo.addresses['ch']}:8080/"
    deadline = time.monotonic() + 10
    while True:
        res = topo.run("mh", "curl", "-sS", "-o", "/dev/null", "-m", "2", url, check=False)
        if res.returncode == 0 or time.monotonic() > deadline or server.poll() is not None:
            break
        time.sleep(0.1)
    assert res.returncode == 0, res.stderr + log.read_text()
    deadline = time.monotonic() + 5
    while "GET / " not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [ln for ln in log.read_text().splitlines() if "GET / " in ln]
    assert lines and all(ln.startswith("203.0.113.11 ") for ln in lines), log.read_text()


def test_same_subnet_variant() -> None:
    with Topology(same_subnet=True, anchors=2) as t:
        addrs = t.run("mh", "ip", "-4", "-o", "addr", "show").stdout
        assert addrs.count("192.168.1.2/24") == 2
        t.run("mh", "ping", "-c1", "-W1", t.addresses["an2"])
        t.run("mh", "ping", "-c1", "-W1", t.addresses["ch"])
    assert _our_namespaces(t) == []


def test_second_mobile_host_behind_its_own_nat_on_the_same_subnet() -> None:
    with Topology(same_subnet=True, second_mh=True) as t:
        addrs = t.run("mh2", "ip", "-4", "-o", "addr", "show").stdout
        assert "192.168.1.2/24" in addrs                 # the first MH's address, too
        t.run("mh2", "ping", "-c1", "-W1", t.addresses["an"])
        # seen by the Internet from its own NAT's address, not the first MH's
        out = t.run("mh2", "ip", "route", "get", t.addresses["an"]).stdout
        assert "via 192.168.1.1 dev wan1" in out
        assert t.addresses["nat3"] == "203.0.113.21"
        assert t.run("nat3", "nft", "list", "ruleset").stdout.count("masquerade") == 1
    assert _our_namespaces(t) == []


def test_ipv6_access_and_ipv6_inside_share_one_segment_plan() -> None:
    """Both IPv6 options at once (issue 14's item 6): the union of their segment addresses,
    wan2 IPv6-only behind the firewall, wan1 IPv4 behind its NAT."""
    with Topology(v6_access=True, inner_v6=True) as t:
        assert t.addresses6 == {"an": "2001:db8:113::1", "nat2": "2001:db8:113::12",
                                "ch": "2001:db8:113::100"}
        assert "inet " not in t.run("mh", "ip", "-4", "-o", "addr", "show", "dev",
                                    "wan2").stdout
        t.run("mh", "ping", "-c1", "-W1", t.addresses["an"])                 # via nat1
        t.run("mh", "ping", "-6", "-c1", "-W1", t.addresses6["an"])          # via wan2
        t.run("an", "ping", "-6", "-c1", "-W1", t.addresses6["ch"])          # dual stack
        t.run("ch", "ping", "-c1", "-W1", t.addresses["an"])
        refused = t.run("an", "ping", "-6", "-c1", "-W1", "2001:db8:2::2", check=False)
        assert refused.returncode != 0                       # only outgoing gets in
        assert "disable_ipv6 = 1" in t.run("nat1", "sysctl", "net.ipv6.conf.all."
                                           "disable_ipv6").stdout
    assert _our_namespaces(t) == []


def test_down_kills_everything_and_is_idempotent() -> None:
    t = Topology().up()
    tracked = t.popen("ch", "sleep", "300")
    # An untracked, detached process left in a namespace: found by `ip netns pids`.
    t.run("an", "sh", "-c", "setsid sleep 300 >/dev/null 2>&1 < /dev/null &")
    leftover = subprocess.run(
        ["ip", "netns", "pids", t.ns("an")], capture_output=True, text=True, check=True
    ).stdout.split()
    assert leftover
    t.down()
    t.down()
    assert _our_namespaces(t) == []
    assert tracked.poll() is not None
    deadline = time.monotonic() + 2
    while not all(_gone(int(p)) for p in leftover) and time.monotonic() < deadline:
        time.sleep(0.05)  # the orphan is reaped by init, not by us
    assert all(_gone(int(p)) for p in leftover)


def test_failed_up_cleans_up(monkeypatch: pytest.MonkeyPatch) -> None:
    t = Topology()
    monkeypatch.setattr(Topology, "_nat_ruleset", staticmethod(lambda: "this is not nft\n"))
    with pytest.raises(subprocess.CalledProcessError):
        t.up()
    assert _our_namespaces(t) == []
