"""mesh.MeshDirectory and ice.driver.IcePeer: the pure parts of the agent's mesh."""

from __future__ import annotations

import ipaddress
import random

import pytest

from upmt_tun.ice.candidates import TunnelSocket, gather
from upmt_tun.ice.driver import DirectPath, IcePeer, IcePhase, NoDirect, SendSip
from upmt_tun.mesh import LOOKUP_TIMEOUT, NEGATIVE_TTL, MeshDirectory, is_relay_addr
from upmt_tun.signalling import sip


def ip(a: str) -> bytes:
    return ipaddress.IPv4Address(a).packed


KEY_A, KEY_B = bytes(range(32)), bytes(range(1, 33))


def test_pools_must_not_overlap_and_name_the_anchor() -> None:
    d = MeshDirectory()
    assert d.set_pool("an1", "100.100.0.0/16")
    assert d.set_pool("an1", "100.100.0.0/16")              # the same again: fine
    assert not d.set_pool("an2", "100.100.7.0/24")          # overlaps: refused
    assert d.set_pool("an2", "100.101.0.0/16")
    assert d.anchor_of(ip("100.100.0.3")) == "an1"
    assert d.anchor_of(ip("100.101.9.9")) == "an2"
    assert d.anchor_of(ip("198.51.100.7")) is None


def test_overlapping_pools_the_anchor_listed_first_wins_whoever_comes_first() -> None:
    d = MeshDirectory(order=["an1", "an2"])
    assert d.set_pool("an2", "100.100.0.0/16") and d.displaced == []
    assert d.found("an2", "100.100.0.3", "tv", KEY_A, 0.0) is not None
    assert d.set_pool("an1", "100.100.5.0/24")              # listed first: takes over
    assert d.displaced == ["an2"] and "an2" not in d.pools
    assert d.mesh_state("an2") == "refused: 100.100.0.0/16 overlaps anchor an1's " \
        "100.100.5.0/24"
    assert d.mesh_state("an1") == "100.100.5.0/24" and d.mesh_state("an3") is None
    assert d.anchor_of(ip("100.100.0.3")) is None            # an2's hosts: not the mesh
    assert not d.set_pool("an2", "100.100.0.0/16")          # listed after: refused
    assert [p.name for p in d.drop_anchor("an2", left=False)] == ["tv"]
    assert d.mesh_state("an2").startswith("refused")
    d.drop_anchor("an1")
    assert d.mesh_state("an1") is None and d.set_pool("an2", str(d.offered["an2"]))
    assert d.mesh_state("an2") == "100.100.0.0/16"


def test_lookups_one_at_a_time_negative_cache_and_caps() -> None:
    d = MeshDirectory(max_peers=2, max_pending=2)
    d.set_pool("an1", "100.100.0.0/16")
    v3, v4, v5 = ip("100.100.0.3"), ip("100.100.0.4"), ip("100.100.0.5")
    assert d.want(ip("198.51.100.7"), 0.0) is None           # not a mesh address
    assert d.want(v3, 0.0) == "an1"
    assert d.want(v3, 1.0) is None                           # asked already
    assert d.want(v3, LOOKUP_TIMEOUT) == "an1"               # no answer: ask again
    assert d.want(v4, 0.0) == "an1"
    assert d.want(v5, 0.0) is None                           # two lookups in flight
    assert d.found("an1", "100.100.0.4", "", b"", 1.0) is None      # nobody there
    assert d.want(v4, 1.0 + NEGATIVE_TTL - 0.1) is None      # believed a while
    assert d.want(v4, 1.0 + NEGATIVE_TTL) == "an1"
    p = d.found("an1", "100.100.0.3", "phone", KEY_B, 2.0)
    assert p is not None and p.key == "phone@an1" and p.vipa_b == v3
    assert is_relay_addr(p.addr) and p.addr == ("phone@an1", 0)
    assert d.want(v3, 3.0) is None                           # known: no lookup
    assert d.found("an1", "100.100.0.3", "phone", KEY_B, 3.0) is p   # the same answer


def test_another_host_at_a_vipa_replaces_the_old_one_and_forget() -> None:
    d = MeshDirectory()
    d.set_pool("an1", "100.100.0.0/16")
    old = d.found("an1", "100.100.0.3", "phone", KEY_B, 0.0)
    new = d.found("an1", "100.100.0.3", "tablet", KEY_A, 1.0)
    assert old is not None and new is not None and new is not old
    assert d.by_vipa[ip("100.100.0.3")] is new and "phone@an1" not in d.by_key
    assert d.found("an2", "100.100.0.4", "x", KEY_A, 1.0) is None     # not an2's pool
    assert d.drop_anchor("an1") == [new] and not d.by_key and not d.pools


# -- IcePeer: the rendezvous, peer to peer ------------------------------------------------
def _peer(controlling: bool, enabled: bool = True, seed: int = 1,
          peer_key: bytes = KEY_B) -> IcePeer:
    rng = random.Random(seed)
    me, them = ("100.100.0.2", "100.100.0.3") if controlling else ("100.100.0.3", "100.100.0.2")
    sock = TunnelSocket(0, "wan1", ("10.1.0.2", 40000 + seed), ("203.0.113.1" + str(seed), 5000))
    return IcePeer(me="a" if controlling else "b", controlling=controlling, enabled=enabled,
                   local=lambda: gather([sock]), my_vipa=me,
                   my_key=KEY_A if controlling else KEY_B, peer_vipa=them, peer_key=peer_key,
                   rng=rng.randbytes)


def _sips(acts: list[object]) -> list[bytes]:
    return [a.data for a in acts if isinstance(a, SendSip)]


def test_offer_answer_ack_then_checks_start_on_both_ends() -> None:
    a, b = _peer(True), _peer(False, seed=2, peer_key=KEY_A)
    (invite,) = _sips(list(a.start(0.0)))
    assert a.phase is IcePhase.OFFERING
    assert b"a=upmt-vipa:100.100.0.2" in invite and b"a=candidate:" in invite
    acts = b.on_sip(invite, 0.1)
    (ok,) = _sips(list(acts))
    assert isinstance(sip.parse(ok), sip.SipResponse) and b.phase is IcePhase.CHECKING
    assert _sips(list(b.on_sip(invite, 0.2))) == [ok]        # a repeat: the cached answer
    acts = a.on_sip(ok, 0.2)
    (ack,) = _sips(list(acts))
    assert b"ACK" in ack.split(b"\r\n")[0] and a.phase is IcePhase.CHECKING
    assert a.checklist is not None and b.checklist is not None
    assert a.checklist.remote_ufrag == b.checklist.local_ufrag
    assert b.checklist.remote_ufrag == a.checklist.local_ufrag


def test_offer_is_resent_then_fails_and_retries_with_backoff() -> None:
    a = _peer(True)
    (invite,) = _sips(list(a.start(0.0)))
    assert _sips(list(a.on_timer(a.next_deadline()))) == [invite]      # T1: resent
    t = 0.0
    while a.phase is IcePhase.OFFERING:
        t = a.next_deadline()
        acts = a.on_timer(t)
    assert a.phase is IcePhase.FAILED and t == pytest.approx(8.0)
    assert any(isinstance(x, NoDirect) for x in acts)
    assert a.next_deadline() == pytest.approx(t + 5.0)                 # retry after 5 s
    (again,) = _sips(list(a.on_timer(t + 5.0)))
    assert again != invite and a.phase is IcePhase.OFFERING            # new credentials


def test_a_peer_naming_another_key_or_direct_false_is_refused() -> None:
    a = _peer(True)
    (invite,) = _sips(list(a.start(0.0)))
    liar = _peer(False, seed=2, peer_key=KEY_B)            # expects another key than a's
    (resp,) = _sips(list(liar.on_sip(invite, 0.1)))
    r = sip.parse(resp)
    assert isinstance(r, sip.SipResponse) and r.status_code == 488
    no = _peer(False, enabled=False, seed=3, peer_key=KEY_A)
    (resp,) = _sips(list(no.on_sip(invite, 0.1)))
    r = sip.parse(resp)
    assert isinstance(r, sip.SipResponse) and r.status_code == 603
    acts = a.on_sip(resp, 0.2)
    assert a.phase is IcePhase.DECLINED and a.reason == "peer: 603 Decline"
    assert any(isinstance(x, NoDirect) for x in acts) and a.next_deadline() == float("inf")
    assert a.on_sip(b"garbage", 0.3) == [] and not any(
        isinstance(x, DirectPath) for x in a.on_sip(b"SIP/2.0 200 OK\r\n\r\n", 0.3))


def test_bye_ends_checking() -> None:
    a, b = _peer(True), _peer(False, seed=2, peer_key=KEY_A)
    (invite,) = _sips(list(a.start(0.0)))
    (ok,) = _sips(list(b.on_sip(invite, 0.1)))
    a.on_sip(ok, 0.2)
    acts = b.on_sip(a.bye(), 0.3)
    assert b.checklist is None and b.reason == "peer said BYE"
    assert any(isinstance(x, NoDirect) for x in acts)


def test_both_ends_retry_the_controlled_one_later() -> None:
    """A lost direct path: both ends schedule a new offer, the controlled end half a
    backoff later, so the controlling end's offer normally comes first and cancels it."""
    a, b = _peer(True), _peer(False, seed=2, peer_key=KEY_A)
    a.lost(10.0)
    b.lost(10.0)
    assert a.next_deadline() == pytest.approx(15.0)
    assert b.next_deadline() == pytest.approx(17.5)
    (invite,) = _sips(list(a.on_timer(15.0)))
    (ok,) = _sips(list(b.on_sip(invite, 15.1)))
    assert b.phase is IcePhase.CHECKING
    assert b.next_deadline() < 17.5 and not _sips(list(b.on_timer(17.5)))   # cancelled
    # the controlled end offers by itself when the other does not (its interface came
    # back, say): the roles stay those of the relay link
    c = _peer(False, seed=3, peer_key=KEY_A)
    c.lost(0.0)
    (invite,) = _sips(list(c.on_timer(7.5)))
    a2 = _peer(True, seed=4)
    (ok,) = _sips(list(a2.on_sip(invite, 7.6)))
    r = sip.parse(ok)
    assert isinstance(r, sip.SipResponse) and r.status_code == 200
    c.on_sip(ok, 7.7)
    assert c.phase is IcePhase.CHECKING and a2.phase is IcePhase.CHECKING
    assert c.checklist is not None and c.checklist.role.value == "controlled"
    assert a2.checklist is not None and a2.checklist.role.value == "controlling"


def test_crossing_offers_the_controlling_ends_wins() -> None:
    """Both ends offer at once (glare): the controlling end answers 491 and keeps its
    offer; the controlled end drops its own and answers; one checklist pair results."""
    a, b = _peer(True), _peer(False, seed=2, peer_key=KEY_A)
    (inv_a,) = _sips(list(a.start(0.0)))
    out: list[object] = []
    b.restart(0.0, out)                                  # b offers too (ICE restart)
    (inv_b,) = _sips(out)
    (pending,) = _sips(list(a.on_sip(inv_b, 0.05)))     # crossing: a refuses b's
    r = sip.parse(pending)
    assert isinstance(r, sip.SipResponse) and r.status_code == 491
    assert a.phase is IcePhase.OFFERING
    (ok,) = _sips(list(b.on_sip(inv_a, 0.05)))           # b yields and answers a's
    assert b.phase is IcePhase.CHECKING
    assert b.on_sip(pending, 0.06) == [] and b.phase is IcePhase.CHECKING   # too late
    a.on_sip(ok, 0.1)
    assert a.phase is IcePhase.CHECKING
    assert a.checklist is not None and b.checklist is not None
    assert a.checklist.remote_ufrag == b.checklist.local_ufrag
    assert b.checklist.remote_ufrag == a.checklist.local_ufrag
    # the 491 first, then a's offer: b waits for it instead of giving up
    a, b = _peer(True, seed=5), _peer(False, seed=6, peer_key=KEY_A)
    (inv_a,) = _sips(list(a.start(0.0)))
    out = []
    b.restart(0.0, out)
    (pending,) = _sips(list(a.on_sip(_sips(out)[0], 0.05)))
    assert b.on_sip(pending, 0.06) == [] and b.phase is IcePhase.IDLE
    assert b.reason == "offers crossed" and b.next_deadline() < float("inf")
    b.on_sip(inv_a, 0.07)
    assert b.phase is IcePhase.CHECKING and b.next_deadline() < 1.0
