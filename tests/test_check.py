"""`check`: the findings from what was read of a host (pure), and the command's output and
exit codes. No root: the netns test (test_netns_check.py) runs it against real hosts."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from upmt_tun import check
from upmt_tun.check import Findings, forward_drops, overlaps, rule_takes, rules_before_ours
from upmt_tun.cli import agent_main, anchor_main

from .test_cli import AN_KEY, KEYLESS_AGENT, KEYLESS_ANCHOR, MH_KEY, one_line

# `ip -j -4 rule` of a host running Tailscale (with an exit node: table 52) and wg-quick
TAILSCALE = [
    {"priority": 0, "src": "all", "table": "local"},
    {"priority": 5210, "src": "all", "fwmark": "0x80000", "fwmask": "0xff0000", "table": "main"},
    {"priority": 5230, "src": "all", "fwmark": "0x80000", "fwmask": "0xff0000",
     "table": "default"},
    {"priority": 5250, "src": "all", "fwmark": "0x80000", "fwmask": "0xff0000",
     "action": "unreachable"},
    {"priority": 5270, "src": "all", "table": "52"},
    {"priority": 32766, "src": "all", "table": "main"},
]
WG_QUICK = [
    {"priority": 32764, "not": None, "src": "all", "fwmark": "0xca6c", "table": "51820"},
    {"priority": 32765, "src": "all", "table": "main", "suppress_prefixlen": 0},
]
F, T = 0x5550, 5550


def ours(prio: int, n: int = 2) -> list[tuple[int, int, int, str]]:
    return [*((prio, F + 1 + k, T + 1 + k, "tunnel packets") for k in range(n)),
            (prio + 1, F, T, "steered traffic")]


def test_which_rules_take_a_marked_packet() -> None:
    bypass, steered = 0x80000, F
    assert rule_takes(TAILSCALE[1], bypass) and not rule_takes(TAILSCALE[1], steered)
    assert rule_takes(TAILSCALE[3], bypass)               # unreachable takes too
    assert rule_takes(TAILSCALE[4], steered)              # table 52 takes everything
    assert not rule_takes(TAILSCALE[0], steered)          # local: every packet's first
    wg = WG_QUICK[0]                                      # not fwmark 0xca6c lookup 51820
    assert rule_takes(wg, steered) and not rule_takes(wg, 0xCA6C)
    # an inverted rule with an address selector takes some of even the excluded mark
    assert rule_takes({**wg, "dst": "10.0.0.0", "dstlen": 8}, 0xCA6C)
    assert not rule_takes({"priority": 10, "iif": "eth0", "table": "7"}, steered)
    assert rule_takes({"priority": 10, "iif": "lo", "table": "7"}, steered)
    assert not rule_takes({"priority": 10, "action": "nop"}, steered)
    assert rule_takes({"priority": 10, "dst": "10.0.0.0", "dstlen": 8, "table": "7"}, steered)


def test_default_priorities_come_before_tailscale_and_wg_quick() -> None:
    assert rules_before_ours(TAILSCALE + WG_QUICK, ours(5200)) == []


def test_a_late_rule_priority_is_taken_by_tailscales_table_52() -> None:
    (line,) = rules_before_ours(TAILSCALE + WG_QUICK, ours(5300))
    assert line.startswith("ip rule 5270: from all lookup 52 (Tailscale's) comes before ours "
                           "(5300)")
    assert "tunnel packets and the steered traffic" in line
    assert line.endswith("set rule_priority below 5270")
    # at wg-quick's: its inverted rule takes everything but its own mark, and its
    # suppress_prefixlength rule every route of main but the default one
    inverted, suppress = rules_before_ours(WG_QUICK, ours(32764))
    assert "(wg-quick's)" in inverted and "32764: not from all fwmark 0xca6c" in inverted
    assert "suppress_prefixlength 0 (wg-quick's)" in suppress
    assert "steered traffic:" in suppress


def test_a_running_agents_own_rules_and_later_rules_are_not_findings() -> None:
    mine = [{"priority": 5200, "src": "all", "fwmark": hex(F + 1), "fwmask": "0xffff",
             "table": str(T + 1)},
            {"priority": 5201, "src": "all", "fwmark": hex(F), "fwmask": "0xffff",
             "table": str(T)}]
    assert rules_before_ours(mine + TAILSCALE, ours(5200)) == []
    # same priority as ours, not ours: it was there first, so it comes first
    other = {"priority": 5201, "src": "all", "table": "100"}
    (line,) = rules_before_ours([other], ours(5200))
    assert "5201: from all lookup 100 (another tool's)" in line and "steered traffic" in line
    assert "tunnel packets" not in line


ADDRS = [
    {"ifname": "lo", "addr_info": [{"family": "inet", "local": "127.0.0.1", "prefixlen": 8}]},
    {"ifname": "wwan0", "addr_info": [{"family": "inet", "local": "100.70.1.5",
                                       "prefixlen": 10}]},
    {"ifname": "upmt0", "addr_info": [{"family": "inet", "local": "100.64.0.1",
                                       "prefixlen": 32}]},
    {"ifname": "tailscale0", "addr_info": [{"family": "inet", "local": "100.101.2.3",
                                            "prefixlen": 32}]},
]
ROUTES = [
    {"dst": "default", "gateway": "100.64.0.254", "dev": "wwan0"},
    {"dst": "100.64.0.0/10", "dev": "wwan0", "protocol": "kernel"},       # the address's
    {"dst": "100.100.100.100", "dev": "tailscale0", "table": "52"},
    {"type": "local", "dst": "100.70.1.5", "dev": "wwan0", "table": "local"},
    {"dst": "default", "dev": "upmt0", "table": "5550"},
    {"dst": "100.100.0.0/16", "dev": "upmtan0"},
    {"dst": "198.51.100.0/24", "dev": "eth0", "table": "5552"},
]


def test_overlapping_100_64_uses() -> None:
    vipa = ipaddress.IPv4Network("100.64.0.1/32")
    found = overlaps(vipa, "vipa_fix 100.64.0.1", ADDRS, ROUTES, "upmt0", {5550, 5551, 5552})
    # the carrier's /10 on wwan0 (its route is the same network: one line); not our own TUN
    assert found == ["vipa_fix 100.64.0.1 overlaps address 100.70.1.5/10 of wwan0: "
                     "pick another"]
    pool = ipaddress.IPv4Network("100.100.0.0/16")
    found = overlaps(pool, "vipa_pool 100.100.0.0/16", ADDRS, ROUTES, "upmtan0", set())
    assert found == [
        "vipa_pool 100.100.0.0/16 overlaps address 100.70.1.5/10 of wwan0: pick another",
        "vipa_pool 100.100.0.0/16 overlaps route 100.100.100.100/32 dev tailscale0 "
        "(table 52): pick another"]
    assert overlaps(ipaddress.IPv4Network("100.120.0.0/16"), "x", ADDRS[:1], ROUTES[:1],
                    "upmt0", set()) == []


def test_forward_policy_drop_of_another_table() -> None:
    chains = [
        {"family": "ip", "table": "filter", "name": "FORWARD", "hook": "forward",
         "policy": "drop"},
        {"family": "ip", "table": "filter", "name": "INPUT", "hook": "input", "policy": "drop"},
        {"family": "inet", "table": "fw", "name": "fwd", "hook": "forward", "policy": "accept"},
        {"family": "ip", "table": "upmt_anchor", "name": "egress", "hook": "forward",
         "policy": "drop"},
        {"family": "bridge", "table": "b", "name": "f", "hook": "forward", "policy": "drop"},
    ]
    (line,) = forward_drops(chains, "upmt_anchor")
    assert line.startswith("nft chain ip filter FORWARD (forward hook) has policy drop")


# -- the command ------------------------------------------------------------------------

def _cfg(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("kind", ["agent", "anchor"])
def test_check_warnings_exit_0_errors_exit_2(tmp_path: Path, kind: str,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    found = Findings(["first thing", "second thing"], [])
    monkeypatch.setattr(check, f"check_{kind}", lambda cfg: found)
    if kind == "agent":
        path = _cfg(tmp_path, "a.toml", MH_KEY + KEYLESS_AGENT)
        main: Any = lambda: agent_main(["check", "--config", path])  # noqa: E731
    else:
        path = _cfg(tmp_path, "a.toml", AN_KEY + KEYLESS_ANCHOR)
        main = lambda: anchor_main(["check", "--config", path])  # noqa: E731
    prog = f"upmt-{kind}"
    assert main() == 0
    out = capsys.readouterr()
    assert out.err.splitlines() == [f"{prog}: warning: first thing",
                                    f"{prog}: warning: second thing"]
    assert out.out == f"{path}: ok, 2 warning(s)\n"
    found.warnings.clear()
    assert main() == 0
    assert capsys.readouterr() == (f"{path}: ok\n", "")
    found.errors.append("the nftables ruleset is refused: Error: syntax error")
    assert main() == 2
    out = capsys.readouterr()
    assert one_line(out.err) == (f"{prog}: error: the nftables ruleset is refused: "
                                 "Error: syntax error")
    assert out.out == ""


def test_check_a_bad_config_exits_2_with_one_line(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = _cfg(tmp_path, "a.toml", MH_KEY + KEYLESS_AGENT + "bogus = 1\n")
    assert agent_main(["check", "--config", path]) == 2
    assert "bogus" in one_line(capsys.readouterr().err)
    assert anchor_main(["check", "--config", str(tmp_path / "none.toml")]) == 2
    assert "none.toml" in one_line(capsys.readouterr().err)


def test_check_key_file_others_can_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A warning for the agent, an error for the anchor: as when they start."""
    from upmt_tun import keys

    monkeypatch.setattr(check, "check_agent", lambda cfg: Findings([], []))
    monkeypatch.setattr(check, "check_anchor", lambda cfg: Findings([], []))
    (tmp_path / "k.key").write_text(keys.generate() + "\n")
    (tmp_path / "k.key").chmod(0o640)
    agent = _cfg(tmp_path, "agent.toml", 'private_key_file = "k.key"\n' + KEYLESS_AGENT)
    anchor = _cfg(tmp_path, "anchor.toml", 'private_key_file = "k.key"\n' + KEYLESS_ANCHOR)
    assert agent_main(["check", "--config", agent]) == 0
    line = one_line(capsys.readouterr().err)
    assert line.startswith("upmt-agent: warning: ") and "0640" in line
    assert anchor_main(["check", "--config", anchor]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("upmt-anchor: error: ") and "0640" in line
