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
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import replace
from typing import Any

from .agent import Agent, IfaceSeam, rule_classifier
from .anchor import Anchor
from .config import MIN_IPV6_MTU, AgentConfig, AnchorConfig, format_host_port
from .control import ControlServer, ensure_free, remove_stale
from .dataplane.io import PathSocket, TunDevice, open_udp
from .dataplane.packet import OVERHEAD, OVERHEAD6
from .hotplug_driver import Hotplug, entries
from .leases import Leases, lease_file
from .mesh import RELAY_OVERHEAD
from .metrics import MetricsServer, render_agent, render_anchor
from .reload import start_slots
from .reload_driver import AgentReloader, AnchorReloader, SlotFile, rule_matches
from .resolve import AnchorResolver, ResolveSchedule, first_lookups
from .service import notify, say
from .system import netlink
from .system.agent_host import AgentHost, IfacePlan
from .system.anchor_host import AnchorHost, is_paused
from .system.cgroups import RuleCgroups
from .system.errors import StartupError, SystemSetupError
from .system.ifstate import InterfaceState
from .system.linkwatch import LinkWatch
from .tables import FlowKey, ip_str

__all__ = ["cleanup_agent", "cleanup_anchor", "new_loop", "run_agent", "run_anchor",
           "StartupError"]

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


def _first_resolution(cfg: AgentConfig, now: float) -> ResolveSchedule:
    """Each anchor's name looked up once before start (at most FIRST_WAIT s: ``ready``
    counts an anchor that does not resolve as a failed first attempt); the ones that
    fail stay unresolved and :class:`AnchorResolver` keeps trying."""
    schedule = ResolveSchedule({a.name: (a.host, a.port) for a in cfg.anchors}, now)
    for name, why in first_lookups(schedule, now):
        e = schedule.entries[name]
        log.warning("anchor %s: cannot resolve %r (%s): its tunnels wait, retrying in"
                    " %.0f s", name, e.host, why, e.due - now)
    return schedule


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


# SIGUSR2 stops too, *for a restart*: systemd sends it on `systemctl restart`
# (RestartKillSignal= in the units); the anchor then keeps its NAT (AnchorHost.pause_on_teardown)
RESTART_SIGNAL = signal.SIGUSR2
STOP_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, RESTART_SIGNAL)


def controlling_terminal() -> bool:
    """Whether this process has a controlling terminal (``/dev/tty`` opens). Without one
    (systemd, ``setsid``, a session of its own) SIGHUP means reload; with one it means
    the terminal closed, so stop."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False
    os.close(fd)
    return True


class StopSignals:
    """SIGHUP, SIGTERM and SIGINT all mean "stop cleanly", whenever they arrive; except
    SIGHUP when :attr:`hup_reloads` (the daemon has no controlling terminal, so no
    terminal can have closed): then it means ``reload`` (:attr:`on_hup`, set while the
    daemon serves; one that arrives before is held until then, one once stopping is
    ignored).

    A closed terminal sends SIGHUP, systemd SIGTERM, Ctrl-C SIGINT; each one's default
    action would kill the daemon with its host changes (rules, tables, nft) in place.
    From :meth:`install` on, a signal is only *noted*: the start-up code checks
    :attr:`signum` between its steps (it never stops half-way through a host change, which
    an exception raised from a handler could), the event loop sets its stop event (the
    loop's own handlers, :meth:`attach`), and during the teardown a signal changes
    nothing.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.hup_reloads = False
        self.on_hup: Callable[[], None] | None = None
        self.hup_pending = False
        self._event: asyncio.Event | None = None
        self._old: dict[int, Any] = {}
        # signal handlers belong to the main thread (a daemon runs there; a test may not)
        self.active = threading.current_thread() is threading.main_thread()

    def note(self, signum: int, _frame: object = None) -> None:
        if signum == signal.SIGHUP and self.hup_reloads:
            if self.signum is not None:
                return                   # stopping: nothing left to reload
            if self.on_hup is not None:
                self.on_hup()
            else:
                self.hup_pending = True
            return
        if self.signum is None:
            self.signum = signum
            log.info("%s: stopping%s", signal.Signals(signum).name,
                     " for a restart" if signum == RESTART_SIGNAL else "")
        if self._event is not None:
            self._event.set()

    def install(self) -> None:
        if not self.active:
            return
        for sig in STOP_SIGNALS:
            self._old[sig] = signal.signal(sig, self.note)

    def attach(self, loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
        """Inside the loop: its handlers wake it up (a Python-level handler would run only
        when the loop next wakes for something else)."""
        self._event = event
        if not self.active:
            return
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self.note, sig)
        if self.signum is not None:
            event.set()

    def detach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Back to noting only (removing a loop handler resets the signal to its default)."""
        self._event = None
        self.on_hup = None
        self.hup_pending = False
        if not self.active:
            return
        for sig in STOP_SIGNALS:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
            signal.signal(sig, self.note)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


def _metrics_server(addr: tuple[str, int] | None, runner: Any,
                    render: Callable[[Mapping[str, Any]], str]) -> MetricsServer | None:
    """The Prometheus endpoint of ``metrics = "ADDR:PORT"`` (None when not configured):
    every scrape renders the runner's ``status()`` at that moment."""
    if addr is None:
        return None
    return MetricsServer(addr[0], addr[1], lambda: render(runner.status()))


Reload = Callable[[str | None], Coroutine[Any, Any, dict[str, Any]]]


def _on_hup(loop: asyncio.AbstractEventLoop, reload: Reload) -> Callable[[], None]:
    """SIGHUP as reload of the running config file (the outcome is logged)."""
    running: set[asyncio.Task[dict[str, Any]]] = set()

    def hup() -> None:
        log.info("SIGHUP: reloading the config")
        task = loop.create_task(reload(None))
        running.add(task)
        task.add_done_callback(running.discard)

    return hup


async def _serve(runner: Any, control_path: str, on_ready: Any, signals: StopSignals,
                 metrics: MetricsServer | None = None, group: int | None = None,
                 reload: Reload | None = None) -> None:
    """Start ``runner``, its control socket (and metrics endpoint), print ready, run until
    a signal or ``down``. ``reload(path)`` serves ``reload`` (and SIGHUP, see
    :class:`StopSignals`)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals.attach(loop, stop)

    async def handle(req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "status":
            # the task count lets a soak (benchmarks/chaos.py) see tasks that pile up
            return {"ok": True, "status": {**runner.status(), "tasks": len(asyncio.all_tasks())}}
        if cmd == "down":
            loop.call_soon(stop.set)
            return {"ok": True}
        if cmd == "reload" and reload is not None:
            path = req.get("config")
            return await reload(path if isinstance(path, str) and path else None)
        extra = getattr(runner, "control", None)
        answer = await extra(req) if extra is not None else None
        if answer is not None:
            return dict(answer)
        return {"ok": False, "error": f"unknown command {str(cmd)[:40]!r}"}

    try:
        control = ControlServer(control_path, handle, group)
        await control.start()
        try:
            await runner.start()
            if metrics is not None:
                try:
                    await metrics.start()
                except OSError as e:
                    raise StartupError(f"metrics: cannot listen on {metrics.host}:"
                                       f"{metrics.port}: {e.strerror or e}") from None
            if reload is not None:
                signals.on_hup = _on_hup(loop, reload)
                if signals.hup_pending:
                    signals.on_hup()
            ready = asyncio.ensure_future(on_ready())
            stopped = asyncio.ensure_future(stop.wait())
            try:              # a stop while waiting for the tunnels is not held up by it
                await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if ready.done():
                    ready.result()
                    await stopped
            finally:
                for task in (ready, stopped):
                    task.cancel()
                await asyncio.gather(ready, stopped, return_exceptions=True)
        finally:
            signals.on_hup = None        # no reload may start while the daemon stops
            notify("STOPPING=1")
            if metrics is not None:
                await metrics.close()
            await control.close()
            await runner.stop()
    finally:
        signals.detach(loop)


def _close(opened: list[Any], host: AgentHost | AnchorHost | None,
           loop: asyncio.AbstractEventLoop) -> None:
    """Close sockets and TUN, undo the host changes, close the loop: whatever happened.
    (Stop signals are only noted meanwhile: see :class:`StopSignals`.)"""
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


def _ipv6_enabled(ifname: str) -> bool:
    """Whether interface ``ifname`` can hold IPv6 addresses (the kernel has IPv6 and
    ``disable_ipv6`` is off for it)."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6") as f:
            return f.read().strip() == "0"
    except OSError:
        return False


def _open_tun(name: str, loop: asyncio.AbstractEventLoop, opened: list[Any]) -> TunDevice:
    try:
        tun = TunDevice(name, loop, offload=_offload('tun'))
    except OSError as e:
        raise StartupError(str(e.strerror or e)) from None
    opened.append(tun)
    return tun


def _ready_line() -> None:
    """``ready`` on stdout (the terminal, a pipe) and READY=1 to systemd, at the same time."""
    say("ready")
    notify("READY=1")


def run_agent(cfg: AgentConfig, control_path: str) -> None:
    """``upmt-agent up``: returns when stopped (also by SIGHUP/SIGTERM/SIGINT, with the host
    restored); raises StartupError/SystemSetupError."""
    signals = StopSignals()
    signals.hup_reloads = not controlling_terminal()
    signals.install()
    try:
        _run_agent(cfg, control_path, signals)
    finally:
        signals.restore()


def _run_agent(cfg: AgentConfig, control_path: str, signals: StopSignals) -> None:
    ensure_free(control_path)
    keep_heap()
    ifaces, dev_slots = entries(cfg, _interfaces)
    # no device, no address or no carrier yet (booting before the network, a tether not
    # plugged in): down until it comes up
    waiting = {i.name for i, _ in ifaces if not i.families or not i.carrier}
    for info, _gw in sorted(ifaces, key=lambda x: x[0].name):
        if info.index == 0:
            log.info("interface %s: no such device yet: its tunnels wait", info.name)
        elif info.name in waiting:
            log.info("interface %s has no address or carrier yet: its tunnels wait",
                     info.name)
    names = {i.name for i, _ in ifaces}
    for r in cfg.rules:
        for v in r.via:
            if v not in names:
                raise StartupError(f"rule {r.name!r}: via interface {v!r} is not in use")
    schedule = _first_resolution(cfg, time.monotonic())
    anchors = {name: e.addr for name, e in schedule.entries.items()}
    # the worst interface sets it: an IPv6 one carries 20 bytes more of outer header;
    # devices that come later do not change it (set `mtu` if theirs may be smaller)
    mtu = cfg.mtu or min((i.mtu - (OVERHEAD6 if i.address6 else OVERHEAD)
                          for i, _ in ifaces if i.mtu), default=1500 - OVERHEAD)
    file_vipa6 = cfg.vipa6_fix          # (a reload compares files: see AgentReloader)
    if cfg.vipa6_fix and mtu < MIN_IPV6_MTU:
        log.warning("IPv6 inside the tunnels off: the TUN's MTU %d is below IPv6's minimum "
                    "%d (raise mtu or the access interfaces' MTU)", mtu, MIN_IPV6_MTU)
        cfg = replace(cfg, vipa6_fix="")
    if signals.signum is not None:
        return                       # stopped before anything was changed
    loop = new_loop()
    asyncio.set_event_loop(loop)
    opened: list[Any] = []
    host: AgentHost | None = None
    try:
        seams = []
        devices = {i.name: (dev_slots.device(i.name) if dev_slots else i.name) for i, _ in ifaces}
        paths: dict[str, PathSocket] = {}
        for idx, (info, _gw) in enumerate(ifaces):
            # an entry without a device yet: unbound until one comes (Hotplug); its link
            # is down and sends nothing, and its table has no route. An interface with a
            # global IPv6 address gets a dual-stack socket (IPv4 peers through it as
            # ::ffff:a.b.c.d, routed by the IPv4 rule and table)
            any_ip = "::" if info.address6 else "0.0.0.0"
            sock = open_udp(any_ip, 0, device=devices[info.name], mark=cfg.fwmark + 1 + idx)
            local = info.address or info.address6 or "0.0.0.0"
            path = PathSocket(sock, loop, (local, sock.getsockname()[1]),
                              offload=_offload('udp'))
            opened.append(path)
            paths[info.name] = path
            seams.append(IfaceSeam(info.name, idx, path, info.families or frozenset({4})))
        plans = [IfacePlan(idx, info.name, gw, seams[idx].path.local[1],
                           waiting=info.name in waiting, absent=info.index == 0,
                           v6=info.address6 is not None, gateway6=info.gateway6)
                 for idx, (info, gw) in enumerate(ifaces)]
        cgroups = RuleCgroups(control_path, [r.name for r in cfg.rules])
        # made also without rules: rules a reload adds get their cgroups in it
        usable = cgroups.root is not None
        if usable:
            try:
                cgroups.create()
                opened.append(_CgroupsCloser(cgroups))
            except SystemSetupError as e:   # `run` is optional: steering works without it
                log.warning("%s: `upmt-agent run` will not be available", e)
                cgroups.remove()
                usable = False
        elif cgroups.root is None:
            log.info("no cgroup v2: `upmt-agent run` will not be available")
        # `upmt-agent run --rule R`: every socket of a process in R's cgroup belongs to R,
        # whatever its ports; checked before the header matches.
        slot_file = SlotFile(control_path)
        saved = slot_file.load()
        slots = start_slots(cfg.rules, *saved) if saved else start_slots(cfg.rules)
        if saved and slots != saved:       # rules new since: their slots too, for later
            slot_file.save(*slots)
        rules = rule_matches(cfg.rules, slots[0], cgroups.relative if usable else None)
        host = AgentHost(tun=cfg.tun, vipa_fix=cfg.vipa_fix, fwmark=cfg.fwmark, table=cfg.table,
                         ifaces=plans, rules=rules, state_file=control_path + ".state",
                         mark_mask=cfg.mark_mask, priority=cfg.rule_priority,
                         devices={k: v for k, v in devices.items() if v is not None},
                         vipa6_fix=cfg.vipa6_fix)
        host.cleanup_leftovers()
        tun = _open_tun(cfg.tun, loop, opened)
        if cfg.vipa6_fix and not _ipv6_enabled(tun.name):
            log.info("IPv6 inside the tunnels off: IPv6 is disabled on %s "
                     "(net.ipv6.conf.*.disable_ipv6)", tun.name)
            cfg = replace(cfg, vipa6_fix="")
            host.vipa6_fix = ""
        netlink.configure_tun(tun.name, cfg.vipa_fix, 32, mtu, cfg.vipa6_fix)
        host.setup()
        from .system.conntrack import Conntrack

        ct = Conntrack()

        def lookup(key: FlowKey) -> tuple[int, str] | None:
            return ct.lookup_reply(key[0], ip_str(key[2]), ip_str(key[1]), key[4], key[3])

        mesh_mtu = mtu - RELAY_OVERHEAD

        def mesh_route(pool: str) -> None:
            async def add() -> None:
                assert host is not None
                try:
                    await asyncio.to_thread(host.add_mesh_pool, pool, mesh_mtu)
                except SystemSetupError as e:
                    log.error("mesh pool %s: %s", pool, e)
            loop.create_task(add())

        agent = Agent(cfg, tun=tun, ifaces=seams, anchors=anchors,
                      classify_flow=rule_classifier(cfg.rules, lookup, cfg.fwmark,
                                                    slots[0]),
                      cgroup_of=lambda rule: str(cgroups.path(rule)) if cgroups.made else None,
                      mesh_route=mesh_route)
        agent.fwd.mesh_mtu = mesh_mtu
        agent.devices.update(devices)
        agent.fwd.mtu = mtu                # IPv6 longer than this: Packet Too Big
        for name in waiting:            # before start: its links start LINK_DOWN (tried)
            agent.on_link(name, False, "no address yet")
        resolver = AnchorResolver(schedule, agent.set_anchor_address, clock=time.monotonic)
        reloader = AgentReloader(cfg, agent=agent, host=host,
                                 cgroups=cgroups if usable else None, schedule=schedule,
                                 resolver=resolver, lookup=lookup, slots=slots,
                                 slot_file=slot_file,
                                 v6_off=cfg.vipa6_fix != file_vipa6)

        def on_usable(name: str, usable: bool, why: str) -> None:
            agent.on_link(name, usable, why)
            if usable:
                resolver.kick()        # a name that failed may resolve now

        def on_changed(name: str) -> None:
            agent.path_changed(name)
            resolver.kick()
        configured = {ic.name: ic.gateway for ic in cfg.interfaces}

        def read_iface(name: str) -> tuple[str | None, str | None]:
            device = dev_slots.device(name) if dev_slots is not None else name
            if device is None:
                raise SystemSetupError("no such device")
            info = netlink.interface_info(device)   # IPv6-only: usable with its IPv6 one
            return info.address or info.address6, info.gateway

        async def set_route(name: str, gateway: str | None) -> None:
            assert host is not None
            await asyncio.to_thread(host.restore_iface_route, name, gateway)

        async def adopt(address: str) -> None:
            if ":" not in address:   # steered flows are IPv4: an IPv6 one has none to keep
                await asyncio.to_thread(netlink.add_address, tun.name, address, 32)

        async def release(address: str) -> None:
            if ":" not in address:
                await asyncio.to_thread(netlink.remove_address, tun.name, address, 32)

        state = InterfaceState({info.index: info.name for info, _ in ifaces if info.index},
                               {info.name: info.address or info.address6
                                for info, _ in ifaces},
                               {p.name: p.gateway for p in plans}, configured,
                               read=read_iface, set_route=set_route, on_usable=on_usable,
                               on_changed=on_changed, adopt=adopt, release=release,
                               carrier={info.name: info.carrier for info, _ in ifaces})
        opened.append(state)
        hot = None
        if dev_slots is not None:
            hot = Hotplug(dev_slots, paths,
                          {p.name: cfg.fwmark + 1 + p.index for p in plans}, host, state, agent)
            opened.append(hot)
        opened.append(LinkWatch(loop, state.on_event, hot.on_name if hot else None))

        async def on_ready() -> None:
            resolver.start()
            try:
                await asyncio.wait_for(agent.wait_ready(), READY_TIMEOUT)
            except TimeoutError:
                log.warning("not every tunnel answered within %.0f s; going on", READY_TIMEOUT)
            _ready_line()
            log.info("vipa_fix %s on %s (mtu %d), %d interface(s), %d anchor(s)",
                     cfg.vipa_fix, tun.name, mtu, len(seams), len(anchors))

        if signals.signum is None:       # not stopped while setting the host up
            loop.run_until_complete(_serve(agent, control_path, on_ready, signals,
                                           _metrics_server(cfg.metrics, agent, render_agent),
                                           cfg.group, reloader.reload))
            loop.run_until_complete(resolver.close())
        ct.close()
    finally:
        _close(opened, host, loop)


def run_anchor(cfg: AnchorConfig, control_path: str) -> None:
    """``upmt-anchor``: returns when stopped (also by SIGHUP/SIGTERM/SIGINT, with the host
    restored)."""
    signals = StopSignals()
    signals.hup_reloads = not controlling_terminal()
    signals.install()
    try:
        _run_anchor(cfg, control_path, signals)
    finally:
        signals.restore()


def _run_anchor(cfg: AnchorConfig, control_path: str, signals: StopSignals) -> None:
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
            raise StartupError(f"cannot listen on "
                               f"{format_host_port(cfg.listen_host, cfg.listen_port)}: "
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
                          max_flows_per_host=cfg.max_flows_per_host,
                          pool6=str(cfg.vipa6_pool) if cfg.vipa6_pool else "")
        host.cleanup_leftovers(keep_table=True)   # setup replaces it in one transaction
        tun = _open_tun(cfg.tun, loop, opened)
        host.setup()
        anchor = Anchor(cfg, tun=tun, path=path)
        leases = (Leases.open(lease_file(cfg.state_dir, control_path)) if cfg.state_dir
                  else Leases.memory())
        opened.append(leases)
        anchor.sig.use_leases(leases, peers=[p.name for p in cfg.peers],
                              max_age=cfg.lease_days * 86400.0)

        async def on_ready() -> None:
            _ready_line()
            log.info("%s listening on %s, VIpA pool %s", cfg.role,
                     format_host_port(cfg.listen_host, cfg.listen_port), cfg.vipa_pool)

        if signals.signum is None:
            reloader = AnchorReloader(cfg, anchor=anchor, host=host)
            loop.run_until_complete(_serve(anchor, control_path, on_ready, signals,
                                           _metrics_server(cfg.metrics, anchor, render_anchor),
                                           cfg.group, reloader.reload))
    finally:
        if host is not None and signals.signum == RESTART_SIGNAL:
            host.pause_on_teardown = True
        _close(opened, host, loop)


def cleanup_agent(cfg: AgentConfig, control_path: str) -> None:
    """``upmt-agent cleanup``: remove what a killed agent with this config and control
    socket left: its nft table, ip rules, routes of its tables, sysctls (from its state
    file), cgroups, TUN device and control socket. Refuses (ControlError) while an agent
    answers on the socket; does nothing, quietly, when nothing is left (ExecStopPost runs
    it after every stop)."""
    if remove_stale(control_path, "agent"):
        log.info("removed stale control socket %s", control_path)
    count = len(cfg.interfaces)
    if not count:           # discovered interfaces: as many tables as there are now
        with contextlib.suppress(Exception):
            count = len(netlink.default_route_interfaces())
    plans = [IfacePlan(i, f"iface{i}", None, 0) for i in range(count)]
    AgentHost(tun=cfg.tun, vipa_fix=cfg.vipa_fix, fwmark=cfg.fwmark, table=cfg.table,
              ifaces=plans, rules=[], state_file=control_path + ".state",
              mark_mask=cfg.mark_mask, priority=cfg.rule_priority).cleanup_leftovers()
    if netlink.delete_tun(cfg.tun):
        log.info("removed leftover TUN device %s", cfg.tun)
    if removed := RuleCgroups(control_path, []).remove_leftovers():
        log.info("removed %d leftover cgroup(s)", removed)


def cleanup_anchor(cfg: AnchorConfig, control_path: str, keep_paused: bool = False) -> None:
    """``upmt-anchor cleanup``: the same for a killed anchor (nft table, sysctls, TUN,
    control socket), and the NAT stub an anchor stopped for a restart left, unless
    ``keep_paused`` (``--keep-paused``: ExecStopPost, which runs on a restart too: the
    stub is there only after a stop for a restart, and the next start replaces it)."""
    if remove_stale(control_path, "anchor"):
        log.info("removed stale control socket %s", control_path)
    paused = is_paused()
    if paused:
        log.info("%s the NAT kept by an anchor stopped for a restart",
                 "leaving" if keep_paused else "removing")
    AnchorHost(tun=cfg.tun, tun_address=str(next(cfg.vipa_pool.hosts())),
               pool_prefixlen=cfg.vipa_pool.prefixlen, pool=str(cfg.vipa_pool), mtu=cfg.mtu,
               role=cfg.role, nat_interface=cfg.nat_interface,
               state_file=control_path + ".state").cleanup_leftovers(
        keep_table=keep_paused and paused)
    if netlink.delete_tun(cfg.tun):
        log.info("removed leftover TUN device %s", cfg.tun)
