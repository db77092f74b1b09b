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
IFA_F_TEMPORARY = 0x01          # IPv6: the same bit means a privacy address
IFA_F_DADFAILED = 0x08
IFA_F_DEPRECATED = 0x20
RT_SCOPE_UNIVERSE = 0
DEFAULT_DST: dict[int, str] = {AF_INET: "0.0.0.0/0", AF_INET6: "::/0"}


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
    address6: str | None = None  # a global IPv6 address (no link-local, no deprecated)
    gateway6: str | None = None  # from its IPv6 default route in the main table (often fe80::)

    @property
    def families(self) -> frozenset[int]:
        """4 and/or 6: the families it has an address of (an IPv6-only cellular link: {6})."""
        return frozenset(f for f, a in ((4, self.address), (6, self.address6)) if a)


@dataclass(frozen=True)
class Route:
    """A route we install (and later delete with the same fields): a default route
    unless ``dst`` says otherwise (a mesh pool, with its own ``mtu``); IPv4 unless
    ``family`` is AF_INET6 (an access interface's IPv6 default route)."""

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
        dst = DEFAULT_DST[self.family] if self.dst == "0.0.0.0/0" else self.dst
        args: dict[str, Any] = {"dst": dst, "family": self.family, "table": self.table}
        if self.mtu is not None:
            args["metrics"] = {"mtu": self.mtu}
        if self.blackhole:
            args["type"] = "blackhole"
        if self.oif is not None:
            args["oif"] = self.oif
        if self.gateway is not None:
            args["gateway"] = self.gateway
        elif self.oif is not None and self.family == AF_INET:
            args["scope"] = "link"
        if self.metric is not None:
            args["priority"] = self.metric
        if self.onlink:
            args["flags"] = RTNH_F_ONLINK
        return args


@dataclass(frozen=True)
class Rule:
    """A fwmark policy-routing rule: ``priority: fwmark M/mask lookup T`` (IPv4 unless
    ``family`` is AF_INET6: ``ip -6 rule``)."""

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


def _dump(get: Any, family: int, **kw: Any) -> list[Any]:
    """A netlink dump of one family; nothing for IPv6 on a kernel without it
    (``ipv6.disable=1``: the host is IPv4-only, as before IPv6 support)."""
    try:
        return list(get(family=family, **kw))
    except NetlinkError as exc:
        if family == AF_INET6 and exc.code in (errno.EAFNOSUPPORT, errno.EOPNOTSUPP):
            return []
        raise


def _lookup(ipr: IPRoute, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise SystemSetupError(f"interface {name} does not exist")
    return int(found[0])


def link_index(name: str) -> int:
    """Index of interface ``name``; raises if it does not exist."""
    with _iproute(f"cannot look up interface {name}") as ipr:
        return _lookup(ipr, name)


def _default_routes(ipr: IPRoute, family: int = AF_INET) -> list[tuple[int, int, str | None]]:
    """(metric, oif, gateway) of every unicast default route of the main table."""
    found: list[tuple[int, int, str | None]] = []
    for route in _dump(ipr.get_routes, family, table=MAIN_TABLE, dst_len=0):
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


def _address6(ipr: IPRoute, index: int) -> str | None:
    """The interface's first usable global IPv6 address (not link-local, deprecated,
    failed DAD or a privacy address: the tunnel is no application to hide)."""
    for msg in _dump(ipr.get_addr, AF_INET6, index=index):
        flags = msg.get("IFA_FLAGS")
        flags = msg.get("flags") if flags is None else flags
        if msg.get("scope") != RT_SCOPE_UNIVERSE or flags & (IFA_F_DADFAILED | IFA_F_DEPRECATED):
            continue
        if msg.get("address"):
            return str(msg.get("address"))
    return None


def _info(ipr: IPRoute, index: int, routes: list[tuple[int, int, str | None]],
          routes6: list[tuple[int, int, str | None]] | None = None) -> IfaceInfo:
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
    gateway6 = next((gw for _metric, oif, gw in routes6 or [] if oif == index), None)
    return IfaceInfo(
        name=str(link.get("ifname")),
        index=index,
        address=address,
        prefixlen=prefixlen,
        mtu=int(link.get("mtu")),
        gateway=gateway,
        carrier=(int(link.get("flags") or 0) & _UP_CARRIER) == _UP_CARRIER,
        address6=_address6(ipr, index),
        gateway6=gateway6,
    )


def interface_info(name: str) -> IfaceInfo:
    """Index, primary IPv4 address, MTU and default gateway of interface ``name`` (and
    its global IPv6 address and IPv6 default gateway)."""
    with _iproute(f"cannot read interface {name}") as ipr:
        index = _lookup(ipr, name)
        return _info(ipr, index, _default_routes(ipr), _default_routes(ipr, AF_INET6))


def default_route_interfaces() -> list[IfaceInfo]:
    """Every interface with a default route in the main table, best metric first: the
    IPv4 ones, then those with only an IPv6 default route (an IPv6-only cellular link)."""
    with _iproute("cannot read the default routes") as ipr:
        routes, routes6 = _default_routes(ipr), _default_routes(ipr, AF_INET6)
        seen: list[int] = []
        for _metric, oif, _gateway in routes + routes6:
            if oif not in seen:
                seen.append(oif)
        found = [_info(ipr, index, routes, routes6) for index in seen]
        # an IPv6 default route alone, without a global address, carries nothing
        v4 = {oif for _m, oif, _g in routes}
        return [i for i in found if i.index in v4 or i.address6 is not None]


def list_links() -> dict[int, str]:
    """Index -> name of every network device (``[[interface]]`` patterns match these)."""
    with _iproute("cannot list the network devices") as ipr:
        return {int(link["index"]): str(link.get("ifname")) for link in ipr.get_links()}


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


def flush_table(table: int, family: int | None = None) -> int:
    """Delete every route of ``family`` (None: IPv4 and IPv6) of routing table ``table``;
    returns how many went. IPv6: unicast and blackhole routes only (not the kernel's
    others)."""
    with _iproute(f"cannot flush routing table {table}") as ipr:
        count = 0
        for fam in (AF_INET, AF_INET6) if family is None else (family,):
            for route in _dump(ipr.get_routes, fam, table=table):
                if route.get("table") != table:
                    continue
                if fam == AF_INET6 and route.get("type") not in (1, 6):
                    continue
                try:
                    ipr.route("del", family=fam, table=table, **_route_key(route, fam))
                    count += 1
                except NetlinkError as exc:
                    if exc.code not in (errno.ESRCH, errno.ENODEV):
                        raise
        return count


def _route_key(route: Any, family: int = AF_INET) -> dict[str, Any]:
    """Fields that identify a dumped route for deletion (pyroute2 defaults none of them)."""
    any_ = "0.0.0.0" if family == AF_INET else "::"
    key: dict[str, Any] = {
        "dst": f"{route.get('dst') or any_}/{route.get('dst_len')}",
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
    """Add a policy-routing rule."""
    with _iproute(f"cannot add {rule.describe()}") as ipr:
        ipr.rule("add", **rule.kwargs())


def delete_rule(rule: Rule) -> bool:
    """Delete a policy-routing rule; False if it is already gone."""
    with _iproute(f"cannot delete {rule.describe()}") as ipr:
        try:
            ipr.rule("del", **rule.kwargs())
        except NetlinkError as exc:
            if exc.code in (errno.ENOENT, errno.ESRCH):
                return False
            raise
        return True


def list_rules(family: int | None = None) -> list[Rule]:
    """Every fwmark policy-routing rule of ``family`` (None: IPv4 and IPv6; rules without
    a fwmark are not ours: skipped)."""
    with _iproute("cannot list ip rules") as ipr:
        rules = []
        for fam in (AF_INET, AF_INET6) if family is None else (family,):
            for msg in _dump(ipr.get_rules, fam):
                if msg.get("fwmark") is None or msg.get("priority") is None:
                    continue
                rules.append(
                    Rule(
                        priority=int(msg.get("priority")),
                        table=int(msg.get("table")),
                        fwmark=int(msg.get("fwmark")),
                        fwmask=msg.get("fwmask"),
                        family=fam,
                    )
                )
        return rules
