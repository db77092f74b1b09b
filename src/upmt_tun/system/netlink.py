"""Links, addresses, routes and rules through pyroute2's synchronous ``IPRoute``.

Call these before/after the asyncio loop or through ``asyncio.to_thread``: the
synchronous ``IPRoute`` runs its own event loop and cannot run inside a running one.
Every failure is raised as a one-line :class:`SystemSetupError`.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from socket import AF_INET, AF_INET6
from typing import Any

from pyroute2 import IPRoute  # type: ignore[import-untyped]
from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

from upmt_tun.system.errors import SystemSetupError

MAIN_TABLE = 254
RTN_UNICAST = 1
RTNH_F_ONLINK = 4
IFA_F_SECONDARY = 0x01


@dataclass(frozen=True)
class IfaceInfo:
    """One network interface as seen in the main routing table."""

    name: str
    index: int
    address: str | None  # primary IPv4 address
    prefixlen: int | None
    mtu: int
    gateway: str | None  # from this interface's default route in the main table
    carrier: bool = True  # administratively up and with carrier (IFF_UP, IFF_LOWER_UP)


@dataclass(frozen=True)
class Route:
    """An IPv4 route we install (and later delete with the same fields): a default route
    unless ``dst`` says otherwise (a mesh pool, with its own ``mtu``)."""

    table: int
    oif: int | None = None
    gateway: str | None = None
    blackhole: bool = False
    metric: int | None = None
    onlink: bool = False
    dev: str | None = field(default=None, compare=False)  # name of oif, for messages
    dst: str = "0.0.0.0/0"
    mtu: int | None = None
    family: int = AF_INET          # AF_INET6: an IPv6 route (``dst`` "::/0" for a default)

    def describe(self) -> str:
        """Human-readable form for messages, like ``ip route``'s."""
        what = "default" if self.dst in ("0.0.0.0/0", "::/0") else self.dst
        what = f"-6 {what}" if self.family == AF_INET6 else what
        what = f"blackhole {what}" if self.blackhole else what
        if self.gateway:
            what += f" via {self.gateway}"
        if self.oif is not None:
            what += f" dev {self.dev or f'#{self.oif}'}"
        if self.onlink:
            what += " onlink"
        if self.metric is not None:
            what += f" metric {self.metric}"
        if self.mtu is not None:
            what += f" mtu {self.mtu}"
        return f"{what} table {self.table}"

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``IPRoute.route``."""
        args: dict[str, Any] = {"dst": self.dst, "family": self.family, "table": self.table}
        if self.mtu is not None:
            args["metrics"] = {"mtu": self.mtu}
        if self.blackhole:
            args["type"] = "blackhole"
        if self.oif is not None:
            args["oif"] = self.oif
        if self.gateway is not None:
            args["gateway"] = self.gateway
        elif self.oif is not None:
            args["scope"] = "link"
        if self.metric is not None:
            args["priority"] = self.metric
        if self.onlink:
            args["flags"] = RTNH_F_ONLINK
        return args


@dataclass(frozen=True)
class Rule:
    """An IPv4 fwmark policy-routing rule: ``priority: fwmark M/mask lookup T``."""

    priority: int
    table: int
    fwmark: int | None = None
    fwmask: int | None = None
    family: int = AF_INET          # AF_INET6: an IPv6 rule

    def describe(self) -> str:
        """Human-readable form for messages, like ``ip rule``'s."""
        mark = f" fwmark {self.fwmark:#x}/{self.fwmask or 0xFFFFFFFF:#x}" if self.fwmark else ""
        six = "-6 " if self.family == AF_INET6 else ""
        return f"{six}rule {self.priority}:{mark} lookup {self.table}"

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``IPRoute.rule``."""
        args: dict[str, Any] = {"family": self.family, "priority": self.priority,
                                "table": self.table}
        if self.fwmark is not None:
            args["fwmark"] = self.fwmark
            args["fwmask"] = 0xFFFFFFFF if self.fwmask is None else self.fwmask
        return args


def _reason(exc: BaseException) -> str:
    if isinstance(exc, NetlinkError):
        return os.strerror(exc.code) if exc.code else str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


@contextmanager
def _iproute(what: str) -> Iterator[IPRoute]:
    """An ``IPRoute`` whose errors turn into ``SystemSetupError(f"{what}: <reason>")``."""
    try:
        with IPRoute() as ipr:
            yield ipr
    except SystemSetupError:
        raise
    except Exception as exc:  # pyroute2 raises many types; none may escape
        raise SystemSetupError(f"{what}: {_reason(exc)}") from None


def _netlink_code(exc: BaseException) -> int | None:
    return exc.code if isinstance(exc, NetlinkError) else None


def _lookup(ipr: IPRoute, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise SystemSetupError(f"interface {name} does not exist")
    return int(found[0])


def link_index(name: str) -> int:
    """Index of interface ``name``; raises if it does not exist."""
    with _iproute(f"cannot look up interface {name}") as ipr:
        return _lookup(ipr, name)


def _default_routes(ipr: IPRoute) -> list[tuple[int, int, str | None]]:
    """(metric, oif, gateway) of every IPv4 unicast default route of the main table."""
    found: list[tuple[int, int, str | None]] = []
    for route in ipr.get_routes(family=AF_INET, table=MAIN_TABLE, dst_len=0):
        if route.get("type") != RTN_UNICAST:
            continue
        metric = int(route.get("priority") or 0)
        if route.get("oif") is not None:
            found.append((metric, int(route.get("oif")), route.get("gateway")))
        for hop in route.get("multipath") or []:
            gateway = dict(hop.get("attrs", [])).get("RTA_GATEWAY")
            found.append((metric, int(hop["oif"]), gateway))
    found.sort(key=lambda item: item[0])
    return found


_UP_CARRIER = 0x1 | 0x10000      # IFF_UP | IFF_LOWER_UP


def _info(ipr: IPRoute, index: int, routes: list[tuple[int, int, str | None]]) -> IfaceInfo:
    links = ipr.get_links(index)
    if not links:
        raise SystemSetupError(f"interface #{index} does not exist")
    link = links[0]
    address: str | None = None
    prefixlen: int | None = None
    for msg in ipr.get_addr(family=AF_INET, index=index):
        flags = msg.get("IFA_FLAGS")
        if (msg.get("flags") if flags is None else flags) & IFA_F_SECONDARY:
            continue
        address, prefixlen = msg.get("address"), int(msg.get("prefixlen"))
        break
    gateway = next((gw for _metric, oif, gw in routes if oif == index), None)
    return IfaceInfo(
        name=str(link.get("ifname")),
        index=index,
        address=address,
        prefixlen=prefixlen,
        mtu=int(link.get("mtu")),
        gateway=gateway,
        carrier=(int(link.get("flags") or 0) & _UP_CARRIER) == _UP_CARRIER,
    )


def interface_info(name: str) -> IfaceInfo:
    """Index, primary IPv4 address, MTU and default gateway of interface ``name``."""
    with _iproute(f"cannot read interface {name}") as ipr:
        index = _lookup(ipr, name)
        return _info(ipr, index, _default_routes(ipr))


def default_route_interfaces() -> list[IfaceInfo]:
    """Every interface with an IPv4 default route in the main table, best metric first."""
    with _iproute("cannot read the default routes") as ipr:
        routes = _default_routes(ipr)
        seen: list[int] = []
        for _metric, oif, _gateway in routes:
            if oif not in seen:
                seen.append(oif)
        return [_info(ipr, index, routes) for index in seen]


def configure_tun(name: str, address: str, prefixlen: int, mtu: int,
                  address6: str = "", prefixlen6: int = 128) -> None:
    """Give the (already open) TUN device ``name`` its MTU and address (and IPv6 address
    ``address6``, if any), and bring it up."""
    with _iproute(f"cannot configure {name} ({address}/{prefixlen}, mtu {mtu})") as ipr:
        index = _lookup(ipr, name)
        ipr.link("set", index=index, mtu=mtu)
        addrs = [(address, prefixlen, AF_INET)]
        if address6:
            addrs.append((address6, prefixlen6, AF_INET6))
        for addr, plen, fam in addrs:
            try:
                ipr.addr("add", index=index, address=addr, prefixlen=plen, family=fam)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
        ipr.link("set", index=index, state="up")


def set_prefsrc(name: str, network: str, prefixlen: int, src: str) -> None:
    """Make the connected route of ``network/prefixlen`` on ``name`` prefer source ``src``
    (what an unbound socket answering a host on that network sends from)."""
    with _iproute(f"cannot set source {src} on the route to {network}/{prefixlen}") as ipr:
        ipr.route("replace", dst=network, dst_len=prefixlen, oif=_lookup(ipr, name),
                  prefsrc=src, scope=253, proto=2)


def delete_tun(name: str) -> bool:
    """Delete the TUN device ``name`` if it is left over (a persistent one, or one whose
    process has not let go yet); False if there is none. Any other kind of device of that
    name is not ours: it is left alone and reported."""
    with _iproute(f"cannot remove {name}") as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return False
        (link,) = ipr.link("get", index=found[0])
        info = link.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        if kind != "tun":
            raise SystemSetupError(f"{name} exists but is a {kind or 'device'} device, not a "
                                   "TUN; not removing it")
        try:
            ipr.link("del", index=found[0])
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return False
            raise
        return True


def add_address(name: str, address: str, prefixlen: int) -> bool:
    """Add ``address/prefixlen`` to ``name``; False if it was there already."""
    with _iproute(f"cannot add {address}/{prefixlen} to {name}") as ipr:
        try:
            ipr.addr("add", index=_lookup(ipr, name), address=address, prefixlen=prefixlen)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
            return False
        return True


def remove_address(name: str, address: str, prefixlen: int) -> bool:
    """Delete ``address/prefixlen`` from ``name``; False if the device or address is gone."""
    with _iproute(f"cannot remove {address}/{prefixlen} from {name}") as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return False
        try:
            ipr.addr("del", index=found[0], address=address, prefixlen=prefixlen)
        except NetlinkError as exc:
            if exc.code in (errno.EADDRNOTAVAIL, errno.ENODEV, errno.ESRCH):
                return False
            raise
        return True


def add_route(route: Route) -> Route:
    """Add ``route``; a gateway off every on-link prefix is retried as ``onlink``.

    Returns the route as installed (what :func:`delete_route` needs).
    """
    with _iproute(f"cannot add route {route.describe()}") as ipr:
        try:
            ipr.route("add", **route.kwargs())
            return route
        except NetlinkError as exc:
            if exc.code != errno.ENETUNREACH or route.gateway is None or route.onlink:
                raise
        onlink = replace(route, onlink=True)
        ipr.route("add", **onlink.kwargs())
        return onlink


def delete_route(route: Route) -> bool:
    """Delete ``route``; False if it is already gone (e.g. its device vanished)."""
    with _iproute(f"cannot delete route {route.describe()}") as ipr:
        try:
            ipr.route("del", **route.kwargs())
        except NetlinkError as exc:
            if exc.code in (errno.ESRCH, errno.ENODEV, errno.ENOENT):
                return False
            raise
        return True


def flush_table(table: int, family: int = AF_INET) -> int:
    """Delete every route of ``family`` (IPv4 by default) of routing table ``table``;
    returns how many went."""
    with _iproute(f"cannot flush routing table {table}") as ipr:
        count = 0
        for route in ipr.get_routes(family=family, table=table):
            if route.get("table") != table:
                continue
            if family == AF_INET6 and route.get("type") not in (1, 6):
                continue           # unicast and blackhole only: not the kernel's others
            try:
                ipr.route("del", family=family, table=table,
                          **_route_key(route, "::" if family == AF_INET6 else "0.0.0.0"))
                count += 1
            except NetlinkError as exc:
                if exc.code not in (errno.ESRCH, errno.ENODEV):
                    raise
        return count


def _route_key(route: Any, any_addr: str = "0.0.0.0") -> dict[str, Any]:
    """Fields that identify a dumped route for deletion (pyroute2 defaults none of them)."""
    key: dict[str, Any] = {
        "dst": f"{route.get('dst') or any_addr}/{route.get('dst_len')}",
        "type": route.get("type"),
        "tos": route.get("tos"),
        "proto": route.get("proto"),
        "scope": route.get("scope"),
    }
    for name in ("priority", "oif", "gateway"):
        if route.get(name) is not None:
            key[name] = route.get(name)
    return key


def add_rule(rule: Rule) -> None:
    """Add an IPv4 policy-routing rule."""
    with _iproute(f"cannot add {rule.describe()}") as ipr:
        ipr.rule("add", **rule.kwargs())


def delete_rule(rule: Rule) -> bool:
    """Delete an IPv4 policy-routing rule; False if it is already gone."""
    with _iproute(f"cannot delete {rule.describe()}") as ipr:
        try:
            ipr.rule("del", **rule.kwargs())
        except NetlinkError as exc:
            if exc.code in (errno.ENOENT, errno.ESRCH):
                return False
            raise
        return True


def list_rules(family: int = AF_INET) -> list[Rule]:
    """Every fwmark policy-routing rule of ``family`` (IPv4 by default; others are not
    ours and are skipped)."""
    with _iproute("cannot list ip rules") as ipr:
        rules = []
        for msg in ipr.get_rules(family=family):
            if msg.get("fwmark") is None or msg.get("priority") is None:
                continue
            rules.append(
                Rule(
                    priority=int(msg.get("priority")),
                    table=int(msg.get("table")),
                    fwmark=int(msg.get("fwmark")),
                    fwmask=msg.get("fwmask"),
                    family=family,
                )
            )
        return rules
