"""The embeddable API over the in-memory world (no root): events, moves, the policy hook.

The agent of ``test_e2e_memory.World`` (two interfaces behind two NATs, one anchor,
virtual time) wrapped in ``api.Agent`` as ``Agent.open`` would wrap the real one; the
host set-up itself is exercised by the netns test of the examples
(tests/test_netns_examples.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

import upmt_tun
from upmt_tun import api, events
from upmt_tun.control import ControlServer
from upmt_tun.reload_driver import AgentReloader
from upmt_tun.resolve import AnchorResolver, ResolveSchedule
from upmt_tun.system.agent_host import RuleMatch
from upmt_tun.system.cgroups import RuleCgroups

from . import pktbuild as pb
from .test_e2e_memory import CH, RULES, World


def _wrap(w: World, tmp: Path, policy: upmt_tun.Policy | None = None) -> api.Agent:
    a = api.Agent(w.agent, w.cfg, str(tmp / "agent.sock"),
                  RuleCgroups(str(tmp / "agent.sock"), []), policy)
    a._spawn(a._looker())
    return a


def _drain(sub: events.Subscription) -> list[events.Event]:
    out = []
    while sub.pending():
        out.append(sub._q.popleft())
    return out


@pytest.mark.virtual_time
async def test_events_tell_the_story_of_a_silent_path(tmp_path: Path) -> None:
    """Associated, tunnels up, a new flow, RTT measured; wan1 dies silently: its tunnel
    goes down (probe loss) and the flow moves (reason "probe"), then comes back (reason
    "rule") once wan1 is up again for return_after. Every event has event/time/to_json."""
    w = World(tmp_path, rules=RULES)
    agent = _wrap(w, tmp_path)
    sub = agent.events()
    other = agent.events()                       # a second subscriber sees the same
    await w.start()
    try:
        w.mh_tun.inject(pb.tcp("100.64.0.1", CH, 40000, 80, b"a"))
        await asyncio.sleep(1.5)
        seen = _drain(sub)
        kinds = [e.event for e in seen]
        assert kinds.count("anchor_associated") == 1
        assert kinds.count("tunnel_up") == 2
        (new,) = [e for e in seen if isinstance(e, events.FlowNew)]
        assert (new.rule, new.dport, new.interface, new.src) == ("web", 80, "wan1",
                                                                 "100.64.0.1")
        quality = [e for e in seen if isinstance(e, events.PathQuality)]
        assert {q.interface for q in quality} == {"wan1", "wan2"}
        assert all(q.rtt_ms is not None for q in quality)
        w.net.down.add("10.1.0.2")
        for _ in range(30):
            w.mh_tun.inject(pb.tcp("100.64.0.1", CH, 40000, 80, b"b"))
            await asyncio.sleep(0.05)
        seen = _drain(sub)
        (down,) = [e for e in seen if isinstance(e, events.TunnelDown)]
        assert (down.interface, down.reason) == ("wan1", "probe loss")
        (moved,) = [e for e in seen if isinstance(e, events.FlowMoved)]
        assert (moved.flow, moved.from_interface, moved.to_interface, moved.reason,
                moved.detail) == (new.flow, "wan1", "wan2", "probe", "probe loss")
        w.net.down.discard("10.1.0.2")
        await asyncio.sleep(w.cfg.return_after_s + 8)
        seen = _drain(sub)
        back = [e for e in seen if isinstance(e, events.FlowMoved)]
        assert [(e.to_interface, e.reason) for e in back] == [("wan1", "rule")]
        assert any(isinstance(e, events.TunnelUp) and e.interface == "wan1" for e in seen)
        j = back[0].to_json()
        assert j["event"] == "flow_moved" and j["time"] > 1e9
        json.dumps(j)
        assert other.pending() > 0 and other.dropped_total == 0
    finally:
        await agent._stop_tasks()
        await w.stop()


@pytest.mark.virtual_time
async def test_move_through_the_api(tmp_path: Path) -> None:
    w = World(tmp_path, rules=RULES)
    agent = _wrap(w, tmp_path)
    sub = agent.events()
    await w.start()
    try:
        w.mh_tun.inject(pb.tcp("100.64.0.1", CH, 40000, 80, b"a"))
        await asyncio.sleep(0.1)
        (flow,) = agent.status()["flows"]
        assert await agent.move(flow=flow["id"], via="wan2") == 1
        assert agent.status()["flows"][0]["interface"] == "wan2"
        (moved,) = [e for e in _drain(sub) if isinstance(e, events.FlowMoved)]
        assert (moved.reason, moved.detail) == ("manual", "operator")
        with pytest.raises(upmt_tun.UsageError):
            await agent.move(rule="web", flow=flow["id"], via="wan1")
        with pytest.raises(upmt_tun.UsageError):
            await agent.move(rule="nope", via="wan1")
        assert await agent.move(rule="web", via="wan1") == 1
        assert agent.rules() == ["web", "video"]
    finally:
        await agent._stop_tasks()
        await w.stop()


class _Host:
    """AgentHost's rule seam: records each rule set (slot, dst_port), or refuses."""

    def __init__(self) -> None:
        self.refuse = ""
        self.applied: list[list[tuple[int, str]]] = []

    def replace_rules(self, rules: list[RuleMatch], *, dry_run: bool = False) -> None:
        if self.refuse:
            raise upmt_tun.SystemSetupError(self.refuse)
        self.applied.append([(r.index, str(r.dst_port)) for r in rules])


@pytest.mark.virtual_time
async def test_rules_added_and_removed_one_by_one(tmp_path: Path) -> None:
    """add_rule (a Rule or keywords; last or before another), remove_rule: new flows
    follow at once, each new rule gets a slot never used in this run; bad fields, names
    and a refusing host change nothing; a later file reload applies the file as it is
    (the rule added in code goes, the one removed in code comes back)."""
    w = World(tmp_path, rules=RULES)
    agent = _wrap(w, tmp_path)
    schedule = ResolveSchedule({a.name: (a.host, a.port) for a in w.cfg.anchors}, 0.0)
    host = _Host()
    agent._reloader = AgentReloader(w.cfg, agent=w.agent, host=host,  # type: ignore[arg-type]
                                    cgroups=None, schedule=schedule, lookup=None,
                                    resolver=AnchorResolver(schedule,
                                                            w.agent.set_anchor_address))
    await w.start()
    try:
        assert await agent.add_rule(name="dns", protocol="udp", dst_port=53,
                                    via=["wan1"], before="video") == ["rule dns added"]
        assert agent.rules() == ["web", "dns", "video"]
        assert host.applied[-1] == [(0, "(80, 80)"), (2, "(53, 53)"), (1, "None")]
        w.mh_tun.inject(pb.udp("100.64.0.1", CH, 5000, 53, b"q"))
        w.mh_tun.inject(pb.udp("100.64.0.1", CH, 5001, 6000, b"v"))
        await w.settle()
        flows = {f["rule"]: f["interface"] for f in agent.status()["flows"]}
        assert flows == {"dns": "wan1", "video": "wan2"}

        rule = upmt_tun.Rule(0, "ssh", "tcp", dst_port=(22, 22), via=("wan2",))
        assert await agent.add_rule(rule) == ["rule ssh added"]
        assert agent.rules()[-1] == "ssh" and host.applied[-1][-1] == (3, "(22, 22)")
        assert await agent.remove_rule("dns") == ["rule dns removed"]
        assert agent.rules() == ["web", "video", "ssh"]
        # dns's flow keeps its tunnel until it ends; the slot 2 is never given again
        assert await agent.add_rule(name="dns", protocol="udp", dst_port=53) == [
            "rule dns added"]
        assert host.applied[-1][-1] == (4, "(53, 53)")

        before = (agent.rules(), len(host.applied))
        with pytest.raises(upmt_tun.UsageError, match="exists"):
            await agent.add_rule(name="ssh", protocol="tcp")
        with pytest.raises(upmt_tun.UsageError, match="no rule 'nope' to add"):
            await agent.add_rule(name="x", before="nope")
        with pytest.raises(upmt_tun.UsageError, match="no rule 'nope'"):
            await agent.remove_rule("nope")
        with pytest.raises(upmt_tun.UsageError, match="not both"):
            await agent.add_rule(rule, name="y")
        with pytest.raises(upmt_tun.ConfigError, match="add_rule: rule.0..via: 'wan9'"):
            await agent.add_rule(name="x", via=["wan9"])
        with pytest.raises(upmt_tun.ConfigError, match="dst_port"):
            await agent.add_rule(name="x", protocol="tcp", dst_port="80-70")
        with pytest.raises(upmt_tun.ConfigError, match="protocol"):
            await agent.add_rule(name="x", protocol="sctp")
        host.refuse = "nft: Error: refused"
        with pytest.raises(upmt_tun.SystemSetupError, match="add_rule x: nft: Error: refused"):
            await agent.add_rule(name="x", protocol="tcp", dst_port=81)
        host.refuse = ""
        assert (agent.rules(), len(host.applied)) == before

        # the file wins: its rules as written (ssh and the second dns go, video stays)
        answer = await agent._reloader.reload(w.cfg.path)
        assert answer["ok"] and agent.rules() == ["web", "video"]
        assert sorted(answer["changes"]) == ["rule dns removed", "rule ssh removed"]
        assert host.applied[-1] == [(0, "(80, 80)"), (1, "None")]
    finally:
        await w.stop()


def test_a_slow_subscriber_loses_events_and_is_told_how_many() -> None:
    bus = events.EventBus(lambda: 7.0)
    slow, fast = bus.subscribe(maxsize=3), bus.subscribe(maxsize=100)
    for i in range(10):
        bus.publish(events.FlowClosed(float(i), i, "x"))
    bus.publish(events.FlowClosed(99.0, 99, "late"))
    assert fast.pending() == 11
    got = _drain(slow)
    assert [e.flow for e in got if isinstance(e, events.FlowClosed)] == [0, 1, 2]
    # the marker is given where the events went missing: when the reader comes back
    assert slow.dropped == 8 and slow.dropped_total == 8

    async def read() -> list[events.Event]:
        bus.publish(events.FlowClosed(100.0, 100, "after"))
        bus.close()
        return [e async for e in slow]

    rest = asyncio.run(read())
    assert [(e.event, getattr(e, "count", None)) for e in rest] == [
        ("dropped", 8), ("flow_closed", None)]
    assert rest[0].to_json() == {"event": "dropped", "time": 7.0, "count": 8}


def test_a_subscription_nobody_holds_is_forgotten() -> None:
    bus = events.EventBus(lambda: 0.0)
    sub = bus.subscribe()
    assert bus.active
    del sub
    assert not bus.active          # publishers skip building events when nobody listens


class PreferWan2(upmt_tun.Policy):
    def __init__(self) -> None:
        self.seen: list[tuple[upmt_tun.FlowChoice, float]] = []

    def choose(self, choice: upmt_tun.FlowChoice, now: float) -> upmt_tun.PathOption | None:
        self.seen.append((choice, now))
        return next((p for p in choice.paths if p.interface == "wan2"), choice.builtin)


class Broken(upmt_tun.Policy):
    def choose(self, choice: upmt_tun.FlowChoice, now: float) -> upmt_tun.PathOption | None:
        raise RuntimeError("bug in the application")

    def should_return(self, choice: upmt_tun.ReturnChoice, now: float) -> bool:
        return "yes"  # type: ignore[return-value]   # not a bool: counted, built-in used


@pytest.mark.virtual_time
async def test_policy_hook_chooses_the_tunnel_with_the_builtin_inputs(tmp_path: Path) -> None:
    w = World(tmp_path, rules=RULES)
    policy = PreferWan2()
    agent = _wrap(w, tmp_path, policy)
    await w.start()
    try:
        w.mh_tun.inject(pb.tcp("100.64.0.1", CH, 40000, 80, b"a"))
        await asyncio.sleep(0.1)
        (flow,) = agent.status()["flows"]
        assert flow["interface"] == "wan2"            # web's via says wan1 first
        choice, now = policy.seen[-1]
        assert choice.rule == "web" and choice.via == ("wan1", "wan2") and choice.dst == CH
        assert choice.anchors == ("an1",)
        assert [p.interface for p in choice.paths] == ["wan1", "wan2"]
        assert choice.builtin is not None and choice.builtin.interface == "wan1"
        assert abs(now - w.clock()) < 1.0
        assert agent.status()["policy"] == {"calls": len(policy.seen), "errors": 0}
    finally:
        await agent._stop_tasks()
        await w.stop()


@pytest.mark.virtual_time
async def test_a_broken_policy_hook_is_counted_logged_once_and_the_builtin_used(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    w = World(tmp_path, rules=RULES)
    agent = _wrap(w, tmp_path, Broken())
    await w.start()
    caplog.set_level(logging.ERROR, logger="upmt_tun.api")
    try:
        for port in (40000, 40001, 40002):
            w.mh_tun.inject(pb.tcp("100.64.0.1", CH, port, 80, b"a"))
        await asyncio.sleep(0.1)
        flows = agent.status()["flows"]
        assert [f["interface"] for f in flows] == ["wan1"] * 3       # built-in choice
        assert agent.status()["policy"]["errors"] == 3
        # a tunnel that comes back asks should_return, which answers nonsense
        w.net.down.add("10.1.0.2")
        for _ in range(30):
            w.mh_tun.inject(pb.tcp("100.64.0.1", CH, 40000, 80, b"b"))
            await asyncio.sleep(0.05)
        w.net.down.discard("10.1.0.2")
        await asyncio.sleep(w.cfg.return_after_s + 8)
        assert agent.status()["flows"][0]["interface"] == "wan1"     # came back anyway
        assert agent.status()["policy"]["errors"] > 3
        lines = [r for r in caplog.records if "policy hook" in r.getMessage()]
        assert len(lines) == 1 and "RuntimeError: bug in the application" in lines[0].getMessage()
    finally:
        await agent._stop_tasks()
        await w.stop()


async def test_the_control_socket_streams_events_as_json_lines(tmp_path: Path) -> None:
    bus = events.EventBus(lambda: 1.0)

    async def handle(req: dict[str, object]) -> dict[str, object]:
        return {"ok": True}

    path = str(tmp_path / "c.sock")
    server = ControlServer(path, handle, stream=lambda: bus.subscribe(4))
    await server.start()
    try:
        r, wr = await asyncio.open_unix_connection(path)
        wr.write(b'{"cmd": "events"}\n')
        assert json.loads(await r.readline()) == {"ok": True, "events": True}
        for _ in range(50):                 # the stream's subscription exists once answered
            if bus.active:
                break
            await asyncio.sleep(0.01)
        bus.publish(events.AnchorLost(5.0, "an1", "probe loss"))
        line = json.loads(await asyncio.wait_for(r.readline(), 5))
        assert line == {"event": "anchor_lost", "time": 5.0, "anchor": "an1",
                        "reason": "probe loss"}
        wr.close()                          # hanging up ends the stream and its queue
        for _ in range(100):
            if not bus.active:
                break
            await asyncio.sleep(0.01)
        assert not bus.active
    finally:
        await server.close()


@pytest.mark.virtual_time
async def test_anchor_forgets_the_host_both_ends_tell(tmp_path: Path) -> None:
    """The anchor loses the association (as after a restart): its events say host lost
    and tunnels gone, then associated and up again; the agent's say anchor lost (its
    "not registered" answer) and associated again."""
    w = World(tmp_path, rules=RULES)
    agent = _wrap(w, tmp_path)
    anchor = api.Anchor(w.anchors[0], w.anchor_cfgs[0], str(tmp_path / "anchor.sock"))
    anchor._spawn(anchor._looker())
    a_sub, h_sub = agent.events(), anchor.events()
    await w.start()
    try:
        await asyncio.sleep(0.5)
        first = [e.event for e in _drain(h_sub)]
        assert first.count("host_associated") == 1 and first.count("tunnel_up") == 2
        _drain(a_sub)
        fwd = w.anchors[0].fwd
        (assoc,) = fwd.by_mh.values()
        fwd.remove_association(assoc)
        await asyncio.sleep(6)
        seen = _drain(h_sub)
        kinds = [e.event for e in seen]
        assert kinds[:3] == ["tunnel_down", "tunnel_down", "host_lost"], kinds
        assert kinds.count("host_associated") == 1 and kinds.count("tunnel_up") == 2
        (lost,) = [e for e in seen if isinstance(e, events.HostLost)]
        assert lost.host == "laptop"
        mine = [e.event for e in _drain(a_sub)]
        assert "anchor_lost" in mine
        assert mine.index("anchor_lost") < mine.index("anchor_associated")
    finally:
        await agent._stop_tasks()
        await anchor._stop_tasks()
        await w.stop()


def test_every_exported_name_resolves_and_the_package_is_typed() -> None:
    for name in upmt_tun.__all__:
        assert getattr(upmt_tun, name) is not None, name
    assert (Path(upmt_tun.__file__).parent / "py.typed").exists()
    with pytest.raises(AttributeError):
        upmt_tun.nope  # type: ignore[attr-defined]  # noqa: B018


@pytest.mark.virtual_time
async def test_a_mesh_peer_reached_by_relay_then_directly(tmp_path: Path) -> None:
    """peer_path events: the relay first, then the direct path ICE found (and the flow's
    move, reason "direct")."""
    from .test_mesh_agents import MeshWorld, _connect

    w = MeshWorld(tmp_path, direct=True)
    agent = api.Agent(w.laptop.a, w.laptop.a.cfg, str(tmp_path / "laptop.sock"),
                      RuleCgroups(str(tmp_path / "laptop.sock"), []), None)
    agent._spawn(agent._looker())
    sub = agent.events()
    await w.start()
    try:
        await _connect(w, w.laptop, w.phone)
        await asyncio.sleep(3)
        seen = _drain(sub)
        paths = [(e.peer, e.path) for e in seen if isinstance(e, events.PeerPath)]
        assert paths[0] == ("phone", "relay") and paths[-1] == ("phone", "direct"), paths
        assert all(e.interface == "wan1" for e in seen if isinstance(e, events.PeerPath))
        moved = [e for e in seen if isinstance(e, events.FlowMoved)]
        assert [(e.reason, e.detail) for e in moved] == [("direct", "direct path")]
    finally:
        await agent._stop_tasks()
        await w.stop()
