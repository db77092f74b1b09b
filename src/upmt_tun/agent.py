"""The mobile host's agent: drives the forwarder and the signalling with asyncio.

Embeddable: :class:`Agent` takes its seams (a TUN, one path socket per
interface, a flow classifier), so tests run it over in-memory fakes and
``cli.py`` runs it over the real ones (see :func:`run_agent`).

Per anchor, one association task (AssociationReq, tried on each interface in
turn); per (interface, anchor), one tunnel task: TunnelSetupReq sent through that
interface's socket, then KeepAlives that also hold the NAT binding open. A
tunnel that misses ``DEAD_AFTER`` keepalives in a row goes down; its flows move
to the next interface of their rule on their next packet.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import AgentConfig, Rule
from .dataplane.forwarder import AgentForwarder, FlowClass
from .dataplane.io import Path, Tun
from .dataplane.packet import KIND_DATA, KIND_SIP, classify
from .signalling.client import SipClient, SipError
from .tables import PROTO_NAMES, Flow, FlowKey, ip_str

__all__ = ["Agent", "IfaceSeam", "rule_classifier"]

log = logging.getLogger(__name__)

SETUP_TIMEOUT = 4.0
KEEPALIVE_TIMEOUT = 2.0
DEAD_AFTER = 2
BACKOFF_MAX = 30.0


@dataclass
class IfaceSeam:
    """One access network as the agent sees it: its name, index and tunnel socket."""

    name: str
    index: int
    path: Path


def rule_classifier(rules: tuple[Rule, ...],
                    lookup_mark: Callable[[FlowKey], tuple[int, str] | None] | None,
                    fwmark: int) -> Callable[[FlowKey], FlowClass]:
    """Classify a new flow: the conntrack mark if available (it covers uid/cgroup
    rules), else the first rule whose header fields match."""
    by_index = {r.index: r for r in rules}

    def classify_flow(key: FlowKey) -> FlowClass:
        app_src = ""
        if lookup_mark is not None:
            hit = lookup_mark(key)
            if hit is not None:
                mark, app_src = hit
                r = by_index.get((mark >> 16) - 1) if mark & 0xFFFF == fwmark else None
                if r is not None:
                    return FlowClass(r.name, r.via, r.anchor, app_src)
        for r in rules:
            if r.uid is None and r.cgroup is None and r.matches(key[0], key[2], key[3], key[4]):
                return FlowClass(r.name, r.via, r.anchor, app_src)
        return FlowClass("", (), None, app_src)

    return classify_flow


class Agent:
    def __init__(self, cfg: AgentConfig, *, tun: Tun, ifaces: list[IfaceSeam],
                 anchors: dict[str, tuple[str, int]],
                 classify_flow: Callable[[FlowKey], FlowClass],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.tun = tun
        self.ifaces = ifaces
        self.anchors = anchors                     # name -> resolved (ip, port)
        self.clock = clock
        self.fwd = AgentForwarder(cfg.vipa_fix, [i.name for i in ifaces], list(anchors),
                                  classify_flow)
        self.sip = SipClient(cfg.name)
        self.drops = self.fwd.drops
        self.first_attempt: dict[tuple[str, str], asyncio.Event] = {}
        self.anchor_state: dict[str, str] = dict.fromkeys(anchors, "associating")
        self.stopped = asyncio.Event()
        self._lost = {a: asyncio.Event() for a in anchors}   # set: the anchor forgot us
        self._tasks: list[asyncio.Task[None]] = []
        self._sends = [i.path.sendto for i in sorted(ifaces, key=lambda x: x.index)]

    # -- data path callbacks -----------------------------------------------------------
    def _on_tun(self, pkt: bytes) -> None:
        out = self.fwd.from_tun(pkt, self.clock())
        if out is not None:
            self._sends[out[0]](out[2], out[1])

    def _on_datagram_for(self, index: int) -> Callable[[bytes, tuple[str, int]], None]:
        fwd, tun, clock = self.fwd, self.tun, self.clock

        def on_datagram(data: bytes, src: tuple[str, int]) -> None:
            kind = classify(data)
            if kind == KIND_DATA:
                pkt = fwd.from_path(index, data, src, clock())
                if pkt is not None:
                    tun.write(pkt)
            elif kind == KIND_SIP:
                self.sip.on_datagram(data)
            else:
                fwd.drops["junk"] += 1

        return on_datagram

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        now = self.clock()
        self.tun.start(self._on_tun)
        for i in self.ifaces:
            i.path.start(self._on_datagram_for(i.index))
        for a in self.anchors:
            for i in self.ifaces:
                self.fwd.add_tunnel(i.name, i.index, a, i.path.local, self.anchors[a], now)
                self.first_attempt[(i.name, a)] = asyncio.Event()
                self._tasks.append(asyncio.create_task(self._tunnel(i, a)))

    async def wait_ready(self) -> None:
        """Every (interface, anchor) tunnel is up or failed its first attempt."""
        await asyncio.gather(*(e.wait() for e in self.first_attempt.values()))

    async def stop(self) -> None:
        self.stopped.set()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self.tun.close()
        for i in self.ifaces:
            i.path.close()

    # -- signalling tasks --------------------------------------------------------------
    async def _associate_via(self, i: IfaceSeam, anchor: str) -> bool:
        """AssociationReq through interface ``i`` (every interface tries at once; the anchor
        answers a host's repeated association with the same VIpA)."""
        dest = self.anchors[anchor]
        try:
            code, reason, body = await self.sip.request(
                i.path, dest, [("AssociationReq", {"sipId": self.cfg.name, "addressInUse": []})],
                SETUP_TIMEOUT)
        except SipError as e:
            log.warning("anchor %s: association via %s failed: %s", anchor, i.name, e)
            if self.anchor_state[anchor] != "associated":
                self.anchor_state[anchor] = "unreachable"
            return False
        resp = _find(body, "AssociationResp")
        if code != 200 or resp is None or not resp.get("associationSuccess"):
            log.error("anchor %s refused association via %s: %d %s", anchor, i.name, code,
                      reason or (resp or {}).get("reason", ""))
            self.anchor_state[anchor] = "refused"
            return False
        return self._accept_association(anchor, resp)

    def _accept_association(self, anchor: str, resp: dict[str, Any]) -> bool:
        try:
            vipa = str(ipaddress.IPv4Address(resp.get("vipa") or ""))
        except ValueError:
            log.error("anchor %s sent an unusable VIpA %r", anchor, resp.get("vipa"))
            return False
        role = resp.get("role", "anchor")
        serves: frozenset[bytes] = frozenset()
        if role == "fixed-host":
            serves = frozenset({ipaddress.IPv4Address(self.anchors[anchor][0]).packed})
        self.fwd.set_association(anchor, vipa, role, serves)
        self._lost[anchor].clear()
        self.anchor_state[anchor] = "associated"
        log.info("anchor %s (%s): VIpA %s", anchor, role, vipa)
        return True

    async def _tunnel(self, i: IfaceSeam, anchor: str) -> None:
        t = self.fwd.by_path[(i.name, anchor)]
        dest = self.anchors[anchor]
        first = self.first_attempt[(i.name, anchor)]
        backoff = 1.0
        while True:
            link = self.fwd.links[anchor]
            if self._lost[anchor].is_set() or not link.vipa:
                if not await self._associate_via(i, anchor):
                    first.set()
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    continue
            rtt = None
            try:
                (code, reason, body), rtt = await self.sip.request_timed(
                    i.path, dest, [("TunnelSetupReq", {"sipId": self.cfg.name, "vipa": link.vipa,
                                                        "tunnelId": t.tid, "interface": i.name})],
                    SETUP_TIMEOUT)
            except SipError as e:
                log.warning("tunnel %s->%s: setup failed: %s", i.name, anchor, e)
                code, reason, body = 0, str(e), []
            resp = _find(body, "TunnelSetupResp")
            if code == 200 and resp is not None:
                self.fwd.tunnel_up(t, resp["serverTunnelID"], self.clock())
                t.rtt_ms = None if rtt is None else rtt * 1000.0
                log.info("tunnel %d up: %s -> %s (%s:%d), seen as %s:%d", t.tid, i.name, anchor,
                         *dest, resp["yourAddress"], resp["yourPort"])
                first.set()
                backoff = 1.0
                await self._keepalive(i, anchor, t)
                self.fwd.tunnel_down(t)
                log.warning("tunnel %d (%s -> %s) down", t.tid, i.name, anchor)
                continue
            if code == 501 and "not registered" in reason:
                self._lost[anchor].set()
            elif code:
                log.error("anchor %s refused tunnel setup via %s: %d %s", anchor, i.name, code,
                          reason)
            first.set()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _keepalive(self, i: IfaceSeam, anchor: str, t: Any) -> None:
        """Returns when the tunnel is considered down (or must be set up again)."""
        dest = self.anchors[anchor]
        misses = 0
        while True:
            await asyncio.sleep(self.cfg.keepalive_s)
            try:
                (code, reason, body), rtt = await self.sip.request_timed(
                    i.path, dest, [("KeepAlive", {"sipId": self.cfg.name, "tunnelId": t.un_tid,
                                                   "lastDelay": t.rtt_ms})], KEEPALIVE_TIMEOUT)
            except SipError:
                misses += 1
                if misses >= DEAD_AFTER:
                    return
                continue
            if code != 200:
                log.warning("anchor %s: keepalive of tunnel %d refused: %d %s", anchor, t.tid,
                            code, reason)
                if "not registered" in reason:
                    self._lost[anchor].set()
                return
            misses = 0
            t.rtt_ms = rtt * 1000.0
            t.last_rx = self.clock()

    # -- status ------------------------------------------------------------------------
    def flow_json(self, f: Flow) -> dict[str, Any]:
        t = self.fwd.tunnels.get(f.tunnel)
        k = f.key
        return {
            "id": f.fid, "protocol": PROTO_NAMES.get(k[0], str(k[0])),
            "src": f.app_src or ip_str(k[1]), "sport": k[3], "dst": ip_str(k[2]), "dport": k[4],
            "rule": f.rule, "tunnel": f.tunnel, "interface": t.interface if t else None,
            "anchor": f.anchor, "tx_packets": f.tx_packets, "rx_packets": f.rx_packets,
            "history": [{"age_s": round(self.clock() - ts, 3), "from": a, "to": b, "reason": r}
                        for ts, a, b, r in f.history],
        }

    def status(self) -> dict[str, Any]:
        return {
            "vipa_fix": self.cfg.vipa_fix,
            "name": self.cfg.name,
            "anchors": [{"name": a, "address": f"{self.anchors[a][0]}:{self.anchors[a][1]}",
                         "state": self.anchor_state[a], "vipa": self.fwd.links[a].vipa or None,
                         "role": self.fwd.links[a].role} for a in self.anchors],
            "tunnels": [t.json() for t in self.fwd.tunnels.tunnels()],
            "flows": [self.flow_json(f) for f in self.fwd.paft.flows()],
            "drops": dict(self.drops),
            "signalling": dict(self.sip.stats),
        }


def _find(body: list[tuple[str, dict[str, Any]]], mtype: str) -> dict[str, Any] | None:
    return next((c for t, c in body if t == mtype), None)
