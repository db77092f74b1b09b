"""``reload``: what a running daemon changes when it takes a new config (pure).

A plan is computed from the running config and the new one, before anything is
touched; the drivers (``runtime.py``) carry it out, host first (one nftables
transaction, dry-run before), then the daemon's tables. A config that does not load,
does not validate here, or whose ruleset nft refuses changes nothing.

Agent:

* A rule's identity is its ``name``. Each rule owns a *mark slot*: the number in
  bits 16-31 of the ct mark of the connections it steers (``((slot + 1) << 16) | F``).
  At start a rule's slot is its position, unless an earlier run of this boot saved the
  slots after a reload (``<control>.slots``, in /run: it lives as long as the conntrack
  entries): then each rule takes its saved slot by name. A reload keeps the slot of every rule that
  keeps its name (moved, edited or untouched), gives new rules slots never used before
  in this run, and retires the slots of removed rules for good (never handed to another
  rule while connections may still carry them: a conntrack entry outlives any table).
  So an established connection's ct mark names the same rule before and after, however
  the rules were reordered.
* Existing flows keep what they have (their ct mark, so the kernel still steers them
  into the TUN; their tunnel, interface preference and anchor) until they end, whether
  their rule was kept, edited or removed: an edit applies to new connections only. A
  reload never cuts a connection of a rule; the only flows that end are those through
  an anchor that was removed (their public address was that anchor's).
* Anchors added (tunnels over every interface start at once, or when the name
  resolves), removed (its tunnels close, its flows end), or moved (same key, new
  address: as a name that resolves elsewhere). A changed key is a new anchor: removed
  and added.
* ``[[interface]]`` entries added (each gets the next *interface slot*: its socket mark
  F+1+k and routing table T+1+k, never handed to another entry in this run, as a rule's
  mark slot; its socket, ip rules, nft prerouting rule and links to every anchor; its
  device is then followed as hotplug does), removed (its flows move first, as on a link
  down, then its links, socket, rules, routes and nft rule go), or with a new
  ``gateway`` (its table's route is made again). A rule whose ``via`` names an entry
  neither kept nor added is refused. An agent started without ``[[interface]]`` (the
  interfaces with a default route) needs a restart to list some, and the other way.
* ``return_after`` applies at once. Every other key (see :data:`AGENT_RESTART`) keeps
  its running value and the reply says "restart needed for ...".

Anchor:

* ``[[peer]]`` added (may associate from now on), removed (its association, tunnels,
  sessions and flows end now; its lease is dropped at the next compaction), re-keyed
  (its sessions end: the host must authenticate with its new key). Other peers'
  associations are not touched.
* ``mesh`` and a peer's ``mesh``: the anchor relays (or stops relaying) for it at once;
  a host that joins the mesh learns the mesh pool when it next associates.
* ``allow_egress``, ``deny_egress``, ``max_flows_per_host`` (nft, one transaction:
  the per-host connection counts start over), ``max_associations``, ``lease_days``.
* Every other key (see :data:`ANCHOR_RESTART`): restart needed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

from .config import AgentConfig, AnchorConfig, AnchorRef, InterfaceConfig, Rule

__all__ = ["AGENT_RESTART", "ANCHOR_RESTART", "AgentPlan", "AnchorPlan", "IfaceSlots",
           "ReloadRefused", "parse_slots", "plan_agent", "plan_anchor", "start_slots"]

MAX_SLOT = 0xFFFE            # (slot + 1) must fit the 16 high bits of the ct mark

# config field -> the key a user writes; these need a restart (their running value stays)
AGENT_RESTART = {
    "name": "name", "vipa_fix": "vipa_fix", "control": "control", "mtu": "mtu",
    "fwmark": "fwmark", "table": "table",
    "keepalive_s": "keepalive", "tun": "tun", "private_key": "private_key",
    "plaintext_data": "insecure_plaintext_for_benchmarks", "metrics": "metrics",
    "group": "group", "mark_mask": "mark_mask", "rule_priority": "rule_priority",
    "direct": "direct", "vipa6_fix": "vipa6_fix",
}
ANCHOR_RESTART = {
    "role": "role", "listen_host": "listen", "listen_port": "listen",
    "vipa_pool": "vipa_pool", "nat_interface": "nat_interface", "control": "control",
    "mtu": "mtu", "tun": "tun", "private_key": "private_key",
    "plaintext_data": "insecure_plaintext_for_benchmarks", "metrics": "metrics",
    "group": "group", "state_dir": "state_dir", "vipa6_pool": "vipa6_pool",
}


@dataclass(frozen=True)
class IfaceSlots:
    """The interface slots of a running agent: entry name -> k (its socket mark F+1+k,
    its routing table T+1+k), and ``next``, the first never given in this run (a removed
    entry's numbers are never handed to another one: its ip rule and table are gone, but
    packets and conntrack entries marked before may still be on their way)."""

    slots: Mapping[str, int]
    next: int

    @classmethod
    def start(cls, names: list[str]) -> IfaceSlots:
        return cls({n: k for k, n in enumerate(names)}, len(names))


class ReloadRefused(Exception):
    """The new config cannot be applied to the running daemon (one line: why)."""


def _restart(old: object, new: object, keys: Mapping[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    for f, key in keys.items():
        if getattr(old, f) != getattr(new, f) and key not in out:
            out.append(key)
    return tuple(out)


def start_slots(rules: tuple[Rule, ...], saved: Mapping[str, int] | None = None,
                saved_next: int = 0) -> tuple[dict[str, int], int]:
    """The mark slots at start, and the first slot not given. Without ``saved``: each
    rule's position. With the slots an earlier run of this boot saved (``saved``, its
    first free ``saved_next``): a rule keeps its saved slot by name (connections of that
    run still carry it: the conntrack entries outlived the agent), others get new ones."""
    if not saved:
        return {r.name: r.index for r in rules}, len(rules)
    slots: dict[str, int] = {}
    nxt = max(saved_next, max(saved.values(), default=-1) + 1)
    for r in rules:
        if r.name in saved:
            slots[r.name] = saved[r.name]
        else:
            slots[r.name], nxt = nxt, nxt + 1
    return slots, nxt


def parse_slots(data: object) -> tuple[dict[str, int], int]:
    """The saved slots (JSON ``{"slots": {name: slot}, "next": n}``); ValueError when it
    is not exactly that (a file that is not ours is ignored, never trusted in part)."""
    if not isinstance(data, dict) or set(data) != {"slots", "next"}:
        raise ValueError("not a slots file")
    slots, nxt = data["slots"], data["next"]
    if not isinstance(slots, dict) or type(nxt) is not int or not 0 <= nxt <= MAX_SLOT + 1:
        raise ValueError("bad slots or next")
    out: dict[str, int] = {}
    for name, slot in slots.items():
        if type(slot) is not int or not 0 <= slot < nxt or len(name) > 64:
            raise ValueError(f"bad slot for {name[:64]!r}")
        out[name] = slot
    if len(set(out.values())) != len(out):
        raise ValueError("two rules share a slot")
    return out, nxt


def _same_rule(a: Rule, b: Rule) -> bool:
    """Equal but for the position."""
    return replace(a, index=0) == replace(b, index=0)


@dataclass(frozen=True)
class AgentPlan:
    """What a reload does to a running agent."""

    cfg: AgentConfig                      # what runs afterwards (restart keys: old values)
    slots: dict[str, int]                 # rule name -> mark slot
    next_slot: int                        # the first slot never given in this run
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    edited: tuple[str, ...] = ()
    reordered: bool = False
    anchors_added: tuple[AnchorRef, ...] = ()
    anchors_removed: tuple[str, ...] = ()
    anchors_moved: tuple[AnchorRef, ...] = ()
    return_after: bool = False
    restart: tuple[str, ...] = ()
    ifaces: IfaceSlots | None = None      # after the reload (None: as before)
    ifaces_added: tuple[InterfaceConfig, ...] = ()
    ifaces_removed: tuple[str, ...] = ()
    gateways: tuple[InterfaceConfig, ...] = ()     # kept entries with another gateway

    @property
    def rules_changed(self) -> bool:
        return bool(self.added or self.removed or self.edited or self.reordered)

    @property
    def ifaces_changed(self) -> bool:
        return bool(self.ifaces_added or self.ifaces_removed)

    def changes(self) -> list[str]:
        """What changes, one short phrase each (empty: nothing)."""
        out = [f"rule {n} added" for n in self.added]
        out += [f"rule {n} removed" for n in self.removed]
        out += [f"rule {n} edited" for n in self.edited]
        if self.reordered and not (self.added or self.removed):
            out.append("rules reordered")
        out += [f"anchor {a.name} added" for a in self.anchors_added]
        out += [f"anchor {n} removed" for n in self.anchors_removed]
        out += [f"anchor {a.name} moved to {a.host}:{a.port}" for a in self.anchors_moved]
        out += [f"interface {i.name} added" for i in self.ifaces_added]
        out += [f"interface {n} removed" for n in self.ifaces_removed]
        out += [f"interface {i.name} gateway {i.gateway or 'from the main table'}"
                for i in self.gateways]
        if self.return_after:
            out.append(f"return_after {self.cfg.return_after_s:g} s")
        return out


MAX_IFACE_SLOT = 0xFFFF      # F+1+k must fit the 16 bits of the packet mark (checked again
                             # against fwmark and mark_mask by the host)


def _plan_ifaces(old: AgentConfig, new: AgentConfig, ifaces: IfaceSlots
                 ) -> tuple[IfaceSlots, tuple[InterfaceConfig, ...], tuple[str, ...],
                            tuple[InterfaceConfig, ...], bool]:
    """(slots after, added, removed, gateway edits, restart needed). Without
    ``[[interface]]`` on either side (discovered interfaces) nothing changes here: a
    restart is needed when the lists differ."""
    if not old.interfaces or not new.interfaces:
        return ifaces, (), (), (), old.interfaces != new.interfaces
    before = {i.name: i for i in old.interfaces}
    after = {i.name: i for i in new.interfaces}
    added = tuple(i for n, i in after.items() if n not in before)
    removed = tuple(n for n in before if n not in after)
    gateways = tuple(i for n, i in after.items()
                     if n in before and before[n].gateway != i.gateway)
    slots = {n: k for n, k in ifaces.slots.items() if n in after}
    nxt = ifaces.next
    for i in added:
        if nxt > MAX_IFACE_SLOT:
            raise ReloadRefused("no interface slot left (every mark was used in this run): "
                                "restart the agent")
        slots[i.name], nxt = nxt, nxt + 1
    return IfaceSlots(slots, nxt), added, removed, gateways, False


def plan_agent(old: AgentConfig, new: AgentConfig, slots: Mapping[str, int], next_slot: int,
               interfaces: set[str] | IfaceSlots) -> AgentPlan:
    """The plan from the running config ``old`` (with its rules' ``slots``; ``next_slot``
    the first never given) to ``new``; ``interfaces``: the running interface slots (a
    set of names: those in use, which then do not change). ReloadRefused when ``new``
    cannot run here."""
    if isinstance(interfaces, IfaceSlots):
        ifaces, i_added, i_removed, gateways, i_restart = _plan_ifaces(old, new, interfaces)
        in_use = set(ifaces.slots)
    else:
        ifaces, i_added, i_removed, gateways = None, (), (), ()
        i_restart, in_use = old.interfaces != new.interfaces, interfaces
    for r in new.rules:
        for v in r.via:
            if v not in in_use:
                raise ReloadRefused(f"rule {r.name!r}: via interface {v!r} is neither kept "
                                    "nor added")
    old_rules = {r.name: r for r in old.rules}
    new_rules = {r.name: r for r in new.rules}
    added = tuple(n for n in new_rules if n not in old_rules)
    removed = tuple(n for n in old_rules if n not in new_rules)
    edited = tuple(n for n, r in new_rules.items()
                   if n in old_rules and not _same_rule(r, old_rules[n]))
    kept = [n for n in new_rules if n in old_rules]
    reordered = kept != [n for n in old_rules if n in new_rules]
    new_slots = {n: slots[n] for n in kept}
    for n in added:
        if next_slot > MAX_SLOT:
            raise ReloadRefused("no mark slot left for a new rule (every one was used in "
                                "this run): restart the agent")
        new_slots[n] = next_slot
        next_slot += 1

    old_anchors = {a.name: a for a in old.anchors}
    new_anchors = {a.name: a for a in new.anchors}
    a_added = tuple(a for n, a in new_anchors.items()
                    if n not in old_anchors or old_anchors[n].public_key != a.public_key)
    a_removed = tuple(n for n, a in old_anchors.items()
                      if n not in new_anchors or new_anchors[n].public_key != a.public_key)
    a_moved = tuple(a for n, a in new_anchors.items() if n in old_anchors
                    and old_anchors[n].public_key == a.public_key
                    and (old_anchors[n].host, old_anchors[n].port) != (a.host, a.port))

    restart = _restart(old, new, AGENT_RESTART)
    if i_restart:
        restart += ("interface",)
    cfg = replace(old, path=new.path, rules=new.rules, anchors=new.anchors,
                  return_after_s=new.return_after_s,
                  interfaces=old.interfaces if i_restart else new.interfaces)
    return AgentPlan(cfg, new_slots, next_slot, added, removed, edited, reordered,
                     a_added, a_removed, a_moved, old.return_after_s != new.return_after_s,
                     restart, ifaces, i_added, i_removed, gateways)


@dataclass(frozen=True)
class AnchorPlan:
    """What a reload does to a running anchor."""

    cfg: AnchorConfig                     # what runs afterwards (restart keys: old values)
    peers_added: tuple[str, ...] = ()
    peers_removed: tuple[str, ...] = ()
    peers_rekeyed: tuple[str, ...] = ()
    mesh_changed: tuple[str, ...] = ()    # peers whose (effective) mesh flag changed
    nft_changed: bool = False             # egress lists or max_flows_per_host
    limits: tuple[str, ...] = ()          # "KEY changed" for the other applied keys
    restart: tuple[str, ...] = ()

    def changes(self) -> list[str]:
        out = [f"peer {n} added" for n in self.peers_added]
        out += [f"peer {n} removed" for n in self.peers_removed]
        out += [f"peer {n} re-keyed" for n in self.peers_rekeyed]
        out += [f"peer {n} mesh {'on' if self._mesh(n) else 'off'}"
                for n in self.mesh_changed]
        out += list(self.limits)
        return out

    def _mesh(self, name: str) -> bool:
        return next((p.mesh for p in self.cfg.peers if p.name == name), False)


_ANCHOR_LIMITS = ("mesh", "allow_egress", "deny_egress", "max_flows_per_host",
                  "max_associations", "lease_days")
_NFT_KEYS = ("allow_egress", "deny_egress", "max_flows_per_host")


def plan_anchor(old: AnchorConfig, new: AnchorConfig) -> AnchorPlan:
    """The plan from the running anchor config ``old`` to ``new``."""
    old_peers = {p.name: p for p in old.peers}
    new_peers = {p.name: p for p in new.peers}
    added = tuple(n for n in new_peers if n not in old_peers)
    removed = tuple(n for n in old_peers if n not in new_peers)
    rekeyed = tuple(n for n, p in new_peers.items()
                    if n in old_peers and old_peers[n].public_key != p.public_key)
    mesh = tuple(n for n, p in new_peers.items()
                 if n in old_peers and n not in rekeyed and old_peers[n].mesh != p.mesh)
    limits = tuple(k for k in _ANCHOR_LIMITS if getattr(old, k) != getattr(new, k))
    nft_changed = any(k in limits for k in _NFT_KEYS)
    restart = _restart(old, new, ANCHOR_RESTART)
    applied = {k: getattr(new, k) for k in (*_ANCHOR_LIMITS, "peers", "path")}
    cfg = replace(old, **applied)
    assert {f.name for f in fields(AnchorConfig)} >= set(applied)
    return AnchorPlan(cfg, added, removed, rekeyed, mesh, nft_changed,
                      tuple(f"{k} changed" for k in limits), restart)
