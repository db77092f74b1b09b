"""The link state machine (``link.py``) alone: no asyncio, no sockets, a hand-turned clock.

A :class:`Server` plays the anchor's side in memory (the real ``handshake.Responder``,
sealed SIP answered from a script); :class:`Sim` delivers every ``Send`` at once and
advances time from deadline to deadline, as the agent's timer task does::

    Link(wan1 -> an1) --Send--> Server(203.0.113.1:5060)
          ^                          |
          +--- on_handshake / on_sip_response / on_pong (replies, zero delay)
"""

from __future__ import annotations

import base64
import itertools
from collections.abc import Callable
from typing import Any

import pytest

from upmt_tun import keys
from upmt_tun.dataplane.crypto import Session
from upmt_tun.dataplane.forwarder import AnchorLink
from upmt_tun.dataplane.packet import (
    PROBE,
    TYPE_CONTROL,
    TYPE_COOKIE,
    TYPE_HS_INIT,
    TYPE_HS_RESP,
    TYPE_PING,
    TYPE_PONG,
)
from upmt_tun.link import (
    BACKOFF_MAX,
    PREVIOUS_SESSION_LIFE,
    RECOVER_EVERY,
    RECOVER_FOR,
    REKEY_AFTER,
    SETUP_TIMEOUT,
    Action,
    Associated,
    AssocState,
    Drop,
    DropSession,
    Env,
    Link,
    LinkConfig,
    LinkState,
    NewSession,
    Peer,
    PeerKind,
    Role,
    Send,
    Settled,
    TunnelDown,
    TunnelUp,
)
from upmt_tun.signalling import sip, upmt
from upmt_tun.signalling.handshake import Responder
from upmt_tun.tables import Tunnel

AN = ("203.0.113.1", 5060)
LOCAL = ("10.1.0.2", 40000)
MH_PRIV, MH_PUB = keys.keypair()
AN_PRIV, AN_PUB = keys.keypair()
B_PRIV, B_PUB = keys.keypair()


def raw(b64: str) -> bytes:
    return base64.b64decode(b64)


def env() -> Env:
    idx = itertools.count(1)
    wall = itertools.count(1_700_000_000_000_000_000, 1_000_000)
    tok = itertools.count()
    return Env(new_index=lambda: next(idx), wall_ns=lambda: next(wall),
               random_bytes=lambda n: bytes(n), token=lambda: f"t{next(tok)}")


def server_link(keepalive: float = 10.0, stats: dict[str, int] | None = None) -> Link:
    peer = Peer("an1", AN, raw(AN_PUB), AnchorLink("an1"))
    t = Tunnel(1, "wan1", LOCAL, AN, "an1")
    cfg = LinkConfig(me="laptop", static=raw(MH_PRIV), keepalive_s=keepalive,
                     return_after_s=5.0)
    return Link("wan1", peer, t, cfg, env(),
                stats if stats is not None else dict.fromkeys(
                    ("requests", "retransmits", "timeouts", "stray", "malformed"), 0))


class Server:
    """The anchor's side of one link, scripted: ``answer[signal]`` -> (code, reason,
    response signals) or None (silence); ``silent``: nothing at all comes back;
    ``cookies``: that many initiations get an HS_COOKIE instead of an answer."""

    def __init__(self) -> None:
        self.responder = Responder(raw(AN_PRIV), {raw(MH_PUB): "laptop"})
        self.sessions: dict[int, Session] = {}
        self.silent = False
        self.cookies = 0
        self.got: list[str] = []        # what it received, in order
        self.challenge = "c1"
        self.answer: dict[str, Callable[[dict[str, Any]], tuple[int, str, list[Any]] | None]] = {
            "AssociationReq": lambda c: (200, "OK", [("AssociationResp", {
                "associationSuccess": True, "vipa": "100.100.0.2", "role": "anchor"})]),
            "TunnelSetupReq": lambda c: (200, "OK", [("TunnelSetupResp", {
                "serverTunnelID": 7, "yourAddress": "203.0.113.11", "yourPort": 40000,
                "challenge": self.challenge})]),
            "KeepAlive": lambda c: (200, "OK", [("KeepAliveResp", {
                "tunnelId": 7, "yourAddress": "203.0.113.11", "yourPort": 40000})]),
            "HandoverReq": lambda c: (200, "OK", [("HandoverResp", {"moved": 1})]),
        }

    def receive(self, data: bytes, now: float) -> list[bytes]:
        if self.silent:
            return []
        b0 = data[0]
        if b0 == TYPE_HS_INIT:
            self.got.append("HS_INIT")
            if self.cookies:
                self.cookies -= 1
                return [self.responder.cookie_reply(data, LOCAL, now)]
            acc = self.responder.accept(data, now, lambda: 1000 + len(self.sessions))
            assert acc is not None
            self.sessions[acc.session.local_index] = acc.session
            return [acc.response]
        s = self.sessions.get(int.from_bytes(data[4:8], "big"))
        if s is None:                   # not one of our sessions (we restarted): silence
            self.got.append("unknown session")
            return []
        opened = s.open(data)
        assert opened is not None
        if b0 == TYPE_PING:
            self.got.append("PING")
            return [s.seal(TYPE_PONG, opened[1], 0)]
        assert b0 == TYPE_CONTROL
        req = sip.parse(opened[1])
        assert isinstance(req, sip.SipRequest)
        (mtype, content), = upmt.decode(req.body)
        self.got.append(mtype)
        ans = self.answer[mtype](content)
        if ans is None:
            return []
        code, reason, body = ans
        return [s.seal(TYPE_CONTROL, sip.build_response(req, code, reason,
                                                        upmt.encode(body) if body else b""))]


class Sim:
    """Carries out a link's actions at once and advances time deadline by deadline."""

    def __init__(self, link: Link, server: Server) -> None:
        self.link, self.server = link, server
        self.now = 0.0
        self.cut = False                # this link's path loses everything it sends
        self.log: list[Action] = []
        self.states = [link.state]
        setter = link._set                             # noqa: SLF001 (record every change)

        def record(new: LinkState, why: str) -> None:
            setter(new, why)
            if new is not self.states[-1]:
                self.states.append(new)

        link._set = record                             # type: ignore[method-assign]

    def run(self, actions: list[Action]) -> None:
        queue = list(actions)
        while queue:
            a = queue.pop(0)
            self.log.append(a)
            if isinstance(a, Send) and a.addr == AN and not self.cut:
                for r in self.server.receive(a.data, self.now):
                    queue += self.deliver(r)

    def deliver(self, r: bytes) -> list[Action]:
        link, now = self.link, self.now
        if r[0] in (TYPE_HS_RESP, TYPE_COOKIE):
            return link.on_handshake(r, AN, now)
        s = link.session
        assert s is not None
        opened = s.open(r)
        assert opened is not None
        if r[0] == TYPE_PONG:
            return link.on_pong(PROBE.unpack(opened[1])[0], now)
        msg = sip.parse(opened[1])
        assert isinstance(msg, sip.SipResponse)
        return link.on_sip_response(msg, now)

    def start(self) -> None:
        self.run(self.link.start(self.now))

    def until(self, t: float) -> None:
        while self.link.next_deadline() <= t:
            self.now = max(self.now, self.link.next_deadline())
            self.run(self.link.on_timer(self.now))
        self.now = t

    def of(self, kind: type) -> list[Any]:
        return [a for a in self.log if isinstance(a, kind)]


def up(keepalive: float = 10.0) -> Sim:
    sim = Sim(server_link(keepalive), Server())
    sim.start()
    assert sim.link.state is LinkState.UP
    return sim


# -- the server sequence ---------------------------------------------------------------------
def test_first_attempt_goes_through_every_state_in_order() -> None:
    sim = Sim(server_link(), Server())
    sim.start()
    assert sim.states == [LinkState.IDLE, LinkState.HANDSHAKE, LinkState.ASSOCIATING,
                          LinkState.SETTING_UP, LinkState.VALIDATING, LinkState.UP]
    assert sim.server.got == ["HS_INIT", "AssociationReq", "TunnelSetupReq", "KeepAlive"]
    assert [type(a) for a in sim.log if not isinstance(a, Send)] == [
        NewSession, Associated, TunnelUp]
    (assoc,) = sim.of(Associated)
    assert (assoc.vipa, assoc.role) == ("100.100.0.2", "anchor")
    assert sim.link.tunnel.un_tid == 7 and sim.link.tried
    assert sim.link.peer.state is AssocState.ASSOCIATED and sim.link.tunnel.state == "up"


@pytest.mark.parametrize("signal, answer, state, why", [
    ("AssociationReq", (403, "Forbidden", []), AssocState.REFUSED, "association refused"),
    ("AssociationReq", (200, "OK", [("AssociationResp", {"associationSuccess": False})]),
     AssocState.REFUSED, "association refused"),
    ("AssociationReq", (200, "OK", [("AssociationResp", {"associationSuccess": True,
                                                         "vipa": "nope"})]),
     AssocState.ASSOCIATING, "unusable association"),
    ("AssociationReq", None, AssocState.UNREACHABLE, "association failed"),
    ("TunnelSetupReq", (500, "Server Error", []), AssocState.ASSOCIATED, "setup refused"),
    ("TunnelSetupReq", (200, "OK", [("TunnelSetupResp", {
        "serverTunnelID": 1 << 24, "yourAddress": "x", "yourPort": 1})]),
     AssocState.ASSOCIATED, "bad tunnel id"),
    ("TunnelSetupReq", None, AssocState.ASSOCIATED, "setup failed"),
    ("KeepAlive", None, AssocState.ASSOCIATED, "path not validated"),
    ("KeepAlive", (200, "OK", [("KeepAliveResp", {"tunnelId": 7, "yourAddress": "x",
                                                  "yourPort": 1, "challenge": "again"})]),
     AssocState.ASSOCIATED, "path not validated"),
])
def test_each_failure_of_the_sequence_backs_off(signal: str, answer: Any, state: AssocState,
                                                why: str) -> None:
    sim = Sim(server_link(), Server())
    sim.server.answer[signal] = lambda c: answer
    sim.start()
    sim.until(SETUP_TIMEOUT + 0.01)              # a silent server: Timer F ran out
    assert LinkState.BACKOFF in sim.states, sim.states
    assert sim.link.peer.state is state and sim.link.tried
    assert not sim.of(TunnelUp)


def test_sip_requests_are_retransmitted_on_timer_e_until_timer_f() -> None:
    sim = Sim(server_link(), Server())
    sim.server.answer["AssociationReq"] = lambda c: None
    sim.start()
    sim.until(SETUP_TIMEOUT + 0.01)
    # 0, 0.5, 1.5, 3.5 s (T1 doubling), then Timer F at 4 s
    assert sim.server.got == ["HS_INIT"] + ["AssociationReq"] * 4
    assert sim.link.stats["retransmits"] == 3 and sim.link.stats["timeouts"] == 1


def test_no_handshake_answer_retries_then_backs_off_doubling_to_the_cap() -> None:
    sim = Sim(server_link(), Server())
    sim.server.silent = True
    sim.start()
    sim.until(SETUP_TIMEOUT - 0.01)
    assert sim.server.got == []                                  # silent, but sent:
    assert sum(isinstance(a, Send) for a in sim.log) == 4        # 0, 0.5, 1.5, 3.5 s
    sim.until(SETUP_TIMEOUT)
    assert sim.link.state is LinkState.BACKOFF
    assert sim.link.peer.state is AssocState.UNREACHABLE
    waits = []
    while len(waits) < 8:     # each retry: handshakes (forced, then for the association)
        if sim.link.state is LinkState.BACKOFF:
            waits.append(round(sim.link.next_deadline() - sim.now, 3))
        sim.until(sim.link.next_deadline())
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, BACKOFF_MAX, BACKOFF_MAX, BACKOFF_MAX]


def test_cookies_retry_at_once_then_paced() -> None:
    sim = Sim(server_link(), Server())
    sim.server.cookies = 2
    sim.start()                                   # two cookies, each answered at once
    assert sim.server.got[:3] == ["HS_INIT"] * 3 and sim.link.state is LinkState.UP
    assert sim.link.cookie is not None
    sim2 = Sim(server_link(), Server())
    sim2.server.cookies = 5
    sim2.start()                 # the 4th cookie in a row: the next try waits for its turn
    assert sim2.server.got == ["HS_INIT"] * 4 and sim2.link.state is LinkState.HANDSHAKE
    sim2.until(0.49)
    assert sim2.server.got == ["HS_INIT"] * 4
    sim2.until(0.5)                  # the 5th gets a cookie too: the pause doubles (1 s)
    assert sim2.server.got == ["HS_INIT"] * 5 and sim2.link.state is LinkState.HANDSHAKE
    sim2.until(1.49)
    assert sim2.server.got == ["HS_INIT"] * 5
    sim2.until(1.5)
    assert sim2.server.got.count("HS_INIT") == 6 and sim2.link.state is LinkState.UP


def test_a_stray_or_forged_handshake_answer_is_dropped() -> None:
    sim = Sim(server_link(), Server())
    sim.server.silent = True
    sim.start()
    link = sim.link
    assert link.on_handshake(bytes([TYPE_HS_RESP]) + bytes(75), AN, 0.1) == [
        Drop("bad_handshake")]
    assert link.on_handshake(bytes([TYPE_COOKIE]) + bytes(51), AN, 0.1) == [Drop("bad_cookie")]
    assert link.on_handshake(bytes([TYPE_HS_RESP]) + bytes(75), ("192.0.2.9", 1), 0.1) == [
        Drop("stray_handshake")]


# -- UP: keepalives, rekey, probes -----------------------------------------------------------
def test_keepalive_every_period_and_two_misses_take_the_tunnel_down() -> None:
    sim = up(keepalive=1.0)
    sim.until(3.05)
    assert sim.server.got.count("KeepAlive") == 1 + 3          # validation, then 1, 2, 3 s
    sim.server.answer["KeepAlive"] = lambda c: None
    sim.until(20.0)
    down = sim.of(TunnelDown)
    assert down and down[0].reason == "keepalive loss"
    # a fresh handshake, then the tunnel is set up again (the server answers again)
    assert LinkState.HANDSHAKE in sim.states[sim.states.index(LinkState.UP) + 1:]


def test_not_registered_means_associate_again() -> None:
    sim = up(keepalive=1.0)
    normal = sim.server.answer["KeepAlive"]
    sim.server.answer["KeepAlive"] = lambda c: (501, "not registered", [])
    sim.server.answer["AssociationReq"] = lambda c: (sim.server.answer.update(KeepAlive=normal),
                                                     Server().answer["AssociationReq"](c))[1]
    got = len(sim.server.got)
    sim.until(1.01)
    assert [d.reason for d in sim.of(TunnelDown)] == ["association lost"]
    # an authenticated answer: the session works, no handshake, no backoff, no miss count
    assert [g for g in sim.server.got[got:] if g != "PING"] == [
        "KeepAlive", "AssociationReq", "TunnelSetupReq", "KeepAlive"]
    assert sim.link.state is LinkState.UP and LinkState.BACKOFF not in sim.states
    assert not sim.link.peer.lost


def test_rekey_after_120_s_keeps_the_tunnel_up_and_retires_the_old_session() -> None:
    sim = up(keepalive=10.0)
    old = sim.link.session
    assert old is not None
    sim.until(REKEY_AFTER + 0.01)
    assert sim.link.session is old                    # only at a keepalive
    sim.until(REKEY_AFTER + 10.0)
    new = sim.link.session
    assert new is not old and new is not None and sim.link.state is LinkState.UP
    assert LinkState.HANDSHAKE not in sim.states[sim.states.index(LinkState.UP):]
    assert not sim.of(TunnelDown) and not sim.of(DropSession)
    assert sim.server.got[-2:] == ["HS_INIT", "KeepAlive"]
    sim.until(REKEY_AFTER + 10.0 + PREVIOUS_SESSION_LIFE)
    assert [d.index for d in sim.of(DropSession)] == [old.local_index]


def test_probes_find_a_silent_path_dead_within_a_second() -> None:
    sim = up()
    sim.until(0.5)
    assert "PING" in sim.server.got and sim.link.monitor is not None
    assert sim.link.monitor.srtt is not None
    sim.link.tunnel.tx_packets += 1                   # traffic: probes every 100 ms
    sim.server.silent = True
    t0 = sim.now
    while not sim.of(TunnelDown) and sim.now < t0 + 3:
        sim.link.tunnel.tx_packets += 1
        sim.until(sim.now + 0.05)
    (down,) = sim.of(TunnelDown)
    assert down.reason == "probe loss" and sim.now - t0 < 1.0
    # its only tunnel to the server: the server went away or restarted (it forgot our
    # keys): a fresh handshake although the session is young, then an association
    assert sim.link.state is LinkState.HANDSHAKE and sim.link.peer.lost


def test_settled_once_after_return_after() -> None:
    sim = up()
    sim.until(4.9)
    assert not sim.of(Settled)
    sim.until(5.1)
    sim.until(9.0)
    assert len(sim.of(Settled)) == 1


def test_interface_down_and_up() -> None:
    sim = up()
    sim.run(sim.link.on_link(False, sim.now, "carrier lost"))
    assert [d.reason for d in sim.of(TunnelDown)] == ["carrier lost"]
    assert sim.link.state is LinkState.LINK_DOWN and sim.link.next_deadline() == float("inf")
    sim.until(100.0)
    assert sim.link.state is LinkState.LINK_DOWN           # nothing to try until it returns
    got = len(sim.server.got)
    sim.run(sim.link.on_link(True, sim.now))
    # associated and keyed already: straight to the setup through this interface
    assert sim.server.got[got:] == ["TunnelSetupReq", "KeepAlive"]
    assert sim.link.state is LinkState.UP


def test_an_unusable_interface_at_start_waits_and_counts_as_tried() -> None:
    link = server_link()
    assert link.start(0.0, usable=False) == []
    assert link.state is LinkState.LINK_DOWN and link.tried


def test_path_change_probes_and_keeps_alive_now_and_a_backoff_retries_now() -> None:
    sim = up()
    got = len(sim.server.got)
    sim.run(sim.link.on_path_changed(sim.now))
    sim.until(sim.now)
    assert sim.server.got[got:] == ["PING", "KeepAlive"]
    sim2 = Sim(server_link(), Server())
    sim2.server.answer["TunnelSetupReq"] = lambda c: (500, "x", [])
    sim2.start()
    assert sim2.link.state is LinkState.BACKOFF
    sim2.server.answer["TunnelSetupReq"] = Server().answer["TunnelSetupReq"]
    sim2.run(sim2.link.on_path_changed(sim2.now))
    sim2.until(sim2.now)
    assert sim2.link.state is LinkState.UP


def test_handover_is_one_transaction_and_its_answer_changes_nothing() -> None:
    sim = up()
    sim.run(sim.link.handover([[6, "100.100.0.2", "198.51.100.7", 40000, 80]], sim.now))
    assert sim.server.got[-1] == "HandoverReq" and sim.link.state is LinkState.UP
    assert sim.link.next_deadline() > sim.now


def test_stop_takes_the_tunnel_down_and_leaves_nothing_pending() -> None:
    sim = up()
    sim.run(sim.link.stop(sim.now))
    assert [d.reason for d in sim.of(TunnelDown)] == ["link removed"]
    assert sim.link.next_deadline() == float("inf")


# -- a server that lost its state (restarted), issue 13 ---------------------------------------
def pair(keepalive: float = 10.0) -> tuple[Sim, Sim]:
    """Two links (wan1, wan2) to one server, sharing its Peer, both UP."""
    a = up(keepalive)
    link = a.link
    b_link = Link("wan2", link.peer, Tunnel(2, "wan2", ("10.2.0.2", 40000), AN, "an1"),
                  link.cfg, env(), link.stats)
    b = Sim(b_link, a.server)
    b.start()
    assert b_link.state is LinkState.UP and link.peer.up == {"wan1", "wan2"}
    return a, b


def until_all(sims: tuple[Sim, ...], t: float, busy: tuple[Sim, ...] = ()) -> None:
    """Advance links that share a clock, deadline by deadline (``busy``: their tunnels
    carry traffic all along, so they probe every 100 ms)."""
    while True:
        for s in busy:
            s.link.tunnel.tx_packets += 1
            s.link.wake_tick(s.now)         # as the agent does when its data path wakes
        nxt = min(sims, key=lambda s: s.link.next_deadline())
        d = nxt.link.next_deadline()
        if d > t:
            break
        for s in sims:
            s.now = max(s.now, d)
        nxt.run(nxt.link.on_timer(d))
    for s in sims:
        s.now = t


def restart(sim: Sim, *others: Sim) -> Server:
    """The server restarts: a new one, which knows no session and no association."""
    fresh = Server()
    for s in (sim, *others):
        s.server = fresh
    return fresh


@pytest.mark.parametrize("back_after", [0.2, 1.3, 4.6, 12.0, 29.0])
def test_silence_on_every_tunnel_then_the_server_back_up_within_a_second(
        back_after: float) -> None:
    """The only tunnel goes silent (the server was killed): handshakes every second (not
    backed off) until it is back, then the association first (it lost it: no refused
    setup, no backoff) and the tunnel is up again within RECOVER_EVERY of its return."""
    sim = up()
    sim.link.tunnel.tx_packets += 1
    sim.server.silent = True
    t0 = sim.now
    until_all((sim,), t0 + 0.6, busy=(sim,))
    assert [d.reason for d in sim.of(TunnelDown)] == ["probe loss"]
    assert sim.link.peer.lost and sim.link.peer.recovering(sim.now)
    until_all((sim,), t0 + back_after)
    fresh = restart(sim)
    got = len(sim.log)
    until_all((sim,), t0 + back_after + RECOVER_EVERY + 0.01)
    assert sim.link.state is LinkState.UP, sim.states
    assert [g for g in fresh.got if g != "PING"] == [
        "HS_INIT", "AssociationReq", "TunnelSetupReq", "KeepAlive"]
    assert sum(isinstance(a, TunnelUp) for a in sim.log[got:]) == 1
    assert LinkState.BACKOFF not in sim.states and not sim.link.peer.lost


def test_a_server_gone_for_good_gets_backoff_after_the_recovery_window() -> None:
    sim = up()
    sim.link.tunnel.tx_packets += 1
    sim.server.silent = True
    t0 = sim.now
    until_all((sim,), t0 + 0.6, busy=(sim,))
    sent: list[float] = []
    orig = sim.run

    def run(actions: list[Action]) -> None:
        sent.extend(sim.now for a in actions if isinstance(a, Send) and a.data[0] == TYPE_HS_INIT)
        orig(actions)

    sim.run = run                                    # type: ignore[method-assign]
    until_all((sim,), t0 + RECOVER_FOR + 120.0)
    during = [t for t in sent if t < t0 + RECOVER_FOR]
    after = [t for t in sent if t > t0 + RECOVER_FOR + 1]
    gaps = [b - a for a, b in itertools.pairwise(during)]
    assert max(gaps) <= RECOVER_EVERY + 1e-9 and len(during) >= RECOVER_FOR / RECOVER_EVERY - 2
    # then the normal backoff: 1, 2, 4 .. 30 s between handshakes of 4 s each
    late_gaps = [b - a for a, b in itertools.pairwise(after)]
    assert max(late_gaps) >= BACKOFF_MAX and len(after) < 120 / 4
    assert sim.link.state is LinkState.BACKOFF or sim.link.state is LinkState.HANDSHAKE


def test_when_one_tunnel_dies_silent_the_others_probe_at_once() -> None:
    """wan1 carries traffic, wan2 is idle (its probes every 10 s): the server dies; wan1
    notices within a second, and wan2 probes at once instead of at its next idle probe,
    so it is known silent too within a second more: every tunnel is silent (recovery)."""
    a, b = pair()
    until_all((a, b), 40.0, busy=(a,))                # wan2's idle probes backed off
    assert b.link.monitor is not None and b.link.monitor.interval >= 8.0
    a.server.silent = True
    t0 = a.now
    until_all((a, b), t0 + 3.0, busy=(a,))
    (da,), (db,) = a.of(TunnelDown), b.of(TunnelDown)
    assert da.reason == db.reason == "probe loss"
    assert a.link.peer.lost and a.link.peer.silent_at - t0 < 2.0


def test_a_setup_answered_after_the_new_association_is_not_set_up_twice() -> None:
    """wan1 dies first with a young session: it sends its setup under the old session
    (the server is gone). wan2 dies too, handshakes and associates again with the
    restarted server; wan1's setup, retransmitted under the new session, is answered:
    its tunnel belongs to the new association and stays up (no second setup)."""
    a, b = pair()
    a.server.silent = True
    t0 = a.now
    until_all((a, b), t0 + 3.0, busy=(a,))
    assert a.link.state is LinkState.SETTING_UP and b.link.peer.lost
    fresh = restart(a, b)
    until_all((a, b), t0 + 8.0)
    assert a.link.state is LinkState.UP and b.link.state is LinkState.UP
    assert [d.reason for d in a.of(TunnelDown)] == ["probe loss"]
    assert [d.reason for d in b.of(TunnelDown)] == ["probe loss"]
    assert fresh.got.count("AssociationReq") == 1 and fresh.got.count("TunnelSetupReq") == 2


def test_one_path_dying_is_not_a_server_restart() -> None:
    """wan1's path loses everything, wan2 is fine: wan1 handshakes on the normal schedule
    and, without an answer, backs off; it never sends its setup sealed with the old
    session, and the peer is not marked lost (no re-association)."""
    a, b = pair()
    until_all((a, b), 10.0)                           # the session is older than MIN_REKEY
    a.cut = True
    t0 = a.now
    until_all((a, b), t0 + 0.6 + SETUP_TIMEOUT + 0.6, busy=(a,))
    assert [d.reason for d in a.of(TunnelDown)] == ["probe loss"] and not b.of(TunnelDown)
    assert not a.link.peer.lost and not a.link.peer.recovering(a.now)
    assert a.link.state is LinkState.BACKOFF
    sent_after = [x for x in a.log[a.log.index(a.of(TunnelDown)[0]):] if isinstance(x, Send)]
    assert all(x.data[0] == TYPE_HS_INIT for x in sent_after)
    a.cut = False
    until_all((a, b), a.now + 8.0)
    assert a.link.state is LinkState.UP and "AssociationReq" not in a.server.got[4:]


@pytest.mark.parametrize("signal", ["KeepAlive", "TunnelSetupReq", "HandoverReq"])
def test_not_registered_on_one_link_reassociates_at_once_and_the_others_follow(
        signal: str) -> None:
    """An authenticated "not registered" (the server restarted and we already have a
    session with it): associate again at once, no handshake, no backoff; the other
    link learns it from the peer on its next tick, not at its next keepalive."""
    a, b = pair(keepalive=10.0)
    server = a.server
    normal = dict(server.answer)
    server.answer[signal] = lambda c: (501, "not registered", [])
    server.answer["AssociationReq"] = lambda c: (server.answer.update(
        {signal: normal[signal]}), normal["AssociationReq"](c))[1]
    got = len(server.got)
    if signal == "KeepAlive":
        until_all((a, b), 10.01)
    elif signal == "HandoverReq":
        a.run(a.link.handover([[17, "100.100.0.2", "198.51.100.7", 5000, 6000]], a.now))
        until_all((a, b), a.now + 0.1)
    else:                         # a setup: wan1's path changed while it was in backoff
        a.run(a.link.on_link(False, a.now))
        a.run(a.link.on_link(True, a.now))
        until_all((a, b), a.now + 0.1)
    assert a.link.state is LinkState.UP and b.link.state is LinkState.UP
    assert b.of(TunnelDown)[0].reason == "association lost"
    assert "HS_INIT" not in server.got[got:] and LinkState.BACKOFF not in a.states + b.states
    assert server.got[got:].count("AssociationReq") >= 1


def test_not_registered_twice_in_a_row_backs_off() -> None:
    """An immediate re-association once; a server that keeps refusing gets the backoff."""
    sim = Sim(server_link(), Server())
    sim.server.answer["TunnelSetupReq"] = lambda c: (501, "not registered", [])
    sim.start()
    assert sim.server.got == ["HS_INIT", "AssociationReq", "TunnelSetupReq", "AssociationReq",
                              "TunnelSetupReq"]
    assert sim.link.state is LinkState.BACKOFF


# -- agent to agent: either role ---------------------------------------------------------------
A_ADDR, B_ADDR = ("198.51.100.10", 41000), ("198.51.100.20", 42000)


def agent_pair() -> tuple[Link, Link]:
    a = Link("wan1", Peer("b", B_ADDR, raw(B_PUB), AnchorLink("b"), kind=PeerKind.AGENT),
             Tunnel(1, "wan1", A_ADDR, B_ADDR, "b"),
             LinkConfig(me="a", static=raw(MH_PRIV)), env(), {})
    e = env()
    b = Link("eth0", Peer("a", ("0.0.0.0", 0), raw(MH_PUB), AnchorLink("a"),
                          kind=PeerKind.AGENT),
             Tunnel(2, "eth0", B_ADDR, ("0.0.0.0", 0), "a"),
             LinkConfig(me="b", static=raw(B_PRIV)),
             Env(e.new_index, e.wall_ns, lambda n: b"\x07" * n), {}, Role.RESPONDER)
    return a, b


def exchange(a: Link, b: Link, acts: list[Action], now: float, *,
             lose: Callable[[Send], bool] = lambda s: False) -> list[Action]:
    """Deliver every Send between the two links (A at A_ADDR, B at B_ADDR) at once."""
    log: list[Action] = []
    queue = [(a, x) for x in acts]
    while queue:
        frm, x = queue.pop(0)
        log.append(x)
        if isinstance(x, Send) and not lose(x):
            to = b if frm is a else a
            src = A_ADDR if frm is a else B_ADDR
            queue += [(to, y) for y in to.on_datagram(x.data, src, now)]
    return log


def test_agent_initiator_and_responder_handshake_validate_and_probe() -> None:
    a, b = agent_pair()
    assert b.start(0.0) == [] and b.state is LinkState.IDLE and b.tried
    log = exchange(a, b, a.start(0.0), 0.0)
    assert a.state is LinkState.UP and b.state is LinkState.UP
    assert b.tunnel.remote == A_ADDR                        # learnt, and validated
    assert a.session is not None and b.session is not None
    assert a.session.local_index == b.session.remote_index
    assert sum(isinstance(x, TunnelUp) for x in log) == 2
    assert not [x for x in log if isinstance(x, Drop)]
    # probes: A pings, B answers (B is the responder of probes too)
    a.tunnel.tx_packets += 1
    log = exchange(a, b, a.on_timer(a.next_deadline()), 0.2)
    assert a.monitor is not None and a.monitor.probes_answered == 1


def test_agent_responder_refuses_strangers_and_unvalidated_addresses() -> None:
    a, b = agent_pair()
    b.start(0.0)
    # a stranger (knows B's public key, is not A): refused after the DH, no session
    mallory = Link("x", Peer("b", B_ADDR, raw(B_PUB), AnchorLink("b"), kind=PeerKind.AGENT),
                   Tunnel(9, "x", ("192.0.2.66", 1), B_ADDR, "b"),
                   LinkConfig(me="m", static=raw(AN_PRIV)), env(), {})
    (send,) = mallory.start(0.0)
    assert isinstance(send, Send)
    assert b.on_datagram(send.data, ("192.0.2.66", 1), 0.0) == [Drop("handshake_refused")]
    assert b.session is None and b.state is LinkState.IDLE
    # a's challenge answers never arrive: B gives up validating after SETUP_TIMEOUT
    lost = exchange(a, b, a.start(0.0), 0.0,
                    lose=lambda s: s.data[0] == 0x86 and s.addr == B_ADDR)
    assert b.state is LinkState.VALIDATING and not any(isinstance(x, TunnelUp) for x in lost
                                                       if getattr(x, "tunnel", None) is b.tunnel)
    t = 0.0
    while b.next_deadline() <= SETUP_TIMEOUT:
        t = b.next_deadline()
        b.on_timer(t)
    assert b.state is LinkState.IDLE
    # a PATH_RESPONSE from an address we did not challenge is dropped
    assert b.on_path_response(b"\x07" * 16, ("192.0.2.66", 1), t) == [
        Drop("bad_path_response")]
    # a PING on a path that is not validated gets no PONG
    assert b.on_ping(PROBE.pack(0.0), A_ADDR, t) == [Drop("unvalidated_path")]


def test_agent_rekey_keeps_both_ends_up() -> None:
    a, b = agent_pair()
    b.start(0.0)
    exchange(a, b, a.start(0.0), 0.0)
    old = a.session
    now = 0.0
    while a.session is old and now < REKEY_AFTER + 30:
        now = a.next_deadline()
        exchange(a, b, a.on_timer(now), now)
        b.on_timer(now) if b.next_deadline() <= now else None
    assert a.session is not old and b.session is not None
    assert b.session.remote_index == a.session.local_index
    assert a.state is LinkState.UP and b.state is LinkState.UP


def test_an_idle_link_sleeps_between_keepalives_and_traffic_wakes_it() -> None:
    """Idle, the probe tick runs about once per keepalive probe, not every TICK (an idle
    agent must cost ~0 % CPU); packets moving (the driver's wake_tick) bring it back to
    the next tick and to the active probe pace."""
    a = up(keepalive=10.0)
    until_all((a,), 30.0)                                # settled and backed off
    ticks = 0
    orig = a.link._probe_tick                            # noqa: SLF001

    def counted(now: float, out: list[Action]) -> None:
        nonlocal ticks
        ticks += 1
        orig(now, out)

    a.link._probe_tick = counted                         # type: ignore[method-assign]
    until_all((a,), 90.0)
    assert a.link.quiet and ticks <= 60 / 10 * 3          # was 60 / TICK = 1 200
    a.link.tunnel.tx_packets += 1
    a.link.wake_tick(a.now)
    assert not a.link.quiet and a.link.next_deadline() <= a.now
    until_all((a,), a.now + 1.0, busy=(a,))
    m = a.link.monitor
    assert m is not None and m.interval == m.params.active_interval
