"""examples/ run for real, all four in one topology (the suite's time budget is tight).

           ns mh (rp_filter=1)      examples/launcher.py, event_table.py, rtt_mover.py
        wan1 10.1.0.2       wan2 10.2.0.2        (each embeds an agent in turn)
            |                    |
        ns nat1 (masq)      ns nat2 (masq)
              \\                /
               ns inet: bridge br0
              /                 \\
   ns an 203.0.113.1              ns ch 203.0.113.100
   examples/anchor_status_service.py   python http.server
   (the anchor, embedded; HTTP status on 127.0.0.1:8081)

The examples import only ``upmt_tun`` (checked below), as an application would.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

import upmt_tun
from upmt_tun.lab import Lab, exe
from upmt_tun.testbed import Topology, host_state

from .conftest import netns_missing
from .test_netns_e2e import CH, HttpServer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PY = sys.executable
CGROUP = "mount -t cgroup2 none /sys/fs/cgroup && exec "   # `ip netns exec` hides cgroup2

RULES = f"""
[[rule]]
name = "web"
protocol = "tcp"
dst = "{CH}/32"
dst_port = 8080
via = ["wan1", "wan2"]

[[rule]]
name = "prog"
protocol = "udp"
dst_port = 9
via = ["wan2"]
"""

# a flood outside the tunnels through wan1 (the main table's default route), 4.8 Mbit/s
# into the 4 Mbit/s token bucket put on wan1: the tunnel's probes queue behind it
FLOOD = f"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"wan1")
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    for _ in range(6):
        s.sendto(b"x" * 1000, ("{CH}", 9999))
    time.sleep(0.01)
"""


# an application that adds a rule before "web" for a while (its download is that rule's,
# on wan2), then whose code raises inside the block, and one cancelled at various points
# of the set-up and after it: the host is restored every time
RAISE_AND_CANCEL = """
import asyncio, sys, upmt_tun
cfg, ch = sys.argv[1], sys.argv[2]
async def boom():
    async with upmt_tun.Agent.open(cfg) as agent:
        await agent.ready()
        print(await agent.add_rule(name="late", protocol="tcp", dst=ch + "/32",
                                   dst_port=8080, via=["wan2"], before="web"))
        curl = await asyncio.create_subprocess_exec(
            "curl", "-sS", "-m", "10", "-o", "/dev/null", f"http://{ch}:8080/file.bin")
        assert await curl.wait() == 0
        print(sorted({(f["rule"], f["interface"]) for f in agent.status()["flows"]
                      if f["dport"] == 8080}))
        print(await agent.remove_rule("late"), agent.rules())
        raise RuntimeError("application bug")
async def forever():
    async with upmt_tun.Agent.open(cfg):
        await asyncio.sleep(3600)
try:
    asyncio.run(boom())
except RuntimeError as e:
    print("raised:", e)
for delay in (0.02, 0.15, 0.4, 2.0):
    try:
        asyncio.run(asyncio.wait_for(forever(), delay))
    except TimeoutError:
        print("cancelled after", delay)
"""


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_examples_import_only_the_public_api() -> None:
    for path in sorted(EXAMPLES.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module is not None and not node.module.startswith("upmt_tun"), \
                    f"{path.name}: from {node.module} import ..."
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name == "upmt_tun" or not alias.name.startswith("upmt_tun"), \
                        f"{path.name}: import {alias.name}"


def test_rtt_mover_decides_on_a_rising_rtt_and_holds() -> None:
    """The example's decision alone: wan1's RTT rises above the threshold while wan2's is
    lower -> move to wan2; not again within the hold time; never to a worse path."""
    mover = _load("rtt_mover").Mover(["wan1", "wan2"], 100.0, 10.0)

    def q(iface: str, rtt: float) -> upmt_tun.PathQuality:
        return upmt_tun.PathQuality(0.0, 1 if iface == "wan1" else 2, iface, "an1", rtt, 0.0)

    assert mover.feed(q("wan2", 20.0), 0.0) is None
    assert mover.feed(q("wan1", 30.0), 0.0) is None
    assert mover.feed(q("wan1", 250.0), 1.0) == "wan2"
    mover.via = "wan2"
    assert mover.feed(q("wan2", 400.0), 2.0) is None     # held: moved a second ago
    assert mover.feed(q("wan2", 400.0), 20.0) == "wan1"  # wan1 last said 250 ms: better
    mover.via = "wan1"
    assert mover.feed(q("wan2", 1000.0), 39.0) is None   # not the rule's path: no move
    assert mover.feed(q("wan1", 900.0), 40.0) is None    # wan2 (1000 ms) is worse: stay
    assert mover.feed(q("wan1", 1100.0), 41.0) == "wan2"


@pytest.fixture
def topo() -> Iterator[Topology]:
    t = Topology(anchors=1)
    t.up()
    try:
        yield t
    finally:
        t.down()


def _line(proc: subprocess.Popen[str], prefix: str, timeout: float) -> str:
    """The first stdout line of ``proc`` that starts with ``prefix`` (or a failure). Read
    by a thread: the pipe's text buffer hides lines from select()."""
    assert proc.stdout is not None
    stdout = proc.stdout
    found: list[str] = []
    seen: list[str] = []

    def read() -> None:
        for line in stdout:
            if line.startswith(prefix):
                found.append(line)
                return
            seen.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if found:
        return found[0]
    raise AssertionError(f"no {prefix!r} line from {proc.args!r} in {timeout} s: "
                         f"{''.join(seen)[-2000:]}")


@pytest.mark.netns
@pytest.mark.skipif(netns_missing() is not None, reason=str(netns_missing()))
def test_every_example_runs_in_the_namespace_testbed(topo: Topology, tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    (www / "file.bin").write_bytes(b"u" * 200_000)
    srv = HttpServer(topo, "ch", 8080, www)
    lab = Lab(topo, tmp_path / "lab", rules=RULES)
    lab.write_configs()
    agent_toml, anchor_toml = str(lab.dir / "agent.toml"), str(lab.dir / "anchor0.toml")
    mh_before, an_before = host_state(topo, "mh"), host_state(topo, "an")

    # (c) the anchor, embedded in an asyncio HTTP status service
    anchor = topo.popen("an", PY, str(EXAMPLES / "anchor_status_service.py"), "--config",
                        anchor_toml, "--http", "127.0.0.1:8081", stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True)
    try:
        _line(anchor, "ready", 20)
        # the embedded anchor's control socket streams its events to the CLI
        an_events = topo.popen("an", *exe("upmt-anchor"), "events", "--control",
                               lab.anchor_control(0), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)

        # (d) the launcher: curl's traffic belongs to rule prog (udp 9 would never match
        # it), so it leaves through the tunnel on wan2 and the anchor
        r = topo.run("mh", "sh", "-c", CGROUP + f"{PY} {EXAMPLES / 'launcher.py'} --config "
                     f"{agent_toml} --rule prog -- curl -sS -m 10 -o /dev/null -w "
                     f"%{{http_code}} http://{CH}:8080/file.bin", check=False, timeout=60)
        assert (r.returncode, r.stdout) == (0, "200"), r.stderr
        assert srv.clients() == ["203.0.113.1"]
        assert host_state(topo, "mh") == mh_before        # restored when the program ended

        # (b) the live table (plain lines: no terminal), while a web download runs
        table = topo.popen("mh", PY, str(EXAMPLES / "event_table.py"), "--config", agent_toml,
                           "--duration", "12", stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 20
        st: dict[str, object] = {}
        while time.monotonic() < deadline:     # the table's agent is up: tunnels up
            got = topo.run("mh", *exe("upmt-agent"), "status", "--json", "--control",
                           lab.agent_control, check=False)
            st = json.loads(got.stdout) if got.returncode == 0 else {}
            tunnels = st.get("tunnels") or []
            assert isinstance(tunnels, list)
            if len(tunnels) == 2 and all(t["state"] == "up" for t in tunnels):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"the event table's agent did not come up: {st}")
        hosts = json.loads(topo.run("an", "curl", "-sS", "-m", "2",
                                    "http://127.0.0.1:8081/hosts").stdout)
        assert "laptop" in hosts, "the service never heard of the host (events)"
        ag_events = topo.popen("mh", *exe("upmt-agent"), "events", "--control",
                               lab.agent_control, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
        # listening once its first event came (path quality: at least every 5 s)
        json.loads(_line(ag_events, '{"event": "path_quality"', 15))
        assert topo.run("mh", "curl", "-sS", "-m", "10", "-o", "/dev/null", "-w",
                        "%{http_code}", f"http://{CH}:8080/file.bin").stdout == "200"
        status = json.loads(topo.run("an", "curl", "-sS", "-m", "2",
                                     "http://127.0.0.1:8081/status").stdout)
        assert [a["mh"] for a in status["associations"]] == ["laptop"]
        out, _ = table.communicate(timeout=40)
        assert table.returncode == 0, out
        kinds = {line.split()[1] for line in out.splitlines() if len(line.split()) > 1}
        assert {"anchor_associated", "tunnel_up", "flow_new", "path_quality"} <= kinds, out
        # `upmt-agent events` saw the download's flow, one JSON object per line, and
        # ended by itself (exit 0) when the agent stopped
        out, _ = ag_events.communicate(timeout=20)
        assert ag_events.returncode == 0, out
        lines = [json.loads(line) for line in out.splitlines()]
        assert all({"event", "time"} <= set(j) for j in lines), out
        assert any(j["event"] == "flow_new" and j["dport"] == 8080 for j in lines), out
        assert host_state(topo, "mh") == mh_before

        # (a) the RTT mover: wan1 gets a 4 Mbit/s bucket and a 4.8 Mbit/s flood beside the
        # tunnel; the probes queue behind it, the RTT rises past 60 ms, web moves to wan2.
        # A slow web download keeps the tunnel busy (probed every 100 ms, not idle)
        mover = topo.popen("mh", PY, str(EXAMPLES / "rtt_mover.py"), "--config", agent_toml,
                           "--rule", "web", "--threshold-ms", "60", "--once",
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        _line(mover, "ready", 30)
        slow = topo.popen("mh", "curl", "-sS", "-m", "40", "--limit-rate", "8K", "-o",
                          "/dev/null", f"http://{CH}:8080/file.bin")
        topo.run("mh", "tc", "qdisc", "replace", "dev", "wan1", "root", "tbf", "rate",
                 "4mbit", "burst", "8k", "latency", "200ms")
        flood = topo.popen("mh", PY, "-c", FLOOD, "25")
        try:
            moved = _line(mover, "moved rule web: wan1 -> wan2", 30)
            assert "ms > 60 ms" in moved
            assert mover.wait(timeout=20) == 0
        finally:
            flood.kill()
            slow.kill()
            flood.wait(10)
            slow.wait(10)
            topo.run("mh", "tc", "qdisc", "del", "dev", "wan1", "root", check=False)
            # the killed download's connection is over: a late segment of it must not be
            # steered by its ct mark into the next example's agent as a 'web' flow
            topo.run("mh", "conntrack", "-D", "-p", "tcp", "--dport", "8080", check=False)
        assert host_state(topo, "mh") == mh_before

        r = topo.run("mh", PY, "-c", RAISE_AND_CANCEL, agent_toml, CH, timeout=60)
        assert r.stdout.split("\n")[:8] == [
            "['rule late added']", "[('late', 'wan2')]",
            "['rule late removed'] ['web', 'prog']", "raised: application bug",
            "cancelled after 0.02", "cancelled after 0.15", "cancelled after 0.4",
            "cancelled after 2.0"], r.stdout + r.stderr
        assert host_state(topo, "mh") == mh_before
    finally:
        anchor.send_signal(signal.SIGTERM)
        try:
            anchor.wait(timeout=20)
        except subprocess.TimeoutExpired:
            anchor.kill()
            raise
        finally:
            lab.stop()      # the run directory (the examples' control sockets, mark slots)
    assert anchor.returncode == 0
    assert host_state(topo, "an") == an_before
    out, _ = an_events.communicate(timeout=20)
    kinds = [json.loads(line)["event"] for line in out.splitlines()]
    assert "host_associated" in kinds, out
    # each example's agent set its tunnels up again from new ports: down, then up
    assert kinds.count("tunnel_up") >= 6 and kinds.count("tunnel_down") >= 4, out
