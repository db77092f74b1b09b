"""Per-rule cgroups (v2) for per-program steering: ``upmt-agent run --rule NAME -- PROG``.

The agent creates ``<base>/upmt-<tag>/<rule>`` for each rule (tag: a hash of its
control socket path, so agents in several network namespaces of one machine do not
collide: cgroups are machine-wide) and steers every socket of a process in it with nft
``socket cgroupv2``; ``run`` has the agent move it there and execs the program. No
kernel patch (the original UPMT needed one).

``<base>`` is the cgroup v2 root, except under systemd: there the cgroups belong to
the unit's own subtree, which ``Delegate=yes`` (the shipped unit) hands to the agent,
rather than beside systemd's slices at the root, where systemd does not expect
anybody else's cgroups (:func:`rule_base`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path

from upmt_tun.system.errors import SystemSetupError

__all__ = ["RuleCgroups", "cgroup2_root", "own_cgroup", "rule_base"]

log = logging.getLogger(__name__)


def cgroup2_root(mounts: str = "/proc/self/mounts") -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (``/sys/fs/cgroup``, or its ``unified``
    subdirectory on a hybrid host), or None."""
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return None
    found = [Path(f.split()[1]) for f in lines if len(f.split()) > 2 and f.split()[2] == "cgroup2"]
    return min(found, key=lambda p: len(p.parts), default=None)


def own_cgroup(text: str) -> str | None:
    """This process's cgroup v2 path from ``/proc/self/cgroup`` (its ``0::/path`` line)."""
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or None
    return None


def rule_base(own: str | None, under_systemd: bool) -> str:
    """Where the rule cgroups go, relative to the cgroup v2 root: the unit's own cgroup
    when the agent runs as a systemd service (``INVOCATION_ID`` set; the unit delegates
    its subtree, ``Delegate=yes``), else the root (``""``). systemd runs a delegated
    unit's ExecStopPost (``cleanup``) in the unit's ``.control`` subgroup: that is the
    same unit. A service cgroup is never the root itself; an unknown or odd path falls
    back to the root."""
    if not under_systemd or own is None:
        return ""
    parts = [p for p in own.strip("/").split("/") if p]
    if parts and parts[-1] == ".control":
        parts.pop()
    if not parts or any(p in (".", "..") for p in parts):
        return ""
    return "/".join(parts)


class RuleCgroups:
    def __init__(self, control_path: str, rules: list[str], *,
                 proc_cgroup: str = "/proc/self/cgroup",
                 under_systemd: bool | None = None) -> None:
        self.root = cgroup2_root()
        self.tag = "upmt-" + hashlib.blake2s(control_path.encode(), digest_size=4).hexdigest()
        self.rules = rules
        self.made: list[Path] = []
        if under_systemd is None:
            under_systemd = bool(os.environ.get("INVOCATION_ID"))
        try:
            own = own_cgroup(Path(proc_cgroup).read_text())
        except OSError:
            own = None
        self.base = rule_base(own, under_systemd)
        if self.base and self.root is not None and not (self.root / self.base).is_dir():
            self.base = ""      # not this cgroup v2 mount's (a namespace's own /sys)

    def relative(self, rule: str) -> str:
        """The rule's cgroup, relative to the cgroup v2 root (as config ``cgroup`` keys)."""
        return "/".join(p for p in (self.base, self.tag, rule) if p)

    def path(self, rule: str) -> Path:
        if self.root is None:
            raise SystemSetupError("per-program steering needs cgroup v2")
        return self.root / self.relative(rule)

    def create(self) -> None:
        """Make the cgroups (reusing those a killed run left)."""
        if self.root is None:
            raise SystemSetupError("no cgroup v2 hierarchy mounted")
        try:
            top = self.root / self.base / self.tag
            top.mkdir(exist_ok=True)
            self.made.append(top)
            for r in self.rules:
                d = top / r
                d.mkdir(exist_ok=True)
                self.made.append(d)
        except OSError as e:
            raise SystemSetupError(f"cannot create cgroups under {top.parent}: {e.strerror}") \
                from None
        log.info("rule cgroups under %s", top)

    def add(self, rule: str) -> None:
        """``reload``: the cgroup of a new rule (:meth:`create` made the others)."""
        d = self.path(rule)
        try:
            d.mkdir(exist_ok=True)
        except OSError as e:
            raise SystemSetupError(f"cannot create cgroup {d}: {e.strerror}") from None
        if d not in self.made:
            self.made.append(d)
        self.rules = [*self.rules, rule]

    def discard(self, rule: str) -> None:
        """``reload``: a removed rule's cgroup goes (its processes move to the root
        cgroup: their connections keep their marks, new ones are not steered)."""
        d = self.path(rule)
        if d in self.made:
            self.made.remove(d)
            keep, self.made = self.made, [d]
            self.remove()
            self.made = keep
        self.rules = [r for r in self.rules if r != rule]

    def remove_leftovers(self) -> int:
        """Remove the cgroups a killed run left (every rule's, whatever the config says
        now); the number removed."""
        if self.root is None:
            return 0
        top = self.root / self.base / self.tag
        if not top.is_dir():
            return 0
        self.made = [top, *sorted(d for d in top.iterdir() if d.is_dir())]
        count = len(self.made)
        self.remove()
        return count

    def remove(self) -> None:
        """Move any process still in them to the root cgroup, then remove them (never raises).
        Out of the unit's subtree too: a program started with ``run`` outlives the agent
        (the unit's ``KillMode=mixed`` gives the agent the time to move it out)."""
        assert self.root is not None or not self.made
        for d in reversed(self.made):
            with contextlib.suppress(OSError):
                for pid in (d / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        (self.root / "cgroup.procs").write_text(pid)   # type: ignore[operator]
            try:
                d.rmdir()
            except OSError as e:
                log.warning("cannot remove cgroup %s: %s", d, e.strerror)
        self.made.clear()
