"""ICE with one mesh peer: the rendezvous over the relay and the checklist around it.

Sans-I/O like the rest of ``ice/``: ``now`` in, actions out. The agent (``agent.py``)
carries the actions out: :class:`SendSip` sealed end to end with the peer's own session
and wrapped in a RELAY datagram (so the anchor forwards the offer and answer without
reading them: it must not see the ICE credentials, which is why this replaces the
paper's anchor-as-SIP-proxy), ``SendStun`` on the named tunnel socket, :class:`DirectPath`
(a pair both ends selected: try a direct link there) and :class:`NoDirect`.

Rendezvous (RFC 3261 INVITE / 200 / ACK, SDP per RFC 8839 with ``a=upmt-vipa`` and
``a=upmt-key``, ``ice/sdp.py``)::

    controlling (the relay link's initiator)        controlled
        INVITE (offer) ---- T1, 2 T1 .. until 8 s --->  (the same answer to repeats)
        <------------------------------------ 200 (answer)
        ACK ----------------------------------------->
        checks on the tunnel sockets <------------------> checks
        Selected -> DirectPath                           Selected -> DirectPath

A re-INVITE with new credentials is an ICE restart (:meth:`IcePeer.restart`: interfaces
or NAT mappings changed, or the direct path died); ``BYE`` ends it. The SDP's VIpA and key
must be the ones the anchor vouched for. Failures retry with backoff (5 s doubling to 120
s); ``direct = false`` answers INVITEs with 603 Decline.

Either end may offer again (a restart after its interface changed, a retry after a
failure); the ICE roles stay those of the relay link. The controlled end retries half a
backoff later than the controlling one, so it rarely needs to, and when both offers
cross (glare) the controlling end's wins: it answers the other's INVITE with 491 Request
Pending, and the controlled end drops its own offer and answers (RFC 3261 section 14.1
lets the 491 side retry later; here the crossing offer already did the work).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

from ..signalling import sip
from .candidates import IceCandidate
from .checklist import (
    Checklist,
    Failed,
    IceState,
    PairSucceeded,
    Role,
    Selected,
    SendStun,
    Timing,
)
from .sdp import IceDescription, build, new_credentials, parse

__all__ = ["DirectPath", "IcePeer", "IcePhase", "NoDirect", "PairUp", "SendSip"]

log = logging.getLogger(__name__)

INVITE_TIMEOUT = 8.0
SELECT_TIMEOUT = 45.0      # a checklist that neither selects nor fails by then has failed
RETRY_FIRST = 5.0
RETRY_MAX = 120.0
_INF = float("inf")
# a pair with no answer fails after 5 checks (0, 0.5, 1.5, 3.5, 7.5 s) and 2 s more: a
# symmetric NAT is known to keep the relay within 10 s, not RFC 8489's 39.5 s
TIMING = Timing(max_tx=5, rm=4)


class IcePhase(Enum):
    IDLE = "idle"             # controlled: waiting for an offer
    OFFERING = "offering"     # INVITE sent, no answer yet
    CHECKING = "checking"
    SELECTED = "selected"
    FAILED = "failed"         # waiting to retry (backoff)
    DECLINED = "declined"     # direct = false here or at the peer


@dataclass(frozen=True)
class SendSip:
    """A SIP message for the peer, to be sealed end to end and relayed."""

    data: bytes


@dataclass(frozen=True)
class DirectPath:
    socket_id: int
    remote: tuple[str, int]


@dataclass(frozen=True)
class NoDirect:
    reason: str


@dataclass(frozen=True)
class PairUp:
    """A check succeeded on a socket (maybe one without a direct path yet)."""

    socket_id: int
    remote: tuple[str, int]


Action = SendSip | SendStun | DirectPath | NoDirect | PairUp


class IcePeer:
    """ICE with one peer (see the module docstring)."""

    def __init__(self, *, me: str, controlling: bool, enabled: bool,
                 local: Callable[[], Sequence[IceCandidate]], my_vipa: str, my_key: bytes,
                 peer_vipa: str, peer_key: bytes,
                 rng: Callable[[int], bytes] = secrets.token_bytes) -> None:
        self.me, self.enabled, self.local = me, enabled, local
        self.my_vipa, self.my_key = my_vipa, my_key
        self.peer_vipa, self.peer_key = peer_vipa, peer_key
        self.rng = rng
        self.role = Role.CONTROLLING if controlling else Role.CONTROLLED
        self.phase = IcePhase.IDLE if enabled else IcePhase.DECLINED
        self.checklist: Checklist | None = None
        self.reason = "" if enabled else "direct = false"
        self._cseq = 0
        self._call = ""
        self._invite: bytes = b""
        self._resend_at = _INF
        self._resend_every = sip.T1
        self._give_up_at = _INF
        self._retry_at = _INF
        self._backoff = RETRY_FIRST
        self._answers: dict[tuple[str, str], bytes] = {}   # (Call-ID, CSeq) -> our 200
        self.tie_breaker = int.from_bytes(rng(8), "big")
        # (socket, peer address) of direct paths that died since this checklist began:
        # not tried again until the next restart
        self.dead: set[tuple[int, tuple[str, int]]] = set()

    # -- timers ------------------------------------------------------------------------
    def next_deadline(self) -> float:
        d = min(self._resend_at, self._give_up_at, self._retry_at)
        if self.checklist is not None:
            cd = self.checklist.next_deadline()
            if cd is not None:
                d = min(d, cd)
        return d

    def on_timer(self, now: float) -> list[Action]:
        out: list[Action] = []
        if self._retry_at <= now:
            self._retry_at = _INF
            self.restart(now, out)
        if self._resend_at <= now and self.phase is IcePhase.OFFERING:
            self._resend_every = min(self._resend_every * 2, sip.T2)
            self._resend_at = now + self._resend_every
            out.append(SendSip(self._invite))
        if self._give_up_at <= now:
            self._fail(now, "no answer to the offer" if self.phase is IcePhase.OFFERING
                       else "no pair selected", out)
        cl = self.checklist
        if cl is not None and (d := cl.next_deadline()) is not None and d <= now:
            self._checklist(cl.on_timer(now), now, out)
        return out

    # -- events ------------------------------------------------------------------------
    def start(self, now: float) -> list[Action]:
        """The relay to the peer is up: the controlling end offers."""
        out: list[Action] = []
        if self.enabled and self.role is Role.CONTROLLING:
            self.restart(now, out)
        return out

    def restart(self, now: float, out: list[Action]) -> None:
        """A fresh offer (an ICE restart if one ran): new credentials, current candidates."""
        if not self.enabled:
            return
        ufrag, pwd = new_credentials(self.rng)
        self.checklist = Checklist(self.role, ufrag, pwd, self.tie_breaker, self.rng,
                                   self.local(), TIMING)
        self.dead.clear()
        self._retry_at = _INF
        self._cseq += 1
        self._call = secrets.token_hex(8)
        self._invite = self._request("INVITE", self._sdp().encode())
        self.phase = IcePhase.OFFERING
        self._resend_every = sip.T1
        self._resend_at = now + sip.T1
        self._give_up_at = now + INVITE_TIMEOUT
        out.append(SendSip(self._invite))

    def lost(self, now: float) -> None:
        """The last direct path died: the flows are back on the relay; try again later."""
        self.phase = IcePhase.FAILED
        self.reason = "direct path lost"
        self.checklist = None
        self._resend_at = self._give_up_at = _INF
        self._schedule_retry(now)

    def _schedule_retry(self, now: float) -> None:
        """Both ends retry; the controlled one half a backoff later (see the docstring)."""
        later = 1.0 if self.role is Role.CONTROLLING else 1.5
        self._retry_at = now + self._backoff * later
        self._backoff = min(self._backoff * 2, RETRY_MAX)

    def bye(self) -> bytes:
        """The BYE to send when this peer is forgotten."""
        self._cseq += 1
        return self._request("BYE", b"")

    def on_stun(self, data: bytes, socket_id: int, src: tuple[str, int], now: float
                ) -> list[Action]:
        out: list[Action] = []
        if self.checklist is not None:
            self._checklist(self.checklist.on_stun(data, socket_id, src, now), now, out)
        return out

    def on_sip(self, data: bytes, now: float) -> list[Action]:
        """A SIP message the peer sealed for us. Bad input is logged once and dropped."""
        out: list[Action] = []
        try:
            msg = sip.parse(data)
        except sip.MalformedSip:
            return out
        if isinstance(msg, sip.SipResponse):
            cseq = msg.headers.get_first("cseq") or ""
            if (msg.headers.get_first("call-id") != self._call or not cseq.endswith("INVITE")
                    or self.phase is not IcePhase.OFFERING):
                return out
            self._resend_at = _INF
            if msg.status_code == 491:          # glare: the other end's offer goes on
                self.phase, self.reason = IcePhase.IDLE, "offers crossed"
                self._give_up_at = _INF
                if self._retry_at == _INF:      # unless it never comes
                    self._schedule_retry(now)
                return out
            if msg.status_code != 200:
                self.phase, self.reason = IcePhase.DECLINED, f"peer: {msg.status_code} " \
                    f"{msg.reason_phrase}"
                self._give_up_at = _INF
                out.append(NoDirect(self.reason))
                return out
            desc = self._remote(msg.body)
            if desc is None or self.checklist is None:
                self._fail(now, "unusable answer", out)
                return out
            ack = self._request("ACK", b"")
            out.append(SendSip(ack))
            self.phase = IcePhase.CHECKING
            self._give_up_at = now + SELECT_TIMEOUT
            self.checklist.set_remote(desc.ufrag, desc.pwd, desc.candidates)
            self._checklist(self.checklist.on_timer(now), now, out)
            return out
        if msg.method == "INVITE":
            self._on_invite(msg, now, out)
        elif msg.method == "BYE":
            self.checklist = None
            self.phase, self.reason = IcePhase.IDLE, "peer said BYE"
            self._resend_at = self._give_up_at = self._retry_at = _INF
            out.append(NoDirect(self.reason))
        return out

    def _on_invite(self, req: sip.SipRequest, now: float, out: list[Action]) -> None:
        key = (req.headers.get_first("call-id") or "", req.headers.get_first("cseq") or "")
        old = self._answers.get(key)
        if old is not None:
            out.append(SendSip(old))            # a repeated INVITE: the same answer
            return
        if not self.enabled:
            self._answer(key, sip.build_response(req, 603, "Decline"), out)
            return
        if self.phase is IcePhase.OFFERING and self.role is Role.CONTROLLING:
            # both offered at once: ours wins; the other end answers ours
            out.append(SendSip(sip.build_response(req, 491, "Request Pending")))
            return
        desc = self._remote(req.body)
        if desc is None:
            self._answer(key, sip.build_response(req, 488, "Not Acceptable Here"), out)
            return
        ufrag, pwd = new_credentials(self.rng)          # a new offer: a new session
        self.checklist = Checklist(self.role, ufrag, pwd, self.tie_breaker, self.rng,
                                   self.local(), TIMING)
        self.dead.clear()
        self._answer(key, sip.build_response(req, 200, "OK", self._sdp().encode()), out)
        self.phase = IcePhase.CHECKING
        self._resend_at, self._retry_at = _INF, _INF
        self._give_up_at = now + SELECT_TIMEOUT
        self.checklist.set_remote(desc.ufrag, desc.pwd, desc.candidates)
        self._checklist(self.checklist.on_timer(now), now, out)

    # -- helpers -----------------------------------------------------------------------
    def _answer(self, key: tuple[str, str], data: bytes, out: list[Action]) -> None:
        if len(self._answers) >= 8:
            self._answers.clear()
        self._answers[key] = data
        out.append(SendSip(data))

    def _checklist(self, acts: Sequence[object], now: float, out: list[Action]) -> None:
        for a in acts:
            if isinstance(a, SendStun):
                out.append(a)
            elif isinstance(a, PairSucceeded):
                out.append(PairUp(a.socket_id, a.remote))
            elif isinstance(a, Selected) and self.phase is not IcePhase.SELECTED:
                self.phase, self.reason = IcePhase.SELECTED, ""
                self._give_up_at = _INF
                self._backoff = RETRY_FIRST
                out.append(DirectPath(a.socket_id, a.remote))
            elif isinstance(a, Failed):
                self._fail(now, a.reason, out)

    def _fail(self, now: float, reason: str, out: list[Action]) -> None:
        log.info("no direct path to %s (%s): retry in %.0f s", self.peer_vipa, reason,
                 self._backoff)
        self.phase, self.reason = IcePhase.FAILED, reason
        self._resend_at = self._give_up_at = _INF
        if self.checklist is not None and self.checklist.state is not IceState.COMPLETED:
            self.checklist = None
        self._schedule_retry(now)
        out.append(NoDirect(reason))

    def _sdp(self) -> str:
        cl = self.checklist
        assert cl is not None
        return build(IceDescription(cl.local_ufrag, cl.local_pwd, tuple(self.local())[:16],
                                    vipa=self.my_vipa, public_key=self.my_key))

    def _remote(self, body: bytes) -> IceDescription | None:
        try:
            desc = parse(body)
        except ValueError as e:
            log.warning("peer %s: unusable SDP: %s", self.peer_vipa, e)
            return None
        if desc.vipa != self.peer_vipa or desc.public_key != self.peer_key:
            log.warning("peer %s: SDP names another host than the anchor vouched for",
                        self.peer_vipa)
            return None
        return desc

    def _request(self, method: str, body: bytes) -> bytes:
        req = sip.SipRequest(method=method, uri=f"sip:{self.peer_vipa}")
        h = req.headers
        h.set_single("Via", f"SIP/2.0/UDP {self.my_vipa};branch={sip.BRANCH_MAGIC}"
                            f"{self._call}{self._cseq}")
        h.set_single("Max-Forwards", "70")
        h.set_single("From", f"<sip:{self.me}@{self.my_vipa}>;tag={self._call[:8]}")
        h.set_single("To", f"<sip:{self.peer_vipa}>")
        h.set_single("Call-ID", self._call)
        cseq = self._cseq if method != "ACK" else self._cseq
        h.set_single("CSeq", f"{cseq} {method}")
        if body:
            h.set_single("Content-Type", "application/sdp")
        req.body = body
        return bytes(req)
