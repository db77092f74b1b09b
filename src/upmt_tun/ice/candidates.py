"""ICE candidates of the tunnel sockets (RFC 8445 section 5.1), gathered without any I/O.

Every access network has one tunnel socket, bound to its interface and routed to its
gateway (DESIGN.md, *Marks, tables, priorities*). ICE must use those very sockets: a NAT
mapping belongs to the socket that opened it. So a socket yields at most two candidates:

* ``host``: the interface address and the socket's port;
* ``srflx``: the public address and port the anchor saw this socket's tunnel come from
  (``TunnelSetupResp`` ``yourAddress``/``yourPort``). The anchor is our STUN server: no
  other server is asked, so no extra mapping is opened.

Priorities follow RFC 8445 section 5.1.2.1 (type preference host 126 > srflx 100, local
preference by interface order: the first interface of the agent's config is preferred, as
RFC 8421 suggests for multihomed hosts). Foundations are aioice's hash of type, transport
and base, with the interface name in the base, so two interfaces that happen to carry the
same private address keep distinct foundations and are not frozen behind each other.

What is dropped: loopback, link-local, unspecified and multicast addresses (never reachable
by a peer), a reflexive address of another family than the socket's (an IPv4 socket cannot
send to it), a reflexive address equal to a host one (no NAT: the host candidate says it
all), duplicates, anything unparsable (the reflexive address is remote input), and
everything beyond ``max_candidates`` (lowest priority first).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from aioice.candidate import Candidate as _AioCandidate
from aioice.candidate import candidate_foundation, candidate_priority

__all__ = [
    "COMPONENT",
    "MAX_CANDIDATES",
    "TYPE_PREFERENCE",
    "Addr",
    "IceCandidate",
    "TunnelSocket",
    "gather",
    "local_preference",
    "usable_address",
]

Addr = tuple[str, int]
COMPONENT = 1                 # one component: the tunnel
MAX_CANDIDATES = 8
TYPES = ("host", "srflx", "prflx", "relay")
TYPE_PREFERENCE = {"host": 126, "prflx": 110, "srflx": 100, "relay": 0}
_FOUNDATION = re.compile(r"[A-Za-z0-9+/]{1,32}\Z")
_DIGITS = re.compile(r"[0-9]{1,10}\Z")
_TOKEN = re.compile(r"[!-~]{1,64}\Z")        # printable ASCII, no space


def usable_address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address when a peer could ever reach it; None for junk and local-only scopes."""
    try:
        a = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if a.is_loopback or a.is_link_local or a.is_unspecified or a.is_multicast:
        return None
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        return None
    return a


def local_preference(index: int) -> int:
    """RFC 8445 local preference of the socket at ``index`` in interface order."""
    return max(0, 65535 - index)


@dataclass(frozen=True)
class IceCandidate:
    """One candidate. Local ones name their tunnel socket; remote ones have ``socket_id`` None.

    A frozen value type (aioice's ``Candidate`` is mutable and compares by identity); the
    SDP line codec is aioice's, with the strictness :func:`from_sdp` adds.
    """

    foundation: str
    priority: int
    ip: str
    port: int
    type: str
    component: int = COMPONENT
    related: Addr | None = None
    socket_id: int | None = None

    @property
    def addr(self) -> Addr:
        return (self.ip, self.port)

    @property
    def version(self) -> int:
        return ipaddress.ip_address(self.ip).version

    def to_sdp(self) -> str:
        """The value of an ``a=candidate:`` line (RFC 8839 section 5.1)."""
        c = _AioCandidate(
            foundation=self.foundation, component=self.component, transport="udp",
            priority=self.priority, host=self.ip, port=self.port, type=self.type,
            related_address=self.related[0] if self.related else None,
            related_port=self.related[1] if self.related else None)
        return c.to_sdp()

    @classmethod
    def from_sdp(cls, value: str) -> IceCandidate:
        """Parse an ``a=candidate:`` value strictly; ValueError names the first problem.

        aioice's parser accepts a missing ``typ`` keyword, any transport and any host
        string; a candidate we cannot use is an error here, except for the extension
        attributes RFC 8839 lets a peer add (name/value pairs, ignored).
        """
        bits = value.split(" ")
        if len(bits) < 8 or len(bits) % 2:
            raise ValueError("candidate: wrong number of fields")
        if bits[6] != "typ":
            raise ValueError("candidate: 'typ' missing")
        if not all(_DIGITS.match(bits[i]) for i in (1, 3, 5)):
            raise ValueError("candidate: component, priority and port must be digits")
        for i in range(8, len(bits), 2):
            if not _TOKEN.match(bits[i]) or not _TOKEN.match(bits[i + 1]):
                raise ValueError("candidate: bad extension attribute")
            if bits[i] == "rport" and not _DIGITS.match(bits[i + 1]):
                raise ValueError("candidate: rport must be digits")
        c = _AioCandidate.from_sdp(value)
        if not _FOUNDATION.match(c.foundation):
            raise ValueError("candidate: bad foundation")
        if c.component != COMPONENT:
            raise ValueError("candidate: component must be 1")
        if c.transport.lower() != "udp":
            raise ValueError("candidate: transport must be UDP")
        if not 1 <= c.priority <= 0x7FFFFFFF:
            raise ValueError("candidate: priority out of range")
        if c.type not in TYPES:
            raise ValueError("candidate: unknown type")
        ip = _ip_literal(c.host)
        if not 1 <= c.port <= 65535:
            raise ValueError("candidate: port out of range")
        related: Addr | None = None
        if (c.related_address is None) != (c.related_port is None):
            raise ValueError("candidate: raddr and rport go together")
        if c.related_address is not None and c.related_port is not None:
            if not 0 <= c.related_port <= 65535:
                raise ValueError("candidate: rport out of range")
            related = (_ip_literal(c.related_address), c.related_port)
        return cls(foundation=c.foundation, priority=c.priority, ip=ip, port=c.port,
                   type=c.type, related=related)


def _ip_literal(s: str) -> str:
    try:
        return str(ipaddress.ip_address(s))
    except ValueError:
        raise ValueError("candidate: address is not an IP literal") from None


@dataclass(frozen=True)
class TunnelSocket:
    """What the driver knows about one tunnel socket, in interface order."""

    socket_id: int
    interface: str
    local: Addr                   # interface address, socket port
    reflexive: Addr | None = None  # the anchor's yourAddress/yourPort for this socket


def _candidate(kind: str, sock: TunnelSocket, index: int, addr: Addr,
               related: Addr | None) -> IceCandidate:
    base = f"{sock.interface}|{sock.local[0]}"
    return IceCandidate(
        foundation=candidate_foundation(kind, "udp", base),
        priority=candidate_priority(COMPONENT, kind, local_preference(index)),
        ip=addr[0], port=addr[1], type=kind, related=related, socket_id=sock.socket_id)


def gather(sockets: Sequence[TunnelSocket],
           max_candidates: int = MAX_CANDIDATES) -> tuple[IceCandidate, ...]:
    """The local candidates of these sockets, best first (see the module docstring)."""
    out: list[IceCandidate] = []
    seen: set[Addr] = set()
    for index, sock in enumerate(sockets):
        host = usable_address(sock.local[0])
        if host is None or not 1 <= sock.local[1] <= 65535:
            continue       # a socket without a usable address has no candidate at all
        host_addr = (str(host), sock.local[1])
        if host_addr not in seen:
            seen.add(host_addr)
            out.append(_candidate("host", sock, index, host_addr, None))
        if sock.reflexive is None:
            continue
        refl = usable_address(sock.reflexive[0])
        if refl is None or refl.version != host.version or not 1 <= sock.reflexive[1] <= 65535:
            continue
        refl_addr = (str(refl), sock.reflexive[1])
        if refl_addr not in seen:
            seen.add(refl_addr)
            out.append(_candidate("srflx", sock, index, refl_addr, host_addr))
    out.sort(key=lambda c: -c.priority)
    return tuple(out[:max(0, max_candidates)])
