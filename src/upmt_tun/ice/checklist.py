"""A sans-I/O ICE agent for one peer (RFC 8445 full ICE, one component, UDP).

Bytes, addresses and ``now`` in; typed actions out. The driver owns the tunnel sockets
(one per access network), hands :meth:`Checklist.on_stun` every datagram :func:`is_stun`
recognised on one of them, calls :meth:`Checklist.on_timer` at
:meth:`Checklist.next_deadline`, and carries out the actions: :class:`SendStun` on the
named socket, :class:`PairSucceeded` (that socket reaches the peer at that address, both
ways, authenticated), :class:`Selected` (the nominated pair) and :class:`Failed`.

Pair states (RFC 8445 section 6.1.2.6)::

    FROZEN --unfreeze--> WAITING --check sent--> IN_PROGRESS --response--> SUCCEEDED
                            ^                         |  \\--timeout / error--> FAILED
                            +--- triggered check -----+--------------------------+

Choices, and why:

* **Pairs per socket.** A local server-reflexive candidate is replaced by its base (RFC
  8445 section 6.1.2.4), and the base *is* the tunnel socket, so a pair is (socket id,
  remote address). Checks leave from the socket whose NAT mapping the tunnel will use.
* **Authentication decides, not addresses.** Every request carries USERNAME
  ``<remote ufrag>:<local ufrag>``, MESSAGE-INTEGRITY keyed with the receiver's pwd and
  FINGERPRINT; a request or response that does not verify is dropped and counted in
  :attr:`Checklist.drops` (no 400/401 answer: no oracle, no reflection). That is what keeps
  a host from "succeeding" against itself or against its twin on its own LAN when both
  hosts use the same private subnet: the check lands there, and nobody there knows the pwd.
* **Regular nomination** (RFC 8445 section 8.1.1): the controlling agent lets checks run,
  then sends one more check with USE-CANDIDATE on the best valid pair, once no better
  pair is pending or ``nominate_after`` seconds after the first success. Aggressive
  nomination is deprecated by RFC 8445 and can leave the two ends on different pairs;
  regular nomination costs one round trip more and both ends agree on exactly one pair.
* **After selection, one valid pair per socket.** RFC 8445 stops checking once a pair is
  nominated; UPMT also wants to know which other access networks reach the peer directly
  (handover keeps flows direct), so checks continue, only on sockets that have no
  succeeded pair yet. No keepalives: the tunnel's own probes keep the mappings open.
* **Caps.** Remote candidates per restart, pairs (lowest priority pruned), checks in
  flight, and a token bucket on bytes sent (requests wait for tokens; responses are
  dropped when there are none, and the peer retransmits). Retransmissions follow RFC 8489
  (RTO doubling, ``max_tx`` transmissions, then ``rm`` x RTO of waiting), new checks are
  paced by Ta (RFC 8445 section 14.2); RTO grows with the number of active pairs
  (section 14.3).
* **Role conflicts** (section 7.3.1.1) are resolved with the 64-bit tie-breakers, by
  switching role or answering 487, and a 487 answer switches our role (7.2.5.1).
* **ICE restart** (:meth:`Checklist.restart`, or :meth:`Checklist.set_remote` with new
  remote credentials) forgets every pair, transaction and the selection.

Remote input never raises out of :meth:`Checklist.on_stun`; local misuse (bad arguments)
raises ``ValueError``.
"""

from __future__ import annotations

import enum
import struct
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from aioice import stun
from aioice.candidate import candidate_foundation, candidate_priority

from .candidates import COMPONENT, Addr, IceCandidate, usable_address
from .sdp import MAX_REMOTE_CANDIDATES, PWD_LEN, UFRAG_LEN

__all__ = [
    "Action",
    "Checklist",
    "Failed",
    "IceState",
    "Pair",
    "PairState",
    "PairSucceeded",
    "Role",
    "Selected",
    "SendStun",
    "Timing",
]

CHECK_BUDGET = 128      # bytes one of our checks takes (they are ~100): what pacing reserves
MAX_VERIFIED = 32       # sources of the peer's authenticated checks remembered


class Role(enum.Enum):
    CONTROLLING = "controlling"
    CONTROLLED = "controlled"

    @property
    def other(self) -> Role:
        return Role.CONTROLLED if self is Role.CONTROLLING else Role.CONTROLLING


class PairState(enum.Enum):
    FROZEN = "frozen"
    WAITING = "waiting"
    IN_PROGRESS = "in-progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class IceState(enum.Enum):
    NEW = "new"              # no remote description yet (requests are answered, not paired)
    RUNNING = "running"
    COMPLETED = "completed"  # a pair is selected
    FAILED = "failed"


@dataclass(frozen=True)
class Timing:
    ta: float = 0.05               # pacing of new checks (RFC 8445 section 14.2)
    rto: float = 0.5               # initial retransmission timeout (RFC 8489 section 6.2.1)
    max_tx: int = 7                # Rc: transmissions of one check
    rm: int = 16                   # wait Rm x RTO after the last one
    nominate_after: float = 0.3    # controlling: settle time after the first success
    max_pairs: int = 64
    max_in_flight: int = 8
    rate: float = 8000.0           # bytes per second of checks and answers
    burst: float = 2000.0
    max_early: int = 8             # checks remembered before the remote description

    def __post_init__(self) -> None:
        if not (self.ta > 0 and self.rto > 0 and self.rate > 0 and self.burst >= CHECK_BUDGET
                and self.max_tx >= 1 and self.rm >= 1 and self.nominate_after >= 0
                and self.max_pairs >= 1 and self.max_in_flight >= 1 and self.max_early >= 0):
            raise ValueError("ice: timing values must be positive (burst >= one check)")


@dataclass(frozen=True)
class SendStun:
    socket_id: int
    data: bytes
    addr: Addr


@dataclass(frozen=True)
class PairSucceeded:
    socket_id: int
    remote: Addr
    mapped: Addr        # this socket's address as the peer sees it
    rtt: float


@dataclass(frozen=True)
class Selected:
    socket_id: int
    remote: Addr


@dataclass(frozen=True)
class Failed:
    reason: str


Action = SendStun | PairSucceeded | Selected | Failed


@dataclass(eq=False)
class Pair:
    socket_id: int
    local: IceCandidate           # the socket's base candidate
    remote: IceCandidate
    priority: int
    state: PairState = PairState.FROZEN
    nominated: bool = False
    nominate_on_success: bool = False   # controlled: USE-CANDIDATE seen before success
    tid: bytes | None = None            # the live transaction of this pair

    @property
    def key(self) -> tuple[int, Addr]:
        return (self.socket_id, self.remote.addr)

    @property
    def foundation(self) -> tuple[str, str]:
        return (self.local.foundation, self.remote.foundation)


@dataclass(eq=False)
class _Tx:
    pair: Pair
    data: bytes
    role: Role                 # the role the request claimed
    use_candidate: bool
    rto: float
    next_at: float = 0.0
    last_sent: float = 0.0
    tries: int = 0
    cancelled: bool = False    # superseded: no retransmission, a late answer still counts


@dataclass
class _Early:
    socket_id: int
    src: Addr
    priority: int
    use_candidate: bool
    remote_ufrag: str


@dataclass
class _Bucket:
    rate: float
    burst: float
    tokens: float = field(default=-1.0)      # starts full
    at: float | None = None

    def __post_init__(self) -> None:
        self.tokens = self.burst

    def refill(self, now: float) -> None:
        if self.at is not None and now > self.at:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        if self.at is None or now > self.at:
            self.at = now

    def ready_at(self, n: int) -> float:
        at = self.at if self.at is not None else 0.0
        # a microsecond more, so float rounding never leaves us a hair short at that time
        return at if self.tokens >= n else at + (n - self.tokens) / self.rate + 1e-6


def _check_creds(ufrag: str, pwd: str) -> None:
    if not UFRAG_LEN[0] <= len(ufrag) <= UFRAG_LEN[1] or ":" in ufrag:
        raise ValueError("ice: bad ufrag")
    if not PWD_LEN[0] <= len(pwd) <= PWD_LEN[1]:
        raise ValueError("ice: bad pwd")


class Checklist:
    """ICE with one peer over the agent's tunnel sockets (see the module docstring)."""

    def __init__(self, role: Role, local_ufrag: str, local_pwd: str, tie_breaker: int,
                 rng: Callable[[int], bytes], local_candidates: Sequence[IceCandidate],
                 timing: Timing = Timing()) -> None:
        _check_creds(local_ufrag, local_pwd)
        if not 0 <= tie_breaker < 1 << 64:
            raise ValueError("ice: tie-breaker must be a 64-bit unsigned integer")
        self.role = role
        self.tie_breaker = tie_breaker
        self.timing = timing
        self._rng = rng
        self._bases: dict[int, IceCandidate] = {}
        for c in local_candidates:
            if c.socket_id is None:
                raise ValueError("ice: a local candidate needs its socket id")
            old = self._bases.get(c.socket_id)
            if old is None or (old.type != "host" and (c.type == "host"
                                                       or c.priority > old.priority)):
                self._bases[c.socket_id] = c
        self.drops: Counter[str] = Counter()
        self._bucket = _Bucket(timing.rate, timing.burst)
        self._early: list[_Early] = []
        self._last_now = 0.0
        self._reset(local_ufrag, local_pwd)

    # ----------------------------------------------------------------- lifecycle

    def _reset(self, local_ufrag: str, local_pwd: str) -> None:
        self.local_ufrag = local_ufrag
        self.local_pwd = local_pwd
        self.remote_ufrag: str | None = None
        self.remote_pwd: str | None = None
        self.state = IceState.NEW
        self._pairs: list[Pair] = []            # by priority, best first
        self._by_key: dict[tuple[int, Addr], Pair] = {}
        self._txs: dict[bytes, _Tx] = {}
        self._triggered: deque[tuple[Pair, bool]] = deque()
        self._next_check_at = 0.0
        self._first_success_at: float | None = None
        self._nominating: Pair | None = None
        self._selected: Pair | None = None
        self._early = []
        # (socket, source) of authenticated checks the peer sent us: a direct path the
        # peer opens from there may be answered (oldest forgotten past MAX_VERIFIED)
        self._verified: dict[tuple[int, Addr], None] = {}

    def restart(self, local_ufrag: str, local_pwd: str) -> None:
        """ICE restart (RFC 8445 section 9): new local credentials, everything else forgotten.

        Call after the local candidates or NAT mappings changed, before sending a new offer;
        then :meth:`set_remote` with the answer. The role and tie-breaker stay.
        """
        _check_creds(local_ufrag, local_pwd)
        self._reset(local_ufrag, local_pwd)

    def set_remote(self, ufrag: str, pwd: str, candidates: Iterable[IceCandidate]) -> None:
        """The peer's description (from its SDP). New credentials mean a restart by the peer.

        The same credentials again add candidates (pairs already formed stay as they are;
        a checklist that had failed runs again if there are new pairs). Remote candidates
        past :data:`MAX_REMOTE_CANDIDATES` and unusable addresses are skipped and counted;
        a family no socket has forms no pair.
        """
        _check_creds(ufrag, pwd)
        if self.remote_ufrag is not None and (ufrag, pwd) != (self.remote_ufrag,
                                                                self.remote_pwd):
            early = self._early
            self._reset(self.local_ufrag, self.local_pwd)
            self._early = early
        self.remote_ufrag, self.remote_pwd = ufrag, pwd
        if self.state is IceState.NEW:
            self.state = IceState.RUNNING
        before = len(self._pairs)
        for n, cand in enumerate(candidates):
            if n >= MAX_REMOTE_CANDIDATES:
                self.drops["remote-candidate-cap"] += 1
                break
            if cand.component != COMPONENT or usable_address(cand.ip) is None:
                self.drops["remote-candidate-unusable"] += 1
                continue
            for sid in self._bases:
                self._add_pair(sid, cand)
        if self.state is IceState.FAILED and len(self._pairs) > before:
            self.state = IceState.RUNNING
        self._unfreeze_initial()
        early, self._early = self._early, []
        for e in early:
            if e.remote_ufrag == ufrag:
                self._learn(e.socket_id, e.src, e.priority, e.use_candidate, [])

    @property
    def selected(self) -> Selected | None:
        """The nominated pair: the socket and the peer's address on it."""
        p = self._selected
        return Selected(p.socket_id, p.remote.addr) if p else None

    @property
    def pairs(self) -> tuple[Pair, ...]:
        return tuple(self._pairs)

    def valid(self) -> dict[int, Addr]:
        """Per socket, the peer's address on its best succeeded pair (each access network
        that reaches the peer directly, for a direct path per interface)."""
        out: dict[int, Addr] = {}
        for p in self._pairs:                 # best first
            if p.state is PairState.SUCCEEDED and p.socket_id not in out:
                out[p.socket_id] = p.remote.addr
        return out

    def reaches(self, socket_id: int, addr: Addr) -> bool:
        """Whether ``addr`` proved on ``socket_id`` that it is the peer: a check of ours
        succeeded there, or an authenticated check of the peer's came from there."""
        pair = self._by_key.get((socket_id, addr))
        return (pair is not None and pair.state is PairState.SUCCEEDED) or \
            (socket_id, addr) in self._verified

    # ------------------------------------------------------------------- pairs

    def _pair_priority(self, local: int, remote: int) -> int:
        g, d = (local, remote) if self.role is Role.CONTROLLING else (remote, local)
        return (min(g, d) << 32) + 2 * max(g, d) + (1 if g > d else 0)

    def _add_pair(self, sid: int, remote: IceCandidate) -> Pair | None:
        base = self._bases[sid]
        if base.version != remote.version:
            return None
        key = (sid, remote.addr)
        if key in self._by_key:
            return self._by_key[key]
        pair = Pair(sid, base, remote, self._pair_priority(base.priority, remote.priority))
        if len(self._pairs) >= self.timing.max_pairs:
            idle = [p for p in self._pairs if p.state in (PairState.FROZEN, PairState.WAITING,
                                                           PairState.FAILED)]
            worst = min(idle, key=lambda p: p.priority, default=None)
            if worst is None or worst.priority >= pair.priority:
                self.drops["pair-cap"] += 1
                return None
            self._remove_pair(worst)
            self.drops["pair-cap"] += 1
        self._pairs.append(pair)
        self._pairs.sort(key=lambda p: -p.priority)
        self._by_key[key] = pair
        return pair

    def _remove_pair(self, pair: Pair) -> None:
        self._pairs.remove(pair)
        del self._by_key[pair.key]
        self._triggered = deque(t for t in self._triggered if t[0] is not pair)
        if pair.tid is not None:
            self._txs.pop(pair.tid, None)

    def _unfreeze_initial(self) -> None:
        """Per foundation with nothing running, its best frozen pair waits (RFC 8445 6.1.2.6)."""
        busy = {p.foundation for p in self._pairs
                if p.state in (PairState.WAITING, PairState.IN_PROGRESS)}
        for p in self._pairs:           # best first
            if p.state is PairState.FROZEN and p.foundation not in busy:
                p.state = PairState.WAITING
                busy.add(p.foundation)

    def _set_role(self, role: Role) -> None:
        if role is self.role:
            return
        self.role = role
        for p in self._pairs:
            p.priority = self._pair_priority(p.local.priority, p.remote.priority)
        self._pairs.sort(key=lambda p: -p.priority)
        if role is Role.CONTROLLED:
            self._nominating = None
            self._triggered = deque((p, False) for p, _ in self._triggered)

    def _wanted(self, pair: Pair) -> bool:
        """Still worth checking: before selection all pairs, after it sockets without a path."""
        return self._selected is None or not self._has_path(pair.socket_id)

    def _has_path(self, sid: int) -> bool:
        return any(p.socket_id == sid and p.state is PairState.SUCCEEDED for p in self._pairs)

    def _prune(self) -> None:
        """After selection: drop the pairs not yet checked on sockets that have a path."""
        if self._selected is None:
            return
        for p in [p for p in self._pairs
                  if p.state in (PairState.FROZEN, PairState.WAITING) and not self._wanted(p)
                  and not p.nominate_on_success]:
            self._remove_pair(p)

    def _trigger(self, pair: Pair, use_candidate: bool = False, front: bool = False) -> None:
        self._triggered = deque(t for t in self._triggered if t[0] is not pair)
        if front:
            self._triggered.appendleft((pair, use_candidate))
        else:
            self._triggered.append((pair, use_candidate))
        while len(self._triggered) > self.timing.max_pairs:
            self._triggered.pop()

    # ---------------------------------------------------------------- sending

    def _prflx_priority(self, sid: int) -> int:
        local_pref = (self._bases[sid].priority >> 8) & 0xFFFF
        return candidate_priority(COMPONENT, "prflx", local_pref)

    def _request(self, pair: Pair, use_candidate: bool) -> bytes:
        assert self.remote_ufrag is not None and self.remote_pwd is not None
        msg = stun.Message(stun.Method.BINDING, stun.Class.REQUEST,
                           transaction_id=bytes(self._rng(12)))
        msg.attributes["USERNAME"] = f"{self.remote_ufrag}:{self.local_ufrag}"
        msg.attributes["PRIORITY"] = self._prflx_priority(pair.socket_id)
        if self.role is Role.CONTROLLING:
            msg.attributes["ICE-CONTROLLING"] = self.tie_breaker
            if use_candidate:
                msg.attributes["USE-CANDIDATE"] = None
        else:
            msg.attributes["ICE-CONTROLLED"] = self.tie_breaker
        msg.add_message_integrity(self.remote_pwd.encode())
        return bytes(msg)

    def _active(self) -> int:
        return sum(1 for p in self._pairs if p.state in (PairState.WAITING,
                                                         PairState.IN_PROGRESS))

    def _start_check(self, pair: Pair, use_candidate: bool, now: float) -> SendStun:
        if pair.tid is not None and pair.tid in self._txs:
            self._txs[pair.tid].cancelled = True
        data = self._request(pair, use_candidate)
        tid = data[8:20]
        rto = max(self.timing.rto, self.timing.ta * self._active())
        tx = _Tx(pair, data, self.role, use_candidate, rto)
        self._txs[tid] = tx
        pair.tid = tid
        if pair.state is not PairState.SUCCEEDED:
            pair.state = PairState.IN_PROGRESS
        return self._transmit(tx, now)

    def _transmit(self, tx: _Tx, now: float) -> SendStun:
        self._bucket.tokens -= len(tx.data)
        tx.tries += 1
        tx.last_sent = now
        if tx.tries < self.timing.max_tx:
            tx.next_at = now + tx.rto
            tx.rto *= 2
        else:
            tx.next_at = now + self.timing.rm * self.timing.rto
        return SendStun(tx.pair.socket_id, tx.data, tx.pair.remote.addr)

    def _live_trigger(self, pair: Pair, use_candidate: bool) -> bool:
        return pair.key in self._by_key and (use_candidate or (
            pair.state is not PairState.SUCCEEDED
            and (self._wanted(pair) or pair.nominate_on_success)))

    def _next_pair(self) -> tuple[Pair, bool] | None:
        """Triggered checks first, then the best waiting pair (RFC 8445 section 6.1.4.2)."""
        while self._triggered:
            pair, uc = self._triggered.popleft()
            if self._live_trigger(pair, uc):
                return pair, uc
        waiting = [p for p in self._pairs if p.state is PairState.WAITING]
        if not waiting:
            self._unfreeze_initial()
            waiting = [p for p in self._pairs if p.state is PairState.WAITING]
        return (waiting[0], False) if waiting else None

    def _startable(self) -> bool:
        """Whether :meth:`_next_pair` would find a pair (without changing anything)."""
        if any(self._live_trigger(p, uc) for p, uc in self._triggered):
            return True
        busy = set()
        for p in self._pairs:
            if p.state is PairState.WAITING:
                return True
            if p.state is PairState.IN_PROGRESS:
                busy.add(p.foundation)
        return any(p.state is PairState.FROZEN and p.foundation not in busy
                   for p in self._pairs)

    def _would_fail(self) -> bool:
        return (self.state is IceState.RUNNING and not self._txs and not self._startable()
                and not any(p.state is PairState.SUCCEEDED for p in self._pairs))

    def _in_flight(self) -> int:
        return sum(1 for tx in self._txs.values() if not tx.cancelled)

    # ------------------------------------------------------------------ timers

    def next_deadline(self) -> float | None:
        """When :meth:`on_timer` has something to do (None: nothing until a datagram)."""
        if self.state in (IceState.NEW, IceState.FAILED):
            return None
        times = [tx.next_at for tx in self._txs.values()]
        if self._startable() and self._in_flight() < self.timing.max_in_flight:
            times.append(max(self._next_check_at, self._bucket.ready_at(CHECK_BUDGET)))
        if (self.role is Role.CONTROLLING and self._selected is None
                and self._nominating is None and self._first_success_at is not None
                and any(p.state is PairState.SUCCEEDED for p in self._pairs)):
            times.append(self._first_success_at + self.timing.nominate_after)
        if self._would_fail():
            times.append(self._last_now)       # nothing left: on_timer declares failure
        return min(times) if times else None

    def on_timer(self, now: float) -> list[Action]:
        """Call at :meth:`next_deadline`: retransmissions, timeouts, the next paced check."""
        self._last_now = now
        out: list[Action] = []
        if self.state in (IceState.NEW, IceState.FAILED):
            return out
        self._bucket.refill(now)
        for tid, tx in list(self._txs.items()):
            if tx.next_at > now:
                continue
            if tx.cancelled or tx.tries >= self.timing.max_tx:
                del self._txs[tid]
                if tx.pair.tid == tid:
                    tx.pair.tid = None
                if not tx.cancelled:
                    self._pair_failed(tx.pair)
                continue
            if self._bucket.tokens < len(tx.data):
                tx.next_at = self._bucket.ready_at(len(tx.data))
                continue
            out.append(self._transmit(tx, now))
        self._maybe_nominate(now)
        if (now >= self._next_check_at and self._in_flight() < self.timing.max_in_flight
                and self._bucket.tokens >= CHECK_BUDGET):
            nxt = self._next_pair()
            if nxt is not None:
                out.append(self._start_check(nxt[0], nxt[1], now))
                self._next_check_at = now + self.timing.ta
        self._finish(out)
        return out

    def _pair_failed(self, pair: Pair) -> None:
        pair.state = PairState.FAILED
        if self._nominating is pair:
            self._nominating = None

    def _maybe_nominate(self, now: float) -> None:
        if (self.role is not Role.CONTROLLING or self._selected is not None
                or self._nominating is not None or self.state is not IceState.RUNNING):
            return
        valid = [p for p in self._pairs if p.state is PairState.SUCCEEDED]
        if not valid:
            return
        best = valid[0]
        pending_better = any(p.priority > best.priority and p.state in (
            PairState.FROZEN, PairState.WAITING, PairState.IN_PROGRESS) for p in self._pairs)
        assert self._first_success_at is not None
        if pending_better and now < self._first_success_at + self.timing.nominate_after:
            return
        self._nominating = best
        self._trigger(best, use_candidate=True, front=True)

    def _nominate(self, pair: Pair, out: list[Action]) -> None:
        """Select ``pair``. The controlled side follows a later nomination of another pair:
        the controlling side nominates again only when it saw its nomination fail (lost
        answers), and both ends must end on the same pair."""
        if self._selected is pair:
            return
        if self._selected is not None:
            if self.role is not Role.CONTROLLED:
                self.drops["late-nomination"] += 1
                return
            self.drops["renominated"] += 1
            self._selected.nominated = False
        pair.nominated = True
        self._selected = pair
        self._nominating = None
        self.state = IceState.COMPLETED
        self._prune()
        out.append(Selected(pair.socket_id, pair.remote.addr))

    def _finish(self, out: list[Action]) -> None:
        """Declare failure once nothing can succeed any more (RFC 8445 section 7.2.5.4).

        With a succeeded pair there is no failure: the controlling agent nominates it, the
        controlled one waits for that nomination (the driver's own timeout bounds it).
        """
        if not self._would_fail():
            return
        self.state = IceState.FAILED
        out.append(Failed("no candidate pairs" if not self._pairs else "all checks failed"))

    # -------------------------------------------------------------- receiving

    def on_stun(self, data: bytes | bytearray | memoryview, local_socket_id: int, src: Addr,
                now: float) -> list[Action]:
        """A datagram recognised as STUN on a tunnel socket. Never raises on remote input."""
        self._last_now = now
        if local_socket_id not in self._bases:
            self.drops["unknown-socket"] += 1
            return []
        try:
            msg = stun.parse_message(bytes(data))
        except (ValueError, struct.error, TypeError, IndexError):
            self.drops["malformed"] += 1
            return []
        if msg.message_method is not stun.Method.BINDING:
            self.drops["not-binding"] += 1
            return []
        if "FINGERPRINT" not in msg.attributes:
            self.drops["no-fingerprint"] += 1
            return []
        self._bucket.refill(now)
        out: list[Action] = []
        if msg.message_class is stun.Class.REQUEST:
            self._on_request(msg, local_socket_id, src, out)
        elif msg.message_class is stun.Class.INDICATION:
            self.drops["indication"] += 1      # keepalives: nothing to do
        else:
            self._on_response(msg, local_socket_id, src, now, out)
        self._maybe_nominate(now)
        self._finish(out)
        return out

    def _answer(self, request: stun.Message, src: Addr, error: int | None = None
                ) -> stun.Message:
        cls = stun.Class.RESPONSE if error is None else stun.Class.ERROR
        msg = stun.Message(stun.Method.BINDING, cls, transaction_id=request.transaction_id)
        if error is None:
            msg.attributes["XOR-MAPPED-ADDRESS"] = src
        else:
            msg.attributes["ERROR-CODE"] = (error, "Role Conflict")
        msg.add_message_integrity(self.local_pwd.encode())
        return msg

    def _send_answer(self, sid: int, msg: stun.Message, src: Addr, out: list[Action]) -> bool:
        data = bytes(msg)
        if self._bucket.tokens < len(data):
            self.drops["rate"] += 1
            return False
        self._bucket.tokens -= len(data)
        out.append(SendStun(sid, data, src))
        return True

    def _on_request(self, msg: stun.Message, sid: int, src: Addr, out: list[Action]) -> None:
        username = msg.attributes.get("USERNAME")
        if not isinstance(username, str):
            self.drops["bad-username"] += 1
            return
        mine, sep, theirs = username.partition(":")
        if not sep or mine != self.local_ufrag or (
                self.remote_ufrag is not None and theirs != self.remote_ufrag):
            self.drops["bad-username"] += 1
            return
        if not msg.check_message_integrity(self.local_pwd.encode()):
            self.drops["bad-integrity"] += 1
            return
        priority = msg.attributes.get("PRIORITY")
        controlling = msg.attributes.get("ICE-CONTROLLING")
        controlled = msg.attributes.get("ICE-CONTROLLED")
        if not isinstance(priority, int) or not 1 <= priority <= 0x7FFFFFFF or (
                (controlling is None) == (controlled is None)):
            self.drops["malformed"] += 1
            return
        if usable_address(src[0]) is None:
            self.drops["unusable-source"] += 1
            return
        # Role conflict (RFC 8445 section 7.3.1.1).
        if self.role is Role.CONTROLLING and controlling is not None:
            if self.tie_breaker >= controlling:
                self._send_answer(sid, self._answer(msg, src, 487), src, out)
                return
            self._set_role(Role.CONTROLLED)
        elif self.role is Role.CONTROLLED and controlled is not None:
            if self.tie_breaker >= controlled:
                self._set_role(Role.CONTROLLING)
            else:
                self._send_answer(sid, self._answer(msg, src, 487), src, out)
                return
        if not self._send_answer(sid, self._answer(msg, src), src, out):
            return
        self._verified.pop((sid, src), None)
        self._verified[(sid, src)] = None
        if len(self._verified) > MAX_VERIFIED:
            del self._verified[next(iter(self._verified))]
        use_candidate = "USE-CANDIDATE" in msg.attributes
        if self.remote_ufrag is None:
            if len(self._early) < self.timing.max_early:
                self._early.append(_Early(sid, src, priority, use_candidate, theirs))
            else:
                self.drops["early-cap"] += 1
            return
        self._learn(sid, src, priority, use_candidate, out)

    def _learn(self, sid: int, src: Addr, priority: int, use_candidate: bool,
               out: list[Action]) -> None:
        """An authenticated check came in: triggered check, peer-reflexive candidate (7.3.1).

        It also revives a failed checklist: the peer's check got through, so ours may too
        (with heavy loss one end can give up while the other still gets through).
        """
        if self.state is IceState.FAILED:
            self.state = IceState.RUNNING
        pair = self._by_key.get((sid, src))
        renominate = use_candidate and self.role is Role.CONTROLLED
        if self._selected is not None and self._has_path(sid) and not renominate:
            return                             # this socket already has its path
        if pair is None:
            known = next((p.remote for p in self._pairs if p.remote.addr == src), None)
            remote = known or IceCandidate(
                foundation=candidate_foundation("prflx", "udp", src[0])[:8],
                priority=priority, ip=src[0], port=src[1], type="prflx")
            pair = self._add_pair(sid, remote)
            if pair is None:
                return
        if pair.state is not PairState.SUCCEEDED:
            if pair.state is not PairState.IN_PROGRESS:
                pair.state = PairState.WAITING
            self._trigger(pair)
        if use_candidate and self.role is Role.CONTROLLED:
            if pair.state is PairState.SUCCEEDED:
                self._nominate(pair, out)
            else:
                pair.nominate_on_success = True

    def _on_response(self, msg: stun.Message, sid: int, src: Addr, now: float,
                     out: list[Action]) -> None:
        tid = msg.transaction_id
        tx = self._txs.get(tid)
        if tx is None:
            self.drops["unknown-transaction"] += 1
            return
        assert self.remote_pwd is not None
        if not msg.check_message_integrity(self.remote_pwd.encode()):
            self.drops["bad-integrity"] += 1    # retransmissions go on (RFC 8489 9.1.4)
            return
        del self._txs[tid]
        pair = tx.pair
        if pair.tid == tid:
            pair.tid = None
        if sid != pair.socket_id or src != pair.remote.addr:
            self._pair_failed(pair)            # not symmetric (RFC 8445 7.2.5.2.1)
            return
        if msg.message_class is stun.Class.ERROR:
            if msg.error_code != 487:
                self._pair_failed(pair)
                return
            if tx.role is self.role:
                self._set_role(tx.role.other)  # RFC 8445 section 7.2.5.1
            if pair.state is not PairState.SUCCEEDED:
                pair.state = PairState.WAITING
            self._trigger(pair, front=True)
            return
        mapped = msg.attributes.get("XOR-MAPPED-ADDRESS")
        if not isinstance(mapped, tuple):
            self.drops["malformed"] += 1
            self._pair_failed(pair)
            return
        first = pair.state is not PairState.SUCCEEDED
        pair.state = PairState.SUCCEEDED
        if self._first_success_at is None:
            self._first_success_at = now
        for p in self._pairs:                  # unfreeze the same foundation (7.2.5.3.3)
            if p.state is PairState.FROZEN and p.foundation == pair.foundation:
                p.state = PairState.WAITING
        if first:
            out.append(PairSucceeded(pair.socket_id, pair.remote.addr, mapped,
                                     now - tx.last_sent))
        if (tx.use_candidate and self.role is Role.CONTROLLING) or (
                pair.nominate_on_success and self.role is Role.CONTROLLED):
            self._nominate(pair, out)
        self._prune()
