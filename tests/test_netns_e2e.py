"""The real thing in network namespaces: real TUN, nftables, NATs, curl, iperf3.

           ns mh (rp_filter=1)            upmt-agent up
        wan1 10.1.0.2       wan2 10.2.0.2
            |                    |
        ns nat1 (masq)      ns nat2 (masq)
        203.0.113.11        203.0.113.12
              \\                /
               ns inet: bridge br0
              /        |          \\
   ns an 203.0.113.1   ns ch 203.0.113.100   (ns an2 203.0.113.2)
   upmt-anchor         python http.server, iperf3 -s
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from upmt_tun.lab import Lab, exe
from upmt_tun.testbed import Topology, host_state, tool_missing

from .conftest import netns_missing

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(netns_missing() is not None, reason=str(netns_missing()))]

CH = "203.0.113.100"


class HttpServer:
    """A legacy HTTP server (python -m http.server) in a namespace, serving a test file."""

    def __init__(self, topo: Topology, role: str, port: int, root: Path) -> None:
        self.log = root / f"http-{role}-{port}.log"
        self.proc = topo.popen(role, "python3", "-u", "-m", "http.server", str(port), "--bind",
                               "0.0.0.0", "--directory", str(root),
                               stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while "Serving HTTP" not in self.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)

    def clients(self) -> list[str]:
        return [line.split(" ")[0] for line in self.log.read_text().splitlines()
                if '"GET ' in line]


@pytest.fixture
def topo() -> Iterator[Topology]:
    t = Topology(anchors=2)
    t.up()
    try:
        yield t
    finally:
        t.down()


@pytest.fixture
def www(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    root.mkdir()
    (root / "file.bin").write_bytes(os.urandom(3 << 20))
    return root


def curl(topo: Topology, url: str, out: Path | None = None, timeout: int = 20,
         role: str = "mh") -> subprocess.CompletedProcess[str]:
    return topo.run(role, "curl", "-sS", "-m", str(timeout), "-o", str(out or "/dev/null"),
                    "-w", "%{http_code}", url, check=False, timeout=timeout + 5)


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def download_via_anchor(topo: Topology, lab: Lab, srv: HttpServer, www: Path, tmp_path: Path,
                        iface: str) -> None:
    """A legacy curl download through the tunnel: intact, seen by the CH from the anchor's
    address, and carried by the tunnel of ``iface``."""
    got = tmp_path / "got.bin"
    assert curl(topo, f"http://{CH}:8080/file.bin", got).stdout == "200"
    assert sha(got) == sha(www / "file.bin")
    assert srv.clients() == ["203.0.113.1"]
    (flow,) = lab.agent_status()["flows"]
    assert flow["interface"] == iface


def start_download(topo: Topology, lab: Lab, got: Path, rate: str = "1M",
                   timeout: int = 30) -> subprocess.Popen[str]:
    """A paced legacy curl download from the CH, started and seen by the agent (its flow
    is in the table) before this returns; ``communicate()`` gives the HTTP code."""
    dl = topo.popen("mh", "curl", "-sS", "-m", str(timeout), "--limit-rate", rate, "-o",
                    str(got), "-w", "%{http_code}", f"http://{CH}:8080/file.bin",
                    stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while not lab.agent_status()["flows"] and time.monotonic() < deadline:
        time.sleep(0.1)
    return dl


def test_download_through_anchor_other_flows_untouched_host_restored(
        topo: Topology, www: Path, tmp_path: Path) -> None:
    before_mh, before_an = host_state(topo, "mh"), host_state(topo, "an")
    s8080 = HttpServer(topo, "ch", 8080, www)
    s8081 = HttpServer(topo, "ch", 8081, www)
    lab = Lab(topo, tmp_path / "lab").start()
    try:
        got = tmp_path / "got.bin"
        r = curl(topo, f"http://{CH}:8080/file.bin", got)
        assert r.stdout == "200", lab.log_tail("agent")
        assert sha(got) == sha(www / "file.bin")           # bytes intact
        assert s8080.clients() == ["203.0.113.1"]          # the CH sees the anchor's address
        r = curl(topo, f"http://{CH}:8081/file.bin")
        assert r.stdout == "200"
        assert s8081.clients() == ["203.0.113.11"]         # outside every rule: normal routing
        st = lab.agent_status()
        assert st["vipa_fix"] == "100.64.0.1"
        assert {(t["interface"], t["state"]) for t in st["tunnels"]} == {
            ("wan1", "up"), ("wan2", "up")}
        for t in st["tunnels"]:
            assert set(t) >= {"id", "interface", "anchor", "local", "remote", "vipa", "state",
                              "rtt_ms", "tx_packets", "rx_packets"}
        (flow,) = [f for f in st["flows"] if f["dport"] == 8080]
        assert flow["rule"] == "web" and flow["interface"] == "wan1"
        assert flow["src"] == "10.1.0.2"                   # the application's own source
        assert flow["rx_packets"] > 1000
        an = lab.anchor_status()
        (assoc,) = an["associations"]
        assert assoc["mh"] == "laptop" and assoc["vipa"] == st["tunnels"][0]["vipa"]
        assert {t["remote"].split(":")[0] for t in assoc["tunnels"]} == {
            "203.0.113.11", "203.0.113.12"}                # NATed addresses learned
        text = lab.agent_cli("status").stdout
        assert "web" in text and "wan1" in text
    finally:
        codes = lab.stop()
    assert codes == {"anchor0": 0, "agent": 0}
    assert host_state(topo, "mh") == before_mh
    assert host_state(topo, "an") == before_an


def test_iperf3_through_the_tunnel(topo: Topology, tmp_path: Path) -> None:
    if tool_missing("iperf3"):
        pytest.skip("needs iperf3")
    topo.popen("ch", "iperf3", "-s", "-p", "5201")
    lab = Lab(topo, tmp_path / "lab").start()
    try:
        time.sleep(0.3)
        r = topo.run("mh", "iperf3", "-c", CH, "-p", "5201", "-t", "2", "-J", check=False,
                     timeout=30)
        res = json.loads(r.stdout)
        assert "error" not in res, res.get("error")
        assert res["end"]["sum_received"]["bytes"] > 1_000_000
        flows = lab.agent_status()["flows"]
        assert any(f["rule"] == "bulk" and f["dport"] == 5201 for f in flows)
    finally:
        lab.stop()


def test_preferred_second_interface_with_strict_rp_filter(topo: Topology, www: Path,
                                                          tmp_path: Path) -> None:
    """A rule preferring wan2 (not the default route): replies arrive on wan2 and on the TUN
    and must pass rp_filter=1 (the testbed sets it, as on RHEL laptops)."""
    assert topo.run("mh", "sysctl", "-n", "net.ipv4.conf.all.rp_filter").stdout.strip() == "1"
    srv = HttpServer(topo, "ch", 8080, www)
    rules = ('[[rule]]\nname = "web"\nprotocol = "tcp"\ndst_port = 8080\n'
             'via = ["wan2", "wan1"]\n')
    lab = Lab(topo, tmp_path / "lab", rules=rules).start()
    try:
        download_via_anchor(topo, lab, srv, www, tmp_path, "wan2")
    finally:
        lab.stop()


def test_rule_covering_the_anchor_never_steers_the_tunnels(topo: Topology, www: Path,
                                                           tmp_path: Path) -> None:
    """protocol any + dst = the whole segment the anchor is on: the tunnels' own packets
    must not loop into the TUN (SO_MARK exemption), and ping follows the rule too."""
    srv = HttpServer(topo, "ch", 8080, www)
    rules = '[[rule]]\nname = "all"\nprotocol = "any"\ndst = "203.0.113.0/24"\n'
    lab = Lab(topo, tmp_path / "lab", rules=rules).start()
    try:
        assert curl(topo, f"http://{CH}:8080/file.bin").stdout == "200"
        assert srv.clients() == ["203.0.113.1"]
        r = topo.run("mh", "ping", "-c", "2", "-W", "2", CH, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        st = lab.agent_status()
        assert all(t["state"] == "up" for t in st["tunnels"])
        assert {f["protocol"] for f in st["flows"]} == {"tcp", "icmp"}
    finally:
        lab.stop()


def test_no_leak_when_no_tunnel_is_usable(topo: Topology, www: Path, tmp_path: Path) -> None:
    """No anchor answers: ready still comes (first attempt failed), and the rule's traffic
    is dropped, never sent around the tunnel."""
    srv = HttpServer(topo, "ch", 8080, www)
    lab = Lab(topo, tmp_path / "lab")
    lab.write_configs()
    t0 = time.monotonic()
    lab._start("agent", "mh", [*exe("upmt-agent"), "up", "--config", str(lab.dir / "agent.toml")])
    assert time.monotonic() - t0 < 12
    try:
        assert curl(topo, f"http://{CH}:8080/file.bin", timeout=3).stdout != "200"
        assert srv.clients() == []
        st = lab.agent_status()
        assert all(t["state"] == "down" for t in st["tunnels"])
        assert st["anchors"][0]["state"] == "unreachable"
    finally:
        lab.stop()


def test_leftovers_of_a_killed_agent_are_removed(topo: Topology, www: Path,
                                                 tmp_path: Path) -> None:
    before = host_state(topo, "mh")
    HttpServer(topo, "ch", 8080, www)
    lab = Lab(topo, tmp_path / "lab").start()
    lab.procs["agent"].send_signal(signal.SIGKILL)
    lab.procs["agent"].wait(5)
    assert "upmt_agent" in topo.run("mh", "nft", "list", "tables").stdout   # left behind
    lab._start("agent", "mh", ["upmt-agent", "up", "--config", str(lab.dir / "agent.toml")])
    try:
        assert curl(topo, f"http://{CH}:8080/file.bin").stdout == "200"
    finally:
        codes = lab.stop()
    assert codes["agent"] == 0
    assert host_state(topo, "mh") == before


def test_second_agent_does_not_take_a_live_control_socket(topo: Topology, tmp_path: Path) -> None:
    lab = Lab(topo, tmp_path / "lab").start()
    try:
        r = topo.run("mh", "upmt-agent", "up", "--config", str(lab.dir / "agent.toml"),
                     check=False, timeout=20)
        assert r.returncode == 1
        assert "in use by a running process" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        lab.agent_status()   # the first agent still answers
    finally:
        lab.stop()


def test_two_anchors_and_a_fixed_host(topo: Topology, www: Path, tmp_path: Path) -> None:
    """UPMT-DAM: an anchor (NAT to the Internet) and a fixed host (terminates the tunnel
    itself): each association has its own VIpA; the fixed host's own server sees the MH's
    VIpA, the CH sees the anchor's address."""
    ch = HttpServer(topo, "ch", 8080, www)
    fh = HttpServer(topo, "an2", 8080, www)
    # a UDP echo server on the fixed host bound to 0.0.0.0: it must answer from the
    # address it was asked at (the fixed host's), not from its TUN's address
    topo.popen("an2", "python3", "-c", (
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.bind(('0.0.0.0', 9999))\nwhile True:\n    d, a = s.recvfrom(2048)\n"
        "    s.sendto(d, a)\n"))
    rules = ('[[rule]]\nname = "web"\nprotocol = "tcp"\ndst_port = 8080\n'
             '[[rule]]\nname = "echo"\nprotocol = "udp"\ndst_port = 9999\n')
    lab = Lab(topo, tmp_path / "lab", rules=rules, anchor_roles=("anchor", "fixed-host")).start()
    try:
        assert curl(topo, f"http://{CH}:8080/file.bin").stdout == "200"
        assert curl(topo, "http://203.0.113.2:8080/file.bin").stdout == "200"
        echo = topo.run("mh", "python3", "-c", (
            "import socket\nc = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "c.settimeout(3)\nc.connect(('203.0.113.2', 9999))\nc.send(b'ping')\n"
            "print(c.recv(100).decode())\n"), check=False)
        assert echo.stdout.strip() == "ping", echo.stderr[-300:]
        assert ch.clients() == ["203.0.113.1"]
        st = lab.agent_status()
        vipas = {a["name"]: a["vipa"] for a in st["anchors"]}
        assert fh.clients() == [vipas["an2"]]              # direct MH->FH tunnel, no NAT
        roles = {a["name"]: a["role"] for a in st["anchors"]}
        assert roles == {"an1": "anchor", "an2": "fixed-host"}
        by_dst = {(f["dst"], f["dport"]): f["anchor"] for f in st["flows"]}
        assert by_dst == {(CH, 8080): "an1", ("203.0.113.2", 8080): "an2",
                          ("203.0.113.2", 9999): "an2"}
        assert len(st["tunnels"]) == 4
        assert lab.anchor_status(1)["role"] == "fixed-host"
    finally:
        codes = lab.stop()
    assert set(codes.values()) == {0}


def test_same_private_subnet_on_both_access_networks(www: Path, tmp_path: Path) -> None:
    """Both access networks hand out 192.168.1.2/24 behind 192.168.1.1: each tunnel still
    leaves through its own interface and gets its own NAT mapping."""
    with Topology(same_subnet=True) as topo:
        srv = HttpServer(topo, "ch", 8080, www)
        rules = ('[[rule]]\nname = "web"\nprotocol = "tcp"\ndst_port = 8080\n'
                 'via = ["wan2", "wan1"]\n')
        lab = Lab(topo, tmp_path / "lab", rules=rules).start()
        try:
            (assoc,) = lab.anchor_status()["associations"]
            assert {t["remote"].split(":")[0] for t in assoc["tunnels"]} == {
                "203.0.113.11", "203.0.113.12"}
            download_via_anchor(topo, lab, srv, www, tmp_path, "wan2")
        finally:
            lab.stop()


def test_uid_rule_selects_one_users_traffic(topo: Topology, www: Path, tmp_path: Path) -> None:
    """A uid rule cannot be seen in a TUN packet: the agent reads the rule back from the
    conntrack mark. The same curl run as root is not steered."""
    if tool_missing("setpriv"):
        pytest.skip("needs setpriv")
    srv = HttpServer(topo, "ch", 8080, www)
    rules = '[[rule]]\nname = "nobody"\nprotocol = "tcp"\nuid = 65534\nvia = ["wan2"]\n'
    lab = Lab(topo, tmp_path / "lab", rules=rules).start()
    try:
        r = topo.run("mh", "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                     "curl", "-sS", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}",
                     f"http://{CH}:8080/file.bin", check=False, timeout=20)
        assert r.stdout == "200", r.stderr
        assert curl(topo, f"http://{CH}:8080/file.bin").stdout == "200"
        assert srv.clients() == ["203.0.113.1", "203.0.113.11"]
        (flow,) = lab.agent_status()["flows"]
        assert flow["rule"] == "nobody" and flow["interface"] == "wan2"
    finally:
        lab.stop()


def test_egress_policy_blocks_metadata_and_the_anchor_itself(topo: Topology, www: Path,
                                                             tmp_path: Path) -> None:
    """By default a mobile host reaches neither 169.254.169.254 (cloud metadata) nor the
    anchor's own addresses through the anchor; allow_egress opens the former."""
    topo.run("ch", "ip", "addr", "add", "169.254.169.254/32", "dev", "eth0")
    topo.run("an", "ip", "route", "add", "169.254.169.254/32", "via", CH)
    meta = HttpServer(topo, "ch", 8080, www)       # answers on CH and on the metadata address
    own = HttpServer(topo, "an", 8080, www)
    rules = '[[rule]]\nname = "web"\nprotocol = "tcp"\ndst_port = 8080\n'
    lab = Lab(topo, tmp_path / "lab", rules=rules).start()
    try:
        assert curl(topo, f"http://{CH}:8080/file.bin").stdout == "200"
        assert curl(topo, "http://169.254.169.254:8080/file.bin", timeout=3).stdout != "200"
        assert curl(topo, "http://203.0.113.1:8080/file.bin", timeout=3).stdout != "200"
        assert meta.clients() == ["203.0.113.1"] and own.clients() == []
    finally:
        lab.stop()
    lab = Lab(topo, tmp_path / "lab2", rules=rules,
              anchor_extra='allow_egress = ["169.254.169.254"]').start()
    try:
        assert curl(topo, "http://169.254.169.254:8080/file.bin").stdout == "200"
    finally:
        lab.stop()


def test_move_rule_during_a_download_is_seamless(topo: Topology, www: Path,
                                                 tmp_path: Path) -> None:
    """`upmt-agent move --rule` in the middle of a legacy download: the bytes arrive intact
    and the anchor's downlink follows the flow to the new interface by itself."""
    HttpServer(topo, "ch", 8080, www)
    lab = Lab(topo, tmp_path / "lab").start()
    try:
        got = tmp_path / "got.bin"
        dl = start_download(topo, lab, got)
        time.sleep(0.5)
        r = lab.agent_cli("move", "--rule", "web", "--via", "wan2")
        assert "1 flow(s) moved to wan2" in r.stdout
        out, _ = dl.communicate(timeout=30)
        assert out == "200" and sha(got) == sha(www / "file.bin")
        (flow,) = lab.agent_status()["flows"]
        assert flow["interface"] == "wan2" and flow["history"][-1]["reason"] == "operator"
        (an_flow,) = lab.anchor_status()["flows"]
        assert an_flow["interface"] == "wan2"
        # whichever reaches the anchor first: the HandoverReq or the flow's first packet
        assert an_flow["history"][-1]["reason"] in ("signalled handover", "implicit handover")
        bad = lab.agent_cli("move", "--rule", "nope", "--via", "wan1", check=False)
        assert bad.returncode == 2 and "no rule" in bad.stderr
        ok = lab.agent_cli("move", "--flow", str(flow["id"]), "--via", "wan1")
        assert ok.returncode == 0
    finally:
        lab.stop()


def test_run_steers_one_program_whatever_its_ports(topo: Topology, www: Path,
                                                   tmp_path: Path) -> None:
    """`upmt-agent run --rule R -- curl ...`: that curl's traffic belongs to R (cgroup v2 +
    nft socket cgroupv2) although R's header match never matches it; the same curl run
    normally is not steered."""
    srv = HttpServer(topo, "ch", 8080, www)
    rules = ('[[rule]]\nname = "prog"\nprotocol = "udp"\ndst_port = 9\n'
             'via = ["wan2"]\n')
    lab = Lab(topo, tmp_path / "lab", rules=rules)
    lab.write_configs()
    # `ip netns exec` mounts a fresh /sys without cgroup2: mount it in that private mount
    # namespace (the host's mounts are untouched), as a normally started agent has it.
    cg = "mount -t cgroup2 none /sys/fs/cgroup && exec "
    lab._start("anchor0", "an", ["upmt-anchor", "--config", str(lab.dir / "anchor0.toml")])
    lab._start("agent", "mh", ["sh", "-c", cg + f"upmt-agent up --config {lab.dir}/agent.toml"])
    try:
        r = topo.run("mh", "sh", "-c", cg + f"upmt-agent run --control {lab.agent_control} "
                     f"--rule prog -- curl -sS -m 10 -o /dev/null -w %{{http_code}} "
                     f"http://{CH}:8080/file.bin")
        assert r.stdout == "200", r.stderr
        assert curl(topo, f"http://{CH}:8080/file.bin").stdout == "200"
        assert srv.clients() == ["203.0.113.1", "203.0.113.11"]
        (flow,) = lab.agent_status()["flows"]
        assert flow["rule"] == "prog" and flow["interface"] == "wan2" and flow["dport"] == 8080
        bad = lab.agent_cli("run", "--rule", "nope", "--", "true", check=False)
        assert bad.returncode == 2
    finally:
        lab.stop()
    assert not list(Path("/sys/fs/cgroup").glob("upmt-*")), "cgroups left behind"
    assert not list(Path("/sys/fs/cgroup").glob("*/upmt-*")), "cgroups left behind"


def test_link_down_moves_flows_at_once_and_link_up_brings_the_tunnel_back(
        topo: Topology, www: Path, tmp_path: Path) -> None:
    """wan1 loses its carrier in the middle of a download: the agent hears it from the
    kernel, its tunnel goes down at once and the flow continues on wan2 (no keepalive
    timeout); when wan1 returns its route is re-made and its tunnel comes back up."""
    HttpServer(topo, "ch", 8080, www)
    lab = Lab(topo, tmp_path / "lab", agent_extra="keepalive = 30").start()
    try:
        got = tmp_path / "got.bin"
        dl = start_download(topo, lab, got)
        t0 = time.monotonic()
        topo.set_link("mh", "wan1", False)
        while time.monotonic() - t0 < 5:
            (flow,) = lab.agent_status()["flows"]
            if flow["interface"] == "wan2":
                break
            time.sleep(0.05)
        moved_after = time.monotonic() - t0
        assert flow["interface"] == "wan2" and flow["history"][-1]["reason"] == "link down"
        assert moved_after < 3.0       # keepalive is 30 s: only the link event explains this
        out, _ = dl.communicate(timeout=30)
        assert out == "200" and sha(got) == sha(www / "file.bin")
        topo.set_link("mh", "wan1", True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            states = {t["interface"]: t["state"] for t in lab.agent_status()["tunnels"]}
            if states == {"wan1": "up", "wan2": "up"}:
                break
            time.sleep(0.2)
        assert states == {"wan1": "up", "wan2": "up"}
    finally:
        lab.stop()


def test_nat_rebinding_mid_download_is_followed_at_once(topo: Topology, www: Path,
                                                        tmp_path: Path) -> None:
    """NAT1 forgets its mappings in the middle of a download and maps the tunnel anew on a
    random port. Keepalives are 30 s apart, so only the data path can notice: the anchor
    accepts the host's next authenticated packet from the new address, challenges it, and
    moves the tunnel there when the agent answers; the download completes intact."""
    HttpServer(topo, "ch", 8080, www)
    lab = Lab(topo, tmp_path / "lab", agent_extra="keepalive = 30").start()
    try:
        def wan1_remote() -> str:
            (assoc,) = lab.anchor_status()["associations"]
            return next(t["remote"] for t in assoc["tunnels"] if t["interface"] == "wan1")

        before = wan1_remote()
        got = tmp_path / "got.bin"
        dl = start_download(topo, lab, got, timeout=20)
        time.sleep(0.3)
        topo.rebind_nat("nat1")
        t0 = time.monotonic()
        while wan1_remote() == before and time.monotonic() - t0 < 10:
            time.sleep(0.05)
        rebound_after = time.monotonic() - t0
        assert wan1_remote() != before and wan1_remote().startswith("203.0.113.11:")
        print(f"NAT rebinding followed after {rebound_after * 1000:.0f} ms")
        assert rebound_after < 3.0, rebound_after     # a keepalive would take up to 30 s
        out, _ = dl.communicate(timeout=30)
        assert out == "200" and sha(got) == sha(www / "file.bin")
        paths = lab.anchor_status()["paths"]
        assert paths["path_rebound"] >= 1 and paths["path_challenge_sent"] >= 1
        (flow,) = lab.agent_status()["flows"]
        assert flow["interface"] == "wan1"           # the flow never left its tunnel
    finally:
        lab.stop()


def test_silent_path_death_moves_the_flow_and_it_returns_after_hysteresis(
        topo: Topology, www: Path, tmp_path: Path) -> None:
    """NAT1 starts dropping everything it forwards (no link event anywhere) in the middle
    of a download: the agent's probes stop coming back, the flow moves to wan2 ("probe
    loss") well before any keepalive (30 s) could notice; the download completes intact.
    When NAT1 forwards again the tunnel comes back, and the flow returns to wan1 only after
    `return_after` ("preference restored")."""
    HttpServer(topo, "ch", 8080, www)
    lab = Lab(topo, tmp_path / "lab", agent_extra="keepalive = 30\nreturn_after = 2").start()
    try:
        got = tmp_path / "got.bin"
        dl = start_download(topo, lab, got, rate="500K", timeout=25)
        time.sleep(0.3)
        topo.run("nat1", "nft", "-f", "-", input=(
            b"table ip silent {\n chain drop_all {\n"
            b"  type filter hook forward priority -10; policy drop;\n }\n}\n"))
        t0 = time.monotonic()
        while time.monotonic() - t0 < 10:
            (flow,) = lab.agent_status()["flows"]
            if flow["interface"] == "wan2":
                break
            time.sleep(0.05)
        moved_after = time.monotonic() - t0
        print(f"silent death: flow moved after {moved_after * 1000:.0f} ms (status polling)")
        assert flow["interface"] == "wan2" and flow["history"][-1]["reason"] == "probe loss"
        assert moved_after < 3.0, moved_after
        topo.run("nat1", "nft", "delete", "table", "ip", "silent")
        returned_at = None
        t1 = time.monotonic()
        up_at = None
        while time.monotonic() - t1 < 20:
            st = lab.agent_status()
            states = {t["interface"]: t["state"] for t in st["tunnels"]}
            if up_at is None and states.get("wan1") == "up":
                up_at = time.monotonic()
            (flow,) = st["flows"]
            if flow["interface"] == "wan1":
                returned_at = time.monotonic()
                break
            time.sleep(0.1)
        assert up_at is not None and returned_at is not None, (states, flow)
        assert returned_at - up_at >= 1.5          # return_after = 2 s (polled: some slack)
        assert flow["history"][-1]["reason"] == "preference restored"
        assert [h["reason"] for h in flow["history"]][-2:] == ["probe loss",
                                                               "preference restored"]
        text = lab.agent_cli("status").stdout
        assert "wan1 -> wan2  (probe loss)" in text and "(preference restored)" in text
        out, _ = dl.communicate(timeout=40)
        assert out == "200" and sha(got) == sha(www / "file.bin")
    finally:
        lab.stop()


def test_new_address_and_new_gateway_are_followed(topo: Topology, www: Path,
                                                  tmp_path: Path) -> None:
    """wan1 loses its address (the flow moves to wan2 at once, and the address is kept on
    the TUN for curl's connection, which was made from it), gets another one (its tunnel
    comes back through a new NAT mapping and the flow returns after `return_after`); then
    wan1's gateway changes and the old one disappears: the agent copies the new default
    route into wan1's own table and wan1's tunnel keeps working. The download completes."""
    HttpServer(topo, "ch", 8080, www)
    lab = Lab(topo, tmp_path / "lab", agent_extra="keepalive = 30\nreturn_after = 1").start()

    def wait_for(what: str, cond: Any, timeout: float = 15.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = lab.agent_status()
            if cond(st):
                return st
            time.sleep(0.1)
        raise AssertionError(f"{what}: {json.dumps(lab.agent_status())[:1500]}")

    def flow_on(iface: str) -> Any:
        return lambda st: [f["interface"] for f in st["flows"]] == [iface]

    def wan1_up(st: dict[str, Any]) -> bool:
        return any(t["interface"] == "wan1" and t["state"] == "up" for t in st["tunnels"])

    try:
        got = tmp_path / "got.bin"
        dl = start_download(topo, lab, got, rate="200K", timeout=40)
        wait_for("flow on wan1", flow_on("wan1"))
        topo.run("mh", "ip", "addr", "del", "10.1.0.2/24", "dev", "wan1")
        st = wait_for("flow moved off wan1", flow_on("wan2"), 3.0)
        assert st["flows"][0]["history"][-1]["reason"] == "address lost"
        topo.run("mh", "ip", "addr", "add", "10.1.0.3/24", "dev", "wan1")
        topo.run("mh", "ip", "route", "add", "default", "via", "10.1.0.1", "dev", "wan1",
                 "metric", "100")
        st = wait_for("flow back on wan1", flow_on("wan1"), 20.0)
        assert st["flows"][0]["history"][-1]["reason"] == "preference restored"
        # a new gateway on wan1's network; the old one goes away
        topo.run("nat1", "sysctl", "-qw", "net.ipv4.conf.lan.promote_secondaries=1")
        topo.run("nat1", "ip", "addr", "add", "10.1.0.254/24", "dev", "lan")
        topo.run("mh", "ip", "route", "replace", "default", "via", "10.1.0.254", "dev", "wan1",
                 "metric", "100")
        time.sleep(0.5)
        topo.run("nat1", "ip", "addr", "del", "10.1.0.1/24", "dev", "lan")
        time.sleep(2.0)                   # silence would be noticed within ~0.5 s
        st = lab.agent_status()
        assert wan1_up(st) and flow_on("wan1")(st), st
        table = topo.run("mh", "ip", "route", "show", "table", "all").stdout
        assert "default via 10.1.0.254 dev wan1 table" in table, table
        out, _ = dl.communicate(timeout=60)
        assert out == "200" and sha(got) == sha(www / "file.bin")   # lived through it all
    finally:
        lab.stop()


def test_offloaded_path_is_correct_under_packet_loss(topo: Topology, www: Path,
                                                     tmp_path: Path) -> None:
    """NAT1 drops 3% of the tunnel's datagrams both ways (nftables numgen): TCP recovers
    every lost segment through the offload path (TSO split, UDP GSO/GRO, GRO merge
    towards the TUN) and the file arrives intact, in both directions."""
    HttpServer(topo, "ch", 8080, www)
    topo.run("nat1", "nft", "-f", "-", input=(
        b"table ip lossy {\n chain drop_some {\n"
        b"  type filter hook forward priority -10; policy accept;\n"
        b"  udp dport 5060 numgen random mod 100 < 3 counter drop\n"
        b"  udp sport 5060 numgen random mod 100 < 3 counter drop\n }\n}\n"))
    lab = Lab(topo, tmp_path / "lab").start()
    try:
        got = tmp_path / "got.bin"
        assert curl(topo, f"http://{CH}:8080/file.bin", got, timeout=60).stdout == "200"
        assert sha(got) == sha(www / "file.bin")
        # upload: a legacy TCP sink on the CH (port 5201, the "bulk" rule) hashes all it got
        up = tmp_path / "up.bin"
        up.write_bytes(os.urandom(3 << 20))
        digest = tmp_path / "sink.sha"
        sink = topo.popen("ch", "python3", "-c", (
            "import hashlib, socket, sys\n"
            "s = socket.create_server(('0.0.0.0', 5201)); c, _ = s.accept(); h = hashlib.sha256()\n"
            "while (b := c.recv(65536)): h.update(b)\n"
            f"open({str(digest)!r}, 'w').write(h.hexdigest())\n"))
        time.sleep(0.5)
        topo.run("mh", "python3", "-c", (
            "import socket\n"
            f"c = socket.create_connection(({CH!r}, 5201)); c.sendall(open({str(up)!r}, 'rb')"
            ".read()); c.shutdown(socket.SHUT_WR); c.recv(1)\n"), timeout=60)
        sink.wait(30)
        assert digest.read_text() == sha(up)
        dropped = topo.run("nat1", "nft", "list", "table", "ip", "lossy").stdout
        assert "packets 0 " not in dropped, dropped      # the loss really happened
        assert {f["dport"] for f in lab.agent_status()["flows"]} == {8080, 5201}
    finally:
        lab.stop()
