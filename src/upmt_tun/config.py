"""Configuration: TOML files -> frozen dataclasses.

Every problem raises :class:`ConfigError`, whose message is one line naming the
file, the key and what is wrong (the CLI prints it and exits 2). Keys follow
``shared/SPEC.md``.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "AgentConfig",
    "AnchorConfig",
    "AnchorRef",
    "ConfigError",
    "InterfaceConfig",
    "Rule",
    "make_rule",
    "load_agent_config",
    "format_host_port",
    "load_anchor_config",
    "split_host_port",
]

DEFAULT_AGENT_CONFIG = "/etc/upmt/agent.toml"
DEFAULT_ANCHOR_CONFIG = "/etc/upmt/anchor.toml"
DEFAULT_AGENT_CONTROL = "/run/upmt/agent.sock"
DEFAULT_ANCHOR_CONTROL = "/run/upmt/anchor.sock"
DEFAULT_PORT = 5060

DEFAULT_DENY_EGRESS: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = tuple(
    ipaddress.ip_network(n) for n in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
        "172.16.0.0/12", "192.168.0.0/16", "224.0.0.0/4", "240.0.0.0/4",
        # IPv6: unspecified and loopback, IPv4-mapped (::ffff:127.0.0.1 is 127.0.0.1),
        # discard-only, ULA, link-local, site-local (deprecated), multicast
        "::/128", "::1/128", "::ffff:0:0/96", "100::/64", "fc00::/7", "fe80::/10",
        "fec0::/10", "ff00::/8"))

_IFNAME = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")
# an [[interface]] name may be a pattern (fnmatch: *, ?, [...]; hotplug.py)
_IFPATTERN = re.compile(r"^[A-Za-z0-9_.:*?\[\]!-]{1,15}$")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
PROTOCOLS = ("tcp", "udp", "icmp", "any")
PROTO_NUMBERS = {"icmp": 1, "tcp": 6, "udp": 17}
PROTO_ICMPV6 = 58                 # matched by protocol = "icmp" too
# The agent's default fixed IPv6 address: in the ULA prefix fd55:504d:5400::/48 (RFC 4193;
# its global ID 55:504d:54 spells "UPMT"), never routed on the Internet, NATed to the
# anchors' IPv6 VIpAs as vipa_fix is to their IPv4 ones.
DEFAULT_VIPA6_FIX = "fd55:504d:5400::1"
MIN_IPV6_MTU = 1280


def _one_line(text: str) -> str:
    """Escape control characters so a message from hostile input stays on one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class ConfigError(Exception):
    """A local configuration mistake: one line naming the file, the key and the problem."""

    def __init__(self, file: str, key: str, problem: str) -> None:
        super().__init__(_one_line(f"{file}: {key}: {problem}"))
        self.file = file
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class InterfaceConfig:
    name: str
    gateway: str | None = None


@dataclass(frozen=True)
class AnchorRef:
    name: str
    host: str
    port: int
    public_key: bytes = b""


@dataclass(frozen=True)
class Peer:
    """An anchor's ``[[peer]]``: a mobile host allowed to associate."""

    name: str
    public_key: bytes
    mesh: bool = False          # may reach (and be reached by) the anchor's other mesh peers


@dataclass(frozen=True)
class Rule:
    """One ``[[rule]]``; ``index`` is its position in the file (first match wins)."""

    index: int
    name: str
    protocol: str = "any"
    dst: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    dst_port: tuple[int, int] | None = None
    src_port: tuple[int, int] | None = None
    uid: int | None = None
    cgroup: str | None = None
    via: tuple[str, ...] = ()
    anchor: str | None = None

    @property
    def proto_number(self) -> int | None:
        return PROTO_NUMBERS.get(self.protocol)

    def matches(self, proto: int, dst: bytes, sport: int, dport: int) -> bool:
        """Whether a packet's header fields satisfy this rule (uid/cgroup not checkable here)."""
        pn = self.proto_number
        if pn is not None and pn != proto and not (pn == 1 and proto == PROTO_ICMPV6):
            return False          # "icmp" is ICMP and ICMPv6
        if (self.dst_port or self.src_port) and proto not in (6, 17):
            return False          # port matches select TCP and UDP only (also with "any")
        if self.dst is not None and (len(dst) != self.dst.max_prefixlen // 8
                                     or ipaddress.ip_address(dst) not in self.dst):
            return False          # an IPv4 dst never matches IPv6 flows, nor the reverse
        if self.dst_port is not None and not self.dst_port[0] <= dport <= self.dst_port[1]:
            return False
        return self.src_port is None or self.src_port[0] <= sport <= self.src_port[1]


@dataclass(frozen=True)
class AgentConfig:
    path: str
    name: str
    vipa_fix: str
    control: str
    mtu: int | None
    fwmark: int
    table: int
    interfaces: tuple[InterfaceConfig, ...]  # empty: every interface with a default route
    anchors: tuple[AnchorRef, ...]
    rules: tuple[Rule, ...]
    keepalive_s: float = 10.0
    tun: str = "upmt0"
    private_key: bytes = b""
    plaintext_data: bool = False        # insecure_plaintext_for_benchmarks
    return_after_s: float = 5.0         # hysteresis before flows return to a preferred iface
    metrics: tuple[str, int] | None = None   # Prometheus endpoint, off by default
    group: int | None = None            # gid whose members may use status/run (control.py)
    mark_mask: int = 0xFFFF             # packet-mark bits of F..F+1+n (ip rule fwmark X/mask)
    rule_priority: int = 5200           # ip rule priorities P (tunnel sockets) and P+1 (steered)
    direct: bool = True                 # mesh peers: try direct paths (false: relay only)
    vipa6_fix: str = DEFAULT_VIPA6_FIX  # "": no IPv6 inside the tunnels


@dataclass(frozen=True)
class AnchorConfig:
    path: str
    role: str
    listen_host: str
    listen_port: int
    vipa_pool: ipaddress.IPv4Network
    nat_interface: str | None
    control: str
    mtu: int = 1440
    tun: str = "upmtan0"
    max_associations: int = 1024
    max_flows_per_host: int = 4096
    private_key: bytes = b""
    peers: tuple[Peer, ...] = ()
    plaintext_data: bool = False        # insecure_plaintext_for_benchmarks
    allow_egress: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    deny_egress: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = DEFAULT_DENY_EGRESS
    mesh: bool = False                  # its [[peer]]s may reach one another (UPMT-DAM)
    metrics: tuple[str, int] | None = None   # Prometheus endpoint, off by default
    group: int | None = None            # gid whose members may use status (control.py)
    state_dir: str = "/var/lib/upmt"    # VIpA leases; "" keeps them in memory only
    lease_days: float = 30.0            # a lease of a host not seen for this long is dropped
    vipa6_pool: ipaddress.IPv6Network | None = None   # IPv6 VIpAs; None: IPv4 only


class _Reader:
    """Typed access to one TOML table with file/key context for errors."""

    def __init__(self, file: str, data: dict[str, Any], prefix: str = "") -> None:
        self.file = file
        self.data = data
        self.prefix = prefix
        self.used: set[str] = set()

    def key(self, k: str) -> str:
        return f"{self.prefix}{k}"

    def err(self, k: str, problem: str) -> ConfigError:
        return ConfigError(self.file, self.key(k), problem)

    def get(self, k: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        self.used.add(k)
        if k not in self.data:
            return default
        v = self.data[k]
        if isinstance(v, bool) and kind is not bool and bool not in _as_tuple(kind):
            raise self.err(k, f"expected {_kind_name(kind)}, got a boolean")
        if not isinstance(v, kind):
            raise self.err(k, f"expected {_kind_name(kind)}, got {type(v).__name__} {v!r}")
        return v

    def finish(self, known_later: tuple[str, ...] = ()) -> None:
        for k in self.data:
            if k not in self.used and k not in known_later:
                raise self.err(k, "unknown key")


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", list: "a list", bool: "a boolean",
             float: "a number", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in _as_tuple(kind))


def _load_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, "-", "file not found") from None
    except PermissionError:
        raise ConfigError(path, "-", "permission denied") from None
    except IsADirectoryError:
        raise ConfigError(path, "-", "is a directory") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "-", f"not valid TOML ({e})") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "-", "not UTF-8 text") from None


def _ipv4(r: _Reader, k: str, v: str) -> str:
    try:
        return str(ipaddress.IPv4Address(v))
    except ValueError:
        raise r.err(k, f"not an IPv4 address: {v!r}") from None


_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})"
                       r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?$")


def split_host_port(v: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``host:port``, ``[v6]:port``, ``host`` or ``[v6]`` -> (host, port), the host an
    address in its canonical text form (``2001:db8::1``) or a name; ValueError with the
    reason otherwise. A bare IPv6 address is refused: ``2001:db8::1:5060`` could mean
    either, so IPv6 takes brackets (as in URLs)."""
    if v.startswith("["):
        inner, sep, rest = v[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"expected [IPv6]:port, got {v!r}")
        try:
            host = str(ipaddress.IPv6Address(inner))
        except ValueError:
            raise ValueError(f"not an IPv6 address in brackets: {v!r}") from None
        port_s = rest[1:] if rest else str(default_port)
    else:
        if v.count(":") > 1:
            raise ValueError(f"an IPv6 address takes brackets, e.g. \"[2001:db8::1]:5060\", "
                             f"got {v!r}")
        host, sep, port_s = v.rpartition(":")
        if not sep:
            host, port_s = v, str(default_port)
        if not host:
            raise ValueError(f"expected host:port, got {v!r}")
        try:
            host = str(ipaddress.IPv4Address(host))
        except ValueError:
            if not _HOSTNAME.match(host) or host.replace(".", "").isdigit():
                raise ValueError(f"not an IPv4 address or host name: {host!r}") from None
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"bad port in {v!r}") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"port out of range in {v!r}")
    return host, port


def format_host_port(host: str, port: int) -> str:
    """The inverse of :func:`split_host_port`: brackets around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _host_port(r: _Reader, k: str, v: str) -> tuple[str, int]:
    try:
        return split_host_port(v)
    except ValueError as e:
        raise r.err(k, str(e)) from None


def _metrics(r: _Reader) -> tuple[str, int] | None:
    """``metrics = "ADDR:PORT"`` (an IPv4 address: the endpoint is not meant for the
    Internet, so no name and no default of every address), or None when absent."""
    v = r.get("metrics", str, None)
    if v is None:
        return None
    host, port = _host_port(r, "metrics", v)
    if ":" not in v:
        raise r.err("metrics", f"expected ADDR:PORT such as \"127.0.0.1:9586\", got {v!r}")
    return _ipv4(r, "metrics", host), port


def _port_range(r: _Reader, k: str, v: Any) -> tuple[int, int]:
    if isinstance(v, bool):
        raise r.err(k, "expected a port number or \"LOW-HIGH\"")
    if isinstance(v, int):
        lo = hi = v
    elif isinstance(v, str):
        m = re.fullmatch(r"\s*(\d{1,5})\s*(?:-\s*(\d{1,5})\s*)?", v)
        if not m:
            raise r.err(k, f"expected a port number or \"LOW-HIGH\", got {v!r}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
    else:
        raise r.err(k, f"expected a port number or \"LOW-HIGH\", got {v!r}")
    if not (0 < lo <= 65535 and 0 < hi <= 65535) or lo > hi:
        raise r.err(k, f"bad port range {v!r}")
    return lo, hi


def _ifname(r: _Reader, k: str, v: str) -> str:
    if not _IFNAME.match(v):
        raise r.err(k, f"not a valid interface name: {v!r}")
    return v


def _uid(r: _Reader, k: str, v: Any) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        if v < 0:
            raise r.err(k, "uid must be >= 0")
        return v
    if isinstance(v, str):
        import pwd

        try:
            return pwd.getpwnam(v).pw_uid
        except KeyError:
            raise r.err(k, f"no such user {v!r}") from None
    raise r.err(k, f"expected a uid number or user name, got {v!r}")


def _group(r: _Reader) -> int | None:
    """``group = "upmt"`` (or a gid): members may use the control socket for ``status``
    (and the agent's ``run``); None: root only."""
    if "group" not in r.data:
        return None
    v = r.get("group", (str, int))
    if isinstance(v, int) and not isinstance(v, bool):
        if not 0 < v < 2**32 - 1:
            raise r.err("group", f"expected a group name or a gid above 0, got {v}")
        return v
    if isinstance(v, str):
        import grp

        try:
            return grp.getgrnam(v).gr_gid
        except KeyError:
            raise r.err("group", f"no such group {v!r}") from None
    raise r.err("group", f"expected a group name or gid, got {v!r}")


def _key_text(r: _Reader, k: str, v: str) -> bytes:
    try:
        raw = base64.b64decode(v.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise r.err(k, "not a base64 X25519 key (as printed by genkey / pubkey)")
    return raw


def _private_key(r: _Reader) -> bytes:
    """``private_key`` or ``private_key_file`` (exactly one): the raw 32-byte key."""
    text = r.get("private_key", str, None)
    fpath = r.get("private_key_file", str, None)
    if text is not None and fpath is not None:
        raise r.err("private_key_file", "give private_key or private_key_file, not both")
    if fpath is not None:
        full = Path(r.file).parent / fpath
        try:
            text = full.read_bytes().decode("ascii")
        except OSError as e:
            raise r.err("private_key_file", f"cannot read {full}: {e.strerror}") from None
        except UnicodeDecodeError:
            text = ""    # reported as not a key just below
        return _key_text(r, "private_key_file", text)
    if text is None:
        raise r.err("private_key", "missing (generate one with `genkey`; there is no "
                    "unauthenticated mode)")
    return _key_text(r, "private_key", text)


_Net = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(r: _Reader, k: str, default: tuple[_Net, ...]) -> tuple[_Net, ...]:
    """IPv4 and IPv6 CIDRs (an IPv4-mapped IPv6 one such as ::ffff:127.0.0.1 is applied
    as the IPv4 network it names too: system/anchor_host.egress_nets)."""
    items = r.get(k, list, None)
    if items is None:
        return default
    out: list[_Net] = []
    for v in items:
        if not isinstance(v, str):
            raise r.err(k, f"expected CIDR strings, got {v!r}")
        try:
            out.append(ipaddress.ip_network(v.strip(), strict=False))   # normalised form
        except ValueError:
            raise r.err(k, f"not an IPv4 or IPv6 address or CIDR: {v!r}") from None
    return tuple(out)


def load_agent_config(path: str) -> AgentConfig:
    """Parse and check an agent config file; raise ConfigError on any problem."""
    r = _Reader(path, _load_toml(path))
    name = r.get("name", str, socket.gethostname())
    if not _NAME.match(name):
        raise r.err("name", f"use letters, digits, '.', '_' or '-' (got {name!r})")
    vipa_fix = _ipv4(r, "vipa_fix", r.get("vipa_fix", str, "100.64.0.1"))
    vipa6_fix = r.get("vipa6_fix", str, DEFAULT_VIPA6_FIX)
    if vipa6_fix:
        try:
            a6 = ipaddress.IPv6Address(vipa6_fix)
        except ValueError:
            raise r.err("vipa6_fix", f"not an IPv6 address (\"\" turns IPv6 off): "
                        f"{vipa6_fix!r}") from None
        if (a6.is_link_local or a6.is_multicast or a6.is_unspecified or a6.is_loopback
                or a6.ipv4_mapped is not None):
            raise r.err("vipa6_fix", f"{a6}: must be a unicast global or ULA address "
                        "(not link-local, multicast, loopback, :: or IPv4-mapped)")
        vipa6_fix = str(a6)
    control = r.get("control", str, DEFAULT_AGENT_CONTROL)
    mtu = r.get("mtu", int, None)
    if mtu is not None and not 576 <= mtu <= 65535:
        raise r.err("mtu", f"must be between 576 and 65535, got {mtu}")
    fwmark = r.get("fwmark", int, 0x5550)
    if not 1 <= fwmark <= 0xFF00:
        raise r.err("fwmark", "must be between 1 and 0xff00 (the low 16 bits carry it)")
    table = r.get("table", int, 5550)
    if not 1 <= table <= 0xFFFFFF00 or any(t in (253, 254, 255) for t in range(table, table + 18)):
        raise r.err("table", f"{table}: tables {table}..{table + 17} must avoid 253-255 "
                    "(default, main, local)")
    mark_mask = r.get("mark_mask", int, 0xFFFF)
    if not 0 < mark_mask <= 0xFFFF or any(m & ~mark_mask for m in range(fwmark, fwmark + 18)):
        raise r.err("mark_mask", f"{mark_mask:#x}: must lie within 0xffff and hold the marks "
                    f"{fwmark:#x}..{fwmark + 17:#x} (fwmark, then one per interface)")
    rule_priority = r.get("rule_priority", int, 5200)
    if not 1 <= rule_priority <= 32764:
        raise r.err("rule_priority", f"{rule_priority}: must be between 1 and 32764 (it and "
                    "the next one are used; 0, 32766 and 32767 are the kernel's)")
    keepalive = r.get("keepalive", (int, float), 10.0)
    if not 1 <= keepalive <= 300:
        raise r.err("keepalive", "must be between 1 and 300 seconds")
    return_after = r.get("return_after", (int, float), 5.0)
    if not 0 <= return_after <= 3600:
        raise r.err("return_after", "must be between 0 and 3600 seconds")
    tun = _ifname(r, "tun", r.get("tun", str, "upmt0"))

    ifaces: list[InterfaceConfig] = []
    for i, t in enumerate(r.get("interface", list, [])):
        ir = _Reader(path, _table(r, "interface", i, t), f"interface[{i}].")
        if "name" not in t:
            raise ir.err("name", "missing")
        iname = ir.get("name", str)
        if not _IFPATTERN.match(iname):
            raise ir.err("name", f"not a valid interface name or pattern: {iname!r}")
        gw = ir.get("gateway", str, None)
        ifaces.append(InterfaceConfig(iname, _ipv4(ir, "gateway", gw) if gw else None))
        ir.finish()
        if iname in [x.name for x in ifaces[:-1]]:
            raise ir.err("name", f"interface {iname!r} listed twice")
    if len(ifaces) > 16:
        raise r.err("interface", "at most 16 interfaces")

    anchors: list[AnchorRef] = []
    for i, t in enumerate(r.get("anchor", list, [])):
        ar = _Reader(path, _table(r, "anchor", i, t), f"anchor[{i}].")
        for req in ("name", "address"):
            if req not in t:
                raise ar.err(req, "missing")
        aname = ar.get("name", str)
        if not _NAME.match(aname):
            raise ar.err("name", f"use letters, digits, '.', '_' or '-' (got {aname!r})")
        if aname in [a.name for a in anchors]:
            raise ar.err("name", f"anchor {aname!r} listed twice")
        host, port = _host_port(ar, "address", ar.get("address", str))
        if "public_key" not in t:
            raise ar.err("public_key", "missing (the anchor's `pubkey`)")
        anchors.append(AnchorRef(aname, host, port,
                                 _key_text(ar, "public_key", ar.get("public_key", str))))
        ar.finish()
    if not anchors:
        raise r.err("anchor", "at least one [[anchor]] is needed")

    iface_names = {x.name for x in ifaces}
    anchor_names = {a.name for a in anchors}
    rules: list[Rule] = []
    for i, t in enumerate(r.get("rule", list, [])):
        rules.append(_rule(path, r, i, t, iface_names, anchor_names))
    if len(rules) > 255:
        raise r.err("rule", "at most 255 rules")
    if len({x.name for x in rules}) != len(rules):
        raise r.err("rule", "two rules share a name")
    key = _private_key(r)
    plaintext = r.get("insecure_plaintext_for_benchmarks", bool, False)
    metrics = _metrics(r)
    group = _group(r)
    direct = r.get("direct", bool, True)
    r.finish()
    return AgentConfig(path, name, vipa_fix, control, mtu, fwmark, table, tuple(ifaces),
                       tuple(anchors), tuple(rules), float(keepalive), tun, key, plaintext,
                       float(return_after), metrics=metrics, group=group, mark_mask=mark_mask,
                       rule_priority=rule_priority, direct=direct, vipa6_fix=vipa6_fix)


def _table(r: _Reader, k: str, i: int, t: Any) -> dict[str, Any]:
    if not isinstance(t, dict):
        raise ConfigError(r.file, f"{k}[{i}]", "expected a table ([[...]])")
    return t


def _rule(path: str, r: _Reader, i: int, t: Any, ifaces: set[str], anchors: set[str]) -> Rule:
    rr = _Reader(path, _table(r, "rule", i, t), f"rule[{i}].")
    if "name" not in t:
        raise rr.err("name", "missing")
    name = rr.get("name", str)
    if not _NAME.match(name):
        raise rr.err("name", f"use letters, digits, '.', '_' or '-' (got {name!r})")
    protocol = rr.get("protocol", str, "any")
    if protocol not in PROTOCOLS:
        raise rr.err("protocol", f"expected one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    dst = None
    if "dst" in t:
        d = rr.get("dst", str)
        try:
            dst = ipaddress.ip_network(d.strip(), strict=False)
        except ValueError:
            raise rr.err("dst", f"not an IPv4 or IPv6 address or CIDR: {d!r}") from None
    ports: dict[str, tuple[int, int] | None] = {}
    for k in ("dst_port", "src_port"):
        ports[k] = None
        if k in t:
            rr.used.add(k)
            if protocol == "icmp":
                raise rr.err(k, "ports do not apply to protocol \"icmp\"")
            ports[k] = _port_range(rr, k, t[k])
    uid = None
    if "uid" in t:
        rr.used.add("uid")
        uid = _uid(rr, "uid", t["uid"])
    cgroup = rr.get("cgroup", str, None)
    if cgroup is not None:
        cgroup = cgroup.strip("/")
        if not cgroup or ".." in cgroup.split("/") or '"' in cgroup:
            raise rr.err("cgroup", f"expected a path under the cgroup v2 root, got {t['cgroup']!r}")
    via = rr.get("via", list, [])
    for v in via:
        if not isinstance(v, str):
            raise rr.err("via", f"expected interface names, got {v!r}")
        if ifaces and v not in ifaces:
            raise rr.err("via", f"{v!r} is not a configured [[interface]]")
    anchor = rr.get("anchor", str, None)
    if anchor is not None and anchor not in anchors:
        raise rr.err("anchor", f"{anchor!r} is not a configured [[anchor]]")
    rr.finish()
    return Rule(i, name, protocol, dst, ports["dst_port"], ports["src_port"], uid, cgroup,
                tuple(via), anchor)


def make_rule(cfg: AgentConfig, name: str, *, protocol: str = "any",
              dst: str | ipaddress.IPv4Network | ipaddress.IPv6Network | None = None,
              dst_port: int | str | tuple[int, int] | None = None,
              src_port: int | str | tuple[int, int] | None = None,
              uid: int | str | None = None, cgroup: str | None = None,
              via: tuple[str, ...] | list[str] = (), anchor: str | None = None,
              source: str = "add_rule") -> Rule:
    """A rule for ``cfg`` given in code (``Agent.add_rule``), checked exactly as a
    ``[[rule]]`` table of its file: ConfigError (one line, ``source`` in place of the
    file) for a bad field, a ``via`` that is not one of its ``[[interface]]`` entries or
    an ``anchor`` that is not one of its anchors. Ports: a number, ``"LOW-HIGH"`` or a
    ``(low, high)`` pair. Its ``index`` (position) is set where it is inserted."""
    t: dict[str, Any] = {"name": name, "protocol": protocol}
    if dst is not None:
        t["dst"] = str(dst)
    for k, v in (("dst_port", dst_port), ("src_port", src_port)):
        if isinstance(v, tuple):
            t[k] = f"{v[0]}-{v[1]}" if len(v) == 2 and all(
                type(x) is int for x in v) else repr(v)
        elif v is not None:
            t[k] = v
    for k, w in (("uid", uid), ("cgroup", cgroup), ("anchor", anchor)):
        if w is not None:
            t[k] = w
    if via:
        t["via"] = list(via)
    r = _Reader(source, {"rule": [t]})
    return _rule(source, r, 0, t, {i.name for i in cfg.interfaces},
                 {a.name for a in cfg.anchors})


def rule_fields(rule: Rule) -> dict[str, Any]:
    """A rule's fields as :func:`make_rule` takes them (to check a :class:`Rule` built in
    code the same way)."""
    return {"protocol": rule.protocol, "dst": rule.dst, "dst_port": rule.dst_port,
            "src_port": rule.src_port, "uid": rule.uid, "cgroup": rule.cgroup,
            "via": rule.via, "anchor": rule.anchor}


def load_anchor_config(path: str) -> AnchorConfig:
    """Parse and check an anchor config file; raise ConfigError on any problem."""
    r = _Reader(path, _load_toml(path))
    role = r.get("role", str, "anchor")
    if role not in ("anchor", "fixed-host"):
        raise r.err("role", f"expected \"anchor\" or \"fixed-host\", got {role!r}")
    if "listen" not in r.data:
        raise r.err("listen", "missing (host:port to listen on, e.g. \"0.0.0.0:5060\")")
    host, port = _host_port(r, "listen", r.get("listen", str))
    try:                      # "[::]:5060": both families on one socket (IPV6_V6ONLY=0)
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise r.err("listen", f"not an IP address: {host!r} (\"0.0.0.0:5060\", "
                    "\"[::]:5060\" for both families, or one address)") from None
    pool_s = r.get("vipa_pool", str, "100.100.0.0/16")
    try:
        pool = ipaddress.IPv4Network(pool_s)
    except ValueError as e:
        raise r.err("vipa_pool", f"not an IPv4 network: {pool_s!r} ({e})") from None
    if pool.num_addresses < 4:
        raise r.err("vipa_pool", "too small (need at least a /30)")
    pool6 = None
    pool6_s = r.get("vipa6_pool", str, "")
    if pool6_s:
        try:
            pool6 = ipaddress.IPv6Network(pool6_s)
        except ValueError as e:
            raise r.err("vipa6_pool", f"not an IPv6 network: {pool6_s!r} ({e})") from None
        if pool6.prefixlen > 126:
            raise r.err("vipa6_pool", "too small (need at least a /126)")
        if pool6.is_link_local or pool6.is_multicast or pool6.is_loopback \
                or pool6.network_address.ipv4_mapped is not None:
            raise r.err("vipa6_pool", f"{pool6}: must be global or ULA unicast")
    nat_if = r.get("nat_interface", str, None)
    if nat_if is not None:
        nat_if = _ifname(r, "nat_interface", nat_if)
    if role == "anchor" and nat_if is None:
        raise r.err("nat_interface", "missing (needed with role = \"anchor\")")
    control = r.get("control", str, DEFAULT_ANCHOR_CONTROL)
    mtu = r.get("mtu", int, 1440)
    if not 576 <= mtu <= 65535:
        raise r.err("mtu", f"must be between 576 and 65535, got {mtu}")
    tun = _ifname(r, "tun", r.get("tun", str, "upmtan0"))
    max_assoc = r.get("max_associations", int, 1024)
    if max_assoc < 1:
        raise r.err("max_associations", "must be >= 1")
    key = _private_key(r)
    mesh = r.get("mesh", bool, False)
    peers: list[Peer] = []
    for i, t in enumerate(r.get("peer", list, [])):
        pr = _Reader(path, _table(r, "peer", i, t), f"peer[{i}].")
        for req in ("name", "public_key"):
            if req not in t:
                raise pr.err(req, "missing")
        pname = pr.get("name", str)
        if not _NAME.match(pname):
            raise pr.err("name", f"use letters, digits, '.', '_' or '-' (got {pname!r})")
        pkey = _key_text(pr, "public_key", pr.get("public_key", str))
        if pname in [p.name for p in peers]:
            raise pr.err("name", f"peer {pname!r} listed twice")
        if pkey in [p.public_key for p in peers]:
            raise pr.err("public_key", "the same key is listed for another peer")
        peer_mesh = pr.get("mesh", bool, mesh)
        if peer_mesh and not mesh:
            raise pr.err("mesh", "needs mesh = true at the top of the anchor's config")
        pr.finish()
        peers.append(Peer(pname, pkey, peer_mesh))
    if not peers:
        raise r.err("peer", "at least one [[peer]] (name + public_key of a mobile host) "
                    "is needed: a host not listed cannot associate")
    plaintext = r.get("insecure_plaintext_for_benchmarks", bool, False)
    per_host = r.get("max_flows_per_host", int, 4096)
    if not 16 <= per_host <= 1_000_000:
        raise r.err("max_flows_per_host", "must be between 16 and 1000000")
    allow = _networks(r, "allow_egress", ())
    deny = _networks(r, "deny_egress", DEFAULT_DENY_EGRESS)
    metrics = _metrics(r)
    group = _group(r)
    state_dir = r.get("state_dir", str, "/var/lib/upmt")
    if state_dir and (not state_dir.startswith("/") or "\0" in state_dir):
        raise r.err("state_dir", f"expected an absolute directory path (or \"\" to keep "
                    f"leases in memory only), got {state_dir!r}")
    lease_days = r.get("lease_days", (int, float), 30)
    if not 1 <= lease_days <= 3650:
        raise r.err("lease_days", f"must be between 1 and 3650 days, got {lease_days}")
    r.finish()
    return AnchorConfig(path, role, host, port, pool, nat_if, control, mtu, tun, max_assoc,
                        per_host, key, tuple(peers), plaintext, allow, deny, mesh=mesh,
                        metrics=metrics, group=group, state_dir=state_dir,
                        lease_days=float(lease_days), vipa6_pool=pool6)

