"""The mobile host's agent: drives the forwarder and the signalling with asyncio.

Embeddable: :class:`Agent` takes its seams (a TUN, one path socket per
interface, a flow classifier), so tests run it over in-memory fakes and
``cli.py`` runs it over the real ones (see :func:`run_agent`).

Per (interface, anchor), one tunnel task: a handshake and an AssociationReq when
needed, TunnelSetupReq sent through that interface's socket, then sealed SIP
KeepAlives every ``keepalive`` seconds (a tunnel that misses ``DEAD_AFTER`` of
them goes down). One prober task ticks a :class:`paths.PathMonitor` per tunnel:
PING/PONG probes every 100 ms while traffic flows, backing off when idle (they
are the NAT keepalive too); a path that stops answering goes down within about
half a second and its flows move at once ("probe loss"). Flows go back to a
better-preferred interface once its tunnel has been up ``return_after`` seconds.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import AgentConfig, Rule
from .dataplane.crypto import Session
from .dataplane.forwarder import AgentForwarder, FlowClass
from .dataplane.io import Path, Tun, gro_reader
from .dataplane.packet import (
    PATH_MAX,
    TYPE_CONTROL,
    TYPE_COOKIE,
    TYPE_DATA,
    TYPE_HS_RESP,
    TYPE_PATH_CHALLENGE,
    TYPE_PONG,
)
from .paths import TICK, PathMonitor, ProbeParams
from .signalling import sip
from .signalling.client import SipClient, SipError
from .signalling.handshake import COOKIE_LIFE, Initiation
from .tables import Flow, FlowKey, Tunnel, ip_str

__all__ = ["Agent", "IfaceSeam", "MoveError", "UsageError", "rule_classifier"]

log = logging.getLogger(__name__)

SETUP_TIMEOUT = 4.0
KEEPALIVE_TIMEOUT = 2.0
DEAD_AFTER = 2
BACKOFF_MAX = 30.0
REKEY_AFTER = 120.0            # seconds: a new handshake (forward secrecy), as WireGuard
PREVIOUS_SESSION_LIFE = 60.0   # the old session still opens late packets this long
MIN_REKEY = 5.0                # never renew a session younger than this after a failure
REKEY_AFTER_MESSAGES = 1 << 28 # AES-GCM: well inside its per-key limits (RFC 8446 5.5)
COOKIE_RETRIES = 3             # immediate retries with a fresh cookie, per handshake


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


class UsageError(ValueError):
    """A command named something that does not exist (exit 2)."""


class MoveError(RuntimeError):
    """A move that cannot be done now (exit 1)."""


class _SealedPath:
    """A path socket as the SIP client sees it: what it sends is sealed for ``anchor``."""

    def __init__(self, fwd: AgentForwarder, anchor: str, path: Path) -> None:
        self.fwd, self.anchor, self.path = fwd, anchor, path
        self.local = path.local

    def start(self, on_datagram: Callable[[bytes, tuple[str, int]], None]) -> None:
        raise NotImplementedError  # the agent reads the real socket itself

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        sealed = self.fwd.seal_control(self.anchor, data)
        if sealed is not None:
            self.path.sendto(sealed, addr)

    def close(self) -> None:
        pass


class Agent:
    def __init__(self, cfg: AgentConfig, *, tun: Tun, ifaces: list[IfaceSeam],
                 anchors: dict[str, tuple[str, int]],
                 classify_flow: Callable[[FlowKey], FlowClass],
                 clock: Callable[[], float] = time.monotonic,
                 wall_ns: Callable[[], int] = time.time_ns,
                 cgroup_of: Callable[[str], str | None] | None = None) -> None:
        self.cfg = cfg
        self.cgroup_of = cgroup_of
        self.link_up: dict[str, bool] = {i.name: True for i in ifaces}
        self._wake: dict[tuple[str, str], asyncio.Event] = {}
        self.tun = tun
        self.ifaces = sorted(ifaces, key=lambda x: x.index)
        self.anchors = anchors                     # name -> resolved (ip, port)
        self.keys = {a.name: a.public_key for a in cfg.anchors}
        self.clock = clock
        self.wall_ns = wall_ns
        self.fwd = AgentForwarder(cfg.vipa_fix, [i.name for i in self.ifaces], list(anchors),
                                  classify_flow)
        self.sip = SipClient(cfg.name)
        self.drops = self.fwd.drops
        self.first_attempt: dict[tuple[str, str], asyncio.Event] = {}
        self.anchor_state: dict[str, str] = dict.fromkeys(anchors, "associating")
        self._lost = {a: asyncio.Event() for a in anchors}   # set: the anchor forgot us
        # one handshake at a time per (anchor, interface): interfaces try in parallel, so a
        # dead path does not delay the others (SPEC: `ready` within about 10 s)
        self._hs_lock = {(a, i.name): asyncio.Lock() for a in anchors for i in ifaces}
        # pending initiation index -> (anchor, interface, it, its answer: a session, or None
        # when a cookie came instead)
        self._pending: dict[int, tuple[str, str, Initiation, asyncio.Future[Session | None]]] = {}
        # (interface, anchor) -> (cookie, received): a cookie is good for one source address
        self._cookies: dict[tuple[str, str], tuple[bytes, float]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._sends = [i.path.sendto for i in self.ifaces]
        self._queues = [i.path.queue for i in self.ifaces]     # data: leaves at flush
        self._queues_run = [i.path.queue_run for i in self.ifaces]
        self.probe_params = ProbeParams(idle_max=cfg.keepalive_s)
        self.monitors: dict[int, PathMonitor] = {}     # tid -> monitor, while the tunnel is up
        self._settled: set[int] = set()                 # up for return_after: flows may return

    # -- data path callbacks -----------------------------------------------------------
    def _on_tun(self, pkt: bytes) -> None:
        out = self.fwd.from_tun(pkt, self.clock())
        if out is not None:
            self._queues[out[0]](out[2], out[1])

    def _on_super(self, pkt: memoryview, gso_size: int) -> None:
        out = self.fwd.from_tun_super(pkt, gso_size, self.clock())
        if out is not None:
            self._queues_run[out[0]](out[2], out[3], out[1])

    def _flush(self) -> None:
        """After each TUN read: what it became leaves together (one UDP GSO send)."""
        for i in self.ifaces:
            i.path.flush()

    def _on_datagram_for(self, index: int) -> Callable[[bytes, tuple[str, int]], None]:
        fwd, tun, clock = self.fwd, self.tun, self.clock

        def on_datagram(data: bytes, src: tuple[str, int]) -> None:
            b0 = data[0] if len(data) >= 16 else 0
            if b0 == TYPE_DATA:
                pkt = fwd.from_path(index, data, src, clock())
                if pkt is not None:
                    tun.write(pkt)
            elif b0 == TYPE_CONTROL:
                opened = fwd.open(index, data, src)
                if opened is not None:
                    self.sip.on_datagram(opened[3])
            elif b0 == TYPE_HS_RESP or b0 == TYPE_COOKIE:
                self._on_handshake_response(data, src)
            elif b0 == TYPE_PONG:
                pong = fwd.pong(index, data, src)
                m = self.monitors.get(pong[0].tid) if pong is not None else None
                if m is not None and pong is not None:
                    now = clock()
                    m.on_pong(now, max(0.0, now - pong[1]))
            elif b0 == TYPE_PATH_CHALLENGE:     # our NAT rebound: answer from this socket
                reply = fwd.path_challenge(index, data, src)
                if reply is not None:
                    self._sends[index](reply, src)
            else:
                fwd.drops["junk"] += 1

        return on_datagram

    def _on_batch_for(self, index: int, on_datagram: Callable[[bytes, tuple[str, int]], None]
                      ) -> Callable[[bytes, int, tuple[str, int]], None]:
        fwd, clock = self.fwd, self.clock
        return gro_reader(lambda data, size, src: fwd.from_path_many(index, data, size, src,
                                                                     clock()),
                          self.tun.write, on_datagram)

    def _on_handshake_response(self, data: bytes, src: tuple[str, int]) -> None:
        """HS_RESP (our session) or HS_COOKIE (the anchor is under load: remember the cookie
        and let :meth:`_session` send a new initiation with mac2 at once)."""
        cookie = data[0] == TYPE_COOKIE
        pending = self._pending.get(int.from_bytes(data[4:8] if cookie else data[8:12], "big"))
        if pending is None or src != self.anchors[pending[0]]:
            self.fwd.drops["stray_handshake"] += 1
            return
        anchor, iface, init, fut = pending
        if cookie:
            c = init.consume_cookie(data)
            if c is None:
                self.fwd.drops["bad_cookie"] += 1
            elif not fut.done():
                self._cookies[(iface, anchor)] = (c, self.clock())
                fut.set_result(None)
            return
        s = init.consume(data, self.clock(), anchor)
        if s is None:
            self.fwd.drops["bad_handshake"] += 1
        elif not fut.done():
            s.plain_data = self.cfg.plaintext_data
            fut.set_result(s)

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        now = self.clock()
        self.tun.start(self._on_tun, self._flush, self._on_super)
        for i in self.ifaces:
            on_datagram = self._on_datagram_for(i.index)
            i.path.start(on_datagram, self.tun.flush, self._on_batch_for(i.index, on_datagram))
        for a in self.anchors:
            for i in self.ifaces:
                self.fwd.add_tunnel(i.name, i.index, a, i.path.local, self.anchors[a], now)
                self.first_attempt[(i.name, a)] = asyncio.Event()
                self._wake[(i.name, a)] = asyncio.Event()
                self._tasks.append(asyncio.create_task(self._tunnel(i, a)))
        self._tasks.append(asyncio.create_task(self._prober()))

    async def wait_ready(self) -> None:
        """Every (interface, anchor) tunnel is up or failed its first attempt."""
        await asyncio.gather(*(e.wait() for e in self.first_attempt.values()))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self.tun.close()
        for i in self.ifaces:
            i.path.close()

    # -- path probing ------------------------------------------------------------------
    async def _prober(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            self.probe_tick(self.clock())

    def probe_tick(self, now: float) -> None:
        """Probe the tunnels that are due, take down the ones whose path died, and let
        flows return to tunnels that have been up long enough."""
        for tid, m in list(self.monitors.items()):
            t = self.fwd.tunnels.by_tid.get(tid)
            if t is None or t.state != "up":
                del self.monitors[tid]
                self._settled.discard(tid)
                continue
            probe, dead = m.tick(now, t.tx_packets, t.rx_packets)
            if dead:
                log.warning("tunnel %d (%s -> %s): no answer for %.2f s, down", tid,
                            t.interface, t.peer, now - m.last_rx)
                self._path_down(t, "probe loss")
                continue
            if probe:
                self._ping(t, now)
            if tid not in self._settled and now - m.started >= self.cfg.return_after_s:
                self._settled.add(tid)
                self.announce(self.fwd.restore_preferences(now, self._up_for,
                                                           self.cfg.return_after_s))

    def _up_for(self, t: Tunnel) -> float:
        m = self.monitors.get(t.tid)
        return self.clock() - m.started if m is not None else 0.0

    def _path_down(self, t: Tunnel, reason: str) -> None:
        """Tunnel ``t`` stopped working: down now, its flows move now, and its tunnel
        task starts setting it up again."""
        self.fwd.tunnel_down(t)
        self.monitors.pop(t.tid, None)
        self._settled.discard(t.tid)
        self.announce(self.fwd.fail_over(t, self.clock(), reason))
        ev = self._wake.get((t.interface, t.peer))
        if ev is not None:
            ev.set()

    # -- link events -------------------------------------------------------------------
    def on_link(self, name: str, usable: bool, why: str = "link down") -> None:
        """Call when an access interface became unusable (no carrier, no address) or usable
        again (its route re-made): its tunnels go down and their flows move at once, or
        its tunnels are retried at once."""
        if name not in self.link_up or self.link_up[name] == usable:
            return
        self.link_up[name] = usable
        if not usable:
            for (iface, _anchor), t in self.fwd.by_path.items():
                if iface == name and t.state == "up":
                    log.warning("%s %s: tunnel %d down, its flows move", why, name, t.tid)
                    self._path_down(t, why)
            self._wake_all(name)
        else:
            log.info("link %s back up", name)
            self._wake_all(name)

    def path_changed(self, name: str) -> None:
        """Same link, new address or gateway (so a new NAT mapping): probe its tunnels now
        (the anchor follows the new mapping after a challenge) and retry down ones now."""
        now = self.clock()
        for (iface, _anchor), t in self.fwd.by_path.items():
            if iface == name and t.state == "up":
                self._ping(t, now)
        self._wake_all(name)

    def _ping(self, t: Tunnel, now: float) -> None:
        dg = self.fwd.ping(t, now)
        if dg is not None:
            self._sends[t.iface_index](dg, t.remote)

    def _wake_all(self, name: str) -> None:
        for (iface, _anchor), ev in self._wake.items():
            if iface == name:
                ev.set()

    async def _nap(self, i: IfaceSeam, anchor: str, seconds: float) -> None:
        """Sleep, but wake up at once on a link event of ``i``."""
        ev = self._wake[(i.name, anchor)]
        try:
            await asyncio.wait_for(ev.wait(), seconds)
        except TimeoutError:
            pass
        ev.clear()

    # -- handshake ---------------------------------------------------------------------
    async def _session(self, i: IfaceSeam, anchor: str, *, rekey: bool = False,
                       force: bool = False) -> bool:
        """Make sure ``anchor`` has a current session (a Noise IK handshake through ``i``).
        ``rekey``: renew it when older than REKEY_AFTER; ``force``: renew it unless it is
        brand new (after a failure: the anchor may have restarted and forgotten it)."""
        async with self._hs_lock[(anchor, i.name)]:
            link = self.fwd.links[anchor]
            if link.session is not None:
                age = self.clock() - link.session.created
                worn = link.session.send_counter > REKEY_AFTER_MESSAGES
                if not ((rekey and (age > REKEY_AFTER or worn)) or (force and age > MIN_REKEY)):
                    return True
            old = link.session
            loop = asyncio.get_running_loop()
            waited, delay, cookies = 0.0, sip.T1, 0
            while waited < SETUP_TIMEOUT:   # a fresh initiation (new timestamp) every try
                idx = self._new_index()
                cookie = self._cookies.get((i.name, anchor))
                if cookie is not None and self.clock() - cookie[1] >= COOKIE_LIFE:
                    del self._cookies[(i.name, anchor)]
                    cookie = None
                init = Initiation(static=self.cfg.private_key, remote_static=self.keys[anchor],
                                  local_index=idx, wall_ns=self.wall_ns(),
                                  cookie=cookie[0] if cookie is not None else None)
                fut: asyncio.Future[Session | None] = loop.create_future()
                self._pending[idx] = (anchor, i.name, init, fut)
                sent_at = loop.time()
                wait = min(delay, SETUP_TIMEOUT - waited)   # never past the budget
                try:
                    i.path.sendto(init.packet, self.anchors[anchor])
                    got = await asyncio.wait_for(fut, wait)
                except TimeoutError:
                    waited += wait
                    delay = min(delay * 2, sip.T2)
                    continue
                finally:
                    self._pending.pop(idx, None)
                if got is None:     # a cookie (the anchor is under load): again, with mac2
                    elapsed = loop.time() - sent_at
                    cookies += 1
                    if cookies > COOKIE_RETRIES:   # cookies that do not help: pace the tries
                        await asyncio.sleep(max(0.0, delay - elapsed))
                        elapsed, delay = max(delay, elapsed), min(delay * 2, sip.T2)
                    waited += elapsed
                    continue
                s = got
                self.fwd.add_session(anchor, s)
                if old is not None:   # keep opening the old session's packets for a while
                    loop.call_later(PREVIOUS_SESSION_LIFE, self.fwd.drop_session,
                                    old.local_index)
                log.debug("anchor %s: session %08x via %s", anchor, s.local_index, i.name)
                return True
            if self.fwd.links[anchor].vipa:      # it answered before: the path is the problem
                log.warning("anchor %s: no handshake answer via %s within %.0f s (path down?)",
                            anchor, i.name, SETUP_TIMEOUT)
            else:
                log.warning("anchor %s: no handshake answer via %s within %.0f s (unreachable, "
                            "wrong public_key, or this host not a [[peer]] there)", anchor,
                            i.name, SETUP_TIMEOUT)
            return False

    def _new_index(self) -> int:
        while True:
            idx = secrets.randbits(32)
            if idx and idx not in self.fwd.sessions and idx not in self._pending:
                return idx

    # -- signalling tasks --------------------------------------------------------------
    async def _request(self, i: IfaceSeam, anchor: str, signals: list[tuple[str, dict[str, Any]]],
                       timeout: float) -> tuple[tuple[int, str, list[tuple[str, dict[str, Any]]]],
                                                float]:
        """One sealed SIP MESSAGE transaction with ``anchor`` through interface ``i``."""
        return await self.sip.request_timed(_SealedPath(self.fwd, anchor, i.path),
                                            self.anchors[anchor], signals, timeout)

    async def _associate_via(self, i: IfaceSeam, anchor: str) -> bool:
        """AssociationReq through interface ``i`` (every interface tries at once; the anchor
        answers a host's repeated association with the same VIpA)."""
        if not await self._session(i, anchor):
            if self.anchor_state[anchor] != "associated":
                self.anchor_state[anchor] = "unreachable"
            return False
        try:
            (code, reason, body), _ = await self._request(
                i, anchor, [("AssociationReq", {"sipId": self.cfg.name, "addressInUse": [],
                                                "dataPlaintext": self.cfg.plaintext_data})],
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
        link = self.fwd.links[anchor]
        if (link.vipa, link.role) != (vipa, role) or self.anchor_state[anchor] != "associated":
            log.info("anchor %s (%s): VIpA %s", anchor, role, vipa)   # once, not per interface
        self.fwd.set_association(anchor, vipa, role, serves)
        self._lost[anchor].clear()
        self.anchor_state[anchor] = "associated"
        return True

    async def _tunnel(self, i: IfaceSeam, anchor: str) -> None:
        """Keep the tunnel (i, anchor) up: associate, set up, validate, keep alive; retry."""
        t = self.fwd.by_path[(i.name, anchor)]
        first = self.first_attempt[(i.name, anchor)]
        backoff = 1.0
        while True:
            while not self.link_up[i.name]:        # nothing to try until the link returns
                first.set()
                await self._nap(i, anchor, BACKOFF_MAX)
            link = self.fwd.links[anchor]
            ok = True
            if self._lost[anchor].is_set() or not link.vipa:
                ok = await self._associate_via(i, anchor)
            if ok and await self._setup(i, anchor, t):
                first.set()
                backoff = 1.0
                await self._keepalive(i, anchor, t)
                if t.state == "up":
                    self._path_down(t, "keepalive loss")
                log.warning("tunnel %d (%s -> %s) down", t.tid, i.name, anchor)
            else:
                first.set()
                await self._nap(i, anchor, backoff)
                backoff = 1.0 if not self.link_up[i.name] else min(backoff * 2, BACKOFF_MAX)
            # a dead path or an anchor that restarted (and answers nothing sealed with keys
            # it forgot): start again from a fresh handshake (not through a link that is down)
            if self.link_up[i.name]:
                await self._session(i, anchor, force=True)

    async def _setup(self, i: IfaceSeam, anchor: str, t: Tunnel) -> bool:
        """TunnelSetupReq through ``i``, then echo the path challenge from the same socket."""
        link = self.fwd.links[anchor]
        try:
            (code, reason, body), rtt = await self._request(
                i, anchor, [("TunnelSetupReq", {"sipId": self.cfg.name, "vipa": link.vipa,
                                                "tunnelId": t.tid, "interface": i.name})],
                SETUP_TIMEOUT)
        except SipError as e:
            log.warning("tunnel %s->%s: setup failed: %s", i.name, anchor, e)
            return False
        resp = _find(body, "TunnelSetupResp")
        if code != 200 or resp is None:
            self._refused(anchor, f"tunnel setup via {i.name}", code, reason)
            return False
        if not 0 < resp["serverTunnelID"] <= PATH_MAX:
            log.error("anchor %s sent tunnel id %d (must fit 24 bits)", anchor,
                      resp["serverTunnelID"])
            return False
        t.un_tid = resp["serverTunnelID"]
        if not await self._keepalive_once(i, anchor, t, resp.get("challenge", "")):
            return False
        now = self.clock()
        self.fwd.tunnel_up(t, t.un_tid, now)
        self.monitors[t.tid] = PathMonitor(self.probe_params, started=now)
        self._settled.discard(t.tid)
        # flows without a working tunnel come at once; the others after return_after
        self.announce(self.fwd.restore_preferences(now, self._up_for, self.cfg.return_after_s))
        t.rtt_ms = rtt * 1000.0
        log.info("tunnel %d up: %s -> %s (%s:%d), seen as %s:%d", t.tid, i.name, anchor,
                 *self.anchors[anchor], resp["yourAddress"], resp["yourPort"])
        return True

    def _refused(self, anchor: str, what: str, code: int, reason: str) -> None:
        if code == 501 and "not registered" in reason:
            self._lost[anchor].set()
        log.error("anchor %s refused %s: %d %s", anchor, what, code, reason)

    async def _keepalive_once(self, i: IfaceSeam, anchor: str, t: Tunnel,
                              challenge: str = "") -> bool:
        """One KeepAlive (echoing ``challenge`` if any, and any new one the answer brings:
        the anchor validates a tunnel's outer address this way). False: no good answer."""
        for _ in range(3):
            content: dict[str, Any] = {"sipId": self.cfg.name, "tunnelId": t.un_tid,
                                       "lastDelay": t.rtt_ms}
            if challenge:
                content["challenge"] = challenge
            try:
                (code, reason, body), rtt = await self._request(
                    i, anchor, [("KeepAlive", content)], KEEPALIVE_TIMEOUT)
            except SipError:
                return False
            resp = _find(body, "KeepAliveResp")
            if code != 200 or resp is None:
                self._refused(anchor, f"keepalive of tunnel {t.tid}", code, reason)
                return False
            t.rtt_ms = rtt * 1000.0
            t.last_rx = self.clock()
            challenge = resp.get("challenge", "")
            if not challenge:
                return True      # the anchor has this path validated
        return False

    async def _keepalive(self, i: IfaceSeam, anchor: str, t: Tunnel) -> None:
        """Returns when the tunnel is considered down (or must be set up again)."""
        misses = 0
        while True:
            await self._nap(i, anchor, self.cfg.keepalive_s)
            if not self.link_up[i.name] or t.state != "up":
                return                      # link down, or the probes found the path dead
            await self._session(i, anchor, rekey=True)   # on failure the old session goes on
            if await self._keepalive_once(i, anchor, t):
                misses = 0
                continue
            if self._lost[anchor].is_set():
                return
            misses += 1
            if misses >= DEAD_AFTER:
                return

    # -- operator commands ---------------------------------------------------------------
    def move(self, *, via: str, rule: str | None = None, flow: int | None = None,
             anchor: str | None = None) -> int:
        """Explicit handover (``upmt-agent move``): returns how many flows moved now.
        UsageError for names that do not exist; MoveError when the path is not usable.
        The anchor follows each moved flow by itself on its next uplink packet."""
        names = [i.name for i in self.ifaces]
        if via not in names:
            raise UsageError(f"no interface {via!r} (this agent uses {', '.join(names)})")
        if anchor is not None and anchor not in self.anchors:
            raise UsageError(f"no anchor {anchor!r}")
        now = self.clock()
        if rule is not None:
            if rule not in {r.name for r in self.cfg.rules}:
                raise UsageError(f"no rule {rule!r}")
            moved = self.fwd.move_rule(rule, via, anchor, now)
            self.announce(moved)
            return len(moved)
        f = self.fwd.paft.by_id.get(flow if flow is not None else -1)
        if f is None:
            raise UsageError(f"no flow {flow} (see upmt-agent status)")
        before = f.tunnel
        if not self.fwd.move_one(f, via, now):
            raise MoveError(f"interface {via} has no usable tunnel to anchor {f.anchor}")
        if f.tunnel != before:
            self.announce([f])
        return 1

    def announce(self, flows: list[Flow]) -> None:
        """Tell each anchor, through the flows' new tunnel, that they moved (HandoverReq):
        a flow that sends nothing upstream gives the anchor nothing to learn from."""
        by_tunnel: dict[int, list[Flow]] = {}
        for f in flows:
            by_tunnel.setdefault(f.tunnel, []).append(f)
        for tid, group in by_tunnel.items():
            t = self.fwd.tunnels.get(tid)
            if t is None or t.state != "up":
                continue
            for n in range(0, len(group), 64):
                self._tasks.append(asyncio.create_task(self._handover(t, group[n:n + 64])))

    async def _handover(self, t: Tunnel, flows: list[Flow]) -> None:
        vipa = self.fwd.links[t.peer].vipa
        items = [[f.key[0], vipa, ip_str(f.key[2]), f.key[3], f.key[4]] for f in flows]
        try:
            (code, reason, _), _ = await self._request(
                self.ifaces[t.iface_index], t.peer,
                [("HandoverReq", {"sipId": self.cfg.name, "tunnelId": t.un_tid,
                                  "flows": items})], KEEPALIVE_TIMEOUT)
        except SipError as e:
            log.warning("handover of %d flow(s) to tunnel %d not confirmed: %s", len(flows),
                        t.tid, e)
            return
        if code != 200:
            log.warning("anchor %s refused a handover: %d %s", t.peer, code, reason)

    async def control(self, req: dict[str, Any]) -> dict[str, Any] | None:
        """Agent-specific control commands; None: not one of ours."""
        if req.get("cmd") == "cgroup":
            rule = req.get("rule")
            if rule not in {r.name for r in self.cfg.rules}:
                return {"ok": False, "usage": True, "error": f"no rule {rule!r}"}
            path = self.cgroup_of(str(rule)) if self.cgroup_of is not None else None
            if path is None:
                return {"ok": False, "error": "per-program steering needs cgroup v2"}
            return {"ok": True, "path": path}
        if req.get("cmd") != "move":
            return None
        try:
            flow = req.get("flow")
            moved = self.move(via=str(req.get("via")), rule=req.get("rule"),
                              flow=int(flow) if flow is not None else None,
                              anchor=req.get("anchor"))
        except UsageError as e:
            return {"ok": False, "usage": True, "error": str(e)}
        except (MoveError, ValueError, TypeError) as e:
            return {"ok": False, "error": str(e)}
        return {"ok": True, "moved": moved}

    # -- status ------------------------------------------------------------------------
    def _iface_of(self, tid: int | None) -> str | None:
        t = self.fwd.tunnels.get(tid) if tid is not None else None
        return t.interface if t is not None else None

    def tunnel_json(self, t: Tunnel, now: float) -> dict[str, Any]:
        j = t.json()
        m = self.monitors.get(t.tid)
        if m is not None:
            if m.srtt is not None:
                j["rtt_ms"] = round(m.srtt * 1000.0, 3)     # from the probes
            loss = m.loss()
            j["probe"] = {"every_s": m.interval, "loss": None if loss is None else round(loss, 3),
                          "silent_s": round(now - m.last_rx, 3),
                          "up_for_s": round(now - m.started, 1)}
        return j

    def flow_json(self, f: Flow) -> dict[str, Any]:
        t = self.fwd.tunnels.get(f.tunnel)
        j = f.json(self.clock(), t.interface if t else None, self._iface_of)
        j.update(rule=f.rule, anchor=f.anchor)
        if f.app_src:
            j["src"] = f.app_src       # the application's own source, before the SNAT
        return j

    def status(self) -> dict[str, Any]:
        return {
            "vipa_fix": self.cfg.vipa_fix,
            "name": self.cfg.name,
            "anchors": [{"name": a, "address": f"{self.anchors[a][0]}:{self.anchors[a][1]}",
                         "state": self.anchor_state[a], "vipa": self.fwd.links[a].vipa or None,
                         "role": self.fwd.links[a].role} for a in self.anchors],
            "tunnels": [self.tunnel_json(t, self.clock()) for t in self.fwd.tunnels.tunnels()],
            "flows": [self.flow_json(f) for f in self.fwd.paft.flows()],
            "drops": dict(self.drops),
            "signalling": dict(self.sip.stats),
        }


def _find(body: list[tuple[str, dict[str, Any]]], mtype: str) -> dict[str, Any] | None:
    return next((c for t, c in body if t == mtype), None)
