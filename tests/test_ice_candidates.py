"""ice/candidates.py: gathering from the tunnel sockets, and the strict candidate line codec."""

from __future__ import annotations

import pytest
from aioice.candidate import candidate_priority

from upmt_tun.ice.candidates import IceCandidate, TunnelSocket, gather

S = TunnelSocket


def _summary(cands: tuple[IceCandidate, ...]) -> list[tuple[int | None, str, str, int]]:
    return [(c.socket_id, c.type, c.ip, c.port) for c in cands]


GATHER_CASES = [
    ("host and srflx of one socket",
     [S(0, "wlan0", ("192.168.1.10", 4000), ("203.0.113.7", 61000))],
     [(0, "host", "192.168.1.10", 4000), (0, "srflx", "203.0.113.7", 61000)]),
    ("no NAT: the srflx equal to the host is dropped",
     [S(0, "eth0", ("198.51.100.2", 4000), ("198.51.100.2", 4000))],
     [(0, "host", "198.51.100.2", 4000)]),
    ("interface order decides among hosts, hosts before srflx",
     [S(0, "wlan0", ("192.168.1.10", 4000), ("203.0.113.7", 61000)),
      S(1, "wwan0", ("10.0.0.5", 4001), ("192.0.2.9", 62000))],
     [(0, "host", "192.168.1.10", 4000), (1, "host", "10.0.0.5", 4001),
      (0, "srflx", "203.0.113.7", 61000), (1, "srflx", "192.0.2.9", 62000)]),
    ("loopback, link-local, unspecified and multicast hosts give nothing",
     [S(0, "lo", ("127.0.0.1", 4000), ("203.0.113.7", 1)),
      S(1, "x", ("169.254.3.4", 4000), None), S(2, "y", ("0.0.0.0", 4000), None),
      S(3, "z", ("224.0.0.1", 4000), None), S(4, "v6", ("fe80::1", 4000), None)],
     []),
    ("a reflexive address of another family than the socket's is dropped",
     [S(0, "wlan0", ("192.168.1.10", 4000), ("2001:db8::1", 5000))],
     [(0, "host", "192.168.1.10", 4000)]),
    ("junk or port 0 from the anchor is dropped",
     [S(0, "wlan0", ("192.168.1.10", 4000), ("not-an-ip", 5000)),
      S(1, "eth1", ("192.168.2.10", 4001), ("203.0.113.8", 0))],
     [(0, "host", "192.168.1.10", 4000), (1, "host", "192.168.2.10", 4001)]),
    ("the same address on two sockets is one candidate",
     [S(0, "a", ("192.168.1.10", 4000), ("203.0.113.7", 61000)),
      S(1, "b", ("192.168.1.10", 4000), ("203.0.113.7", 61000))],
     [(0, "host", "192.168.1.10", 4000), (0, "srflx", "203.0.113.7", 61000)]),
    ("IPv6 sockets work the same way",
     [S(0, "eth0", ("2001:db8::10", 4000), ("2001:db8:1::20", 4500))],
     [(0, "host", "2001:db8::10", 4000), (0, "srflx", "2001:db8:1::20", 4500)]),
]


@pytest.mark.parametrize(("why", "sockets", "expected"), GATHER_CASES,
                         ids=[c[0] for c in GATHER_CASES])
def test_gather(why: str, sockets: list[TunnelSocket],
                expected: list[tuple[int, str, str, int]]) -> None:
    assert _summary(gather(sockets)) == expected


def test_gather_caps_the_candidates_keeping_the_best() -> None:
    socks = [S(i, f"if{i}", (f"10.0.{i}.2", 4000 + i), (f"203.0.113.{i + 1}", 5000))
             for i in range(6)]
    cands = gather(socks, max_candidates=8)
    assert len(cands) == 8
    assert [c.type for c in cands] == ["host"] * 6 + ["srflx"] * 2
    assert [c.socket_id for c in cands[6:]] == [0, 1]


def test_priorities_are_rfc_8445_with_local_preference_by_interface_order() -> None:
    cands = gather([S(0, "wlan0", ("192.168.1.10", 4000), ("203.0.113.7", 61000)),
                    S(1, "wwan0", ("10.0.0.5", 4001), None)])
    by = {(c.socket_id, c.type): c for c in cands}
    assert by[(0, "host")].priority == candidate_priority(1, "host", 65535)
    assert by[(1, "host")].priority == candidate_priority(1, "host", 65534)
    assert by[(0, "srflx")].priority == candidate_priority(1, "srflx", 65535)
    assert by[(0, "host")].priority == (126 << 24) + (65535 << 8) + 255
    assert by[(0, "srflx")].related == ("192.168.1.10", 4000)
    assert all(c.component == 1 for c in cands)


def test_foundations_differ_by_type_and_interface_even_for_equal_addresses() -> None:
    cands = gather([S(0, "wlan0", ("192.168.1.10", 4000), ("203.0.113.7", 61000)),
                    S(1, "eth0", ("192.168.1.10", 4001), ("203.0.113.7", 61001))])
    assert len({c.foundation for c in cands}) == 4
    assert all(1 <= len(c.foundation) <= 32 for c in cands)


def test_a_candidate_line_round_trips() -> None:
    for c in gather([S(0, "wlan0", ("192.168.1.10", 4000), ("203.0.113.7", 61000)),
                     S(1, "eth0", ("2001:db8::10", 4001), None)]):
        back = IceCandidate.from_sdp(c.to_sdp())
        assert back == IceCandidate(c.foundation, c.priority, c.ip, c.port, c.type,
                                    related=c.related)


GOOD = "1 1 udp 2130706431 192.168.1.10 4000 typ host"

BAD_LINES = [
    ("", "wrong number of fields"),
    ("1 1 udp 2130706431 192.168.1.10 4000 host x", "'typ' missing"),
    ("1 1 udp 2130706431 192.168.1.10 4000 typ", "wrong number of fields"),
    ("1 2 udp 2130706431 192.168.1.10 4000 typ host", "component must be 1"),
    ("1 1 tcp 2130706431 192.168.1.10 4000 typ host", "transport must be UDP"),
    ("1 1 udp 0 192.168.1.10 4000 typ host", "priority out of range"),
    ("1 1 udp 4294967295 192.168.1.10 4000 typ host", "priority out of range"),
    ("1 1 udp +5 192.168.1.10 4000 typ host", "must be digits"),
    ("1 1 udp \u0661 192.168.1.10 4000 typ host", "must be digits"),
    ("1 1 udp 1_0 192.168.1.10 4000 typ host", "must be digits"),
    ("1 1 udp 5 host.local 4000 typ host", "not an IP literal"),
    ("1 1 udp 5 192.168.1.10 0 typ host", "port out of range"),
    ("1 1 udp 5 192.168.1.10 70000 typ host", "port out of range"),
    ("1 1 udp 5 192.168.1.10 4000 typ weird", "unknown type"),
    ("f\u00f6 1 udp 5 192.168.1.10 4000 typ host", "bad foundation"),
    ("a" * 33 + " 1 udp 5 192.168.1.10 4000 typ host", "bad foundation"),
    (GOOD + " raddr", "wrong number of fields"),
    (GOOD + " raddr 10.0.0.1 rport x", "rport must be digits"),
    (GOOD + " raddr 10.0.0.1", "raddr and rport go together"),
    (GOOD + " rport 5", "raddr and rport go together"),
    (GOOD + " raddr nope rport 5", "not an IP literal"),
    (GOOD.replace(" ", "  ", 1), "wrong number of fields"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_bad_candidate_lines_are_one_clear_value_error(line: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        IceCandidate.from_sdp(line)


def test_extension_attributes_are_ignored() -> None:
    c = IceCandidate.from_sdp(GOOD + " generation 0 network-id 3")
    assert c.addr == ("192.168.1.10", 4000) and c.type == "host"
