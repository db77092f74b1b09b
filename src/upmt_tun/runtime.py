"""The daemons: an event loop around the embeddable API, signals, ``ready``, sd_notify.

``run_agent``/``run_anchor`` run ``api.Agent.open``/``api.Anchor.open`` (which set the
host up, in a worker thread for pyroute2's synchronous calls, and restore it whatever
happens) until a stop signal or ``down``; ``cleanup_*`` remove what a killed one left.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from . import api
from .config import AgentConfig, AnchorConfig
from .control import ensure_free, remove_stale
from .service import notify, say
from .system import netlink
from .system.agent_host import AgentHost, IfacePlan
from .system.agent_host import is_paused as agent_paused
from .system.anchor_host import AnchorHost, is_paused
from .system.cgroups import RuleCgroups
from .system.errors import StartupError

__all__ = ["cleanup_agent", "cleanup_anchor", "new_loop", "run_agent", "run_anchor",
           "StartupError"]

log = logging.getLogger(__name__)
READY_TIMEOUT = api.READY_TIMEOUT


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


# SIGUSR2 stops too, *for a restart*: systemd sends it on `systemctl restart`
# (RestartKillSignal= in the units); the anchor then keeps its NAT, the agent holds its
# steered connections (pause_on_teardown of AnchorHost and AgentHost)
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


async def _serve(opening: contextlib.AbstractAsyncContextManager[Any], signals: StopSignals,
                 what: str) -> None:
    """Run an embedded agent or anchor (``api.py``) as a daemon: ``ready`` once it is, then
    until a signal or ``down``. A stop signal cancels it wherever it is (the API finishes
    the host change under way, then undoes everything); a stop while waiting for the
    tunnels is not held up by them. SIGHUP without a terminal reloads (see
    :class:`StopSignals`); :data:`RESTART_SIGNAL` stops it for a restart (an anchor's NAT
    stays, an agent's steered connections are held: ``stop_for_restart``)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals.attach(loop, stop)
    running: list[Any] = []

    async def body() -> None:
        async with opening as daemon:
            running.append(daemon)
            signals.on_hup = _on_hup(loop, daemon.reload)
            if signals.hup_pending:
                signals.on_hup()
            if not await daemon.ready(READY_TIMEOUT):
                log.warning("not every tunnel answered within %.0f s; going on", READY_TIMEOUT)
            _ready_line()
            await daemon.stop_requested()
            signals.on_hup = None        # no reload may start while the daemon stops
            notify("STOPPING=1")

    task = asyncio.ensure_future(body())
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            signals.on_hup = None
            if signals.signum == RESTART_SIGNAL and running:
                running[0].stop_for_restart()
            notify("STOPPING=1")
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        stopped.cancel()
        signals.detach(loop)
        log.debug("%s stopped", what)


def _ready_line() -> None:
    """``ready`` on stdout (the terminal, a pipe) and READY=1 to systemd, at the same time."""
    say("ready")
    notify("READY=1")


def _daemon(opening: Callable[[], contextlib.AbstractAsyncContextManager[Any]],
            control_path: str, what: str) -> None:
    signals = StopSignals()
    signals.hup_reloads = not controlling_terminal()
    signals.install()
    try:
        ensure_free(control_path)
        keep_heap()
        if signals.signum is not None:
            return                       # stopped before anything was changed
        loop = new_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(_serve(opening(), signals, what))
        finally:
            loop.close()
    finally:
        signals.restore()


def run_agent(cfg: AgentConfig, control_path: str) -> None:
    """``upmt-agent up``: returns when stopped (also by SIGHUP/SIGTERM/SIGINT, with the host
    restored); raises StartupError/SystemSetupError. The agent itself is ``api.Agent``."""
    _daemon(lambda: api.Agent.open(cfg, control=control_path), control_path, "agent")


def run_anchor(cfg: AnchorConfig, control_path: str) -> None:
    """``upmt-anchor``: returns when stopped (also by SIGHUP/SIGTERM/SIGINT, with the host
    restored). The anchor itself is ``api.Anchor``."""
    _daemon(lambda: api.Anchor.open(cfg, control=control_path), control_path, "anchor")


def cleanup_agent(cfg: AgentConfig, control_path: str, keep_paused: bool = False) -> None:
    """``upmt-agent cleanup``: remove what a killed agent with this config and control
    socket left: its nft table, ip rules, routes of its tables, sysctls (from its state
    file), cgroups, TUN device and control socket. Refuses (ControlError) while an agent
    answers on the socket; does nothing, quietly, when nothing is left (ExecStopPost runs
    it after every stop). What an agent stopped for a restart left to hold its steered
    connections (the paused table, the steered mark's ip rules, table T's blackholes)
    goes too, unless ``keep_paused`` (``--keep-paused``: ExecStopPost, which runs on a
    restart too; the next start takes it over)."""
    if remove_stale(control_path, "agent"):
        log.info("removed stale control socket %s", control_path)
    count = len(cfg.interfaces)
    if not count:           # discovered interfaces: as many tables as there are now
        with contextlib.suppress(Exception):
            count = len(netlink.default_route_interfaces())
    plans = [IfacePlan(i, f"iface{i}", None, 0) for i in range(count)]
    AgentHost(tun=cfg.tun, vipa_fix=cfg.vipa_fix, fwmark=cfg.fwmark, table=cfg.table,
              ifaces=plans, rules=[], state_file=control_path + ".state",
              mark_mask=cfg.mark_mask, priority=cfg.rule_priority).cleanup_leftovers(
        keep_steering=keep_paused and _agent_paused())
    if netlink.delete_tun(cfg.tun):
        log.info("removed leftover TUN device %s", cfg.tun)
    if not keep_paused:        # the moves a run stopped for a restart saved
        with contextlib.suppress(FileNotFoundError):
            os.unlink(control_path + ".choices")
            log.info("removed the moves saved by an agent stopped for a restart")
    if removed := RuleCgroups(control_path, []).remove_leftovers():
        log.info("removed %d leftover cgroup(s)", removed)


def _agent_paused() -> bool:
    paused = agent_paused()
    if paused:
        log.info("leaving the hold an agent stopped for a restart left on its connections")
    return paused


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
