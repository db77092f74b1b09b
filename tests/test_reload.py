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
from upmt_tun.agent import IfaceSeam, UsageError, rule_classifier
from upmt_tun.config import ConfigError, Peer, load_agent_config, load_anchor_config
from upmt_tun.reload import (
    AGENT_RESTART,
    IfaceSlots,
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
    assert set(AGENT_RESTART) | {"path", "rules", "anchors", "return_after_s",
                                 "interfaces"} == set(
        old.__dataclass_fields__)                  # every key is applied or says restart


def test_a_rule_via_an_interface_not_in_use_is_refused(tmp_path: Path) -> None:
    old = agent_cfg(tmp_path, rule("web", 80), name="o")
    new = agent_cfg(tmp_path, rule("web", 80, '["wan2"]'), name="n")
    with pytest.raises(ReloadRefused, match="via interface 'wan2' is neither kept nor added"):
        plan_agent(old, new, start_slots(old.rules)[0], 1, {"wan1"})


def ifaces_cfg(tmp: Path, ifaces: list[tuple[str, str | None]], rules: str = "",
               name: str = "i"):
    body = "".join(f'[[interface]]\nname = "{n}"\n' + (f'gateway = "{g}"\n' if g else "")
                   for n, g in ifaces)
    p = tmp / f"{name}.toml"
    p.write_text(f'private_key = "{MH_PRIV}"\n' + body + textwrap.dedent("""
        [[anchor]]
        name = "an1"
        address = "192.0.2.1:5060"
        """) + f'public_key = "{AN_PUB}"\n' + textwrap.dedent(rules))
    return load_agent_config(str(p))


def test_interfaces_added_removed_and_gateway_edited(tmp_path: Path) -> None:
    """An added entry gets the next interface slot (its mark F+1+k and table T+1+k), a
    removed one's slot is never handed out again in this run, a kept one keeps its slot
    and a new gateway is an edit, not a restart."""
    old = ifaces_cfg(tmp_path, [("wan1", None), ("wan2", None)], name="o")
    new = ifaces_cfg(tmp_path, [("wan1", "10.0.0.9"), ("usb*", None)], name="n")
    running = IfaceSlots.start(["wan1", "wan2"])
    plan = plan_agent(old, new, {}, 0, running)
    assert [i.name for i in plan.ifaces_added] == ["usb*"]
    assert plan.ifaces_removed == ("wan2",)
    assert [(i.name, i.gateway) for i in plan.gateways] == [("wan1", "10.0.0.9")]
    assert plan.ifaces is not None and dict(plan.ifaces.slots) == {"wan1": 0, "usb*": 2}
    assert plan.ifaces.next == 3 and plan.ifaces_changed and plan.restart == ()
    assert plan.cfg.interfaces == new.interfaces
    assert plan.changes() == ["interface usb* added", "interface wan2 removed",
                              "interface wan1 gateway 10.0.0.9"]
    # wan2 back: a new slot, not its old one (packets marked F+2 may still be around)
    back = ifaces_cfg(tmp_path, [("wan1", "10.0.0.9"), ("usb*", None), ("wan2", None)],
                      name="b")
    again = plan_agent(new, back, {}, 0, plan.ifaces)
    assert again.ifaces is not None and again.ifaces.slots["wan2"] == 3
    assert again.ifaces.next == 4 and again.gateways == () and again.ifaces_removed == ()
    # nothing changed: no interface change at all
    same = plan_agent(back, back, {}, 0, again.ifaces)
    assert same.changes() == [] and not same.ifaces_changed and same.ifaces == again.ifaces


def test_a_rule_via_a_removed_interface_is_refused_via_an_added_one_is_not(
        tmp_path: Path) -> None:
    old = ifaces_cfg(tmp_path, [("wan1", None), ("wan2", None)], rule("web", 80), name="o")
    running = IfaceSlots.start(["wan1", "wan2"])
    with pytest.raises(ConfigError, match="'wan2' is not a configured"):     # the file
        ifaces_cfg(tmp_path, [("wan1", None)], rule("web", 80), name="g")
    gone = replace(ifaces_cfg(tmp_path, [("wan1", None)], name="g"), rules=old.rules)
    with pytest.raises(ReloadRefused, match="via interface 'wan2' is neither kept nor added"):
        plan_agent(old, gone, start_slots(old.rules)[0], 1, running)
    swapped = ifaces_cfg(tmp_path, [("wan1", None), ("wan3", None)],
                         rule("web", 80, '["wan3", "wan1"]'), name="s")
    plan = plan_agent(old, swapped, start_slots(old.rules)[0], 1, running)
    assert plan.ifaces_removed == ("wan2",) and plan.edited == ("web",)


def test_discovered_interfaces_change_only_at_a_restart(tmp_path: Path) -> None:
    """Started without [[interface]] (every interface with a default route): listing
    some needs a restart, and so does dropping the list; the running ones stay."""
    listed = ifaces_cfg(tmp_path, [("wan1", None)], name="l")
    found = replace(listed, interfaces=())
    running = IfaceSlots.start(["eth0"])
    plan = plan_agent(found, listed, {}, 0, running)
    assert plan.restart == ("interface",) and not plan.ifaces_changed
    assert plan.cfg.interfaces == ()
    back = plan_agent(listed, found, {}, 0, IfaceSlots.start(["wan1"]))
    assert back.restart == ("interface",) and back.cfg.interfaces == listed.interfaces


def test_no_interface_slot_left_is_refused(tmp_path: Path) -> None:
    old = ifaces_cfg(tmp_path, [("wan1", None)], name="o")
    new = ifaces_cfg(tmp_path, [("wan1", None), ("wan2", None)], name="n")
    with pytest.raises(ReloadRefused, match="no interface slot left"):
        plan_agent(old, new, {}, 0, IfaceSlots({"wan1": 0}, 0x10000))


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


def test_interfaces_script_replaces_output_and_prerouting_in_one_transaction() -> None:
    """Interfaces added or removed: chain prerouting (each socket port's mark) and the
    output chain's per-interface returns are replaced in the same script as the rules;
    the removed interface's mark is gone from both, the added one's is there."""
    host = AgentHost(tun="upmt0", vipa_fix="100.64.0.1", fwmark=0x5550, table=5550,
                     ifaces=[IfacePlan(0, "wan1", None, 4000), IfacePlan(1, "wan2", None, 4001)],
                     rules=[])
    host.tun_mtu = 1400
    plans = [host.ifaces[0], IfacePlan(2, "usb*", None, 4002, absent=True)]
    script = host.rules_script([], plans)
    lines = script.splitlines()
    assert lines.count("flush chain ip upmt_agent output") == 1
    assert lines.count("flush chain ip upmt_agent prerouting") == 1
    assert 'add rule ip upmt_agent prerouting iifname "wan1" udp dport 4000 meta mark set ' \
        '0x5551' in lines
    assert "add rule ip upmt_agent prerouting udp dport 4002 meta mark set 0x5553" in lines
    assert "add rule ip upmt_agent output meta mark and 0xffff == 0x5553 return" in lines
    assert "0x5552" not in script and "4001" not in script
    assert any("maxseg size set 1360" in line for line in lines)    # the TUN's clamp kept
    with pytest.raises(SystemSetupError, match="does not fit mark_mask"):
        host._check_iface(IfacePlan(0xFFFF, "wan9", None, 4009))


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
async def test_agent_removes_and_adds_an_interface_at_run_time(tmp_path: Path) -> None:
    """remove_iface: the flows on it move first (to the other interface: as on a link
    down), then its tunnels go and a move preference for it is forgotten; add_iface: a
    new socket index (never the removed one's), tunnels to every anchor, flows can be
    moved there and it carries them."""
    w = World(tmp_path, rules=RULES)
    await w.start()
    try:
        w.mh_tun.inject(pb.tcp("100.64.0.1", CH, 40000, 80, b"a"))      # web: wan1 first
        await w.settle()
        w.agent.move(via="wan2", rule="web")
        (f,) = w.agent.status()["flows"]
        assert f["interface"] == "wan2"
        seam = w.agent.remove_iface("wan2")
        assert seam is not None and seam.index == 1
        st = w.agent.status()
        assert [i["name"] for i in st["interfaces"]] == ["wan1"]
        assert {t["interface"] for t in st["tunnels"]} == {"wan1"}
        (f,) = st["flows"]
        assert f["interface"] == "wan1" and "web" not in w.agent.fwd.prefer
        w.mh_tun.inject(pb.tcp("100.64.0.1", CH, 40000, 80, b"b"))       # still flows
        await w.settle()
        assert w.agent.status()["flows"][0]["tx_packets"] == 2
        assert w.agent.remove_iface("wan2") is None                     # once
        with pytest.raises(UsageError):
            w.agent.move(via="wan2", rule="web")

        w.net.nat("10.3.0.2", "203.0.113.13")
        w.agent.add_iface(IfaceSeam("wan3", 2, w.net.socket("10.3.0.2")))
        w.agent.on_link("wan3", True, "test")
        for _ in range(50):
            await asyncio.sleep(0.1)
            if all(t["state"] == "up" for t in w.agent.status()["tunnels"]):
                break
        st = w.agent.status()
        assert sorted((t["interface"], t["state"]) for t in st["tunnels"]) == [
            ("wan1", "up"), ("wan3", "up")]
        assert w.agent.fwd.interfaces == ["wan1", "", "wan3"]    # index 1 stays unused
        assert w.agent.move(via="wan3", rule="web") == 1
        w.mh_tun.inject(pb.tcp("100.64.0.1", CH, 40000, 80, b"c"))
        await w.settle()
        (f,) = w.agent.status()["flows"]
        assert f["interface"] == "wan3" and f["tx_packets"] == 3
        with pytest.raises(UsageError, match="exists"):
            w.agent.add_iface(IfaceSeam("wan3", 3, w.net.socket("10.3.0.2")))
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
