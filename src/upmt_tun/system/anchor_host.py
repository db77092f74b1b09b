"""Host set-up of the anchor (or fixed host): TUN address, forwarding, masquerade.

The TUN holds the first address of the VIPA pool with the pool's prefix length, so
the kernel routes the pool to the TUN. Role ``anchor`` also forwards and
masquerades the pool out of ``nat_interface`` (nft table ``ip upmt_anchor``) and
clamps the TCP MSS of forwarded SYNs to the TUN MTU; role ``fixed-host`` only
configures the TUN.

Both roles forward into the TUN only replies to connections the hosts opened
(conntrack established/related): the pool is routable from the anchor's LAN and
its upstream, which are untrusted, and a packet in the TUN reaches a mobile host
past its NAT. Role ``anchor`` also drops what conntrack cannot track (invalid,
untracked) before it is forwarded from the TUN: masquerade needs a connection,
so such packets would leave with the host's VIpA as their source.
"""

from __future__ import annotations

import ipaddress
import logging
from functools import partial

from upmt_tun.system import netlink, nft
from upmt_tun.system.errors import SystemSetupError
from upmt_tun.system.sysctl import SysctlSaver
from upmt_tun.system.undo import UndoStack

log = logging.getLogger(__name__)

NFT_FAMILY = "ip"
NFT_TABLE = "upmt_anchor"
NFT_TABLE6 = "upmt_anchor6"   # family ip6: the same for the IPv6 pool (vipa6_pool)
ROLES = ("anchor", "fixed-host")
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def egress_nets(cidrs: list[str] | tuple[str, ...], version: int
                ) -> list[ipaddress.IPv4Network] | list[ipaddress.IPv6Network]:
    """The egress networks of one IP version, normalised: an IPv4-mapped IPv6 network
    (``::ffff:127.0.0.1``) counts as the IPv4 network it names, and every IPv4 network
    also stands for its mapped IPv6 form (a host must not reach 127.0.0.1 by writing it
    as ::ffff:127.0.0.1)."""
    v4: list[ipaddress.IPv4Network] = []
    v6: list[ipaddress.IPv6Network] = []
    for c in cidrs:
        try:
            n = ipaddress.ip_network(c, strict=False)
        except ValueError as e:
            raise SystemSetupError(f"bad egress network: {e}") from None
        if isinstance(n, ipaddress.IPv6Network) and n.prefixlen > 96 and n.subnet_of(_MAPPED):
            # (the whole ::ffff:0:0/96 stays IPv6 only: it denies the mapped forms, not IPv4)
            n = ipaddress.IPv4Network((int(n.network_address) & 0xFFFFFFFF, n.prefixlen - 96))
        if isinstance(n, ipaddress.IPv4Network):
            v4.append(n)
            v6.append(ipaddress.IPv6Network((int(_MAPPED.network_address)
                                             | int(n.network_address), n.prefixlen + 96)))
        else:
            v6.append(n)
    return v4 if version == 4 else v6


def _nets(cidrs: list[str] | tuple[str, ...], version: int = 4) -> str:
    """An nft anonymous set of the networks of one IP version (:func:`egress_nets`),
    collapsed (nft refuses overlapping intervals); "" when there are none."""
    nets = egress_nets(cidrs, version)
    if not nets:
        return ""
    if version == 4:
        out = [str(n) for n in ipaddress.collapse_addresses(
            [n for n in nets if isinstance(n, ipaddress.IPv4Network)])]
    else:
        out = [str(n) for n in ipaddress.collapse_addresses(
            [n for n in nets if isinstance(n, ipaddress.IPv6Network)])]
    return "{ " + ", ".join(out) + " }"


# named counters of the table (``nft list counters table ip upmt_anchor``)
COUNTER_INBOUND = "unsolicited_inbound"   # new connections towards the pool, dropped
COUNTER_INVALID = "invalid_from_hosts"    # invalid/untracked from the TUN, dropped


def anchor_ruleset(*, tun: str, pool: str, mtu: int, nat_interface: str | None,
                   role: str = "anchor", allow_egress: tuple[str, ...] = (),
                   deny_egress: tuple[str, ...] = (), max_flows_per_host: int = 4096,
                   family: str = NFT_FAMILY) -> str:
    """The nft script creating table ``ip upmt_anchor`` (fails if it already exists), or
    with ``family`` "ip6" and an IPv6 ``pool`` table ``ip6 upmt_anchor6``: the same rules
    for IPv6 (the egress lists' IPv6 networks, :func:`egress_nets`).

    Role ``anchor``: masquerade the pool (out of ``nat_interface``, else out of every
    interface but the TUN), clamp MSS, drop what the hosts send that conntrack cannot
    track (it would leave un-NATed), drop what they send to ``deny_egress`` unless in
    ``allow_egress``, and drop what they send to the anchor itself.
    Role ``fixed-host``: nothing is relayed: drop every packet forwarded from the TUN.
    Both roles: forward into the TUN only replies to connections the hosts opened
    (before ``allow_egress``, which cannot open the hosts to each other).
    """
    six = family == "ip6"
    try:
        net = ipaddress.IPv6Network(pool, strict=False) if six else \
            ipaddress.IPv4Network(pool, strict=False)
    except ValueError:
        raise SystemSetupError(f"bad vipa pool {pool!r}") from None
    q_tun = nft.quote(tun)
    ip, table, version = ("ip6", NFT_TABLE6, 6) if six else ("ip", NFT_TABLE, 4)
    head = (f"create table {family} {table}\ntable {family} {table} {{\n"
            f"\tcounter {COUNTER_INBOUND} {{\n\t}}\n")
    if role == "fixed-host":
        return (head + "\tchain egress {\n"
                "\t\ttype filter hook forward priority filter; policy accept;\n"
                f"\t\tiifname {q_tun} drop\n\t\t{inbound_rule(tun)}\n\t}}\n}}\n")
    out = f"oifname {nft.quote(nat_interface)}" if nat_interface else f"oifname != {q_tun}"
    mss = mtu - (60 if six else 40)
    egress = "".join(f"\t\t{line}\n" for line in egress_rules(
        tun=tun, allow_egress=allow_egress, deny_egress=deny_egress,
        max_flows_per_host=max_flows_per_host, version=version))
    to_anchor = "".join(f"\t\t{line}\n" for line in to_anchor_rules(
        tun=tun, allow_egress=allow_egress, version=version))
    return (
        head +
        f"\tcounter {COUNTER_INVALID} {{\n\t}}\n"
        f"\tset hosts {{\n\t\ttype {'ipv6_addr' if six else 'ipv4_addr'}; size 65535; "
        "flags dynamic;\n\t}\n"
        "\tchain postrouting {\n"
        "\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
        f"\t\t{ip} saddr {net} {out} masquerade\n"
        "\t}\n"
        "\tchain forward {\n"
        "\t\ttype filter hook forward priority mangle; policy accept;\n"
        f"\t\toifname {q_tun} tcp flags syn tcp option maxseg size set rt mtu\n"
        f"\t\tiifname {q_tun} tcp flags syn tcp option maxseg size > {mss} "
        f"tcp option maxseg size set {mss}\n"
        "\t}\n"
        "\tchain egress {\n"
        "\t\ttype filter hook forward priority filter; policy accept;\n"
        f"{egress}"
        "\t}\n"
        "\tchain to_anchor {\n"
        "\t\ttype filter hook input priority filter; policy accept;\n"
        f"{to_anchor}"
        "\t}\n"
        "}\n"
    )


def inbound_rule(tun: str) -> str:
    """Into the tunnels: only what conntrack ties to a connection a host opened (its
    replies, and ICMP errors about it). A new connection towards the pool, from the
    anchor's LAN, its upstream or another host of this anchor, is dropped (both roles)."""
    return (f"oifname {nft.quote(tun)} ct state != {{ established, related }} "
            f'counter name "{COUNTER_INBOUND}" drop')


def egress_rules(*, tun: str, allow_egress: tuple[str, ...], deny_egress: tuple[str, ...],
                 max_flows_per_host: int, version: int = 4) -> list[str]:
    """Chain ``egress`` of role ``anchor`` (forwarded packets): what ``reload`` replaces
    when the egress lists or the per-host limit change. ``version`` 6: table ``ip6
    upmt_anchor6``'s (the lists' IPv6 networks, :func:`egress_nets`)."""
    q_tun = nft.quote(tun)
    ip = "ip6" if version == 6 else "ip"
    rules = [
        # no connection, no masquerade: it would leave with the host's VIpA as source
        # (ICMP errors quoting no connection, TCP with SYN|FIN, SYN|RST, no flags, ...)
        f"iifname {q_tun} ct state {{ invalid, untracked }} "
        f'counter name "{COUNTER_INVALID}" drop',
        # MESH HOOK (not used: the mesh is relayed by the anchor process, sealed end to
        # end, never TUN -> TUN): it would go here, after the invalid drop and before the
        # inbound drop and the egress deny list
        inbound_rule(tun),
    ]
    if allow_set := _nets(allow_egress, version):
        rules.append(f"iifname {q_tun} {ip} daddr {allow_set} accept")
    if deny_set := _nets(deny_egress, version):
        rules.append(f"iifname {q_tun} {ip} daddr {deny_set} drop")
    # connections (so masquerade ports) per host: one host cannot exhaust them
    rules.append(f"iifname {q_tun} ct state new add @hosts {{ {ip} saddr ct count over "
                 f"{int(max_flows_per_host)} }} drop")
    return rules


def to_anchor_rules(*, tun: str, allow_egress: tuple[str, ...], version: int = 4
                    ) -> list[str]:
    """Chain ``to_anchor``: the hosts reach the anchor itself only in ``allow_egress``."""
    q_tun = nft.quote(tun)
    ip = "ip6" if version == 6 else "ip"
    allow_set = _nets(allow_egress, version)
    rules = [f"iifname {q_tun} {ip} daddr {allow_set} accept"] if allow_set else []
    return [*rules, f"iifname {q_tun} drop"]


PAUSED_CHAIN = "paused"   # the chain that names a table as the stub a restart leaves


def paused_ruleset(pool: str, family: str = NFT_FAMILY) -> str:
    """What an anchor stopping *for a restart* leaves in place of its table, until the
    next start replaces it (in one transaction) or ``cleanup`` removes it.

    Without a NAT chain in the namespace the kernel stops translating the replies of
    the masqueraded connections (their conntrack entries stay, but NAT runs only while
    some NAT chain is registered), and without a rule that uses conntrack (``ct``) it
    stops looking packets up in conntrack at all: either way a reply then reaches the
    anchor's own stack, which answers it with a TCP reset, and the connection dies. An
    empty NAT chain and a ``ct`` rule keep both running, so a reply is turned back into
    a packet to its host's VIpA, which the ``ct`` rule drops (the TUN is gone):
    silently, so the server retransmits until the restarted anchor carries it again.
    ``family`` "ip6": the same for table ``ip6 upmt_anchor6`` and the IPv6 pool."""
    six = family == "ip6"
    try:
        net = (ipaddress.IPv6Network if six else ipaddress.IPv4Network)(pool, strict=False)
    except ValueError:
        raise SystemSetupError(f"bad vipa pool {pool!r}") from None
    ip = "ip6" if six else "ip"
    return nft.table_script(family, NFT_TABLE6 if six else NFT_TABLE, [
        ("postrouting", "type nat hook postrouting priority srcnat", []),
        (PAUSED_CHAIN, "type filter hook prerouting priority filter",
         [f"{ip} daddr {net} ct state established,related counter drop",
          f"{ip} daddr {net} drop"])])


def is_paused() -> bool:
    """True when our nft table is the stub :func:`paused_ruleset` makes."""
    return nft.chain_exists(NFT_FAMILY, NFT_TABLE, PAUSED_CHAIN)


class AnchorHost:
    """Installs (``setup``) and removes (``teardown``) the anchor's host configuration."""

    def __init__(
        self,
        *,
        tun: str,
        tun_address: str,
        pool_prefixlen: int,
        pool: str,
        mtu: int,
        role: str,
        nat_interface: str | None,
        state_file: str | None = None,
        listen_address: str | None = None,
        allow_egress: tuple[str, ...] = (),
        deny_egress: tuple[str, ...] = (),
        max_flows_per_host: int = 4096,
        pool6: str = "",
    ) -> None:
        if role not in ROLES:
            raise SystemSetupError(f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not 0 <= pool_prefixlen <= 32 or mtu < 576:
            raise SystemSetupError(f"bad TUN settings: /{pool_prefixlen}, mtu {mtu}")
        self.tun = tun
        self.tun_address = tun_address
        self.pool_prefixlen = pool_prefixlen
        self.pool = pool
        self.mtu = mtu
        self.role = role
        self.nat_interface = nat_interface
        self.listen_address = listen_address
        self.allow_egress = allow_egress
        self.deny_egress = deny_egress
        self.max_flows_per_host = max_flows_per_host
        # IPv6 VIpAs ("": none): the TUN holds the pool's first address, as for IPv4
        self.pool6 = ipaddress.IPv6Network(pool6) if pool6 else None
        self._undo = UndoStack()
        self._sysctl = SysctlSaver(state_file)  # survives a kill: next start restores
        self._replace_table = False
        # set before teardown: a stop for a restart leaves paused_ruleset's stub
        self.pause_on_teardown = False

    def cleanup_leftovers(self, *, keep_table: bool = False) -> None:
        """Remove the nft table a killed earlier run left behind and restore its sysctls.

        ``keep_table`` (a start, :meth:`setup` follows): leave that table for ``setup`` to
        replace in the same nft transaction. Deleting it first would leave the namespace
        without a NAT chain for a moment; the kernel then stops translating the replies of
        the masqueraded connections that outlived the killed anchor (their conntrack
        entries stay, but NAT only runs while some NAT chain is registered), and answers
        each with a TCP reset from the anchor's own address: every connection dies."""
        self._sysctl.restore_leftovers()
        self._replace_table = keep_table
        if not keep_table:
            nft.delete_table(NFT_FAMILY, NFT_TABLE)
            try:
                nft.delete_table("ip6", NFT_TABLE6)
            except SystemSetupError as e:   # a kernel without IPv6: nothing can be left
                log.debug("no ip6 table to clean up: %s", e)

    def setup(self) -> None:
        """Install everything; on failure undo what was done and raise SystemSetupError."""
        self._undo.run("anchor host", self._setup)

    def _setup(self) -> None:
        if self.role == "anchor" and self.nat_interface is not None:
            netlink.link_index(self.nat_interface)
        script = anchor_ruleset(
            tun=self.tun, pool=self.pool, mtu=self.mtu, nat_interface=self.nat_interface,
            role=self.role, allow_egress=self.allow_egress, deny_egress=self.deny_egress,
            max_flows_per_host=self.max_flows_per_host)
        if self.pool6 is not None:
            script += anchor_ruleset(
                tun=self.tun, pool=str(self.pool6), mtu=self.mtu,
                nat_interface=self.nat_interface, role=self.role,
                allow_egress=self.allow_egress, deny_egress=self.deny_egress,
                max_flows_per_host=self.max_flows_per_host, family="ip6")
        if self._replace_table:
            # a killed run's tables (if any) go in the same transaction: "add table" makes
            # the delete valid when there is none; no moment without a NAT chain
            six = (f"add table ip6 {NFT_TABLE6}\ndelete table ip6 {NFT_TABLE6}\n"
                   if self.pool6 is not None else "")
            script = (f"add table {NFT_FAMILY} {NFT_TABLE}\n"
                      f"delete table {NFT_FAMILY} {NFT_TABLE}\n{six}{script}")
            if self.pool6 is None:        # a killed run's IPv6 table, if it had a pool
                try:
                    if nft.table_exists("ip6", NFT_TABLE6):
                        nft.delete_table("ip6", NFT_TABLE6)
                except SystemSetupError as e:
                    log.debug("no ip6 table to clean up: %s", e)
        elif nft.table_exists(NFT_FAMILY, NFT_TABLE):
            raise SystemSetupError(
                f"nft table {NFT_FAMILY} {NFT_TABLE} exists (another anchor, or a killed"
                " one: cleanup_leftovers removes it)"
            )

        addr6 = str(self.pool6.network_address + 1) if self.pool6 is not None else ""
        plen6 = self.pool6.prefixlen if self.pool6 is not None else 128
        netlink.configure_tun(self.tun, self.tun_address, self.pool_prefixlen, self.mtu,
                              addr6, plen6)
        self._undo.push(
            f"address {self.tun_address} of {self.tun}",
            lambda: netlink.remove_address(self.tun, self.tun_address, self.pool_prefixlen),
        )
        if addr6:
            self._undo.push(f"address {addr6} of {self.tun}",
                            lambda: netlink.remove_address(self.tun, addr6, plen6))
        if (self.role == "fixed-host" and self.listen_address not in (None, "0.0.0.0")
                and ":" not in self.listen_address):     # an IPv6 one is no IPv4 source
            # a fixed host's services answer mobile hosts from the address they were asked
            # at (its listen address), not from the TUN's: UDP servers bound to 0.0.0.0
            # would otherwise reply from an address the mobile host never contacted
            assert self.listen_address is not None
            netlink.set_prefsrc(self.tun, self.pool.split("/")[0], self.pool_prefixlen,
                                self.listen_address)
        if self.role == "anchor":
            self._undo.push("sysctls", self._sysctl.restore)
            self._sysctl.set("net.ipv4.ip_forward", "1")
            if self.pool6 is not None:
                # (a forwarding host ignores router advertisements unless accept_ra=2:
                # an anchor's uplink with IPv6 is configured statically or with accept_ra=2)
                self._sysctl.set("net.ipv6.conf.all.forwarding", "1")
        nft.apply(script)
        # (a stop for a restart keeps both tables' NAT, paused: _remove_table)
        self._undo.push(f"nft table {NFT_TABLE}", self._remove_table)
        if self.pool6 is not None:
            self._undo.push(f"nft table ip6 {NFT_TABLE6}", partial(self._remove_table, "ip6"))
        log.info("anchor host set up (pool %s, masquerade via %s)", self.pool, self.nat_interface)

    def egress_script(self, allow_egress: tuple[str, ...], deny_egress: tuple[str, ...],
                      max_flows_per_host: int) -> str:
        """``reload``: the nft script replacing chains ``egress`` and ``to_anchor`` (one
        transaction; the named counters stay). A new per-host limit also empties set
        ``hosts``: its elements hold the old limit, so the counts start over."""
        if self.role != "anchor":
            return ""
        lines = []
        tables = [(f"{NFT_FAMILY} {NFT_TABLE}", 4)]
        if self.pool6 is not None:         # IPv6's in the same transaction
            tables.append((f"ip6 {NFT_TABLE6}", 6))
        for head, version in tables:
            lines.append(f"flush chain {head} egress")
            lines += [f"add rule {head} egress {r}" for r in egress_rules(
                tun=self.tun, allow_egress=allow_egress, deny_egress=deny_egress,
                max_flows_per_host=max_flows_per_host, version=version)]
            lines.append(f"flush chain {head} to_anchor")
            lines += [f"add rule {head} to_anchor {r}" for r in to_anchor_rules(
                tun=self.tun, allow_egress=allow_egress, version=version)]
            if max_flows_per_host != self.max_flows_per_host:
                lines.append(f"flush set {head} hosts")
        return "\n".join(lines) + "\n"

    def replace_egress(self, allow_egress: tuple[str, ...], deny_egress: tuple[str, ...],
                       max_flows_per_host: int, *, dry_run: bool = False) -> None:
        """Apply :meth:`egress_script` (dry-run first: nothing changes when nft refuses)."""
        script = self.egress_script(allow_egress, deny_egress, max_flows_per_host)
        if not script:
            return
        nft.check(script)
        if not dry_run:
            nft.apply(script)
            self.allow_egress, self.deny_egress = allow_egress, deny_egress
            self.max_flows_per_host = max_flows_per_host
            log.info("nft egress rules replaced")
    def _remove_table(self, family: str = NFT_FAMILY) -> None:
        """Teardown of a table: deleted, or (a stop for a restart) replaced by the paused
        stub in one transaction, so there is no moment without a NAT chain."""
        six = family == "ip6"
        table = NFT_TABLE6 if six else NFT_TABLE
        pool = str(self.pool6) if six else self.pool
        if self.pause_on_teardown and self.role == "anchor":
            try:
                nft.apply(f"add table {family} {table}\ndelete table {family} {table}\n"
                          + paused_ruleset(pool, family))
                log.info("stopping for a restart: NAT kept, replies to %s dropped until the"
                         " next start (`upmt-anchor cleanup` removes it)", pool)
                return
            except SystemSetupError as e:
                log.warning("cannot keep NAT for the restart: %s", e)
        nft.delete_table(family, table)

    def teardown(self) -> None:
        """Undo everything ``setup`` did (newest first). Idempotent; never raises."""
        self._undo.unwind()
