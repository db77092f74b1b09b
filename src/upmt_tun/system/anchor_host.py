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

from upmt_tun.system import netlink, nft
from upmt_tun.system.errors import SystemSetupError
from upmt_tun.system.sysctl import SysctlSaver
from upmt_tun.system.undo import UndoStack

log = logging.getLogger(__name__)

NFT_FAMILY = "ip"
NFT_TABLE = "upmt_anchor"
ROLES = ("anchor", "fixed-host")


def _nets(cidrs: list[str] | tuple[str, ...]) -> str:
    """An nft anonymous set of the networks, collapsed (nft refuses overlapping intervals)."""
    try:
        nets = [ipaddress.IPv4Network(c, strict=False) for c in cidrs]
    except ValueError as e:
        raise SystemSetupError(f"bad egress network: {e}") from None
    return "{ " + ", ".join(str(n) for n in ipaddress.collapse_addresses(nets)) + " }"


# named counters of the table (``nft list counters table ip upmt_anchor``)
COUNTER_INBOUND = "unsolicited_inbound"   # new connections towards the pool, dropped
COUNTER_INVALID = "invalid_from_hosts"    # invalid/untracked from the TUN, dropped


def anchor_ruleset(*, tun: str, pool: str, mtu: int, nat_interface: str | None,
                   role: str = "anchor", allow_egress: tuple[str, ...] = (),
                   deny_egress: tuple[str, ...] = (), max_flows_per_host: int = 4096) -> str:
    """The nft script creating table ``ip upmt_anchor`` (fails if it already exists).

    Role ``anchor``: masquerade the pool (out of ``nat_interface``, else out of every
    interface but the TUN), clamp MSS, drop what the hosts send that conntrack cannot
    track (it would leave un-NATed), drop what they send to ``deny_egress`` unless in
    ``allow_egress``, and drop what they send to the anchor itself.
    Role ``fixed-host``: nothing is relayed: drop every packet forwarded from the TUN.
    Both roles: forward into the TUN only replies to connections the hosts opened
    (before ``allow_egress``, which cannot open the hosts to each other).
    """
    try:
        net = ipaddress.IPv4Network(pool, strict=False)
    except ValueError:
        raise SystemSetupError(f"bad vipa pool {pool!r}") from None
    q_tun = nft.quote(tun)
    head = (f"create table {NFT_FAMILY} {NFT_TABLE}\ntable {NFT_FAMILY} {NFT_TABLE} {{\n"
            f"\tcounter {COUNTER_INBOUND} {{\n\t}}\n")
    # Into the tunnels: only what conntrack ties to a connection a host opened (its
    # replies, and ICMP errors about it). A new connection towards the pool, from the
    # anchor's LAN, its upstream or another host of this anchor, is dropped.
    inbound = (f"\t\toifname {q_tun} ct state != {{ established, related }} "
               f'counter name "{COUNTER_INBOUND}" drop\n')
    if role == "fixed-host":
        return (head + "\tchain egress {\n"
                "\t\ttype filter hook forward priority filter; policy accept;\n"
                f"\t\tiifname {q_tun} drop\n{inbound}\t}}\n}}\n")
    out = f"oifname {nft.quote(nat_interface)}" if nat_interface else f"oifname != {q_tun}"
    mss = mtu - 40
    egress = "".join(f"\t\t{line}\n" for line in egress_rules(
        tun=tun, allow_egress=allow_egress, deny_egress=deny_egress,
        max_flows_per_host=max_flows_per_host))
    to_anchor = "".join(f"\t\t{line}\n" for line in to_anchor_rules(
        tun=tun, allow_egress=allow_egress))
    return (
        head +
        f"\tcounter {COUNTER_INVALID} {{\n\t}}\n"
        "\tset hosts {\n\t\ttype ipv4_addr; size 65535; flags dynamic;\n\t}\n"
        "\tchain postrouting {\n"
        "\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
        f"\t\tip saddr {net} {out} masquerade\n"
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


def egress_rules(*, tun: str, allow_egress: tuple[str, ...], deny_egress: tuple[str, ...],
                 max_flows_per_host: int) -> list[str]:
    """Chain ``egress`` of role ``anchor`` (forwarded packets): what ``reload`` replaces
    when the egress lists or the per-host limit change."""
    q_tun = nft.quote(tun)
    # Into the tunnels: only what conntrack ties to a connection a host opened (its
    # replies, and ICMP errors about it). A new connection towards the pool, from the
    # anchor's LAN, its upstream or another host of this anchor, is dropped.
    rules = [
        # no connection, no masquerade: it would leave with the host's VIpA as source
        # (ICMP errors quoting no connection, TCP with SYN|FIN, SYN|RST, no flags, ...)
        f"iifname {q_tun} ct state {{ invalid, untracked }} "
        f'counter name "{COUNTER_INVALID}" drop',
        # MESH HOOK (not used: the mesh is relayed by the anchor process, sealed end to
        # end, never TUN -> TUN): it would go here, after the invalid drop and before the
        # inbound drop and the egress deny list
        f"oifname {q_tun} ct state != {{ established, related }} "
        f'counter name "{COUNTER_INBOUND}" drop',
    ]
    if allow_egress:
        rules.append(f"iifname {q_tun} ip daddr {_nets(allow_egress)} accept")
    if deny_egress:
        rules.append(f"iifname {q_tun} ip daddr {_nets(deny_egress)} drop")
    # connections (so masquerade ports) per host: one host cannot exhaust them
    rules.append(f"iifname {q_tun} ct state new add @hosts {{ ip saddr ct count over "
                 f"{int(max_flows_per_host)} }} drop")
    return rules


def to_anchor_rules(*, tun: str, allow_egress: tuple[str, ...]) -> list[str]:
    """Chain ``to_anchor``: the hosts reach the anchor itself only in ``allow_egress``."""
    q_tun = nft.quote(tun)
    rules = [f"iifname {q_tun} ip daddr {_nets(allow_egress)} accept"] if allow_egress else []
    return [*rules, f"iifname {q_tun} drop"]
PAUSED_CHAIN = "paused"   # the chain that names a table as the stub a restart leaves


def paused_ruleset(pool: str) -> str:
    """What an anchor stopping *for a restart* leaves in place of its table, until the
    next start replaces it (in one transaction) or ``cleanup`` removes it.

    Without a NAT chain in the namespace the kernel stops translating the replies of
    the masqueraded connections (their conntrack entries stay, but NAT runs only while
    some NAT chain is registered), and without a rule that uses conntrack (``ct``) it
    stops looking packets up in conntrack at all: either way a reply then reaches the
    anchor's own stack, which answers it with a TCP reset, and the connection dies. An
    empty NAT chain and a ``ct`` rule keep both running, so a reply is turned back into
    a packet to its host's VIpA, which the ``ct`` rule drops (the TUN is gone):
    silently, so the server retransmits until the restarted anchor carries it again."""
    try:
        net = ipaddress.IPv4Network(pool, strict=False)
    except ValueError:
        raise SystemSetupError(f"bad vipa pool {pool!r}") from None
    return (f"table {NFT_FAMILY} {NFT_TABLE} {{\n"
            "\tchain postrouting {\n"
            "\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
            "\t}\n"
            f"\tchain {PAUSED_CHAIN} {{\n"
            "\t\ttype filter hook prerouting priority filter; policy accept;\n"
            f"\t\tip daddr {net} ct state established,related counter drop\n"
            f"\t\tip daddr {net} drop\n"
            "\t}\n"
            "}\n")


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
        if self._replace_table:
            # a killed run's table (if any) goes in the same transaction: "add table" makes
            # the delete valid when there is none; no moment without a NAT chain
            script = (f"add table {NFT_FAMILY} {NFT_TABLE}\n"
                      f"delete table {NFT_FAMILY} {NFT_TABLE}\n{script}")
        elif nft.table_exists(NFT_FAMILY, NFT_TABLE):
            raise SystemSetupError(
                f"nft table {NFT_FAMILY} {NFT_TABLE} exists (another anchor, or a killed"
                " one: cleanup_leftovers removes it)"
            )

        netlink.configure_tun(self.tun, self.tun_address, self.pool_prefixlen, self.mtu)
        self._undo.push(
            f"address {self.tun_address} of {self.tun}",
            lambda: netlink.remove_address(self.tun, self.tun_address, self.pool_prefixlen),
        )
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
        nft.apply(script)
        self._undo.push(f"nft table {NFT_TABLE}", self._remove_table)
        log.info("anchor host set up (pool %s, masquerade via %s)", self.pool, self.nat_interface)

    def egress_script(self, allow_egress: tuple[str, ...], deny_egress: tuple[str, ...],
                      max_flows_per_host: int) -> str:
        """``reload``: the nft script replacing chains ``egress`` and ``to_anchor`` (one
        transaction; the named counters stay). A new per-host limit also empties set
        ``hosts``: its elements hold the old limit, so the counts start over."""
        if self.role != "anchor":
            return ""
        head = f"{NFT_FAMILY} {NFT_TABLE}"
        lines = [f"flush chain {head} egress"]
        lines += [f"add rule {head} egress {r}" for r in egress_rules(
            tun=self.tun, allow_egress=allow_egress, deny_egress=deny_egress,
            max_flows_per_host=max_flows_per_host)]
        lines.append(f"flush chain {head} to_anchor")
        lines += [f"add rule {head} to_anchor {r}"
                  for r in to_anchor_rules(tun=self.tun, allow_egress=allow_egress)]
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
    def _remove_table(self) -> None:
        """Teardown of the table: deleted, or (a stop for a restart) replaced by the paused
        stub in one transaction, so there is no moment without a NAT chain."""
        if self.pause_on_teardown and self.role == "anchor":
            try:
                nft.apply(f"add table {NFT_FAMILY} {NFT_TABLE}\n"
                          f"delete table {NFT_FAMILY} {NFT_TABLE}\n{paused_ruleset(self.pool)}")
                log.info("stopping for a restart: NAT kept, replies to %s dropped until the"
                         " next start (`upmt-anchor cleanup` removes it)", self.pool)
                return
            except SystemSetupError as e:
                log.warning("cannot keep NAT for the restart: %s", e)
        nft.delete_table(NFT_FAMILY, NFT_TABLE)

    def teardown(self) -> None:
        """Undo everything ``setup`` did (newest first). Idempotent; never raises."""
        self._undo.unwind()
