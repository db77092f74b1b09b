"""Composition of the real thing: host setup, real TUN and sockets, event loop, teardown.

``run_agent``/``run_anchor`` set the host up *before* the event loop runs and
tear it down *after* it stopped (pyroute2's synchronous API refuses a running
loop, TRAPS.md), so whatever happens in between, the host is restored.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
from typing import Any

from .agent import Agent, IfaceSeam, rule_classifier
from .anchor import Anchor
from .config import AgentConfig, AnchorConfig
from .control import ControlServer, ensure_free
from .dataplane.io import PathSocket, TunDevice, open_udp
from .dataplane.packet import OVERHEAD
from .system import netlink
from .system.agent_host import AgentHost, IfacePlan, RuleMatch
from .system.anchor_host import AnchorHost
from .system.cgroups import RuleCgroups
from .system.errors import StartupError
from .system.ifstate import InterfaceState
from .system.linkwatch import LinkWatch
from .tables import FlowKey, ip_str

__all__ = ["new_loop", "run_agent", "run_anchor", "StartupError"]

log = logging.getLogger(__name__)
READY_TIMEOUT = 10.0


def _offload(kind: str) -> bool:
    """UPMT_NO_OFFLOAD=tun,udp (or =1 for both) turns kernel offloads off, to compare."""
    off = os.environ.get("UPMT_NO_OFFLOAD", "")
    return not (off == "1" or kind in off.split(","))


def new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed, else asyncio's own loop."""
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop()


M_TRIM_THRESHOLD = -1      # glibc's mallopt parameter (malloc.h)
HEAP_KEEP = 8 << 20


def keep_heap() -> bool:
    """Let glibc keep up to :data:`HEAP_KEEP` free at the top of the heap (default 128 KiB).

    A busy tunnel allocates and frees 64 KiB read buffers all the time; with the default
    the anchor gave the top of its heap back with ``brk`` about 600 times a second and took
    a page fault on every fresh page when it grew again (3-4 % of the machine's CPU under
    ``perf`` during a TCP upload). Daemons only: a library user keeps its own settings.
    False where there is no glibc ``mallopt`` (musl) or it refused."""
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_TRIM_THRESHOLD, HEAP_KEEP))
    except (OSError, AttributeError):
        return False


def _resolve(host: str, port: int) -> tuple[str, int]:
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)
    except socket.gaierror as e:
        raise StartupError(f"cannot resolve anchor address {host!r}: {e.strerror}") from None
    return str(infos[0][4][0]), port


def _interfaces(cfg: AgentConfig) -> list[tuple[netlink.IfaceInfo, str | None]]:
    """(interface info, gateway) for the configured or discovered interfaces."""
    if not cfg.interfaces:
        found = netlink.default_route_interfaces()
        if not found:
            raise StartupError("no interface has a default route; list [[interface]] in the config")
        return [(i, i.gateway) for i in found]
    out = []
    for ic in cfg.interfaces:
        info = netlink.interface_info(ic.name)
        out.append((info, ic.gateway or info.gateway))
    return out


async def _serve(runner: Any, control_path: str, on_ready: Any) -> None:
    """Start ``runner``, its control socket, print ready, run until a signal or ``down``."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def handle(req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "status":
            # the task count lets a soak (benchmarks/chaos.py) see tasks that pile up
            return {"ok": True, "status": {**runner.status(), "tasks": len(asyncio.all_tasks())}}
        if cmd == "down":
            loop.call_soon(stop.set)
            return {"ok": True}
        extra = getattr(runner, "control", None)
        answer = await extra(req) if extra is not None else None
        if answer is not None:
            return dict(answer)
        return {"ok": False, "error": f"unknown command {str(cmd)[:40]!r}"}

    control = ControlServer(control_path, handle)
    await control.start()
    try:
        await runner.start()
        await on_ready()
        await stop.wait()
    finally:
        await control.close()
        await runner.stop()


def _close(opened: list[Any], host: AgentHost | AnchorHost | None,
           loop: asyncio.AbstractEventLoop) -> None:
    """Close sockets and TUN, undo the host changes, close the loop: whatever happened."""
    for o in opened:
        with contextlib.suppress(Exception):
            o.close()
    if host is not None:
        host.teardown()
    loop.close()


class _CgroupsCloser:
    """close() removes the cgroups (so they go with the other opened things)."""

    def __init__(self, cg: RuleCgroups) -> None:
        self.cg = cg

    def close(self) -> None:
        self.cg.remove()


def _open_tun(name: str, loop: asyncio.AbstractEventLoop, opened: list[Any]) -> TunDevice:
    try:
        tun = TunDevice(name, loop, offload=_offload('tun'))
    except OSError as e:
        raise StartupError(str(e.strerror or e)) from None
    opened.append(tun)
    return tun


def run_agent(cfg: AgentConfig, control_path: str) -> None:
    """``upmt-agent up``: returns when stopped; raises StartupError/SystemSetupError."""
    ensure_free(control_path)
    keep_heap()
    ifaces = _interfaces(cfg)
    if any(i.address is None for i, _ in ifaces):
        bad = next(i.name for i, _ in ifaces if i.address is None)
        raise StartupError(f"interface {bad} has no IPv4 address")
    names = {i.name for i, _ in ifaces}
    for r in cfg.rules:
        for v in r.via:
            if v not in names:
                raise StartupError(f"rule {r.name!r}: via interface {v!r} is not in use")
    anchors = {a.name: _resolve(a.host, a.port) for a in cfg.anchors}
    mtu = cfg.mtu or min(i.mtu for i, _ in ifaces) - OVERHEAD
    loop = new_loop()
    asyncio.set_event_loop(loop)
    opened: list[Any] = []
    host: AgentHost | None = None
    try:
        seams = []
        for idx, (info, _gw) in enumerate(ifaces):
            sock = open_udp("0.0.0.0", 0, device=info.name, mark=cfg.fwmark + 1 + idx)
            path = PathSocket(sock, loop, (info.address or "0.0.0.0", sock.getsockname()[1]),
                              offload=_offload('udp'))
            opened.append(path)
            seams.append(IfaceSeam(info.name, idx, path))
        plans = [IfacePlan(idx, info.name, gw, seams[idx].path.local[1])
                 for idx, (info, gw) in enumerate(ifaces)]
        rules = [RuleMatch(r.index, r.protocol, str(r.dst) if r.dst else None, r.dst_port,
                           r.src_port, r.uid, r.cgroup) for r in cfg.rules]
        cgroups = RuleCgroups(control_path, [r.name for r in cfg.rules])
        if cgroups.root is not None and cfg.rules:
            cgroups.create()
            opened.append(_CgroupsCloser(cgroups))
            # `upmt-agent run --rule R`: every socket of a process in R's cgroup belongs to R,
            # whatever its ports; checked before the header matches.
            rules = [RuleMatch(r.index, "any", None, None, None, None,
                               cgroups.relative(r.name)) for r in cfg.rules] + rules
        else:
            log.info("no cgroup v2: `upmt-agent run` will not be available")
        host = AgentHost(tun=cfg.tun, vipa_fix=cfg.vipa_fix, fwmark=cfg.fwmark, table=cfg.table,
                         ifaces=plans, rules=rules, state_file=control_path + ".state")
        host.cleanup_leftovers()
        tun = _open_tun(cfg.tun, loop, opened)
        netlink.configure_tun(tun.name, cfg.vipa_fix, 32, mtu)
        host.setup()
        from .system.conntrack import Conntrack

        ct = Conntrack()

        def lookup(key: FlowKey) -> tuple[int, str] | None:
            return ct.lookup_reply(key[0], ip_str(key[2]), ip_str(key[1]), key[4], key[3])

        agent = Agent(cfg, tun=tun, ifaces=seams, anchors=anchors,
                      classify_flow=rule_classifier(cfg.rules, lookup, cfg.fwmark),
                      cgroup_of=lambda rule: str(cgroups.path(rule)) if cgroups.made else None)
        configured = {ic.name: ic.gateway for ic in cfg.interfaces}

        def read_iface(name: str) -> tuple[str | None, str | None]:
            info = netlink.interface_info(name)
            return info.address, info.gateway

        async def set_route(name: str, gateway: str | None) -> None:
            assert host is not None
            await asyncio.to_thread(host.restore_iface_route, name, gateway)

        async def adopt(address: str) -> None:
            await asyncio.to_thread(netlink.add_address, tun.name, address, 32)

        async def release(address: str) -> None:
            await asyncio.to_thread(netlink.remove_address, tun.name, address, 32)

        state = InterfaceState({info.index: info.name for info, _ in ifaces},
                               {info.name: info.address for info, _ in ifaces},
                               {p.name: p.gateway for p in plans}, configured,
                               read=read_iface, set_route=set_route, on_usable=agent.on_link,
                               on_changed=agent.path_changed, adopt=adopt, release=release)
        opened.append(state)
        opened.append(LinkWatch(loop, state.on_event))

        async def on_ready() -> None:
            try:
                await asyncio.wait_for(agent.wait_ready(), READY_TIMEOUT)
            except TimeoutError:
                log.warning("not every tunnel answered within %.0f s; going on", READY_TIMEOUT)
            print("ready", flush=True)
            log.info("vipa_fix %s on %s (mtu %d), %d interface(s), %d anchor(s)",
                     cfg.vipa_fix, tun.name, mtu, len(seams), len(anchors))

        loop.run_until_complete(_serve(agent, control_path, on_ready))
        ct.close()
    finally:
        _close(opened, host, loop)


def run_anchor(cfg: AnchorConfig, control_path: str) -> None:
    """``upmt-anchor``: returns when stopped."""
    ensure_free(control_path)
    keep_heap()
    loop = new_loop()
    asyncio.set_event_loop(loop)
    opened: list[Any] = []
    host: AnchorHost | None = None
    try:
        try:
            sock = open_udp(cfg.listen_host, cfg.listen_port)
        except OSError as e:
            raise StartupError(f"cannot listen on {cfg.listen_host}:{cfg.listen_port}: "
                               f"{e.strerror}") from None
        path = PathSocket(sock, loop, (cfg.listen_host, cfg.listen_port),
                          offload=_offload('udp'))
        opened.append(path)
        tun_addr = str(next(cfg.vipa_pool.hosts()))
        host = AnchorHost(tun=cfg.tun, tun_address=tun_addr, pool_prefixlen=cfg.vipa_pool.prefixlen,
                          pool=str(cfg.vipa_pool), mtu=cfg.mtu, role=cfg.role,
                          nat_interface=cfg.nat_interface, state_file=control_path + ".state",
                          listen_address=cfg.listen_host,
                          allow_egress=tuple(map(str, cfg.allow_egress)),
                          deny_egress=tuple(map(str, cfg.deny_egress)),
                          max_flows_per_host=cfg.max_flows_per_host)
        host.cleanup_leftovers()
        tun = _open_tun(cfg.tun, loop, opened)
        host.setup()
        anchor = Anchor(cfg, tun=tun, path=path)

        async def on_ready() -> None:
            print("ready", flush=True)
            log.info("%s listening on %s:%d, VIpA pool %s", cfg.role, cfg.listen_host,
                     cfg.listen_port, cfg.vipa_pool)

        loop.run_until_complete(_serve(anchor, control_path, on_ready))
    finally:
        _close(opened, host, loop)
