"""Pure parts of the system layer: nft scripts, sysctl keys, ctnetlink encoding."""

from __future__ import annotations

import socket
import struct

import pytest

from upmt_tun.system import SystemSetupError, nft
from upmt_tun.system.agent_host import AgentHost, IfacePlan, RuleMatch, agent_ruleset, rule_match
from upmt_tun.system.anchor_host import AnchorHost, anchor_ruleset
from upmt_tun.system.conntrack import _attr, _attrs, parse_entry, reply_tuple
from upmt_tun.system.sysctl import iface_key, sysctl_path


def rule(protocol: str = "any", **kw: object) -> RuleMatch:
    args: dict[str, object] = {
        "index": 0,
        "protocol": protocol,
        "dst": None,
        "dst_port": None,
        "src_port": None,
        "uid": None,
        "cgroup": None,
    }
    args.update(kw)
    return RuleMatch(**args)  # type: ignore[arg-type]


def test_rule_match_expressions() -> None:
    assert rule_match(rule()) == ""
    assert rule_match(rule(dst="198.51.100.7/24", uid=1000)) == (
        "ip daddr 198.51.100.0/24 meta skuid 1000"
    )
    assert rule_match(rule("tcp", dst_port=(443, 443), src_port=(1024, 2048))) == (
        "meta l4proto tcp th dport 443 th sport 1024-2048"
    )
    assert rule_match(rule("icmp")) == "meta l4proto icmp"


@pytest.mark.parametrize(
    "bad",
    [
        rule("icmp", dst_port=(1, 1)),
        rule("sctp"),
        rule(dst="not-a-net"),
        rule("udp", dst_port=(10, 5)),
        rule(cgroup="../etc"),
    ],
)
def test_rule_match_rejects(bad: RuleMatch) -> None:
    with pytest.raises(SystemSetupError):
        rule_match(bad)


def test_ports_with_protocol_any_match_tcp_and_udp_only() -> None:
    assert rule_match(rule("any", src_port=(1, 2))) == "meta l4proto { tcp, udp } th sport 1-2"


def test_agent_ruleset_exempts_tunnel_marks_before_any_rule() -> None:
    script = agent_ruleset(
        tun="upmt0",
        vipa_fix="100.64.0.1",
        fwmark=0x100,
        ifaces=[IfacePlan(0, "eth0", "10.0.0.1", 5000), IfacePlan(1, "wlan0", None, 5001)],
        rules=[rule(index=3, dst="203.0.113.0/24")],
        tun_mtu=1400,
    )
    lines = [line.strip() for line in script.splitlines()]
    assert lines[0] == "create table ip upmt_agent"
    exempt = lines.index("meta mark and 0xffff == 0x101 return")
    assert lines[exempt + 1] == "meta mark and 0xffff == 0x102 return"
    assert lines[exempt + 2] == (
        "ct state new ct mark and 0xffff != 0x100 ip daddr 203.0.113.0/24 ct mark set 0x40100"
    )
    # the packet mark is F alone: a rule index (here 4 << 16) never shows in it, where
    # other tools' routing rules (Tailscale's fwmark 0x80000/0xff0000) would read it
    assert lines[exempt + 3] == "ct mark and 0xffff == 0x100 meta mark set ct mark and 0xffff"
    assert 'iifname "wlan0" udp dport 5001 meta mark set 0x102' in lines
    assert ('iifname "upmt0" ct mark and 0xffff == 0x100 meta mark set ct mark and 0xffff'
            in lines)
    assert 'oifname "upmt0" snat to 100.64.0.1' in lines
    assert 'oifname "upmt0" tcp flags syn tcp option maxseg size set rt mtu' in lines


def test_agent_ruleset_drops_what_the_tunnel_brings_unasked() -> None:
    """Out of the TUN only replies (and ICMP errors about them) of connections this host
    opened: a compromised or misconfigured anchor cannot open one into the host. The drop
    comes before anything else about the TUN in prerouting (after conntrack)."""
    script = agent_ruleset(tun="upmt0", vipa_fix="100.64.0.1", fwmark=0x100,
                           ifaces=[IfacePlan(0, "eth0", None, 5000)], rules=[], tun_mtu=1400)
    lines = [line.strip() for line in script.splitlines()]
    assert "counter unsolicited_from_tun {" in lines
    drop = ('iifname "upmt0" ip saddr != @mesh_pools ct state != { established, related } '
            'counter name "unsolicited_from_tun" drop')
    chain = lines.index("chain prerouting {")
    tun_rules = [i for i, line in enumerate(lines) if line.startswith('iifname "upmt0"')]
    assert lines[tun_rules[0]] == drop and tun_rules[0] > chain
    assert lines[chain + 1].startswith("type filter hook prerouting priority mangle")


def test_agent_host_validates_marks_and_tables() -> None:
    ok = {"tun": "t", "vipa_fix": "100.64.0.1", "ifaces": [], "rules": []}
    with pytest.raises(SystemSetupError):
        AgentHost(fwmark=0xFFFF, table=1000, **ok)  # type: ignore[arg-type]
    with pytest.raises(SystemSetupError):
        AgentHost(fwmark=0x100, table=254, **ok)  # type: ignore[arg-type]
    with pytest.raises(SystemSetupError, match="mark_mask"):   # F+1 = 0x101 outside 0x1f0
        AgentHost(fwmark=0x100, table=1000, mark_mask=0x1F0, **ok)  # type: ignore[arg-type]
    with pytest.raises(SystemSetupError, match="mark_mask"):   # above the 16 bits of F
        AgentHost(fwmark=0x100, table=1000, mark_mask=0x1FFFF, **ok)  # type: ignore[arg-type]
    with pytest.raises(SystemSetupError, match="priority"):
        AgentHost(fwmark=0x100, table=1000, priority=32765, **ok)  # type: ignore[arg-type]


def test_mark_mask_and_priorities_are_the_configured_ones() -> None:
    """A narrower mask goes into the ruleset's packet marks and the ip rules; the rules
    use the configured priority P (tunnel sockets) and P+1 (steered traffic)."""
    iface = IfacePlan(0, "eth0", "10.0.0.1", 5000)
    script = agent_ruleset(tun="upmt0", vipa_fix="100.64.0.1", fwmark=0x100, ifaces=[iface],
                           rules=[rule(index=7)], mark_mask=0x3FF)
    assert "ct mark and 0xffff == 0x100 meta mark set ct mark and 0x3ff" in script
    assert "ct mark set 0x80100" in script        # the 8th rule: its index stays in the ct mark
    host = AgentHost(tun="t", vipa_fix="100.64.0.1", fwmark=0x100, table=1000, ifaces=[iface],
                     rules=[], mark_mask=0x3FF, priority=5100)
    got = {(r.priority, r.table, r.fwmark, r.fwmask) for r in host._routing_rules()}
    assert got == {(5100, 1001, 0x101, 0x3FF), (5101, 1000, 0x100, 0x3FF)}


def test_anchor_ruleset_and_role() -> None:
    script = anchor_ruleset(tun="upmt0", pool="100.64.1.0/24", mtu=1400, nat_interface=None)
    assert 'ip saddr 100.64.1.0/24 oifname != "upmt0" masquerade' in script
    assert "maxseg size > 1360 tcp option maxseg size set 1360" in script
    with pytest.raises(SystemSetupError):
        AnchorHost(
            tun="t",
            tun_address="100.64.1.1",
            pool_prefixlen=24,
            pool="100.64.1.0/24",
            mtu=1400,
            role="router",
            nat_interface=None,
        )


def _chain(script: str, name: str) -> list[str]:
    lines = [line.strip() for line in script.splitlines()]
    start = lines.index(f"chain {name} {{")
    return lines[start + 2:lines.index("}", start)]


INBOUND_DROP = ('oifname "upmt0" ct state != { established, related } '
                'counter name "unsolicited_inbound" drop')


def test_anchor_forwards_into_the_tunnels_only_replies() -> None:
    """Issue 17 (1): the pool is routable from the anchor's LAN; only what conntrack ties to
    a connection a host opened may enter the TUN, before any allow_egress accept (which
    could otherwise open the hosts to each other)."""
    script = anchor_ruleset(tun="upmt0", pool="100.64.1.0/24", mtu=1400, nat_interface="eth0",
                            allow_egress=("100.64.0.0/10",), deny_egress=("10.0.0.0/8",))
    egress = _chain(script, "egress")
    assert egress.index(INBOUND_DROP) < egress.index(
        'iifname "upmt0" ip daddr { 100.64.0.0/10 } accept')
    assert "counter unsolicited_inbound {" in script
    # the fixed host relays nothing, in either direction
    fixed = _chain(anchor_ruleset(tun="upmt0", pool="100.64.1.0/24", mtu=1400,
                                  nat_interface=None, role="fixed-host"), "egress")
    assert fixed == ['iifname "upmt0" drop', INBOUND_DROP]


def test_anchor_drops_untrackable_packets_from_the_hosts_first() -> None:
    """Issue 17 (3): without a connection there is no masquerade, so invalid and untracked
    packets from the TUN would leave with the host's VIpA as source: the first rule of the
    forward filter drops (and counts) them."""
    script = anchor_ruleset(tun="upmt0", pool="100.64.1.0/24", mtu=1400, nat_interface=None,
                            deny_egress=("10.0.0.0/8",))
    egress = _chain(script, "egress")
    assert egress[0] == ('iifname "upmt0" ct state { invalid, untracked } '
                         'counter name "invalid_from_hosts" drop')
    assert egress[1] == INBOUND_DROP
    assert "counter invalid_from_hosts {" in script


def test_quote_rejects_injection() -> None:
    assert nft.quote("eth0") == '"eth0"'
    for bad in ['eth0" accept', "a;b", "a\nb"]:
        with pytest.raises(SystemSetupError):
            nft.quote(bad)


def test_sysctl_keys() -> None:
    assert str(sysctl_path("net.ipv4.ip_forward")) == "/proc/sys/net/ipv4/ip_forward"
    key = iface_key("net.ipv4.conf", "eth0.100", "src_valid_mark")
    assert str(sysctl_path(key)) == "/proc/sys/net/ipv4/conf/eth0.100/src_valid_mark"
    with pytest.raises(SystemSetupError):
        sysctl_path("net..x")


def test_conntrack_encoding() -> None:
    attr = reply_tuple(17, "192.0.2.1", "100.64.0.1", 53, 40000)
    top = _attrs(attr)
    proto = _attrs(_attrs(top[2])[2])
    assert proto == {1: b"\x11", 2: struct.pack("!H", 53), 3: struct.pack("!H", 40000)}
    icmp = _attrs(_attrs(_attrs(reply_tuple(1, "192.0.2.1", "100.64.0.1", 7, 0))[2])[2])
    assert sorted(icmp) == [1, 4, 5, 6]
    entry = _attr(1, _attr(1, _attr(1, socket.inet_aton("10.0.0.2")), nested=True), nested=True)
    assert parse_entry(entry + _attr(8, struct.pack("!I", 0x10100))) == (0x10100, "10.0.0.2")
    assert parse_entry(entry) == (0, "10.0.0.2")
    assert parse_entry(b"\x01") is None
