"""Two ICE checklists end to end through simulated NATs, on virtual time (tests/icesim.py).

Topology (both homes use the same private subnet, and A and B even the same address)::

      A (controlling)                                    B (controlled)
   a0 192.168.1.10:40000 --[NAT a-home 203.0.113.1]--+
                                                     +-- internet --[NAT b-home 198.51.100.1]--
   a1 10.0.0.5:40001     --[NAT a-lte  192.0.2.1]----+                  b0 192.168.1.10:40000

A's check to B's host candidate 192.168.1.10:40000 lands on A's own socket, and B's on B's:
only the ufrag/pwd check keeps those from "succeeding".
"""

from __future__ import annotations

import random

import pytest

from upmt_tun.ice.checklist import (
    Checklist,
    Failed,
    IceState,
    PairSucceeded,
    Role,
    Selected,
    SendStun,
)
from upmt_tun.ice.sdp import new_credentials

from .icesim import Host, Nat, Net, first

FULL, PORT, SYM = "full", "port-restricted", "symmetric"


def _checklist(net: Net, name: str, role: Role, seed: int) -> Checklist:
    rng = random.Random(seed)
    ufrag, pwd = new_credentials(rng.randbytes)
    cl = Checklist(role, ufrag, pwd, rng.getrandbits(64), rng.randbytes, net.candidates(name))
    net.hosts[name].checklist = cl
    return cl


def _exchange(net: Net, a: str, b: str) -> None:
    """What the SIP offer/answer carries: credentials and candidates, both ways."""
    ca, cb = net.hosts[a].checklist, net.hosts[b].checklist
    assert ca is not None and cb is not None
    ca.set_remote(cb.local_ufrag, cb.local_pwd, net.candidates(b))
    cb.set_remote(ca.local_ufrag, ca.local_pwd, net.candidates(a))


def world(nat_a: str, nat_b: str, *, b_host: tuple[str, int] = ("192.168.1.10", 40000),
          roles: tuple[Role, Role] = (Role.CONTROLLING, Role.CONTROLLED),
          twin: bool = False, nat_a_lte: str | None = None, loss: float = 0.0,
          seed: int = 0) -> Net:
    net = Net({"a-home": Nat(nat_a, "203.0.113.1"),
               "a-lte": Nat(nat_a_lte or nat_a, "192.0.2.1"),
               "b-home": Nat(nat_b, "198.51.100.1")}, loss=loss, seed=seed)
    net.add(Host("A", [(0, "a-home", "wlan0", ("192.168.1.10", 40000)),
                       (1, "a-lte", "wwan0", ("10.0.0.5", 40001))]))
    net.add(Host("B", [(0, "b-home", "eth0", b_host)]))
    if twin:   # a host on A's LAN at B's private address, busy with an ICE session of its own
        net.add(Host("T", [(0, "a-home", "eth0", b_host)]))
        _checklist(net, "T", Role.CONTROLLED, 99)
    _checklist(net, "A", roles[0], 1)
    _checklist(net, "B", roles[1], 2)
    _exchange(net, "A", "B")
    return net


def assert_consistent(net: Net) -> tuple[Selected, Selected]:
    a, b = net.hosts["A"].checklist, net.hosts["B"].checklist
    assert a is not None and b is not None
    sa, sb = a.selected, b.selected
    assert sa is not None and sb is not None
    a_lan = net.hosts["A"].sockets[sa.socket_id][1]
    b_lan = net.hosts["B"].sockets[sb.socket_id][1]
    assert net.resolve(a_lan, sa.remote) == ("B", sb.socket_id)
    assert net.resolve(b_lan, sb.remote) == ("A", sa.socket_id)
    return sa, sb


def assert_no_self_pair(net: Net) -> None:
    for name, host in net.hosts.items():
        for ev in host.of(PairSucceeded):
            assert isinstance(ev, PairSucceeded)
            lan = host.sockets[ev.socket_id][1]
            reached = net.resolve(lan, ev.remote)
            assert reached is not None and reached[0] not in (name, "T"), (name, ev)


CONE_CASES = [(FULL, FULL), (PORT, PORT), (FULL, PORT), (PORT, FULL), (FULL, SYM), (SYM, FULL)]


@pytest.mark.parametrize(("nat_a", "nat_b"), CONE_CASES)
def test_a_pair_is_selected_through_cone_nats_and_both_ends_agree(nat_a: str,
                                                                  nat_b: str) -> None:
    net = world(nat_a, nat_b)
    net.run(until=60.0)
    assert_no_self_pair(net)
    sa, sb = assert_consistent(net)
    hosts = net.hosts
    ta, _ = first(hosts["A"], Selected) or (None, None)
    tb, _ = first(hosts["B"], Selected) or (None, None)
    assert ta is not None and tb is not None
    assert max(ta, tb) < 1.0, (ta, tb)        # virtual seconds from the exchange
    assert not hosts["A"].of(Failed) and not hosts["B"].of(Failed)
    # A's and B's checks to the other's host candidate came back to themselves: rejected.
    assert hosts["A"].checklist.drops["bad-username"] > 0   # type: ignore[union-attr]
    assert hosts["B"].checklist.drops["bad-username"] > 0   # type: ignore[union-attr]


@pytest.mark.parametrize(("nat_a", "nat_b"), [(FULL, FULL), (PORT, PORT), (FULL, SYM)])
def test_both_interfaces_of_a_find_their_own_direct_path(nat_a: str, nat_b: str) -> None:
    net = world(nat_a, nat_b)
    net.run(until=60.0)
    sockets = {ev.socket_id for ev in net.hosts["A"].of(PairSucceeded)
               if isinstance(ev, PairSucceeded)}
    assert sockets == {0, 1}


@pytest.mark.parametrize(("nat_a", "nat_b"), [(SYM, SYM), (PORT, SYM), (SYM, PORT)])
def test_no_direct_path_through_symmetric_nats_fails_cleanly(nat_a: str, nat_b: str) -> None:
    net = world(nat_a, nat_b)
    net.run(until=120.0)
    for name in ("A", "B"):
        host = net.hosts[name]
        cl = host.checklist
        assert cl is not None
        assert cl.selected is None and cl.state is IceState.FAILED
        assert not host.of(Selected) and not host.of(PairSucceeded)
        fails = host.of(Failed)
        assert len(fails) == 1 and fails[0] == Failed("all checks failed")
        assert cl.next_deadline() is None
    t, _ = first(net.hosts["A"], Failed) or (None, None)
    assert t is not None and t < 45.0          # RFC 8489 schedule: 39.5 s per check


def test_when_one_interface_is_behind_a_symmetric_nat_the_other_carries_the_path() -> None:
    net = world(SYM, PORT, nat_a_lte=FULL)
    net.run(until=60.0)
    sa, _ = assert_consistent(net)
    assert sa.socket_id == 1
    assert_no_self_pair(net)


@pytest.mark.parametrize("seed", range(12))
def test_with_30_percent_loss_both_ends_still_agree_on_one_pair(seed: int) -> None:
    net = world(PORT, PORT, loss=0.3, seed=seed)
    net.run(until=120.0)
    assert net.lost > 0
    assert_no_self_pair(net)
    assert_consistent(net)


def test_the_lan_twin_never_answers_and_is_never_paired() -> None:
    """T sits on A's LAN at B's private address: A's host check reaches T, not B."""
    net = world(PORT, PORT, b_host=("192.168.1.20", 40000), twin=True)
    net.run(until=60.0)
    assert_consistent(net)
    assert_no_self_pair(net)
    twin = net.hosts["T"].checklist
    assert twin is not None and twin.drops["bad-username"] > 0
    assert not net.hosts["T"].of(SendStun)      # it answered nothing


@pytest.mark.parametrize("roles", [(Role.CONTROLLING, Role.CONTROLLING),
                                   (Role.CONTROLLED, Role.CONTROLLED)])
def test_a_role_conflict_resolves_and_one_pair_is_selected(roles: tuple[Role, Role]) -> None:
    net = world(PORT, PORT, roles=roles)
    net.run(until=60.0)
    assert_consistent(net)
    a, b = net.hosts["A"].checklist, net.hosts["B"].checklist
    assert a is not None and b is not None
    assert {a.role, b.role} == {Role.CONTROLLING, Role.CONTROLLED}


def test_ice_restart_selects_again_with_new_credentials() -> None:
    net = world(PORT, PORT)
    net.run(until=10.0)
    assert_consistent(net)
    a, b = net.hosts["A"].checklist, net.hosts["B"].checklist
    assert a is not None and b is not None
    old = a.local_ufrag
    rng = random.Random(7)
    a.restart(*new_credentials(rng.randbytes))
    b.restart(*new_credentials(rng.randbytes))
    assert a.selected is None and a.state is IceState.NEW and a.local_ufrag != old
    _exchange(net, "A", "B")
    for h in net.hosts.values():
        h.events.clear()
    net.run(until=20.0)
    assert_consistent(net)
    assert net.hosts["A"].of(Selected) and net.hosts["B"].of(Selected)


def test_the_simulation_settles_without_deadlines_once_done() -> None:
    net = world(FULL, FULL)
    net.run(until=60.0)
    for name in ("A", "B"):
        cl = net.hosts[name].checklist
        assert cl is not None and cl.next_deadline() is None
