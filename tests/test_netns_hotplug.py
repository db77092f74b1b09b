"""An access interface that does not exist at start, named by a pattern (issue 12 item 5).

The agent lists ``[[interface]] name = "usb*"`` and a rule that may only use it; no
``usb*`` device exists when it starts. The test then plugs a "tether" in: a veth pair
``usb0`` (mobile host) / ``usb`` (NAT2's side, a network of its own) with an address
and a default route, as a phone's DHCP would give. The tunnel must come up and a
download through the rule must work; the device is then deleted and created again
(unplugged and plugged back: a new ifindex) and the download must work again. After
the stop the host is as before.
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
from upmt_tun.testbed import Topology, host_state

from .conftest import netns_missing
from .test_netns_e2e import CH, HttpServer, curl
from .test_netns_ops import UNIT_CAPS

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(netns_missing() is not None, reason=str(netns_missing()))]

RULES = f"""
[[rule]]
name = "tether"
protocol = "tcp"
dst = "{CH}/32"
dst_port = 8080
via = ["usb*"]
"""
USB_ADDR, USB_GW = "10.3.0.2", "10.3.0.1"


@pytest.fixture
def topo() -> Iterator[Topology]:
    t = Topology()
    t.up()
    try:
        yield t
    finally:
        t.down()


def _until(what: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def _plug(topo: Topology) -> None:
    """The tether appears: usb0 in the mobile host, its other end in NAT2 (which
    masquerades whatever leaves its inet side), then an address and a default route."""
    subprocess_ip = ["ip", "link", "add", "usb0", "netns", topo.ns("mh"), "type", "veth",
                     "peer", "name", "usb", "netns", topo.ns("nat2")]
    topo.run("mh", *subprocess_ip)            # `ip` runs the same from any namespace
    topo.run("nat2", "ip", "addr", "add", f"{USB_GW}/24", "dev", "usb")
    topo.run("nat2", "ip", "link", "set", "usb", "up")
    topo.run("mh", "ip", "link", "set", "usb0", "up")
    topo.run("mh", "ip", "addr", "add", f"{USB_ADDR}/24", "dev", "usb0")
    topo.run("mh", "ip", "route", "add", "default", "via", USB_GW, "dev", "usb0",
             "metric", "300")


@pytest.mark.parametrize("caps", [[], UNIT_CAPS], ids=["root", "unit-caps"])
def test_a_pattern_interface_plugged_in_after_start_and_plugged_back(
        topo: Topology, tmp_path: Path, caps: list[str]) -> None:
    """As root, and with the unit's capability set (CAP_NET_ADMIN only: moving the bound
    socket to the new device is refused, a new socket takes its port)."""
    if caps and shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux)")
    www = tmp_path / "www"
    www.mkdir()
    (www / "file.bin").write_bytes(os.urandom(64 << 10))
    before = host_state(topo, "mh")
    srv = HttpServer(topo, "ch", 8080, www)
    lab = Lab(topo, tmp_path / "lab", rules=RULES)
    anchors, agent_cfg = lab.write_configs()
    text = agent_cfg.read_text()
    assert '[[interface]]\nname = "wan2"\n' in text
    agent_cfg.write_text(text.replace('[[interface]]\nname = "wan2"\n',
                                      '[[interface]]\nname = "wan2"\n\n'
                                      '[[interface]]\nname = "usb*"\n'))

    def tunnels() -> dict[str, str]:
        return {t["interface"]: t["state"] for t in lab.agent_status()["tunnels"]}

    def usb() -> dict[str, Any]:
        found: dict[str, Any] = next(i for i in lab.agent_status()["interfaces"]
                                     if i["name"] == "usb*")
        return found

    def download(tag: str) -> None:
        got = tmp_path / f"got-{tag}.bin"
        assert curl(topo, f"http://{CH}:8080/file.bin", got).stdout == "200", tag
        assert got.read_bytes() == (www / "file.bin").read_bytes()
        assert srv.clients()[-1] == topo.addresses["an"]          # through the anchor
        flows = [f for f in lab.agent_status()["flows"] if f["rule"] == "tether"]
        assert flows and all(f["interface"] == "usb*" for f in flows), flows

    try:
        lab._start("anchor0", "an", [*exe("upmt-anchor"), "--config", str(anchors[0])])
        t0 = time.monotonic()
        lab._start("agent", "mh", [*caps, *exe("upmt-agent"), "up", "-v", "--config",
                                   str(agent_cfg)])
        assert time.monotonic() - t0 < 10.0          # ready does not wait for usb*
        assert _until(lambda: tunnels().get("wan1") == "up", 10), lab.log_tail("agent")
        assert usb() == {"name": "usb*", "device": None, "up": False}
        assert tunnels()["usb*"] == "down"
        assert "interface usb* (no device)  down" in lab.agent_cli("status").stdout
        # nothing can use usb* yet: the rule's connection fails (blackhole), no leak
        assert curl(topo, f"http://{CH}:8080/file.bin", timeout=3).stdout != "200"

        _plug(topo)
        assert _until(lambda: tunnels().get("usb*") == "up", 20), lab.log_tail("agent", 40)
        assert usb() == {"name": "usb*", "device": "usb0", "up": True}
        first = topo.run("mh", "cat", "/sys/class/net/usb0/ifindex").stdout.strip()
        download("first")

        # unplugged: the device and its routes go, the entry goes down
        topo.run("mh", "ip", "link", "del", "usb0")
        assert _until(lambda: tunnels().get("usb*") == "down", 10), lab.log_tail("agent")
        assert usb()["device"] is None
        # plugged back: a new device of the same name, a new ifindex
        _plug(topo)
        again = topo.run("mh", "cat", "/sys/class/net/usb0/ifindex").stdout.strip()
        assert again != first
        assert _until(lambda: tunnels().get("usb*") == "up", 20), lab.log_tail("agent", 40)
        assert usb() == {"name": "usb*", "device": "usb0", "up": True}
        download("again")
        log = lab.log_tail("agent", 200)
        assert "device usb0 is gone" in log
        assert ("a new socket on port" in log) == bool(caps), log
    finally:
        codes = lab.stop()
    assert codes["agent"] == 0, lab.log_tail("agent")
    # the sysctl the agent set on the new device is put back, then the tether goes
    smark = topo.run("mh", "cat", "/proc/sys/net/ipv4/conf/usb0/src_valid_mark").stdout
    assert smark.strip() == "0"
    topo.run("mh", "ip", "link", "del", "usb0")
    assert host_state(topo, "mh") == before
