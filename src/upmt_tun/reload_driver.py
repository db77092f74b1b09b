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
import contextlib
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from .agent import Agent, rule_classifier
from .anchor import Anchor
from .config import (
    AgentConfig,
    AnchorConfig,
    ConfigError,
    Rule,
    load_agent_config,
    load_anchor_config,
)
from .reload import (
    AgentPlan,
    ReloadRefused,
    parse_slots,
    plan_agent,
    plan_anchor,
    start_slots,
)
from .resolve import AnchorResolver, ResolveSchedule
from .system.agent_host import AgentHost, RuleMatch
from .system.anchor_host import AnchorHost
from .system.cgroups import RuleCgroups
from .system.errors import SystemSetupError
from .tables import FlowKey

__all__ = ["AgentReloader", "AnchorReloader", "SlotFile", "rule_matches"]

log = logging.getLogger(__name__)
Lookup = Callable[[FlowKey], "tuple[int, str] | None"]


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
    them, read at the next start (reload.start_slots). Only our own file is read: a
    regular file (no symlink) owned by this user, writable by nobody else, in the exact
    format; anything else is ignored with one line (the slots are then positions)."""

    def __init__(self, control_path: str) -> None:
        self.path = control_path + ".slots"

    def load(self) -> tuple[dict[str, int], int] | None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("%s: ignored (%s)", self.path, e.strerror or e)
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() \
                    or st.st_mode & 0o022:
                raise ValueError("not this user's own file")
            with os.fdopen(fd, "rb", closefd=False) as f:
                return parse_slots(json.loads(f.read(1 << 20)))
        except (OSError, ValueError) as e:
            log.warning("%s: ignored (%s)", self.path, e)
            return None
        finally:
            os.close(fd)

    def save(self, slots: Mapping[str, int], next_slot: int) -> None:
        """Written whole (a temporary file renamed over it); a failure is one line (the
        next start falls back to positions)."""
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"slots": dict(slots), "next": next_slot}, f)
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("cannot save the rules' mark slots to %s: %s", self.path,
                        e.strerror or e)
            with contextlib.suppress(OSError):
                os.unlink(tmp)


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
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``cgroups``: the per-rule cgroups when ``upmt-agent run`` is available;
        ``slots``: the rules' mark slots and the first free one (default: positions);
        ``slot_file``: where a reload saves them for the next start; ``v6_off``: the
        start turned IPv6 inside off (MTU, disabled IPv6), whatever the file says, so a
        file's ``vipa6_fix`` is not a change that needs a restart."""
        self.cfg = cfg
        self.v6_off = v6_off
        self.slots, self.next_slot = slots or start_slots(cfg.rules)
        self.slot_file = slot_file
        self.agent, self.host, self.cgroups = agent, host, cgroups
        self.schedule, self.resolver, self.lookup = schedule, resolver, lookup
        self.clock = clock
        self.interfaces = {i.name for i in agent.ifaces}
        self._lock = asyncio.Lock()

    async def reload(self, path: str | None = None) -> dict[str, Any]:
        """Apply config file ``path`` (default: the one running) now."""
        async with self._lock:
            path = path or self.cfg.path
            try:
                new = load_agent_config(path)
                if self.v6_off:
                    new = replace(new, vipa6_fix="")
                plan = plan_agent(self.cfg, new, self.slots, self.next_slot, self.interfaces)
            except ConfigError as e:
                return _refused(str(e))
            except ReloadRefused as e:
                return _refused(f"{path}: {e}")
            if plan.rules_changed:
                try:
                    await asyncio.to_thread(self._host, plan)
                except SystemSetupError as e:
                    return _refused(f"{path}: {e}")
            self._daemon(plan)
            changes = plan.changes()
            log.info("reloaded %s: %s", path, _summary(changes, plan.restart))
            return {"ok": True, "changes": changes, "restart": list(plan.restart)}

    def _host(self, plan: AgentPlan) -> None:
        """Cgroups of new rules (nft resolves their paths), the output chain in one
        transaction, then the cgroups of removed rules. Runs in a worker thread."""
        cg = self.cgroups
        made: list[str] = []
        try:
            if cg is not None:
                for name in plan.added:
                    cg.add(name)
                    made.append(name)
            relative = cg.relative if cg is not None else None
            self.host.replace_rules(rule_matches(plan.cfg.rules, plan.slots, relative))
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
