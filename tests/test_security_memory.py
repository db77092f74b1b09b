"""Security rules of the anchor's data path, over the in-memory rig (no root).

DESIGN.md "Security (issue 3)", Handover: "a flow's downlink moves to the tunnel of a packet
only if that packet opened under the host's key, passed the replay window and is newer
(session generation, counter) than every earlier packet of that flow". Reordering is not
handover: a delayed packet (never seen, so not a replay) still reaches the TUN but does not
pull the flow back to the tunnel it came on.

    laptop  wan1 203.0.113.11:40001 (tunnel A) \\
                                                >-- anchor 203.0.113.1:5060
            wan2 203.0.113.12:40002 (tunnel B) /
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from upmt_tun.dataplane.packet import TYPE_DATA
from upmt_tun.flowtable import AnchorFlow

from . import pktbuild as pb
from .test_anchor_fuzz import ATTACKERS, CH, MH, MH2, PHONE, Host, Rig, seal_at, tunnel_of

MH3 = ("203.0.113.13", 40003)          # a third interface, being set up


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


def _two_tunnels(rig: Rig) -> tuple[Host, str, int, int]:
    mh = Host(rig, "laptop", MH)
    vipa, (a, b) = mh.establish((MH, MH2))
    assert tunnel_of(rig, a).remote == MH and tunnel_of(rig, b).remote == MH2
    assert tunnel_of(rig, a).state == tunnel_of(rig, b).state == "up"
    return mh, vipa, a, b


def _flow(rig: Rig) -> AnchorFlow:
    (f,) = rig.fwd.paft.flows()
    return f


def _downlink_to(rig: Rig, vipa: str, sport: int = 5000) -> list[tuple[str, int]]:
    return [addr for _, addr in rig.downlink(pb.udp(CH, vipa, 53, sport, b"answer"))]


def test_reordering_is_not_handover(rig: Rig) -> None:
    mh, vipa, ta, tb = _two_tunnels(rig)
    assert mh.s.send_counter <= 9, "counters 9..11 must still be unused"
    up = [pb.udp(vipa, CH, 5000, 53, b"p%d" % i) for i in range(3)]
    p10 = mh.data(up[0], counter=10)
    p11 = mh.data(up[1], counter=11)
    p9 = mh.data(up[2], counter=9)
    rig.feed(p10, MH)                         # counter 10 on A: a new flow, on A
    f = _flow(rig)
    assert f.tunnel == ta and _downlink_to(rig, vipa) == [MH]
    rig.feed(p11, MH2)                        # counter 11 on B: newer, the flow moves to B
    assert f.tunnel == tb and f.history[-1][3] == "implicit handover"
    assert _downlink_to(rig, vipa) == [MH2]
    moves = len(f.history)
    rig.feed(p9, MH)                          # counter 9, late, on A: delivered, no move back
    assert rig.tun.written == up
    assert f.tunnel == tb and len(f.history) == moves
    assert _downlink_to(rig, vipa) == [MH2]
    # a replay of counter 10, now from B's address: dropped (not delivered twice), no move
    m = rig.mark()
    rig.feed(p10, MH2)
    rig.feed(p10, MH)
    assert rig.tun.written == up and rig.since(m) == []
    assert f.tunnel == tb and len(f.history) == moves
    # the host moves it back simply by sending a newer packet on A
    rig.feed(mh.data(up[0], counter=12), MH)
    assert f.tunnel == ta and _downlink_to(rig, vipa) == [MH]


def test_a_newer_session_generation_is_newer(rig: Rig) -> None:
    """After a rekey, counter 0 of the new session is newer than any counter of the old one;
    a late packet of the old session (still accepted for a while) does not move the flow."""
    mh, vipa, ta, tb = _two_tunnels(rig)
    up = pb.udp(vipa, CH, 5000, 53, b"x")
    old = mh.s
    rig.feed(mh.data(up, counter=100), MH2)           # on B, (gen 1, 100)
    f = _flow(rig)
    assert f.tunnel == tb
    late_old = seal_at(old, TYPE_DATA, up, 101)       # sent before the rekey, arrives after it
    rig.now += 1.0
    new = mh.handshake()                              # rekey (same host, same anchor)
    assert new is not old and new.send_counter == 0
    rig.feed(mh.data(up), MH)                         # (gen 2, 0) on A: newer, moves
    assert f.tunnel == ta and f.history[-1][3] == "implicit handover"
    moves = len(f.history)
    rig.feed(late_old, MH2)                           # (gen 1, 101) on B: opens, no move
    assert len(rig.tun.written) == 3
    assert f.tunnel == ta and len(f.history) == moves
    # the downlink goes to A, sealed with the new session (the host used it: key confirmed)
    down = rig.downlink(pb.udp(CH, vipa, 53, 5000, b"a"))
    assert [a for _, a in down] == [MH]
    assert new.open(down[0][0]) is not None


def test_no_handover_to_an_unvalidated_or_foreign_address(rig: Rig) -> None:
    mh, vipa, ta, tb = _two_tunnels(rig)
    up = pb.udp(vipa, CH, 5000, 53, b"x")
    rig.feed(mh.data(up), MH)
    f = _flow(rig)
    tc, challenge = mh.setup(9, MH3)                  # a third path, not validated yet
    assert challenge and tunnel_of(rig, tc).state == "validating"
    m = rig.mark()
    for src in (MH3, *ATTACKERS, PHONE):
        rig.feed(mh.data(up), src)                    # fresh counters, valid tags
    assert len(rig.tun.written) == 1 and rig.since(m) == []
    assert f.tunnel == ta and len(f.history) == 1
    mh.validate(tc, challenge, MH3)                   # validated: now it may carry the flow
    rig.feed(mh.data(up), MH3)
    assert f.tunnel == tc and _downlink_to(rig, vipa) == [MH3]


def test_random_reordering_and_replays_property(rig: Rig) -> None:
    """Any interleaving of several flows over two tunnels, with late packets and replays:
    each flow always sits on the tunnel of its newest packet, and no packet is delivered
    twice."""
    mh, vipa, ta, tb = _two_tunnels(rig)
    rng = random.Random(0xF10)
    addr = {ta: MH, tb: MH2}
    flows = [pb.udp(vipa, CH, 6000 + i, 53, b"f%d" % i) for i in range(6)]
    sent: list[tuple[int, int, bytes]] = []            # (flow, tunnel, packet)
    for _ in range(600):
        i = rng.randrange(len(flows))
        sent.append((i, rng.choice((ta, tb)), mh.data(flows[i])))
    order = list(range(len(sent)))
    for k in range(len(order)):                        # local reordering (late packets)
        j = min(len(order) - 1, k + rng.randrange(0, 8))
        order[k], order[j] = order[j], order[k]
    newest: dict[int, tuple[int, int]] = {}            # flow -> (counter, tunnel)
    delivered = 0
    seen: set[int] = set()
    for k in order:
        i, tid, pkt = sent[k]
        counter = struct.unpack_from("!Q", pkt, 8)[0]
        replay = rng.random() < 0.2 and seen
        if replay:                                     # replay an earlier one somewhere
            k2 = rng.choice(sorted(seen))
            rig.feed(sent[k2][2], addr[rng.choice((ta, tb))])
            assert len(rig.tun.written) == delivered, "a replay was delivered"
        rig.feed(pkt, addr[tid])
        seen.add(k)
        delivered += 1
        assert len(rig.tun.written) == delivered
        if i not in newest or counter > newest[i][0]:
            newest[i] = (counter, tid)
        by_key = {f.key[3]: f for f in rig.fwd.paft.flows()}
        for j, (_, want) in newest.items():
            assert by_key[6000 + j].tunnel == want
    assert delivered == len(sent)


def test_one_host_cannot_take_the_flow_table(tmp_path: Path) -> None:
    rig = Rig(tmp_path, peers=("laptop", "phone"))
    mh = Host(rig, "laptop", MH)
    vipa, _ = mh.establish()
    phone = Host(rig, "phone", PHONE, seed=2)
    pvipa, _ = phone.establish((PHONE,))
    paft = rig.fwd.paft
    share = paft.per_source_cap
    assert share < paft.cap, "one host may fill the whole PAFT"
    base = bytearray(pb.udp(vipa, CH, 1, 53, b"x"))
    extra = 50
    for i in range(share + extra):
        struct.pack_into("!HH", base, 20, 1024 + i % 60000, 53 + i // 60000)
        rig.feed(mh.data(bytes(base)), MH)
    assert len(paft) == share and len(rig.tun.written) == share
    assert rig.fwd.drops["flow_cap"] == extra
    n = len(rig.tun.written)
    rig.feed(phone.data(pb.udp(pvipa, CH, 5, 53, b"y")), PHONE)
    assert len(rig.tun.written) == n + 1 and len(paft) == share + 1


def test_a_signalled_handover_moves_only_the_hosts_own_flows(tmp_path: Path) -> None:
    """HandoverReq names flows by 5-tuple: another host's flow is refused (403), and so is a
    field too large for its place in the anchor's packed key (501): protocol 256 + 17
    would carry into the source address and name the next VIpA, the phone's flow."""
    rig = Rig(tmp_path, peers=("laptop", "phone"))
    mh = Host(rig, "laptop", MH)
    vipa, (ta, tb) = mh.establish((MH, MH2))
    phone = Host(rig, "phone", PHONE, seed=2)
    pvipa, (tp,) = phone.establish((PHONE,))
    assert int.from_bytes(bytes(map(int, pvipa.split("."))), "big") \
        == int.from_bytes(bytes(map(int, vipa.split("."))), "big") + 1
    rig.feed(mh.data(pb.udp(vipa, CH, 5000, 53, b"x")), MH)
    rig.feed(phone.data(pb.udp(pvipa, CH, 5000, 53, b"y")), PHONE)

    def handover(flow: list[object]) -> tuple[int, str, dict[str, dict[str, object]]]:
        return mh.ask([("HandoverReq", {"sipId": "laptop", "tunnelId": tb,
                                        "flows": [flow]})], MH2)

    assert handover([17, pvipa, CH, 5000, 53])[0] == 403
    assert handover([17 + 256, vipa, CH, 5000, 53])[0] == 501
    assert handover([17, vipa, CH, 5000 + 65536, 53])[0] == 501
    assert _downlink_to(rig, pvipa) == [PHONE]          # the phone's flow did not move
    code, _, sigs = handover([17, vipa, CH, 5000, 53])
    assert code == 200 and sigs["HandoverResp"] == {"moved": 1}
    assert _downlink_to(rig, vipa) == [MH2]
    by_host = {f.anchor: f for f in rig.fwd.paft.flows()}
    assert by_host["laptop"].history[-1][3] == "signalled handover"
    assert by_host["phone"].tunnel == tp and len(by_host["phone"].history) == 1
