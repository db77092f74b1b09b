"""``reload`` with real daemons (issue 12 item 3): a live TCP stream on a rule that a
reload leaves alone survives a reload that adds a rule (it steers new connections at
once), removes another (it steers no more) and edits a third, with the rules reordered
around it; a config that does not load or that the host refuses changes nothing (nft
table and status identical); SIGHUP without a terminal reloads; after a restart the
stream's connection still belongs to its rule (the mark slots were saved). The anchor's reload
removes one peer (its association ends) while another host's stream lives.

    mh (upmt-agent) wan1/wan2 -- nat1/nat2 --+
    mh2 ("phone", second test only) -- nat3 -+-- inet -- an (upmt-anchor) 203.0.113.1
                                             +-- ch 203.0.113.100: paced TCP :8080,
                                                 "who am I" servers :8081 :5201
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from upmt_tun.lab import Lab, exe
from upmt_tun.system.agent_host import rule_ct_mark
from upmt_tun.system.cgroups import RuleCgroups
from upmt_tun.testbed import Topology, host_state

from .conftest import netns_missing
from .paced_server import paced_tcp_server
from .test_netns_recover import TCP_CLIENT, tunnels_up, wait_for

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(netns_missing() is not None, reason=str(netns_missing()))]

CH = "203.0.113.100"
ANCHOR = "203.0.113.1"
EVERY, LINES = 0.01, 500           # the anchor's stream: 100-byte lines every 10 ms, 5 s
LONG = 6000                        # the agent's: until the test ends it (at most 60 s)


def rules(*blocks: tuple[str, int, str]) -> str:
    return "".join(f'\n[[rule]]\nname = "{n}"\nprotocol = "tcp"\ndst = "{CH}/32"\n'
                   f"dst_port = {port}\nvia = {via}\n" for n, port, via in blocks)


OLD = rules(("bulk", 5201, '["wan1", "wan2"]'), ("web", 8080, '["wan1", "wan2"]'),
            ("alt", 9001, '["wan1", "wan2"]'))
# "new" first (web moves from position 1 to 2), alt edited, bulk removed
NEW = rules(("new", 8081, '["wan1", "wan2"]'), ("alt", 9001, '["wan2", "wan1"]'),
            ("web", 8080, '["wan1", "wan2"]'))

# reads the stream to its end: bytes, and every gap between arrivals over 50 ms (when it
# ended, how long), so a test tells the reload's gap from the restart's
CLIENT = textwrap.dedent(f"""
    import json, socket, time
    s = socket.create_connection(("{CH}", 8080), timeout=10)
    s.settimeout(60)
    got, last, gaps = 0, time.time(), []
    while True:
        d = s.recv(65536)
        now = time.time()
        if not d:
            break
        if now - last > 0.05:
            gaps.append((now, now - last))
        last = now
        got += len(d)
    print(json.dumps({{"bytes": got, "gaps": gaps}}), flush=True)
    """)

# accepts connections and tells each client the address it came from, then closes
WHO = textwrap.dedent("""
    import socket, sys
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", int(sys.argv[1])))
    srv.listen(8)
    print("listening", flush=True)
    while True:
        c, peer = srv.accept()
        c.sendall(peer[0].encode())
        c.close()
    """)


@pytest.fixture
def topo() -> Iterator[Topology]:
    t = Topology()
    t.up()
    try:
        yield t
    finally:
        t.down()


@pytest.fixture
def topo2() -> Iterator[Topology]:
    t = Topology(second_mh=True)
    t.up()
    try:
        yield t
    finally:
        t.down()


def _server(topo: Topology, *argv: str) -> subprocess.Popen[str]:
    p = topo.popen("ch", "python3", "-u", "-c", *argv, stdout=subprocess.PIPE,
                   stderr=subprocess.STDOUT, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "listening"
    return p


def seen_as(topo: Topology, port: int) -> str:
    """The source address ch sees for a new connection from mh to ``port``: the anchor's
    when a rule steers it, a NAT's otherwise."""
    r = topo.run("mh", "python3", "-c", "import socket,sys; s = socket.create_connection("
                 f"('{CH}', {port}), timeout=5); print(s.recv(64).decode())")
    return r.stdout.strip()


def ct_mark(topo: Topology, port: int) -> int:
    out = topo.run("mh", "conntrack", "-L", "-p", "tcp", "--dport", str(port)).stdout
    marks = re.findall(r"mark=(\d+)", out)
    assert len(marks) == 1, out
    return int(marks[0])


def stable(st: dict[str, Any]) -> dict[str, Any]:
    """What a reload could change in ``status`` (counters and timers left out)."""
    return {"anchors": st["anchors"],
            "tunnels": sorted((t["id"], t["interface"], t["anchor"], t["state"])
                              for t in st["tunnels"]),
            "flows": sorted((f["id"], f["rule"], f["anchor"], f["interface"])
                            for f in st["flows"])}


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def reload(lab: Lab, cfg: Path) -> subprocess.CompletedProcess[str]:
    return lab.agent_cli("reload", "--config", str(cfg), check=False)


def test_agent_reload_keeps_a_live_stream_and_a_bad_config_changes_nothing(
        topo: Topology, tmp_path: Path) -> None:
    stream = _server(topo, paced_tcp_server(8080, LONG, EVERY))
    who = [_server(topo, WHO, str(port)) for port in (8081, 5201)]
    lab = Lab(topo, tmp_path / "lab", rules=OLD)
    lab.start()
    client = None
    try:
        wait_for(lambda: tunnels_up(lab), 20, "both tunnels up")
        assert seen_as(topo, 5201) == ANCHOR           # bulk steers
        assert seen_as(topo, 8081) != ANCHOR           # no rule yet
        client = topo.popen("mh", "python3", "-u", "-c", CLIENT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
        t_client = time.time()
        wait_for(lambda: any(f["rule"] == "web" for f in lab.agent_status()["flows"]), 10,
                 "the stream's flow")
        mark = ct_mark(topo, 8080)
        assert mark == rule_ct_mark(1, 0x5550)         # web is the second rule at start

        agent_cfg = lab.dir / "agent.toml"
        head = agent_cfg.read_text().split("\n[[rule]]")[0]
        agent_cfg.write_text(head + NEW)
        r = reload(lab, agent_cfg)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == ("reloaded: rule new added, rule bulk removed, "
                                    "rule alt edited")
        assert seen_as(topo, 8081) == ANCHOR           # the new rule, for new connections
        assert seen_as(topo, 5201) != ANCHOR           # the removed one steers no more
        assert ct_mark(topo, 8080) == mark             # the stream's mark still names web
        flows = lab.agent_status()["flows"]
        assert {f["rule"] for f in flows} >= {"web", "new"}, flows

        # bad configs: the running file is no longer TOML (the agent reads it: no
        # --config); a new rule whose cgroup does not exist (refused by the host step,
        # after its own run cgroup was made: that goes again)
        nft_before = topo.run("mh", "nft", "list", "table", "ip", "upmt_agent").stdout
        st_before = stable(lab.agent_status())
        agent_cfg.write_text(head + NEW + "\n[[rule]\n")
        bad = lab.agent_cli("reload", check=False)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        assert "not valid TOML" in bad.stderr
        agent_cfg.write_text(head + NEW)
        broken = lab.dir / "broken.toml"
        broken.write_text(head + NEW + '\n[[rule]]\nname = "bad"\ncgroup = "no/such/group"\n')
        bad = reload(lab, broken)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        assert "no/such/group" in bad.stderr and "Traceback" not in bad.stderr
        # one nft itself refuses (the config loader lets this uid through): the dry run
        broken.write_text(head + NEW + '\n[[rule]]\nname = "big"\nuid = 1099511627776\n')
        bad = reload(lab, broken)
        assert bad.returncode == 2 and "nft: " in one_line(bad.stderr), bad.stderr
        cg = RuleCgroups(lab.agent_control, [])
        assert cg.root is None or not cg.path("bad").exists()
        assert topo.run("mh", "nft", "list", "table", "ip", "upmt_agent").stdout == nft_before
        assert stable(lab.agent_status()) == st_before

        # SIGHUP (no controlling terminal here): a reload of the running file, not a stop
        lab.procs["agent"].send_signal(signal.SIGHUP)
        wait_for(lambda: "SIGHUP: reloading" in lab.log_tail("agent", 5)
                 and "no change" in lab.log_tail("agent", 5), 5, "the SIGHUP reload")
        assert lab.procs["agent"].poll() is None

        # a restart after the reload: the stream's ct mark still names web (the slots
        # were saved), though web's position now belongs to alt
        agent = lab.procs["agent"]
        t_restart = time.time()
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(15) == 0
        lab._start("agent", "mh", [*exe("upmt-agent"), "up", "--config",  # noqa: SLF001
                                   str(agent_cfg)])
        relearnt = wait_for(lambda: [f for f in lab.agent_status()["flows"]
                                     if f["dport"] == 8080], 10, "the stream learnt again")
        rx = relearnt[0]["rx_packets"]
        wait_for(lambda: [f for f in lab.agent_status()["flows"]
                          if f["dport"] == 8080 and f["rx_packets"] > rx + 20], 10,
                 "the stream flowing after the restart")
        # the server stops (its FIN: a clean end); a reset would fail the client. It
        # writes a line every 10 ms whatever the path does, so after 3.5 s the client
        # must have every one of them (> 300 below) unless the connection lost some:
        # the steps above can take less than that on a fast machine
        time.sleep(max(0.0, t_client + 3.5 - time.time()))
        stream.kill()
        stream.wait(5)
        stdout, stderr = client.communicate(timeout=30)
        assert client.returncode == 0, stderr[-300:]
        got = json.loads(stdout)
        log = lab.log_tail("agent", 20)
    finally:
        if client is not None and client.poll() is None:
            client.kill()
        lab.stop()
        for p in (stream, *who):
            p.kill()
            p.wait(5)
    assert got["bytes"] % 100 == 0 and got["bytes"] > 300 * 100, (got, log)
    assert [f["rule"] for f in relearnt] == ["web"], relearnt
    reloads = max((g for end, g in got["gaps"] if end < t_restart), default=0.0)
    restart = max((g for end, g in got["gaps"] if end >= t_restart), default=0.0)
    print(f"\n[agent reload] stream intact ({got['bytes'] // 100} lines); largest gap "
          f"across the reloads {reloads:.3f} s (0: none over 50 ms), across the restart "
          f"{restart:.3f} s")


def test_anchor_reload_removes_one_peer_while_another_streams(topo2: Topology,
                                                              tmp_path: Path) -> None:
    stream = _server(topo2, paced_tcp_server(8080, LINES, EVERY))
    lab = Lab(topo2, tmp_path / "lab")
    lab.start()
    client = None
    try:
        wait_for(lambda: tunnels_up(lab), 20, "laptop's tunnels up")
        wait_for(lambda: len(lab.anchor_status()["associations"]) == 2, 10, "two hosts")
        client = topo2.popen("mh", "python3", "-u", "-c", TCP_CLIENT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        wait_for(lambda: lab.anchor_status()["flows"], 10, "the stream's flow at the anchor")
        cfg = lab.dir / "anchor0.toml"
        text = cfg.read_text()
        head, *peers = text.split("[[peer]]")
        kept = [p for p in peers if '"phone"' not in p]
        assert len(kept) == 1
        cfg.write_text(head + "".join("[[peer]]" + p for p in kept))
        r = topo2.run("an", *exe("upmt-anchor"), "reload", "--control", lab.anchor_control(0),
                      "--config", str(cfg), check=False)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "reloaded: peer phone removed"
        assert [a["mh"] for a in lab.anchor_status()["associations"]] == ["laptop"]
        cfg.write_text(text.replace("[[peer]]", "[[peer", 1))
        bad = topo2.run("an", *exe("upmt-anchor"), "reload", "--control",
                        lab.anchor_control(0), "--config", str(cfg), check=False)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        stdout, stderr = client.communicate(timeout=30)
        assert client.returncode == 0, stderr[-300:]
        got = json.loads(stdout)
        time.sleep(0.5)
        assocs = [a["mh"] for a in lab.anchor_status()["associations"]]
        refused = lab.anchor_status()["drops"].get("handshake_refused", 0)
    finally:
        if client is not None and client.poll() is None:
            client.kill()
        lab.stop()
        stream.kill()
        stream.wait(5)
    assert got["bytes"] == LINES * 100, got
    assert assocs == ["laptop"]                 # phone's handshakes are refused now
    print(f"\n[anchor reload] stream intact, largest gap {got['gap']:.3f} s, "
          f"phone's refused handshakes {refused}")


WEB = (f'\n[[rule]]\nname = "web"\nprotocol = "tcp"\ndst = "{CH}/32"\ndst_port = 8080\n')
WAN2 = '[[interface]]\nname = "wan2"\n\n'


def test_agent_reload_adds_and_removes_an_interface_under_a_live_stream(
        topo: Topology, tmp_path: Path) -> None:
    """Started with wan1 only: a reload adds wan2 (socket, rules, table, nft, tunnel),
    the live stream is moved there and flows; a reload that removes wan2 moves it back
    first, and it survives. After the stop the host is exactly as before the start."""
    before = host_state(topo, "mh")
    stream = _server(topo, paced_tcp_server(8080, LONG, EVERY))
    lab = Lab(topo, tmp_path / "lab", rules=WEB)
    anchors, agent_cfg = lab.write_configs()
    full = agent_cfg.read_text()
    assert WAN2 in full
    agent_cfg.write_text(full.replace(WAN2, ""))          # wan1 only
    client = None
    try:
        lab._start("anchor0", "an", [*exe("upmt-anchor"), "--config",  # noqa: SLF001
                                     str(anchors[0])])
        lab._start("agent", "mh", [*exe("upmt-agent"), "up", "--config",  # noqa: SLF001
                                   str(agent_cfg)])
        client = topo.popen("mh", "python3", "-u", "-c", CLIENT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
        (flow,) = wait_for(lambda: [f for f in lab.agent_status()["flows"]
                                    if f["rule"] == "web"], 10, "the stream's flow")
        assert flow["interface"] == "wan1"

        agent_cfg.write_text(full)                           # + wan2
        r = reload(lab, agent_cfg)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "reloaded: interface wan2 added"
        wait_for(lambda: tunnels_up(lab), 10, "wan2's tunnel up")
        nft = topo.run("mh", "nft", "list", "table", "ip", "upmt_agent").stdout
        assert 'iifname "wan2"' in nft and "0x00005552" in nft, nft
        assert "lookup 5552" in topo.run("mh", "ip", "rule").stdout
        assert "default via" in topo.run("mh", "ip", "route", "show", "table", "5552").stdout
        moved = lab.agent_cli("move", "--flow", str(flow["id"]), "--via", "wan2")
        assert "1 flow(s) moved to wan2" in moved.stdout

        def rx_on(iface: str, more_than: int) -> Any:
            return [f for f in lab.agent_status()["flows"] if f["id"] == flow["id"]
                    and f["interface"] == iface and f["rx_packets"] > more_than]

        (on2,) = wait_for(lambda: rx_on("wan2", 0), 5, "the flow on wan2")
        wait_for(lambda: rx_on("wan2", on2["rx_packets"] + 20), 10, "the stream via wan2")

        agent_cfg.write_text(full.replace(WAN2, ""))         # - wan2
        r = reload(lab, agent_cfg)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "reloaded: interface wan2 removed"
        st = lab.agent_status()
        assert [i["name"] for i in st["interfaces"]] == ["wan1"]
        assert {t["interface"] for t in st["tunnels"]} == {"wan1"}
        (on1,) = wait_for(lambda: rx_on("wan1", 0), 5, "the flow back on wan1")
        wait_for(lambda: rx_on("wan1", on1["rx_packets"] + 20), 10, "the stream via wan1")
        nft = topo.run("mh", "nft", "list", "table", "ip", "upmt_agent").stdout
        assert "wan2" not in nft and "0x00005552" not in nft, nft
        assert "5552" not in topo.run("mh", "ip", "rule").stdout
        assert topo.run("mh", "ip", "route", "show", "table", "5552").stdout.strip() == ""
        stream.kill()
        stream.wait(5)
        stdout, stderr = client.communicate(timeout=30)
        assert client.returncode == 0, stderr[-300:]
        got = json.loads(stdout)
    finally:
        if client is not None and client.poll() is None:
            client.kill()
        lab.stop()
        stream.kill()
        stream.wait(5)
    assert got["bytes"] % 100 == 0 and got["bytes"] > 100 * 100, got
    assert host_state(topo, "mh") == before
    print(f"\n[interface reload] stream intact ({got['bytes'] // 100} lines); largest gap "
          f"{max((g for _e, g in got['gaps']), default=0.0):.3f} s")
