"""The agent's mesh peers (UPMT-DAM): who is at which VIpA of a mesh anchor, and lookups.

An anchor with ``mesh = true`` tells each of its mesh hosts its pool (AssociationResp
``meshPool``). A packet from this host to an address of that pool is for another host of
the same anchor: its name and public key come from the anchor (PeerReq -> PeerResp: the
anchor vouches for the key it authenticated), the two hosts run a Noise IK session of
their own, and each datagram they seal end to end travels wrapped in a RELAY datagram
through the anchor, which opens and re-seals only the hop (``AnchorForwarder.relay``).

:class:`MeshDirectory` is the pure part: pools, known peers, lookups in flight and a short
negative cache, all bounded, with ``now`` passed in. The driver (``agent.py``) sends the
PeerReqs it asks for and keeps one :class:`link.Link` (``PeerKind.AGENT``) per peer whose
sends it wraps in RELAY datagrams.

Two mesh anchors whose pools overlap (both the default ``100.100.0.0/16``) would make one
VIpA name two hosts, and an address alone cannot say which anchor's host a legacy program
means. So the anchor listed first in the agent's config keeps its mesh, whichever
associates first: the other's is refused with one error line (and its peers forgotten if
it came first), its hosts are not reachable through the mesh, and ``status`` says so
(``mesh``: ``"refused: ..."``). It comes back if the first one leaves the mesh.

A relay path has no UDP address of its own: its "address" is ``(peer key, 0)``
(:func:`relay_addr`); port 0 is never a UDP peer's, so the driver knows a link's send is
for the relay from the address alone.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["MAX_PEERS", "MeshDirectory", "MeshPeer", "RELAY_OVERHEAD", "is_relay_addr",
           "relay_addr"]

log = logging.getLogger(__name__)

MAX_PEERS = 256          # known peers (each one link and one tunnel per interface)
MAX_PENDING = 32         # lookups in flight at once
LOOKUP_TIMEOUT = 4.0     # a lookup with no answer by then may be asked again
NEGATIVE_TTL = 5.0       # seconds a "nobody there" answer is believed
# A relayed datagram carries a second header, a second tag and the peer's VIpA: the
# pool's route gets an MTU this much lower than the TUN's, so nothing is fragmented.
RELAY_OVERHEAD = 16 + 16 + 4


def relay_addr(key: str) -> tuple[str, int]:
    """The pseudo address of the relay path to peer ``key`` (port 0: no UDP peer)."""
    return (key, 0)


def is_relay_addr(addr: tuple[str, int]) -> bool:
    return addr[1] == 0


@dataclass(frozen=True, eq=False)
class MeshPeer:
    """Another host of a mesh anchor, as that anchor vouched for it."""

    name: str            # its SIP name (sipId) at the anchor
    anchor: str          # the anchor whose pool its VIpA is of
    vipa: str
    public_key: bytes

    @property
    def key(self) -> str:
        """Its name in the agent's tables (peer names and anchor names never clash)."""
        return f"{self.name}@{self.anchor}"

    @property
    def vipa_b(self) -> bytes:
        return ipaddress.IPv4Address(self.vipa).packed

    @property
    def addr(self) -> tuple[str, int]:
        return relay_addr(self.key)


class MeshDirectory:
    """Mesh pools per anchor, the peers found in them and the lookups under way."""

    def __init__(self, max_peers: int = MAX_PEERS, max_pending: int = MAX_PENDING,
                 order: Sequence[str] = ()) -> None:
        self.max_peers = max_peers
        self.max_pending = max_pending
        self.order = list(order)                   # the agent's config order of anchors
        self.pools: dict[str, ipaddress.IPv4Network] = {}
        self.offered: dict[str, ipaddress.IPv4Network] = {}   # every pool an anchor gave
        self.refused: dict[str, str] = {}          # anchor -> why its mesh is not used
        self.displaced: list[str] = []             # anchors set_pool just took it from
        self.by_vipa: dict[bytes, MeshPeer] = {}
        self.by_key: dict[str, MeshPeer] = {}
        self.pending: dict[bytes, float] = {}      # VIpA -> when its lookup may be retried
        self.unknown: dict[bytes, float] = {}      # VIpA -> until when "nobody" holds
        self.stash: dict[bytes, bytes] = {}        # VIpA -> an initiation awaiting its lookup

    def _rank(self, anchor: str) -> int:
        return self.order.index(anchor) if anchor in self.order else len(self.order)

    def set_pool(self, anchor: str, pool: str) -> bool:
        """``anchor`` says its mesh pool is ``pool``; False (and nothing changes) if it
        overlaps the pool of an anchor listed before it (a VIpA must name one host). An
        overlapping pool of an anchor listed after it is dropped: those anchors are in
        :attr:`displaced` (the driver forgets their peers, :meth:`drop_anchor`)."""
        net = ipaddress.IPv4Network(pool)
        self.offered[anchor] = net
        if self.pools.get(anchor) == net:
            return True
        clash = [(o, n) for o, n in self.pools.items() if o != anchor and n.overlaps(net)]
        for other, onet in clash:
            if self._rank(other) <= self._rank(anchor):
                self.refused[anchor] = f"refused: {net} overlaps anchor {other}'s {onet}"
                log.error("anchor %s: mesh pool %s overlaps anchor %s's %s, listed before "
                          "it: %s's mesh hosts are not reachable (give mesh anchors "
                          "distinct vipa_pool)", anchor, net, other, onet, anchor)
                return False
        for other, onet in clash:
            del self.pools[other]
            self.refused[other] = f"refused: {onet} overlaps anchor {anchor}'s {net}"
            self.displaced.append(other)
            log.error("anchor %s: mesh pool %s overlaps anchor %s's %s, listed before it: "
                      "%s's mesh hosts are no longer reachable (give mesh anchors distinct "
                      "vipa_pool)", other, onet, anchor, net, other)
        self.refused.pop(anchor, None)
        self.pools[anchor] = net
        return True

    def mesh_state(self, anchor: str) -> str | None:
        """For status: the pool in use, why it is refused, or None (no mesh)."""
        net = self.pools.get(anchor)
        return str(net) if net is not None else self.refused.get(anchor)

    def anchor_of(self, vipa_b: bytes) -> str | None:
        """The mesh anchor whose pool holds ``vipa_b`` (None: not a mesh address; an IPv6
        address never is: the mesh carries IPv4)."""
        if len(vipa_b) != 4:
            return None
        addr = ipaddress.IPv4Address(vipa_b)
        return next((a for a, net in self.pools.items() if addr in net), None)

    def want(self, vipa_b: bytes, now: float) -> str | None:
        """A packet (or an initiation) for ``vipa_b`` found no peer: the anchor to ask
        with a PeerReq now, or None (not a mesh address, asked already, nobody there a
        moment ago, or too many lookups or peers)."""
        anchor = self.anchor_of(vipa_b)
        if anchor is None or vipa_b in self.by_vipa:
            return None
        if self.pending.get(vipa_b, -1.0) > now or self.unknown.get(vipa_b, -1.0) > now:
            return None
        self.unknown.pop(vipa_b, None)
        for v in [v for v, until in self.pending.items() if until <= now]:
            del self.pending[v]
            self.stash.pop(v, None)
        if len(self.pending) >= self.max_pending or len(self.by_key) >= self.max_peers:
            return None
        self.pending[vipa_b] = now + LOOKUP_TIMEOUT
        return anchor

    def found(self, anchor: str, vipa: str, name: str, public_key: bytes, now: float
              ) -> MeshPeer | None:
        """The anchor's answer: the peer (new, or the one already known), or None when
        nobody is there (believed for NEGATIVE_TTL seconds)."""
        try:
            vipa_b = ipaddress.IPv4Address(vipa).packed
        except ValueError:
            return None
        self.pending.pop(vipa_b, None)
        if not name or self.anchor_of(vipa_b) != anchor:
            self.stash.pop(vipa_b, None)
            if len(self.unknown) >= 4 * self.max_peers:
                self.unknown.clear()
            self.unknown[vipa_b] = now + NEGATIVE_TTL
            return None
        old = self.by_vipa.get(vipa_b)
        if old is not None:
            if (old.name, old.public_key) == (name, public_key):
                return old
            self.forget(old)
        if len(self.by_key) >= self.max_peers:
            return None
        p = MeshPeer(name, anchor, vipa, public_key)
        self.by_vipa[vipa_b] = p
        self.by_key[p.key] = p
        return p

    def forget(self, p: MeshPeer) -> None:
        """Forget ``p`` (its session failed, its anchor left): the next packet asks again."""
        if self.by_key.get(p.key) is p:
            del self.by_key[p.key]
        if self.by_vipa.get(p.vipa_b) is p:
            del self.by_vipa[p.vipa_b]

    def drop_anchor(self, anchor: str, left: bool = True) -> list[MeshPeer]:
        """``anchor`` is no mesh any more (``left``; else only displaced): its pool and
        peers go; returns the peers."""
        self.pools.pop(anchor, None)
        if left:
            self.offered.pop(anchor, None)
            self.refused.pop(anchor, None)
        gone = [p for p in self.by_key.values() if p.anchor == anchor]
        for p in gone:
            self.forget(p)
        return gone
