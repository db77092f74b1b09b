"""Host set-up of the anchor (or fixed host): TUN address, forwarding, masquerade.

The TUN holds the first address of the VIPA pool with the pool's prefix length, so
the kernel routes the pool to the TUN. Role ``anchor`` also forwards and
masquerades the pool out of ``nat_interface`` (nft table ``ip upmt_anchor``) and
clamps the TCP MSS of forwarded SYNs to the TUN MTU; role ``fixed-host`` only
configures the TUN.
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


def anchor_ruleset(*, tun: str, pool: str, mtu: int, nat_interface: str | None) -> str:
    """The nft script creating table ``ip upmt_anchor`` (fails if it already exists).

    Without ``nat_interface`` the pool is masqueraded out of every interface but the TUN.
    """
    try:
        net = ipaddress.IPv4Network(pool, strict=False)
    except ValueError:
        raise SystemSetupError(f"bad vipa pool {pool!r}") from None
    q_tun = nft.quote(tun)
    out = f"oifname {nft.quote(nat_interface)}" if nat_interface else f"oifname != {q_tun}"
    mss = mtu - 40
    return (
        f"create table {NFT_FAMILY} {NFT_TABLE}\n"
        f"table {NFT_FAMILY} {NFT_TABLE} {{\n"
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
        "}\n"
    )


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
        self._undo = UndoStack()
        self._sysctl = SysctlSaver(state_file)  # survives a kill: next start restores

    def cleanup_leftovers(self) -> None:
        """Remove the nft table a killed earlier run left behind and restore its sysctls."""
        self._sysctl.restore_leftovers()
        nft.delete_table(NFT_FAMILY, NFT_TABLE)

    def setup(self) -> None:
        """Install everything; on failure undo what was done and raise SystemSetupError."""
        if self._undo:
            raise SystemSetupError("anchor host configuration is already set up")
        try:
            self._setup()
        except BaseException as exc:
            self._undo.unwind()
            if isinstance(exc, SystemSetupError | KeyboardInterrupt | SystemExit):
                raise
            raise SystemSetupError(f"anchor host setup failed: {exc}") from None

    def _setup(self) -> None:
        script = None
        if self.role == "anchor":
            if self.nat_interface is not None:
                netlink.link_index(self.nat_interface)
            script = anchor_ruleset(
                tun=self.tun, pool=self.pool, mtu=self.mtu, nat_interface=self.nat_interface
            )
            if nft.table_exists(NFT_FAMILY, NFT_TABLE):
                raise SystemSetupError(
                    f"nft table {NFT_FAMILY} {NFT_TABLE} exists (another anchor, or a killed"
                    " one: cleanup_leftovers removes it)"
                )

        netlink.configure_tun(self.tun, self.tun_address, self.pool_prefixlen, self.mtu)
        self._undo.push(
            f"address {self.tun_address} of {self.tun}",
            lambda: netlink.remove_address(self.tun, self.tun_address, self.pool_prefixlen),
        )
        if script is None:
            return
        self._undo.push("sysctls", self._sysctl.restore)
        self._sysctl.set("net.ipv4.ip_forward", "1")
        nft.apply(script)
        self._undo.push(f"nft table {NFT_TABLE}", lambda: nft.delete_table(NFT_FAMILY, NFT_TABLE))
        log.info("anchor host set up (pool %s, masquerade via %s)", self.pool, self.nat_interface)

    def teardown(self) -> None:
        """Undo everything ``setup`` did (newest first). Idempotent; never raises."""
        self._undo.unwind()
