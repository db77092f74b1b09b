"""Agent + anchor end to end over the in-memory seams (no root), on virtual time.

    MH (FakeTun, vipa_fix 100.64.0.1)
      wan1 10.1.0.2 --NAT-> 203.0.113.11 \
                                           >-- anchor(s) 203.0.113.1:5060 (FakeTun)
      wan2 10.2.0.2 --NAT-> 203.0.113.12 /     203.0.113.2:5060 (second anchor)

Every test runs on ``tests/vtime.py``'s loop: the agent's and the anchors' clock is the
loop's, which jumps to the next timer whenever nothing is ready, so waiting for
keepalives, probes and backoffs costs no wall time and no test depends on the machine's
speed. (``World`` still works on a real loop: ``test_handshake.py`` shares it.)
"""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path
from typing import Any

import pytest

from upmt_tun import keys
from upmt_tun.agent import Agent, IfaceSeam, UsageError, rule_classifier
from upmt_tun.anchor import Anchor
from upmt_tun.config import load_agent_config, load_anchor_config
from upmt_tun.dataplane.io import FakeNetwork, FakeTun
from upmt_tun.dataplane.packet import HEADER_LEN
from upmt_tun.link import Settled

from . import pktbuild as pb

pytestmark = pytest.mark.virtual_time

CH = "198.51.100.7"


keypair = keys.keypair


def _write(tmp: Path, name: str, text: str) -> str:
    p = tmp / name
    p.write_text(textwrap.dedent(text))
    return str(p)


class World:
    """Two-interface MH behind two NATs, one or two anchors, all in memory."""

    def __init__(self, tmp: Path, anchors: int = 1, rules: str = "", anchor_extra: str = ""
                 ) -> None:
        loop = asyncio.get_running_loop()
        self.offset = 0.0     # tests move time forward (rekeying) by raising this

        def clock() -> float:
            return loop.time() + self.offset

        self.net = FakeNetwork(schedule=loop.call_soon)
        self.net.nat("10.1.0.2", "203.0.113.11")
        self.net.nat("10.2.0.2", "203.0.113.12")
        self.mh_key = keypair()
        self.an_keys = [keypair() for _ in range(anchors)]
        anchor_toml = "".join(
            f'[[anchor]]\nname = "an{i + 1}"\naddress = "203.0.113.{i + 1}:5060"\n'
            f'public_key = "{self.an_keys[i][1]}"\n'
            for i in range(anchors))
        text = f'private_key = "{self.mh_key[0]}"\n' + textwrap.dedent("""
            name = "laptop"
            keepalive = 1
            [[interface]]
            name = "wan1"
            [[interface]]
            name = "wan2"
            """) + anchor_toml + textwrap.dedent(rules)
        self.cfg = load_agent_config(_write(tmp, "agent.toml", text))
        self.anchors: list[Anchor] = []
        self.an_tuns: list[FakeTun] = []
        self.anchor_cfgs = []
        self.clock = clock
        for i in range(anchors):
            acfg = load_anchor_config(_write(tmp, f"anchor{i}.toml", f"""
                listen = "203.0.113.{i + 1}:5060"
                vipa_pool = "100.100.0.0/16"
                nat_interface = "eth0"
                private_key = "{self.an_keys[i][0]}"
                {anchor_extra}
                [[peer]]
                name = "laptop"
                public_key = "{self.mh_key[1]}"
                """))
            self.anchor_cfgs.append(acfg)
            tun = FakeTun()
            self.an_tuns.append(tun)
            self.anchors.append(Anchor(acfg, tun=tun, clock=clock,
                                       path=self.net.socket(f"203.0.113.{i + 1}", 5060)))
        self.mh_tun = FakeTun()
        self.s1 = self.net.socket("10.1.0.2")
        self.s2 = self.net.socket("10.2.0.2")
        self.agent = Agent(self.cfg, tun=self.mh_tun,
                           ifaces=[IfaceSeam("wan1", 0, self.s1), IfaceSeam("wan2", 1, self.s2)],
                           anchors={f"an{i + 1}": (f"203.0.113.{i + 1}", 5060)
                                    for i in range(anchors)},
                           classify_flow=rule_classifier(self.cfg.rules, None, self.cfg.fwmark),
                           clock=clock)

    async def start(self) -> None:
        for a in self.anchors:
            await a.start()
        await self.agent.start()
        await asyncio.wait_for(self.agent.wait_ready(), 10)

    async def stop(self) -> None:
        await self.agent.stop()
        for a in self.anchors:
            await a.stop()

    async def kill_anchor(self, i: int = 0) -> None:
        """The anchor process dies: its socket and TUN go, nothing else is told."""
        await self.anchors[i].stop()

    async def start_anchor(self, i: int = 0) -> Anchor:
        """A new anchor process with the same config and the same lease store."""
        old = self.anchors[i]
        tun = FakeTun()
        new = Anchor(self.anchor_cfgs[i], tun=tun, clock=self.clock,
                     path=self.net.socket(f"203.0.113.{i + 1}", 5060))
        new.sig.use_leases(old.sig.leases, peers=["laptop"], max_age=86400.0)
        self.anchors[i], self.an_tuns[i] = new, tun
        await new.start()
        return new

    async def settle(self) -> None:
        for _ in range(5):
            await asyncio.sleep(0)


RULES = """
    [[rule]]
    name = "web"
    protocol = "tcp"
    dst_port = 80
    via = ["wan1", "wan2"]
    [[rule]]
    name = "video"
    protocol = "udp"
    via = ["wan2", "wan1"]
    """


async def test_association_tunnels_and_status(tmp_path: Path) -> None:
    w = World(tmp_path, rules=RULES)
    await w.start()
    try:
        st = w.agent.status()
        assert [t["state"] for t in st["tunnels"]] == ["up", "up"]
        assert {t["interface"] for t in st["tunnels"]} == {"wan1", "wan2"}
        vipa = st["anchors"][0]["vipa"]
        assert vipa == "100.100.0.2"  # first host is the anchor TUN's own address
        assert all(t["vipa"] == vipa for t in st["tunnels"])
        an = w.anchors[0].status()
        (assoc,) = an["associations"]
        assert assoc["mh"] == "laptop" and assoc["vipa"] == vipa
        # the anchor learned each tunnel's NATed address, not the private one
        assert sorted(t["remote"].split(":")[0] for t in assoc["tunnels"]) == [
            "203.0.113.11", "203.0.113.12"]
    finally:
        await w.stop()


async def test_uplink_nat_downlink_and_rules(tmp_path: Path) -> None:
    w = World(tmp_path, rules=RULES)
    await w.start()
    try:
        vipa = w.agent.status()["anchors"][0]["vipa"]
        up = pb.tcp("100.64.0.1", CH, 40000, 80, b"GET / HTTP/1.0\r\n\r\n")
        w.mh_tun.inject(up)
        await w.settle()
        (got,) = w.an_tuns[0].written
        assert got[12:16] == pb.ip(vipa) and got[16:20] == pb.ip(CH)
        assert pb.checksums_ok(got)
        assert got[40:] == up[40:]                       # payload intact
        # downlink from the Internet to the VIpA comes back NATed to vipa_fix
        w.an_tuns[0].inject(pb.tcp(CH, vipa, 80, 40000, b"HTTP/1.0 200 OK\r\n"))
        await w.settle()
        (down,) = w.mh_tun.written
        assert down[16:20] == pb.ip("100.64.0.1") and pb.checksums_ok(down)
        flows = w.agent.status()["flows"]
        assert [(f["rule"], f["interface"], f["tx_packets"], f["rx_packets"]) for f in flows] == [
            ("web", "wan1", 1, 1)]
        # a UDP flow follows its own rule's preference: wan2 first
        w.mh_tun.inject(pb.udp("100.64.0.1", CH, 5000, 6000, b"x" * 100))
        await w.settle()
        flows = {f["rule"]: f for f in w.agent.status()["flows"]}
        assert flows["video"]["interface"] == "wan2"
        an_flows = w.anchors[0].status()["flows"]
        assert {f["interface"] for f in an_flows} == {"wan1", "wan2"}
    finally:
        await w.stop()


async def test_implicit_handover_moves_the_downlink(tmp_path: Path) -> None:
    w = World(tmp_path, rules=RULES)
    await w.start()
    try:
        vipa = w.agent.status()["anchors"][0]["vipa"]
        w.mh_tun.inject(pb.tcp("100.64.0.1", CH, 40000, 80, b"a"))
        await w.settle()
        # the MH moves the flow to wan2 simply by sending on wan2's tunnel
        fwd = w.agent.fwd
        (flow,) = fwd.paft.flows()
        flow.move(0.0, fwd.by_path[("wan2", "an1")].tid, "test")
        w.mh_tun.inject(pb.tcp("100.64.0.1", CH, 40000, 80, b"b"))
        await w.settle()
        (an_flow,) = w.anchors[0].status()["flows"]
        assert an_flow["interface"] == "wan2"
        assert an_flow["history"][-1]["reason"] == "implicit handover"
        before = w.net.delivered
        w.an_tuns[0].inject(pb.tcp(CH, vipa, 80, 40000, b"reply"))
        await w.settle()
        assert w.net.delivered == before + 1
        tunnels = {t["interface"]: t for t in w.agent.status()["tunnels"]}
        assert tunnels["wan2"]["rx_packets"] == 1 and tunnels["wan1"]["rx_packets"] == 0
    finally:
        await w.stop()


async def test_failover_when_a_tunnel_goes_down(tmp_path: Path) -> None:
    w = World(tmp_path, rules=RULES)
    await w.start()
    try:
        w.mh_tun.inject(pb.tcp("100.64.0.1", CH, 40000, 80, b"a"))
        await w.settle()
        fwd = w.agent.fwd
        fwd.tunnel_down(fwd.by_path[("wan1", "an1")])
        w.mh_tun.inject(pb.tcp("100.64.0.1", CH, 40000, 80, b"b"))
        await w.settle()
        (f,) = w.agent.status()["flows"]
        assert f["interface"] == "wan2" and f["history"][-1]["reason"] == "tunnel down"
        assert len(w.an_tuns[0].written) == 2
        # no usable tunnel at all: dropped and counted, never sent anywhere else
        fwd.tunnel_down(fwd.by_path[("wan2", "an1")])
        sent = w.net.delivered
        w.mh_tun.inject(pb.tcp("100.64.0.1", CH, 40000, 80, b"c"))
        await w.settle()
        assert w.net.delivered == sent and fwd.drops["no_tunnel"] == 1
    finally:
        await w.stop()


async def test_two_anchors_same_vipa_rule_picks_anchor(tmp_path: Path) -> None:
    rules = """
        [[rule]]
        name = "a"
        protocol = "tcp"
        dst_port = 80
        anchor = "an1"
        [[rule]]
        name = "b"
        protocol = "tcp"
        dst_port = 443
        anchor = "an2"
        """
    w = World(tmp_path, anchors=2, rules=rules)
    await w.start()
    try:
        st = w.agent.status()
        vipas = {a["name"]: a["vipa"] for a in st["anchors"]}
        assert vipas["an1"] == vipas["an2"] == "100.100.0.2"  # per-association unique only
        assert len(st["tunnels"]) == 4 and all(t["state"] == "up" for t in st["tunnels"])
        w.mh_tun.inject(pb.tcp("100.64.0.1", CH, 40000, 80, b"1"))
        w.mh_tun.inject(pb.tcp("100.64.0.1", CH, 40001, 443, b"2"))
        await w.settle()
        assert len(w.an_tuns[0].written) == 1 and len(w.an_tuns[1].written) == 1
        assert w.an_tuns[1].written[0][22:24] == (443).to_bytes(2, "big")
        # each anchor's downlink reaches the MH and is NATed back to vipa_fix
        w.an_tuns[1].inject(pb.tcp(CH, "100.100.0.2", 443, 40001, b"r"))
        await w.settle()
        (down,) = w.mh_tun.written
        assert down[16:20] == pb.ip("100.64.0.1") and pb.checksums_ok(down)
    finally:
        await w.stop()


async def test_garbage_is_counted_never_raises(tmp_path: Path) -> None:
    w = World(tmp_path, rules=RULES)
    await w.start()
    try:
        atk = w.net.socket("203.0.113.66")
        before = len(w.anchors[0].fwd.by_mh)
        for junk in (b"", b"\x00", b"\x80" * 40, b"\xff" * 3, b"INVITE nonsense",
                     b"MESSAGE sip:x SIP/2.0\r\nVia: x\r\n\r\n", bytes(range(256)),
                     b"\x80\0\0\0" + (1).to_bytes(4, "big") + bytes(8) + b"\x45" + bytes(30)):
            atk.sendto(junk, ("203.0.113.1", 5060))
        await w.settle()
        assert len(w.anchors[0].fwd.by_mh) == before
        assert not w.an_tuns[0].written
        st = w.anchors[0].status()
        assert sum(st["drops"].values()) + sum(st["signalling"].values()) > 0
        # and the MH side survives junk from its anchor's address too
        w.mh_tun.inject(b"\x60" + bytes(39))   # a broken IPv6 header (hop-by-hop cut off)
        assert w.agent.fwd.drops["bad_ipv6"] == 1
        w.mh_tun.inject(b"\x50" + bytes(39))   # neither IPv4 nor IPv6
        assert w.agent.fwd.drops["not_ipv4"] == 1
        assert HEADER_LEN == 16
    finally:
        await w.stop()


@pytest.mark.parametrize("n", [1])
async def test_anchor_refusal_is_logged_and_ready_still_comes(tmp_path: Path, n: int,
                                                              caplog: pytest.LogCaptureFixture
                                                              ) -> None:
    w = World(tmp_path, rules=RULES)
    w.anchors[0].sig.max_associations = 0
    await w.start()   # ready arrives although the anchor refuses
    try:
        assert w.agent.status()["anchors"][0]["state"] == "refused"
        assert any("refused association" in r.message for r in caplog.records)
    finally:
        await w.stop()


async def test_agent_reassociates_when_the_anchor_forgets_it(tmp_path: Path) -> None:
    """An anchor restart loses every association: the next keepalive is answered
    'not registered', the agent associates again and sets its tunnels up again."""
    w = World(tmp_path, rules=RULES)
    await w.start()
    try:
        fwd = w.anchors[0].fwd
        (assoc,) = fwd.by_mh.values()
        fwd.remove_association(assoc)
        assert not fwd.by_mh and not fwd.tunnels.by_tid
        for _ in range(60):
            await asyncio.sleep(0.1)
            st = w.agent.status()
            if fwd.by_mh and len(fwd.tunnels.by_tid) == 2 and \
                    all(t["state"] == "up" for t in st["tunnels"]):
                break
        assert len(fwd.by_mh) == 1 and len(fwd.tunnels.by_tid) == 2
        assert st["anchors"][0]["state"] == "associated"
        w.mh_tun.inject(pb.tcp("100.64.0.1", CH, 40000, 80, b"again"))
        await w.settle()
        assert len(w.an_tuns[0].written) == 1
    finally:
        await w.stop()


@pytest.mark.parametrize("down_for", [1.0, 6.0])
async def test_anchor_restart_downlink_only_flow_resumes_at_once(tmp_path: Path,
                                                                down_for: float) -> None:
    """Issue 13: the anchor process dies and a new one starts (same config, same lease
    store) while a server sends to the host, which sends nothing. The agent finds every
    tunnel silent, handshakes and associates again (the same VIpA) and announces its flows
    again, so the new anchor, which knew nothing of them, sends the downlink through the
    flow's own tunnel: it resumes within 1.5 s (virtual time) of the new anchor."""
    w = World(tmp_path, rules=RULES)
    await w.start()
    loop = asyncio.get_running_loop()
    try:
        vipa = w.agent.status()["anchors"][0]["vipa"]
        w.mh_tun.inject(pb.udp("100.64.0.1", CH, 5000, 6000, b"hello"))   # its only packet
        await w.settle()

        def down() -> None:
            w.an_tuns[0].inject(pb.udp(CH, vipa, 6000, 5000, b"down"))

        for _ in range(100):                          # 1 s of downlink-only traffic
            down()
            await asyncio.sleep(0.01)
        assert len(w.mh_tun.written) == 100
        await w.kill_anchor()
        for _ in range(int(down_for * 100)):          # the server goes on sending
            await asyncio.sleep(0.01)
        an = await w.start_anchor()
        back = loop.time()
        before = len(w.mh_tun.written)
        while len(w.mh_tun.written) == before and loop.time() - back < 10.0:
            down()
            await asyncio.sleep(0.01)
        resumed = loop.time() - back
        assert len(w.mh_tun.written) > before, "the downlink-only flow never resumed"
        assert resumed < 1.5, resumed
        # the new anchor learned the flow from the announcement (no uplink packet), on
        # the first tunnel back up, then on the rule's own (video: wan2 first) once that
        # one has been up return_after; the host kept its VIpA
        (flow,) = an.status()["flows"]
        assert (flow["dport"], flow["tx_packets"]) == (6000, 0)
        await asyncio.sleep(w.cfg.return_after_s + 2.0)     # wan2 back within 1 s, + 5 s
        (flow,) = an.status()["flows"]
        assert flow["interface"] == "wan2" and flow["tx_packets"] == 0
        assert w.agent.status()["anchors"][0]["vipa"] == vipa
        assert an.fwd.by_mh["laptop"].vipa == vipa
    finally:
        await w.stop()


async def test_a_tunnel_settled_at_its_deadline_gets_its_flows_back(tmp_path: Path) -> None:
    """The timer task runs a link for its deadline, which the clock may not quite have
    reached (float rounding, timer resolution): the link finds its tunnel up for
    return_after and says Settled (once); the agent must measure at that same instant,
    or the flows preferring it would never come back."""
    w = World(tmp_path, rules=RULES)
    await w.start()
    try:
        fwd = w.agent.fwd
        w.mh_tun.inject(pb.udp("100.64.0.1", CH, 5000, 6000, b"x"))   # video: wan2 first
        await w.settle()
        (flow,) = fwd.paft.flows()
        wan1, wan2 = fwd.by_path[("wan1", "an1")], fwd.by_path[("wan2", "an1")]
        flow.move(w.clock(), wan1.tid, "test")
        link = w.agent.links[("wan2", "an1")]
        assert link.monitor is not None
        at = w.clock() + 1e-9                 # the deadline, a hair ahead of the clock
        link.monitor.started = at - w.cfg.return_after_s
        w.agent._do([Settled(wan2)], at)      # noqa: SLF001 (what the timer task does)
        assert flow.tunnel == wan2.tid
    finally:
        await w.stop()


async def test_stop_right_after_an_event_ends(tmp_path: Path) -> None:
    """An event kicks the timer task and the agent stops in the same loop turn: the
    cancellation must not be lost (Python 3.11's wait_for swallows it then)."""
    w = World(tmp_path, rules=RULES)
    await w.start()
    w.agent._kick.set()                      # noqa: SLF001 (what every link action does)
    await asyncio.wait_for(w.stop(), 5.0)


async def test_rekey_drops_nothing_and_old_session_still_opens(tmp_path: Path) -> None:
    """After REKEY_AFTER the agent makes a new handshake on its next keepalive; packets keep
    flowing both ways across the change and late packets sealed with the old keys open."""
    w = World(tmp_path, rules=RULES)
    await w.start()
    try:
        vipa = w.agent.status()["anchors"][0]["vipa"]
        link = w.agent.fwd.links["an1"]
        old = link.session
        assert old is not None
        late = old.seal(0x80, pb.udp(vipa, CH, 5000, 6000, b"late"))   # sealed, held back
        sent = 0
        w.offset += 125.0                        # past REKEY_AFTER (120 s)
        for _ in range(300):                     # keepalive = 1 s: a rekey within ~1 s
            w.mh_tun.inject(pb.udp("100.64.0.1", CH, 5000, 6000, b"%d" % sent))
            sent += 1
            w.an_tuns[0].inject(pb.udp(CH, vipa, 6000, 5000, b"down"))
            await asyncio.sleep(0.01)
            if link.session is not old and sent > 20:
                break
        assert link.session is not old, "no rekey happened"
        for _ in range(10):                      # a few more in the new session
            w.mh_tun.inject(pb.udp("100.64.0.1", CH, 5000, 6000, b"%d" % sent))
            w.an_tuns[0].inject(pb.udp(CH, vipa, 6000, 5000, b"down"))
            sent += 1
            await w.settle()
        an = w.anchors[0]
        assert an.fwd.by_mh["laptop"].session.local_index == link.session.remote_index
        assert len(w.an_tuns[0].written) == sent                   # no uplink packet lost
        assert len(w.mh_tun.written) == sent                       # nor any downlink one
        before = len(w.an_tuns[0].written)
        an._on_datagram(late, w.net.mappings[w.s1.local])         # a late old-session packet
        assert len(w.an_tuns[0].written) == before + 1
    finally:
        await w.stop()


async def test_move_rule_and_flow_the_anchor_follows(tmp_path: Path) -> None:
    w = World(tmp_path, rules=RULES)
    await w.start()
    try:
        vipa = w.agent.status()["anchors"][0]["vipa"]
        w.mh_tun.inject(pb.tcp("100.64.0.1", CH, 40000, 80, b"a"))
        w.mh_tun.inject(pb.tcp("100.64.0.1", CH, 40001, 80, b"b"))
        await w.settle()
        assert {f["interface"] for f in w.agent.status()["flows"]} == {"wan1"}
        assert w.agent.move(rule="web", via="wan2") == 2
        for sport in (40000, 40001, 40002):          # existing flows and a new one
            w.mh_tun.inject(pb.tcp("100.64.0.1", CH, sport, 80, b"c"))
        await w.settle()
        flows = w.agent.status()["flows"]
        assert {f["interface"] for f in flows} == {"wan2"} and len(flows) == 3
        assert flows[0]["history"][-1]["reason"] == "operator"
        assert {f["interface"] for f in w.anchors[0].status()["flows"]} == {"wan2"}
        before = {t["interface"]: t["rx_packets"] for t in w.agent.status()["tunnels"]}
        w.an_tuns[0].inject(pb.tcp(CH, vipa, 80, 40000, b"down"))   # downlink follows
        await w.settle()
        after = {t["interface"]: t["rx_packets"] for t in w.agent.status()["tunnels"]}
        assert after["wan2"] == before["wan2"] + 1 and after["wan1"] == before["wan1"]
        # one flow back to wan1
        fid = flows[0]["id"]
        assert w.agent.move(flow=fid, via="wan1") == 1
        w.mh_tun.inject(pb.tcp("100.64.0.1", CH, flows[0]["sport"], 80, b"d"))
        await w.settle()
        by_id = {f["id"]: f["interface"] for f in w.agent.status()["flows"]}
        assert by_id[fid] == "wan1"
        st = w.agent.status()        # the metrics' counters: 2 rule moves, 1 flow move
        assert st["handovers"] == {"operator": 3} and st["flows_created"] == 3
        # failover stays on: wan2 down -> rule's flows on wan1; back when wan2 returns
        fwd = w.agent.fwd
        t2 = fwd.by_path[("wan2", "an1")]
        fwd.tunnel_down(t2)
        w.mh_tun.inject(pb.tcp("100.64.0.1", CH, 40002, 80, b"e"))
        await w.settle()
        f3 = next(f for f in fwd.paft.flows() if f.key[3] == 40002)
        assert fwd.tunnels.get(f3.tunnel).interface == "wan1"
        fwd.tunnel_up(t2, t2.un_tid, 0.0)
        assert fwd.restore_preferences(0.0, lambda t: 4.9, 5.0) == []   # hysteresis
        assert len(fwd.restore_preferences(0.0, lambda t: 5.0, 5.0)) >= 1
        assert fwd.tunnels.get(f3.tunnel).interface == "wan2"
        assert f3.history[-1][3] == "preference restored"
        # bad names are usage errors
        for kw in ({"rule": "nope", "via": "wan1"}, {"rule": "web", "via": "eth9"},
                   {"flow": 999, "via": "wan1"}):
            with pytest.raises(UsageError):
                w.agent.move(**kw)  # type: ignore[arg-type]
    finally:
        await w.stop()


async def test_operator_moves_outlive_a_restart(tmp_path: Path) -> None:
    """What an agent stopped for a restart saves (AgentForwarder.choices, as JSON): a
    rule's move and a flow's own move; the next run applies them to the same flows when
    they show up again, and to the rule's new flows. A failover is not saved."""
    import json

    from upmt_tun.dataplane.forwarder import parse_choices

    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    w = World(tmp_path / "one", rules=RULES)
    await w.start()
    try:
        for sport in (40000, 40001):
            w.mh_tun.inject(pb.tcp("100.64.0.1", CH, sport, 80, b"a"))
        await w.settle()
        assert w.agent.move(rule="web", via="wan2") == 2
        fid = next(f["id"] for f in w.agent.status()["flows"] if f["sport"] == 40001)
        assert w.agent.move(flow=fid, via="wan1") == 1
        saved = json.loads(json.dumps(w.agent.fwd.choices()))
    finally:
        await w.stop()
    assert saved["rules"] == {"web": ["wan2", None]}
    assert [row[3:] for row in saved["flows"]] == [[40001, 80, "wan1"]]
    w = World(tmp_path / "two", rules=RULES)
    await w.start()
    try:
        w.agent.fwd.resume(*parse_choices(saved), w.agent.clock())
        for sport in (40000, 40001, 40002):
            w.mh_tun.inject(pb.tcp("100.64.0.1", CH, sport, 80, b"b"))
        await w.settle()
        by_port = {f["sport"]: f["interface"] for f in w.agent.status()["flows"]}
        assert by_port == {40000: "wan2", 40001: "wan1", 40002: "wan2"}
        assert w.agent.fwd.choices()["flows"] == saved["flows"]     # kept by the next one
    finally:
        await w.stop()
    for bad in ({}, {"rules": {}, "flows": [[6, "zz", "00", 1, 2, "wan1"]]},
                {"rules": {"web": ["wan2"]}, "flows": []},
                {"rules": {}, "flows": [[6, "0a000001", "0a000002", 70000, 2, "wan1"]]}):
        with pytest.raises(ValueError):
            parse_choices(bad)


async def test_downlink_only_flow_follows_a_signalled_handover(tmp_path: Path) -> None:
    """A flow that sends nothing upstream after a move (a download waiting for its data)
    gives the anchor nothing to learn from: the agent's HandoverReq moves its downlink."""
    w = World(tmp_path, rules=RULES)
    await w.start()
    try:
        vipa = w.agent.status()["anchors"][0]["vipa"]
        w.mh_tun.inject(pb.tcp("100.64.0.1", CH, 40000, 80, b"GET"))   # one uplink packet
        await w.settle()
        assert w.anchors[0].status()["flows"][0]["interface"] == "wan1"
        w.agent.on_link("wan1", False)                                 # wan1 loses carrier
        for _ in range(50):
            await asyncio.sleep(0.01)
            (an_flow,) = w.anchors[0].status()["flows"]
            if an_flow["interface"] == "wan2":
                break
        assert an_flow["interface"] == "wan2"                           # no uplink packet sent
        assert an_flow["history"][-1]["reason"] == "signalled handover"
        (flow,) = w.agent.status()["flows"]
        assert flow["interface"] == "wan2" and flow["history"][-1]["reason"] == "link down"
        w.net.down.add("10.1.0.2")                                      # wan1 really is dead
        w.an_tuns[0].inject(pb.tcp(CH, vipa, 80, 40000, b"data"))
        await w.settle()
        assert len(w.mh_tun.written) == 1                               # arrived via wan2
    finally:
        await w.stop()


async def test_nat_rebinding_is_followed_on_the_next_packet_not_the_next_keepalive(
        tmp_path: Path) -> None:
    """wan1's NAT forgets its mapping mid-flow: the next uplink packet arrives from a new
    public port; the anchor accepts it, challenges the new address, the agent answers, and
    the downlink follows within one round trip (keepalives are 1 s apart here)."""
    w = World(tmp_path, rules=RULES)
    await w.start()
    try:
        vipa = w.agent.status()["anchors"][0]["vipa"]
        w.mh_tun.inject(pb.tcp("100.64.0.1", CH, 40000, 80, b"GET"))
        await w.settle()
        (an_tunnel,) = [t for t in w.anchors[0].status()["associations"][0]["tunnels"]
                        if t["interface"] == "wan1"]
        before = an_tunnel["remote"]
        w.net.rebind_nat(("10.1.0.2", w.s1.local[1]))
        w.mh_tun.inject(pb.tcp("100.64.0.1", CH, 40000, 80, b"more"))
        await w.settle()
        assert len(w.an_tuns[0].written) == 2                       # accepted at once
        st = w.anchors[0].status()
        (an_tunnel,) = [t for t in st["associations"][0]["tunnels"] if t["interface"] == "wan1"]
        assert an_tunnel["remote"] != before and an_tunnel["state"] == "up"
        assert st["paths"] == {"rebind_seen": 1, "path_challenge_sent": 1, "path_rebound": 1}
        w.an_tuns[0].inject(pb.tcp(CH, vipa, 80, 40000, b"reply"))
        await w.settle()
        assert len(w.mh_tun.written) == 1                           # to the new mapping
    finally:
        await w.stop()


async def test_a_path_that_dies_silently_is_left_within_a_second(tmp_path: Path) -> None:
    """wan1 stops delivering anything, both ways, with no link event (a NAT or access
    network dying behind the interface): the probes stop coming back, the tunnel goes down
    and the flow moves to wan2 within a second; keepalives (1 s apart here, 2 needed)
    would take 2-4 s."""
    w = World(tmp_path, rules=RULES)
    await w.start()
    loop = asyncio.get_running_loop()
    try:
        async def stream() -> None:
            n = 0
            while True:
                w.mh_tun.inject(pb.tcp("100.64.0.1", CH, 40000, 80, b"%d" % n))
                n += 1
                await asyncio.sleep(0.02)

        sender = asyncio.create_task(stream())
        await asyncio.sleep(0.5)
        (flow,) = w.agent.status()["flows"]
        assert flow["interface"] == "wan1"
        (t1,) = [t for t in w.agent.status()["tunnels"] if t["interface"] == "wan1"]
        assert t1["probe"]["every_s"] == 0.1 and t1["rtt_ms"] is not None   # probed, busy
        w.net.down.add("10.1.0.2")
        t0 = loop.time()
        while loop.time() - t0 < 3.0:
            (flow,) = w.agent.status()["flows"]
            if flow["interface"] == "wan2":
                break
            await asyncio.sleep(0.01)
        moved_after = loop.time() - t0
        sender.cancel()
        assert flow["interface"] == "wan2", flow
        assert flow["history"][-1]["reason"] == "probe loss"
        assert flow["history"][-1]["from_interface"] == "wan1"
        assert moved_after < 1.0, moved_after
        states = {t["interface"]: t["state"] for t in w.agent.status()["tunnels"]}
        assert states == {"wan1": "down", "wan2": "up"}
        await asyncio.sleep(0.1)
        (an_flow,) = w.anchors[0].status()["flows"]
        assert an_flow["interface"] == "wan2"          # the downlink followed
    finally:
        await w.stop()


async def test_idle_tunnels_are_probed_rarely_and_busy_ones_often(tmp_path: Path) -> None:
    w = World(tmp_path, rules=RULES)
    await w.start()
    try:
        await asyncio.sleep(2.5)                  # no traffic at all since start
        every = {t["interface"]: t["probe"]["every_s"] for t in w.agent.status()["tunnels"]}
        assert all(v >= 1.0 for v in every.values()), every     # backed off
        w.mh_tun.inject(pb.tcp("100.64.0.1", CH, 40000, 80, b"x"))
        await asyncio.sleep(0.2)
        every = {t["interface"]: t["probe"]["every_s"] for t in w.agent.status()["tunnels"]}
        assert every["wan1"] == 0.1 and every["wan2"] >= 1.0, every   # only the busy one
        assert w.anchors[0].fwd.drops["unvalidated_path"] == 0
    finally:
        await w.stop()


async def test_links_are_removed_and_added_at_run_time(tmp_path: Path) -> None:
    """remove_link takes the tunnel down now (its flows move) and forgets it; add_link
    brings one up again through the same handshake, setup and validation."""
    w = World(tmp_path, rules=RULES)
    await w.start()
    try:
        w.mh_tun.inject(pb.tcp("100.64.0.1", CH, 40000, 80, b"a"))
        await w.settle()
        assert w.agent.status()["flows"][0]["interface"] == "wan1"
        w.agent.remove_link("wan1", "an1")
        st = w.agent.status()
        assert [t["interface"] for t in st["tunnels"]] == ["wan2"]
        (f,) = st["flows"]
        assert f["interface"] == "wan2" and f["history"][-1]["reason"] == "link removed"
        assert ("wan1", "an1") not in w.agent.links
        w.agent.remove_link("wan1", "an1")                        # twice: nothing happens
        with pytest.raises(UsageError):
            w.agent.add_link("eth9", "an1")
        link = w.agent.add_link("wan1", "an1")
        for _ in range(50):
            await asyncio.sleep(0.1)
            if link.state.value == "up":
                break
        st = w.agent.status()
        assert sorted((t["interface"], t["state"]) for t in st["tunnels"]) == [
            ("wan1", "up"), ("wan2", "up")]
        await asyncio.sleep(6.0)                          # up return_after: the flow returns
        (f,) = w.agent.status()["flows"]
        assert f["interface"] == "wan1" and f["history"][-1]["reason"] == "preference restored"
    finally:
        await w.stop()


async def test_new_flows_go_to_the_faster_anchor_existing_flows_stay(tmp_path: Path) -> None:
    """multiAN: the probe tick ranks the anchors by RTT; a rule without ``anchor`` sends new
    flows to the faster one (after HOME_HOLD), while a flow already on the slower one keeps
    its anchor (its public address must not change)."""
    w = World(tmp_path, anchors=2, rules=RULES)
    loop = asyncio.get_running_loop()
    send = w.net._send
    slow = {"203.0.113.2"}              # 40 ms each way to and from these anchors

    def delayed(src: Any, data: bytes, dst: tuple[str, int], size: int = 0) -> None:
        if dst[0] in slow or src.local[0] in slow:
            loop.call_later(0.04, send, src, data, dst, size)
        else:
            send(src, data, dst, size)

    w.net._send = delayed      # type: ignore[method-assign]
    await w.start()
    try:
        await asyncio.sleep(2)
        assert w.agent.fwd.anchor_order == ["an1", "an2"]
        w.mh_tun.inject(pb.tcp("100.64.0.1", CH, 40000, 80, b"old"))
        await w.settle()
        assert [f["anchor"] for f in w.agent.status()["flows"]] == ["an1"]
        slow.clear()
        slow.add("203.0.113.1")         # now an1 is the slow one
        await asyncio.sleep(1)
        assert w.agent.fwd.anchor_order[0] == "an1"      # not yet: HOME_HOLD
        await asyncio.sleep(20)         # smoothed RTTs cross (idle: a probe a second)
        assert w.agent.fwd.anchor_order[0] == "an2"
        w.mh_tun.inject(pb.tcp("100.64.0.1", CH, 40001, 80, b"new"))
        w.mh_tun.inject(pb.tcp("100.64.0.1", CH, 40000, 80, b"old again"))
        await asyncio.sleep(0.2)
        flows = {f["sport"]: f["anchor"] for f in w.agent.status()["flows"]}
        assert flows == {40000: "an1", 40001: "an2"}
        assert len(w.an_tuns[0].written) == 2 and len(w.an_tuns[1].written) == 1
    finally:
        await w.stop()


async def test_two_mesh_anchors_with_overlapping_pools_the_first_listed_wins(
        tmp_path: Path) -> None:
    """Both anchors are meshes with the same pool: one VIpA would name two hosts. The
    anchor listed first keeps its mesh even when the other associates first (that one's
    is then dropped), the other is refused with one line, status says so, and the pool
    is routed once."""
    w = World(tmp_path, anchors=2, anchor_extra="mesh = true")
    routed: list[str] = []
    w.agent.mesh_route = routed.append
    send = w.net._send
    hold = {"an1": True}

    def late_an1(src: Any, data: bytes, dst: tuple[str, int], size: int = 0) -> None:
        if hold["an1"] and "203.0.113.1" in (dst[0], src.local[0]):
            return                       # an1 answers nothing yet: an2 associates first
        send(src, data, dst, size)

    w.net._send = late_an1               # type: ignore[method-assign]
    await w.start()
    try:
        def mesh() -> dict[str, Any]:
            return {a["name"]: a.get("mesh") for a in w.agent.status()["anchors"]}

        for _ in range(40):
            if mesh()["an2"] is not None:
                break
            await asyncio.sleep(0.1)
        assert mesh() == {"an1": None, "an2": "100.100.0.0/16"}
        assert routed == ["100.100.0.0/16"]
        hold["an1"] = False              # an1 comes: listed first, it takes the pool
        for _ in range(100):
            if mesh()["an1"] is not None:
                break
            await asyncio.sleep(0.1)
        m = mesh()
        assert m["an1"] == "100.100.0.0/16", m
        assert m["an2"] == "refused: 100.100.0.0/16 overlaps anchor an1's 100.100.0.0/16"
        assert w.agent.mesh.anchor_of(pb.ip("100.100.0.9")) == "an1"
        assert routed == ["100.100.0.0/16"]          # the same pool: one route
        # an2 associating again (a restart of it) stays refused
        w.agent._mesh_pool("an2", "100.100.0.0/16")
        assert mesh()["an2"].startswith("refused") and mesh()["an1"] == "100.100.0.0/16"
        # an1 leaves the mesh: an2's pool is used again
        w.agent._mesh_pool("an1", None)
        assert mesh() == {"an1": None, "an2": "100.100.0.0/16"}
    finally:
        await w.stop()
