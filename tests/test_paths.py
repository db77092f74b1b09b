"""Path probing and hysteresis decisions (paths.py): table-driven, with an injected clock.

A tiny simulator ticks a PathMonitor every TICK seconds over a scripted path: whether it
delivers, its RTT, and whether data flows (up, down or both)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from upmt_tun.paths import TICK, PathMonitor, ProbeParams, should_return

P = ProbeParams(idle_max=10.0)


@dataclass
class Run:
    probes: list[float]          # when probes went out
    dead_at: float | None        # when the monitor said the path is dead


def simulate(until: float, *, alive: Callable[[float], bool] = lambda t: True,
             rtt: float = 0.002, data: Callable[[float], str] = lambda t: "",
             params: ProbeParams = P) -> Run:
    """``data(t)``: "up", "down", "both" or "" (which data packets pass at time t; down
    packets only arrive while the path is alive)."""
    m = PathMonitor(params, started=0.0)
    tx = rx = 0
    pending: list[tuple[float, float]] = []     # (arrival time of the pong, its send time)
    probes: list[float] = []
    steps = round(until / TICK)
    for i in range(1, steps + 1):
        now = i * TICK
        for arr, sent in [x for x in pending if x[0] <= now]:
            pending.remove((arr, sent))
            m.on_pong(now, now - sent)
        d = data(now)
        if d in ("up", "both"):
            tx += 5
        if d in ("down", "both") and alive(now):
            rx += 5
        probe, dead = m.tick(now, tx, rx)
        if dead:
            return Run(probes, now)
        if probe:
            probes.append(now)
            if alive(now) and alive(now + rtt):
                pending.append((now + rtt, now))
    return Run(probes, None)


def gaps(ts: list[float]) -> list[float]:
    return [round(b - a, 2) for a, b in zip(ts, ts[1:], strict=False)]


@pytest.mark.parametrize("data", ["up", "down", "both"])
def test_busy_healthy_path_is_probed_every_100_ms_and_never_dies(data: str) -> None:
    r = simulate(30.0, data=lambda t: data)
    assert r.dead_at is None
    assert set(gaps(r.probes)) == {0.1}


@pytest.mark.parametrize("data, death", [("up", 5.0), ("down", 5.0), ("both", 5.0),
                                         ("up", 12.34), ("both", 0.8)])
def test_silent_death_under_traffic_is_noticed_within_one_second(data: str,
                                                                 death: float) -> None:
    r = simulate(30.0, alive=lambda t: t < death, data=lambda t: data)
    assert r.dead_at is not None
    # dead_min after the last answer, which came up to one probe period before the death
    assert 0.35 <= r.dead_at - death <= 0.7          # the target is 1 s


def test_idle_path_backs_off_to_the_nat_keepalive_and_stays_alive() -> None:
    r = simulate(60.0, data=lambda t: "both" if t < 2.0 else "")
    assert r.dead_at is None
    idle = gaps([t for t in r.probes if t >= 2.8])  # idle from 2.95 (1 s without data)
    assert idle[:6] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]   # doubling up to idle_max
    assert max(idle) == 10.0 and len(r.probes) < 40   # vs 600 at the active rate


def test_traffic_after_idle_tightens_probing_at_once() -> None:
    r = simulate(40.0, data=lambda t: "up" if t >= 30.0 else "")
    after = [t for t in r.probes if t >= 30.0]
    assert after[0] - 30.0 <= 0.1 + 1e-9 and set(gaps(after)) == {0.1}


def test_idle_path_death_is_noticed_after_a_few_quick_retries() -> None:
    r = simulate(120.0, alive=lambda t: t < 40.0)
    assert r.dead_at is not None
    # the next regular idle probe (<= 10 s), then retries 1 s apart: 3 lost in all
    assert r.dead_at - 40.0 <= 10.0 + 2 * 1.0 + TICK


def test_a_slow_path_gets_more_time_than_a_fast_one() -> None:
    fast = simulate(20.0, alive=lambda t: t < 10.0, data=lambda t: "up", rtt=0.002)
    slow = simulate(20.0, alive=lambda t: t < 10.0, data=lambda t: "up", rtt=0.4)
    assert fast.dead_at is not None and slow.dead_at is not None
    assert slow.dead_at - 10.0 > fast.dead_at - 10.0 + 0.2


def test_short_loss_bursts_do_not_kill_a_busy_path() -> None:
    # 300 ms outages every 5 s (a Wi-Fi roam): under dead_min, the path survives
    r = simulate(30.0, alive=lambda t: not 0 < t % 5.0 < 0.3, data=lambda t: "up")
    assert r.dead_at is None


def test_rtt_and_loss_estimates() -> None:
    m = PathMonitor(P, started=0.0)
    assert m.loss() is None and m.dead_after() == P.dead_min
    assert m.tick(0.05, 0, 0) == (True, False)       # a first probe at once
    assert m.tick(0.10, 1, 0) == (False, False)
    assert m.tick(0.15, 2, 0) == (True, False)       # data flows: every 100 ms
    m.on_pong(0.2, 0.05)
    assert m.srtt == pytest.approx(0.05) and m.loss() == 0.5      # 2 sent, 1 answered
    m.on_pong(0.3, 2.0)                              # one slow answer
    assert P.dead_min < m.dead_after() <= P.dead_max


@pytest.mark.parametrize("via, current, candidate, up_for, expected", [
    (("wan1", "wan2"), "wan2", "wan1", 5.0, True),      # preferred, settled: back
    (("wan1", "wan2"), "wan2", "wan1", 4.9, False),     # not settled yet: stay
    (("wan1", "wan2"), "wan1", "wan2", 99.0, False),    # never to a worse one
    (("wan1", "wan2"), "wan1", "wan1", 99.0, False),    # already there
    (("wan1", "wan2", "lte"), "lte", "wan2", 6.0, True),
    (("wan1",), "wan2", "wan1", 5.0, True),             # an operator move put it off-list
    (("wan1", "wan2"), None, "wan2", 0.0, True),        # its tunnel is gone: at once
    (("wan2",), "wan2", "wan1", 99.0, False),           # not one of the rule's interfaces
])
def test_should_return(via: tuple[str, ...], current: str | None, candidate: str,
                       up_for: float, expected: bool) -> None:
    assert should_return(via, current, candidate, up_for, 5.0) is expected


def test_quiet_until_is_the_next_tick_while_busy_or_unanswered_else_the_next_probe() -> None:
    p = ProbeParams()
    m = PathMonitor(p, started=0.0)
    m.tick(0.0, 0, 0)                                    # first probe, unanswered
    assert m.quiet_until(0.01) == pytest.approx(0.01 + TICK)
    m.on_pong(0.02, 0.02)
    now = 5.0                                            # idle since the start
    probe, _ = m.tick(now, 0, 0)
    assert probe and m.unanswered == 1
    m.on_pong(now + 0.01, 0.01)
    due = m.quiet_until(now + 0.02)
    assert due == pytest.approx(now + m.interval - TICK / 4) and due > now + 1.0
    assert not m.tick(due - TICK / 2, 0, 0)[0] and m.tick(due, 0, 0)[0]   # due: probes
    m.on_pong(due + 0.01, 0.01)
    m.tick(due + 0.05, 1, 0)                             # traffic: active again
    assert m.quiet_until(due + 0.05) == pytest.approx(due + 0.05 + TICK)
