"""Carry out a reload (``reload.py`` decides what changes) in a running daemon.

The order is what makes a refused reload change nothing: load the file, plan (both
pure; a refusal here touches nothing), then the host in one nftables transaction that
was dry-run first (``nft -c``), and only when the host took it the daemon's own tables
(which cannot fail). Reloads run one at a time (a lock: ``reload`` from the CLI and
SIGHUP may race). Every outcome is one log line and the reply:
``{"ok": true, "changes": [...], "restart": [...]}`` or ``{"ok": false, "usage": true,
"error": "one line"}`` (the CLI exits 2 then).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from .agent import Agent, IfaceSeam, rule_classifier
from .anchor import Anchor
from .config import (
    AgentConfig,
    AnchorConfig,
    ConfigError,
    Rule,
    load_agent_config,
    load_anchor_config,
)
from .dataplane.io import PathSocket
from .hotplug_driver import Hotplug
from .reload import (
    AgentPlan,
    IfaceSlots,
    ReloadRefused,
    parse_slots,
    plan_agent,
    plan_anchor,
    start_slots,
)
from .resolve import AnchorResolver, ResolveSchedule
from .statefile import StateFile
from .system import netlink
from .system.agent_host import AgentHost, IfacePlan, RuleMatch
from .system.anchor_host import AnchorHost
from .system.cgroups import RuleCgroups
from .system.errors import SystemSetupError
from .tables import FlowKey

__all__ = ["AgentReloader", "AnchorReloader", "SlotFile", "rule_matches"]

log = logging.getLogger(__name__)
Lookup = Callable[[FlowKey], "tuple[int, str] | None"]
# (mark, IPv6: a dual-stack socket, local address) -> a new tunnel socket, not yet bound
# to a device (Hotplug binds it)
OpenPath = Callable[[int, bool, str], PathSocket]


def rule_matches(rules: tuple[Rule, ...], slots: Mapping[str, int],
                 cgroup_of: Callable[[str], str] | None) -> list[RuleMatch]:
    """The nft rules of the config's rules, first match first, each marking with its
    slot. ``cgroup_of`` (rule -> its cgroup for ``upmt-agent run``, None without cgroup
    v2): those come first (a process in a rule's cgroup belongs to it, whatever its
    ports)."""
    out = []
    if cgroup_of is not None:
        out = [RuleMatch(slots[r.name], "any", None, None, None, None, cgroup_of(r.name))
               for r in rules]
    return out + [RuleMatch(slots[r.name], r.protocol, str(r.dst) if r.dst else None,
                            r.dst_port, r.src_port, r.uid, r.cgroup) for r in rules]


class SlotFile:
    """The rules' mark slots, saved next to the control socket after a reload changed
    them, read at the next start (reload.start_slots). A file that is not ours, or not in
    the exact format, is ignored with one line (the slots are then positions)."""

    def __init__(self, control_path: str) -> None:
        self.file = StateFile(control_path + ".slots", "the rules' mark slots")
        self.path = self.file.path

    def load(self) -> tuple[dict[str, int], int] | None:
        return self.file.load(parse_slots)

    def save(self, slots: Mapping[str, int], next_slot: int) -> None:
        """A failure is one line (the next start falls back to positions)."""
        self.file.save({"slots": dict(slots), "next": next_slot})


def _summary(changes: list[str], restart: tuple[str, ...]) -> str:
    text = ", ".join(changes) or "no change"
    if restart:
        text += f"; restart needed for {', '.join(restart)}"
    return text


def _refused(why: str) -> dict[str, Any]:
    log.warning("reload refused, nothing changed: %s", why)
    return {"ok": False, "usage": True, "error": why}


class AgentReloader:
    """``upmt-agent reload`` and SIGHUP (without a terminal) in a running agent."""

    def __init__(self, cfg: AgentConfig, *, agent: Agent, host: AgentHost,
                 cgroups: RuleCgroups | None, schedule: ResolveSchedule,
                 resolver: AnchorResolver, lookup: Lookup | None,
                 slots: tuple[dict[str, int], int] | None = None,
                 slot_file: SlotFile | None = None, v6_off: bool = False,
                 clock: Callable[[], float] = time.monotonic,
                 hotplug: Hotplug | None = None, open_path: OpenPath | None = None) -> None:
        """``cgroups``: the per-rule cgroups when ``upmt-agent run`` is available;
        ``slots``: the rules' mark slots and the first free one (default: positions);
        ``slot_file``: where a reload saves them for the next start; ``v6_off``: the
        start turned IPv6 inside off (MTU, disabled IPv6), whatever the file says, so a
        file's ``vipa6_fix`` is not a change that needs a restart. ``hotplug`` (the
        agent was started with ``[[interface]]`` entries) and ``open_path``: interfaces
        can be added and removed (else they need a restart)."""
        self.cfg = cfg
        self.v6_off = v6_off
        self.slots, self.next_slot = slots or start_slots(cfg.rules)
        self.slot_file = slot_file
        self.agent, self.host, self.cgroups = agent, host, cgroups
        self.schedule, self.resolver, self.lookup = schedule, resolver, lookup
        self.clock = clock
        self.interfaces = IfaceSlots({i.name: i.index for i in agent.ifaces},
                                     max((i.index for i in agent.ifaces), default=-1) + 1)
        self.hotplug, self.open_path = hotplug, open_path
        self._lock = asyncio.Lock()

    async def reload(self, path: str | None = None) -> dict[str, Any]:
        """Apply config file ``path`` (default: the one running) now. The file is the
        whole truth: rules added or removed by :meth:`edit_rules` since are replaced by
        the file's."""
        async with self._lock:
            path = path or self.cfg.path
            try:
                new = load_agent_config(path)
                if self.v6_off:
                    new = replace(new, vipa6_fix="")
            except ConfigError as e:
                return _refused(str(e))
            return await self._apply(new, path)

    async def edit_rules(self, edit: Callable[[tuple[Rule, ...]], tuple[Rule, ...]],
                         source: str) -> dict[str, Any]:
        """The running rules changed in code (``Agent.add_rule``/``remove_rule``):
        ``edit(rules)`` gives the new rules (called under the reload lock, so two edits
        never lose one another; it may raise to refuse: nothing changes). Planned and
        carried out as a reload of the running config with those rules (same mark slots,
        same nft transaction); ``source`` names it in the log and errors."""
        async with self._lock:
            rules = tuple(replace(r, index=i) for i, r in enumerate(edit(self.cfg.rules)))
            if len(rules) > 255:
                return _refused(f"{source}: at most 255 rules")
            return await self._apply(replace(self.cfg, rules=rules), source)

    async def _apply(self, new: AgentConfig, path: str) -> dict[str, Any]:
        """Plan from the running config to ``new`` and carry it out (under the lock)."""
        try:
            live = self.hotplug is not None and self.open_path is not None
            plan = plan_agent(self.cfg, new, self.slots, self.next_slot,
                              self.interfaces if live else set(self.interfaces.slots))
        except ReloadRefused as e:
            return _refused(f"{path}: {e}")
        added: list[tuple[IfacePlan, IfaceSeam]] = []
        removed: list[IfaceSeam] = []
        if plan.ifaces_changed:
            try:     # sockets opened, the whole nft change dry-run: nothing moved yet
                added = await asyncio.to_thread(self._open_ifaces, plan)
            except (SystemSetupError, OSError) as e:
                return _refused(f"{path}: {getattr(e, 'strerror', None) or e}")
            removed = [s for n in plan.ifaces_removed
                       if (s := self.agent.remove_iface(n)) is not None]
        if plan.rules_changed or plan.ifaces_changed:
            try:
                await asyncio.to_thread(self._host, plan, [p for p, _ in added])
            except SystemSetupError as e:
                for _p, seam in added:
                    seam.path.close()
                if plan.ifaces_removed:   # their flows moved already: they stay gone
                    self._ifaces_gone(removed)
                    log.error("reload: interfaces %s removed from the agent, but the "
                              "host refused the change: restart the agent (%s)",
                              ", ".join(plan.ifaces_removed), e)
                return _refused(f"{path}: {e}")
        if plan.ifaces_changed:
            self._ifaces_gone(removed)
            self._ifaces_new(plan, added)
        if plan.gateways and self.hotplug is not None:
            for ic in plan.gateways:
                self.hotplug.state.set_gateway(ic.name, ic.gateway)
        self._daemon(plan)
        changes = plan.changes()
        log.info("reloaded %s: %s", path, _summary(changes, plan.restart))
        return {"ok": True, "changes": changes, "restart": list(plan.restart)}

    def _open_ifaces(self, plan: AgentPlan) -> list[tuple[IfacePlan, IfaceSeam]]:
        """Added interfaces: each one's socket (its mark, IPv6 when the device it will
        get has a global IPv6 address, as at start), then the whole host change
        dry-run. Runs in a worker thread; on failure the sockets opened are closed."""
        assert plan.ifaces is not None and self.hotplug is not None
        assert self.open_path is not None
        out: list[tuple[IfacePlan, IfaceSeam]] = []
        try:
            for ic in plan.ifaces_added:
                k = plan.ifaces.slots[ic.name]
                device = self.hotplug.slots.would_bind(ic.name)
                info = netlink.interface_info(device) if device else None
                v6 = info is not None and info.address6 is not None
                local = (info.address or info.address6 or "0.0.0.0") if info else "0.0.0.0"
                path = self.open_path(self.cfg.fwmark + 1 + k, v6, local)
                families = (info.families if info is not None else frozenset()) \
                    or frozenset({4})
                out.append((IfacePlan(k, ic.name, ic.gateway, path.local[1], waiting=True,
                                      absent=True, v6=v6,
                                      gateway6=info.gateway6 if info else None),
                            IfaceSeam(ic.name, k, path, families)))
            relative = self.cgroups.relative if self.cgroups is not None else None
            # (cgroups of rules added here do not exist yet: nft would not resolve them)
            if not (plan.added and self.cgroups is not None):
                self.host.change(rule_matches(plan.cfg.rules, plan.slots, relative),
                                 [p for p, _ in out], list(plan.ifaces_removed),
                                 dry_run=True)
        except BaseException:
            for _p, seam in out:
                seam.path.close()
            raise
        return out

    def _ifaces_gone(self, seams: list[IfaceSeam]) -> None:
        assert self.hotplug is not None
        for seam in seams:
            self.hotplug.remove_entry(seam.name)
            seam.path.close()

    def _ifaces_new(self, plan: AgentPlan, added: list[tuple[IfacePlan, IfaceSeam]]) -> None:
        assert self.hotplug is not None and plan.ifaces is not None
        gateways = {ic.name: ic.gateway for ic in plan.ifaces_added}
        for p, seam in added:
            assert isinstance(seam.path, PathSocket)
            self.agent.add_iface(seam)
            self.hotplug.add_entry(p.name, seam.path, self.cfg.fwmark + 1 + p.index,
                                   gateways[p.name])
        self.interfaces = plan.ifaces

    def _host(self, plan: AgentPlan, added: list[IfacePlan] | None = None) -> None:
        """Cgroups of new rules (nft resolves their paths), the output chain in one
        transaction (with interfaces added or removed: their ip rules, the prerouting
        chain in the same transaction, the removed ones' routes), then the cgroups of
        removed rules. Runs in a worker thread."""
        cg = self.cgroups
        made: list[str] = []
        try:
            if cg is not None:
                for name in plan.added:
                    cg.add(name)
                    made.append(name)
            relative = cg.relative if cg is not None else None
            matches = rule_matches(plan.cfg.rules, plan.slots, relative)
            if plan.ifaces_changed:
                self.host.change(matches, added or [], list(plan.ifaces_removed))
            else:
                self.host.replace_rules(matches)
        except SystemSetupError:
            for name in made:
                assert cg is not None
                cg.discard(name)
            raise
        if cg is not None:
            for name in plan.removed:
                cg.discard(name)

    def _daemon(self, plan: AgentPlan) -> None:
        agent, schedule = self.agent, self.schedule
        cfg = plan.cfg
        agent.set_rules(cfg, rule_classifier(cfg.rules, self.lookup, cfg.fwmark, plan.slots))
        now = self.clock()
        for name in plan.anchors_removed:
            agent.remove_anchor(name)
            schedule.remove(name)
        for ref in plan.anchors_added:
            schedule.add(ref.name, ref.host, ref.port, now)
            agent.add_anchor(ref, schedule.entries[ref.name].addr)
        for ref in plan.anchors_moved:
            schedule.add(ref.name, ref.host, ref.port, now)
            addr = schedule.entries[ref.name].addr
            if addr is not None:
                agent.set_anchor_address(ref.name, addr)
        if plan.anchors_added or plan.anchors_moved:
            self.resolver.wake()
        if self.slot_file is not None and (plan.slots, plan.next_slot) != (
                self.slots, self.next_slot):
            self.slot_file.save(plan.slots, plan.next_slot)
        self.cfg, self.slots, self.next_slot = cfg, plan.slots, plan.next_slot


class AnchorReloader:
    """``upmt-anchor reload`` and SIGHUP (without a terminal) in a running anchor."""

    def __init__(self, cfg: AnchorConfig, *, anchor: Anchor, host: AnchorHost) -> None:
        self.cfg = cfg
        self.anchor, self.host = anchor, host
        self._lock = asyncio.Lock()

    async def reload(self, path: str | None = None) -> dict[str, Any]:
        async with self._lock:
            path = path or self.cfg.path
            try:
                new = load_anchor_config(path)
            except ConfigError as e:
                return _refused(str(e))
            plan = plan_anchor(self.cfg, new)
            cfg = plan.cfg
            if plan.nft_changed:
                try:
                    await asyncio.to_thread(
                        self.host.replace_egress, tuple(map(str, cfg.allow_egress)),
                        tuple(map(str, cfg.deny_egress)), cfg.max_flows_per_host)
                except SystemSetupError as e:
                    return _refused(f"{path}: {e}")
            self.anchor.reconfigure(cfg, plan.peers_removed + plan.peers_rekeyed)
            self.cfg = cfg
            changes = plan.changes()
            log.info("reloaded %s: %s", path, _summary(changes, plan.restart))
            return {"ok": True, "changes": changes, "restart": list(plan.restart)}
