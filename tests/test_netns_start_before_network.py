"""Starting before the network with real daemons (issue 12 item 5).

The mobile host's wan2 has no address (and so no default route) when the agent starts,
and the anchor is given by a name that does not resolve yet. The name comes from
``/etc/hosts`` as the agent sees it: ``ip netns exec`` bind-mounts the files of
``/etc/netns/<ns>/`` over ``/etc`` in a private mount namespace, so the test gives the
mobile host's namespace its own ``hosts`` (empty at first), ``nsswitch.conf`` (files
only) and ``resolv.conf`` (a loopback name server nobody serves): no look-up leaves the
namespace. The agent must print ``ready``, show the anchor ``unresolved``, pick the
name up once the test writes it into that ``hosts`` file, and bring wan2's tunnel up
when wan2 gets its address; a rule that may only use wan2 then carries a download.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from upmt_tun.lab import Lab, exe
from upmt_tun.testbed import Topology

from .conftest import netns_missing
from .test_netns_e2e import CH, HttpServer, curl

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(netns_missing() is not None, reason=str(netns_missing()))]

ANCHOR_NAME = "anchor.upmt-test.invalid"

RULES = f"""
[[rule]]
name = "only2"
protocol = "tcp"
dst = "{CH}/32"
dst_port = 8080
via = ["wan2"]
"""


@pytest.fixture
def topo() -> Iterator[Topology]:
    t = Topology()
    t.up()
    etc = Path("/etc/netns") / t.ns("mh")
    try:
        etc.mkdir(parents=True)
        (etc / "hosts").write_text("127.0.0.1 localhost\n")
        (etc / "nsswitch.conf").write_text("hosts: files\n")
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        yield t
    finally:
        t.down()
        shutil.rmtree(etc, ignore_errors=True)


@pytest.fixture
def www(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    root.mkdir()
    (root / "file.bin").write_bytes(os.urandom(64 << 10))
    return root


def _until(what: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def test_agent_starts_before_wan2_and_the_anchor_name(topo: Topology, www: Path,
                                                      tmp_path: Path) -> None:
    mh = topo.ns("mh")
    wan2_addr, wan2_gw = topo.access["wan2"]
    topo.run("mh", "ip", "addr", "flush", "dev", "wan2")          # its route goes too
    assert "wan2" not in topo.run("mh", "ip", "route", "show", "default").stdout
    srv = HttpServer(topo, "ch", 8080, www)
    lab = Lab(topo, tmp_path / "lab", rules=RULES)
    anchors, agent_cfg = lab.write_configs()
    an_addr = topo.addresses["an"]
    text = agent_cfg.read_text()
    assert f'address = "{an_addr}:5060"' in text
    agent_cfg.write_text(text.replace(f'address = "{an_addr}:5060"',
                                      f'address = "{ANCHOR_NAME}:5060"'))
    try:
        lab._start("anchor0", "an", [*exe("upmt-anchor"), "--config", str(anchors[0])])
        t0 = time.monotonic()
        lab._start("agent", "mh", [*exe("upmt-agent"), "up", "-v", "--config",
                                   str(agent_cfg)])
        assert time.monotonic() - t0 < 10.0          # ready within the READY_TIMEOUT
        st = lab.agent_status()
        assert st["anchors"][0]["state"] == "unresolved"
        assert st["anchors"][0]["address"] is None and st["tunnels"] == []
        assert "cannot resolve" in lab.log_tail("agent", 50)
        assert "anchor an1 -  unresolved" in lab.agent_cli("status").stdout
        # no flow can use wan2 yet: the rule's connection fails (blackhole), nothing leaks
        assert curl(topo, f"http://{CH}:8080/file.bin", timeout=3).stdout != "200"

        # the name starts resolving (written in place: the bind mount keeps the inode)
        with open(Path("/etc/netns") / mh / "hosts", "a") as f:
            f.write(f"{an_addr} {ANCHOR_NAME}\n")

        def tunnels() -> dict[str, str]:
            return {t["interface"]: t["state"] for t in lab.agent_status()["tunnels"]}

        # the backoff retries within a few seconds (1, 2, 4 ... s)
        assert _until(lambda: tunnels().get("wan1") == "up", 20), lab.log_tail("agent")
        st = lab.agent_status()
        assert st["anchors"][0]["address"] == f"{an_addr}:5060"
        assert st["anchors"][0]["state"] == "associated"
        assert tunnels()["wan2"] != "up"

        # wan2 gets its address and its default route (as DHCP would)
        topo.run("mh", "ip", "addr", "add", f"{wan2_addr}/24", "dev", "wan2")
        topo.run("mh", "ip", "route", "add", "default", "via", wan2_gw, "dev", "wan2",
                 "metric", "200")
        assert _until(lambda: tunnels().get("wan2") == "up", 20), lab.log_tail("agent")

        got = tmp_path / "got.bin"
        assert curl(topo, f"http://{CH}:8080/file.bin", got).stdout == "200"
        assert got.read_bytes() == (www / "file.bin").read_bytes()
        assert srv.clients()[-1] == an_addr                # through the anchor
        flows = [f for f in lab.agent_status()["flows"] if f["rule"] == "only2"]
        assert flows and all(f["interface"] == "wan2" for f in flows)
    finally:
        codes = lab.stop()
    assert codes["agent"] == 0, lab.log_tail("agent")


def test_an_interface_down_at_start_comes_up_later(topo: Topology, www: Path,
                                                    tmp_path: Path) -> None:
    """wan2 administratively down (no carrier) at start, its address kept: the kernel
    dropped its routes. The agent starts, wan2's tunnel waits; the link comes up and its
    default route is added again (as a network manager does): the tunnel comes up."""
    _, wan2_gw = topo.access["wan2"]
    topo.set_link("mh", "wan2", False)
    srv = HttpServer(topo, "ch", 8080, www)
    lab = Lab(topo, tmp_path / "lab", rules=RULES)
    try:
        t0 = time.monotonic()
        lab.start()
        assert time.monotonic() - t0 < 20.0

        def tunnels() -> dict[str, str]:
            return {t["interface"]: t["state"] for t in lab.agent_status()["tunnels"]}

        assert _until(lambda: tunnels().get("wan1") == "up", 10)
        assert tunnels()["wan2"] == "down"
        topo.set_link("mh", "wan2", True)
        topo.run("mh", "ip", "route", "add", "default", "via", wan2_gw, "dev", "wan2",
                 "metric", "200")
        assert _until(lambda: tunnels().get("wan2") == "up", 20), lab.log_tail("agent")
        assert curl(topo, f"http://{CH}:8080/file.bin").stdout == "200"
        assert srv.clients()[-1] == topo.addresses["an"]
        flows = [f for f in lab.agent_status()["flows"] if f["rule"] == "only2"]
        assert flows and all(f["interface"] == "wan2" for f in flows)
    finally:
        codes = lab.stop()
    assert codes["agent"] == 0, lab.log_tail("agent")
