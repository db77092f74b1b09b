"""Two agents of one mesh anchor reach each other through it, sealed end to end (in memory,
on virtual time).

    laptop (vipa_fix 100.64.0.1)                         phone (vipa_fix 100.64.0.1)
      wan1 10.1.0.2 --NAT-> 203.0.113.11 \\              / 203.0.113.21 <-NAT-- 10.3.0.2 wan1
      wan2 10.2.0.2 --NAT-> 203.0.113.12 -->-- anchor --<
                                               203.0.113.1:5060, mesh = true
      tv (mesh = false) 10.4.0.2 --NAT-> 203.0.113.31 /

A packet from laptop to phone's VIpA (100.100.0.x) is looked up at the anchor (PeerReq),
the two agents run their own Noise IK session (laptop initiates, phone answers once the
anchor vouched for laptop's key at the relay's source VIpA) and every datagram travels
in a RELAY datagram: the anchor re-seals the hop and cannot read the inside.
"""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path
from typing import Any

import pytest

from upmt_tun import keys
from upmt_tun.agent import Agent, IfaceSeam, rule_classifier
from upmt_tun.anchor import Anchor
from upmt_tun.config import load_agent_config, load_anchor_config
from upmt_tun.dataplane.io import FakeNetwork, FakeSocket, FakeTun
from upmt_tun.dataplane.packet import TYPE_RELAY

from . import pktbuild as pb

pytestmark = pytest.mark.virtual_time

FIX = "100.64.0.1"
SECRET = b"only laptop and phone may read this " * 4


def _write(tmp: Path, name: str, text: str) -> str:
    p = tmp / name
    p.write_text(textwrap.dedent(text))
    return str(p)


class Host:
    """One agent: its TUN, its sockets (one per interface) and its config."""

    def __init__(self, world: MeshWorld, name: str, ifaces: list[tuple[str, str]],
                 rules: str = "", mesh: bool = True) -> None:
        self.name = name
        self.key = keys.keypair()
        self.ifaces = ifaces
        self.rules = rules
        self.mesh = mesh
        self.tun = FakeTun()
        self.socks: list[FakeSocket] = []
        for inside, public in ifaces:
            world.net.nat(inside, public)
            self.socks.append(world.net.socket(inside))
        self.agent: Agent | None = None

    def build(self, tmp: Path, an_pub: str, clock: Any, direct: bool) -> None:
        text = f'private_key = "{self.key[0]}"\nname = "{self.name}"\nkeepalive = 1\n' + \
            f"direct = {str(direct).lower()}\n" + \
            "".join(f'[[interface]]\nname = "wan{i + 1}"\n' for i in range(len(self.ifaces))) + \
            f'[[anchor]]\nname = "an1"\naddress = "203.0.113.1:5060"\npublic_key = "{an_pub}"\n' \
            + textwrap.dedent(self.rules)
        cfg = load_agent_config(_write(tmp, f"{self.name}.toml", text))
        self.agent = Agent(cfg, tun=self.tun,
                           ifaces=[IfaceSeam(f"wan{i + 1}", i, s)
                                   for i, s in enumerate(self.socks)],
                           anchors={"an1": ("203.0.113.1", 5060)},
                           classify_flow=rule_classifier(cfg.rules, None, cfg.fwmark),
                           clock=clock)

    @property
    def a(self) -> Agent:
        assert self.agent is not None
        return self.agent

    def vipa_b_unknown(self, other: Host) -> bool:
        """``other`` asked the anchor about this host and was told nobody is there."""
        return pb.ip(self.vipa) in other.a.mesh.unknown

    @property
    def vipa(self) -> str:
        v = self.a.status()["anchors"][0]["vipa"]
        assert isinstance(v, str)
        return v


class MeshWorld:
    def __init__(self, tmp: Path, laptop_rules: str = "", direct: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self.net = FakeNetwork(schedule=loop.call_soon)
        self.wire: list[bytes] = []                 # every datagram the network carried
        send = self.net._send

        def recording(src: FakeSocket, data: bytes, dst: tuple[str, int], size: int = 0
                      ) -> None:
            self.wire.append(bytes(data))
            send(src, data, dst, size)

        self.net._send = recording      # type: ignore[method-assign]
        self.an_key = keys.keypair()
        self.laptop = Host(self, "laptop", [("10.1.0.2", "203.0.113.11"),
                                            ("10.2.0.2", "203.0.113.12")], laptop_rules)
        self.phone = Host(self, "phone", [("10.3.0.2", "203.0.113.21")])
        self.tv = Host(self, "tv", [("10.4.0.2", "203.0.113.31")], mesh=False)
        self.hosts = [self.laptop, self.phone, self.tv]
        peers = "".join(f'[[peer]]\nname = "{h.name}"\npublic_key = "{h.key[1]}"\n'
                        + ("" if h.mesh else "mesh = false\n") for h in self.hosts)
        acfg = load_anchor_config(_write(tmp, "anchor.toml", textwrap.dedent(f"""
            listen = "203.0.113.1:5060"
            vipa_pool = "100.100.0.0/16"
            nat_interface = "eth0"
            private_key = "{self.an_key[0]}"
            mesh = true
            """) + peers))
        self.an_tun = FakeTun()
        self.anchor = Anchor(acfg, tun=self.an_tun, clock=loop.time,
                             path=self.net.socket("203.0.113.1", 5060))
        for h in self.hosts:
            h.build(tmp, self.an_key[1], loop.time, direct)

    async def start(self) -> None:
        await self.anchor.start()
        for h in self.hosts:
            await h.a.start()
            await asyncio.wait_for(h.a.wait_ready(), 10)

    async def stop(self) -> None:
        for h in self.hosts:
            await h.a.stop()
        await self.anchor.stop()

    async def until(self, cond: Any, seconds: float = 5.0) -> None:
        for _ in range(int(seconds / 0.05)):
            if cond():
                return
            await asyncio.sleep(0.05)
        assert cond()


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


async def _connect(w: MeshWorld, src: Host, dst: Host, sport: int = 5000) -> None:
    """``src`` sends to ``dst``'s VIpA until the packet arrives (the first ones wait for
    the lookup and the hosts' handshake)."""
    for _ in range(40):
        src.tun.inject(pb.udp(FIX, dst.vipa, sport, 7000, b"hello"))
        await asyncio.sleep(0.1)
        if dst.tun.written:
            return
    raise AssertionError(f"{src.name} never reached {dst.name}: {src.a.status()['drops']}")


async def test_two_agents_reach_each_other_through_the_anchor_sealed_end_to_end(tmp: Path
                                                                                  ) -> None:
    w = MeshWorld(tmp)
    await w.start()
    try:
        laptop, phone = w.laptop, w.phone
        assert laptop.vipa != phone.vipa
        await _connect(w, laptop, phone)
        got = phone.tun.written[-1]
        # phone sees laptop at laptop's VIpA of this anchor, itself at its vipa_fix
        assert got[12:16] == pb.ip(laptop.vipa) and got[16:20] == pb.ip(FIX)
        assert pb.checksums_ok(got)
        # a reply comes back the same way
        phone.tun.written.clear()
        laptop.tun.written.clear()
        w.wire.clear()
        phone.tun.inject(pb.udp(FIX, laptop.vipa, 7000, 5000, SECRET))
        laptop.tun.inject(pb.udp(FIX, phone.vipa, 5000, 7000, SECRET))
        await asyncio.sleep(0.1)
        (back,) = laptop.tun.written
        assert back[12:16] == pb.ip(phone.vipa) and back[16:20] == pb.ip(FIX)
        assert back[28:] == SECRET and pb.checksums_ok(back)
        (fwd,) = phone.tun.written
        assert fwd[28:] == SECRET
        # the anchor relayed (RELAY datagrams on the wire, none into its TUN) and could not
        # read: the payload is nowhere in clear on the wire
        assert len([d for d in w.wire if d[0] == TYPE_RELAY]) >= 4      # 2 up, 2 down
        assert not any(SECRET[:16] in d for d in w.wire)
        assert not w.an_tun.written
        an = w.anchor.status()
        relayed = {a["mh"]: a for a in an["associations"]}
        assert relayed["laptop"]["mesh"] and relayed["phone"]["mesh"]
        # status: the peer, its relay path, and the flow on it
        st = laptop.a.status()
        (peer,) = st["peers"]
        assert peer["name"] == "phone" and peer["anchor"] == "an1"
        assert peer["vipa"] == phone.vipa and peer["path"] == "relay"
        assert peer["interface"] == "wan1" and peer["remote"] == "203.0.113.1:5060"
        assert peer["state"] == "up"
        (flow,) = [f for f in st["flows"] if f.get("peer") == "phone"]
        assert flow["anchor"] == "an1" and flow["interface"] == "wan1"
        assert flow["tx_packets"] >= 2 and flow["rx_packets"] == 1
        (p2,) = phone.a.status()["peers"]
        assert p2["name"] == "laptop" and p2["vipa"] == laptop.vipa
        # the phone answered: it is the responder of the hosts' own handshake
        assert phone.a.mesh_links["laptop@an1"].role.value == "responder"
        await asyncio.sleep(3)        # probes over the relay measure the peer's RTT
        assert laptop.a.status()["peers"][0]["rtt_ms"] is not None
    finally:
        await w.stop()


async def test_a_host_outside_the_mesh_reaches_nobody(tmp: Path) -> None:
    w = MeshWorld(tmp)
    await w.start()
    try:
        tv, laptop, phone = w.tv, w.laptop, w.phone
        await _connect(w, laptop, phone)
        laptop.tun.written.clear()
        phone.tun.written.clear()
        # tv was told no mesh pool: a packet to laptop's VIpA is an ordinary flow to the
        # anchor (whose kernel drops it: the anchor's nft has no TUN -> TUN accept), and
        # never reaches laptop
        assert not tv.a.mesh.pools
        for _ in range(5):
            tv.tun.inject(pb.udp(FIX, laptop.vipa, 5000, 7000, b"let me in"))
            await asyncio.sleep(0.1)
        assert not laptop.tun.written and not phone.tun.written
        assert tv.a.status()["peers"] == []
        # laptop looking tv up hears "nobody" (tv is not in the mesh): its packets to tv's
        # VIpA are dropped and counted, never sent
        before = laptop.a.drops["mesh_peer_pending"]
        for _ in range(5):
            laptop.tun.inject(pb.udp(FIX, tv.vipa, 5000, 7000, b"hi tv"))
            await asyncio.sleep(0.1)
        assert not tv.tun.written and "tv@an1" not in laptop.a.mesh_links
        assert laptop.a.drops["mesh_peer_pending"] == before + 5
        assert tv.vipa_b_unknown(laptop)
    finally:
        await w.stop()


async def test_both_ends_at_once_and_the_rules_via(tmp: Path) -> None:
    """Both hosts start a flow to each other at the same moment (two initiators: the lower
    key keeps initiating); laptop's rule sends its UDP to phone via wan2, and when wan2's
    anchor tunnel goes down the flow moves to the relay path of wan1."""
    rules = """
        [[rule]]
        name = "udp"
        protocol = "udp"
        via = ["wan2", "wan1"]
        """
    w = MeshWorld(tmp, laptop_rules=rules)
    await w.start()
    try:
        laptop, phone = w.laptop, w.phone
        for _ in range(40):
            laptop.tun.inject(pb.udp(FIX, phone.vipa, 5000, 7000, b"a"))
            phone.tun.inject(pb.udp(FIX, laptop.vipa, 7001, 5001, b"b"))
            await asyncio.sleep(0.1)
            if laptop.tun.written and phone.tun.written:
                break
        assert laptop.tun.written and phone.tun.written
        roles = {laptop.a.mesh_links["phone@an1"].role.value,
                 phone.a.mesh_links["laptop@an1"].role.value}
        assert roles == {"initiator", "responder"}
        flows = [f for f in laptop.a.status()["flows"] if f.get("peer") == "phone"]
        assert {f["interface"] for f in flows} == {"wan2"}
        # wan2 goes down: its anchor tunnel and so its relay path; the flow moves to wan1
        laptop.a.on_link("wan2", False)
        phone.tun.written.clear()
        laptop.tun.inject(pb.udp(FIX, phone.vipa, 5000, 7000, b"still"))
        await asyncio.sleep(0.1)
        assert phone.tun.written and phone.tun.written[-1][28:] == b"still"
        (f,) = [f for f in laptop.a.status()["flows"]
                if f.get("peer") == "phone" and f["dport"] == 7000]
        assert f["interface"] == "wan1" and f["history"][-1]["reason"] == "relay down"
    finally:
        await w.stop()


# -- direct paths (ICE on the tunnel sockets, rendezvous over the relay) ---------------------
def _block_direct(w: MeshWorld) -> dict[str, bool]:
    """A switch that drops every datagram between the hosts themselves (not via the
    anchor): a NAT that lets nothing in, or a direct path that died."""
    blocked = {"on": False}
    send = w.net._send

    def maybe(src: FakeSocket, data: bytes, dst: tuple[str, int], size: int = 0) -> None:
        if blocked["on"] and "203.0.113.1" not in (dst[0], src.local[0]):
            return
        send(src, data, dst, size)

    w.net._send = maybe         # type: ignore[method-assign]
    return blocked


def _peer(h: Host) -> dict[str, Any]:
    (p,) = h.a.status()["peers"]
    assert isinstance(p, dict)
    return p


async def _stream(src: Host, dst: Host, n: int, every: float, port: int = 6000) -> int:
    """Send ``n`` UDP packets ``every`` seconds; how many arrived."""
    before = len(dst.tun.written)
    for k in range(n):
        src.tun.inject(pb.udp(FIX, dst.vipa, port, 7000, k.to_bytes(4, "big") * 250))
        await asyncio.sleep(every)
    await asyncio.sleep(0.1)
    return len(dst.tun.written) - before


async def test_direct_path_takes_over_and_the_relay_takes_it_back(tmp: Path) -> None:
    w = MeshWorld(tmp, direct=True)
    blocked = _block_direct(w)
    await w.start()
    try:
        laptop, phone = w.laptop, w.phone
        await _connect(w, laptop, phone)
        t0 = asyncio.get_running_loop().time()
        await w.until(lambda: _peer(laptop)["path"] == "direct"
                      and _peer(phone)["path"] == "direct")
        took = asyncio.get_running_loop().time() - t0
        assert took < 1.0, took
        p = _peer(laptop)
        assert p["ice"] == "selected" and p["remote"] != "203.0.113.1:5060"
        assert p["remote"].split(":")[0] in ("203.0.113.21", "10.3.0.2")
        # the flow moved (reason "direct path") and the anchor carries none of it now
        (f,) = [f for f in laptop.a.status()["flows"] if f.get("peer") == "phone"]
        assert f["history"][-1]["reason"] == "direct path"

        def relayed() -> int:
            return sum(a["relay_rx_bytes"] for a in w.anchor.status()["associations"])

        def relay_data() -> int:
            return sum(t["tx_bytes"] + t["rx_bytes"] for h in (laptop, phone)
                       for t in h.a.status()["tunnels"] if t["remote"].startswith("relay"))

        before, data_before = relayed(), relay_data()
        assert await _stream(laptop, phone, 20, 0.02, port=5000) == 20    # 20 kB each way
        assert await _stream(phone, laptop, 20, 0.02, port=7000) == 20
        assert relay_data() == data_before
        assert relayed() - before < 500       # the relay link's own probes, no data
        # the direct path dies: its probes notice within about a second of traffic, the
        # flows go back to the relay at once and keep arriving
        blocked["on"] = True
        got = await _stream(laptop, phone, 60, 0.05, port=5000)
        assert 40 <= got < 60, got
        assert _peer(laptop)["path"] == "relay"
        assert _peer(laptop)["why_relay"] == "direct path lost"
        (f,) = [f for f in laptop.a.status()["flows"] if f.get("peer") == "phone"]
        assert f["history"][-1]["reason"] == "direct path lost"
        assert relayed() > before
        # ICE tries again (backoff 5 s) and the flows come back to the direct path
        blocked["on"] = False
        await w.until(lambda: _peer(laptop)["path"] == "direct", 15)
        assert await _stream(laptop, phone, 10, 0.02, port=5000) == 10
    finally:
        await w.stop()


async def test_no_direct_path_keeps_the_relay_and_says_why(tmp: Path) -> None:
    """Nothing gets through between the hosts (as with a symmetric NAT on both sides):
    the checks fail, the flows stay relayed, status says so."""
    w = MeshWorld(tmp, direct=True)
    blocked = _block_direct(w)
    blocked["on"] = True
    await w.start()
    try:
        laptop, phone = w.laptop, w.phone
        await _connect(w, laptop, phone)
        await w.until(lambda: _peer(laptop)["ice"] == "failed", 15)
        p = _peer(laptop)
        assert p["path"] == "relay" and p["why_relay"] == "all checks failed"
        assert await _stream(laptop, phone, 10, 0.02) == 10
    finally:
        await w.stop()


async def test_direct_false_on_one_side_keeps_the_relay(tmp: Path) -> None:
    w = MeshWorld(tmp, direct=True)
    w.phone.build(tmp, w.an_key[1], asyncio.get_running_loop().time, False)
    await w.start()
    try:
        laptop, phone = w.laptop, w.phone
        await _connect(w, laptop, phone)
        await asyncio.sleep(2)
        p = _peer(laptop)
        assert p["path"] == "relay" and p["why_relay"] == "peer: 603 Decline"
        assert _peer(phone)["why_relay"] == "direct = false"
    finally:
        await w.stop()


async def test_the_first_packets_wait_for_the_relay_instead_of_being_lost(tmp: Path) -> None:
    """A new connection's first packet (a TCP SYN) is kept while the anchor is asked and the
    hosts handshake, then sent: the application does not wait for a retransmission."""
    w = MeshWorld(tmp)
    await w.start()
    try:
        laptop, phone = w.laptop, w.phone
        syn = pb.tcp(FIX, phone.vipa, 40000, 22, b"", flags=0x02)
        laptop.tun.inject(syn)
        laptop.tun.inject(pb.udp(FIX, phone.vipa, 5000, 7000, b"second"))
        await w.until(lambda: len(phone.tun.written) == 2, 1.0)
        assert phone.tun.written[0][33] == 0x02 and phone.tun.written[1][28:] == b"second"
        assert laptop.a.drops["mesh_peer_pending"] == 0
    finally:
        await w.stop()


async def test_reinvite_on_a_path_change_and_bye_on_stop(tmp: Path) -> None:
    """A changed mapping on the direct path's interface makes a new offer (ICE restart):
    the hosts select again and the flow is direct again; an agent that stops says BYE and
    the other drops the direct path at once (its flows go to the relay)."""
    w = MeshWorld(tmp, direct=True)
    await w.start()
    try:
        laptop, phone = w.laptop, w.phone
        await _connect(w, laptop, phone)
        await w.until(lambda: _peer(laptop)["path"] == "direct")
        ice = laptop.a.ice["phone@an1"]
        old = ice.checklist
        laptop.a.path_changed("wan1")
        assert ice.checklist is not old and ice.phase.value == "offering"
        await w.until(lambda: _peer(laptop)["path"] == "direct"
                      and _peer(phone)["path"] == "direct")
        assert await _stream(laptop, phone, 5, 0.02, port=5000) == 5
        # laptop stops: phone hears BYE over the relay and leaves the direct path
        await laptop.a.stop()
        await asyncio.sleep(0.1)
        p = _peer(phone)
        assert p["path"] == "relay" and p["why_relay"] == "peer said BYE"
        assert "laptop@an1" not in phone.a.fwd.direct_of
    finally:
        for h in (phone, w.tv):
            await h.a.stop()
        await w.anchor.stop()


# -- a direct path per interface ------------------------------------------------------------
def _flow(h: Host, dport: int) -> dict[str, Any]:
    (f,) = [f for f in h.a.status()["flows"] if f.get("peer") and f["dport"] == dport]
    assert isinstance(f, dict)
    return f


def _directs(h: Host) -> set[str]:
    """The interfaces with a direct path up to the (one) peer."""
    return {p["interface"] for p in _peer(h)["paths"]
            if p["path"] == "direct" and p["state"] == "up"}


def _direct_rx(h: Host, iface: str) -> int:
    """Bytes received on the direct paths of ``iface``."""
    return sum(t["rx_bytes"] for t in h.a.status()["tunnels"]
               if t["interface"] == iface and "~" in t["anchor"])


async def test_each_interface_gets_a_direct_path_and_a_moved_flow_stays_direct(tmp: Path
                                                                               ) -> None:
    """laptop has two access networks: once ICE selected a pair, each gets a direct path of
    its own (laptop opens the one of wan2, phone answers it: ICE saw laptop's checks from
    there). Moving laptop's flow to wan2 keeps it direct, phone's replies follow it to
    laptop's wan2, the anchor relays none of it; and back to wan1."""
    w = MeshWorld(tmp, direct=True)
    await w.start()
    try:
        laptop, phone = w.laptop, w.phone
        await _connect(w, laptop, phone)
        await w.until(lambda: _directs(laptop) == {"wan1", "wan2"}, 3)
        # phone: two direct paths on its one interface, to laptop's two NATs
        remotes = {p["remote"].split(":")[0] for p in _peer(phone)["paths"]
                   if p["path"] == "direct" and p["state"] == "up"}
        assert remotes == {"203.0.113.11", "203.0.113.12"}, _peer(phone)
        p = _peer(laptop)
        assert (p["path"], p["interface"]) == ("direct", "wan1")     # config order first
        assert len(laptop.a.fwd.direct_of["phone@an1"]) == 2

        def relayed() -> int:
            return sum(a["relay_rx_bytes"] for a in w.anchor.status()["associations"])

        async def both_ways(n: int) -> None:
            for _ in range(n):
                laptop.tun.inject(pb.udp(FIX, phone.vipa, 5000, 7000, b"u" * 500))
                phone.tun.inject(pb.udp(FIX, laptop.vipa, 7000, 5000, b"d" * 500))
                await asyncio.sleep(0.02)

        await both_ways(5)
        f = _flow(laptop, 7000)
        assert f["interface"] == "wan1" and f["history"][-1]["reason"] == "direct path"
        # laptop moves the flow to wan2: it stays direct, phone's answers follow
        r0, rx2 = relayed(), _direct_rx(laptop, "wan2")
        assert laptop.a.move(via="wan2", flow=f["id"]) == 1
        await both_ways(10)
        f = _flow(laptop, 7000)
        assert f["interface"] == "wan2" and f["history"][-1]["reason"] == "operator"
        assert _direct_rx(laptop, "wan2") - rx2 >= 9 * 528     # phone's packets came there
        assert _flow(phone, 5000)["history"][-1]["reason"] == "peer moved"
        assert relayed() - r0 < 500                            # relay-link probes only
        # and back
        rx1 = _direct_rx(laptop, "wan1")
        laptop.a.move(via="wan1", flow=f["id"])
        await both_ways(10)
        assert _flow(laptop, 7000)["interface"] == "wan1"
        assert _direct_rx(laptop, "wan1") - rx1 >= 9 * 528
        assert relayed() - r0 < 1000
        # wan2's direct path dies with its interface: a flow there goes to wan1's direct
        # path, not to the relay
        laptop.a.move(via="wan2", flow=f["id"])
        laptop.a.on_link("wan2", False)
        await both_ways(3)
        f = _flow(laptop, 7000)
        assert f["interface"] == "wan1" and _peer(laptop)["path"] == "direct"
        assert f["history"][-1]["reason"] in ("direct path lost", "link down"), f["history"]
        # wan2 back: an ICE restart gives it a direct path again
        laptop.a.on_link("wan2", True)
        await w.until(lambda: _directs(laptop) == {"wan1", "wan2"}, 5)
    finally:
        await w.stop()


async def test_a_rules_via_means_that_interface_direct_or_relayed(tmp: Path) -> None:
    """A rule's ``via`` names the interface: the direct path there if it has one, else the
    relay path there (not a direct path on another interface); without ``via`` the first
    direct path."""
    rules = """
        [[rule]]
        name = "udp"
        protocol = "udp"
        via = ["wan2", "wan1"]
        """
    w = MeshWorld(tmp, laptop_rules=rules, direct=True)
    send = w.net._send

    def no_wan2_direct(src: FakeSocket, data: bytes, dst: tuple[str, int],
                       size: int = 0) -> None:
        """wan2 reaches phone only through the anchor (its NAT lets nothing else by)."""
        if src.local[0] == "10.2.0.2" and dst[0] != "203.0.113.1" \
                or dst[0] == "203.0.113.12" and src.local[0] != "203.0.113.1":
            return
        send(src, data, dst, size)

    w.net._send = no_wan2_direct     # type: ignore[method-assign]
    await w.start()
    try:
        laptop, phone = w.laptop, w.phone
        await _connect(w, laptop, phone)
        await w.until(lambda: _peer(laptop)["path"] == "direct", 3)
        await asyncio.sleep(1.0)
        directs = {p["interface"] for p in _peer(laptop)["paths"]
                   if p["path"] == "direct" and p["state"] == "up"}
        assert directs == {"wan1"}
        laptop.tun.inject(pb.udp(FIX, phone.vipa, 5001, 7001, b"x"))
        tcp = pb.tcp(FIX, phone.vipa, 40000, 22, b"", flags=0x02)
        laptop.tun.inject(tcp)
        await asyncio.sleep(0.1)
        udp = _flow(laptop, 7001)
        assert udp["interface"] == "wan2"
        t = next(t for t in laptop.a.status()["tunnels"] if t["id"] == udp["tunnel"])
        assert t["remote"].startswith("relay")                  # wan2's relay path
        tcpf = _flow(laptop, 22)                                # no via: direct, wan1
        t = next(t for t in laptop.a.status()["tunnels"] if t["id"] == tcpf["tunnel"])
        assert tcpf["interface"] == "wan1" and "~" in t["anchor"]
    finally:
        await w.stop()


async def test_a_silent_death_sends_flows_to_the_relay_then_to_a_direct_path_that_answers(
        tmp: Path) -> None:
    """wan1's direct path dies silently (its NAT drops everything but the anchor's): the
    flow does not go to wan2's direct path blindly (the same cause could have cut it: it
    has not been heard from lately) but to the relay, and once wan2's direct path
    answers its probe the flow moves there."""
    w = MeshWorld(tmp, direct=True)
    send = w.net._send
    cut = {"on": False}

    def drop_wan1_direct(src: FakeSocket, data: bytes, dst: tuple[str, int],
                         size: int = 0) -> None:
        if cut["on"] and "203.0.113.1" not in (dst[0], src.local[0]) and (
                src.local[0] == "10.1.0.2" or dst[0] == "203.0.113.11"):
            return
        send(src, data, dst, size)

    w.net._send = drop_wan1_direct     # type: ignore[method-assign]
    await w.start()
    try:
        laptop, phone = w.laptop, w.phone
        await _connect(w, laptop, phone)
        await w.until(lambda: _directs(laptop) == {"wan1", "wan2"}, 3)
        cut["on"] = True
        for _ in range(60):
            laptop.tun.inject(pb.udp(FIX, phone.vipa, 5000, 7000, b"u" * 200))
            await asyncio.sleep(0.05)
        f = _flow(laptop, 7000)
        reasons = [h["reason"] for h in f["history"]]
        assert reasons[-2:] == ["direct path lost", "direct path"], reasons
        assert f["interface"] == "wan2" and _peer(laptop)["path"] == "direct"
        tunnels = {t["id"]: t for t in laptop.a.status()["tunnels"]}
        assert tunnels[f["history"][-2]["to"]]["remote"].startswith("relay")
    finally:
        await w.stop()


async def test_the_answering_end_offers_too_when_its_interface_changes(tmp: Path) -> None:
    """phone (the ICE controlled end: laptop opened the relay session) sees its address
    change: it makes the new offer itself; the hosts select again, the roles stay."""
    w = MeshWorld(tmp, direct=True)
    await w.start()
    try:
        laptop, phone = w.laptop, w.phone
        await _connect(w, laptop, phone)
        await w.until(lambda: _peer(laptop)["path"] == "direct")
        ice = phone.a.ice["laptop@an1"]
        assert ice.role.value == "controlled"
        old = ice.checklist
        phone.a.path_changed("wan1")
        assert ice.phase.value == "offering" and ice.checklist is not old
        await w.until(lambda: ice.phase.value == "selected"
                      and laptop.a.ice["phone@an1"].phase.value == "selected")
        assert laptop.a.ice["phone@an1"].role.value == "controlling"
        assert _peer(laptop)["path"] == "direct" and _peer(phone)["path"] == "direct"
        assert await _stream(laptop, phone, 5, 0.02, port=5000) == 5
    finally:
        await w.stop()
