"""Starting before the network (issue 12 item 5), without root: the resolver's schedule
(pure), its driver on virtual time with a fake ``getaddrinfo``, and the agent with an
interface that has no address yet and an anchor whose name does not resolve yet, over
the in-memory seams of ``test_e2e_memory``."""

from __future__ import annotations

import asyncio
import math
import socket
import threading
import time
from pathlib import Path

import pytest

from upmt_tun.agent import Agent, IfaceSeam, rule_classifier
from upmt_tun.resolve import (
    KICK_MIN,
    REFRESH,
    RETRY_MAX,
    AnchorResolver,
    Resolve,
    ResolveSchedule,
    first_lookups,
    is_literal,
)

from .test_e2e_memory import World

pytestmark = pytest.mark.virtual_time


async def _inline(fn: Resolve, host: str, port: int) -> tuple[str, int]:
    """No worker thread on virtual time (the clock would jump while it runs)."""
    return fn(host, port)


# -- the schedule (pure) ------------------------------------------------------------------
def test_literal_addresses_need_no_lookup() -> None:
    s = ResolveSchedule({"a": ("203.0.113.1", 5060), "b": ("anchor.example", 5060)}, 0.0)
    assert s.entries["a"].addr == (("203.0.113.1", 5060),)
    assert s.due(0.0) == ["b"]
    assert is_literal("10.0.0.1") and not is_literal("anchor.example")


def test_failures_back_off_to_a_cap_then_refresh_after_success() -> None:
    s = ResolveSchedule({"b": ("anchor.example", 5060)}, 0.0)
    now, delays = 0.0, []
    for _ in range(9):
        delays.append(s.failed("b", "no name", now))
        now = s.entries["b"].due
        assert s.due(now - 0.001) == [] and s.due(now) == ["b"]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, RETRY_MAX, RETRY_MAX, RETRY_MAX]
    assert s.resolved("b", ("198.51.100.1", 5060), now) is True
    assert s.entries["b"].due == now + REFRESH and s.entries["b"].failures == 0
    # the refresh gives the same address: nothing new; another: new
    assert s.resolved("b", ("198.51.100.1", 5060), now + REFRESH) is False
    assert s.resolved("b", ("198.51.100.2", 5060), now + 2 * REFRESH) is True


def test_a_failed_refresh_keeps_the_last_address() -> None:
    s = ResolveSchedule({"b": ("anchor.example", 5060)}, 0.0)
    s.resolved("b", ("198.51.100.1", 5060), 0.0)
    s.failed("b", "temporary failure", REFRESH)
    assert s.entries["b"].addr == (("198.51.100.1", 5060),)
    assert s.entries["b"].due == REFRESH + 1.0


def test_a_kick_brings_only_unresolved_names_forward_and_not_too_often() -> None:
    s = ResolveSchedule({"b": ("b.example", 1), "c": ("c.example", 1)}, 0.0)
    s.resolved("c", ("198.51.100.3", 1), 0.0)
    for _ in range(5):
        s.failed("b", "no name", 0.0)          # next try 16 s away
    assert not s.kick(0.5)                     # tried 0.5 s ago: not yet
    assert s.kick(KICK_MIN)
    assert s.due(KICK_MIN) == ["b"]            # c keeps its refresh time
    assert s.entries["c"].due == REFRESH
    assert not s.kick(KICK_MIN)                # already due


# -- the driver on virtual time --------------------------------------------------------
async def test_the_resolver_retries_in_a_thread_until_the_name_resolves() -> None:
    loop = asyncio.get_running_loop()
    calls: list[float] = []
    found: list[tuple[str, tuple[str, int]]] = []

    def resolve(host: str, port: int) -> tuple[str, int]:
        calls.append(loop.time())
        if len(calls) < 4:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return "198.51.100.9", port

    t0 = loop.time()
    r = AnchorResolver(ResolveSchedule({"an1": ("anchor.example", 5060)}, t0),
                       lambda a, addr: found.append((a, addr)), resolve=resolve, offload=_inline)
    r.start()
    try:
        while not found:
            await asyncio.sleep(0.5)
        assert found == [("an1", (("198.51.100.9", 5060),))]
        gaps = [round(b - a) for a, b in zip(calls, calls[1:], strict=False)]
        assert gaps == [1, 2, 4]               # backoff between the failed look-ups
        # resolved: no more look-ups until the refresh (REFRESH later: the pure test);
        # (the whole test has 60 virtual seconds)
        await asyncio.sleep(40)
        assert len(calls) == 4 and r.schedule.entries["an1"].due == calls[-1] + REFRESH
    finally:
        await r.close()


async def test_a_kick_retries_an_unresolved_name_at_once() -> None:
    loop = asyncio.get_running_loop()
    calls: list[float] = []

    def resolve(host: str, port: int) -> tuple[str, int]:
        calls.append(loop.time())
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    s = ResolveSchedule({"an1": ("anchor.example", 5060)}, loop.time())
    for _ in range(6):
        s.failed("an1", "no name", loop.time())       # next look-up RETRY_MAX away
    r = AnchorResolver(s, lambda a, addr: None, resolve=resolve, offload=_inline)
    r.start()
    try:
        await asyncio.sleep(5)
        assert calls == []
        r.kick()                                      # an interface came up
        await asyncio.sleep(0.1)
        assert len(calls) == 1
    finally:
        await r.close()


# -- the agent -------------------------------------------------------------------------
def _agent(w: World, anchors: dict[str, tuple[str, int] | None]) -> Agent:
    return Agent(w.cfg, tun=w.mh_tun,
                 ifaces=[IfaceSeam("wan1", 0, w.s1), IfaceSeam("wan2", 1, w.s2)],
                 anchors=anchors,
                 classify_flow=rule_classifier(w.cfg.rules, None, w.cfg.fwmark),
                 clock=w.clock)


async def test_an_unresolved_anchor_has_no_tunnels_until_it_resolves(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.agent = _agent(w, {"an1": None})
    await w.anchors[0].start()
    await w.agent.start()
    try:
        # ready at once: nothing to try (the look-up failed: its first attempt)
        await asyncio.wait_for(w.agent.wait_ready(), 0.1)
        st = w.agent.status()
        assert st["anchors"] == [{"name": "an1", "address": None, "state": "unresolved",
                                  "vipa": None, "vipa6": None, "role": "anchor"}]
        assert st["tunnels"] == []
        w.agent.set_anchor_address("an1", ("203.0.113.1", 5060))
        for _ in range(50):
            await asyncio.sleep(0.1)
            st = w.agent.status()
            if [t["state"] for t in st["tunnels"]] == ["up", "up"]:
                break
        assert [t["state"] for t in st["tunnels"]] == ["up", "up"]
        assert st["anchors"][0]["state"] == "associated"
        assert st["anchors"][0]["address"] == "203.0.113.1:5060"
    finally:
        await w.stop()


async def test_an_anchor_that_moved_is_followed(tmp_path: Path) -> None:
    """The name first gave an address where nobody answers (a stale DNS record): the
    links fail and retry; the refresh gives the anchor's real address: they stop
    waiting for the old one, try there at once and come up."""
    w = World(tmp_path)
    w.agent = _agent(w, {"an1": ("203.0.113.9", 5060)})
    await w.anchors[0].start()
    await w.agent.start()
    try:
        await asyncio.wait_for(w.agent.wait_ready(), 10)
        assert [t["state"] for t in w.agent.status()["tunnels"]] == ["down", "down"]
        await asyncio.sleep(5)
        # still trying the old address (a handshake waiting for its answer, or backing off)
        assert {link.state.value for link in w.agent.links.values()} <= {"handshake",
                                                                         "backoff"}
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        w.agent.set_anchor_address("an1", ("203.0.113.1", 5060))
        for _ in range(100):
            await asyncio.sleep(0.05)
            st = w.agent.status()
            if [t["state"] for t in st["tunnels"]] == ["up", "up"]:
                break
        assert [t["state"] for t in st["tunnels"]] == ["up", "up"]
        assert loop.time() - t0 < 2.0             # at once, not at the end of the backoff
        assert {t["remote"] for t in st["tunnels"]} == {"203.0.113.1:5060"}
        assert st["anchors"][0]["address"] == "203.0.113.1:5060"
    finally:
        await w.stop()


async def test_an_interface_without_address_starts_down_and_counts_for_ready(
        tmp_path: Path) -> None:
    w = World(tmp_path)
    w.agent = _agent(w, {"an1": ("203.0.113.1", 5060)})
    w.agent.on_link("wan2", False, "no address yet")     # as run_agent does before start
    await w.anchors[0].start()
    await w.agent.start()
    try:
        await asyncio.wait_for(w.agent.wait_ready(), 10)
        links = {i: link.state.value for (i, _), link in w.agent.links.items()}
        assert links["wan2"] == "link down"
        tunnels = {t["interface"]: t["state"] for t in w.agent.status()["tunnels"]}
        assert tunnels == {"wan1": "up", "wan2": "down"}
        w.agent.on_link("wan2", True, "link up")           # its address came
        for _ in range(50):
            await asyncio.sleep(0.1)
            tunnels = {t["interface"]: t["state"] for t in w.agent.status()["tunnels"]}
            if tunnels["wan2"] == "up":
                break
        assert tunnels == {"wan1": "up", "wan2": "up"}
    finally:
        await w.stop()


def test_never_due_when_everything_is_literal() -> None:
    s = ResolveSchedule({"a": ("203.0.113.1", 5060)}, 0.0)
    assert math.isinf(s.next_deadline())


def test_the_default_offload_runs_getaddrinfo_in_a_thread() -> None:
    """The real seam on a real loop: "localhost" resolves from /etc/hosts."""
    found: list[tuple[tuple[str, int], ...]] = []

    async def main() -> None:
        r = AnchorResolver(ResolveSchedule({"a": ("localhost", 5060)}, 0.0),
                           lambda a, addr: found.append(addr))
        r.start()
        for _ in range(100):
            if found:
                break
            await asyncio.sleep(0.02)
        await r.close()

    asyncio.run(main())
    assert found and found[0][0] == ("127.0.0.1", 5060)   # then ::1 if it has one


def test_first_lookups_resolve_in_parallel_and_do_not_wait_for_a_silent_resolver() -> None:
    """Before start: one name answers, one fails, one hangs (a name server that does not
    answer): the wait ends after ``wait`` s, the hung one counts as failed."""
    release = threading.Event()

    def resolve(host: str, port: int) -> tuple[str, int]:
        if host == "good.example":
            return "198.51.100.1", port
        if host == "hung.example":
            release.wait(10)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    s = ResolveSchedule({"a": ("good.example", 1), "b": ("bad.example", 2),
                         "c": ("hung.example", 3), "d": ("192.0.2.4", 4)}, 0.0)
    t0 = time.monotonic()
    failed = dict(first_lookups(s, 0.0, resolve=resolve, wait=0.3))
    took = time.monotonic() - t0
    release.set()
    assert took < 5.0                                  # not the hung look-up's 10 s
    assert failed == {"b": "Name or service not known", "c": "no answer within 0.3 s"}
    assert s.entries["a"].addr == (("198.51.100.1", 1),)
    assert s.entries["d"].addr == (("192.0.2.4", 4),)     # a literal: never looked up
    assert s.entries["b"].addr is None and s.entries["b"].due == 1.0
    assert s.entries["c"].addr is None and s.entries["c"].failures == 1
