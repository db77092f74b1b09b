"""Prometheus metrics: the text format from a status dict, the endpoint, the config key."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from upmt_tun.metrics import MetricsServer, render_agent, render_anchor

from .test_config import MINI_AGENT, MINI_ANCHOR, PEER, agent, agent_err, anchor

AGENT_STATUS = {
    "vipa_fix": "100.64.0.1", "name": "laptop",
    "anchors": [{"name": "an1", "state": "associated"}, {"name": "an2", "state": "unreachable"}],
    "tunnels": [
        {"id": 1, "interface": "wan1", "anchor": "an1", "state": "up", "rtt_ms": 12.5,
         "tx_packets": 10, "rx_packets": 9, "tx_bytes": 1000, "rx_bytes": 900,
         "probe": {"loss": 0.25}},
        {"id": 2, "interface": 'we"ird\\', "anchor": "an1", "state": "down", "rtt_ms": None,
         "tx_packets": 0, "rx_packets": 0, "tx_bytes": 0, "rx_bytes": 0}],
    "flows": [{"rule": "web"}, {"rule": "web"}, {"rule": "ssh"}],
    "flows_created": 7,
    "handovers": {"operator": 2, "probe loss": 1},
    "drops": {"no_tunnel": 3, "junk": 0},
    "signalling": {"ok": 5},
}


def samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_agent_metrics_text_format() -> None:
    text = render_agent(AGENT_STATUS)
    s = samples(text)
    assert s['upmt_agent_tunnel_tx_bytes_total{id="1",interface="wan1",anchor="an1"}'] == 1000
    assert s['upmt_agent_tunnel_up{id="1",interface="wan1",anchor="an1"}'] == 1
    assert s['upmt_agent_tunnel_up{id="2",interface="we\\"ird\\\\",anchor="an1"}'] == 0
    assert s['upmt_agent_tunnel_rtt_seconds{id="1",interface="wan1",anchor="an1"}'] == 0.0125
    assert not any("rtt_seconds" in k and 'id="2"' in k for k in s)     # not measured yet
    assert s['upmt_agent_tunnel_probe_loss_ratio{id="1",interface="wan1",anchor="an1"}'] == 0.25
    assert s['upmt_agent_flows{rule="web"}'] == 2 and s['upmt_agent_flows{rule="ssh"}'] == 1
    assert s["upmt_agent_flows_created_total"] == 7
    assert s['upmt_agent_handovers_total{reason="probe loss"}'] == 1
    assert s['upmt_agent_anchor_associated{anchor="an2"}'] == 0
    assert s['upmt_agent_drops_total{reason="no_tunnel"}'] == 3
    # every sample belongs to a metric declared once with HELP and TYPE before it
    declared = re.findall(r"^# TYPE (\S+) (counter|gauge)$", text, re.M)
    assert len(declared) == len({n for n, _ in declared})
    for name in s:
        assert name.split("{")[0] in {n for n, _ in declared}, name
    assert text.endswith("\n")


def test_anchor_metrics_text_format() -> None:
    st = {"role": "anchor", "associations": [
        {"mh": "laptop", "vipa": "100.100.0.2", "relay_rx_bytes": 5, "relay_tx_bytes": 6,
         "tunnels": [{"id": 4, "mh": "laptop", "state": "up", "rtt_ms": None,
                      "tx_packets": 1, "rx_packets": 2, "tx_bytes": 3, "rx_bytes": 4}]}],
        "flows": [{}, {}], "drops": {"junk": 9}, "paths": {"path_rebound": 1},
        "signalling": {"refused": 2}}
    s = samples(render_anchor(st))
    assert s["upmt_anchor_associations"] == 1 and s["upmt_anchor_flows"] == 2
    assert s['upmt_anchor_tunnel_rx_bytes_total{id="4",mh="laptop"}'] == 4
    assert s['upmt_anchor_relay_tx_bytes_total{mh="laptop"}'] == 6
    assert s['upmt_anchor_path_events_total{kind="path_rebound"}'] == 1
    assert s['upmt_anchor_signalling_total{kind="refused"}'] == 2


async def _http(addr: tuple[str, int], request: bytes) -> bytes:
    r, w = await asyncio.open_connection(*addr)
    w.write(request)
    await w.drain()
    data = await asyncio.wait_for(r.read(), 5)
    w.close()
    return data


async def test_metrics_endpoint_serves_get_metrics_only() -> None:
    calls = []

    def render() -> str:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("status failed")
        return render_agent(AGENT_STATUS)

    srv = MetricsServer("127.0.0.1", 0, render)
    await srv.start()
    try:
        ok = await _http(srv.address, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200 OK\r\n") and b"version=0.0.4" in ok
        assert b"upmt_agent_tunnel_up" in ok
        assert (await _http(srv.address, b"GET / HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404")
        assert (await _http(srv.address, b"garbage\r\n\r\n")).startswith(b"HTTP/1.1 400")
        assert (await _http(srv.address, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n")).startswith(
            b"HTTP/1.1 200")
        assert (await _http(srv.address, b"GET /metrics HTTP/1.1\r\n\r\n")).startswith(
            b"HTTP/1.1 500")                 # the render failed: an answer, not a crash
        # a client that never finishes its request is cut off, and others still served
        r, w = await asyncio.open_connection(*srv.address)
        w.write(b"GET /metr")
        ok = await _http(srv.address, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200")
        w.close()
    finally:
        await srv.close()


def test_metrics_config_key(tmp_path: Path) -> None:
    assert agent(tmp_path, MINI_AGENT).metrics is None
    assert agent(tmp_path, 'metrics = "127.0.0.1:9586"\n' + MINI_AGENT).metrics == (
        "127.0.0.1", 9586)
    assert anchor(tmp_path, MINI_ANCHOR + 'metrics = "0.0.0.0:9587"\n' + PEER).metrics == (
        "0.0.0.0", 9587)
    agent_err(tmp_path, 'metrics = "localhost:9586"\n' + MINI_AGENT, "metrics", "IPv4")
    agent_err(tmp_path, 'metrics = "127.0.0.1"\n' + MINI_AGENT, "metrics", "ADDR:PORT")
    agent_err(tmp_path, 'metrics = "127.0.0.1:0"\n' + MINI_AGENT, "metrics", "port")
