"""Observability with real daemons in network namespaces: the Prometheus endpoints of
``metrics = "ADDR:PORT"``, scraped with curl inside the daemons' own namespaces."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from upmt_tun.lab import Lab, LabError
from upmt_tun.testbed import Topology

from .conftest import netns_missing
from .test_netns_e2e import CH, HttpServer, curl, host_state

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(netns_missing() is not None, reason=str(netns_missing()))]

AGENT_METRICS = "127.0.0.1:9586"
ANCHOR_METRICS = "127.0.0.1:9587"


@pytest.fixture
def topo() -> Iterator[Topology]:
    t = Topology()
    t.up()
    try:
        yield t
    finally:
        t.down()


def scrape(topo: Topology, role: str, addr: str) -> str:
    r = topo.run(role, "curl", "-sS", "-m", "5", f"http://{addr}/metrics", check=False,
                 timeout=10)
    assert r.returncode == 0, r.stderr
    return r.stdout


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of metric ``name`` whose labels include ``labels`` (None: no such line)."""
    for line in text.splitlines():
        m = re.fullmatch(r"([a-z_]+)(?:\{(.*)\})? (\S+)", line)
        if m is None or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return None


def test_both_daemons_serve_metrics_that_follow_the_traffic(topo: Topology,
                                                            tmp_path: Path) -> None:
    """A download grows the wan1 tunnel's byte counters on both ends, the flow is counted,
    an operator `move` shows up as a handover by reason, and the endpoints go away with
    the daemons."""
    www = tmp_path / "www"
    www.mkdir()
    (www / "file.bin").write_bytes(os.urandom(512 << 10))
    HttpServer(topo, "ch", 8080, www)
    lab = Lab(topo, tmp_path / "lab", agent_extra=f'metrics = "{AGENT_METRICS}"\n',
              anchor_extra=f'metrics = "{ANCHOR_METRICS}"\n').start()
    try:
        before = scrape(topo, "mh", AGENT_METRICS)
        assert sample(before, "upmt_agent_tunnel_up", interface="wan1") == 1.0
        assert sample(before, "upmt_agent_anchor_associated", anchor="an1") == 1.0
        assert sample(before, "upmt_agent_flows_created_total") == 0.0
        tx0 = sample(before, "upmt_agent_tunnel_tx_bytes_total", interface="wan1")
        rx0 = sample(before, "upmt_agent_tunnel_rx_bytes_total", interface="wan1")
        assert tx0 is not None and rx0 is not None
        assert curl(topo, f"http://{CH}:8080/file.bin").stdout == "200"
        after = scrape(topo, "mh", AGENT_METRICS)
        tx1 = sample(after, "upmt_agent_tunnel_tx_bytes_total", interface="wan1")
        rx1 = sample(after, "upmt_agent_tunnel_rx_bytes_total", interface="wan1")
        assert tx1 is not None and rx1 is not None
        assert tx1 > tx0 and rx1 >= rx0 + (512 << 10)
        assert sample(after, "upmt_agent_flows_created_total") == 1.0
        assert sample(after, "upmt_agent_flows", rule="web") == 1.0
        assert sample(after, "upmt_agent_handovers_total", reason="operator") is None

        lab.agent_cli("move", "--rule", "web", "--via", "wan2")
        moved = scrape(topo, "mh", AGENT_METRICS)
        assert sample(moved, "upmt_agent_handovers_total", reason="operator") == 1.0

        an = scrape(topo, "an", ANCHOR_METRICS)
        assert sample(an, "upmt_anchor_associations") == 1.0
        an_rx = [float(v) for v in re.findall(r"^upmt_anchor_tunnel_rx_bytes_total\{.*\} (\S+)$",
                                               an, re.M)]
        an_tx = [float(v) for v in re.findall(r"^upmt_anchor_tunnel_tx_bytes_total\{.*\} (\S+)$",
                                               an, re.M)]
        assert an_rx and an_tx and sum(an_tx) >= 512 << 10
        # only on the daemon's own address: nothing else answers there
        bad = topo.run("mh", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "5",
                       f"http://{AGENT_METRICS}/", check=False)
        assert bad.stdout == "404"
    finally:
        codes = lab.stop()
    assert codes == {"agent": 0, "anchor0": 0}
    gone = topo.run("mh", "curl", "-sS", "-m", "5", f"http://{AGENT_METRICS}/metrics",
                    check=False)
    assert gone.returncode != 0           # stopped with the daemon


def test_a_metrics_port_in_use_is_one_line_and_the_host_is_restored(topo: Topology,
                                                                    tmp_path: Path) -> None:
    """Another program holds the metrics port: the agent says so in one line, exit 1,
    and leaves nothing behind."""
    before = host_state(topo, "mh")
    holder = topo.popen("mh", "python3", "-c",
                        "import socket,time; s=socket.socket(); s.bind(('127.0.0.1', 9586)); "
                        "s.listen(); print('bound', flush=True); time.sleep(60)",
                        stdout=subprocess.PIPE, text=True)
    lab = Lab(topo, tmp_path / "lab", agent_extra=f'metrics = "{AGENT_METRICS}"\n')
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "bound"
        with pytest.raises(LabError):
            lab.start()
        log = (tmp_path / "lab" / "agent.log").read_text()
        assert "metrics: cannot listen on 127.0.0.1:9586" in log, log
        assert "Traceback" not in log
    finally:
        lab.stop()
        holder.kill()
        holder.wait()
    assert host_state(topo, "mh") == before
