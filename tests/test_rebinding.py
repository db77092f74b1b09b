"""NAT rebinding at the anchor: a validated tunnel's packets arrive from a new outer address.

QUIC's rule (RFC 9000, 9.3 and 8.1) applied per tunnel: the packet must open under the
host's key, pass the replay window, name the tunnel in its authenticated path id and be
newer than everything that tunnel received. Then it is accepted, the new address gets a
sealed PATH_CHALLENGE, and until the PATH_RESPONSE comes back *from that address* the
anchor sends it at most REBIND_CREDIT times the bytes it received from it.
"""

from __future__ import annotations

import struct
from pathlib import Path

from upmt_tun.dataplane.forwarder import REBIND_CREDIT
from upmt_tun.dataplane.packet import (
    TYPE_DATA,
    TYPE_PATH_CHALLENGE,
    TYPE_PATH_RESPONSE,
    TYPE_PING,
    TYPE_PONG,
)

from . import pktbuild as pb
from .test_anchor_fuzz import ATTACKERS, CH, MH, MH2, Host, Rig, tunnel_of

NEW = ("203.0.113.11", 47777)           # the same NAT, a new mapping


def _answer(mh: Host, challenge: bytes, tid: int) -> bytes:
    """What the agent sends back for a PATH_CHALLENGE (agent.fwd.path_challenge)."""
    assert challenge[0] == TYPE_PATH_CHALLENGE
    opened = mh.s.open(challenge)
    assert opened is not None, "the challenge must be sealed for the host"
    return mh.s.seal(TYPE_PATH_RESPONSE, opened[1], tid)


def _setup(tmp: Path) -> tuple[Rig, Host, str, int]:
    rig = Rig(tmp)
    mh = Host(rig, "laptop", MH)
    vipa, (tid,) = mh.establish()
    rig.feed(mh.data(pb.udp(vipa, CH, 5000, 53, b"first"), path=tid), MH)
    return rig, mh, vipa, tid


def test_rebinding_is_followed_after_one_challenge_within_credit(tmp_path: Path) -> None:
    rig, mh, vipa, tid = _setup(tmp_path)
    t = tunnel_of(rig, tid)
    up = pb.udp(vipa, CH, 5000, 53, b"after the NAT rebound")
    pkt = mh.data(up, path=tid)
    m = rig.mark()
    rig.feed(pkt, NEW)
    assert rig.tun.written[-1] == up                      # authenticated: accepted at once
    sent = rig.since(m)
    assert [a for _, a in sent] == [NEW] and sent[0][0][0] == TYPE_PATH_CHALLENGE
    assert (t.remote, t.probe_addr) == (MH, NEW)
    # until it answers, the new address gets at most REBIND_CREDIT x what it sent
    received = len(pkt)
    to_new = len(sent[0][0])
    for _ in range(20):
        for dg, addr in rig.downlink(pb.udp(CH, vipa, 53, 5000, bytes(1000))):
            assert dg[0] == TYPE_DATA
            if addr == NEW:
                to_new += len(dg)
            else:
                assert addr == MH                          # beyond the credit: the old one
    assert 0 < to_new <= REBIND_CREDIT * received
    # the answer from the new address moves the tunnel there, for good
    rig.feed(_answer(mh, sent[0][0], tid), NEW)
    assert (t.remote, t.probe_addr, t.state) == (NEW, None, "up")
    assert rig.fwd.events["path_rebound"] == 1
    assert all(a == NEW for _, a in rig.downlink(pb.udp(CH, vipa, 53, 5000, bytes(1000))))
    # the old address is just another candidate now: it must answer a challenge again
    m = rig.mark()
    rig.feed(mh.data(up, path=tid), MH)
    assert [(dg[0], a) for dg, a in rig.since(m)] == [(TYPE_PATH_CHALLENGE, MH)]
    assert (t.remote, t.probe_addr) == (NEW, MH)


def test_an_answer_from_elsewhere_or_with_a_wrong_token_moves_nothing(tmp_path: Path) -> None:
    rig, mh, vipa, tid = _setup(tmp_path)
    t = tunnel_of(rig, tid)
    m = rig.mark()
    rig.feed(mh.data(pb.udp(vipa, CH, 5000, 53, b"x"), path=tid), NEW)
    ((challenge, _),) = rig.since(m)
    good = _answer(mh, challenge, tid)
    rig.feed(good, ATTACKERS[0])                           # relayed by someone else
    rig.feed(mh.s.seal(TYPE_PATH_RESPONSE, bytes(16), tid), NEW)
    rig.feed(good[:-1] + bytes([good[-1] ^ 1]), NEW)       # tampered
    assert (t.remote, t.probe_addr) == (MH, NEW)
    assert rig.fwd.drops["bad_path_response"] == 2 and rig.fwd.drops["bad_packet"] >= 1
    assert rig.fwd.events["path_rebound"] == 0


def test_only_newer_packets_of_a_validated_tunnel_start_a_rebinding(tmp_path: Path) -> None:
    rig, mh, vipa, tid = _setup(tmp_path)
    t = tunnel_of(rig, tid)
    up = pb.udp(vipa, CH, 5000, 53, b"x")
    old = mh.data(up, path=tid)                            # sealed earlier, held back
    rig.feed(mh.data(up, path=tid), MH)
    m = rig.mark()
    written = len(rig.tun.written)
    rig.feed(old, NEW)                                     # older than the tunnel's newest
    rig.feed(mh.data(up, path=0), NEW)                     # names no tunnel
    rig.feed(mh.data(up, path=tid + 1), NEW)               # names a tunnel that is not there
    captured = mh.data(up, path=tid)
    rig.feed(captured, MH)
    rig.feed(captured, ATTACKERS[1])                       # a replay from an attacker
    assert rig.since(m) == [] and len(rig.tun.written) == written + 1
    assert t.probe_addr is None and t.remote == MH
    assert rig.fwd.drops["unvalidated_path"] == 3 and rig.fwd.drops["bad_packet"] == 1


def test_an_unvalidated_tunnel_cannot_be_rebound(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    mh = Host(rig, "laptop", MH)
    mh.handshake()
    vipa = mh.associate()
    tid, _challenge = mh.setup(7, MH)                      # not validated yet
    m = rig.mark()
    rig.feed(mh.data(pb.udp(vipa, CH, 5000, 53, b"x"), path=tid), NEW)
    assert rig.since(m) == [] and rig.tun.written == []
    assert tunnel_of(rig, tid).probe_addr is None


def test_newer_traffic_from_the_validated_address_abandons_the_candidate(
        tmp_path: Path) -> None:
    """A racing attacker who relays one fresh packet first costs the host nothing: the
    host's next packet from its real address ends the candidate and its credit."""
    rig, mh, vipa, tid = _setup(tmp_path)
    t = tunnel_of(rig, tid)
    up = pb.udp(vipa, CH, 5000, 53, b"x")
    rig.feed(mh.data(up, path=tid), ATTACKERS[2])
    assert t.probe_addr == ATTACKERS[2]
    rig.feed(mh.data(up, path=tid), MH)
    assert t.probe_addr is None and t.probe_credit == 0
    assert rig.fwd.events["rebind_abandoned"] == 1
    assert all(a == MH for _, a in rig.downlink(pb.udp(CH, vipa, 53, 5000, b"a")))


def test_a_validated_address_identifies_its_tunnel_whatever_the_path_id(
        tmp_path: Path) -> None:
    """The path id is read only for addresses that are no validated tunnel's."""
    rig = Rig(tmp_path)
    mh = Host(rig, "laptop", MH)
    vipa, (t1, t2) = mh.establish((MH, MH2))
    m = rig.mark()
    rig.feed(mh.data(pb.udp(vipa, CH, 5000, 53, b"x"), path=t1), MH2)
    assert rig.since(m) == [] and len(rig.tun.written) == 1
    assert tunnel_of(rig, t2).rx_packets == 1 and tunnel_of(rig, t1).probe_addr is None


def test_plaintext_benchmark_mode_never_rebinds_on_unsealed_data(tmp_path: Path) -> None:
    rig = Rig(tmp_path, plaintext=True)
    mh = Host(rig, "laptop", MH)
    vipa, (tid,) = mh.establish()
    m = rig.mark()
    rig.feed(mh.data(pb.udp(vipa, CH, 5000, 53, b"x"), path=tid), NEW)
    assert rig.since(m) == [] and rig.tun.written == []
    assert tunnel_of(rig, tid).probe_addr is None


def test_probes_are_answered_on_validated_paths_only(tmp_path: Path) -> None:
    """PING (0x87) gets a sealed PONG (0x88) with its payload, from a validated tunnel; a
    replayed one from elsewhere gets nothing; one from a new address of a validated tunnel
    (NAT rebinding while idle) starts the challenge and gets its PONG within the credit."""
    rig, mh, vipa, tid = _setup(tmp_path)
    ping = mh.s.seal(TYPE_PING, struct.pack("!d", 12.5), tid)
    m = rig.mark()
    rig.feed(ping, MH)
    ((pong, to),) = rig.since(m)
    opened = mh.s.open(pong)
    assert to == MH and pong[0] == TYPE_PONG and opened is not None
    assert opened[1] == struct.pack("!d", 12.5)
    m = rig.mark()
    rig.feed(ping, ATTACKERS[0])                           # replayed: nothing
    rig.feed(mh.s.seal(TYPE_PING, b"short", tid), MH)      # malformed payload: nothing
    assert rig.since(m) == []
    rig.feed(mh.s.seal(TYPE_PING, struct.pack("!d", 1.0), tid), NEW)
    sent = rig.since(m)
    assert [(dg[0], a) for dg, a in sent] == [(TYPE_PATH_CHALLENGE, NEW), (TYPE_PONG, NEW)]
    assert sum(len(dg) for dg, _ in sent) <= REBIND_CREDIT * len(ping)
