"""The embeddable API: an agent or an anchor inside the caller's running asyncio loop.

::

    async with upmt_tun.Agent.open("/etc/upmt/agent.toml") as agent:
        await agent.ready()
        async for ev in agent.events():
            if isinstance(ev, upmt_tun.PathQuality) and (ev.rtt_ms or 0) > 150:
                await agent.move(rule="video", via="wwan0")

``open()`` sets the host up exactly as ``upmt-agent up`` does (TUN, nftables, routing
rules and tables, cgroups, sysctls), starts the control socket (so ``upmt-agent status``
and ``events`` work against an embedded agent) and the metrics endpoint if configured,
and on the way out (normal end, exception or cancellation) stops everything and restores
the host. The blocking host changes (pyroute2's synchronous netlink, ``nft``, name
lookups) run in a worker thread while the caller's loop goes on: pyroute2's synchronous
API refuses a running loop (TRAPS.md). A cancellation that lands during one of them
waits for that step to end (never half a host change), then everything made so far is
undone and the cancellation goes on. The CLI (``upmt-agent up``, ``upmt-anchor``) is a
user of this module; signals, the ``ready`` line and sd_notify stay there.

Rules, interfaces, anchors and peers change at run time with :meth:`Agent.reload` /
:meth:`Anchor.reload` (a changed config file, as ``upmt-agent reload``); an agent's
rules one at a time with :meth:`Agent.add_rule` / :meth:`Agent.remove_rule` (in memory:
a later file reload applies the file as it is).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

from . import agent as _agent
from . import anchor as _anchor
from .config import (
    MIN_IPV6_MTU,
    AgentConfig,
    AnchorConfig,
    Rule,
    format_host_port,
    load_agent_config,
    load_anchor_config,
    make_rule,
    rule_fields,
)
from .control import ControlServer, ensure_free
from .dataplane.forwarder import parse_choices
from .dataplane.io import PathSocket, TunDevice, open_udp
from .dataplane.packet import OVERHEAD, OVERHEAD6
from .events import (
    AnchorAssociated,
    AnchorLost,
    EventBus,
    FlowClosed,
    FlowMoved,
    FlowNew,
    HostAssociated,
    HostLost,
    PathQuality,
    PeerPath,
    Subscription,
    TunnelDown,
    TunnelUp,
    move_reason,
)
from .hotplug_driver import Hotplug, entries
from .leases import Leases, lease_file
from .link import Action, Associated
from .link import TunnelDown as LinkTunnelDown
from .link import TunnelUp as LinkTunnelUp
from .mesh import RELAY_OVERHEAD
from .metrics import MetricsServer, render_agent, render_anchor
from .reload import start_slots
from .reload_driver import AgentReloader, AnchorReloader, SlotFile, rule_matches
from .resolve import AnchorResolver, ResolveSchedule, first_lookups
from .statefile import StateFile
from .system import netlink
from .system.agent_host import AgentHost, IfacePlan
from .system.anchor_host import AnchorHost
from .system.cgroups import RuleCgroups
from .system.errors import StartupError, SystemSetupError
from .system.ifstate import InterfaceState
from .system.linkwatch import LinkWatch
from .tables import Flow, FlowKey, Tunnel, ip_str

__all__ = ["Agent", "Anchor", "FlowChoice", "PathOption", "Policy", "ReturnChoice",
           "READY_TIMEOUT"]

log = logging.getLogger(__name__)
READY_TIMEOUT = 10.0
QUALITY_EVERY = 1.0        # the agent's path-quality look (events), seconds
QUALITY_AT_LEAST = 5.0     # ... and an update at least this often per up tunnel
ANCHOR_LOOK_EVERY = 0.25   # the anchor's look at its associations and tunnels (events)

T = TypeVar("T")
Reload = Callable[[str | None], Awaitable[dict[str, Any]]]
ConfigArg = AgentConfig | AnchorConfig | str | os.PathLike[str]


def _choices_file(control_path: str) -> StateFile:
    """Where an agent stopped for a restart leaves the operator's moves for the next start
    (AgentForwarder.choices)."""
    return StateFile(control_path + ".choices", "the moved rules and flows")


def _offload(kind: str) -> bool:
    """UPMT_NO_OFFLOAD=tun,udp (or =1 for both) turns kernel offloads off, to compare."""
    off = os.environ.get("UPMT_NO_OFFLOAD", "")
    return not (off == "1" or kind in off.split(","))


async def _step(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking host change in a worker thread and wait for it to end, even when
    cancelled meanwhile (the cancellation is raised afterwards): a host change is never
    left half made, and what it made is known to the teardown."""
    fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(fut)
            break
        except asyncio.CancelledError:
            if fut.done():
                if fut.cancelled():
                    raise
                result = fut.result()
                cancelled = True
                break
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


async def _undo(fn: Callable[[], None]) -> None:
    """A teardown step: in a worker thread, waited for whatever happens; errors logged."""
    try:
        await _step(fn)
    except asyncio.CancelledError:
        raise
    except Exception as e:   # one failing undo step must not stop the others
        log.error("teardown: %s", e)


def _wall() -> float:
    return time.time()


# -- policy hook ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PathOption:
    """One usable way for a flow: a tunnel up through ``interface`` to ``anchor``, with its
    probe RTT (ms) and loss share (None until measured)."""

    interface: str
    anchor: str
    tunnel: int
    rtt_ms: float | None
    loss: float | None


@dataclass(frozen=True, slots=True)
class FlowChoice:
    """The inputs of the per-flow tunnel choice (``policy.choose_tunnel``): the flow's
    ``rule`` ("" for none), its interface preference ``via`` and anchors in order, its
    destination, the usable ``paths`` (in the built-in preference order) and ``builtin``,
    what the agent would choose (None: nothing usable)."""

    rule: str
    via: tuple[str, ...]
    anchors: tuple[str, ...]
    dst: str
    paths: tuple[PathOption, ...]
    builtin: PathOption | None


@dataclass(frozen=True, slots=True)
class ReturnChoice:
    """The inputs of the return-after-recovery decision (``paths.should_return``): move a
    flow of ``rule`` from ``current`` (None: its tunnel is down) back to ``candidate``,
    whose tunnel has been up ``candidate_up_for`` seconds? ``builtin``: the agent's answer
    (earlier in ``via`` and up at least ``return_after``)."""

    rule: str
    via: tuple[str, ...]
    current: str | None
    candidate: str
    candidate_up_for: float
    return_after: float
    builtin: bool


class Policy:
    """The application's own handover decisions. Subclass and override either method;
    each gets the same inputs as the built-in decision and ``now`` (the agent's monotonic
    clock, seconds). The defaults return the built-in answers.

    An exception (or an answer that is not one of ``choice.paths``/None, or not a bool)
    is counted (``status()["policy"]``), logged once, and the built-in answer is used:
    a broken hook never breaks the data path. Hooks run in the event loop for every new
    flow and whenever a tunnel comes up or goes down: keep them quick, never block."""

    def choose(self, choice: FlowChoice, now: float) -> PathOption | None:
        """Which path a flow takes (new flows, and flows whose tunnel went down or came
        back). None: no tunnel for now (its packets are dropped, counted)."""
        return choice.builtin

    def should_return(self, choice: ReturnChoice, now: float) -> bool:
        """Move a flow back to a better-preferred interface now?"""
        return choice.builtin


class _PolicyHooks:
    """Adapts a :class:`Policy` to the forwarder's hooks (internal types in, checked
    answers out); counts and logs (once) what the application got wrong."""

    def __init__(self, policy: Policy, core: _agent.Agent) -> None:
        self.policy = policy
        self.core = core
        self.errors = 0
        self.calls = 0
        self._logged = False

    def _fail(self, what: str, e: BaseException | str) -> None:
        self.errors += 1
        if not self._logged:
            self._logged = True
            log.error("policy hook %s failed (%s); using the built-in choice (logged "
                      "once, counted in status policy.errors)", what,
                      e if isinstance(e, str) else f"{type(e).__name__}: {e}")

    def _option(self, t: Tunnel) -> PathOption:
        link = self.core._by_tid.get(t.tid)
        m = link.monitor if link is not None else None
        rtt = None if m is None or m.srtt is None else round(m.srtt * 1000.0, 3)
        return PathOption(t.interface, t.peer, t.tid, rtt, None if m is None else m.loss())

    def choose(self, rule: str, via: tuple[str, ...], anchors: tuple[str, ...], dst: bytes,
               builtin: Tunnel | None, now: float) -> Tunnel | None:
        fwd = self.core.fwd
        tunnels = [t for a in anchors for i in via if (t := fwd.usable(i, a)) is not None]
        options = tuple(self._option(t) for t in tunnels)
        base = next((o for o in options if builtin is not None and o.tunnel == builtin.tid),
                    None)
        self.calls += 1
        try:
            pick = self.policy.choose(FlowChoice(rule, via, anchors, ip_str(dst), options,
                                                 base), now)
        except Exception as e:
            self._fail("choose", e)
            return builtin
        if pick is None:
            return None
        for o, t in zip(options, tunnels, strict=True):
            if o == pick or (isinstance(pick, PathOption) and pick.tunnel == o.tunnel):
                return t
        self._fail("choose", f"answered {pick!r}, not one of choice.paths")
        return builtin

    def should_return(self, rule: str, via: tuple[str, ...], current: str | None,
                      candidate: str, up_for: float, return_after: float, builtin: bool,
                      now: float) -> bool:
        self.calls += 1
        try:
            answer = self.policy.should_return(
                ReturnChoice(rule, via, current, candidate, up_for, return_after, builtin), now)
        except Exception as e:
            self._fail("should_return", e)
            return builtin
        if not isinstance(answer, bool):
            self._fail("should_return", f"answered {answer!r}, not a bool")
            return builtin
        return answer


# -- the agent --------------------------------------------------------------------------------
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


def _ipv6_enabled(ifname: str) -> bool:
    """Whether interface ``ifname`` can hold IPv6 addresses (the kernel has IPv6 and
    ``disable_ipv6`` is off for it)."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6") as f:
            return f.read().strip() == "0"
    except OSError:
        return False


class _Closing:
    """close() closes a socket a reload opened (again: closing twice is harmless)."""

    def __init__(self, path: PathSocket) -> None:
        self.path = path

    def close(self) -> None:
        self.path.close()


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


class _Closeable(Protocol):
    def close(self) -> None: ...


def _close_all(opened: Sequence[_Closeable]) -> None:
    for o in opened:
        with contextlib.suppress(Exception):
            o.close()


class _Daemon:
    """What an embedded agent and anchor share: the stop request, the control socket's
    common commands, the event bus."""

    kind = "daemon"

    def __init__(self, control_path: str, reload: Reload | None = None) -> None:
        self.control_path = control_path
        self._reload = reload
        self._bus = EventBus(_wall)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def status(self) -> dict[str, Any]:
        raise NotImplementedError

    def events(self, maxsize: int = 1024) -> Subscription:
        """A new subscription: ``async for ev in agent.events():`` yields every event
        from now on until the agent stops. Each subscription has its own queue of
        ``maxsize`` events; a subscriber that falls behind loses events and gets one
        :class:`~upmt_tun.events.Dropped` (with the count) in their place, and never slows
        the agent down. Break out of the loop (or drop the object) to unsubscribe."""
        return self._bus.subscribe(maxsize)

    def request_stop(self) -> None:
        """Ask the owner to stop (what ``upmt-agent down`` does): :meth:`stop_requested`
        returns. The host is restored when the ``async with`` block ends."""
        self._stop.set()

    async def stop_requested(self) -> None:
        """Wait for :meth:`request_stop` or a ``down`` command on the control socket."""
        await self._stop.wait()

    async def reload(self, path: str | None = None) -> dict[str, Any]:
        """Apply a changed config file (``path``, default: the one it was opened with), as
        ``upmt-agent reload`` does: ``{"ok": True, "changes": [...], "restart": [...]}``,
        or ``{"ok": False, "error": ...}`` with nothing changed when the file does not
        load, does not validate or nftables refuses it. For an agent: rules added,
        removed or edited (by name; existing flows keep theirs), anchors added or
        removed; for an anchor: peers, ``mesh``, egress lists, limits. The keys named in
        ``restart`` keep their running value until a restart."""
        if self._reload is None:
            return {"ok": False, "error": "reload needs a config file (open() with a path)"}
        return await self._reload(path)

    async def _extra(self, req: dict[str, Any]) -> dict[str, Any] | None:
        return None

    async def _handle(self, req: dict[str, Any]) -> dict[str, Any]:
        """The control socket's commands (``control.ControlServer`` checks who may)."""
        cmd = req.get("cmd")
        if cmd == "status":
            # the task count lets a soak (benchmarks/chaos.py) see tasks that pile up
            return {"ok": True, "status": {**self.status(), "tasks": len(asyncio.all_tasks())}}
        if cmd == "down":
            asyncio.get_running_loop().call_soon(self._stop.set)
            return {"ok": True}
        if cmd == "reload":
            path = req.get("config")
            return await self.reload(path if isinstance(path, str) and path else None)
        answer = await self._extra(req)
        if answer is not None:
            return answer
        return {"ok": False, "error": f"unknown command {str(cmd)[:40]!r}"}

    def _spawn(self, coro: Awaitable[None]) -> None:
        self._tasks.append(asyncio.ensure_future(coro))

    async def _stop_tasks(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()


async def _serve_control(d: _Daemon, group: int | None,
                         metrics: tuple[str, int] | None,
                         render: Callable[[dict[str, Any]], str],
                         cleanup: list[Callable[[], Awaitable[None]]]) -> None:
    """Control socket (with the ``events`` stream) and the metrics endpoint."""
    control = ControlServer(d.control_path, d._handle, group, stream=d._bus.subscribe)
    await control.start()
    cleanup.append(control.close)
    if metrics is not None:
        server = MetricsServer(metrics[0], metrics[1], lambda: render(d.status()))
        try:
            await server.start()
        except OSError as e:
            raise StartupError(f"metrics: cannot listen on {metrics[0]}:{metrics[1]}: "
                               f"{e.strerror or e}") from None
        cleanup.append(server.close)


class Agent(_Daemon):
    """A running agent (mobile host) inside the caller's event loop: from
    :meth:`Agent.open` only."""

    kind = "agent"

    def __init__(self, core: _agent.Agent, cfg: AgentConfig, control_path: str,
                 cgroups: RuleCgroups, policy: Policy | None,
                 reload: Reload | None = None) -> None:
        super().__init__(control_path, reload)
        self._core = core
        self.config = cfg
        self._cgroups = cgroups
        self._hooks = _PolicyHooks(policy, core) if policy is not None else None
        if self._hooks is not None:
            core.fwd.choice_hook = self._hooks.choose
            core.fwd.return_hook = self._hooks.should_return
        self._lost: set[str] = set()              # anchors reported lost, not yet back
        self._assoc: dict[str, str] = {}          # anchor -> VIpA reported
        self._quality: dict[int, tuple[float, float | None, float | None]] = {}
        self._peer_paths: dict[str, tuple[str, str | None]] = {}
        self._reloader: AgentReloader | None = None       # set by open(): rule edits
        self._host: AgentHost | None = None                # set by open()
        core.observe = self._on_action
        core.fwd.paft.watchers.append(self._on_flow)

    @classmethod
    def open(cls, config: ConfigArg, *, control: str | None = None,
             policy: Policy | None = None) -> contextlib.AbstractAsyncContextManager[Agent]:
        """``async with Agent.open(config) as agent:`` runs an agent in the running loop.

        ``config``: an :class:`~upmt_tun.config.AgentConfig` or the path of a TOML file
        (``ConfigError`` names file, key and problem). ``control``: the control socket
        (default: the config's ``control``); its path also names the state file and the
        cgroups, so two agents need two. ``policy``: the application's handover choices
        (:class:`Policy`); default: the built-in ones.

        Raises ``StartupError``/``SystemSetupError`` (one line) when the host cannot be
        set up, with everything made so far undone. Needs root (CAP_NET_ADMIN)."""
        if isinstance(config, AnchorConfig):
            raise TypeError("Agent.open needs an agent config (an AnchorConfig was given)")
        cfg = config if isinstance(config, AgentConfig) else load_agent_config(os.fspath(config))
        return _open_agent(cls, cfg, control or cfg.control, policy)

    # -- what an application calls -------------------------------------------------------
    async def ready(self, timeout: float | None = READY_TIMEOUT) -> bool:
        """Wait until every (interface, anchor) tunnel is up or failed its first attempt
        (what ``upmt-agent up`` waits for before ``ready``): True; False when ``timeout``
        seconds passed first (the agent keeps trying either way)."""
        try:
            await asyncio.wait_for(self._core.wait_ready(), timeout)
        except TimeoutError:
            return False
        return True

    def stop_for_restart(self) -> None:
        """The coming stop is for a restart (an upgrade): the connections the agent steers
        are held, their packets dropped instead of routed around the tunnels (where the
        correspondent would answer with a reset), until the next start takes them over
        (what SIGUSR2 does for the daemon; ``upmt-agent cleanup`` removes the hold if no
        start comes)."""
        if self._host is not None:
            self._host.pause_on_teardown = True
        _choices_file(self.control_path).save(self._core.fwd.choices())

    def status(self) -> dict[str, Any]:
        """The same dict as ``upmt-agent status --json`` (SPEC.md): anchors, tunnels,
        flows (with their last moves), peers, counters; ``policy`` when a hook is set."""
        st = self._core.status()
        if self._hooks is not None:
            st["policy"] = {"calls": self._hooks.calls, "errors": self._hooks.errors}
        return st

    async def move(self, *, via: str, rule: str | None = None, flow: int | None = None,
                   anchor: str | None = None) -> int:
        """Move every flow of ``rule`` (and its new ones) or one ``flow`` (an id from
        :meth:`status` or a :class:`~upmt_tun.events.FlowNew`) to interface ``via``, as
        ``upmt-agent move`` does; returns how many flows moved now. ``UsageError`` for a
        name that does not exist, ``MoveError`` when ``via`` has no usable tunnel for
        that flow. Failover stays on (SPEC.md)."""
        if (rule is None) == (flow is None):
            raise _agent.UsageError("move: give exactly one of rule= or flow=")
        return self._core.move(via=via, rule=rule, flow=flow, anchor=anchor)

    def rules(self) -> list[str]:
        """The rules' names, in match order, as running now (:meth:`reload`,
        :meth:`add_rule` and :meth:`remove_rule` change them)."""
        return [r.name for r in self._core.cfg.rules]

    async def add_rule(self, rule: Rule | None = None, *, before: str | None = None,
                       name: str | None = None, **fields: Any) -> list[str]:
        """Add a rule now: a :class:`~upmt_tun.Rule` (its ``index`` is ignored) or its
        fields as keywords (``name=``, ``protocol=``, ``dst=``, ``dst_port=`` a number,
        ``"LOW-HIGH"`` or a pair, ``src_port=``, ``uid=``, ``cgroup=``, ``via=``,
        ``anchor=``), checked as a ``[[rule]]`` of the file is. It goes last, or right
        before rule ``before`` (first match wins), steers new connections at once and
        gets a mark slot never used in this run, as a rule a reload adds. Returns what
        changed (``["rule NAME added"]``).

        ``ConfigError`` for a bad field, ``UsageError`` for a name that exists or a
        ``before`` that does not, ``SystemSetupError`` (one line) when the agent or
        nftables refuses it; nothing changes then. The change is in memory: a later
        :meth:`reload` (or ``upmt-agent reload``, SIGHUP) applies the file as it is,
        which removes a rule added here unless the file has it too."""
        if rule is not None:
            if name is not None or fields:
                raise _agent.UsageError("add_rule: give a Rule or its fields, not both")
            name, fields = rule.name, rule_fields(rule)
        if name is None:
            raise _agent.UsageError("add_rule: a rule needs a name")
        new = make_rule(self._core.cfg, name, source="add_rule", **fields)

        def edit(rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
            if any(r.name == new.name for r in rules):
                raise _agent.UsageError(f"rule {new.name!r} exists (remove_rule it first)")
            if before is None:
                return (*rules, new)
            at = next((i for i, r in enumerate(rules) if r.name == before), None)
            if at is None:
                raise _agent.UsageError(f"no rule {before!r} to add {new.name!r} before")
            return (*rules[:at], new, *rules[at:])

        return await self._edit_rules(edit, f"add_rule {new.name}")

    async def remove_rule(self, name: str) -> list[str]:
        """Remove rule ``name`` now: it steers no new connection; its existing flows keep
        their tunnel and mark until they end (as with a reload), and its slot is never
        handed to another rule in this run. Returns what changed; ``UsageError`` for an
        unknown name. In memory, as :meth:`add_rule`: a later :meth:`reload` applies the
        file as it is."""
        def edit(rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
            if all(r.name != name for r in rules):
                raise _agent.UsageError(f"no rule {name!r}")
            return tuple(r for r in rules if r.name != name)

        return await self._edit_rules(edit, f"remove_rule {name}")

    async def _edit_rules(self, edit: Callable[[tuple[Rule, ...]], tuple[Rule, ...]],
                          source: str) -> list[str]:
        if self._reloader is None:
            raise _agent.UsageError("this agent cannot change its rules")
        answer = await self._reloader.edit_rules(edit, source)
        if not answer["ok"]:
            raise SystemSetupError(str(answer["error"]))
        return list(answer["changes"])

    def cgroup(self, rule: str) -> str | None:
        """The cgroup (v2) directory whose processes' traffic belongs to ``rule``, or None
        without cgroup v2 (``UsageError`` for an unknown rule). What ``upmt-agent run``
        joins."""
        if rule not in self.rules():
            raise _agent.UsageError(f"no rule {rule!r}")
        return str(self._cgroups.path(rule)) if self._cgroups.made else None

    async def spawn(self, rule: str, argv: Sequence[str],
                    **kwargs: Any) -> asyncio.subprocess.Process:
        """Start ``argv`` with every socket it (and its children) opens belonging to
        ``rule``, whatever its ports (``upmt-agent run --rule``): it joins the rule's
        cgroup before ``exec``. ``kwargs`` go to ``asyncio.create_subprocess_exec``
        (``stdout=``, ``env=``, ...). It runs as this process's user."""
        path = self.cgroup(rule)
        if path is None:
            raise _agent.MoveError("per-program steering needs cgroup v2")
        if not argv:
            raise _agent.UsageError("spawn: give a program")
        # the shell writes its own pid, then becomes the program: no fork-time hooks
        script = 'echo $$ > "$0/cgroup.procs" && exec "$@"'
        return await asyncio.create_subprocess_exec("/bin/sh", "-c", script, path, *argv,
                                                    **kwargs)

    # -- events --------------------------------------------------------------------------
    def _on_action(self, a: Action, now: float) -> None:
        bus = self._bus
        if isinstance(a, Associated):
            # every link of the anchor reports the association it shares: tell it once
            if a.peer in self._lost or self._assoc.get(a.peer) != a.vipa:
                self._lost.discard(a.peer)
                self._assoc[a.peer] = a.vipa
                if bus.active:
                    bus.publish(AnchorAssociated(_wall(), a.peer, a.vipa))
        elif isinstance(a, LinkTunnelUp):
            t = a.tunnel
            if bus.active and (self._core.mesh_links or not t.tid):
                asyncio.get_running_loop().call_soon(self._look_peers)   # once carried out
            if t.tid and bus.active:
                bus.publish(TunnelUp(_wall(), t.tid, t.interface, t.peer,
                                     f"{t.remote[0]}:{t.remote[1]}"))
        elif isinstance(a, LinkTunnelDown):
            t = a.tunnel
            self._quality.pop(t.tid, None)
            if bus.active and (self._core.mesh_links or not t.tid):
                asyncio.get_running_loop().call_soon(self._look_peers)
            if t.tid and bus.active:
                bus.publish(TunnelDown(_wall(), t.tid, t.interface, t.peer, a.reason))
            p = self._core.peers.get(t.peer)
            if p is not None and p.lost and t.peer not in self._lost:
                self._lost.add(t.peer)
                if bus.active:
                    bus.publish(AnchorLost(_wall(), t.peer, a.reason))

    def _iface(self, tid: int | None) -> str | None:
        t = self._core.fwd.tunnels.get(tid) if tid is not None else None
        return t.interface if t is not None else None

    def _on_flow(self, what: str, f: Flow, before: int | None, reason: str) -> None:
        bus = self._bus
        if not bus.active:
            return
        if what == "moved":
            bus.publish(FlowMoved(_wall(), f.fid, before, f.tunnel, self._iface(before),
                                  self._iface(f.tunnel), move_reason(reason), reason))
        elif what == "closed":
            bus.publish(FlowClosed(_wall(), f.fid, reason))
        else:      # new: its rule and source are filled in right after the insert
            asyncio.get_running_loop().call_soon(self._flow_new, f)

    def _flow_new(self, f: Flow) -> None:
        k: FlowKey = f.key
        self._bus.publish(FlowNew(_wall(), f.fid, k[0], f.app_src or ip_str(k[1]), k[3],
                                  ip_str(k[2]), k[4], f.rule, f.tunnel, self._iface(f.tunnel)))

    def _look(self, now: float) -> None:
        """Once a second while someone listens: path quality (on change, at least every
        QUALITY_AT_LEAST s) and mesh peers' paths (on change)."""
        bus = self._bus
        for link in list(self._core.links.values()):
            t, m = link.tunnel, link.monitor
            if t.state != "up" or m is None or not t.tid:
                continue
            rtt = None if m.srtt is None else round(m.srtt * 1000.0, 3)
            loss = m.loss()
            loss = None if loss is None else round(loss, 3)
            last = self._quality.get(t.tid)
            if last is not None and now - last[0] < QUALITY_AT_LEAST:
                _at, lrtt, lloss = last
                same_rtt = (rtt is None) == (lrtt is None) and (
                    rtt is None or lrtt is None
                    or abs(rtt - lrtt) <= max(1.0, 0.1 * lrtt))
                same_loss = (loss is None) == (lloss is None) and (
                    loss is None or lloss is None or abs(loss - lloss) < 0.05)
                if same_rtt and same_loss:
                    continue
            self._quality[t.tid] = (now, rtt, loss)
            bus.publish(PathQuality(_wall(), t.tid, t.interface, t.peer, rtt, loss))
        self._look_peers()

    def _look_peers(self) -> None:
        """Mesh peers' paths against the last look (also right after any tunnel went up
        or down: a direct path can be found within a second of the relay)."""
        bus = self._bus
        if not bus.active:
            return
        seen = set()
        for p in self._core.peers_json():
            key = f"{p['name']}@{p['anchor']}"
            seen.add(key)
            path = p["path"] if p["interface"] is not None else "none"
            if self._peer_paths.get(key) != (path, p["interface"]):
                self._peer_paths[key] = (path, p["interface"])
                bus.publish(PeerPath(_wall(), p["name"], p["anchor"], p["vipa"], path,
                                     p["interface"]))
        for key in set(self._peer_paths) - seen:
            del self._peer_paths[key]

    async def _looker(self) -> None:
        while True:
            await asyncio.sleep(QUALITY_EVERY)
            if self._bus.active:
                self._look(self._core.clock())

    async def _extra(self, req: dict[str, Any]) -> dict[str, Any] | None:
        return await self._core.control(req)


@contextlib.asynccontextmanager
async def _open_agent(cls: type[Agent], cfg: AgentConfig, control_path: str,
                      policy: Policy | None) -> AsyncIterator[Agent]:
    loop = asyncio.get_running_loop()
    ensure_free(control_path)
    ifaces, dev_slots = await _step(entries, cfg, _interfaces)
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
    schedule = await _step(_first_resolution, cfg, time.monotonic())
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
    opened: list[Any] = []
    host: AgentHost | None = None
    cleanup: list[Callable[[], Awaitable[None]]] = []
    api: Agent | None = None
    try:
        seams = []
        devices = {i.name: (dev_slots.device(i.name) if dev_slots else i.name) for i, _ in ifaces}
        paths: dict[str, PathSocket] = {}

        def new_path(device: str | None, mark: int, v6: bool, local: str) -> PathSocket:
            """An interface's tunnel socket: marked, bound to ``device`` (None: unbound
            until Hotplug binds it), dual-stack when the interface has IPv6 (IPv4 peers
            through it as ::ffff:a.b.c.d, routed by the IPv4 rule and table)."""
            sock = open_udp("::" if v6 else "0.0.0.0", 0, device=device, mark=mark)
            return PathSocket(sock, loop, (local, sock.getsockname()[1]),
                              offload=_offload('udp'))

        for idx, (info, _gw) in enumerate(ifaces):
            # an entry without a device yet: unbound until one comes (Hotplug); its link
            # is down and sends nothing, and its table has no route
            path = new_path(devices[info.name], cfg.fwmark + 1 + idx, bool(info.address6),
                            info.address or info.address6 or "0.0.0.0")
            opened.append(path)
            paths[info.name] = path
            seams.append(_agent.IfaceSeam(info.name, idx, path, info.families or frozenset({4})))
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
        made = host
        # what a killed run (or one stopped for a restart) left to steer its connections
        # stays until setup replaces it: they never leave by normal routing meanwhile
        await _step(lambda: made.cleanup_leftovers(keep_steering=True))
        tun = _open_tun(cfg.tun, loop, opened)
        if cfg.vipa6_fix and not _ipv6_enabled(tun.name):
            log.info("IPv6 inside the tunnels off: IPv6 is disabled on %s "
                     "(net.ipv6.conf.*.disable_ipv6)", tun.name)
            cfg = replace(cfg, vipa6_fix="")
            made.vipa6_fix = ""
        await _step(netlink.configure_tun, tun.name, cfg.vipa_fix, 32, mtu, cfg.vipa6_fix)
        await _step(made.setup)
        from .system.conntrack import Conntrack

        ct = Conntrack()
        opened.append(ct)

        def lookup(key: FlowKey) -> tuple[int, str] | None:
            return ct.lookup_reply(key[0], ip_str(key[2]), ip_str(key[1]), key[4], key[3])

        mesh_mtu = mtu - RELAY_OVERHEAD

        def mesh_route(pool: str) -> None:
            async def add() -> None:
                try:
                    await asyncio.to_thread(made.add_mesh_pool, pool, mesh_mtu)
                except SystemSetupError as e:
                    log.error("mesh pool %s: %s", pool, e)
            loop.create_task(add())

        core = _agent.Agent(cfg, tun=tun, ifaces=seams, anchors=anchors,
                            classify_flow=_agent.rule_classifier(cfg.rules, lookup, cfg.fwmark,
                                                                 slots[0]),
                            cgroup_of=lambda rule: str(cgroups.path(rule)) if cgroups.made
                            else None,
                            mesh_route=mesh_route)
        core.fwd.mesh_mtu = mesh_mtu
        # the operator's moves, saved by a run stopped for a restart (stop_for_restart)
        saved_choices = _choices_file(control_path).take(parse_choices)
        if saved_choices is not None:
            names = {r.name for r in cfg.rules}
            core.fwd.resume({r: c for r, c in saved_choices[0].items() if r in names},
                            saved_choices[1], core.clock())
        core.devices.update(devices)
        core.fwd.mtu = mtu                 # IPv6 longer than this: Packet Too Big
        for name in waiting:            # before start: its links start LINK_DOWN (tried)
            core.on_link(name, False, "no address yet")
        resolver = AnchorResolver(schedule, core.set_anchor_address, clock=time.monotonic)

        def on_usable(name: str, usable: bool, why: str) -> None:
            core.on_link(name, usable, why)
            if usable:
                resolver.kick()        # a name that failed may resolve now

        def on_changed(name: str) -> None:
            core.path_changed(name)
            resolver.kick()
        configured = {ic.name: ic.gateway for ic in cfg.interfaces}

        def read_iface(name: str) -> tuple[str | None, str | None]:
            device = dev_slots.device(name) if dev_slots is not None else name
            if device is None:
                raise SystemSetupError("no such device")
            info = netlink.interface_info(device)   # IPv6-only: usable with its IPv6 one
            return info.address or info.address6, info.gateway

        async def set_route(name: str, gateway: str | None) -> None:
            await asyncio.to_thread(made.restore_iface_route, name, gateway)

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
                          {p.name: cfg.fwmark + 1 + p.index for p in plans}, made, state, core)
            opened.append(hot)
        opened.append(LinkWatch(loop, state.on_event, hot.on_name if hot else None))

        def open_path(mark: int, v6: bool, local: str) -> PathSocket:
            """A reload's new interface: its socket as at start (bound to a device by
            Hotplug); closed with the others at the end unless the reload removes it."""
            path = new_path(None, mark, v6, local)
            opened.append(_Closing(path))
            return path

        reloader = AgentReloader(cfg, agent=core, host=made,
                                 cgroups=cgroups if usable else None, schedule=schedule,
                                 resolver=resolver, lookup=lookup, slots=slots,
                                 slot_file=slot_file, v6_off=cfg.vipa6_fix != file_vipa6,
                                 hotplug=hot, open_path=open_path)
        api = cls(core, cfg, control_path, cgroups, policy, reloader.reload)
        api._reloader = reloader
        api._host = made
        await _serve_control(api, cfg.group, cfg.metrics, render_agent, cleanup)
        await core.start()
        cleanup.append(core.stop)
        resolver.start()
        cleanup.append(resolver.close)
        api._spawn(api._looker())
        log.info("vipa_fix %s on %s (mtu %d), %d interface(s), %d anchor(s)",
                 cfg.vipa_fix, tun.name, mtu, len(seams), len(anchors))
        yield api
    finally:
        await _shutdown(api, cleanup, opened, host)


async def _shutdown(api: _Daemon | None, cleanup: list[Callable[[], Awaitable[None]]],
                    opened: list[Any], host: AgentHost | AnchorHost | None) -> None:
    """Stop what runs (newest first), close sockets and TUN, undo the host changes: whatever
    happened, also when cancelled meanwhile (the cancellation is raised at the end)."""
    cancelled = False
    if api is not None:
        api._bus.close()
        api._stop.set()

    async def guarded(aw: Awaitable[None]) -> None:
        nonlocal cancelled
        fut = asyncio.ensure_future(aw)
        while not fut.done():
            try:
                await asyncio.shield(fut)
            except asyncio.CancelledError:
                cancelled = True
            except Exception as e:
                log.error("stopping: %s", e)
                return

    if api is not None:
        await guarded(api._stop_tasks())
    for close in reversed(cleanup):
        await guarded(close())
    _close_all(opened)
    if host is not None:
        await guarded(_undo(host.teardown))
    if cancelled:
        raise asyncio.CancelledError


# -- the anchor -------------------------------------------------------------------------------
class Anchor(_Daemon):
    """A running anchor (or fixed host) inside the caller's event loop: from
    :meth:`Anchor.open` only."""

    kind = "anchor"

    def __init__(self, core: _anchor.Anchor, cfg: AnchorConfig, control_path: str,
                 host: AnchorHost | None = None, reload: Reload | None = None) -> None:
        super().__init__(control_path, reload)
        self._core = core
        self._host = host
        self.config = cfg
        self._hosts: dict[str, str] = {}                     # host -> VIpA
        # up tunnel id -> host, interface, address
        self._tunnels: dict[int, tuple[str, str | None, str]] = {}

    @classmethod
    def open(cls, config: ConfigArg, *, control: str | None = None
             ) -> contextlib.AbstractAsyncContextManager[Anchor]:
        """``async with Anchor.open(config) as anchor:`` runs an anchor (or fixed host) in
        the running loop: the same host set-up as ``upmt-anchor`` (TUN, nftables NAT and
        filters, sysctls, VIpA leases under ``state_dir``), its control socket and
        metrics; restored on the way out, also on an exception or cancellation."""
        if isinstance(config, AgentConfig):
            raise TypeError("Anchor.open needs an anchor config (an AgentConfig was given)")
        cfg = (config if isinstance(config, AnchorConfig)
               else load_anchor_config(os.fspath(config)))
        return _open_anchor(cls, cfg, control or cfg.control)

    async def ready(self, timeout: float | None = READY_TIMEOUT) -> bool:
        """An anchor is ready once it listens, that is when :meth:`open` returned."""
        return True

    def stop_for_restart(self) -> None:
        """The coming stop is for a restart (an upgrade): keep the NAT of the connections
        the anchor masquerades, paused, until the next start takes it over (what SIGUSR2
        does for the daemon; ``upmt-anchor cleanup`` removes it if no start comes)."""
        if self._host is not None:
            self._host.pause_on_teardown = True

    def status(self) -> dict[str, Any]:
        """The same dict as ``upmt-anchor status --json``."""
        return self._core.status()

    def _look(self) -> None:
        """Associations and validated tunnels now against the last look: events for the
        differences (also kept while nobody listens, so a new subscriber is not told
        about hosts that were there before it). A tunnel whose address changed (a NAT
        rebinding, or the host restarted and set it up again) is told as down and up."""
        bus = self._bus
        hosts: dict[str, str] = {}
        tunnels: dict[int, tuple[str, str | None, str]] = {}
        for a in self._core.fwd.by_mh.values():
            hosts[a.mh] = a.vipa
            for t in a.tunnels.values():
                if t.state == "up":
                    tunnels[t.tid] = (a.mh, t.interface or None,
                                      f"{t.remote[0]}:{t.remote[1]}")
        if bus.active:
            now = _wall()
            for tid, (mh, iface, remote) in self._tunnels.items():
                new = tunnels.get(tid)
                if new is None or new[2] != remote:
                    bus.publish(TunnelDown(now, tid, iface, mh, "gone" if new is None
                                           else f"address changed to {new[2]}"))
            for mh, vipa in self._hosts.items():
                if hosts.get(mh) != vipa:
                    bus.publish(HostLost(now, mh, vipa))
            for mh, vipa in hosts.items():
                if self._hosts.get(mh) != vipa:
                    bus.publish(HostAssociated(now, mh, vipa))
            for tid, (mh, iface, remote) in tunnels.items():
                if self._tunnels.get(tid, ("", None, ""))[2] != remote:
                    bus.publish(TunnelUp(now, tid, iface, mh, remote))
        self._hosts, self._tunnels = hosts, tunnels

    async def _looker(self) -> None:
        while True:
            self._look()
            await asyncio.sleep(ANCHOR_LOOK_EVERY)

    async def _extra(self, req: dict[str, Any]) -> dict[str, Any] | None:
        return None


@contextlib.asynccontextmanager
async def _open_anchor(cls: type[Anchor], cfg: AnchorConfig,
                       control_path: str) -> AsyncIterator[Anchor]:
    loop = asyncio.get_running_loop()
    ensure_free(control_path)
    opened: list[Any] = []
    host: AnchorHost | None = None
    cleanup: list[Callable[[], Awaitable[None]]] = []
    api: Anchor | None = None
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
        made = host
        # setup replaces a killed run's table in one transaction (keeps its NAT entries)
        await _step(lambda: made.cleanup_leftovers(keep_table=True))
        tun = _open_tun(cfg.tun, loop, opened)
        await _step(made.setup)
        core = _anchor.Anchor(cfg, tun=tun, path=path)
        # sqlite: opened in the loop's thread, which uses it (a short file open)
        leases = (Leases.open(lease_file(cfg.state_dir, control_path)) if cfg.state_dir
                  else Leases.memory())
        opened.append(leases)
        core.sig.use_leases(leases, peers=[p.name for p in cfg.peers],
                            max_age=cfg.lease_days * 86400.0)
        api = cls(core, cfg, control_path, made,
                  AnchorReloader(cfg, anchor=core, host=made).reload)
        await _serve_control(api, cfg.group, cfg.metrics, render_anchor, cleanup)
        await core.start()
        cleanup.append(core.stop)
        api._spawn(api._looker())
        log.info("%s listening on %s, VIpA pool %s", cfg.role,
                 format_host_port(cfg.listen_host, cfg.listen_port), cfg.vipa_pool)
        yield api
    finally:
        await _shutdown(api, cleanup, opened, host)
