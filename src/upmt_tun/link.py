"""Links: one sans-I/O state machine per (interface, peer), as boringtun's ``update_timers``.

A :class:`Link` keeps one tunnel alive through one access interface to one peer. It
does no I/O and reads no clock: every method takes ``now`` (and randomness comes from
the :class:`Env` it was given) and returns a list of typed actions (:class:`Send`,
:class:`NewSession`, :class:`TunnelUp`, :class:`TunnelDown` ...) that the driver
(``agent.py``) carries out. :meth:`Link.next_deadline` says when to call
:meth:`Link.on_timer` next. Tests drive links by hand, on any clock.

Two kinds of peer:

* ``PeerKind.SERVER``, an anchor or an UPMT-aware fixed host: the paper's signalling.
  A Noise IK handshake (cookies under load), an AssociationReq (the VIpA) shared by the
  peer's links, a TunnelSetupReq through this interface, the server's path challenge
  echoed in a KeepAlive, then sealed SIP KeepAlives every ``keepalive`` seconds and
  PING/PONG probes (``paths.PathMonitor``). SIP MESSAGE transactions are kept here,
  retransmitted on Timer E until Timer F (``sip.retransmit_schedule``).
* ``PeerKind.AGENT``, another agent reached directly: a Noise IK handshake in either
  role, then each end validates the other's address with PATH_CHALLENGE/PATH_RESPONSE
  before the tunnel carries data, and probes are answered by both.

States (initiator; ``[attempt]`` is a decision, not a state)::

     IDLE --start--> [attempt] --interface unusable--> LINK_DOWN --usable--> [attempt]
                         |
         +---------------+-----------------------------+------------------+
         | server, no session, association needed     | server, session  | agent peer
         v                                             v                  v
     HANDSHAKE --session--> ASSOCIATING --VIpA--> SETTING_UP         HANDSHAKE
         | no answer (4 s)    | refused/no answer     | id + challenge     | session
         v                    v                       v                    v
      BACKOFF <----------- BACKOFF <--fail-- VALIDATING (KeepAlive     VALIDATING
         |  1, 2, 4 .. 30 s, or a link event         echoes challenge) (PATH_CHALLENGE)
         v                                            | validated          | echoed
     HANDSHAKE (forced: a fresh session             UP <------------------+
       unless younger than 5 s and than the         |  keepalive misses, probe loss
       silence of every tunnel) --> [attempt]       v
                                          TunnelDown, HANDSHAKE (forced) --> [attempt]
                                          ("not registered": TunnelDown, ASSOCIATING at once)

     any state --interface unusable--> LINK_DOWN (from UP: TunnelDown first)

Responder (agent peer only: the peer sent the initiation)::

     IDLE --valid HS_INIT--> VALIDATING --PATH_RESPONSE echoed--> UP
                               | no answer within 4 s              | probe loss
                               v                                   v
                             IDLE <------------------------------ IDLE (TunnelDown)

In UP a server link rekeys in the background (a new handshake once the session is
older than ``REKEY_AFTER``, checked before each keepalive; the old session opens
late packets ``PREVIOUS_SESSION_LIFE`` more seconds); :attr:`Link.state` changes only
in :meth:`Link._set`, which logs every transition.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .dataplane.crypto import Session
from .dataplane.forwarder import AnchorLink
from .dataplane.packet import (
    HEADER,
    PATH_MAX,
    PROBE,
    TYPE_CONTROL,
    TYPE_COOKIE,
    TYPE_HS_INIT,
    TYPE_HS_RESP,
    TYPE_PATH_CHALLENGE,
    TYPE_PATH_RESPONSE,
    TYPE_PING,
    TYPE_PONG,
)
from .paths import TICK, PathMonitor, ProbeParams
from .signalling import sip, upmt
from .signalling.handshake import COOKIE_LIFE, Initiation, Responder
from .tables import Tunnel

__all__ = ["Action", "AssocState", "Associated", "Drop", "DropSession", "Env", "Link",
           "LinkConfig", "LinkState", "NewSession", "Peer", "PeerFound", "PeerKind", "Role",
           "Send", "Settled", "TunnelDown", "TunnelUp", "SIP_STATS"]

log = logging.getLogger(__name__)

SETUP_TIMEOUT = 4.0
KEEPALIVE_TIMEOUT = 2.0
DEAD_AFTER = 2
BACKOFF_MAX = 30.0
REKEY_AFTER = 120.0            # seconds: a new handshake (forward secrecy), as WireGuard
PREVIOUS_SESSION_LIFE = 60.0   # the old session still opens late packets this long
MIN_REKEY = 5.0                # never renew a session younger than this after a failure
REKEY_AFTER_MESSAGES = 1 << 28 # AES-GCM: well inside its per-key limits (RFC 8446 5.5)
COOKIE_RETRIES = 3             # immediate retries with a fresh cookie, per handshake
CHALLENGE_EVERY = 0.2          # seconds between PATH_CHALLENGEs to an agent peer
VALIDATE_TRIES = 3             # KeepAlives echoing a fresh challenge before giving up
RECOVER_FOR = 30.0       # after every tunnel to a server went silent (it may be restarting):
RECOVER_EVERY = 1.0      # ... a handshake initiation this often for this long, then backoff
SIP_STATS = ("requests", "retransmits", "timeouts", "stray", "malformed")
_INF = float("inf")


class LinkState(Enum):
    IDLE = "idle"
    HANDSHAKE = "handshake"
    ASSOCIATING = "associating"
    SETTING_UP = "setting up"
    VALIDATING = "validating"
    UP = "up"
    BACKOFF = "backoff"
    LINK_DOWN = "link down"


class AssocState(Enum):
    """A server peer's association, as ``status`` shows it (``anchors[].state``)."""

    ASSOCIATING = "associating"
    ASSOCIATED = "associated"
    UNREACHABLE = "unreachable"
    REFUSED = "refused"


class PeerKind(Enum):
    SERVER = "server"     # anchor or fixed host: SIP association, tunnel setup, keepalives
    AGENT = "agent"       # another agent, directly: handshake and path validation only


class Role(Enum):
    INITIATOR = "initiator"
    RESPONDER = "responder"


# -- actions: what the driver carries out, in order ---------------------------------------
@dataclass(frozen=True, slots=True)
class Send:
    """Send ``data`` from interface ``iface``'s socket to ``addr``."""

    iface: str
    data: bytes
    addr: tuple[str, int]


@dataclass(frozen=True, slots=True)
class NewSession:
    """A handshake completed: seal everything for ``peer`` with ``session`` from now on."""

    peer: str
    session: Session


@dataclass(frozen=True, slots=True)
class DropSession:
    """A previous session outlived PREVIOUS_SESSION_LIFE: it opens nothing any more."""

    index: int


@dataclass(frozen=True, slots=True)
class Associated:
    """The server gave this host ``vipa`` (role and, for a fixed host, what it serves)."""

    peer: str
    vipa: str
    role: str
    serves: frozenset[bytes]
    mesh_pool: str | None = None   # the anchor's mesh pool, if this host is in its mesh
    vipa6: str = ""                # the IPv6 VIpA ("": the server carries IPv4 only)


@dataclass(frozen=True, slots=True)
class PeerFound:
    """The answer to :meth:`Link.peer_request`: who is at ``vipa`` of ``anchor``'s mesh
    (``name`` and ``public_key`` empty: nobody, or no answer)."""

    anchor: str
    vipa: str
    name: str
    public_key: bytes


@dataclass(frozen=True, slots=True)
class TunnelUp:
    """The tunnel may carry data (its path is validated); flows may come to it."""

    tunnel: Tunnel
    un_tid: int


@dataclass(frozen=True, slots=True)
class TunnelDown:
    """The tunnel stopped working: down now, its flows move now."""

    tunnel: Tunnel
    reason: str


@dataclass(frozen=True, slots=True)
class Settled:
    """The tunnel has been up ``return_after`` seconds: flows may come back to it."""

    tunnel: Tunnel


@dataclass(frozen=True, slots=True)
class Drop:
    """A datagram was dropped (counted under ``reason``)."""

    reason: str


Action = (Send | NewSession | DropSession | Associated | TunnelUp | TunnelDown | Settled | Drop
          | PeerFound)


# -- what links share ----------------------------------------------------------------------
@dataclass(frozen=True)
class LinkConfig:
    """The agent's settings a link needs."""

    me: str                        # our SIP name (sipId)
    static: bytes                  # our static private key
    keepalive_s: float = 10.0
    return_after_s: float = 5.0
    plaintext_data: bool = False
    probe: ProbeParams = ProbeParams()


@dataclass(frozen=True)
class Env:
    """Randomness and wall time, injected: a fresh nonzero session index unused by the
    agent, the wall clock in ns (the handshake's timestamp), random bytes, a SIP token."""

    new_index: Callable[[], int]
    wall_ns: Callable[[], int]
    random_bytes: Callable[[int], bytes]
    token: Callable[[], str] = sip.new_token


@dataclass(eq=False)
class Peer:
    """One peer as all its links see it: where it is, its key, and the forwarder's record
    (``record``: the session that seals, the VIpA). The association belongs to the peer,
    not to one link: any link may (re)associate, all links use the result."""

    name: str
    addr: tuple[str, int]
    public_key: bytes
    record: AnchorLink
    kind: PeerKind = PeerKind.SERVER
    state: AssocState = AssocState.ASSOCIATING
    lost: bool = False             # the server lost our association (said so, or went silent)
    epoch: int = 0                 # associations made again after one was lost
    up: set[str] = field(default_factory=set)     # interfaces whose link to it is UP
    suspect_at: float = -_INF      # when a tunnel to it last died of silence
    silent_at: float = -_INF       # when its last UP tunnel died of silence (all silent)

    def recovering(self, now: float) -> bool:
        """Every tunnel to this server went silent less than RECOVER_FOR ago: it may be
        restarting, so handshakes are retried every RECOVER_EVERY, not backed off."""
        return now < self.silent_at + RECOVER_FOR

    def set_state(self, new: AssocState) -> None:
        if new is not self.state:
            log.debug("peer %s: %s -> %s", self.name, self.state.value, new.value)
            self.state = new


@dataclass
class _Txn:
    """One SIP MESSAGE client transaction (non-INVITE, over UDP)."""

    branch: str
    what: str                      # "associate", "setup", "keepalive", "handover"
    data: bytes
    delays: list[float]
    deadline: float
    sent_at: float
    timeout: float
    step: int = 0
    extra: Any = None


@dataclass
class _Handshake:
    """One handshake in flight, with its retry budget (a fresh initiation every try)."""

    then: str                      # "associate", "attempt", "rekey", "validate"
    old: Session | None
    init: Initiation | None = None
    index: int = 0
    waited: float = 0.0
    delay: float = sip.T1
    wait: float = 0.0
    started: float = 0.0
    cookies: int = 0
    sent_at: float = 0.0
    deadline: float = _INF         # answer wait ends (or a paced retry is due)
    paced: bool = False            # the deadline is a paced retry after useless cookies


@dataclass
class Link:
    """The tunnel through ``iface`` to ``peer``; see the module docstring."""

    iface: str
    peer: Peer
    tunnel: Tunnel
    cfg: LinkConfig
    env: Env
    stats: dict[str, int]
    role: Role = Role.INITIATOR
    # the peer's address this link uses: a dual-stack anchor has one per family and the
    # interface picks the one it can reach (None: the peer's only one, ``peer.addr``)
    addr: tuple[str, int] | None = None
    state: LinkState = field(default=LinkState.IDLE, init=False)
    usable: bool = field(default=True, init=False)      # the interface (carrier, address)
    tried: bool = field(default=False, init=False)      # first attempt over (ready)
    monitor: PathMonitor | None = field(default=None, init=False)
    backoff: float = field(default=1.0, init=False)
    _wake_at: float = field(default=_INF, init=False)   # BACKOFF ends / next keepalive
    _next_tick: float = field(default=_INF, init=False)
    quiet: bool = field(default=False, init=False)      # probe tick asleep till a probe is due
    _ticked_at: float = field(default=-_INF, init=False)
    _settled: bool = field(default=False, init=False)
    _hs: _Handshake | None = field(default=None, init=False)
    _txns: dict[str, _Txn] = field(default_factory=dict, init=False)
    _ka_busy: bool = field(default=False, init=False)
    _misses: int = field(default=0, init=False)
    cookie: tuple[bytes, float] | None = field(default=None, init=False)
    _retiring: list[tuple[float, Session]] = field(default_factory=list, init=False)
    _setup_rtt: float = field(default=0.0, init=False)
    _quick: bool = field(default=True, init=False)      # one immediate re-association left
    _epoch: int = field(default=0, init=False)          # peer.epoch when our setup was answered
    _seen_as: tuple[Any, Any] = field(default=(None, None), init=False)
    _cseq: int = field(default=0, init=False)
    # path validation of an agent peer's address: the token it must echo, where, until
    _token: bytes = field(default=b"", init=False)
    _token_addr: tuple[str, int] | None = field(default=None, init=False)
    _validated: bool = field(default=False, init=False)
    _challenge_at: float = field(default=_INF, init=False)
    _validate_until: float = field(default=_INF, init=False)
    _responder: Responder | None = field(default=None, init=False)

    @property
    def remote(self) -> tuple[str, int]:
        """Where this link's handshakes and signalling go."""
        return self.addr or self.peer.addr

    def __post_init__(self) -> None:
        if self.role is Role.RESPONDER:
            if self.peer.kind is not PeerKind.AGENT:
                raise ValueError("only a link to another agent can be the responder")
            self._responder = Responder(self.cfg.static, {self.peer.public_key: self.peer.name},
                                        random_bytes=self.env.random_bytes)

    # -- the one place the state changes ---------------------------------------------------
    def _set(self, new: LinkState, why: str) -> None:
        if new is not self.state:
            log.debug("link %s -> %s: %s -> %s (%s)", self.iface, self.peer.name,
                      self.state.value, new.value, why)
            self.state = new
            # the data plane's view of the tunnel (the forwarder reads it per packet)
            self.tunnel.state = "up" if new is LinkState.UP else "down"
            if new is LinkState.UP:
                self.peer.up.add(self.iface)
            else:
                self.peer.up.discard(self.iface)

    @property
    def session(self) -> Session | None:
        return self.peer.record.session

    @property
    def hs_index(self) -> int:
        """The index of the initiation waiting for its answer (0: none)."""
        return self._hs.index if self._hs is not None and self._hs.init is not None else 0

    def owns(self, branch: str) -> bool:
        """Is the SIP transaction ``branch`` one of this link's?"""
        return branch in self._txns

    def next_deadline(self) -> float:
        """When :meth:`on_timer` must be called next (inf: only on an event)."""
        d = min(self._wake_at, self._tick_due(), self._challenge_at)
        if self._hs is not None:
            d = min(d, self._hs.deadline)
        for t in self._txns.values():
            d = min(d, t.deadline)
        if self._retiring:
            d = min(d, self._retiring[0][0])
        return d

    def _tick_due(self) -> float:
        """The probe tick's deadline: while it sleeps (:attr:`quiet`), what another link
        learnt about the peer (a tunnel died silent: probe; the association is lost: set
        up again) brings it back to the next regular tick."""
        d = self._next_tick
        m, peer = self.monitor, self.peer
        if self.quiet and m is not None:
            if m.last_rx < peer.suspect_at:
                d = min(d, max(peer.suspect_at, self._ticked_at + TICK))
            elif peer.kind is PeerKind.SERVER and (peer.lost or self._epoch != peer.epoch):
                d = min(d, self._ticked_at + TICK)     # association lost: set up again
        return d

    @property
    def seen_as(self) -> tuple[str, int] | None:
        """This tunnel socket's address as the server saw it (TunnelSetupResp yourAddress,
        yourPort): the server-reflexive ICE candidate; None before setup."""
        addr, port = self._seen_as
        if isinstance(addr, str) and isinstance(port, int) and not isinstance(port, bool):
            return addr, port
        return None

    def up_for(self, now: float) -> float:
        return now - self.monitor.started if self.monitor is not None else 0.0

    # -- events ------------------------------------------------------------------------------
    def start(self, now: float, usable: bool = True) -> list[Action]:
        """Call once, after the driver registered the link."""
        self.usable = usable
        out: list[Action] = []
        if self.role is Role.RESPONDER:
            self.tried = True             # nothing to try: it waits for the initiation
            return out
        self._attempt(now, out)
        return out

    def stop(self, now: float) -> list[Action]:
        """Call before the driver forgets the link: its tunnel goes down, nothing pends."""
        out: list[Action] = []
        self._down(now, "link removed", out)
        self._hs = None
        self._txns.clear()
        self._wake_at = self._challenge_at = _INF
        self._set(LinkState.IDLE, "removed")
        out += [DropSession(s.local_index) for _, s in self._retiring]
        self._retiring.clear()
        return out

    def on_timer(self, now: float) -> list[Action]:
        """Call when ``now`` reached :meth:`next_deadline` (earlier calls do nothing)."""
        out: list[Action] = []
        while self._retiring and self._retiring[0][0] <= now:
            out.append(DropSession(self._retiring.pop(0)[1].local_index))
        for t in [t for t in self._txns.values() if t.deadline <= now]:
            self._txn_timer(t, now, out)
        hs = self._hs
        if hs is not None and hs.deadline <= now:
            self._hs_timer(hs, now, out)
        if self._challenge_at <= now:
            self._challenge_timer(now, out)
        if self._tick_due() <= now and self.state is LinkState.UP:
            self._probe_tick(now, out)
        if self._wake_at <= now:
            self._wake_at = _INF
            self._woken(now, out)
        return out

    def on_link(self, usable: bool, now: float, why: str = "link down") -> list[Action]:
        """Call when the interface became unusable (no carrier, no address) or usable
        again: the tunnel goes down now, or is tried again now."""
        out: list[Action] = []
        if usable == self.usable:
            return out
        self.usable = usable
        if not usable:
            if self.state is LinkState.UP:
                log.warning("%s %s: tunnel %d down, its flows move", why, self.iface,
                            self.tunnel.tid)
            self._down(now, why, out)
            self._hs = None
            for t in [t for t in self._txns.values() if t.what != "handover"]:
                del self._txns[t.branch]
            self._ka_busy = False
            self._wake_at = self._challenge_at = _INF
            self.backoff = 1.0
            self.tried = True
            self._set(LinkState.LINK_DOWN, why)
        elif self.state is LinkState.LINK_DOWN:
            self._set(LinkState.IDLE, "link back up")
            if self.role is Role.INITIATOR:
                self._attempt(now, out)
        return out

    def on_path_changed(self, now: float) -> list[Action]:
        """Call when the interface kept its link but got a new address or gateway (so a
        new NAT mapping): probe now and keep alive now (the server follows the new
        mapping after a challenge); a link waiting to retry retries now."""
        out: list[Action] = []
        if self.state is LinkState.UP:
            self._ping(now, out)
            if not self._ka_busy and self._hs is None:
                self._wake_at = now
        elif self.state is LinkState.BACKOFF:
            self._wake_at = now
        return out

    def on_peer_moved(self, now: float) -> list[Action]:
        """Call after the peer's address changed (its name resolves elsewhere now): an UP
        link probes the new address now (as :meth:`on_path_changed`); a link still trying
        stops waiting for answers from the old address and attempts again now."""
        if self.state is LinkState.UP or not self.usable or self.role is Role.RESPONDER:
            return self.on_path_changed(now)
        out: list[Action] = []
        self._hs = None
        for t in [t for t in self._txns.values() if t.what != "handover"]:
            del self._txns[t.branch]
        self._ka_busy = False
        self._wake_at = self._challenge_at = _INF
        self.backoff = 1.0
        self._set(LinkState.IDLE, "peer moved")
        self._attempt(now, out)
        return out

    def on_handshake(self, data: bytes, src: tuple[str, int], now: float) -> list[Action]:
        """An HS_RESP or HS_COOKIE for :attr:`hs_index`, or (responder) an HS_INIT."""
        out: list[Action] = []
        if data and data[0] == TYPE_HS_INIT:
            self._on_initiation(data, src, now, out)
            return out
        hs = self._hs
        if hs is None or hs.init is None or src != self.remote:
            out.append(Drop("stray_handshake"))
            return out
        init = hs.init
        if data[0] == TYPE_COOKIE:
            c = init.consume_cookie(data)
            if c is None:
                out.append(Drop("bad_cookie"))
                return out
            self.cookie = (c, now)
            hs.init, hs.index = None, 0
            elapsed = now - hs.sent_at
            hs.cookies += 1
            pause = 0.0
            if hs.cookies > COOKIE_RETRIES:      # cookies that do not help: pace the tries
                pause = max(0.0, hs.delay - elapsed)
                elapsed, hs.delay = max(hs.delay, elapsed), min(hs.delay * 2, sip.T2)
            hs.waited += elapsed
            if pause > 0.0:
                hs.deadline, hs.paced = now + pause, True
            elif hs.waited < self._hs_budget(hs):
                self._send_init(hs, now, out)
            else:
                self._hs_failed(hs, now, out)
            return out
        s = init.consume(data, now, self.peer.name)
        if s is None:
            out.append(Drop("bad_handshake"))
            return out
        s.plain_data = self.cfg.plaintext_data
        self._hs = None
        self._new_session(s, hs.old, now, out)
        log.debug("peer %s: session %08x via %s", self.peer.name, s.local_index, self.iface)
        self._then(hs.then, True, now, out)
        return out

    def on_sip_response(self, resp: sip.SipResponse, now: float) -> list[Action]:
        """A final SIP response whose branch this link :meth:`owns`."""
        out: list[Action] = []
        key = sip.transaction_key(resp)
        t = self._txns.pop(key[0], None) if key else None
        if t is None:
            self.stats["stray"] += 1
            return out
        rtt = now - t.sent_at
        body: list[tuple[str, dict[str, Any]]] = []
        err = ""
        if resp.status_code == 200:
            try:
                body = upmt.decode(resp.body)
            except ValueError as e:
                err = (f"unusable answer from {self.remote[0]}:{self.remote[1]}: {e}")
        self._answered(t, None if err else (resp.status_code, resp.reason_phrase, body), err,
                       rtt, now, out)
        return out

    def on_pong(self, sent_at: float, now: float) -> list[Action]:
        """A PONG on this tunnel echoing a probe sent at ``sent_at``."""
        if self.monitor is not None:
            self.monitor.on_pong(now, max(0.0, now - sent_at))
        return []

    def on_path_challenge(self, token: bytes, src: tuple[str, int], now: float
                          ) -> list[Action]:
        """An opened PATH_CHALLENGE (our address changed, or an agent peer validates us):
        echo it from this socket."""
        out: list[Action] = []
        s = self.session
        if s is None or len(token) != 16:
            out.append(Drop("bad_packet"))
            return out
        out.append(Send(self.iface, s.seal(TYPE_PATH_RESPONSE, token, self.tunnel.un_tid), src))
        return out

    def on_path_response(self, token: bytes, src: tuple[str, int], now: float
                         ) -> list[Action]:
        """An opened PATH_RESPONSE from an agent peer: its address is validated if it
        echoes our token from where we sent it."""
        out: list[Action] = []
        if self._token_addr != src or not self._token or token != self._token:
            out.append(Drop("bad_path_response"))
            return out
        self._validated = True
        self._token, self._token_addr = b"", None
        self._challenge_at = self._validate_until = _INF
        self.tunnel.remote = src
        if self.state is LinkState.VALIDATING:
            self._up(now, 0.0, out)
        return out

    def on_ping(self, payload: bytes, src: tuple[str, int], now: float) -> list[Action]:
        """An opened PING from an agent peer: the PONG, on a validated path only."""
        out: list[Action] = []
        s = self.session
        if s is None or len(payload) != PROBE.size or self.state is not LinkState.UP \
                or src != self.tunnel.remote:
            out.append(Drop("unvalidated_path"))
            return out
        if self.monitor is not None:
            self.monitor.last_rx = now          # anything received proves the path
        out.append(Send(self.iface, s.seal(TYPE_PONG, payload, self.tunnel.un_tid), src))
        return out

    def on_datagram(self, data: bytes, src: tuple[str, int], now: float) -> list[Action]:
        """Everything but DATA from an agent peer, raw: handshakes, then sealed control
        packets opened with this peer's sessions (the driver of server links opens them
        with the forwarder, which also checks the tunnel, and calls the handlers)."""
        if len(data) < 16:
            return [Drop("junk")]
        b0 = data[0]
        if b0 in (TYPE_HS_INIT, TYPE_HS_RESP, TYPE_COOKIE):
            return self.on_handshake(data, src, now)
        opened = self._open(data)
        if opened is None:
            return [Drop("bad_packet")]
        if b0 == TYPE_PATH_CHALLENGE:
            return self.on_path_challenge(opened, src, now)
        if b0 == TYPE_PATH_RESPONSE:
            return self.on_path_response(opened, src, now)
        if b0 == TYPE_PING:
            return self.on_ping(opened, src, now)
        if b0 == TYPE_PONG and len(opened) == PROBE.size:
            return self.on_pong(PROBE.unpack(opened)[0], now)
        return [Drop("junk")]

    def handover(self, items: list[list[Any]], now: float) -> list[Action]:
        """Tell the server that these flows (``[proto, vipa, dst, sport, dport]``) moved
        to this tunnel (HandoverReq): a flow that sends nothing upstream gives the
        server nothing to learn from. Confirmed or not, nothing else depends on it."""
        out: list[Action] = []
        if self.state is LinkState.UP and self.peer.kind is PeerKind.SERVER:
            self._request("handover", [("HandoverReq", {"sipId": self.cfg.me,
                                                        "tunnelId": self.tunnel.un_tid,
                                                        "flows": items})],
                          KEEPALIVE_TIMEOUT, now, out, extra=len(items))
        return out

    def peer_request(self, vipa: str, now: float) -> list[Action]:
        """Ask the server who is at ``vipa`` of its mesh (PeerReq): the answer is a
        :class:`PeerFound` (the anchor vouches for the key it authenticated)."""
        out: list[Action] = []
        if self.state is LinkState.UP and self.peer.kind is PeerKind.SERVER:
            self._request("peer", [("PeerReq", {"sipId": self.cfg.me, "vipa": vipa})],
                          KEEPALIVE_TIMEOUT, now, out, extra=vipa)
        else:
            out.append(PeerFound(self.peer.name, vipa, "", b""))
        return out

    # -- the initiator's sequence ------------------------------------------------------------
    def _attempt(self, now: float, out: list[Action]) -> None:
        """The top of the retry loop: associate if needed, then set the tunnel up."""
        if not self.usable:
            self.tried = True
            self._set(LinkState.LINK_DOWN, "interface unusable")
            return
        if self.peer.kind is PeerKind.AGENT:
            self._handshake("validate", now, out, LinkState.HANDSHAKE)
        elif self.peer.lost or not self.peer.record.vipa:
            if self.session is None:
                self._handshake("associate", now, out, LinkState.HANDSHAKE)
            else:
                self._associate(now, out)
        else:
            self._setup(now, out)

    def _then(self, then: str, ok: bool, now: float, out: list[Action]) -> None:
        """A handshake ended (``ok``: with a session): go on with what it was for."""
        if then == "associate":
            if ok:
                self._associate(now, out)
            else:
                if self.peer.state is not AssocState.ASSOCIATED:
                    self.peer.set_state(AssocState.UNREACHABLE)
                self._fail(now, out, "no handshake answer")
        elif then == "attempt":
            if ok or self.peer.kind is PeerKind.AGENT:
                self._attempt(now, out)
            else:       # a server that did not answer at all: not the old session either
                self._fail(now, out, "no handshake answer")
        elif then == "rekey":
            self._keepalive(now, out)        # on failure the old session goes on
        elif then == "validate":
            if ok:
                self._validate(now, out)
            else:
                self._fail(now, out, "no handshake answer")

    def _associate(self, now: float, out: list[Action]) -> None:
        """AssociationReq through this interface (every interface tries at once; the
        server answers a host's repeated association with the same VIpA)."""
        self._set(LinkState.ASSOCIATING, "association needed")
        self._request("associate", [("AssociationReq", {
            "sipId": self.cfg.me, "addressInUse": [],
            "dataPlaintext": self.cfg.plaintext_data})], SETUP_TIMEOUT, now, out)

    def _setup(self, now: float, out: list[Action]) -> None:
        self._set(LinkState.SETTING_UP, "associated")
        self._request("setup", [("TunnelSetupReq", {
            "sipId": self.cfg.me, "vipa": self.peer.record.vipa, "tunnelId": self.tunnel.tid,
            "interface": self.iface})], SETUP_TIMEOUT, now, out)

    def _send_keepalive(self, challenge: str, now: float, out: list[Action], tries: int) -> None:
        content: dict[str, Any] = {"sipId": self.cfg.me, "tunnelId": self.tunnel.un_tid,
                                   "lastDelay": self.tunnel.rtt_ms}
        if challenge:
            content["challenge"] = challenge
        self._request("keepalive", [("KeepAlive", content)], KEEPALIVE_TIMEOUT, now, out,
                      extra=tries)

    def _keepalive(self, now: float, out: list[Action]) -> None:
        """In UP, every ``keepalive`` seconds (after a rekey if one is due)."""
        if self.peer.kind is PeerKind.AGENT:     # probes are its keepalive
            self._wake_at = now + self.cfg.keepalive_s
            return
        self._ka_busy = True
        self._send_keepalive("", now, out, 1)

    def _answered(self, t: _Txn, answer: tuple[int, str, list[tuple[str, dict[str, Any]]]] | None,
                  err: str, rtt: float, now: float, out: list[Action]) -> None:
        """A transaction ended: ``answer`` (code, reason, body), or None with ``err``."""
        name = self.peer.name
        if t.what == "peer":
            out.append(_peer_found(name, t.extra, answer, err))
            return
        if t.what == "handover":
            if answer is None:
                log.warning("handover of %d flow(s) to tunnel %d not confirmed: %s", t.extra,
                            self.tunnel.tid, err)
            elif answer[0] != 200:
                self._refused("a handover", answer[0], answer[1])   # lost: the next tick acts
            return
        if t.what == "associate":
            if answer is None:
                log.warning("anchor %s: association via %s failed: %s", name, self.iface, err)
                if self.peer.state is not AssocState.ASSOCIATED:
                    self.peer.set_state(AssocState.UNREACHABLE)
                self._fail(now, out, "association failed")
                return
            code, reason, body = answer
            resp = _find(body, "AssociationResp")
            if code != 200 or resp is None or not resp.get("associationSuccess"):
                log.error("anchor %s refused association via %s: %d %s", name, self.iface,
                          code, reason or (resp or {}).get("reason", ""))
                self.peer.set_state(AssocState.REFUSED)
                self._fail(now, out, "association refused")
                return
            if self._accept_association(resp, out):
                self._setup(now, out)
            else:
                self._fail(now, out, "unusable association")
            return
        if t.what == "setup":
            if answer is None:
                log.warning("tunnel %s->%s: setup failed: %s", self.iface, name, err)
                self._fail(now, out, "setup failed")
                return
            code, reason, body = answer
            resp = _find(body, "TunnelSetupResp")
            if code != 200 or resp is None:
                self._refused(f"tunnel setup via {self.iface}", code, reason)
                if self.peer.lost and self._quick:
                    self._quick = False      # an authenticated answer: associate again now
                    self._attempt(now, out)
                else:
                    self._fail(now, out, "setup refused")
                return
            if not 0 < resp["serverTunnelID"] <= PATH_MAX:
                log.error("anchor %s sent tunnel id %d (must fit 24 bits)", name,
                          resp["serverTunnelID"])
                self._fail(now, out, "bad tunnel id")
                return
            self.tunnel.un_tid = resp["serverTunnelID"]
            self._epoch = self.peer.epoch    # the server has this tunnel as of now
            self._setup_rtt = rtt
            self._seen_as = (resp.get("yourAddress"), resp.get("yourPort"))
            self._set(LinkState.VALIDATING, "tunnel set up")
            self._send_keepalive(resp.get("challenge", ""), now, out, 1)
            return
        # a keepalive: validating the path (after setup) or keeping an UP tunnel alive
        ok, challenge = False, ""
        if answer is not None:
            code, reason, body = answer
            resp = _find(body, "KeepAliveResp")
            if code != 200 or resp is None:
                self._refused(f"keepalive of tunnel {self.tunnel.tid}", code, reason)
            else:
                ok = True
                self.tunnel.rtt_ms = rtt * 1000.0
                self.tunnel.last_rx = now
                challenge = resp.get("challenge", "")
        if ok and challenge and t.extra < VALIDATE_TRIES:
            self._send_keepalive(challenge, now, out, t.extra + 1)   # echo the new one
            return
        ok = ok and not challenge
        if self.state is LinkState.VALIDATING:
            if ok:
                self._up(now, self._setup_rtt, out)
            else:
                self._fail(now, out, "path not validated")
            return
        self._ka_busy = False
        if self.state is not LinkState.UP:
            return
        self._misses = 0 if ok else self._misses + 1
        if not ok and self.peer.lost and answer is not None:
            # it answered "not registered": the session works, associate again now
            self._tunnel_lost(now, "association lost", out, fresh=False)
            return
        if not ok and (self.peer.lost or self._misses >= DEAD_AFTER):
            self._tunnel_lost(now, "keepalive loss", out)
            return
        self._wake_at = now + self.cfg.keepalive_s

    def _accept_association(self, resp: dict[str, Any], out: list[Action]) -> bool:
        name = self.peer.name
        try:
            vipa = str(ipaddress.IPv4Address(resp.get("vipa") or ""))
        except ValueError:
            log.error("anchor %s sent an unusable VIpA %r", name, resp.get("vipa"))
            return False
        role = resp.get("role", "anchor")
        serves: frozenset[bytes] = frozenset()
        if role == "fixed-host":
            ip = ipaddress.ip_address(self.remote[0])
            serves = frozenset({ip.packed}) if ip.version == 4 else frozenset()
        rec = self.peer.record
        if (rec.vipa, rec.role) != (vipa, role) or self.peer.state is not AssocState.ASSOCIATED:
            log.info("anchor %s (%s): VIpA %s", name, role, vipa)   # once, not per interface
        pool = None
        if resp.get("mesh") and resp.get("meshPool"):
            try:
                pool = str(ipaddress.IPv4Network(resp["meshPool"]))
            except ValueError:
                log.error("anchor %s sent an unusable mesh pool %r", name, resp["meshPool"])
        vipa6 = ""
        if resp.get("vipa6"):
            try:
                vipa6 = str(ipaddress.IPv6Address(resp["vipa6"]))
            except ValueError:     # IPv4 still works: go on without IPv6
                log.error("anchor %s sent an unusable IPv6 VIpA %r", name, resp["vipa6"])
        out.append(Associated(name, vipa, role, serves, pool, vipa6))
        rec.vipa = vipa     # the driver's forwarder sets the rest; the setup needs it now
        if self.peer.lost:  # tunnels set up under the lost association are set up again
            self.peer.epoch += 1
        self.peer.lost = False
        self.peer.set_state(AssocState.ASSOCIATED)
        return True

    def _refused(self, what: str, code: int, reason: str) -> None:
        if code == 501 and "not registered" in reason:
            self.peer.lost = True
        log.error("anchor %s refused %s: %d %s", self.peer.name, what, code, reason)

    def _up(self, now: float, rtt: float, out: list[Action]) -> None:
        t = self.tunnel
        self.tried = True
        self.backoff = 1.0
        self._misses = 0
        self._quick = True
        self._set(LinkState.UP, "path validated")
        self.monitor = PathMonitor(self.cfg.probe, started=now)
        self._settled = False
        self._next_tick = now + TICK
        self.quiet = False
        out.append(TunnelUp(t, t.un_tid))
        if self.peer.kind is PeerKind.SERVER:
            t.rtt_ms = rtt * 1000.0
            seen = self._seen_as
            log.info("tunnel %d up: %s -> %s (%s:%d), seen as %s:%s", t.tid, self.iface,
                     self.peer.name, *self.remote, seen[0], seen[1])
        else:
            log.info("tunnel %d up: %s -> %s (%s:%d)", t.tid, self.iface, self.peer.name,
                     *t.remote)
        self._wake_at = now + self.cfg.keepalive_s

    def _down(self, now: float, reason: str, out: list[Action]) -> None:
        """Leave UP (if in it): TunnelDown, no more probes."""
        if self.state is LinkState.UP:
            out.append(TunnelDown(self.tunnel, reason))
        self.monitor = None
        self._settled = False
        self._next_tick = _INF
        self.quiet = False

    def _tunnel_lost(self, now: float, reason: str, out: list[Action], fresh: bool = True
                     ) -> None:
        """An UP tunnel stopped working (keepalives or probes): down now, then a fresh
        handshake and set it up again (an anchor that restarted forgot our keys).
        ``fresh=False``: the server answered that it lost our association (the session
        works): associate again at once, no handshake.

        Silence on the last UP tunnel to a server (every tunnel silent) means the server
        is gone or restarted and lost our keys and association (a packet sealed with a
        session it does not know is dropped without a word): the handshake is followed
        by an association, and handshakes are retried every RECOVER_EVERY for
        RECOVER_FOR seconds, so the link is back within about a second of the server."""
        peer = self.peer
        if peer.kind is PeerKind.SERVER and reason in ("probe loss", "keepalive loss"):
            peer.suspect_at = now                 # the other tunnels probe now (_probe_tick)
            if not peer.up - {self.iface}:
                if not peer.recovering(now):
                    log.warning("anchor %s: every tunnel to it is silent (restarted?): "
                                "handshake and association again", peer.name)
                peer.silent_at = now
                peer.lost = True
        self._down(now, reason, out)
        log.warning("tunnel %d (%s -> %s) down", self.tunnel.tid, self.iface, self.peer.name)
        self._ka_busy = False
        self._wake_at = _INF
        for t in [t for t in self._txns.values() if t.what == "keepalive"]:
            del self._txns[t.branch]
        if self.role is Role.RESPONDER:
            self._validated = False
            self._set(LinkState.IDLE, reason)     # the initiator handshakes again
            return
        if not fresh:
            self._attempt(now, out)
            return
        self._set(LinkState.HANDSHAKE, reason)
        self._renew(now, out)

    def _renew(self, now: float, out: list[Action]) -> None:
        """A forced handshake (unless the session is brand new and younger than the
        silence of every tunnel to the server), then the attempt."""
        s = self.session
        if s is not None and now - s.created <= MIN_REKEY and s.created > self.peer.silent_at \
                and self._hs is None:
            self._attempt(now, out)
        elif self._hs is None:
            self._handshake("attempt", now, out, LinkState.HANDSHAKE)
        else:
            self._hs.then = "attempt"

    def _fail(self, now: float, out: list[Action], why: str) -> None:
        """An attempt failed: wait (1, 2, 4 ... BACKOFF_MAX s, or until a link event;
        RECOVER_EVERY while the server may be restarting)."""
        self.tried = True
        self._set(LinkState.BACKOFF, why)
        self._wake_at = now + (self._recover_every() if self._recovering(now) else self.backoff)

    def _recovering(self, now: float) -> bool:
        return self.peer.kind is PeerKind.SERVER and self.peer.recovering(now)

    def _recover_every(self) -> float:
        """RECOVER_EVERY less up to a quarter at random: the hosts of a restarted server
        that noticed together do not all come back in step."""
        return RECOVER_EVERY * (1.0 - 0.25 * self.env.random_bytes(1)[0] / 255)

    def _hs_budget(self, hs: _Handshake) -> float:
        """How long a handshake tries: SETUP_TIMEOUT, or to the end of the recovery."""
        if hs.then == "rekey" or self.peer.kind is not PeerKind.SERVER:
            return SETUP_TIMEOUT
        return max(SETUP_TIMEOUT, self.peer.silent_at + RECOVER_FOR - hs.started)

    def _woken(self, now: float, out: list[Action]) -> None:
        """The wait timer: the end of a backoff, or the next keepalive."""
        if self.state is LinkState.BACKOFF:
            if not self._recovering(now):
                self.backoff = min(self.backoff * 2, BACKOFF_MAX)
            self._set(LinkState.HANDSHAKE, "retry")
            self._renew(now, out)
        elif self.state is LinkState.UP and self.tunnel.state != "up":
            self._tunnel_lost(now, "tunnel down", out)
        elif self.state is LinkState.UP and not self._ka_busy and self._hs is None:
            s = self.session
            if self.role is Role.INITIATOR and s is not None and (
                    now - s.created > REKEY_AFTER or s.send_counter > REKEY_AFTER_MESSAGES):
                self._handshake("rekey", now, out, None)
            else:
                self._keepalive(now, out)

    # -- handshakes ----------------------------------------------------------------------------
    def _handshake(self, then: str, now: float, out: list[Action], state: LinkState | None
                   ) -> None:
        if state is not None:
            self._set(state, f"handshake for {then}")
        hs = _Handshake(then, self.session, started=now)
        self._hs = hs
        self._send_init(hs, now, out)

    def _send_init(self, hs: _Handshake, now: float, out: list[Action]) -> None:
        """A fresh initiation (new index and timestamp), with mac2 if we hold a cookie."""
        cookie = self.cookie
        if cookie is not None and now - cookie[1] >= COOKIE_LIFE:
            self.cookie = cookie = None
        hs.index = self.env.new_index()
        hs.init = Initiation(static=self.cfg.static, remote_static=self.peer.public_key,
                             local_index=hs.index, wall_ns=self.env.wall_ns(),
                             cookie=cookie[0] if cookie is not None else None)
        hs.sent_at, hs.paced = now, False
        hs.wait = min(hs.delay, self._hs_budget(hs) - hs.waited)     # never past the budget
        hs.deadline = now + hs.wait
        out.append(Send(self.iface, hs.init.packet, self.remote))

    def _hs_timer(self, hs: _Handshake, now: float, out: list[Action]) -> None:
        budget = self._hs_budget(hs)
        if hs.paced:                         # the pause after useless cookies is over
            if hs.waited < budget:
                self._send_init(hs, now, out)
            else:
                self._hs_failed(hs, now, out)
            return
        hs.init, hs.index = None, 0          # its answer, if late, is a stray one now
        hs.waited += hs.wait
        hs.delay = min(hs.delay * 2, self._recover_every() if self._recovering(now) else sip.T2)
        if hs.waited < budget:
            self._send_init(hs, now, out)
        else:
            self._hs_failed(hs, now, out)

    def _hs_failed(self, hs: _Handshake, now: float, out: list[Action]) -> None:
        self._hs = None
        if self.peer.record.vipa or self.peer.kind is PeerKind.AGENT:
            log.warning("anchor %s: no handshake answer via %s within %.0f s (path down?)",
                        self.peer.name, self.iface, hs.waited)
        else:
            log.warning("anchor %s: no handshake answer via %s within %.0f s (unreachable, "
                        "wrong public_key, or this host not a [[peer]] there)", self.peer.name,
                        self.iface, SETUP_TIMEOUT)
        self._then(hs.then, False, now, out)

    def _new_session(self, s: Session, old: Session | None, now: float,
                     out: list[Action]) -> None:
        out.append(NewSession(self.peer.name, s))
        self.peer.record.session = s        # the driver's forwarder indexes it too
        if old is not None:   # keep opening the old session's packets for a while
            self._retiring.append((now + PREVIOUS_SESSION_LIFE, old))

    def _on_initiation(self, data: bytes, src: tuple[str, int], now: float,
                       out: list[Action]) -> None:
        """Responder: a valid initiation from our peer makes a session; then its address
        must echo a challenge before the tunnel carries anything."""
        r = self._responder
        if r is None or not r.mac_ok(data):
            out.append(Drop("handshake_bad_mac" if r is not None else "stray_handshake"))
            return
        acc = r.accept(data, now, self.env.new_index)
        if acc is None:
            out.append(Drop("handshake_refused"))
            return
        acc.session.plain_data = self.cfg.plaintext_data
        self._new_session(acc.session, self.session, now, out)
        out.append(Send(self.iface, acc.response, src))
        if self.state is LinkState.UP and src == self.tunnel.remote:
            return                           # a rekey on the validated path
        if self.state is LinkState.UP:
            self._down(now, "peer moved", out)
        self._validated = False
        self._validate(now, out, src)

    # -- path validation of an agent peer (both roles) -----------------------------------------
    def _validate(self, now: float, out: list[Action], addr: tuple[str, int] | None = None
                  ) -> None:
        self._set(LinkState.VALIDATING, "session, address not yet proven")
        self._token = self.env.random_bytes(16)
        self._token_addr = addr or self.remote
        self._validate_until = now + SETUP_TIMEOUT
        self._challenge_at = now
        self._challenge_timer(now, out)

    def _challenge_timer(self, now: float, out: list[Action]) -> None:
        if self._token_addr is None:
            self._challenge_at = _INF
            return
        if now >= self._validate_until:
            self._token, self._token_addr = b"", None
            self._challenge_at = self._validate_until = _INF
            if self.role is Role.RESPONDER:
                self._set(LinkState.IDLE, "address not validated")
            else:
                self._fail(now, out, "address not validated")
            return
        s = self.session
        if s is not None:
            out.append(Send(self.iface, s.seal(TYPE_PATH_CHALLENGE, self._token,
                                               self.tunnel.un_tid), self._token_addr))
        self._challenge_at = min(now + CHALLENGE_EVERY, self._validate_until)

    # -- probes ----------------------------------------------------------------------------------
    def _ping(self, now: float, out: list[Action]) -> None:
        s = self.session
        if s is not None:
            out.append(Send(self.iface, s.seal(TYPE_PING, PROBE.pack(now), self.tunnel.un_tid),
                            self.tunnel.remote))

    def _probe_tick(self, now: float, out: list[Action]) -> None:
        """Every TICK while UP: probe if due, notice a dead path, say when settled."""
        m, t = self.monitor, self.tunnel
        self._next_tick = now + TICK
        self._ticked_at = now
        if m is None or t.state != "up":     # taken down behind our back (tests do)
            self.monitor, self._next_tick = None, _INF
            return
        if self.peer.kind is PeerKind.SERVER:
            if self.peer.lost or self._epoch != self.peer.epoch:
                # another link heard that the server lost our association (and maybe
                # made a new one): our tunnel went with it, set it up again now
                self._tunnel_lost(now, "association lost", out, fresh=False)
                return
        if m.last_rx < self.peer.suspect_at:
            m.last_data = now                # another tunnel to it died silent: probe as busy
        probe, dead = m.tick(now, t.tx_packets, t.rx_packets)
        if dead:
            log.warning("tunnel %d (%s -> %s): no answer for %.2f s, down", t.tid,
                        t.interface, t.peer, now - m.last_rx)
            self._tunnel_lost(now, "probe loss", out)
            return
        if probe:
            self._ping(now, out)
        if not self._settled and now - m.started >= self.cfg.return_after_s:
            self._settled = True
            out.append(Settled(t))
        quiet = m.quiet_until(now)
        if not self._settled:
            quiet = min(quiet, m.started + self.cfg.return_after_s)
        self.quiet = quiet > now + TICK
        if self.quiet:
            self._next_tick = quiet

    def wake_tick(self, now: float) -> None:
        """Traffic moved while the probe tick slept (:attr:`quiet`): tick at once, so
        the monitor sees it and probes at the active pace again."""
        if self.quiet and self.monitor is not None:
            self.quiet = False
            self._next_tick = min(self._next_tick, now)

    # -- SIP client transactions -----------------------------------------------------------------
    def _request(self, what: str, signals: list[tuple[str, dict[str, Any]]], timeout: float,
                 now: float, out: list[Action], extra: Any = None) -> None:
        """Start one sealed SIP MESSAGE transaction with the server through this interface."""
        self._cseq += 1
        branch = sip.BRANCH_MAGIC + self.env.token()
        data = sip.build_request(target=self.remote, from_user=self.cfg.me,
                                 via=self.tunnel.local, call_id=self.env.token(), cseq=self._cseq,
                                 branch=branch, body=upmt.encode(signals))
        delays = list(sip.retransmit_schedule(timeout))
        t = _Txn(branch, what, data, delays, now + delays[0], now, timeout,
                 extra=0 if extra is None else extra)
        self._txns[branch] = t
        self.stats["requests"] += 1
        self._send_sip(t, out)

    def _send_sip(self, t: _Txn, out: list[Action]) -> None:
        s = self.session
        if s is not None:            # no session: nothing leaves, the transaction times out
            out.append(Send(self.iface, s.seal(TYPE_CONTROL, t.data), self.remote))

    def _txn_timer(self, t: _Txn, now: float, out: list[Action]) -> None:
        t.step += 1
        if t.step < len(t.delays):
            self.stats["retransmits"] += 1
            t.sent_at = now
            t.deadline = now + t.delays[t.step]
            self._send_sip(t, out)
            return
        del self._txns[t.branch]
        self.stats["timeouts"] += 1
        err = f"no answer from {self.remote[0]}:{self.remote[1]} within {t.timeout:g} s"
        self._answered(t, None, err, 0.0, now, out)

    def _open(self, data: bytes) -> bytes | None:
        """Open a sealed packet with the current or a retiring session (agent peers)."""
        idx = HEADER.unpack_from(data)[1]
        cands = [self.session] + [s for _, s in self._retiring]
        for s in cands:
            if s is not None and s.local_index == idx:
                got = s.open(data)
                return None if got is None else got[1]
        return None


def _peer_found(anchor: str, vipa: str,
                answer: tuple[int, str, list[tuple[str, dict[str, Any]]]] | None,
                err: str) -> PeerFound:
    """A PeerReq's answer as a :class:`PeerFound` (nobody, unless found with a usable key)."""
    nobody = PeerFound(anchor, vipa, "", b"")
    if answer is None:
        log.warning("anchor %s: no answer to a peer lookup of %s: %s", anchor, vipa, err)
        return nobody
    code, reason, body = answer
    resp = _find(body, "PeerResp")
    if code != 200 or resp is None:
        log.warning("anchor %s refused a peer lookup of %s: %d %s", anchor, vipa, code, reason)
        return nobody
    if not resp.get("found"):
        return nobody
    try:
        key = base64.b64decode(str(resp.get("publicKey", "")), validate=True)
    except ValueError:
        key = b""
    name = str(resp.get("name") or "")
    if len(key) != 32 or not name or resp.get("vipa") != vipa:
        log.warning("anchor %s: unusable answer to a peer lookup of %s", anchor, vipa)
        return nobody
    return PeerFound(anchor, vipa, name, key)


def _find(body: list[tuple[str, dict[str, Any]]], mtype: str) -> dict[str, Any] | None:
    return next((c for t, c in body if t == mtype), None)
