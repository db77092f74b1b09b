"""Anchor choice by RTT (UPMT-DAM multiAN): pure, table-driven, injected clock."""

from __future__ import annotations

import pytest

from upmt_tun.dataplane.forwarder import AgentForwarder, FlowClass
from upmt_tun.policy import HOME_HOLD, HomeAnchor
from upmt_tun.tables import Tunnel

MS = 0.001
ORDER = ("an1", "an2", "an3")

# (steps of (now, {anchor: rtt in ms or None}), the home after each step)
CASES = {
    "nothing measured: config order, no home": (
        [(0.0, {})], [None]),
    "first measurement: the best reachable": (
        [(0.0, {"an1": 80, "an2": 20, "an3": None})], ["an2"]),
    "equal RTTs: config order breaks the tie": (
        [(0.0, {"an1": 20, "an2": 20})], ["an1"]),
    "a third better but only 6 ms: stays": (
        [(0.0, {"an1": 18, "an2": 30}), (0.0, {"an1": 18, "an2": 12}),
         (5.0, {"an1": 18, "an2": 12})], ["an1", "an1", "an1"]),
    "15 ms better but not a third better: stays": (
        [(0.0, {"an1": 100, "an2": 200}), (0.0, {"an1": 100, "an2": 85}),
         (5.0, {"an1": 100, "an2": 85})], ["an1", "an1", "an1"]),
    "clearly better, but only briefly: stays": (
        [(0.0, {"an1": 50, "an2": 90}), (1.0, {"an1": 50, "an2": 20}),
         (2.0, {"an1": 50, "an2": 45}), (3.5, {"an1": 50, "an2": 20}),
         (4.0, {"an1": 50, "an2": 20})], ["an1"] * 5),
    "clearly better for HOME_HOLD: moves": (
        [(0.0, {"an1": 50, "an2": 90}), (1.0, {"an1": 50, "an2": 20}),
         (1.0 + HOME_HOLD - 0.1, {"an1": 50, "an2": 20}),
         (1.0 + HOME_HOLD, {"an1": 50, "an2": 20})], ["an1", "an1", "an1", "an2"]),
    "home unreachable: leaves at once": (
        [(0.0, {"an1": 10, "an2": 90}), (0.5, {"an1": None, "an2": 90})], ["an1", "an2"]),
    "home back and better: hysteresis applies again": (
        [(0.0, {"an1": None, "an2": 40}), (1.0, {"an1": 30, "an2": 40}),
         (9.0, {"an1": 30, "an2": 40})], ["an2", "an2", "an2"]),
    "challenger changes: its own hold starts": (
        [(0.0, {"an1": 90, "an2": 100, "an3": 100}), (1.0, {"an1": 90, "an2": 30, "an3": 60}),
         (2.0, {"an1": 90, "an2": 60, "an3": 30}), (3.9, {"an1": 90, "an2": 60, "an3": 30}),
         (4.0, {"an1": 90, "an2": 60, "an3": 30})], ["an1", "an1", "an1", "an1", "an3"]),
}


@pytest.mark.parametrize("steps,homes", CASES.values(), ids=CASES.keys())
def test_home_anchor(steps: list[tuple[float, dict[str, float | None]]],
                     homes: list[str | None]) -> None:
    h = HomeAnchor(ORDER)
    got = []
    for now, rtts in steps:
        order = h.update(now, {a: None if r is None else r * MS for a, r in rtts.items()})
        assert sorted(order) == sorted(ORDER) and order[0] == (h.home or order[0])
        got.append(h.home)
    assert got == homes


def test_ranked_order_after_the_home() -> None:
    h = HomeAnchor(ORDER)
    assert h.update(0.0, {"an1": None, "an2": 0.050, "an3": 0.020}) == ["an3", "an2", "an1"]
    assert h.update(0.0, {}) == ["an3", "an1", "an2"]     # unmeasured: config order after home


def _fwd() -> tuple[AgentForwarder, dict[str, Tunnel]]:
    fwd = AgentForwarder("100.64.0.1", ["wan1", "wan2"], ["an1", "fh", "an2"],
                         lambda key: FlowClass("web", (), None))
    tunnels = {}
    for i, iface in enumerate(("wan1", "wan2")):
        for a in ("an1", "fh", "an2"):
            tunnels[f"{iface}/{a}"] = fwd.add_tunnel(iface, i, a, ("10.0.0.2", 4000 + i),
                                                     ("203.0.113.1", 5060), 0.0)
    fwd.set_association("an1", "100.100.0.2", "anchor", frozenset())
    fwd.set_association("an2", "100.100.0.9", "anchor", frozenset())
    fwd.set_association("fh", "100.100.0.3", "fixed-host", frozenset({b"\xcb\x00\x71\x05"}))
    for t in tunnels.values():
        fwd.tunnel_up(t, 7, 0.0)
    return fwd, tunnels


def test_forwarder_new_flows_go_to_the_fastest_anchor_existing_flows_stay() -> None:
    fwd, tunnels = _fwd()
    rtt = {"wan1/an1": 0.080, "wan2/an1": 0.060, "wan1/an2": 0.030, "wan2/an2": None,
           "wan1/fh": 0.001, "wan2/fh": 0.001}
    by_tid = {t.tid: name for name, t in tunnels.items()}
    rtt_of = lambda t: rtt[by_tid[t.tid]]    # noqa: E731
    key = (6, fwd.vipa_fix_b, bytes([198, 51, 100, 7]), 40000, 443)
    first = fwd._new_flow(key, 0.0)          # noqa: SLF001 - before any RTT: config order
    assert first is not None and first.anchor == "an1"
    assert fwd.rank_anchors(1.0, rtt_of) == ["an2", "fh", "an1"]   # fixed host keeps its slot
    second = fwd._new_flow((6, fwd.vipa_fix_b, bytes([198, 51, 100, 7]), 40001, 443), 1.0)  # noqa: SLF001
    assert second is not None and second.anchor == "an2"
    assert fwd.paft.get(key) is first and first.anchor == "an1"   # its public address stays
    # the fixed host is still reached directly for flows to itself
    third = fwd._new_flow((6, fwd.vipa_fix_b, bytes([203, 0, 113, 5]), 40002, 80), 1.0)  # noqa: SLF001
    assert third is not None and third.anchor == "fh"
