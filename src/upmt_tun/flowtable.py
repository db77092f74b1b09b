"""The anchor's Per-Application Forwarding Table, laid out in columns.

An anchor holds up to ``max_flows`` (100 000) flows of many hosts; a flow object per
entry (``tables.Flow``: a slotted object, a key tuple of five objects, a float or two,
an int per counter) costs about 550 bytes there. Here a flow is:

* its **key**: one Python int packing the uplink 5-tuple (:func:`pack_key`), 13 bytes
  of information in one 40-byte object, the key of the one dict ``rows``: key -> row;
* its **row**: a slot in typed columns (``array.array``: tunnel id, newest sequence
  number as generation and counter, packet counters, first and last packet time, flow
  id), about 60 bytes with no Python object per flow. Rows of removed flows go to a free
  list and are reused (their row ints too), so the columns keep the high-water mark;
* **rare data** in side tables keyed by row, made only for flows that need it: the
  history of a flow that moved (most never do; a flow's start is derived from its
  columns), the ``static`` mark. The mobile host a flow belongs to is not stored: its
  source address is the host's VIpA, and the caller's ``owner`` names the host of a VIpA.

Per packet the forwarder makes one call: :meth:`AnchorPaft.up` (uplink: learn, count,
implicit handover) or :meth:`AnchorPaft.down` (downlink: count, which tunnel). The rare
paths (status, signalled handover, expiry) work on rows or build :class:`AnchorFlow`
views, which read the columns live and give the status JSON of ``tables.Flow``.

Key layout (big-endian, what ``int.from_bytes(src + proto + dst + sport + dport)``
gives)::

    bits 72..103  src (IPv4)      bits 64..71  protocol
    bits 32..63   dst (IPv4)      bits 16..31  sport       bits 0..15  dport

so ``key >> KEY_SRC_SHIFT`` is the source address, the part caps and hosts are keyed by.
:func:`flow_key` makes the key straight from a packet, :func:`uplink_key` also checks
that it is the sending host's (compiled for TCP/UDP in ``dataplane/_fast.pyx``;
:func:`py_flow_key` and :func:`py_uplink_key` are the reference, ``nat.py_five_tuple``
packed). Pure data, no I/O, ``now`` passed in.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from typing import Any

from . import nat
from .tables import HISTORY_LEN, FlowKey, History, flow_json

__all__ = ["KEY6", "KEY6_SRC_SHIFT", "KEY_SRC_SHIFT", "AnchorFlow", "AnchorPaft", "flow_key",
           "key_source", "pack_key", "py_flow_key", "source_bytes", "source_of",
           "py_uplink_key", "unpack_key", "uplink_key"]

KEY_SRC_SHIFT = 72
KEY6_SRC_SHIFT = 168
KEY6 = 1 << 296            # the family bit of an IPv6 key
_M16 = 0xFFFF
_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1
_M128 = (1 << 128) - 1


def pack_key(k: FlowKey) -> int:
    """The packed form of the 5-tuple ``k`` (layout in the module docstring; an IPv6 key,
    16-byte addresses, is ``KEY6 | src << 168 | proto << 160 | dst << 32 | sport << 16 |
    dport``). ValueError when a field does not fit its bits (it would spill into a
    neighbour: a protocol of 256 + 17 would name another source address)."""
    proto, src, dst, sport, dport = k
    if (len(src) != len(dst) or len(src) not in (4, 16) or not 0 <= proto <= 0xFF
            or not 0 <= sport <= _M16 or not 0 <= dport <= _M16):
        raise ValueError(f"not a flow key: {k!r}")
    if len(src) == 16:
        return (KEY6 | int.from_bytes(src, "big") << KEY6_SRC_SHIFT | proto << 160
                | int.from_bytes(dst, "big") << 32 | sport << 16 | dport)
    return (int.from_bytes(src, "big") << KEY_SRC_SHIFT | proto << 64
            | int.from_bytes(dst, "big") << 32 | sport << 16 | dport)


def unpack_key(key: int) -> FlowKey:
    """The 5-tuple ``(proto, src, dst, sport, dport)`` of a packed key."""
    if key >= KEY6:
        return ((key >> 160) & 0xFF, ((key >> KEY6_SRC_SHIFT) & _M128).to_bytes(16, "big"),
                ((key >> 32) & _M128).to_bytes(16, "big"), (key >> 16) & _M16, key & _M16)
    return ((key >> 64) & 0xFF, (key >> KEY_SRC_SHIFT).to_bytes(4, "big"),
            ((key >> 32) & _M32).to_bytes(4, "big"), (key >> 16) & _M16, key & _M16)


def key_source(key: int) -> int:
    """The source part of a packed key, what caps and hosts are keyed by: the IPv4
    address, or for IPv6 the address with the family bit above it (one host's IPv4 and
    IPv6 VIpAs are two sources: the caps apply per family)."""
    return key >> (KEY6_SRC_SHIFT if key >= KEY6 else KEY_SRC_SHIFT)


def source_of(src: bytes) -> int:
    """:func:`key_source` of the keys whose source address is ``src`` (4 or 16 bytes)."""
    return int.from_bytes(src, "big") | (1 << 128 if len(src) == 16 else 0)


def source_bytes(source: int) -> bytes:
    """The address of a :func:`key_source` value."""
    return (source & _M128).to_bytes(16, "big") if source >> 128 else source.to_bytes(4, "big")


def py_flow_key(pkt: bytes | bytearray | memoryview, reverse: bool = False) -> int | None:
    """The packed flow key of an IPv4 or IPv6 packet (``nat.py_five_tuple``, so ICMP and
    ICMP errors get theirs), or None when it is no well-formed IP packet. ``reverse``: the
    key of the other direction (a downlink packet's uplink key)."""
    k = nat.py_five_tuple(pkt)
    if k is None:
        return None
    proto, src, dst, sport, dport = k
    if reverse:
        src, dst, sport, dport = dst, src, dport, sport
    if len(src) == 16:
        return (KEY6 | int.from_bytes(src, "big") << KEY6_SRC_SHIFT | proto << 160
                | int.from_bytes(dst, "big") << 32 | sport << 16 | dport)
    return (int.from_bytes(src, "big") << KEY_SRC_SHIFT | proto << 64
            | int.from_bytes(dst, "big") << 32 | sport << 16 | dport)


def py_uplink_key(pkt: bytes | bytearray | memoryview, src: bytes) -> int | None:
    """The packed flow key of an uplink packet from a host whose VIpA is ``src`` (4 or 16
    bytes), or None when the packet is no well-formed IP packet of that family, or its
    source, or its flow key's source (for an ICMP error: the quoted packet's destination)
    is not ``src``: a host must not plant another host's flow key."""
    k = py_flow_key(pkt)
    if k is None:
        return None
    at = 8 if len(src) == 16 else 12
    if pkt[at:at + len(src)] != src or key_source(k) != source_of(src):
        return None
    return k


try:   # the compiled common case, when pip built it
    from .dataplane._fast import flow_key_tcpudp as _c_flow_key
    from .dataplane._fast import uplink_key_tcpudp as _c_uplink_key
except ImportError:   # pragma: no cover - depends on the build
    flow_key = py_flow_key
    uplink_key = py_uplink_key
else:
    def flow_key(pkt: bytes | bytearray | memoryview, reverse: bool = False) -> int | None:
        """See :func:`py_flow_key` (compiled for TCP/UDP)."""
        return _c_flow_key(pkt, reverse) or py_flow_key(pkt, reverse)

    def uplink_key(pkt: bytes | bytearray | memoryview, src: bytes) -> int | None:
        """See :func:`py_uplink_key` (compiled for TCP/UDP: one call builds the key and
        checks the source)."""
        k = _c_uplink_key(pkt, src)
        if k is None:
            return py_uplink_key(pkt, src)
        return k or None


class AnchorPaft:
    """The anchor's PAFT: packed uplink key -> row of columns (see the module docstring).

    ``cap`` bounds the table, ``per_source_cap`` each source address's (host's) share of
    it: one host at its cap cannot take the table from the others. ``owner`` names the
    mobile host of a source address (for the status view; "" when none)."""

    __slots__ = ("rows", "cap", "per_source_cap", "per_source", "owner", "free", "fid", "tunnel",
                 "seq_gen", "seq_ctr", "tx_packets", "rx_packets", "created", "last_seen",
                 "moves", "static", "reasons", "_reason_ix", "_next")

    def __init__(self, cap: int = 100_000, per_source_cap: int | None = None,
                 owner: Callable[[bytes], str] = lambda src: "") -> None:
        self.rows: dict[int, int] = {}
        self.cap = cap
        self.per_source_cap = per_source_cap or cap
        self.per_source: dict[int, int] = {}      # flows per source address (key >> 72)
        self.owner = owner
        self.free: list[int] = []                 # rows of removed flows, reused first
        # the columns, one entry per row
        self.fid = array("Q")
        self.tunnel = array("I")                  # local_tid (24 bits)
        self.seq_gen = array("Q")                 # newest tables.seq_of() seen: generation,
        self.seq_ctr = array("Q")                 # ... and counter
        self.tx_packets = array("Q")
        self.rx_packets = array("Q")
        self.created = array("d")
        self.last_seen = array("d")
        # rare: rows that moved -> their history, flattened (when, from or -1, to, reason
        # index) records, the last HISTORY_LEN of them; rows not moved by implicit handover
        self.moves: dict[int, array[float]] = {}
        self.static: set[int] = set()
        self.reasons: list[str] = ["new flow"]
        self._reason_ix: dict[str, int] = {"new flow": 0}
        self._next = 1

    def __len__(self) -> int:
        return len(self.rows)

    # -- per packet -----------------------------------------------------------------------
    def up(self, key: int, tid: int, seq: int, now: float, n: int = 1) -> int:
        """Call for ``n`` uplink packets of flow ``key`` that came on tunnel ``tid``, the
        newest with sequence ``seq`` (``tables.seq_of``). A new flow is added on ``tid``;
        a known one is moved to ``tid`` (implicit handover, unless static) when ``seq`` is
        newer than every earlier packet of the flow: a reordered or replayed packet moves
        nothing. Returns 1 if the flow moved, 0 if not, -1 if a cap refused a new flow."""
        r = self.rows.get(key)
        if r is None:
            return self._add(key, tid, seq, now, n)
        self.tx_packets[r] += n
        self.last_seen[r] = now
        g = seq >> 64
        if g == self.seq_gen[r]:             # the common case: the same session
            c = seq & _M64
            if c <= self.seq_ctr[r]:
                return 0
            self.seq_ctr[r] = c
        elif g > self.seq_gen[r]:
            self.seq_gen[r] = g
            self.seq_ctr[r] = seq & _M64
        else:
            return 0
        if self.tunnel[r] == tid or r in self.static:
            return 0
        self._move(r, now, tid, "implicit handover")
        return 1

    def down(self, key: int, now: float, n: int = 1) -> int:
        """Call for ``n`` downlink packets whose reversed 5-tuple is ``key``: the flow's
        tunnel id, or 0 when there is no such flow (tunnel ids are never 0)."""
        r = self.rows.get(key)
        if r is None:
            return 0
        self.rx_packets[r] += n
        self.last_seen[r] = now
        return self.tunnel[r]

    # -- insert / remove ------------------------------------------------------------------
    def _add(self, key: int, tid: int, seq: int, now: float, n: int) -> int:
        src = key_source(key)
        count = self.per_source.get(src, 0)
        if len(self.rows) >= self.cap or count >= self.per_source_cap:
            return -1
        self.per_source[src] = count + 1
        fid = self._next
        self._next += 1
        if self.free:
            r = self.free.pop()
            self.fid[r] = fid
            self.tunnel[r] = tid
            self.seq_gen[r] = seq >> 64
            self.seq_ctr[r] = seq & _M64
            self.tx_packets[r] = n
            self.rx_packets[r] = 0
            self.created[r] = now
            self.last_seen[r] = now
        else:
            r = len(self.fid)
            self.fid.append(fid)
            self.tunnel.append(tid)
            self.seq_gen.append(seq >> 64)
            self.seq_ctr.append(seq & _M64)
            self.tx_packets.append(n)
            self.rx_packets.append(0)
            self.created.append(now)
            self.last_seen.append(now)
        self.rows[key] = r
        return 0

    def remove(self, key: int) -> bool:
        """Forget flow ``key``; False if it was not there."""
        r = self.rows.pop(key, None)
        if r is None:
            return False
        src = key_source(key)
        count = self.per_source.get(src, 1) - 1
        if count:
            self.per_source[src] = count
        else:
            self.per_source.pop(src, None)
        self.moves.pop(r, None)
        self.static.discard(r)
        self.free.append(r)
        return True

    def remove_source(self, src: bytes) -> int:
        """Forget every flow from source address ``src`` (a host's VIpA); return how many."""
        s = source_of(src)
        if s not in self.per_source:
            return 0
        gone = [k for k in self.rows if key_source(k) == s]
        for k in gone:
            self.remove(k)
        return len(gone)

    def expire(self, now: float, idle: float) -> int:
        """Drop flows idle for more than ``idle`` seconds; return how many."""
        last = self.last_seen
        old = [k for k, r in self.rows.items() if now - last[r] > idle]
        for k in old:
            self.remove(k)
        return len(old)

    # -- moves (rare) ---------------------------------------------------------------------
    def _move(self, r: int, now: float, tid: int, reason: str) -> None:
        """Re-point row ``r`` to tunnel ``tid``, remembering why (bounded history)."""
        h = self.moves.get(r)
        if h is None:      # the flow's start, until now derived from its columns
            h = self.moves[r] = array("d", (self.created[r], -1, self.tunnel[r], 0))
        ix = self._reason_ix.get(reason)
        if ix is None:
            ix = self._reason_ix[reason] = len(self.reasons)
            self.reasons.append(reason)
        h.extend((now, self.tunnel[r], tid, ix))
        if len(h) > 4 * HISTORY_LEN:
            del h[:4]
        self.tunnel[r] = tid

    def handover(self, key: int, tid: int, seq: int, now: float,
                 reason: str = "signalled handover") -> int:
        """A signalled move of flow ``key`` to tunnel ``tid`` by a message with sequence
        ``seq``, which counts as the flow's newest (so an older data packet still in
        flight on the old tunnel does not move it back). Returns 1 if it moved, 0 if it
        was there already, -1 if there is no such flow or it is static (nothing done)."""
        r = self.rows.get(key)
        if r is None or r in self.static:
            return -1
        if (self.seq_gen[r] << 64 | self.seq_ctr[r]) < seq:
            self.seq_gen[r] = seq >> 64
            self.seq_ctr[r] = seq & _M64
        if self.tunnel[r] == tid:
            return 0
        self._move(r, now, tid, reason)
        return 1

    def set_static(self, key: int, static: bool = True) -> bool:
        """Pin flow ``key`` to its tunnel (no implicit or signalled handover moves it), or
        release it; False if there is no such flow."""
        r = self.rows.get(key)
        if r is None:
            return False
        if static:
            self.static.add(r)
        else:
            self.static.discard(r)
        return True

    def history(self, r: int) -> History:
        """(when, from tunnel, to tunnel, why) of row ``r``, oldest first: the flow's start,
        then its moves; the last HISTORY_LEN of them."""
        h = self.moves.get(r)
        if h is None:
            return ((self.created[r], None, self.tunnel[r], "new flow"),)
        return tuple((h[i], None if h[i + 1] < 0 else int(h[i + 1]), int(h[i + 2]),
                      self.reasons[int(h[i + 3])]) for i in range(0, len(h), 4))

    # -- views (status, tests) ------------------------------------------------------------
    def get(self, key: int) -> AnchorFlow | None:
        r = self.rows.get(key)
        return None if r is None else AnchorFlow(self, key, self.fid[r])

    def flows(self) -> list[AnchorFlow]:
        """A live view of every flow, oldest first (as ``Paft.flows``)."""
        fid = self.fid
        return [AnchorFlow(self, k, fid[r])
                for k, r in sorted(self.rows.items(), key=lambda kr: fid[kr[1]])]


class AnchorFlow:
    """A view of one flow of an :class:`AnchorPaft`, read live from its columns, with the
    attributes and the status JSON of ``tables.Flow``. LookupError once the flow left the
    table (a new flow with the same key is another flow)."""

    __slots__ = ("_paft", "_key", "fid")
    rule = ""           # the anchor has no rules; the host's classifier chose the flow
    app_src = ""

    def __init__(self, paft: AnchorPaft, key: int, fid: int) -> None:
        self._paft = paft
        self._key = key
        self.fid = fid

    def _row(self) -> int:
        r = self._paft.rows.get(self._key)
        if r is None or self._paft.fid[r] != self.fid:
            raise LookupError(f"flow {self.fid} is no longer in the table")
        return r

    @property
    def packed_key(self) -> int:
        return self._key

    @property
    def key(self) -> FlowKey:
        return unpack_key(self._key)

    @property
    def tunnel(self) -> int:
        return self._paft.tunnel[self._row()]

    @property
    def tx_packets(self) -> int:
        return self._paft.tx_packets[self._row()]

    @property
    def rx_packets(self) -> int:
        return self._paft.rx_packets[self._row()]

    @property
    def created(self) -> float:
        return self._paft.created[self._row()]

    @property
    def last_seen(self) -> float:
        return self._paft.last_seen[self._row()]

    @property
    def last_seq(self) -> int:
        r = self._row()
        return self._paft.seq_gen[r] << 64 | self._paft.seq_ctr[r]

    @property
    def static(self) -> bool:
        return self._row() in self._paft.static

    @static.setter
    def static(self, on: bool) -> None:
        self._row()
        self._paft.set_static(self._key, on)

    @property
    def anchor(self) -> str:
        """The mobile host the flow belongs to (``tables.Flow.anchor`` at the anchor)."""
        return self._paft.owner(source_bytes(key_source(self._key)))

    @property
    def history(self) -> History:
        return self._paft.history(self._row())

    def move(self, now: float, tid: int, reason: str) -> None:
        """Re-point the flow to tunnel ``tid``, remembering why (as ``tables.Flow.move``)."""
        self._paft._move(self._row(), now, tid, reason)

    def json(self, now: float, interface: str | None,
             iface_of: Callable[[int | None], str | None] = lambda tid: None) -> dict[str, Any]:
        """The status view of ``tables.Flow.json``, from the columns."""
        p, r = self._paft, self._row()
        return flow_json(self.fid, self.key, p.tunnel[r], p.tx_packets[r], p.rx_packets[r],
                         p.history(r), now, interface, iface_of)

    def __repr__(self) -> str:
        return f"<AnchorFlow {self.fid} {self.key!r}>"
