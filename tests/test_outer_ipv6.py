"""Outer IPv6, the pure parts: address forms in the config, endpoint normalisation at the
socket edge, the family each interface uses to reach an anchor, IPv6 routes and rules."""

from __future__ import annotations

import socket
import textwrap
from pathlib import Path
from typing import Any

import pytest

from upmt_tun.agent import Agent, IfaceSeam, rule_classifier
from upmt_tun.config import format_host_port, load_agent_config, split_host_port
from upmt_tun.dataplane.io import FakeNetwork, FakeTun, PathSocket, mapped, open_udp
from upmt_tun.resolve import ResolveSchedule, as_addrs, getaddrinfo_both, is_literal, normalise
from upmt_tun.signalling import sip
from upmt_tun.system.agent_host import AgentHost, IfacePlan
from upmt_tun.system.netlink import Route, Rule

from .test_config import AN_PUB, MH_KEY, MINI_ANCHOR, PEER, agent, agent_err, anchor, anchor_err

ANCHOR_PUB = f'public_key = "{AN_PUB}"\n'


def _anchor_entry(address: str) -> str:
    return MH_KEY + f'[[anchor]]\nname = "an1"\naddress = "{address}"\n' + ANCHOR_PUB


# -- address forms ------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "want"), [
    ("[2001:db8::1]:5060", ("2001:db8::1", 5060)),
    ("[2001:DB8:0:0::1]:4500", ("2001:db8::1", 4500)),     # canonical form: compared as text
    ("[2001:db8::1]", ("2001:db8::1", 5060)),
    ("[::]:5060", ("::", 5060)),
    ("198.51.100.1:7000", ("198.51.100.1", 7000)),
    ("198.51.100.1", ("198.51.100.1", 5060)),
    ("anchor.example.net:4500", ("anchor.example.net", 4500)),
    ("anchor.example.net", ("anchor.example.net", 5060)),
])
def test_host_port_forms(text: str, want: tuple[str, int]) -> None:
    assert split_host_port(text) == want
    assert split_host_port(format_host_port(*want)) == want


@pytest.mark.parametrize(("text", "words"), [
    ("2001:db8::1", ("brackets",)),            # bare: is ":1" the port or the address?
    ("2001:db8::1:5060", ("brackets",)),
    ("[2001:db8::1", ("[IPv6]:port",)),
    ("[2001:db8::1]5060", ("[IPv6]:port",)),
    ("[anchor.example]:5060", ("not an IPv6",)),
    ("[198.51.100.1]:5060", ("not an IPv6",)),
    ("[2001:db8::1]:0", ("range",)),
    ("[2001:db8::1]:x", ("bad port",)),
    ("bad host!:5060", ("host name",)),
    ("1.2.3:5060", ("host name",)),
    (":5060", ("host:port",)),
])
def test_bad_host_port(text: str, words: tuple[str, ...]) -> None:
    with pytest.raises(ValueError) as ei:
        split_host_port(text)
    for w in words:
        assert w.lower() in str(ei.value).lower()


def test_anchor_address_accepts_ipv6_and_names(tmp_path: Path) -> None:
    cfg = agent(tmp_path, _anchor_entry("[2001:db8::7]:4500"))
    assert (cfg.anchors[0].host, cfg.anchors[0].port) == ("2001:db8::7", 4500)
    cfg = agent(tmp_path, _anchor_entry("anchor.example"))
    assert (cfg.anchors[0].host, cfg.anchors[0].port) == ("anchor.example", 5060)


@pytest.mark.parametrize("bad", ["2001:db8::7", "[2001:db8::7", "[x]:1", "a b:1"])
def test_bad_anchor_address_is_a_one_line_error(tmp_path: Path, bad: str) -> None:
    agent_err(tmp_path, _anchor_entry(bad), "anchor[0].address")


def test_anchor_listen_dual_stack_and_v6(tmp_path: Path) -> None:
    cfg = anchor(tmp_path, MINI_ANCHOR.replace("203.0.113.1:5060", "[::]:5060") + PEER)
    assert (cfg.listen_host, cfg.listen_port) == ("::", 5060)
    cfg = anchor(tmp_path, MINI_ANCHOR.replace("203.0.113.1:5060", "[2001:db8::1]") + PEER)
    assert (cfg.listen_host, cfg.listen_port) == ("2001:db8::1", 5060)


@pytest.mark.parametrize(("listen", "words"), [
    ("anchor.example:5060", ("not an IP",)),
    ("::", ("brackets",)),
    ("[::]:99999", ("range",)),
])
def test_bad_listen(tmp_path: Path, listen: str, words: tuple[str, ...]) -> None:
    anchor_err(tmp_path, MINI_ANCHOR.replace("203.0.113.1:5060", listen) + PEER, "listen", *words)


# -- endpoints at the socket edge ------------------------------------------------------------
def test_normalise_and_mapped() -> None:
    assert normalise(("::ffff:192.0.2.1", 5060, 0, 0)) == ("192.0.2.1", 5060)
    assert normalise(("2001:db8::1", 5060, 0, 0)) == ("2001:db8::1", 5060)
    assert normalise(("::ffff:0:1", 1, 0, 0)) == ("::ffff:0:1", 1)       # not mapped IPv4
    assert normalise(("192.0.2.1", 7)) == ("192.0.2.1", 7)
    assert mapped(("192.0.2.1", 7)) == ("::ffff:192.0.2.1", 7)
    assert mapped(("2001:db8::1", 7)) == ("2001:db8::1", 7)


def test_addrs_one_per_family_ipv4_first() -> None:
    assert as_addrs(("192.0.2.1", 1)) == (("192.0.2.1", 1),)
    assert as_addrs((("2001:db8::1", 1), ("192.0.2.1", 1))) == (("192.0.2.1", 1),
                                                                 ("2001:db8::1", 1))
    assert is_literal("2001:db8::1") and is_literal("192.0.2.1") and not is_literal("a.example")
    assert getaddrinfo_both("2001:db8::1", 9) == (("2001:db8::1", 9),)   # no look-up
    s = ResolveSchedule({"a": ("2001:db8::1", 9), "b": ("b.example", 9)}, 0.0)
    assert s.entries["a"].addr == (("2001:db8::1", 9),) and s.due(0.0) == ["b"]
    assert s.resolved("b", (("192.0.2.2", 9), ("2001:db8::2", 9)), 0.0)
    assert not s.resolved("b", (("2001:db8::2", 9), ("192.0.2.2", 9)), 1.0)   # same two


class _Loop:
    """Just enough of an event loop for PathSocket: readers are called by hand."""

    def __init__(self) -> None:
        self.readers: dict[int, Any] = {}

    def add_reader(self, fd: int, cb: Any) -> None:
        self.readers[fd] = cb

    def remove_reader(self, fd: int) -> bool:
        return self.readers.pop(fd, None) is not None


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 on this host")
def test_a_dual_stack_path_socket_shows_and_takes_plain_endpoints() -> None:
    """Over loopback: an IPv4 peer is seen as 127.0.0.1 (not ::ffff:127.0.0.1, not a
    4-tuple) and answered at that address; an IPv6 peer as ("::1", port)."""
    loop = _Loop()
    sock = open_udp("::", 0)
    assert sock.family == socket.AF_INET6
    assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
    path = PathSocket(sock, loop, ("::", sock.getsockname()[1]), offload=False)
    got: list[tuple[bytes, tuple[str, int]]] = []
    path.start(lambda d, src: got.append((d, src)))
    port = sock.getsockname()[1]
    v4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    v6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        v4.bind(("127.0.0.1", 0))
        v6.bind(("::1", 0))
        v4.sendto(b"four", ("127.0.0.1", port))
        v6.sendto(b"six", ("::1", port))
        v4.settimeout(2)
        v6.settimeout(2)
        import select
        select.select([sock], [], [], 2)
        for _ in range(20):
            loop.readers[sock.fileno()]()
            if len(got) == 2:
                break
            select.select([sock], [], [], 0.1)
        assert sorted(got) == sorted([(b"four", ("127.0.0.1", v4.getsockname()[1])),
                                      (b"six", ("::1", v6.getsockname()[1]))])
        path.sendto(b"back4", ("127.0.0.1", v4.getsockname()[1]))
        path.queue(b"back6", ("::1", v6.getsockname()[1]))
        path.flush()
        assert v4.recvfrom(100) == (b"back4", ("127.0.0.1", port))
        assert v6.recvfrom(100)[0] == b"back6"
        assert path.send_errors == 0
    finally:
        v4.close()
        v6.close()
        path.close()


# -- the family each interface uses ----------------------------------------------------------
def _agent(tmp_path: Path, families: list[frozenset[int]],
           anchors: dict[str, Any]) -> Agent:
    text = MH_KEY + "".join(f'[[interface]]\nname = "wan{i}"\n' for i in range(len(families)))
    for name in anchors:
        text += f'[[anchor]]\nname = "{name}"\naddress = "anchor.example"\n' + ANCHOR_PUB
    p = tmp_path / "agent.toml"
    p.write_text(textwrap.dedent(text))
    cfg = load_agent_config(str(p))
    net = FakeNetwork()
    return Agent(cfg, tun=FakeTun(), anchors=anchors,
                 ifaces=[IfaceSeam(f"wan{i}", i, net.socket(f"192.0.2.{i + 10}"), f)
                         for i, f in enumerate(families)],
                 classify_flow=rule_classifier(cfg.rules, None, cfg.fwmark))


def test_each_interface_takes_the_family_it_has_ipv4_first(tmp_path: Path) -> None:
    v4, v6, both = frozenset({4}), frozenset({6}), frozenset({4, 6})
    dual = (("198.51.100.1", 5060), ("2001:db8::1", 5060))
    a = _agent(tmp_path, [v4, v6, both],
               {"dual": dual, "six": ("2001:db8::2", 5060), "four": ("198.51.100.3", 5060),
                "later": None})
    assert a.addr_for("wan0", "dual") == ("198.51.100.1", 5060)
    assert a.addr_for("wan1", "dual") == ("2001:db8::1", 5060)
    assert a.addr_for("wan2", "dual") == ("198.51.100.1", 5060)        # IPv4 first
    assert a.addr_for("wan0", "six") is None                           # nothing in common
    assert a.addr_for("wan2", "six") == ("2001:db8::2", 5060)
    assert a.addr_for("wan1", "four") is None
    assert a.addr_for("wan1", "later") is None
    assert a.status()["anchors"][0]["address"] == "198.51.100.1:5060 [2001:db8::1]:5060"


async def test_links_go_where_a_family_is_shared_and_follow_a_move(tmp_path: Path) -> None:
    v4, v6 = frozenset({4}), frozenset({6})
    a = _agent(tmp_path, [v4, v6], {"an1": None})
    await a.start()
    try:
        a.set_anchor_address("an1", ("2001:db8::1", 5060))       # AAAA only, for now
        assert set(a.links) == {("wan1", "an1")}
        assert a.links[("wan1", "an1")].remote == ("2001:db8::1", 5060)
        a.set_anchor_address("an1", (("2001:db8::9", 5060), ("198.51.100.1", 5060)))
        assert set(a.links) == {("wan0", "an1"), ("wan1", "an1")}   # an A record came
        six = a.links[("wan1", "an1")]
        assert six.remote == six.tunnel.remote == ("2001:db8::9", 5060)  # followed
        assert a.links[("wan0", "an1")].remote == ("198.51.100.1", 5060)
    finally:
        await a.stop()


# -- signalling, routes and rules ------------------------------------------------------------
def test_sip_brackets_ipv6_hosts() -> None:
    data = sip.build_request(target=("2001:db8::1", 5060), from_user="mh",
                             via=("2001:db8::2", 4000), call_id="c" * 16, cseq=1,
                             branch="z9hG4bKx", body=b"{}")
    msg = sip.parse(data)
    assert isinstance(msg, sip.SipRequest)
    assert "[2001:db8::1]:5060" in msg.uri
    assert "[2001:db8::2]:4000" in (msg.headers.get_first("via") or "")


def test_ipv6_route_and_rule_kwargs() -> None:
    r = Route(5551, oif=3, gateway="fe80::1", dev="wan1", family=socket.AF_INET6)
    kw = r.kwargs()
    assert kw["dst"] == "::/0" and kw["family"] == socket.AF_INET6 and "scope" not in kw
    assert r.describe() == "-6 default via fe80::1 dev wan1 table 5551"
    onlink = Route(5551, oif=3, dev="wan1", family=socket.AF_INET6).kwargs()
    assert "scope" not in onlink and "gateway" not in onlink
    assert Route(5551, oif=3, dev="wan1").kwargs()["scope"] == "link"      # IPv4 unchanged
    rule = Rule(5200, 5551, 0x5551, 0xFFFF, family=socket.AF_INET6)
    assert rule.kwargs()["family"] == socket.AF_INET6
    assert rule.describe().startswith("-6 rule 5200:")


def test_an_ipv6_interface_gets_an_ipv6_rule_to_its_own_table() -> None:
    plans = [IfacePlan(0, "wan0", "192.0.2.1", 4000),
             IfacePlan(1, "wan1", None, 4001, v6=True, gateway6="fe80::1")]
    host = AgentHost(tun="upmt0", vipa_fix="100.64.0.1", fwmark=0x5550, table=5550,
                     ifaces=plans, rules=[])
    rules = host._routing_rules()
    six = [r for r in rules if r.family == socket.AF_INET6]
    assert six == [Rule(5200, 5552, 0x5552, 0xFFFF, family=socket.AF_INET6)]
    assert all(host._is_ours(r) for r in rules)        # so cleanup finds a killed run's


def test_check_counts_a_global_ipv6_address_as_an_address() -> None:
    from upmt_tun.check import _global6
    addrs: list[Any] = [
        {"ifname": "wan2", "addr_info": [{"family": "inet6", "scope": "link", "local": "fe80::2"},
                                         {"family": "inet6", "scope": "global",
                                          "local": "2001:db8:2::2"}]},
        {"ifname": "wan3", "addr_info": [{"family": "inet6", "scope": "link",
                                          "local": "fe80::3"}]}]
    assert _global6(addrs, "wan2") and not _global6(addrs, "wan3")
