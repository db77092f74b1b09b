"""A graceful anchor restart keeps the masqueraded TCP connections (issue 13).

A stop for good (SIGTERM, SIGINT, SIGHUP: `systemctl stop`) restores the host exactly,
so while no anchor runs the kernel has no NAT chain, answers the replies of the
masqueraded connections itself and resets them. A stop *for a restart* (SIGUSR2, which
the unit makes `systemctl restart` send) leaves an empty NAT chain and a drop of the
replies to the pool instead: the server retransmits into silence and the connection
goes on once the anchor is back. ``cleanup`` removes that stub (``--keep-paused``, the
unit's ExecStopPost, leaves it for the next start, which replaces it in one nft
transaction).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from upmt_tun.lab import Lab, exe
from upmt_tun.testbed import Topology, host_state, tool_missing

from .conftest import netns_missing
from .test_netns_leases import LINES, restart_scenario

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(netns_missing() is not None, reason=str(netns_missing()))]


@pytest.fixture
def topo() -> Iterator[Topology]:
    t = Topology()
    t.up()
    try:
        yield t
    finally:
        t.down()


def test_a_tcp_stream_survives_an_anchor_stopped_for_a_restart(topo: Topology,
                                                               tmp_path: Path) -> None:
    """SIGUSR2, 1 s down, start again: the paced TCP stream through the anchor completes,
    with one and the same conntrack entry (VIpA and masqueraded port) all along."""
    if tool_missing("conntrack"):
        pytest.skip("needs conntrack")
    out = restart_scenario(topo, tmp_path, sig=signal.SIGUSR2)
    assert out["vipa_before"] == out["vipa_after"] == "100.100.0.3", out["anchor_log"]
    assert out["client_rc"] == 0, (out["client"], out["anchor_log"])
    c = out["client"]
    assert c["bytes"] == LINES * 100, c
    same = ("id", "vipa", "sport", "masq_port")
    before, down, after = out["ct_before"], out["ct_while_down"], out["ct_after"]
    assert [before[k] for k in same] == [down[k] for k in same] == [after[k] for k in same]
    t = out["t"]
    print(f"\n[anchor restart, SIGUSR2] stream gap {c['gap']:.2f} s; stop->start "
          f"{t['start'] - t['kill']:.2f} s, start->ready {t['ready'] - t['start']:.2f} s, "
          f"ready->resume {c['gap_end'] - t['ready']:.2f} s")
    assert t["kill"] < c["gap_end"], "the longest gap must be the anchor's restart"


def test_a_restart_stop_keeps_only_the_nat_and_cleanup_removes_it(topo: Topology,
                                                                  tmp_path: Path) -> None:
    before = host_state(topo, "an")
    lab = Lab(topo, tmp_path / "lab").start()
    cfg = str(lab.dir / "anchor0.toml")
    try:
        anchor = lab.procs["anchor0"]
        anchor.send_signal(signal.SIGUSR2)
        assert anchor.wait(15) == 0
        assert "SIGUSR2: stopping for a restart" in lab.log_tail("anchor0", 20)
        left = host_state(topo, "an")
        nft = left["nft"]
        assert "table ip upmt_anchor" in nft and "chain paused" in nft, nft
        assert "masquerade" not in nft and "upmtan0" not in left["links"]
        assert "ip daddr 100.100.0.0/16 ct state established,related counter packets" in nft
        # the rest is restored: the TUN, its address and route, ip_forward
        assert {k: v for k, v in left.items() if k != "nft"} == \
            {k: v for k, v in before.items() if k != "nft"}
        # ExecStopPost on a restart: the stub stays for the next start
        r = topo.run("an", *exe("upmt-anchor"), "cleanup", "--keep-paused", "--config", cfg)
        assert "chain paused" in host_state(topo, "an")["nft"], r.stderr
        # the next start takes it over (one transaction), a stop for good removes all
        lab._start("anchor0", "an", [*exe("upmt-anchor"), "--config", cfg])  # noqa: SLF001
        assert "chain paused" not in host_state(topo, "an")["nft"]
        lab.procs["anchor0"].send_signal(signal.SIGUSR2)
        assert lab.procs["anchor0"].wait(15) == 0
        time.sleep(0.1)
        # `cleanup` (an operator; ExecStopPost after `systemctl stop` finds no stub)
        r = topo.run("an", *exe("upmt-anchor"), "cleanup", "--config", cfg)
        assert host_state(topo, "an") == before, r.stderr
    finally:
        lab.stop()
    assert host_state(topo, "an") == before
