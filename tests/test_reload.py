"""``reload``: the pure plans (config old/new -> what changes), the nft scripts a reload
applies, SIGHUP's meaning, and the agent's and anchor's tables changed in memory (the
seams of ``test_e2e_memory.World``, virtual time). The netns layer (real daemons, a live
TCP stream across a reload) is ``test_netns_reload.py``."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from upmt_tun import keys
from upmt_tun.agent import rule_classifier
from upmt_tun.config import Peer, load_agent_config, load_anchor_config
from upmt_tun.reload import (
    AGENT_RESTART,
    ReloadRefused,
    parse_slots,
    plan_agent,
    plan_anchor,
    start_slots,
)
from upmt_tun.reload_driver import AgentReloader, SlotFile, rule_matches
from upmt_tun.resolve import AnchorResolver, ResolveSchedule
from upmt_tun.runtime import StopSignals
from upmt_tun.system.agent_host import AgentHost, IfacePlan, RuleMatch, rule_ct_mark
from upmt_tun.system.anchor_host import AnchorHost
from upmt_tun.system.errors import SystemSetupError

from . import pktbuild as pb
from .test_e2e_memory import CH, RULES, World

MH_PRIV, _ = keys.keypair()
AN_PRIV, AN_PUB = keys.keypair()
_, OTHER_PUB = keys.keypair()
IFACES = {"wan1", "wan2"}


def agent_cfg(tmp: Path, rules: str, extra: str = "", anchors: str = "", name: str = "a"):
    p = tmp / f"{name}.toml"
    p.write_text(f'private_key = "{MH_PRIV}"\n' + textwrap.dedent(extra) + textwrap.dedent("""
        [[interface]]
        name = "wan1"
        [[interface]]
        name = "wan2"
        [[anchor]]
        name = "an1"
        address = "192.0.2.1:5060"
        """) + f'public_key = "{AN_PUB}"\n' + textwrap.dedent(anchors) + textwrap.dedent(rules))
    return load_agent_config(str(p))


def rule(name: str, port: int, via: str = '["wan1", "wan2"]') -> str:
    return (f'\n[[rule]]\nname = "{name}"\nprotocol = "tcp"\ndst_port = {port}\n'
            f"via = {via}\n")


# -- the agent's plan -----------------------------------------------------------------------
def test_rules_are_known_by_name_and_keep_their_mark_slot(tmp_path: Path) -> None:
    """Add one, remove one, edit one, keep one, and reorder: kept and edited rules keep the
    slot their connections' ct marks carry; the new rule gets a slot never used in this
    run (not the removed rule's, which established connections may still carry)."""
    old = agent_cfg(tmp_path, rule("web", 80) + rule("gone", 81) + rule("ssh", 22), name="o")
    new = agent_cfg(tmp_path, rule("new", 443) + rule("ssh", 2222) + rule("web", 80), name="n")
    slots, first_free = start_slots(old.rules)
    assert slots == {"web": 0, "gone": 1, "ssh": 2} and first_free == 3
    plan = plan_agent(old, new, slots, 3, IFACES)
    assert (plan.added, plan.removed, plan.edited) == (("new",), ("gone",), ("ssh",))
    assert plan.reordered and plan.rules_changed
    assert plan.slots == {"web": 0, "ssh": 2, "new": 3} and plan.next_slot == 4
    assert [r.name for r in plan.cfg.rules] == ["new", "ssh", "web"]   # new first-match order
    assert plan.changes() == ["rule new added", "rule gone removed", "rule ssh edited"]
    assert plan.restart == ()
    # and again: "gone" comes back under its name: a fresh slot, not 1
    again = plan_agent(new, old, plan.slots, plan.next_slot, IFACES)
    assert again.slots == {"web": 0, "gone": 4, "ssh": 2}
    assert again.removed == ("new",)


def test_saved_slots_survive_a_restart(tmp_path: Path) -> None:
    """After a reload moved rules, the next start (same boot: conntrack entries of the
    earlier run still carry the slots) takes the saved slots by name; a rule new since
    gets a fresh one; a removed rule's slot stays retired."""
    cfg = agent_cfg(tmp_path, rule("new", 443) + rule("web", 80) + rule("later", 8))
    assert start_slots(cfg.rules, {"web": 0, "new": 3, "gone": 1}, 4) == (
        {"new": 3, "web": 0, "later": 4}, 5)
    assert parse_slots({"slots": {"web": 0, "new": 3}, "next": 4}) == ({"web": 0, "new": 3}, 4)
    for bad in ([], {"slots": {}}, {"slots": {"a": 4}, "next": 4},
                {"slots": {"a": 1, "b": 1}, "next": 4}, {"slots": {"a": True}, "next": 4},
                {"slots": {"a": 0}, "next": 1 << 20}, {"slots": {}, "next": 1, "x": 0}):
        with pytest.raises(ValueError):
            parse_slots(bad)


def test_slot_file_is_read_only_when_it_is_our_own(tmp_path: Path) -> None:
    f = SlotFile(str(tmp_path / "agent.sock"))
    assert f.load() is None
    f.save({"web": 0, "new": 3}, 4)
    assert f.load() == ({"web": 0, "new": 3}, 4)
    assert (os.stat(f.path).st_mode & 0o777) == 0o600
    os.chmod(f.path, 0o666)                          # others could have written it
    assert f.load() is None
    os.unlink(f.path)
    (tmp_path / "elsewhere").write_text('{"slots": {}, "next": 0}')
    os.symlink(tmp_path / "elsewhere", f.path)       # a link planted in its place
    assert f.load() is None
    os.unlink(f.path)
    Path(f.path).write_text("{not json")
    os.chmod(f.path, 0o600)
    assert f.load() is None


def test_same_config_is_no_change_and_reorder_alone_is_one(tmp_path: Path) -> None:
    a = agent_cfg(tmp_path, rule("web", 80) + rule("ssh", 22), name="a")
    b = agent_cfg(tmp_path, rule("ssh", 22) + rule("web", 80), name="b")
    same = plan_agent(a, a, start_slots(a.rules)[0], 2, IFACES)
    assert same.changes() == [] and not same.rules_changed
    moved = plan_agent(a, b, start_slots(a.rules)[0], 2, IFACES)
    assert moved.changes() == ["rules reordered"] and moved.slots == {"web": 0, "ssh": 1}


def test_restart_keys_keep_their_running_value(tmp_path: Path) -> None:
    old = agent_cfg(tmp_path, rule("web", 80), name="o")
    new = agent_cfg(tmp_path, rule("web", 80), 'mtu = 1300\nfwmark = 0x6000\nreturn_after = 9\n',
                    name="n")
    plan = plan_agent(old, new, start_slots(old.rules)[0], 1, IFACES)
    assert plan.restart == ("mtu", "fwmark")
    assert plan.cfg.mtu == old.mtu and plan.cfg.fwmark == old.fwmark
    assert plan.cfg.return_after_s == 9.0 and plan.changes() == ["return_after 9 s"]
    assert set(AGENT_RESTART) | {"path", "rules", "anchors", "return_after_s"} == set(
        old.__dataclass_fields__)                  # every key is applied or says restart


def test_a_rule_via_an_interface_not_in_use_is_refused(tmp_path: Path) -> None:
    old = agent_cfg(tmp_path, rule("web", 80), name="o")
    new = agent_cfg(tmp_path, rule("web", 80, '["wan2"]'), name="n")
    with pytest.raises(ReloadRefused, match="via interface 'wan2' is not in use"):
        plan_agent(old, new, start_slots(old.rules)[0], 1, {"wan1"})


def test_no_slot_left_is_refused(tmp_path: Path) -> None:
    old = agent_cfg(tmp_path, "", name="o")
    new = agent_cfg(tmp_path, rule("web", 80), name="n")
    with pytest.raises(ReloadRefused, match="no mark slot left"):
        plan_agent(old, new, {}, 0xFFFF, IFACES)


def test_anchors_added_removed_moved_and_rekeyed(tmp_path: Path) -> None:
    def an(name: str, addr: str, key: str) -> str:
        return f'[[anchor]]\nname = "{name}"\naddress = "{addr}"\npublic_key = "{key}"\n'

    old = agent_cfg(tmp_path, "", anchors=an("an2", "192.0.2.2:5060", AN_PUB)
                    + an("an3", "192.0.2.3:5060", AN_PUB), name="o")
    new = agent_cfg(tmp_path, "", anchors=an("an2", "192.0.2.22:5060", AN_PUB)
                    + an("an3", "192.0.2.3:5060", OTHER_PUB)
                    + an("an4", "anchor.example:5060", AN_PUB), name="n")
    plan = plan_agent(old, new, {}, 0, IFACES)
    assert [a.name for a in plan.anchors_added] == ["an3", "an4"]   # a new key: a new anchor
    assert plan.anchors_removed == ("an3",)
    assert [(a.name, a.host) for a in plan.anchors_moved] == [("an2", "192.0.2.22")]
    assert "anchor an2 moved to 192.0.2.22:5060" in plan.changes()


# -- the anchor's plan ----------------------------------------------------------------------
def anchor_cfg(tmp: Path, peers: dict[str, str], extra: str = "", name: str = "an"):
    p = tmp / f"{name}.toml"
    p.write_text(f'listen = "192.0.2.1:5060"\nnat_interface = "eth0"\nprivate_key = "{AN_PRIV}"\n'
                 + textwrap.dedent(extra)
                 + "".join(f'[[peer]]\nname = "{n}"\npublic_key = "{k}"\n'
                           for n, k in peers.items()))
    return load_anchor_config(str(p))


def test_anchor_plan_peers_mesh_limits_and_restart(tmp_path: Path) -> None:
    k1, k2, k3, k4 = (keys.keypair()[1] for _ in range(4))
    old = anchor_cfg(tmp_path, {"a": k1, "b": k2, "c": k3}, name="o")
    new = anchor_cfg(tmp_path, {"a": k1, "b": k4, "d": k3},
                     'mesh = true\ndeny_egress = ["10.0.0.0/8"]\nmtu = 1300\n', name="n")
    plan = plan_anchor(old, new)
    assert (plan.peers_added, plan.peers_removed, plan.peers_rekeyed) == (("d",), ("c",), ("b",))
    assert plan.mesh_changed == ("a",)               # b is re-keyed: ended anyway
    assert plan.nft_changed and plan.restart == ("mtu",)
    assert plan.cfg.mtu == old.mtu and plan.cfg.mesh and plan.cfg.peers == new.peers
    assert plan.changes() == ["peer d added", "peer c removed", "peer b re-keyed",
                              "peer a mesh on", "mesh changed", "deny_egress changed"]
    assert plan_anchor(old, old).changes() == [] and not plan_anchor(old, old).nft_changed


# -- the nft scripts ------------------------------------------------------------------------
def test_rules_script_replaces_only_the_output_chain_with_stable_marks(tmp_path: Path) -> None:
    cfg = agent_cfg(tmp_path, rule("new", 443) + rule("web", 80))
    host = AgentHost(tun="upmt0", vipa_fix="100.64.0.1", fwmark=0x5550, table=5550,
                     ifaces=[IfacePlan(0, "wan1", None, 4000)], rules=[])
    script = host.rules_script(rule_matches(cfg.rules, {"new": 5, "web": 0}, None))
    lines = script.splitlines()
    assert lines[0] == "flush chain ip upmt_agent output"
    assert all(line.startswith("add rule ip upmt_agent output ") for line in lines[1:])
    marks = [line.split("ct mark set ")[1] for line in lines if "ct mark set" in line]
    assert marks == [f"{rule_ct_mark(5, 0x5550):#x}", f"{rule_ct_mark(0, 0x5550):#x}"]
    assert "th dport 443" in lines[2] and "th dport 80" in lines[3]     # first match first
    # with `run` cgroups: each rule's cgroup rule first, with the same slot
    both = rule_matches(cfg.rules, {"new": 5, "web": 0}, lambda r: f"upmt-x/{r}")
    assert [(m.index, m.cgroup) for m in both] == [
        (5, "upmt-x/new"), (0, "upmt-x/web"), (5, None), (0, None)]


def test_egress_script_keeps_counters_and_restarts_counts_on_a_new_limit() -> None:
    host = AnchorHost(tun="upmtan0", tun_address="100.100.0.1", pool_prefixlen=16,
                      pool="100.100.0.0/16", mtu=1440, role="anchor", nat_interface="eth0",
                      deny_egress=("10.0.0.0/8",))
    same = host.egress_script(("10.1.0.0/16",), ("10.0.0.0/8",), 4096)
    assert same.startswith("flush chain ip upmt_anchor egress\n")
    assert "flush chain ip upmt_anchor to_anchor" in same and "flush set" not in same
    assert "delete" not in same and "counter " not in same.replace('counter name "', "")
    assert "ip daddr { 10.1.0.0/16 } accept" in same
    assert "flush set ip upmt_anchor hosts" in host.egress_script((), (), 100)
    fixed = AnchorHost(
        tun="t", tun_address="100.100.0.1", pool_prefixlen=16, pool="100.100.0.0/16",
        mtu=1440, role="fixed-host", nat_interface=None)
    assert fixed.egress_script((), (), 100) == ""


# -- the classifier: ct marks name rules by slot ------------------------------------------
def test_classifier_maps_ct_marks_by_slot_not_position(tmp_path: Path) -> None:
    cfg = agent_cfg(tmp_path, rule("new", 443) + rule("web", 80))
    key = (6, pb.ip("100.64.0.1"), pb.ip(CH), 40000, 9999)
    marks = {"web": rule_ct_mark(0, cfg.fwmark), "gone": rule_ct_mark(1, cfg.fwmark)}
    slots = {"web": 0, "new": 2}
    for name, expect in (("web", "web"), ("gone", "")):     # a retired slot names no rule
        classify = rule_classifier(cfg.rules, lambda k, m=marks[name]: (m, ""), cfg.fwmark,
                                   slots)
        assert classify(key).rule == expect


# -- SIGHUP -------------------------------------------------------------------------------
def test_sighup_reloads_without_a_terminal_and_stops_with_one() -> None:
    s = StopSignals()
    s.note(signal.SIGHUP)
    assert s.signum == signal.SIGHUP                    # in a terminal: stop
    s = StopSignals()
    s.hup_reloads = True
    s.note(signal.SIGHUP)                               # before serving: held
    assert s.signum is None and s.hup_pending
    calls: list[int] = []
    s.on_hup = lambda: calls.append(1)
    s.note(signal.SIGHUP)
    s.note(signal.SIGHUP)
    assert calls == [1, 1] and s.signum is None
    s.note(signal.SIGTERM)
    assert s.signum == signal.SIGTERM
    s.note(signal.SIGHUP)                               # stopping: neither a reload
    assert calls == [1, 1] and s.signum == signal.SIGTERM   # nor another stop


# -- in memory: the agent's and the anchor's tables --------------------------------------

@pytest.mark.virtual_time
async def test_agent_removes_and_adds_an_anchor_at_run_time(tmp_path: Path) -> None:
    """remove_anchor: its tunnels close, its flows end, the other anchor's flows and
    tunnels are untouched; add_anchor brings it back (handshake, association, tunnels)."""
    w = World(tmp_path, anchors=2, rules=RULES + '    anchor = "an2"\n')
    await w.start()
    try:
        w.mh_tun.inject(pb.tcp("100.64.0.1", CH, 40000, 80, b"a"))      # web: an1
        w.mh_tun.inject(pb.udp("100.64.0.1", CH, 5000, 6000, b"v"))     # video: an2
        await w.settle()
        before = {f["rule"]: f for f in w.agent.status()["flows"]}
        assert before["web"]["anchor"] == "an1" and before["video"]["anchor"] == "an2"
        w.agent.move(via="wan2", rule="web", anchor="an2")   # new web flows: wan2, an2
        w.agent.remove_anchor("an2")
        assert w.agent.fwd.prefer["web"] == ("wan2", None)     # not the anchor that went
        st = w.agent.status()
        assert [a["name"] for a in st["anchors"]] == ["an1"]
        assert {t["anchor"] for t in st["tunnels"]} == {"an1"}
        assert [(f["rule"], f["id"]) for f in st["flows"]] == [("web", before["web"]["id"])]
        assert "an2" not in w.agent.fwd.anchor_order
        w.mh_tun.inject(pb.tcp("100.64.0.1", CH, 40000, 80, b"b"))       # still flows
        await w.settle()
        (f,) = w.agent.status()["flows"]
        assert f["tx_packets"] == 2
        ref = next(a for a in w.cfg.anchors if a.name == "an2")
        w.agent.add_anchor(ref, ("203.0.113.2", 5060))
        for _ in range(50):
            await asyncio.sleep(0.1)
            if all(t["state"] == "up" for t in w.agent.status()["tunnels"]):
                break
        st = w.agent.status()
        assert sorted((t["interface"], t["anchor"], t["state"]) for t in st["tunnels"]) == [
            ("wan1", "an1", "up"), ("wan1", "an2", "up"), ("wan2", "an1", "up"),
            ("wan2", "an2", "up")]
        assert [a["name"] for a in st["anchors"]] == ["an1", "an2"]
        w.mh_tun.inject(pb.udp("100.64.0.1", CH, 5001, 6000, b"v"))     # video: an2 again
        await w.settle()
        assert {f["rule"]: f["anchor"] for f in w.agent.status()["flows"]} == {
            "web": "an1", "video": "an2"}
    finally:
        await w.stop()


@pytest.mark.virtual_time
async def test_anchor_ends_a_rekeyed_peer_and_refuses_its_old_key(tmp_path: Path) -> None:
    """reconfigure: a peer whose key changed loses its association now, and the host's
    handshakes with the old key are refused from then on."""
    w = World(tmp_path, rules=RULES)
    await w.start()
    try:
        an = w.anchors[0]
        assert [a["mh"] for a in an.status()["associations"]] == ["laptop"]
        cfg = replace(an.cfg, peers=(Peer("laptop", base64.b64decode(OTHER_PUB)),))
        an.reconfigure(cfg, ("laptop",))
        assert an.status()["associations"] == [] and not an.fwd.sessions
        refused = an.fwd.drops["handshake_refused"]
        await asyncio.sleep(40.0)        # the agent's tunnels fail and it handshakes again
        assert an.status()["associations"] == []
        assert an.fwd.drops["handshake_refused"] > refused
        # the original key listed again: the host is back
        an.reconfigure(replace(cfg, peers=w.anchor_cfgs[0].peers), ())
        for _ in range(60):
            await asyncio.sleep(1.0)
            if an.status()["associations"]:
                break
        assert [a["mh"] for a in an.status()["associations"]] == ["laptop"]
    finally:
        await w.stop()


class FakeHost:
    """AgentHost's reload seam: records the rules it was given, or refuses them."""

    def __init__(self, refuse: str = "") -> None:
        self.refuse = refuse
        self.applied: list[list[tuple[int, str | None]]] = []

    def replace_rules(self, rules: list[RuleMatch], *, dry_run: bool = False) -> None:
        if self.refuse:
            raise SystemSetupError(self.refuse)
        self.applied.append([(r.index, str(r.dst_port)) for r in rules])


@pytest.mark.virtual_time
async def test_agent_reloader_applies_a_file_or_changes_nothing(tmp_path: Path) -> None:
    """The driver in order: load, plan, host, daemon. A host that refuses (nft) leaves the
    agent's rules and anchors as they were; a file that does not load too; a good file
    changes the host once and the agent's classifier, anchors and config."""
    w = World(tmp_path, anchors=2, rules=RULES)
    await w.start()
    try:
        schedule = ResolveSchedule({a.name: (a.host, a.port) for a in w.cfg.anchors}, 0.0)
        resolver = AnchorResolver(schedule, w.agent.set_anchor_address)
        host = FakeHost("nft: Error: refused")
        r = AgentReloader(w.cfg, agent=w.agent, host=host, cgroups=None,  # type: ignore[arg-type]
                          schedule=schedule, resolver=resolver, lookup=None)
        text = Path(w.cfg.path).read_text()
        anchors_part = text[text.index("[[anchor]]"):text.index("[[rule]]")]
        an2 = anchors_part[anchors_part.index('[[anchor]]\nname = "an2"'):]
        new = text.replace(an2, "").replace('name = "video"', 'name = "stream"')
        Path(w.cfg.path).write_text(new)
        before = (w.agent.fwd.classify, list(w.agent.anchors), w.agent.cfg)
        answer = await r.reload()
        assert answer == {"ok": False, "usage": True,
                          "error": f"{w.cfg.path}: nft: Error: refused"}
        assert (w.agent.fwd.classify, list(w.agent.anchors), w.agent.cfg) == before
        Path(w.cfg.path).write_text(new + "[[rule\n")
        answer = await r.reload()
        assert not answer["ok"] and "not valid TOML" in answer["error"]
        assert (w.agent.fwd.classify, list(w.agent.anchors), w.agent.cfg) == before

        host.refuse = ""
        Path(w.cfg.path).write_text(new)
        answer = await r.reload()
        assert answer == {"ok": True, "changes": ["rule stream added", "rule video removed",
                                                  "anchor an2 removed"], "restart": []}
        assert host.applied == [[(0, "(80, 80)"), (2, "None")]]     # web keeps slot 0
        assert list(w.agent.anchors) == ["an1"] and "an2" not in schedule.entries
        assert [x.name for x in w.agent.cfg.rules] == ["web", "stream"]
        w.mh_tun.inject(pb.udp("100.64.0.1", CH, 5000, 6000, b"v"))
        await w.settle()
        assert [f["rule"] for f in w.agent.status()["flows"]] == ["stream"]
        assert (await r.reload())["changes"] == []          # the same file again
        await resolver.close()
    finally:
        await w.stop()
