"""ice/checklist.py on its own: one Checklist driven by hand, the peer played by the test.

Everything is pure: the test builds the peer's STUN messages with aioice's codec, feeds
them to ``on_stun`` and advances ``now`` to ``next_deadline()``.
"""

from __future__ import annotations

import random
import struct

import pytest
from aioice import stun
from hypothesis import given, settings
from hypothesis import strategies as st

from upmt_tun.ice.candidates import IceCandidate, TunnelSocket, gather
from upmt_tun.ice.checklist import (
    Action,
    Checklist,
    Failed,
    IceState,
    PairState,
    PairSucceeded,
    Role,
    Selected,
    SendStun,
    Timing,
)

DEFAULT = Timing()
L_UFRAG, L_PWD = "locL", "l" * 22
R_UFRAG, R_PWD = "remR", "r" * 22
ONE_SOCKET = gather([TunnelSocket(0, "wlan0", ("192.168.1.10", 4000), ("203.0.113.7", 61000))])
TWO_SOCKETS = gather([TunnelSocket(0, "wlan0", ("192.168.1.10", 4000), ("203.0.113.7", 61000)),
                      TunnelSocket(1, "wwan0", ("10.0.0.5", 4001), None)])
PEER = ("198.51.100.1", 50000)


def cand(ip: str, port: int, typ: str = "srflx", priority: int = 1_694_498_815,
         foundation: str | None = None) -> IceCandidate:
    return IceCandidate(foundation or f"f{ip.replace('.', '').replace(':', '')}{port}",
                        priority, ip, port, typ)


def make(role: Role = Role.CONTROLLED, tie_breaker: int = 5, *, timing: Timing = DEFAULT,
         local: tuple[IceCandidate, ...] = ONE_SOCKET,
         remote: list[IceCandidate] | None = None) -> Checklist:
    cl = Checklist(role, L_UFRAG, L_PWD, tie_breaker, random.Random(3).randbytes, local,
                   timing)
    if remote is not None:
        cl.set_remote(R_UFRAG, R_PWD, remote)
    return cl


def peer_request(*, username: str = f"{L_UFRAG}:{R_UFRAG}", pwd: str = L_PWD,
                 role_attr: str | None = "ICE-CONTROLLING", tie_breaker: int = 1,
                 priority: int | None = 1_862_270_975, use_candidate: bool = False,
                 fingerprint: bool = True, cls: stun.Class = stun.Class.REQUEST,
                 method: stun.Method = stun.Method.BINDING, tid: bytes = b"T" * 12) -> bytes:
    m = stun.Message(method, cls, transaction_id=tid)
    m.attributes["USERNAME"] = username
    if priority is not None:
        m.attributes["PRIORITY"] = priority
    if role_attr is not None:
        m.attributes[role_attr] = tie_breaker
    if use_candidate:
        m.attributes["USE-CANDIDATE"] = None
    m.add_message_integrity(pwd.encode())
    if not fingerprint:
        del m.attributes["FINGERPRINT"]
    return bytes(m)


def peer_answer(request: bytes, mapped: tuple[str, int], *, pwd: str = R_PWD,
                error: int | None = None) -> bytes:
    """The peer's response to one of our checks."""
    req = stun.parse_message(request)
    cls = stun.Class.RESPONSE if error is None else stun.Class.ERROR
    m = stun.Message(stun.Method.BINDING, cls, transaction_id=req.transaction_id)
    if error is None:
        m.attributes["XOR-MAPPED-ADDRESS"] = mapped
    else:
        m.attributes["ERROR-CODE"] = (error, "x")
    m.add_message_integrity(pwd.encode())
    return bytes(m)


def sends(actions: list[Action]) -> list[SendStun]:
    return [a for a in actions if isinstance(a, SendStun)]


def advance(cl: Checklist, until: float) -> list[tuple[float, Action]]:
    out: list[tuple[float, Action]] = []
    for _ in range(10_000):
        d = cl.next_deadline()
        if d is None or d > until:
            return out
        out += [(d, a) for a in cl.on_timer(d)]
    raise AssertionError("deadline does not advance")


def first_check(cl: Checklist) -> SendStun:
    d = cl.next_deadline()
    assert d is not None
    s = sends(cl.on_timer(d))
    assert len(s) == 1
    return s[0]


# ---------------------------------------------------------------- authentication

REQUEST_CASES = [
    ("authenticated", {}, None),
    ("signed with another pwd", {"pwd": "x" * 22}, "bad-integrity"),
    ("for another ufrag (a twin's check)", {"username": f"zzzz:{R_UFRAG}"}, "bad-username"),
    ("from a stale remote ufrag", {"username": f"{L_UFRAG}:old1"}, "bad-username"),
    ("username without colon", {"username": L_UFRAG}, "bad-username"),
    ("our own check looped back", {"username": f"{R_UFRAG}:{L_UFRAG}", "pwd": R_PWD},
     "bad-username"),
    ("no fingerprint", {"fingerprint": False}, "no-fingerprint"),
    ("no role attribute", {"role_attr": None}, "malformed"),
    ("no priority", {"priority": None}, "malformed"),
    ("priority 0", {"priority": 0}, "malformed"),
    ("an indication", {"cls": stun.Class.INDICATION}, "indication"),
    ("not a binding", {"method": stun.Method.ALLOCATE}, "not-binding"),
]


@pytest.mark.parametrize(("why", "kwargs", "drop"), REQUEST_CASES,
                         ids=[c[0] for c in REQUEST_CASES])
def test_requests_are_answered_only_when_they_verify(why: str, kwargs: dict[str, object],
                                                     drop: str | None) -> None:
    cl = make(remote=[cand(*PEER)])
    out = cl.on_stun(peer_request(**kwargs), 0, PEER, 0.0)  # type: ignore[arg-type]
    if drop is None:
        assert not cl.drops
        (resp,) = sends(out)
        assert (resp.socket_id, resp.addr) == (0, PEER)
        msg = stun.parse_message(resp.data)
        assert msg.message_class is stun.Class.RESPONSE
        assert msg.attributes["XOR-MAPPED-ADDRESS"] == PEER
        assert msg.check_message_integrity(L_PWD.encode()) and "FINGERPRINT" in msg.attributes
    else:
        assert out == [] and cl.drops == {drop: 1}


def test_a_check_from_a_loopback_source_is_not_answered() -> None:
    cl = make(remote=[cand(*PEER)])
    assert cl.on_stun(peer_request(), 0, ("127.0.0.1", 9), 0.0) == []
    assert cl.drops == {"unusable-source": 1}


def test_a_host_never_succeeds_against_itself() -> None:
    """The peer's host candidate is our own address (same private subnet on both sides):
    our check comes back to our own socket, is not answered, and the pair fails."""
    me = ("192.168.1.10", 4000)
    cl = make(Role.CONTROLLING, remote=[cand(*me, typ="host")])
    events: list[tuple[float, Action]] = []
    for _ in range(100):
        d = cl.next_deadline()
        if d is None:
            break
        for a in cl.on_timer(d):
            events.append((d, a))
            if isinstance(a, SendStun):
                assert a.addr == me
                events += [(d, b) for b in cl.on_stun(a.data, a.socket_id, me, d)]
    assert cl.drops["bad-username"] == 7             # every transmission came back
    assert not [a for _, a in events if isinstance(a, PairSucceeded | Selected)]
    assert [a for _, a in events if isinstance(a, Failed)] == [Failed("all checks failed")]


def test_responses_that_do_not_verify_are_dropped_and_retransmission_goes_on() -> None:
    cl = make(Role.CONTROLLING, remote=[cand(*PEER)])
    check = first_check(cl)
    assert cl.on_stun(peer_answer(check.data, ("203.0.113.7", 61000), pwd="x" * 22),
                      0, PEER, 0.01) == []
    assert cl.drops == {"bad-integrity": 1}
    assert cl.pairs[0].state is PairState.IN_PROGRESS
    assert [a.data for _, a in advance(cl, 0.5) if isinstance(a, SendStun)] == [check.data]
    out = cl.on_stun(peer_answer(check.data, ("203.0.113.7", 61000)), 0, PEER, 0.52)
    assert out[0] == PairSucceeded(0, PEER, ("203.0.113.7", 61000), pytest.approx(0.02))
    assert cl.pairs[0].state is PairState.SUCCEEDED


def test_our_checks_carry_username_priority_role_integrity_and_fingerprint() -> None:
    cl = make(Role.CONTROLLING, tie_breaker=77, remote=[cand(*PEER)])
    check = first_check(cl)
    msg = stun.parse_message(check.data)
    assert msg.attributes["USERNAME"] == f"{R_UFRAG}:{L_UFRAG}"
    assert msg.attributes["ICE-CONTROLLING"] == 77
    assert msg.attributes["PRIORITY"] == (110 << 24) + (65535 << 8) + 255   # prflx
    assert "USE-CANDIDATE" not in msg.attributes
    assert msg.check_message_integrity(R_PWD.encode()) and "FINGERPRINT" in msg.attributes


@pytest.mark.parametrize(("why", "answer", "state", "drop"), [
    ("unknown transaction", lambda d: peer_answer(peer_request(tid=b"N" * 12), PEER),
     PairState.IN_PROGRESS, "unknown-transaction"),
    ("error 400", lambda d: peer_answer(d, PEER, error=400), PairState.FAILED, None),
    ("no mapped address", lambda d: _strip_mapped(peer_answer(d, PEER)), PairState.FAILED,
     "malformed"),
])
def test_response_outcomes(why: str, answer: object, state: PairState,
                           drop: str | None) -> None:
    cl = make(Role.CONTROLLING, remote=[cand(*PEER)])
    check = first_check(cl)
    assert callable(answer)
    cl.on_stun(answer(check.data), 0, PEER, 0.01)
    assert cl.pairs[0].state is state
    assert dict(cl.drops) == ({drop: 1} if drop else {})


def _strip_mapped(data: bytes) -> bytes:
    m = stun.parse_message(data)
    out = stun.Message(m.message_method, m.message_class, transaction_id=m.transaction_id)
    out.add_message_integrity(R_PWD.encode())
    return bytes(out)


def test_a_response_from_another_address_fails_the_pair() -> None:
    cl = make(Role.CONTROLLING, remote=[cand(*PEER)])
    check = first_check(cl)
    out = cl.on_stun(peer_answer(check.data, PEER), 0, ("198.51.100.1", 50001), 0.01)
    assert cl.pairs[0].state is PairState.FAILED
    assert out == [Failed("all checks failed")]       # it was the only pair


# ------------------------------------------------------------- timers and caps

def test_retransmissions_follow_rfc_8489_then_the_checklist_fails() -> None:
    cl = make(Role.CONTROLLING, remote=[cand(*PEER)])
    events = advance(cl, 100.0)
    sent = [(round(t, 3), a.data) for t, a in events if isinstance(a, SendStun)]
    assert [t for t, _ in sent] == [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert len({d for _, d in sent}) == 1                 # one transaction, same bytes
    assert [(round(t, 3), a) for t, a in events if isinstance(a, Failed)] == [
        (39.5, Failed("all checks failed"))]
    assert cl.state is IceState.FAILED and cl.next_deadline() is None


def test_new_checks_are_paced_by_ta() -> None:
    remotes = [cand(f"198.51.100.{i}", 50000, foundation=f"f{i}") for i in range(1, 6)]
    cl = make(Role.CONTROLLING, remote=remotes)
    firsts: dict[bytes, float] = {}
    for t, a in advance(cl, 0.3):
        if isinstance(a, SendStun):
            firsts.setdefault(a.data[8:20], round(t, 3))
    assert sorted(firsts.values()) == [0.0, 0.05, 0.1, 0.15, 0.2]


def test_one_foundation_waits_the_others_are_frozen_until_it_succeeds() -> None:
    remotes = [cand(f"198.51.100.{i}", 50000, foundation="same",
                    priority=1_694_498_815 - i) for i in range(1, 4)]
    cl = make(Role.CONTROLLING, remote=remotes)
    assert [p.state for p in cl.pairs] == [PairState.WAITING] + [PairState.FROZEN] * 2
    check = first_check(cl)
    assert advance(cl, 0.4) == []                   # the frozen ones wait for the first
    cl.on_stun(peer_answer(check.data, ("203.0.113.7", 61000)), 0, check.addr, 0.41)
    assert [p.state for p in cl.pairs[1:]] == [PairState.WAITING] * 2


def test_pairs_are_capped_keeping_the_best() -> None:
    remotes = [cand(f"198.51.100.{i}", 50000, priority=1000 + i) for i in range(1, 9)]
    cl = make(Role.CONTROLLING, timing=Timing(max_pairs=5), local=TWO_SOCKETS,
              remote=remotes)
    assert len(cl.pairs) == 5 and cl.drops["pair-cap"] == 11
    assert sorted(p.remote.priority for p in cl.pairs) == [1006, 1007, 1007, 1008, 1008]


def test_remote_candidates_are_capped_and_unusable_ones_skipped() -> None:
    remotes = [cand("127.0.0.1", 1), cand("169.254.1.1", 2), cand("2001:db8::1", 3)]
    remotes += [cand(f"198.51.100.{i}", 50000) for i in range(1, 30)]
    cl = make(Role.CONTROLLING, remote=remotes)
    assert cl.drops == {"remote-candidate-unusable": 2, "remote-candidate-cap": 1}
    assert len(cl.pairs) == 13                      # 16 - 2 unusable - 1 IPv6 (no v6 socket)


def test_no_pair_at_all_fails_at_once() -> None:
    cl = make(Role.CONTROLLING, remote=[cand("2001:db8::1", 3)])
    assert cl.next_deadline() == 0.0
    assert cl.on_timer(0.0) == [Failed("no candidate pairs")]


def test_checks_in_flight_are_capped() -> None:
    remotes = [cand(f"198.51.100.{i}", 50000, foundation=f"f{i}") for i in range(1, 7)]
    cl = make(Role.CONTROLLING, timing=Timing(max_in_flight=2), remote=remotes)
    tids = {a.data[8:20] for _, a in advance(cl, 5.0) if isinstance(a, SendStun)}
    assert len(tids) == 2


def test_bytes_per_second_of_checks_are_capped() -> None:
    remotes = [cand(f"198.51.100.{i}", 50000, foundation=f"f{i}") for i in range(1, 17)]
    cl = make(Role.CONTROLLING, timing=Timing(rate=1000.0, burst=300.0), remote=remotes)
    sent = [(t, len(a.data)) for t, a in advance(cl, 3.0) if isinstance(a, SendStun)]
    for end in (0.5, 1.0, 2.0, 3.0):
        assert sum(n for t, n in sent if t <= end) <= 300 + 1000 * end
    assert sum(n for _, n in sent) > 2000            # it does keep sending at the rate


def test_answers_are_dropped_when_the_rate_is_spent() -> None:
    cl = make(timing=Timing(rate=100.0, burst=200.0), remote=[cand(*PEER)])
    answered = [len(sends(cl.on_stun(peer_request(tid=bytes([i]) * 12), 0, PEER, 0.0)))
                for i in range(5)]
    assert answered[0] == 1 and 0 in answered and cl.drops["rate"] >= 1


# ---------------------------------------------------------------------- roles

@pytest.mark.parametrize(("ours", "our_tb", "theirs", "their_tb", "error", "after"), [
    (Role.CONTROLLING, 10, "ICE-CONTROLLING", 5, 487, Role.CONTROLLING),
    (Role.CONTROLLING, 5, "ICE-CONTROLLING", 10, None, Role.CONTROLLED),
    (Role.CONTROLLED, 10, "ICE-CONTROLLED", 5, None, Role.CONTROLLING),
    (Role.CONTROLLED, 5, "ICE-CONTROLLED", 10, 487, Role.CONTROLLED),
    (Role.CONTROLLING, 5, "ICE-CONTROLLED", 10, None, Role.CONTROLLING),
    (Role.CONTROLLED, 5, "ICE-CONTROLLING", 10, None, Role.CONTROLLED),
])
def test_role_conflicts_on_requests(ours: Role, our_tb: int, theirs: str, their_tb: int,
                                    error: int | None, after: Role) -> None:
    cl = make(ours, our_tb, remote=[cand(*PEER)])
    (resp,) = sends(cl.on_stun(peer_request(role_attr=theirs, tie_breaker=their_tb),
                               0, PEER, 0.0))
    msg = stun.parse_message(resp.data)
    assert msg.error_code == error
    assert msg.check_message_integrity(L_PWD.encode())
    assert cl.role is after


def test_a_487_answer_switches_our_role_and_retries_the_pair() -> None:
    cl = make(Role.CONTROLLING, remote=[cand(*PEER)])
    check = first_check(cl)
    cl.on_stun(peer_answer(check.data, PEER, error=487), 0, PEER, 0.01)
    assert cl.role is Role.CONTROLLED and cl.pairs[0].state is PairState.WAITING
    retry = first_check(cl)
    assert "ICE-CONTROLLED" in stun.parse_message(retry.data).attributes


def test_pair_priority_is_rfc_8445_and_follows_the_role() -> None:
    r = cand(*PEER, priority=1000)
    cl = make(Role.CONTROLLING, remote=[r])
    g, d = ONE_SOCKET[0].priority, 1000
    assert cl.pairs[0].priority == (min(g, d) << 32) + 2 * max(g, d) + 1
    cl.on_stun(peer_request(role_attr="ICE-CONTROLLING", tie_breaker=1 << 60), 0, PEER, 0.0)
    assert cl.role is Role.CONTROLLED
    assert cl.pairs[0].priority == (min(g, d) << 32) + 2 * max(g, d) + 0


# ------------------------------------------------- triggered checks, nomination

def test_a_check_from_an_unknown_address_teaches_a_peer_reflexive_candidate() -> None:
    cl = make(remote=[cand(*PEER)])
    prflx = ("198.51.100.1", 50123)
    cl.on_stun(peer_request(priority=1_862_270_000), 0, prflx, 0.0)
    learnt = [p for p in cl.pairs if p.remote.addr == prflx]
    assert len(learnt) == 1
    assert learnt[0].remote.type == "prflx" and learnt[0].remote.priority == 1_862_270_000
    assert first_check(cl).addr == prflx               # the triggered check goes first


def test_controlled_selects_the_pair_the_controlling_side_nominates() -> None:
    cl = make(remote=[cand(*PEER)])
    check = first_check(cl)
    cl.on_stun(peer_answer(check.data, ("203.0.113.7", 61000)), 0, PEER, 0.02)
    out = cl.on_stun(peer_request(use_candidate=True), 0, PEER, 0.1)
    assert Selected(0, PEER) in out and cl.selected == Selected(0, PEER)
    assert cl.state is IceState.COMPLETED


def test_controlled_follows_a_later_nomination_of_another_pair() -> None:
    """The controlling side nominates again only after its first nomination's answers were
    lost; both ends must then agree on the new pair."""
    other = ("198.51.100.1", 50007)
    cl = make(remote=[cand(*PEER), cand(*other)])
    for _ in range(2):
        check = first_check(cl)
        cl.on_stun(peer_answer(check.data, ("203.0.113.7", 61000)), 0, check.addr, 0.06)
    assert {p.state for p in cl.pairs} == {PairState.SUCCEEDED}
    assert cl.on_stun(peer_request(use_candidate=True), 0, PEER, 0.2)[-1] == Selected(0, PEER)
    out = cl.on_stun(peer_request(use_candidate=True, tid=b"U" * 12), 0, other, 40.0)
    assert out[-1] == Selected(0, other) and cl.selected == Selected(0, other)
    assert cl.drops == {"renominated": 1}


def test_new_candidates_revive_a_failed_checklist() -> None:
    cl = make(Role.CONTROLLING, remote=[cand(*PEER)])
    advance(cl, 100.0)
    assert cl.state is IceState.FAILED
    cl.set_remote(R_UFRAG, R_PWD, [cand(*PEER)])
    assert cl.state is IceState.FAILED               # nothing new
    cl.set_remote(R_UFRAG, R_PWD, [cand("198.51.100.9", 50000)])
    assert cl.state is IceState.RUNNING and first_check(cl).addr == ("198.51.100.9", 50000)


def test_a_nomination_before_our_own_check_succeeded_selects_on_success() -> None:
    cl = make(remote=[cand(*PEER)])
    cl.on_stun(peer_request(use_candidate=True), 0, PEER, 0.0)
    assert cl.selected is None
    check = first_check(cl)
    out = cl.on_stun(peer_answer(check.data, ("203.0.113.7", 61000)), 0, PEER, 0.02)
    assert [type(a) for a in out] == [PairSucceeded, Selected]


def test_controlling_nominates_the_best_valid_pair_with_use_candidate() -> None:
    cl = make(Role.CONTROLLING, remote=[cand(*PEER)])
    check = first_check(cl)
    cl.on_stun(peer_answer(check.data, ("203.0.113.7", 61000)), 0, PEER, 0.02)
    nomination = first_check(cl)
    assert "USE-CANDIDATE" in stun.parse_message(nomination.data).attributes
    out = cl.on_stun(peer_answer(nomination.data, ("203.0.113.7", 61000)), 0, PEER, 0.1)
    assert out == [Selected(0, PEER)]
    assert cl.next_deadline() is None                   # nothing else to check


def test_a_request_before_the_answer_is_answered_and_paired_later() -> None:
    cl = make()
    assert cl.next_deadline() is None and cl.state is IceState.NEW
    assert len(sends(cl.on_stun(peer_request(), 0, PEER, 0.0))) == 1
    cl.set_remote(R_UFRAG, R_PWD, [])
    assert [p.remote.addr for p in cl.pairs] == [PEER]
    assert first_check(cl).addr == PEER


def test_new_remote_credentials_restart_and_forget_the_old_pairs() -> None:
    cl = make(remote=[cand(*PEER)])
    first_check(cl)
    cl.set_remote("newR", "n" * 22, [cand("198.51.100.9", 50000)])
    assert [p.remote.addr for p in cl.pairs] == [("198.51.100.9", 50000)]
    assert cl.pairs[0].state is PairState.WAITING
    cl.restart("newL", "m" * 22)
    assert cl.pairs == () and cl.state is IceState.NEW and cl.selected is None


@pytest.mark.parametrize("kwargs", [
    {"tie_breaker": -1}, {"tie_breaker": 1 << 64},
    {"local": (IceCandidate("f", 1, "192.168.1.10", 4000, "host"),)},
])
def test_local_misuse_is_a_value_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        make(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timing"):
        Timing(ta=0.0)
    with pytest.raises(ValueError, match="timing"):
        Timing(burst=10.0)
    with pytest.raises(ValueError, match="ufrag"):
        Checklist(Role.CONTROLLED, "a:b", L_PWD, 1, random.Random(1).randbytes, ONE_SOCKET)


# ---------------------------------------------------------------------- fuzz

@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_fuzz_random_datagrams_never_raise(data: bytes) -> None:
    cl = make(Role.CONTROLLING, remote=[cand(*PEER)])
    assert isinstance(cl.on_stun(data, 0, PEER, 0.0), list)
    cl.on_stun(data, 9, PEER, 0.0)
    assert cl.drops["unknown-socket"] == 1


@settings(max_examples=300)
@given(st.integers(0, 200), st.binary(min_size=1, max_size=4), st.booleans())
def test_fuzz_mutated_checks_and_answers_never_raise(at: int, junk: bytes,
                                                     answer: bool) -> None:
    """Mutate the attributes, then give the message a valid FINGERPRINT again, so the
    attribute decoders and the checks behind the fingerprint are what gets exercised."""
    cl = make(Role.CONTROLLING, remote=[cand(*PEER)])
    check = first_check(cl)
    data = (peer_answer(check.data, PEER) if answer else peer_request())[:-8]
    at = 20 + at % (len(data) - 20)
    body = data[:at] + junk + data[at + len(junk):]
    body += b"\0" * (-len(body) % 4)
    body = body[:2] + (len(body) - 12).to_bytes(2, "big") + body[4:]
    mutated = body + struct.pack("!HHI", 0x8028, 4, stun.message_fingerprint(body))
    out = cl.on_stun(mutated, 0, PEER, 0.01)
    assert all(isinstance(a, SendStun | PairSucceeded | Selected | Failed) for a in out)
