"""IPv6 inside the tunnels (issue 14, items 2-3): config keys, rule matching, the nft
rulesets of both ends, and the in-memory end to end (no root).

    MH (FakeTun: vipa_fix 100.64.0.1, vipa6_fix fd55:504d:5400::1)
        -> anchor (vipa_pool 100.100.0.0/16, vipa6_pool fd64:6464::/112)
        -> correspondent 2001:db8:100::7 (and 198.51.100.7)
"""

from __future__ import annotations

import ipaddress
import textwrap
from pathlib import Path

import pytest

from upmt_tun import nat
from upmt_tun.config import (
    DEFAULT_VIPA6_FIX,
    ConfigError,
    Rule,
    load_agent_config,
    load_anchor_config,
)
from upmt_tun.system.agent_host import IfacePlan, RuleMatch, agent_ruleset
from upmt_tun.system.anchor_host import anchor_ruleset, egress_nets

from . import pktbuild as pb
from .test_config import AN_KEY, MINI_AGENT, PEER
from .test_e2e_memory import World
from .test_nat6 import ICMP6, TCP, UDP, echo6, ip6, l4_ok6, packet6, tcp6, udp6

CH6 = bytes(ipaddress.IPv6Address("2001:db8:100::7").packed)
FIX6 = ipaddress.IPv6Address(DEFAULT_VIPA6_FIX).packed
POOL6 = 'vipa6_pool = "fd64:6464::/112"'


def _agent(tmp: Path, text: str):  # type: ignore[no-untyped-def]
    p = tmp / "agent.toml"
    p.write_text(textwrap.dedent(text))
    return load_agent_config(str(p))


def _anchor(tmp: Path, text: str):  # type: ignore[no-untyped-def]
    p = tmp / "anchor.toml"
    p.write_text('listen = "0.0.0.0:5060"\nnat_interface = "eth0"\n' + AN_KEY + text + PEER)
    return load_anchor_config(str(p))


# -------------------------------------------------------------------------------- config


def test_config_keys(tmp_path: Path) -> None:
    cfg = _agent(tmp_path, MINI_AGENT)
    assert cfg.vipa6_fix == DEFAULT_VIPA6_FIX == "fd55:504d:5400::1"
    assert ipaddress.IPv6Address(cfg.vipa6_fix) in ipaddress.IPv6Network("fc00::/7")   # ULA
    assert _agent(tmp_path, 'vipa6_fix = ""\n' + MINI_AGENT).vipa6_fix == ""
    assert _agent(tmp_path, 'vipa6_fix = "FD00:0::5"\n' + MINI_AGENT).vipa6_fix == "fd00::5"
    for bad in ("fe80::1", "ff02::1", "::", "::1", "::ffff:1.2.3.4", "10.0.0.1", "nope"):
        with pytest.raises(ConfigError) as e:
            _agent(tmp_path, f'vipa6_fix = "{bad}"\n' + MINI_AGENT)
        assert "vipa6_fix" in str(e.value) and "\n" not in str(e.value)
    assert _anchor(tmp_path, "").vipa6_pool is None          # IPv4 only unless configured
    assert _anchor(tmp_path, POOL6 + "\n").vipa6_pool == ipaddress.IPv6Network("fd64:6464::/112")
    for bad in ('"fd64::1/64"', '"fe80::/64"', '"fd00::/127"', '"10.0.0.0/8"', "6"):
        with pytest.raises(ConfigError) as e:
            _anchor(tmp_path, f"vipa6_pool = {bad}\n")
        assert "vipa6_pool" in str(e.value)
    cfg = _anchor(tmp_path, 'deny_egress = ["::ffff:127.0.0.1", "2001:db8::/32"]\n')
    assert ipaddress.ip_network("2001:db8::/32") in cfg.deny_egress


def test_rules_match_by_family() -> None:
    web6 = Rule(0, "v6", "tcp", ipaddress.ip_network("2001:db8::/32"))
    web4 = Rule(1, "v4", "tcp", ipaddress.ip_network("198.51.100.0/24"))
    anyr = Rule(2, "any", "any")
    icmp = Rule(3, "icmp", "icmp")
    assert web6.matches(TCP, CH6, 1, 80) and not web6.matches(TCP, pb.ip("198.51.100.7"), 1, 80)
    assert web4.matches(TCP, pb.ip("198.51.100.7"), 1, 80) and not web4.matches(TCP, CH6, 1, 80)
    assert anyr.matches(UDP, CH6, 1, 2) and anyr.matches(UDP, pb.ip("1.2.3.4"), 1, 2)
    assert icmp.matches(1, pb.ip("1.2.3.4"), 0, 0) and icmp.matches(ICMP6, CH6, 0, 0)
    assert not icmp.matches(TCP, CH6, 0, 0)


# ------------------------------------------------------------------------ nft rulesets


def test_agent_ruleset6() -> None:
    rules = [RuleMatch(0, "tcp", "198.51.100.0/24", (80, 80), None, None, None),
             RuleMatch(1, "tcp", "2001:db8::/32", (443, 443), None, None, None),
             RuleMatch(2, "icmp", None, None, None, None, None)]
    ifaces = [IfacePlan(0, "wan1", None, 40000)]
    v6 = agent_ruleset(tun="upmt0", vipa_fix=DEFAULT_VIPA6_FIX, fwmark=0x5550, ifaces=ifaces,
                       rules=rules, tun_mtu=1420, family="ip6")
    assert v6.startswith("create table ip6 upmt_agent6\n")
    assert "snat to fd55:504d:5400::1" in v6
    assert "ip6 daddr 2001:db8::/32" in v6 and "198.51.100" not in v6   # v4 rule left out
    assert "meta l4proto ipv6-icmp" in v6
    lines = v6.splitlines()        # link-local and multicast return before any rule
    first_rule = next(i for i, ln in enumerate(lines) if "ct mark set" in ln)
    assert any("ip6 daddr { fe80::/10, ff00::/8 } return" in ln for ln in lines[:first_rule])
    assert any("ip6 saddr fe80::/10 return" in ln for ln in lines[:first_rule])
    assert "maxseg size > 1360 tcp option maxseg size set 1360" in v6  # 1420 - 40 - 20
    assert 'ct state != { established, related } counter name "unsolicited_from_tun" drop' \
        in v6 and "mesh_pools" not in v6
    v4 = agent_ruleset(tun="upmt0", vipa_fix="100.64.0.1", fwmark=0x5550, ifaces=ifaces,
                       rules=rules, tun_mtu=1420)
    assert "2001:db8" not in v4 and "ip daddr 198.51.100.0/24" in v4
    assert "meta l4proto icmp" in v4 and "maxseg size set 1380" in v4


def test_anchor_ruleset6_and_egress_normalisation() -> None:
    from upmt_tun.config import DEFAULT_DENY_EGRESS
    deny = tuple(map(str, DEFAULT_DENY_EGRESS))
    v6 = anchor_ruleset(tun="upmtan0", pool="fd64:6464::/112", mtu=1440, nat_interface="eth0",
                        deny_egress=deny, family="ip6")
    assert v6.startswith("create table ip6 upmt_anchor6\n")
    assert 'ip6 saddr fd64:6464::/112 oifname "eth0" masquerade' in v6
    assert "type ipv6_addr" in v6 and "ip6 saddr ct count over 4096" in v6
    assert "maxseg size > 1380" in v6
    deny_line = next(ln for ln in v6.splitlines() if "ip6 daddr" in ln and "drop" in ln)
    for net in ("::/127", "::ffff:0:0/96", "fc00::/7", "fe80::/9", "ff00::/8"):  # collapsed
        assert net in deny_line, net
    v4 = anchor_ruleset(tun="upmtan0", pool="100.100.0.0/16", mtu=1440, nat_interface="eth0",
                        deny_egress=deny)
    assert "fe80" not in v4 and "ip daddr { 0.0.0.0/8" in v4
    # normalised: a mapped address names its IPv4 network, an IPv4 network its mapped form
    assert egress_nets(("::ffff:127.0.0.1",), 4) == [ipaddress.ip_network("127.0.0.1/32")]
    assert egress_nets(("127.0.0.0/8",), 6) == [ipaddress.ip_network("::ffff:127.0.0.0/104")]
    assert egress_nets(("::FFFF:7F00:1/128",), 6) == [ipaddress.ip_network("::ffff:7f00:1/128")]
    allow = anchor_ruleset(tun="t", pool="fd64::/112", mtu=1440, nat_interface=None,
                           allow_egress=("10.0.0.0/8",), family="ip6")
    assert "ip6 daddr { ::ffff:a00:0/104 } accept" in allow     # ::ffff:10.0.0.0/104


# -------------------------------------------------------------- in-memory end to end


RULES6 = """
    [[rule]]
    name = "web6"
    protocol = "tcp"
    dst = "2001:db8::/32"
    via = ["wan2", "wan1"]
    """


async def test_ipv6_through_the_tunnel(tmp_path: Path) -> None:
    w = World(tmp_path, rules=RULES6, anchor_extra=POOL6)
    await w.start()
    try:
        st = w.agent.status()
        assert st["vipa6_fix"] == DEFAULT_VIPA6_FIX
        vipa6 = ipaddress.IPv6Address(st["anchors"][0]["vipa6"]).packed
        assert ipaddress.IPv6Address(vipa6) in ipaddress.IPv6Network("fd64:6464::/112")
        assert w.anchors[0].status()["associations"][0]["vipa6"] == str(
            ipaddress.IPv6Address(vipa6))
        # uplink: TCP from vipa6_fix, NATed to the VIpA, checksum valid, on its rule's wan2
        up = packet6("tcp", FIX6, CH6, 40000, 443, b"GET /")
        w.mh_tun.inject(bytes(up))
        await w.settle()
        (got,) = w.an_tuns[0].written
        assert got == packet6("tcp", vipa6, CH6, 40000, 443, b"GET /") and l4_ok6(got)
        (flow,) = w.agent.status()["flows"]
        assert (flow["rule"], flow["interface"]) == ("web6", "wan2")
        # downlink back to vipa6_fix
        w.an_tuns[0].inject(bytes(packet6("tcp", CH6, vipa6, 443, 40000, b"200")))
        await w.settle()
        (down,) = w.mh_tun.written
        assert down == packet6("tcp", CH6, FIX6, 443, 40000, b"200")
        # UDP and ICMPv6 echo of no rule go too (the default: first anchor)
        w.mh_tun.inject(bytes(packet6("udp", FIX6, CH6, 5000, 53, b"q")))
        w.mh_tun.inject(bytes(packet6("echo", FIX6, CH6, 7, 1, b"ping")))
        await w.settle()
        assert w.an_tuns[0].written[1:] == [packet6("udp", vipa6, CH6, 5000, 53, b"q"),
                                           packet6("echo", vipa6, CH6, 7, 1, b"ping")]
        # and IPv4 beside it, unchanged
        w.mh_tun.inject(pb.udp("100.64.0.1", "198.51.100.7", 5000, 53, b"q"))
        await w.settle()
        assert w.an_tuns[0].written[-1][12:16] == pb.ip(st["anchors"][0]["vipa"])
        # a Packet Too Big from the Internet about our packet reaches the host, NATed
        w.an_tuns[0].inject(nat.icmp6_error(got, 2, 0, 1280, CH6))
        await w.settle()
        back = w.mh_tun.written[-1]
        assert back[24:40] == FIX6 and back[40] == 2 and l4_ok6(back)
        assert back[48 + 8:48 + 24] == FIX6            # the quoted source, NATed back too
    finally:
        await w.stop()


async def test_ipv6_refusals_and_packet_too_big(tmp_path: Path) -> None:
    w = World(tmp_path, anchor_extra=POOL6)
    await w.start()
    try:
        fwd = w.agent.fwd
        vipa6 = fwd.links["an1"].vipa6_b
        # ND, RA, MLD and link-local never go into a tunnel
        ll = ipaddress.IPv6Address("fe80::1").packed
        rs = ip6(ll, ipaddress.IPv6Address("ff02::2").packed, ICMP6,
                 echo6(ll, ll, 133, 0, 0, b""))
        w.mh_tun.inject(bytes(rs))
        w.mh_tun.inject(bytes(packet6("udp", FIX6, ll, 1, 2, b"")))
        assert fwd.drops["ipv6_local"] == 2
        # another source than vipa6_fix
        w.mh_tun.inject(bytes(packet6("udp", CH6, CH6, 1, 2, b"")))
        assert fwd.drops["bad_source"] == 1
        # UDP checksum 0 is illegal in IPv6
        bad = packet6("udp", FIX6, CH6, 1, 2, b"x")
        bad[46:48] = b"\0\0"
        w.mh_tun.inject(bytes(bad))
        assert fwd.drops["bad_ipv6"] == 1
        # over the TUN MTU: an ICMPv6 Packet Too Big back into the TUN, nothing sent
        fwd.mtu = 1280
        big = packet6("udp", FIX6, CH6, 1, 2, b"z" * 1300)
        w.mh_tun.inject(bytes(big))
        await w.settle()
        ptb = w.mh_tun.written[-1]
        assert ptb[6] == ICMP6 and ptb[40] == 2 and int.from_bytes(ptb[44:48], "big") == 1280
        assert ptb[8:24] == FIX6 and ptb[24:40] == FIX6 and len(ptb) <= 1280 and l4_ok6(ptb)
        assert ptb[48:48 + 40] == big[:40]
        assert not w.an_tuns[0].written and fwd.drops["too_big"] == 1
        # the anchor: an inner IPv6 source that is not the host's VIpA is refused
        an = w.anchors[0].fwd
        (a,) = an.by_mh.values()
        assert a.vipa6_b == vipa6
        from upmt_tun.flowtable import uplink_key
        assert uplink_key(bytes(packet6("udp", CH6, CH6, 1, 2, b"")), a.vipa6_b) is None
        # an inner packet to the host's IPv6 VIpA from the wrong anchor tunnel's VIpA: the
        # agent drops what is not addressed to the VIpA of the tunnel's anchor
        w.an_tuns[0].inject(bytes(packet6("udp", CH6, CH6, 1, 2, b"")))
        await w.settle()
        assert an.drops["no_association"] == 1
    finally:
        await w.stop()


async def test_anchor_without_ipv6_pool_keeps_ipv4_only(tmp_path: Path) -> None:
    w = World(tmp_path)
    await w.start()
    try:
        assert w.agent.status()["anchors"][0]["vipa6"] is None
        w.mh_tun.inject(bytes(packet6("tcp", FIX6, CH6, 40000, 443, b"")))
        await w.settle()
        assert not w.an_tuns[0].written and w.agent.fwd.drops["no_tunnel"] == 1
        w.mh_tun.inject(pb.tcp("100.64.0.1", "198.51.100.7", 40000, 80, b""))
        await w.settle()
        assert len(w.an_tuns[0].written) == 1
    finally:
        await w.stop()


def test_builders_agree_with_nat6() -> None:
    """The test_nat6 builders used above give valid checksums (so the oracle is sound)."""
    for seg, proto in ((tcp6(FIX6, CH6, 1, 2, b"a"), TCP), (udp6(FIX6, CH6, 1, 2, b"a"), UDP)):
        assert l4_ok6(bytes(ip6(FIX6, CH6, proto, seg)))


async def test_ipv6_and_ipv4_downlink_only_flows_follow_a_signalled_handover(
        tmp_path: Path) -> None:
    """wan1 goes down: the agent announces both flows (HandoverReq), each under the VIpA
    of its family, and the anchor moves both downlinks to wan2 without an uplink packet."""
    import asyncio

    from .test_e2e_memory import RULES
    w = World(tmp_path, rules=RULES + RULES6.replace('["wan2", "wan1"]', '["wan1", "wan2"]'),
              anchor_extra=POOL6)
    await w.start()
    try:
        st = w.agent.status()
        vipa, vipa6 = st["anchors"][0]["vipa"], ipaddress.IPv6Address(
            st["anchors"][0]["vipa6"]).packed
        w.mh_tun.inject(bytes(packet6("tcp", FIX6, CH6, 40000, 443, b"GET")))
        w.mh_tun.inject(pb.tcp("100.64.0.1", "198.51.100.7", 40001, 80, b"GET"))
        await w.settle()
        assert {f["interface"] for f in w.anchors[0].status()["flows"]} == {"wan1"}
        w.agent.on_link("wan1", False)
        for _ in range(50):
            await asyncio.sleep(0.01)
            an_flows = w.anchors[0].status()["flows"]
            if {f["interface"] for f in an_flows} == {"wan2"}:
                break
        assert [f["interface"] for f in an_flows] == ["wan2", "wan2"]
        assert w.anchors[0].sig.stats["refused"] == 0
        w.net.down.add("10.1.0.2")
        w.an_tuns[0].inject(bytes(packet6("tcp", CH6, vipa6, 443, 40000, b"data")))
        w.an_tuns[0].inject(pb.tcp("198.51.100.7", vipa, 80, 40001, b"data"))
        await w.settle()
        assert len(w.mh_tun.written) == 2
    finally:
        await w.stop()


def test_conntrack_tuples_for_ipv6() -> None:
    """The agent reads an IPv6 flow's rule (ct mark) back as for IPv4: an IPv6 reply
    tuple (CTA_IP_V6_*, ICMPv6 echo reply for ICMPv6), and an IPv6 entry's source."""
    import socket

    from upmt_tun.system.conntrack import _attr, _attrs, parse_entry, reply_tuple
    t = _attrs(_attrs(reply_tuple(6, "2001:db8::7", "fd55:504d:5400::1", 443, 40000))[2])
    ips = _attrs(t[1])
    assert ips == {3: socket.inet_pton(socket.AF_INET6, "2001:db8::7"),
                   4: socket.inet_pton(socket.AF_INET6, "fd55:504d:5400::1")}
    icmp = _attrs(_attrs(_attrs(reply_tuple(58, "2001:db8::7", "fd55::1", 9, 0))[2])[2])
    assert icmp[7] == b"\x00\x09" and icmp[8] == b"\x81" and icmp[1] == b"\x3a"
    src = _attr(3, socket.inet_pton(socket.AF_INET6, "fd55:504d:5400::1"))
    entry = _attr(1, _attr(1, src, nested=True), nested=True)
    assert parse_entry(entry + _attr(8, (0x10100).to_bytes(4, "big"))) == (
        0x10100, "fd55:504d:5400::1")


def test_ipv6_is_never_a_mesh_address() -> None:
    """With a mesh anchor's pool known, an IPv6 destination is no mesh peer (the mesh
    carries IPv4): no lookup, no exception on the data path."""
    from upmt_tun.mesh import MeshDirectory
    m = MeshDirectory()
    m.pools["an1"] = ipaddress.IPv4Network("100.100.0.0/16")
    assert m.anchor_of(bytes([100, 100, 0, 9])) == "an1"
    assert m.anchor_of(CH6) is None and m.want(CH6, 0.0) is None


async def test_an_icmpv6_error_from_the_host_goes_out_natted(tmp_path: Path) -> None:
    """The host answers a datagram with Destination Unreachable (port): the error leaves
    from the IPv6 VIpA, its quote's destination NATed too, and the anchor accepts it
    (the quote names this host's VIpA: no spoofing)."""
    w = World(tmp_path, anchor_extra=POOL6)
    await w.start()
    try:
        vipa6 = w.agent.fwd.links["an1"].vipa6_b
        came = bytes(packet6("udp", CH6, FIX6, 53, 9999, b"hi"))
        w.mh_tun.inject(nat.icmp6_error(came, 1, 4, 0, FIX6))
        await w.settle()
        (got,) = w.an_tuns[0].written
        assert got == nat.icmp6_error(bytes(packet6("udp", CH6, vipa6, 53, 9999, b"hi")),
                                      1, 4, 0, vipa6)
        assert l4_ok6(got) and not w.anchors[0].fwd.drops
    finally:
        await w.stop()
