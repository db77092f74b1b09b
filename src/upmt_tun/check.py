"""``upmt-agent check`` / ``upmt-anchor check``: what will bite, before it does.

Loads nothing into the kernel: the nftables ruleset the daemon would install is only
dry-run (``nft -c``), and the host is read (``ip -j``, ``nft -j``, name resolution), never
changed. The findings are one line each. The pure functions take what was read as data
(``ip -j`` JSON objects), so each kind of finding is tested without a host; the drivers,
:func:`check_agent` and :func:`check_anchor`, read the host and call them.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .config import AgentConfig, AnchorConfig
from .hotplug import is_pattern, matches
from .system import nft
from .system.agent_host import IfacePlan, RuleMatch, agent_ruleset
from .system.anchor_host import anchor_ruleset
from .system.errors import SystemSetupError

__all__ = ["Findings", "check_agent", "check_anchor", "forward_drops", "overlaps",
           "rule_takes", "rules_before_ours"]

Json = dict[str, Any]


@dataclass
class Findings:
    """Warnings (exit 0) and errors (exit 2: the daemon would refuse to start)."""

    warnings: list[str]
    errors: list[str]


# -- ip rules --------------------------------------------------------------------------

def _int(v: object, default: int) -> int:
    try:
        return int(str(v), 0)
    except ValueError:
        return default


PARTIAL = ("srclen", "dst", "ipproto", "sport", "dport", "uidrange", "tos", "dsfield")


def rule_takes(r: Json, mark: int) -> bool:
    """Whether ``ip rule`` ``r`` (an ``ip -j rule`` object) matches a packet this host sends
    with packet mark ``mark`` (local traffic: input interface ``lo``, no output interface
    bound), and does something with it: a lookup (except ``local`` at priority 0, which
    every packet goes through) or unreachable/blackhole/prohibit. A ``nop`` or ``goto``
    takes nothing. Rules with address, protocol, port or uid selectors are taken to match:
    they take *some* of the traffic, which is enough to break it."""
    if r.get("action") in ("nop", "goto"):
        return False
    if r.get("table") == "local" and int(r.get("priority", 0)) == 0:
        return False
    if r.get("iif") not in (None, "lo") or r.get("oif") is not None:
        return False                                       # never local traffic
    match = True
    if "fwmark" in r:
        m = _int(r["fwmark"], 0)
        mask = _int(r.get("fwmask", "0xffffffff"), 0xFFFFFFFF)
        match = (mark & mask) == m
    if "not" in r:      # matches unless every selector does (the others may not)
        return not (match and not any(k in r for k in PARTIAL))
    return match


def tool_of(r: Json) -> str:
    """Whose rule it most likely is, for the message."""
    prio = int(r.get("priority", 0))
    if str(r.get("table")) == "52" or 5210 <= prio <= 5270:
        return "Tailscale's"
    if (str(r.get("table")) == "51820" or _int(r.get("fwmark", "0"), 0) == 0xCA6C
            or "suppress_prefixlen" in r):
        return "wg-quick's"
    return "another tool's"


def describe_rule(r: Json) -> str:
    """Roughly ``ip rule``'s own text: ``5270: from all lookup 52``."""
    out = [f"{r.get('priority', 0)}:"]
    if "not" in r:
        out.append("not")
    src = str(r.get("src", "all"))
    out.append(f"from {src}/{r['srclen']}" if "srclen" in r else f"from {src}")
    if "dst" in r:
        out.append(f"to {r['dst']}/{r.get('dstlen', 32)}")
    if "fwmark" in r:
        out.append(f"fwmark {r['fwmark']}" + (f"/{r['fwmask']}" if "fwmask" in r else ""))
    for key in ("ipproto", "dport", "sport", "uidrange"):
        if key in r:
            out.append(f"{key} {r[key]}")
    if "table" in r:
        out.append(f"lookup {r['table']}")
    else:
        out.append(str(r.get("action", "")))
    if "suppress_prefixlen" in r:
        out.append(f"suppress_prefixlength {r['suppress_prefixlen']}")
    return " ".join(out)


def rules_before_ours(rules: Iterable[Json], ours: list[tuple[int, int, int, str]]
                      ) -> list[str]:
    """One line per routing rule of another tool that comes before (or at) the priority of
    one of ours and matches its packets, so it would take them first. ``ours`` lists
    (priority, mark, table, what) of the rules the daemon installs; a rule exactly like one
    of ours is ours (a running daemon's) and skipped. Same priority counts as before: the
    kernel puts a new rule after existing ones of equal priority."""
    mine = {(p, m, t) for p, m, t, _ in ours}
    out = []
    for r in rules:
        prio = int(r.get("priority", 0))
        if (prio, _int(r.get("fwmark", "-1"), -1), _int(r.get("table", "-1"), -1)) in mine:
            continue
        hit = [(p, what) for p, m, _t, what in ours if prio <= p and rule_takes(r, m)]
        if not hit:
            continue
        whats = " and the ".join(dict.fromkeys(what for _p, what in sorted(hit)))
        out.append(f"ip rule {describe_rule(r)} ({tool_of(r)}) comes before ours "
                   f"({min(hit)[0]}) and would take the {whats}: set rule_priority below "
                   f"{prio}")
    return out


# -- addresses and routes ----------------------------------------------------------------

def overlaps(net: ipaddress.IPv4Network, what: str, addrs: Iterable[Json],
             routes: Iterable[Json], skip_dev: str, skip_tables: set[int]) -> list[str]:
    """Addresses (``ip -j addr``) and routes (``ip -j route show table all``) of the host
    that overlap ``net`` (the agent's vipa_fix as a /32, the anchor's pool), except those
    on the daemon's own TUN ``skip_dev`` and in its own tables; default routes and the
    kernel's local/broadcast routes are not "uses". One line per network."""
    seen: set[str] = set()
    out = []
    for link in addrs:
        dev = str(link.get("ifname", ""))
        if dev == skip_dev:
            continue
        for a in link.get("addr_info", []):
            if a.get("family") != "inet":
                continue
            iface = ipaddress.IPv4Interface(f"{a['local']}/{a.get('prefixlen', 32)}")
            if iface.network.overlaps(net) and str(iface.network) not in seen:
                seen.add(str(iface.network))
                out.append(f"{what} overlaps address {iface} of {dev}: pick another")
    for r in routes:
        dst = str(r.get("dst", ""))
        table = r.get("table", "main")
        if (dst == "default" or r.get("dev") == skip_dev or table == "local"
                or r.get("type") in ("local", "broadcast")
                or _int(table, -1) in skip_tables):
            continue
        try:
            rnet = ipaddress.IPv4Network(dst if "/" in dst else f"{dst}/32", strict=False)
        except ValueError:
            continue
        if rnet.prefixlen and rnet.overlaps(net) and str(rnet) not in seen:
            seen.add(str(rnet))
            where = f" dev {r['dev']}" if "dev" in r else ""
            out.append(f"{what} overlaps route {rnet}{where} (table {table}): pick another")
    return out


# -- firewall ------------------------------------------------------------------------------

def forward_drops(chains: Iterable[Json], own_table: str) -> list[str]:
    """Base chains (``nft -j list chains``) of other tables on the forward hook with
    policy drop: iptables' ``FORWARD`` policy DROP (Docker sets it, ufw's default forward
    policy), firewalld, a hand-written ruleset. Every base chain of a hook must accept a
    packet, so the anchor's relayed traffic dies there unless one of its rules accepts it."""
    out = []
    for c in chains:
        if (c.get("hook") == "forward" and c.get("policy") == "drop"
                and c.get("family") in ("ip", "inet") and c.get("table") != own_table):
            out.append(f"nft chain {c['family']} {c['table']} {c['name']} (forward hook) has "
                       "policy drop (iptables' FORWARD policy DROP: Docker, ufw): the hosts' "
                       "relayed traffic is dropped there unless a rule in it accepts it")
    return out


# -- the drivers -------------------------------------------------------------------------

def _ip_json(*args: str) -> list[Json]:
    """``ip -j -4 ARGS`` as a list of objects; ``addr`` lists every link (``-4`` would
    leave out those without an IPv4 address); [] when ``ip`` fails."""
    family = [] if args[0] == "addr" else ["-4"]
    try:
        r = subprocess.run(["ip", "-j", *family, *args], capture_output=True, text=True,
                           timeout=10, check=False)
        data = json.loads(r.stdout or "[]")
    except (OSError, subprocess.SubprocessError, ValueError):
        return []
    return [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []


def _nft_chains() -> list[Json]:
    try:
        r = subprocess.run(["nft", "-j", "list", "chains"], capture_output=True, text=True,
                           timeout=10, check=False)
        data = json.loads(r.stdout or "{}")
    except (OSError, subprocess.SubprocessError, ValueError):
        return []
    items = data.get("nftables", []) if isinstance(data, dict) else []
    return [i["chain"] for i in items if isinstance(i, dict) and isinstance(i.get("chain"), dict)]


def dry_run(script: str, family: str, table: str) -> str | None:
    """nft's first error for ``script`` checked, not applied (``nft -c``), else None. The
    daemon's own table may exist (it runs): it is replaced in the checked transaction."""
    full = f"add table {family} {table}\ndelete table {family} {table}\n{script}"
    proc = nft._run(["-c", "-f", "-"], full)
    if proc.returncode == 0:
        return None
    # its position is in the script with our two lines in front: the words are enough
    return re.sub(r"^/dev/stdin:\S+ ", "", nft._first_error(proc.stderr))


def _not_root() -> str | None:
    if os.geteuid() == 0:
        return None
    return "not root: the nftables ruleset and firewall were not checked (run check as root)"


def _links(addrs: list[Json]) -> dict[str, list[str]]:
    return {str(a.get("ifname")): [str(i["local"]) for i in a.get("addr_info", [])
                                   if i.get("family") == "inet"] for a in addrs}


def _global6(addrs: list[Json], name: str) -> bool:
    """Whether ``name`` has a global IPv6 address (an IPv6-only access network)."""
    return any(i.get("family") == "inet6" and i.get("scope") == "global"
               for a in addrs if a.get("ifname") == name for i in a.get("addr_info", []))


def check_agent(cfg: AgentConfig) -> Findings:
    f = Findings([], [])
    addrs = _ip_json("addr")
    links = _links(addrs)
    names = [i.name for i in cfg.interfaces]
    for name in names:
        if is_pattern(name):
            if not any(matches(name, dev) for dev in links):
                f.warnings.append(f"no interface matches {name} (yet)")
        elif name not in links:
            f.warnings.append(f"interface {name} does not exist (yet)")
        elif not links[name] and not _global6(addrs, name):
            f.warnings.append(f"interface {name} has no IPv4 or global IPv6 address (yet)")
    if not names:
        names = [str(r["dev"]) for r in _ip_json("route", "show", "default") if "dev" in r]
        if not names:
            f.warnings.append("no interface has a default route and none is listed "
                              "([[interface]])")
    for a in cfg.anchors:
        try:
            socket.getaddrinfo(a.host, a.port, socket.AF_UNSPEC, socket.SOCK_DGRAM)
        except (socket.gaierror, UnicodeError) as e:
            f.warnings.append(f"anchor {a.name}: {a.host} does not resolve (yet): "
                              f"{getattr(e, 'strerror', None) or e}")
    n = max(len(names), 1)
    ours = [(cfg.rule_priority, cfg.fwmark + 1 + k, cfg.table + 1 + k,
             "tunnel packets") for k in range(n)]
    ours.append((cfg.rule_priority + 1, cfg.fwmark, cfg.table, "steered traffic"))
    f.warnings += rules_before_ours(_ip_json("rule", "show"), ours)
    f.warnings += overlaps(ipaddress.IPv4Network(f"{cfg.vipa_fix}/32"),
                           f"vipa_fix {cfg.vipa_fix}", addrs,
                           _ip_json("route", "show", "table", "all"), cfg.tun,
                           set(range(cfg.table, cfg.table + 2 + n)))
    if (why := _not_root()) is not None:
        f.warnings.append(why)
        return f
    rules = [RuleMatch(r.index, r.protocol, str(r.dst) if r.dst else None, r.dst_port,
                       r.src_port, r.uid, r.cgroup) for r in cfg.rules]
    plans = [IfacePlan(k, name, None, 1 + k) for k, name in enumerate(names or ["eth0"])]
    try:
        script = agent_ruleset(tun=cfg.tun, vipa_fix=cfg.vipa_fix, fwmark=cfg.fwmark,
                               ifaces=plans, rules=rules, tun_mtu=cfg.mtu or 1440,
                               mark_mask=cfg.mark_mask)
        err = dry_run(script, "ip", "upmt_agent")
        if err is None and cfg.vipa6_fix:        # IPv6 inside the tunnels: its own table
            script = agent_ruleset(tun=cfg.tun, vipa_fix=cfg.vipa6_fix, fwmark=cfg.fwmark,
                                   ifaces=plans, rules=rules, tun_mtu=cfg.mtu or 1440,
                                   mark_mask=cfg.mark_mask, family="ip6")
            err = dry_run(script, "ip6", "upmt_agent6")
    except SystemSetupError as e:
        err = str(e)
    if err is not None:
        f.errors.append(f"the nftables ruleset is refused: {err}")
    return f


def check_anchor(cfg: AnchorConfig) -> Findings:
    f = Findings([], [])
    addrs = _ip_json("addr")
    links = _links(addrs)
    if cfg.nat_interface is not None and cfg.nat_interface not in links:
        f.warnings.append(f"nat_interface {cfg.nat_interface} does not exist (yet)")
    if cfg.listen_host != "0.0.0.0" and not any(cfg.listen_host in a for a in links.values()):
        f.warnings.append(f"listen address {cfg.listen_host} is not an address of this host "
                          "(yet): the anchor cannot listen on it")
    f.warnings += overlaps(cfg.vipa_pool, f"vipa_pool {cfg.vipa_pool}", addrs,
                           _ip_json("route", "show", "table", "all"), cfg.tun, set())
    if (why := _not_root()) is not None:
        f.warnings.append(why)
        return f
    if cfg.role == "anchor":
        f.warnings += forward_drops(_nft_chains(), "upmt_anchor")
    try:
        script = anchor_ruleset(tun=cfg.tun, pool=str(cfg.vipa_pool), mtu=cfg.mtu,
                                nat_interface=cfg.nat_interface, role=cfg.role,
                                allow_egress=tuple(map(str, cfg.allow_egress)),
                                deny_egress=tuple(map(str, cfg.deny_egress)),
                                max_flows_per_host=cfg.max_flows_per_host)
        err = dry_run(script, "ip", "upmt_anchor")
        if err is None and cfg.vipa6_pool is not None:
            script = anchor_ruleset(tun=cfg.tun, pool=str(cfg.vipa6_pool), mtu=cfg.mtu,
                                    nat_interface=cfg.nat_interface, role=cfg.role,
                                    allow_egress=tuple(map(str, cfg.allow_egress)),
                                    deny_egress=tuple(map(str, cfg.deny_egress)),
                                    max_flows_per_host=cfg.max_flows_per_host, family="ip6")
            err = dry_run(script, "ip6", "upmt_anchor6")
    except SystemSetupError as e:
        err = str(e)
    if err is not None:
        f.errors.append(f"the nftables ruleset is refused: {err}")
    return f
