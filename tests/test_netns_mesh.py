"""UPMT-DAM mesh for real: two mobile hosts behind NATs of their own, on the same private
subnet, reach each other at their VIpAs through the anchor's relay.

        ns mh "laptop" (upmt-agent up)          ns mh2 "phone" (upmt-agent up)
     wan1 10.1.0.2     wan2 10.2.0.2               wan1 10.1.0.2  (the same subnet)
         |                 |                           |
     ns nat1 (masq)    ns nat2 (masq)              ns nat3 (masq)
     203.0.113.11      203.0.113.12                203.0.113.21
            \\                |                       /
                      ns inet: bridge br0
            /                                        \\
   ns an 203.0.113.1 (upmt-anchor, mesh = true)   ns ch 203.0.113.100 (the Internet)

A legacy ``curl`` on laptop downloads from a ``python -m http.server`` on phone at
phone's VIpA: the anchor only re-seals RELAY datagrams (its relay byte counters grow, its
TUN sees nothing), and a host outside the mesh reaches nobody. With ``direct`` (the
default) the agents find a direct path through their NATs (ICE on the tunnel sockets) and
the flow moves to it without the TCP connection noticing; laptop's two access networks
each get a direct path, so moving the flow to wan2 and back keeps it direct (phone's data
follows it); it goes back to the relay when the direct paths are cut; behind a symmetric
NAT (``masquerade random``) the relay stays.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from upmt_tun.lab import Lab
from upmt_tun.testbed import Topology, tool_missing

from .conftest import netns_missing

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(netns_missing() is not None, reason=str(netns_missing()))]

MESH = "mesh = true\n"


@pytest.fixture
def topo() -> Iterator[Topology]:
    t = Topology(second_mh=True)
    t.up()
    try:
        yield t
    finally:
        t.down()


@pytest.fixture
def www(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    root.mkdir()
    (root / "file.bin").write_bytes(os.urandom(4 << 20))
    return root


def http_server(topo: Topology, role: str, port: int, root: Path) -> Path:
    log = root.parent / f"http-{role}.log"
    topo.popen(role, "python3", "-u", "-m", "http.server", str(port), "--bind", "0.0.0.0",
               "--directory", str(root), stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while "Serving HTTP" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    return log


def curl(topo: Topology, role: str, url: str, out: Path | None = None, timeout: int = 20
         ) -> subprocess.CompletedProcess[str]:
    return topo.run(role, "curl", "-sS", "-m", str(timeout), "-o", str(out or "/dev/null"),
                    "-w", "%{http_code}", url, check=False, timeout=timeout + 5)


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def vipa(lab: Lab, agent: str) -> str:
    v = lab.agent_status(agent)["anchors"][0]["vipa"]
    assert isinstance(v, str)
    return v


def test_tcp_host_to_host_through_the_relay(topo: Topology, www: Path, tmp_path: Path) -> None:
    assert topo.access["wan1"] == ("10.1.0.2", "10.1.0.1")      # both hosts' wan1
    log = http_server(topo, "mh2", 8000, www)
    lab = Lab(topo, tmp_path / "lab", rules="", anchor_extra=MESH,
              agent_extra="direct = false\n").start()
    try:
        laptop_vipa, phone_vipa = vipa(lab, "agent"), vipa(lab, "agent2")
        got = tmp_path / "got.bin"
        r = curl(topo, "mh", f"http://{phone_vipa}:8000/file.bin", got)
        assert r.stdout == "200", (r.stderr, lab.log_tail("agent"), lab.log_tail("agent2"))
        assert sha(got) == sha(www / "file.bin")
        # phone saw laptop at laptop's VIpA (both NATs and the anchor are invisible)
        clients = [ln.split(" ")[0] for ln in log.read_text().splitlines() if '"GET ' in ln]
        assert clients == [laptop_vipa]
        st = lab.agent_status("agent")
        (peer,) = st["peers"]
        assert (peer["name"], peer["anchor"], peer["vipa"], peer["path"]) == (
            "phone", "an1", phone_vipa, "relay")
        assert peer["interface"] in ("wan1", "wan2") and peer["remote"] == "203.0.113.1:5060"
        (flow,) = [f for f in st["flows"] if f.get("peer") == "phone"]
        assert flow["rx_packets"] > 1000 and flow["anchor"] == "an1"
        text = lab.agent_cli("status").stdout
        assert "PEER" in text and f"phone        an1      {phone_vipa:15} relay" in text
        # the anchor relayed the bytes (ciphertext it re-sealed) and wrote none to its TUN
        an = lab.anchor_status()
        assoc = {a["mh"]: a for a in an["associations"]}
        assert assoc["phone"]["relay_rx_bytes"] > 4 << 20
        assert assoc["laptop"]["relay_tx_bytes"] > 4 << 20
        # and the other way: phone opens a connection to laptop
        http_server(topo, "mh", 8001, www)
        assert curl(topo, "mh2", f"http://{laptop_vipa}:8001/file.bin").stdout == "200"
        if not tool_missing("iperf3"):
            topo.popen("mh2", "iperf3", "-s", "-p", "5201")
            time.sleep(0.3)
            r = topo.run("mh", "iperf3", "-c", phone_vipa, "-p", "5201", "-t", "2", "-J",
                         check=False, timeout=30)
            assert r.returncode == 0, r.stderr
    finally:
        codes = lab.stop()
    assert codes == {"anchor0": 0, "agent": 0, "agent2": 0}
    assert "100.100." not in topo.run("mh", "ip", "-4", "route", "show", "table", "all").stdout


def test_a_host_outside_the_mesh_reaches_nobody(topo: Topology, www: Path,
                                                tmp_path: Path) -> None:
    http_server(topo, "mh2", 8000, www)
    http_server(topo, "mh", 8001, www)
    lab = Lab(topo, tmp_path / "lab", rules="", anchor_extra=MESH,
              peer_extra={"phone": "mesh = false"}).start()
    try:
        laptop_vipa, phone_vipa = vipa(lab, "agent"), vipa(lab, "agent2")
        # laptop's lookup of phone says nobody; phone has no mesh route at all
        assert curl(topo, "mh", f"http://{phone_vipa}:8000/file.bin", timeout=4).stdout \
            != "200"
        assert lab.agent_status("agent")["peers"] == []
        assert "100.100.0.0/16" not in topo.run("mh2", "ip", "route").stdout
        assert curl(topo, "mh2", f"http://{laptop_vipa}:8001/file.bin", timeout=4).stdout \
            != "200"
        # nor does a host of the Internet routing the pool to the anchor
        topo.run("ch", "ip", "route", "add", "100.100.0.0/16", "via", "203.0.113.1")
        assert curl(topo, "ch", f"http://{laptop_vipa}:8001/file.bin", timeout=4).stdout \
            != "200"
        an = lab.anchor_status()
        assert all(a["relay_rx_bytes"] == 0 for a in an["associations"])
    finally:
        lab.stop()


def _peer(lab: Lab, agent: str = "agent") -> dict[str, Any]:
    peers = lab.agent_status(agent)["peers"]
    return dict(peers[0]) if peers else {}


def _relayed(lab: Lab) -> int:
    return sum(int(a["relay_rx_bytes"]) for a in lab.anchor_status()["associations"])


def _direct_ifaces(lab: Lab) -> set[str]:
    return {p["interface"] for p in _peer(lab).get("paths", ())
            if p["path"] == "direct" and p["state"] == "up"}


def _direct_rx(lab: Lab, iface: str) -> int:
    """Bytes laptop received on its direct paths of ``iface``."""
    return sum(int(t["rx_bytes"]) for t in lab.agent_status()["tunnels"]
               if t["interface"] == iface and "~" in t["anchor"])


CUT_DIRECT = """table ip cut_direct {
  chain forward {
    type filter hook forward priority 0; policy accept;
    meta l4proto udp ip saddr != 203.0.113.1 ip daddr != 203.0.113.1 counter drop
  }
}
"""


def test_direct_path_takes_over_and_a_cut_falls_back_tcp_survives(
        topo: Topology, www: Path, tmp_path: Path) -> None:
    http_server(topo, "mh2", 8000, www)
    # a small receive buffer: the paced download is still running at the cut (autotuned,
    # laptop's socket would swallow the whole file over the fast direct path first)
    topo.run("mh", "sysctl", "-q", "-w", "net.ipv4.tcp_rmem=4096 65536 131072")
    lab = Lab(topo, tmp_path / "lab", rules="", anchor_extra=MESH).start()
    try:
        phone_vipa = vipa(lab, "agent2")
        got = tmp_path / "got.bin"
        (www / "big.bin").write_bytes(os.urandom(6 << 20))     # ~24 s at 250 kB/s
        dl = topo.popen("mh", "curl", "-sS", "-m", "60", "--limit-rate", "250K", "-o",
                        str(got), "-w", "%{http_code}", f"http://{phone_vipa}:8000/big.bin",
                        stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 15
        while _peer(lab).get("path") != "direct" and time.monotonic() < deadline:
            time.sleep(0.1)
        p = _peer(lab)
        assert p["path"] == "direct", (p, lab.log_tail("agent"), lab.log_tail("agent2"))
        # the direct pair is phone's NAT, never the shared private address 10.1.0.2
        assert p["remote"].startswith("203.0.113.21:"), p
        assert _peer(lab, "agent2")["remote"].startswith("203.0.113.1"), _peer(lab, "agent2")
        time.sleep(0.5)
        r0 = _relayed(lab)
        time.sleep(2)
        assert _relayed(lab) - r0 < 2000         # probes of the relay link only, no data
        # laptop has two access networks, each with a direct path of its own: the flow
        # moved to wan2 stays direct (phone's data follows it there), and back to wan1
        deadline = time.monotonic() + 5
        while _direct_ifaces(lab) != {"wan1", "wan2"} and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _direct_ifaces(lab) == {"wan1", "wan2"}, _peer(lab)
        (flow,) = [f for f in lab.agent_status()["flows"] if f.get("peer") == "phone"]
        for via in ("wan2", "wan1"):
            assert dl.poll() is None                       # the download still runs
            rx, r0 = _direct_rx(lab, via), _relayed(lab)
            lab.agent_cli("move", "--flow", str(flow["id"]), "--via", via)
            time.sleep(1.5)
            (f,) = [f for f in lab.agent_status()["flows"] if f.get("peer") == "phone"]
            assert f["interface"] == via, f
            assert _direct_rx(lab, via) - rx > 200_000, (  # the download came there
                f, lab.log_tail("agent", 25), lab.log_tail("agent2", 25))
            assert _relayed(lab) - r0 < 2000               # and not through the anchor
        # cut the direct path at phone's NAT: the flow falls back to the relay at once
        topo.run("nat3", "nft", "-f", "-", input=CUT_DIRECT.encode())
        deadline = time.monotonic() + 5
        while _peer(lab).get("path") != "relay" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _peer(lab)["path"] == "relay"
        r1 = _relayed(lab)
        deadline = time.monotonic() + 10         # (TCP's retransmission timer backs off)
        while _relayed(lab) - r1 < 100_000 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _relayed(lab) - r1 >= 100_000     # the download goes through the anchor again
        assert _peer(lab, "agent2")["path"] == "relay"
        out, _ = dl.communicate(timeout=70)
        assert out == "200"
        assert sha(got) == sha(www / "big.bin")   # one TCP connection, intact, every move
        (flow,) = [f for f in lab.agent_status()["flows"] if f.get("peer") == "phone"]
        reasons = [h["reason"] for h in flow["history"]]
        # the connection opened through the relay (its SYN waited for the relay, not for
        # a retransmission), moved to the direct path (again if wan2's came up first: then
        # to wan1's, first in interface order), to wan2's and back, and to the relay on
        # the cut
        i = reasons.index("operator")
        assert reasons[0] == "new flow" and set(reasons[1:i]) == {"direct path"}, reasons
        assert reasons[i:] == ["operator", "operator", "direct path lost"], reasons
    finally:
        lab.stop()


def test_symmetric_nat_keeps_the_relay_and_says_so(topo: Topology, www: Path,
                                                   tmp_path: Path) -> None:
    topo.rebind_nat("nat3")                  # masquerade random: a new port per destination
    http_server(topo, "mh2", 8000, www)
    lab = Lab(topo, tmp_path / "lab", rules="", anchor_extra=MESH).start()
    try:
        phone_vipa = vipa(lab, "agent2")
        assert curl(topo, "mh", f"http://{phone_vipa}:8000/file.bin").stdout == "200"
        deadline = time.monotonic() + 25
        while _peer(lab).get("ice") != "failed" and time.monotonic() < deadline:
            time.sleep(0.2)
        p = _peer(lab)
        assert p["path"] == "relay" and p["ice"] == "failed", p
        assert p["why_relay"] == "all checks failed"
        assert "relay" in lab.agent_cli("status").stdout
        assert curl(topo, "mh", f"http://{phone_vipa}:8000/file.bin").stdout == "200"
    finally:
        lab.stop()
