"""Prometheus text-format metrics (``metrics = "ADDR:PORT"``, off by default).

:func:`render_agent` / :func:`render_anchor` turn a daemon's ``status`` (the same dict
``status --json`` prints) into the text exposition format 0.0.4: pure, so the numbers a
scrape shows are exactly what ``status`` shows. :class:`MetricsServer` answers
``GET /metrics`` on a small asyncio server: one request per connection, bounded request
size, time and concurrency, so a scraper (or anything else that connects) cannot hold the
daemon up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["MetricsServer", "render_agent", "render_anchor"]

log = logging.getLogger(__name__)

_Sample = tuple[Mapping[str, object], float]


def _esc(v: object) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(v: float) -> str:
    return repr(float(v)) if isinstance(v, float) else str(int(v))


class _Out:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, help_: str, samples: Iterable[_Sample]) -> None:
        full = f"{self.prefix}_{name}"
        self.lines += [f"# HELP {full} {help_}", f"# TYPE {full} {kind}"]
        for labels, value in samples:
            lab = ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items())
            self.lines.append(f"{full}{{{lab}}} {_fmt(value)}" if lab else
                              f"{full} {_fmt(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _by(label: str, counts: Mapping[str, Any]) -> list[_Sample]:
    """One sample per numeric entry of a counter dict, labelled with its key."""
    return [({label: k}, v) for k, raw in sorted(counts.items())
            if (v := _num(raw)) is not None]


def _tunnels(out: _Out, tunnels: list[dict[str, Any]], labels: Callable[[dict[str, Any]],
                                                                        dict[str, object]]) -> None:
    for key, name, help_ in (("tx_bytes", "tunnel_tx_bytes_total", "Bytes sent into the tunnel"),
                             ("rx_bytes", "tunnel_rx_bytes_total", "Bytes received from it"),
                             ("tx_packets", "tunnel_tx_packets_total", "Packets sent"),
                             ("rx_packets", "tunnel_rx_packets_total", "Packets received")):
        out.metric(name, "counter", help_,
                   [(labels(t), v) for t in tunnels if (v := _num(t.get(key))) is not None])
    out.metric("tunnel_up", "gauge", "1 while the tunnel is up",
               [(labels(t), 1.0 if t.get("state") == "up" else 0.0) for t in tunnels])
    out.metric("tunnel_rtt_seconds", "gauge", "Smoothed round-trip time of the tunnel's path",
               [(labels(t), v / 1000.0) for t in tunnels
                if (v := _num(t.get("rtt_ms"))) is not None])


def _drops(out: _Out, drops: Mapping[str, Any]) -> None:
    out.metric("drops_total", "counter", "Packets dropped, by reason",
               _by("reason", drops))


def render_agent(st: Mapping[str, Any]) -> str:
    """The agent's metrics from its ``status()``."""
    out = _Out("upmt_agent")
    tunnels = list(st.get("tunnels", []))
    _tunnels(out, tunnels, lambda t: {"id": t.get("id"), "interface": t.get("interface"),
                                       "anchor": t.get("anchor")})
    out.metric("tunnel_probe_loss_ratio", "gauge", "Share of recent path probes unanswered",
               [({"id": t.get("id"), "interface": t.get("interface"),
                  "anchor": t.get("anchor")}, v) for t in tunnels
                if (v := _num((t.get("probe") or {}).get("loss"))) is not None])
    per_rule: dict[str, int] = {}
    for f in st.get("flows", []):
        per_rule[str(f.get("rule") or "")] = per_rule.get(str(f.get("rule") or ""), 0) + 1
    out.metric("flows", "gauge", "Flows under UPMT control now, by rule",
               [({"rule": r}, n) for r, n in sorted(per_rule.items())])
    out.metric("flows_created_total", "counter", "Flows put under UPMT control",
               [({}, v)] if (v := _num(st.get("flows_created"))) is not None else [])
    out.metric("handovers_total", "counter", "Flow moves between tunnels, by reason",
               _by("reason", (st.get("handovers") or {})))
    out.metric("anchor_associated", "gauge", "1 while associated with the anchor",
               [({"anchor": a.get("name")}, 1.0 if a.get("state") == "associated" else 0.0)
                for a in st.get("anchors", [])])
    _drops(out, st.get("drops") or {})
    out.metric("signalling_total", "counter", "Signalling events, by kind",
               _by("kind", (st.get("signalling") or {})))
    return out.text()


def render_anchor(st: Mapping[str, Any]) -> str:
    """The anchor's metrics from its ``status()``."""
    out = _Out("upmt_anchor")
    assocs = list(st.get("associations", []))
    out.metric("associations", "gauge", "Hosts associated now", [({}, len(assocs))])
    tunnels = [t for a in assocs for t in a.get("tunnels", [])]
    _tunnels(out, tunnels, lambda t: {"id": t.get("id"), "mh": t.get("mh")})
    out.metric("relay_rx_bytes_total", "counter", "Mesh bytes a host sent through the relay",
               [({"mh": a.get("mh")}, v) for a in assocs
                if (v := _num(a.get("relay_rx_bytes"))) is not None])
    out.metric("relay_tx_bytes_total", "counter", "Mesh bytes relayed to a host",
               [({"mh": a.get("mh")}, v) for a in assocs
                if (v := _num(a.get("relay_tx_bytes"))) is not None])
    out.metric("flows", "gauge", "Flows in the anchor's PAFT", [({}, len(st.get("flows", [])))])
    _drops(out, st.get("drops") or {})
    out.metric("path_events_total", "counter", "NAT rebinding events, by kind",
               _by("kind", (st.get("paths") or {})))
    out.metric("signalling_total", "counter", "Signalling events, by kind",
               _by("kind", (st.get("signalling") or {})))
    return out.text()


class MetricsServer:
    """``GET /metrics`` over HTTP/1.x on ``host:port``; everything else gets 404/400."""

    MAX_REQUEST = 8192
    TIMEOUT = 5.0
    MAX_CLIENTS = 16

    def __init__(self, host: str, port: int, render: Callable[[], str]) -> None:
        self.host, self.port, self.render = host, port, render
        self._server: asyncio.base_events.Server | None = None
        self._clients = 0
        self.served = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, self.host, self.port,
                                                  reuse_address=True)

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients += 1
        try:
            if self._clients > self.MAX_CLIENTS:
                return
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.TIMEOUT)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                    ConnectionError):
                return
            if len(head) > self.MAX_REQUEST:
                return
            parts = head.split(b"\r\n", 1)[0].split()
            if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
                status, body, ctype = "400 Bad Request", "bad request\n", "text/plain"
            elif parts[0] != b"GET" or parts[1].split(b"?", 1)[0] != b"/metrics":
                status, body, ctype = "404 Not Found", "try /metrics\n", "text/plain"
            else:
                try:
                    body = self.render()
                except Exception as e:  # noqa: BLE001 - a scrape never takes the daemon down
                    log.warning("metrics: %s: %s", type(e).__name__, e)
                    status, body, ctype = "500 Internal Server Error", "error\n", "text/plain"
                else:
                    status, ctype = "200 OK", "text/plain; version=0.0.4; charset=utf-8"
                    self.served += 1
            data = body.encode()
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: "
                         f"{len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.drain(), self.TIMEOUT)
        finally:
            self._clients -= 1
            writer.close()
