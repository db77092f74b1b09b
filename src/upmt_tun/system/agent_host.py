"""Host set-up of the agent: steer the configured flows into the TUN, and undo it.

See DESIGN.md "Marks, tables, priorities". With fwmark F and table T:

- nft table ``ip upmt_agent`` marks the first packet of a new connection matching
  rule i with ct mark ``((i + 1) << 16) | F`` and gives the packets of that connection
  the packet mark F (the ct mark under the mark mask M, 0xffff by default: the rule
  index never shows in a packet mark, where other tools' routing rules would read it:
  Tailscale's ``fwmark 0x80000/0xff0000``); the tunnel sockets' own packets (mark
  F+1+k) return before any rule.
- ``ip rule`` prio P (5200 by default: before Tailscale's 5210-5270 and wg-quick's
  3276x) sends mark F+1+k to table T+1+k (``default via gw dev iface k``), prio P+1
  sends mark F to table T (``default dev tun`` and a last-resort blackhole).
- Incoming tunnel packets get mark F+1+k and replies out of the TUN get their ct
  mark back, so strict rp_filter (with ``src_valid_mark=1``) accepts both.
- An interface whose tunnel socket speaks IPv6 (it has a global IPv6 address: the
  socket is dual-stack) gets the same over IPv6: ``ip -6 rule`` prio P sends mark F+1+k
  to table T+1+k, which holds ``default via <its IPv6 gateway> dev iface`` too (the
  IPv6 gateway is usually link-local, from router advertisements).
- Packets into the TUN are SNATed to ``vipa_fix`` and their TCP MSS is clamped.
- Packets out of the TUN that conntrack does not tie to a connection this host
  opened (not established or related: new, invalid, untracked) are dropped and
  counted (counter ``unsolicited_from_tun``): the anchor filters them already, this
  is defence in depth against a compromised or misconfigured one.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from socket import AF_INET, AF_INET6

from upmt_tun.hotplug import is_pattern
from upmt_tun.system import netlink, nft
from upmt_tun.system.errors import SystemSetupError
from upmt_tun.system.netlink import Route, Rule
from upmt_tun.system.sysctl import SysctlSaver, iface_key
from upmt_tun.system.undo import UndoStack

log = logging.getLogger(__name__)

NFT_FAMILY = "ip"
NFT_TABLE = "upmt_agent"
NFT_TABLE6 = "upmt_agent6"   # family ip6: the same steering for IPv6 (vipa6_fix)
PRIO_SOCKETS = 5200          # default; steered traffic at PRIO_SOCKETS + 1
PRIO_STEERED = PRIO_SOCKETS + 1
BLACKHOLE_METRIC = 0xFFFFFFFF
# IPv6 inside the tunnels: a default route into the TUN in the main table, after any the
# host has (RA gives 1024): an application on an IPv4-only access network can open an
# IPv6 socket at all (the output hook marks and reroutes only what routing allowed)
FALLBACK6_METRIC = 0x7FFFFFFF
MARK_MASK = 0xFFFF           # bits of the ct mark holding F (the rule index is above them)
CGROUP_ROOT = Path("/sys/fs/cgroup")  # where nft resolves "socket cgroupv2" paths
PROTOCOLS = ("tcp", "udp", "icmp", "any")
COUNTER_UNSOLICITED = "unsolicited_from_tun"   # nft counter of the drop above
MESH_POOLS = "mesh_pools"    # nft set: sources allowed to open connections from the TUN
MAIN_TABLE = 254
LINK_ONLY6 = "fe80::/10, ff00::/8"   # IPv6 destinations never steered


@dataclass(frozen=True)
class RuleMatch:
    """One ``[[rule]]`` of the config; ``index`` is its position in the file."""

    index: int
    protocol: str  # "tcp" | "udp" | "icmp" | "any"
    dst: str | None  # CIDR like "198.51.100.0/24"
    dst_port: tuple[int, int] | None  # inclusive range; single port = (p, p)
    src_port: tuple[int, int] | None
    uid: int | None
    cgroup: str | None  # path under the cgroup v2 root, e.g. "user.slice/foo"


@dataclass(frozen=True)
class IfacePlan:
    """One access interface: mark F+1+index, table T+1+index."""

    index: int
    name: str
    gateway: str | None  # None: on-link default route (dev iface, no gateway)
    socket_port: int  # local UDP port of this interface's tunnel socket
    waiting: bool = False  # no address or carrier at start: route made when it comes up
    v6: bool = False  # its socket speaks IPv6 too: an IPv6 default route and ip -6 rule
    gateway6: str | None = None  # None: on-link IPv6 default route
    absent: bool = False   # no device behind the entry at start (hotplug: made when one comes)


PAUSED_CHAIN = "paused"   # the chain that names a table as the stub a restart leaves


def paused_ruleset(*, fwmark: int, mark_mask: int = MARK_MASK, family: str = NFT_FAMILY
                   ) -> str:
    """What an agent stopping *for a restart* leaves in place of its table (``family``
    "ip6": of ``ip6 upmt_agent6``) until the next start replaces it in one transaction,
    or ``cleanup`` removes it.

    The connections it steered keep their ct mark, so the stub still gives their packets
    mark F: the ip rule (kept too) sends them to table T, where only the blackhole is
    left with the TUN gone, and they are dropped. Without it they would leave by normal
    routing, from the access address the application's socket was given and not
    translated to the VIpA: the correspondent answers such a segment with a reset, which
    the access NAT brings back to the application, and the connection dies. Dropped, they
    are retransmitted until the restarted agent carries them again. New connections are
    not steered by the stub: they are routed as if no agent ran."""
    return nft.table_script(family, NFT_TABLE6 if family == "ip6" else NFT_TABLE, [
        (PAUSED_CHAIN, None, []),
        ("output", "type route hook output priority mangle",
         [f"ct mark and {MARK_MASK:#x} == {fwmark:#x} meta mark set ct mark and "
          f"{mark_mask:#x}"])])


def is_paused() -> bool:
    """True when our (IPv4) nft table is the stub :func:`paused_ruleset` makes."""
    return nft.chain_exists(NFT_FAMILY, NFT_TABLE, PAUSED_CHAIN)


def rule_ct_mark(rule_index: int, fwmark: int) -> int:
    """The ct mark given to connections steered by rule ``rule_index``."""
    return ((rule_index + 1) << 16) | fwmark


def _cgroup_mounts(mounts: str = "/proc/self/mounts") -> list[Path]:
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return []
    return [Path(f.split()[1]) for f in lines if len(f.split()) > 2 and f.split()[2] == "cgroup2"]


def cgroup_match(path: str) -> str:
    """nft ``socket cgroupv2`` match for ``path`` (relative to the cgroup v2 root).

    nft resolves the path under /sys/fs/cgroup; on a hybrid hierarchy the v2 root is
    a subdirectory (``unified``), which is prepended while the level stays the same.
    """
    parts = [p for p in path.strip("/").split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise SystemSetupError(f"bad cgroup path {path!r}")
    root = next((m for m in _cgroup_mounts() if m == CGROUP_ROOT), None)
    root = root or next((m for m in _cgroup_mounts() if CGROUP_ROOT in m.parents), None)
    if root is None:
        raise SystemSetupError(f"cgroup rule {path!r}: no cgroup v2 under {CGROUP_ROOT}")
    if not root.joinpath(*parts).is_dir():
        raise SystemSetupError(f"cgroup {path!r} does not exist under {root}")
    nft_path = "/".join([*root.relative_to(CGROUP_ROOT).parts, *parts])
    return f"socket cgroupv2 level {len(parts)} {nft.quote(nft_path)}"


def _ports(keyword: str, ports: tuple[int, int]) -> str:
    low, high = ports
    if not 0 <= low <= high <= 0xFFFF:
        raise SystemSetupError(f"bad port range {low}-{high}")
    return f"th {keyword} {low}" if low == high else f"th {keyword} {low}-{high}"


def rule_family(rule: RuleMatch) -> int | None:
    """The IP version a rule's ``dst`` limits it to (None: no dst, both)."""
    if rule.dst is None:
        return None
    try:
        return ipaddress.ip_network(rule.dst, strict=False).version
    except ValueError:
        raise SystemSetupError(f"rule {rule.index}: bad dst {rule.dst!r}") from None


def rule_match(rule: RuleMatch, family: str = NFT_FAMILY) -> str:
    """The nft match expression of one config rule (may be empty: match everything), for
    the ``ip`` or the ``ip6`` table (where "icmp" is ICMPv6)."""
    if rule.protocol not in PROTOCOLS:
        raise SystemSetupError(f"rule {rule.index}: unknown protocol {rule.protocol!r}")
    parts: list[str] = []
    if rule.dst is not None:
        try:
            net = ipaddress.ip_network(rule.dst, strict=False)
        except ValueError:
            raise SystemSetupError(f"rule {rule.index}: bad dst {rule.dst!r}") from None
        parts.append(f"{'ip6' if net.version == 6 else 'ip'} daddr {net}")
    has_ports = rule.dst_port is not None or rule.src_port is not None
    if rule.protocol == "icmp" and family == "ip6":
        parts.append("meta l4proto ipv6-icmp")
    elif rule.protocol != "any":
        parts.append(f"meta l4proto {rule.protocol}")
    elif has_ports:
        parts.append("meta l4proto { tcp, udp }")   # ports: TCP and UDP only
    if has_ports:
        if rule.protocol not in ("tcp", "udp", "any"):
            raise SystemSetupError(f"rule {rule.index}: ports need protocol tcp, udp or any")
        if rule.dst_port is not None:
            parts.append(_ports("dport", rule.dst_port))
        if rule.src_port is not None:
            parts.append(_ports("sport", rule.src_port))
    if rule.uid is not None:
        parts.append(f"meta skuid {int(rule.uid)}")
    if rule.cgroup is not None:
        parts.append(cgroup_match(rule.cgroup))
    return " ".join(parts)


def output_rules(*, fwmark: int, ifaces: list[IfacePlan], rules: list[RuleMatch],
                 mark_mask: int = MARK_MASK, family: str = NFT_FAMILY) -> list[str]:
    """The rules of chain ``output``: the only chain that depends on the config's rules
    (``reload`` replaces just this chain). In list order, first match wins; a rule's
    ct mark holds its ``index`` (its mark slot, reload.py). ``family`` "ip6": the chain
    of table ``ip6 upmt_agent6`` (rules whose dst is IPv4 left out)."""
    six = family == "ip6"
    version = 6 if six else 4
    mask = f"{MARK_MASK:#x}"
    output = [f"meta mark and {mask} == {fwmark + 1 + i.index:#x} return" for i in ifaces]
    if six:     # link-local and multicast (ND, MLD, mDNS, ...) belong to their link
        output.append(f"ip6 daddr {{ {LINK_ONLY6} }} return")
        output.append("ip6 saddr fe80::/10 return")
    for rule in rules:
        if rule_family(rule) not in (None, version):
            continue
        match = rule_match(rule, family)
        output.append(
            f"ct state new ct mark and {mask} != {fwmark:#x} {match} "
            f"ct mark set {rule_ct_mark(rule.index, fwmark):#x}".replace("  ", " ")
        )
    output.append(f"ct mark and {mask} == {fwmark:#x} meta mark set ct mark and "
                  f"{mark_mask:#x}")
    return output


def prerouting_rules(*, tun: str, fwmark: int, ifaces: list[IfacePlan], tun_mtu: int | None,
                     mark_mask: int = MARK_MASK, family: str = NFT_FAMILY) -> list[str]:
    """The rules of chain ``prerouting``: one per access interface (its socket's port
    gets its mark), then the TUN's. ``reload`` replaces this chain when interfaces are
    added or removed (in the transaction that replaces ``output``)."""
    six = family == "ip6"
    q_tun = nft.quote(tun)
    mask = f"{MARK_MASK:#x}"
    packet_mark = f"ct mark and {mark_mask:#x}"     # F alone: no rule index in packet marks
    # a pattern entry (usb*) has no one name for iifname: its port is its own, and its
    # socket, bound to the device behind the entry, takes only what arrives there
    prerouting = [
        ("" if is_pattern(i.name) else f"iifname {nft.quote(i.name)} ")
        + f"udp dport {i.socket_port} meta mark set {fwmark + 1 + i.index:#x}"
        for i in ifaces
    ]
    # out of the TUN: only replies to connections opened here, and ICMP errors about
    # them (related: PMTU); no connection into the host through its anchor. Mesh peers'
    # new connections are the exception: they come from their VIpAs in a mesh anchor's
    # pool (set MESH_POOLS, filled when an anchor says mesh), authenticated end to end.
    mesh_ok = "" if six else f"ip saddr != @{MESH_POOLS} "
    prerouting.append(f"iifname {q_tun} {mesh_ok}"
                      f"ct state != {{ established, related }} "
                      f'counter name "{COUNTER_UNSOLICITED}" drop')
    prerouting.append(f"iifname {q_tun} ct mark and {mask} == {fwmark:#x} "
                      f"meta mark set {packet_mark}")
    if tun_mtu is not None and tun_mtu > 60:
        mss = tun_mtu - (60 if six else 40)      # IPv6 header 40, TCP 20
        prerouting.append(
            f"iifname {q_tun} tcp flags syn tcp option maxseg size > {mss} "
            f"tcp option maxseg size set {mss}"
        )
    return prerouting


def agent_ruleset(
    *,
    tun: str,
    vipa_fix: str,
    fwmark: int,
    ifaces: list[IfacePlan],
    rules: list[RuleMatch],
    tun_mtu: int | None = None,
    mark_mask: int = MARK_MASK,
    family: str = NFT_FAMILY,
) -> str:
    """The nft script creating table ``ip upmt_agent`` (fails if it already exists), or
    with ``family`` "ip6" table ``ip6 upmt_agent6``: the same for IPv6 (``vipa_fix`` then
    being vipa6_fix; rules whose dst is of the other family left out; no mesh pools)."""
    six = family == "ip6"
    q_tun = nft.quote(tun)
    output = output_rules(fwmark=fwmark, ifaces=ifaces, rules=rules, mark_mask=mark_mask,
                          family=family)
    prerouting = prerouting_rules(tun=tun, fwmark=fwmark, ifaces=ifaces, tun_mtu=tun_mtu,
                                  mark_mask=mark_mask, family=family)
    try:
        snat = str(ipaddress.IPv6Address(vipa_fix) if six else ipaddress.IPv4Address(vipa_fix))
    except ValueError:
        raise SystemSetupError(f"bad vipa{'6' if six else ''}_fix {vipa_fix!r}") from None
    chains = {
        "output": ("type route hook output priority mangle", output),
        "prerouting": ("type filter hook prerouting priority mangle", prerouting),
        "mangle_postrouting": (
            "type filter hook postrouting priority mangle",
            [f"oifname {q_tun} tcp flags syn tcp option maxseg size set rt mtu"],
        ),
        "nat_postrouting": (
            "type nat hook postrouting priority srcnat",
            [f"oifname {q_tun} snat to {snat}"],
        ),
    }
    table = NFT_TABLE6 if six else NFT_TABLE
    lines = [f"create table {family} {table}", f"table {family} {table} {{",
             f"\tcounter {COUNTER_UNSOLICITED} {{", "\t}"]
    if not six:
        lines += [f"\tset {MESH_POOLS} {{", "\t\ttype ipv4_addr; flags interval;", "\t}"]
    for name, (hook, body) in chains.items():
        lines.append(f"\tchain {name} {{")
        lines.append(f"\t\t{hook}; policy accept;")
        lines.extend(f"\t\t{line}" for line in body)
        lines.append("\t}")
    lines.append("}")
    return "\n".join(lines) + "\n"


class AgentHost:
    """Installs (``setup``) and removes (``teardown``) the agent's host configuration."""

    def __init__(
        self,
        *,
        tun: str,
        vipa_fix: str,
        fwmark: int,
        table: int,
        ifaces: list[IfacePlan],
        rules: list[RuleMatch],
        state_file: str | None = None,
        mark_mask: int = MARK_MASK,
        priority: int = PRIO_SOCKETS,
        devices: dict[str, str] | None = None,
        vipa6_fix: str = "",
    ) -> None:
        """``devices``: entry -> the device behind it now, where that is not the entry's
        own name (a pattern's match); :meth:`bind_device` changes it at run time."""
        top = fwmark + 1 + max((i.index for i in ifaces), default=0)
        if not 0 < fwmark or top > MARK_MASK:
            raise SystemSetupError(f"fwmark {fwmark:#x}: F .. F+1+n must fit in 16 bits")
        if mark_mask & ~MARK_MASK or any(m & ~mark_mask for m in range(fwmark, top + 1)):
            raise SystemSetupError(f"mark_mask {mark_mask:#x}: must lie in 0xffff and hold "
                                   f"the marks {fwmark:#x}..{top:#x}")
        if not 0 < priority < 32765:
            raise SystemSetupError(f"rule priority {priority} must be in 1..32764")
        if any(r.index < 0 or r.index + 1 > MARK_MASK for r in rules):
            raise SystemSetupError("rule index out of range for the ct mark")
        if not 0 < table or table + 1 + len(ifaces) >= 0xFFFFFFFF or table in (253, 254, 255):
            raise SystemSetupError(f"routing table {table} is not usable")
        self.tun = tun
        self.vipa_fix = vipa_fix
        self.vipa6_fix = vipa6_fix            # "": no IPv6 steering
        self.fwmark = fwmark
        self.table = table
        self.ifaces = list(ifaces)
        self.rules = list(rules)
        self.mark_mask = mark_mask
        self.devices = {i.name: i.name for i in self.ifaces if not is_pattern(i.name)}
        self.devices.update(devices or {})
        self.prio_sockets, self.prio_steered = priority, priority + 1
        self.tun_mtu: int | None = None       # read at setup (the MSS clamp of prerouting)
        self._undo = UndoStack()
        self._sysctl = SysctlSaver(state_file)  # survives a kill: next start restores
        self._adopt = False                   # cleanup_leftovers(keep_steering=True) ran
        # set before teardown: a stop for a restart leaves paused_ruleset's stub, the
        # steered mark's ip rules and table T's blackholes
        self.pause_on_teardown = False

    def _routing_rules(self) -> list[Rule]:
        rules = [
            Rule(self.prio_sockets, self.table + 1 + i.index, self.fwmark + 1 + i.index,
                 self.mark_mask)
            for i in self.ifaces
        ]
        rules.append(Rule(self.prio_steered, self.table, self.fwmark, self.mark_mask))
        rules += [Rule(self.prio_sockets, self.table + 1 + i.index, self.fwmark + 1 + i.index,
                       self.mark_mask, family=AF_INET6) for i in self.ifaces if i.v6]
        return rules

    def _is_ours(self, rule: Rule) -> bool:
        """A rule a run with our fwmark/table left behind (any number of interfaces)."""
        if rule.fwmask != self.mark_mask or rule.fwmark is None:
            return False
        if rule.priority == self.prio_steered:
            return rule.table == self.table and rule.fwmark == self.fwmark
        offset = rule.table - self.table
        return (rule.priority == self.prio_sockets and offset >= 1
                and rule.fwmark == self.fwmark + offset)

    def _steering(self) -> tuple[list[Rule], list[Route]]:
        """The ip rules and routes that keep steered connections away from normal routing
        while no TUN is there: the steered mark's rules and table T's blackholes (what a
        stop for a restart leaves, and a start takes over)."""
        rules = [Rule(self.prio_steered, self.table, self.fwmark, self.mark_mask, family)
                 for family in (AF_INET, AF_INET6)]
        routes = [Route(self.table, blackhole=True, metric=BLACKHOLE_METRIC),
                  Route(self.table, blackhole=True, metric=BLACKHOLE_METRIC, dst="::/0",
                        family=AF_INET6)]
        return rules, routes

    def cleanup_leftovers(self, *, keep_steering: bool = False) -> None:
        """Remove what a killed earlier run left: nft table, ip rules, routes of our tables,
        and put back the sysctls it had changed (from the state file, if one is used).

        ``keep_steering`` (a start, :meth:`setup` follows; or ``cleanup --keep-paused`` of
        what a stop for a restart left): leave the nft tables, the steered mark's ip rules
        and table T's blackholes for ``setup`` to take over (the tables replaced in one
        transaction). Removing them first would let the connections that outlived the
        earlier run leave by normal routing, untranslated, for a moment: their
        correspondents answer with resets (:func:`paused_ruleset`)."""
        self._sysctl.restore_leftovers()
        self._adopt = keep_steering
        kept = self._steering()[0] if keep_steering else []
        if not keep_steering:
            nft.delete_table(NFT_FAMILY, NFT_TABLE)
        ipv6 = True
        try:
            if not keep_steering:
                nft.delete_table("ip6", NFT_TABLE6)
            rules = netlink.list_rules()    # IPv4 and IPv6
        except SystemSetupError as e:       # a kernel without IPv6: nothing can be left
            log.debug("no IPv6 to clean up: %s", e)
            rules, ipv6 = netlink.list_rules(AF_INET), False
        tables = {self.table, *(self.table + 1 + i.index for i in self.ifaces)}
        for rule in rules:
            if not self._is_ours(rule) or rule in kept:
                continue
            netlink.delete_rule(rule)
            tables.add(rule.table)
            log.info("removed leftover %s", rule.describe())
        if keep_steering:                   # table T: its blackholes stay (the TUN's
            tables.discard(self.table)      # route went with the killed run's TUN)
        for table in sorted(tables):
            if count := netlink.flush_table(table, None if ipv6 else AF_INET):
                log.info("removed %d leftover route(s) of table %d", count, table)

    def setup(self) -> None:
        """Install everything; on failure undo what was done and raise SystemSetupError.

        The TUN must exist and be up (``netlink.configure_tun``) and the access
        interfaces must exist; run ``cleanup_leftovers`` first.
        """
        self._undo.run("agent host", self._setup)

    def _replacing(self, family: str, table: str) -> str:
        """The head of the nft script that makes table ``family table``: it replaces, in
        the same transaction, one left by an earlier run that :meth:`cleanup_leftovers`
        kept; otherwise the table must not exist."""
        if nft.table_exists(family, table):
            if not self._adopt:
                raise SystemSetupError(
                    f"nft table {family} {table} exists (another agent, or a killed one:"
                    " cleanup_leftovers removes it)")
            log.info("taking over nft table %s %s of the earlier run", family, table)
            return f"add table {family} {table}\ndelete table {family} {table}\n"
        return ""

    def _keep(self, what: str, undo: Callable[[], object]) -> None:
        """Push ``undo`` for a part of the steering a stop for a restart leaves."""
        self._undo.push(what, lambda: None if self.pause_on_teardown else undo())

    def _add_steering(self, rule: Rule, blackhole: Route) -> None:
        """The steered mark's ip rule and table T's blackhole, or (after a kept cleanup)
        those of the earlier run taken over: the rule is never missing for a moment (the
        blackhole is remade: the TUN's route is in table T before it, so nothing can
        fall through)."""
        if self._adopt and rule in netlink.list_rules(rule.family):
            log.info("taking over %s of the earlier run", rule.describe())
        else:
            netlink.add_rule(rule)
        self._keep(rule.describe(), partial(netlink.delete_rule, rule))
        if self._adopt:
            netlink.delete_route(blackhole)
        added = netlink.add_route(blackhole)
        self._keep(added.describe(), partial(netlink.delete_route, added))

    def _setup(self) -> None:
        head = self._replacing(NFT_FAMILY, NFT_TABLE)
        tun = netlink.interface_info(self.tun)
        self.tun_mtu = tun.mtu
        present = [i for i in self.ifaces if not i.absent]
        indexes = {i.name: netlink.link_index(self.devices[i.name]) for i in present}
        script = agent_ruleset(
            tun=self.tun,
            vipa_fix=self.vipa_fix,
            fwmark=self.fwmark,
            ifaces=self.ifaces,
            rules=self.rules,
            tun_mtu=tun.mtu,
            mark_mask=self.mark_mask,
        )

        self._undo.push("sysctls", self._sysctl.restore)
        for name in [self.tun, *(self.devices[i.name] for i in present)]:
            self._sysctl.set(iface_key("net.ipv4.conf", name, "src_valid_mark"), "1")

        for i in self.ifaces:      # undo = flush: the route may be re-made on link changes
            table = self.table + 1 + i.index
            self._undo.push(f"routes of table {table}", partial(netlink.flush_table, table))
            if i.absent:           # made when a device comes (bind_device, restore_iface_route)
                continue
            try:
                netlink.add_route(Route(table, oif=indexes[i.name], gateway=i.gateway,
                                        dev=self.devices[i.name]))
                if i.v6:
                    netlink.add_route(Route(table, oif=indexes[i.name], gateway=i.gateway6,
                                            dev=self.devices[i.name], family=AF_INET6))
            except SystemSetupError as e:
                if not i.waiting:
                    raise
                # a down interface takes no route: InterfaceState makes it when it comes up
                log.info("interface %s not up yet: its route waits (%s)", i.name, e)
        added = netlink.add_route(Route(self.table, oif=tun.index, dev=self.tun))
        self._undo.push(added.describe(), partial(netlink.delete_route, added))
        steered, blackholes = self._steering()
        self._add_steering(steered[0], blackholes[0])
        for rule in self._routing_rules():
            if rule != steered[0]:
                netlink.add_rule(rule)
                self._undo.push(rule.describe(), partial(netlink.delete_rule, rule))

        nft.apply(head + script)
        self._undo.push(f"nft table {NFT_TABLE}", partial(self._remove_table, NFT_FAMILY))
        if self.vipa6_fix:
            self._setup6(tun)
        elif self._adopt:       # IPv6 inside was on in the earlier run, not now
            self._drop_steering6()
        log.info("agent host set up: %d rule(s), %d interface(s)%s", len(self.rules),
                 len(indexes), ", IPv6 inside" if self.vipa6_fix else "")

    def _setup6(self, tun: netlink.IfaceInfo) -> None:
        """IPv6 inside the tunnels: table T's IPv6 default into the TUN (and blackhole),
        the main table's fallback default (``FALLBACK6_METRIC``), ``ip -6 rule`` for the
        steered mark, and nft table ``ip6 upmt_agent6``."""
        head = self._replacing("ip6", NFT_TABLE6)
        routes = [Route(self.table, oif=tun.index, dev=self.tun, dst="::/0", family=AF_INET6),
                  Route(MAIN_TABLE, oif=tun.index, dev=self.tun, dst="::/0",
                        metric=FALLBACK6_METRIC, family=AF_INET6)]
        for route in routes:
            added = netlink.add_route(route)
            self._undo.push(added.describe(), partial(netlink.delete_route, added))
        steered, blackholes = self._steering()
        self._add_steering(steered[1], blackholes[1])
        script = agent_ruleset(tun=self.tun, vipa_fix=self.vipa6_fix, fwmark=self.fwmark,
                               ifaces=self.ifaces, rules=self.rules, tun_mtu=tun.mtu,
                               mark_mask=self.mark_mask, family="ip6")
        nft.apply(head + script)
        self._undo.push(f"nft table ip6 {NFT_TABLE6}", partial(self._remove_table, "ip6"))

    def _drop_steering6(self) -> None:
        """What an earlier run with IPv6 inside left for IPv6 and this one does not use."""
        try:
            nft.delete_table("ip6", NFT_TABLE6)
            rules, routes = self._steering()
            netlink.delete_rule(rules[1])
            netlink.delete_route(routes[1])
        except SystemSetupError as e:       # a kernel without IPv6: nothing can be left
            log.debug("no IPv6 steering to remove: %s", e)

    def _remove_table(self, family: str) -> None:
        """Teardown of an nft table: deleted, or (a stop for a restart) replaced by the
        paused stub in one transaction, so that no steered packet leaves by normal
        routing in between."""
        table = NFT_TABLE6 if family == "ip6" else NFT_TABLE
        if self.pause_on_teardown:
            try:
                nft.apply(f"add table {family} {table}\ndelete table {family} {table}\n"
                          + paused_ruleset(fwmark=self.fwmark, mark_mask=self.mark_mask,
                                           family=family))
                log.info("stopping for a restart: connections steered by nft table %s %s "
                         "held until the next start (`upmt-agent cleanup` removes it)",
                         family, table)
                return
            except SystemSetupError as e:
                log.warning("cannot hold steered connections for the restart: %s", e)
        nft.delete_table(family, table)

    def rules_script(self, rules: list[RuleMatch], ifaces: list[IfacePlan] | None = None
                     ) -> str:
        """The nft script that replaces the rules of chain ``output`` by ``rules``: one
        transaction (flush and add). Connections keep their ct marks (conntrack's, not
        the table's), so established ones stay steered whatever changed here. With
        ``ifaces`` (interfaces added or removed): chain ``prerouting`` too, and the
        output chain's per-interface returns, in the same transaction."""
        if any(r.index < 0 or r.index + 1 > MARK_MASK for r in rules):
            raise SystemSetupError("rule index out of range for the ct mark")
        lines = []
        tables = [(NFT_FAMILY, NFT_TABLE)] + ([("ip6", NFT_TABLE6)] if self.vipa6_fix else [])
        plans = self.ifaces if ifaces is None else ifaces
        for family, table in tables:        # IPv4's and IPv6's in the same transaction
            head = f"{family} {table} output"
            lines.append(f"flush chain {head}")
            lines += [f"add rule {head} {r}" for r in output_rules(
                fwmark=self.fwmark, ifaces=plans, rules=rules,
                mark_mask=self.mark_mask, family=family)]
            if ifaces is not None:
                head = f"{family} {table} prerouting"
                lines.append(f"flush chain {head}")
                lines += [f"add rule {head} {r}" for r in prerouting_rules(
                    tun=self.tun, fwmark=self.fwmark, ifaces=plans, tun_mtu=self.tun_mtu,
                    mark_mask=self.mark_mask, family=family)]
        return "\n".join(lines) + "\n"

    def _check_iface(self, plan: IfacePlan) -> None:
        mark, table = self.fwmark + 1 + plan.index, self.table + 1 + plan.index
        if mark > MARK_MASK or mark & ~self.mark_mask:
            raise SystemSetupError(f"interface {plan.name}: its mark {mark:#x} does not fit "
                                   f"mark_mask {self.mark_mask:#x} (restart the agent)")
        if table >= 0xFFFFFFFF or table in (253, 254, 255):
            raise SystemSetupError(f"interface {plan.name}: routing table {table} is not "
                                   "usable (restart the agent)")

    def _iface_rules(self, plan: IfacePlan) -> list[Rule]:
        mark, table = self.fwmark + 1 + plan.index, self.table + 1 + plan.index
        rules = [Rule(self.prio_sockets, table, mark, self.mark_mask)]
        if plan.v6:
            rules.append(Rule(self.prio_sockets, table, mark, self.mark_mask,
                              family=AF_INET6))
        return rules

    def change(self, rules: list[RuleMatch], added: list[IfacePlan], removed: list[str],
               *, dry_run: bool = False) -> None:
        """``reload`` with interfaces added or removed: the added ones' ip rules (their
        tables stay empty until a device with an address comes: :meth:`bind_device`,
        :meth:`restore_iface_route`), then one nft transaction (dry-run first) replacing
        chains ``output`` and ``prerouting``, then the removed ones' ip rules and routes.
        A failure before the transaction took undoes the ip rules it added and raises
        SystemSetupError; the host is then as before."""
        gone = set(removed)
        for p in added:
            self._check_iface(p)
        plans = [i for i in self.ifaces if i.name not in gone] + list(added)
        script = self.rules_script(rules, plans)
        nft.check(script)
        if dry_run:
            return
        made: list[Rule] = []
        try:
            for p in added:
                for rule in self._iface_rules(p):
                    netlink.add_rule(rule)
                    made.append(rule)
            nft.apply(script)
        except SystemSetupError:
            for rule in made:
                netlink.delete_rule(rule)
            raise
        for p in added:            # teardown: its rules, its table (whatever route it has)
            table = self.table + 1 + p.index
            self._undo.push(f"routes of table {table}", partial(netlink.flush_table, table))
            for rule in self._iface_rules(p):
                self._undo.push(rule.describe(), partial(netlink.delete_rule, rule))
        for p in [i for i in self.ifaces if i.name in gone]:
            for rule in self._iface_rules(p):
                netlink.delete_rule(rule)
            netlink.flush_table(self.table + 1 + p.index)
            self.devices.pop(p.name, None)
        self.ifaces, self.rules = plans, list(rules)
        log.info("interfaces changed: %s", ", ".join(
            [f"{p.name} added" for p in added] + [f"{n} removed" for n in removed]))

    def replace_rules(self, rules: list[RuleMatch], *, dry_run: bool = False) -> None:
        """``reload``: steer new connections by ``rules`` from now on (dry-run first: a
        script nft refuses raises SystemSetupError and changes nothing)."""
        script = self.rules_script(rules)
        nft.check(script)
        if not dry_run:
            nft.apply(script)
            self.rules = list(rules)
            log.info("nft rules replaced: %d rule(s)", len(rules))

    def restore_iface_route(self, name: str, gateway: str | None) -> None:
        """After an access interface came back (the kernel removed its routes when it went
        down): re-make the default route of its table, through ``gateway`` (None: on-link)."""
        plan = next((i for i in self.ifaces if i.name == name), None)
        device = self.devices.get(name)
        if plan is None or device is None:
            return
        table = self.table + 1 + plan.index
        netlink.flush_table(table)
        index = netlink.link_index(device)
        netlink.add_route(Route(table, oif=index, gateway=gateway, dev=device))
        if plan.v6:     # its IPv6 gateway as the main table has it now (RA), else as at start
            gw6 = netlink.interface_info(device).gateway6 or plan.gateway6
            netlink.add_route(Route(table, oif=index, gateway=gw6, dev=device, family=AF_INET6))

    def bind_device(self, name: str, device: str | None) -> None:
        """Entry ``name`` is device ``device`` from now on (hotplug: created after the
        start, or deleted and created again), None: no device. A new device gets
        ``src_valid_mark`` (put back at teardown, if it still exists then); its table's
        route is made by :meth:`restore_iface_route` once it has an address, and the
        kernel removed the old one with the old device."""
        if device is None:
            self.devices.pop(name, None)
            return
        self.devices[name] = device
        self._sysctl.set(iface_key("net.ipv4.conf", device, "src_valid_mark"), "1")

    def add_mesh_pool(self, pool: str, mtu: int) -> None:
        """An anchor made this host a mesh host: route its pool into the TUN (main table,
        and table T for flows a rule steers) with the relay's smaller MTU, and let the
        pool's hosts open connections here. Teardown removes exactly these."""
        net = ipaddress.IPv4Network(pool)
        tun = netlink.link_index(self.tun)
        for table in (MAIN_TABLE, self.table):
            added = netlink.add_route(Route(table, oif=tun, dev=self.tun, dst=str(net),
                                            mtu=mtu))
            self._undo.push(added.describe(), partial(netlink.delete_route, added))
        nft.apply(f"add element {NFT_FAMILY} {NFT_TABLE} {MESH_POOLS} {{ {net} }}\n")
        log.info("mesh pool %s routed into %s (mtu %d)", net, self.tun, mtu)

    def teardown(self) -> None:
        """Undo everything ``setup`` did (newest first). Idempotent; never raises. What
        :meth:`cleanup_leftovers` kept of an earlier run for a setup that never completed
        (the start failed) goes too: it would steer connections into nothing."""
        taken_over = bool(self._undo)
        self._undo.unwind()
        if self._adopt and not taken_over:
            self._adopt = False
            try:
                self.cleanup_leftovers()
            except SystemSetupError as e:
                log.warning("could not remove what the earlier run left: %s", e)
