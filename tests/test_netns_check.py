"""`upmt-agent check` / `upmt-anchor check` against real hosts (network namespaces): what
they find, and that they change nothing (rules, routes, links, addresses, nftables,
sysctls compared before and after)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from upmt_tun import keys
from upmt_tun.lab import Lab, exe
from upmt_tun.testbed import Topology

from .conftest import netns_missing
from .test_netns_e2e import host_state

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(netns_missing() is not None, reason=str(netns_missing()))]


@pytest.fixture
def topo() -> Iterator[Topology]:
    t = Topology()
    t.up()
    try:
        yield t
    finally:
        t.down()


def test_agent_check_finds_what_will_bite_and_changes_nothing(topo: Topology,
                                                              tmp_path: Path) -> None:
    # Tailscale's table-52 rule, and a carrier-grade NAT /10 on an access interface
    topo.run("mh", "ip", "rule", "add", "priority", "5270", "table", "52")
    topo.run("mh", "ip", "addr", "add", "100.70.1.5/10", "dev", "wan2")
    lab = Lab(topo, tmp_path / "lab", agent_extra="rule_priority = 5300\n")
    _, agent = lab.write_configs()
    agent.write_text(agent.read_text() + '\n[[interface]]\nname = "wwan9"\n\n'
                     f'[[anchor]]\nname = "later"\naddress = "anchor.invalid:5060"\n'
                     f'public_key = "{keys.keypair()[1]}"\n')
    before = host_state(topo, "mh")
    r = topo.run("mh", *exe("upmt-agent"), "check", "--config", str(agent), check=False)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert all(line.startswith("upmt-agent: warning: ") for line in lines), lines
    text = "\n".join(lines)
    assert "interface wwan9 does not exist" in text
    assert "anchor later: anchor.invalid does not resolve" in text
    assert ("ip rule 5270: from all lookup 52 (Tailscale's) comes before ours (5300) and "
            "would take the tunnel packets and the steered traffic") in text
    assert "vipa_fix 100.64.0.1 overlaps address 100.70.1.5/10 of wan2" in text
    assert len(lines) == 4, lines
    assert r.stdout == f"{agent}: ok, 4 warning(s)\n"
    assert host_state(topo, "mh") == before


def test_anchor_check_finds_a_forward_drop_and_an_overlap(topo: Topology,
                                                          tmp_path: Path) -> None:
    # Docker's (or ufw's) iptables FORWARD policy DROP, as iptables-nft makes it, and a
    # route into the anchor's VIpA pool
    topo.run("an", "nft", "add table ip filter; add chain ip filter FORWARD "
             "{ type filter hook forward priority filter; policy drop; }")
    topo.run("an", "ip", "route", "add", "100.100.100.100/32", "dev", "eth0")
    lab = Lab(topo, tmp_path / "lab")
    (anchor,), _ = lab.write_configs()
    before = host_state(topo, "an")
    r = topo.run("an", *exe("upmt-anchor"), "check", "--config", str(anchor), check=False)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("upmt-anchor: warning: vipa_pool 100.100.0.0/16 overlaps "
                               "route 100.100.100.100/32 dev eth0")
    assert lines[1].startswith("upmt-anchor: warning: nft chain ip filter FORWARD (forward "
                               "hook) has policy drop")
    assert host_state(topo, "an") == before


def test_check_beside_running_daemons_is_ok_and_changes_nothing(topo: Topology,
                                                                tmp_path: Path) -> None:
    """The daemons' own rules, tables, TUN addresses and nft tables are not findings, and
    the dry run replaces their table only inside the checked (never applied) transaction."""
    lab = Lab(topo, tmp_path / "lab").start()
    try:
        states = {role: host_state(topo, role) for role in ("mh", "an")}
        r = topo.run("mh", *exe("upmt-agent"), "check", "--config",
                     str(lab.dir / "agent.toml"), check=False)
        assert (r.returncode, r.stderr) == (0, "")
        assert r.stdout.endswith(": ok\n")
        r = topo.run("an", *exe("upmt-anchor"), "check", "--config",
                     str(lab.dir / "anchor0.toml"), check=False)
        assert (r.returncode, r.stderr) == (0, "")
        assert {role: host_state(topo, role) for role in ("mh", "an")} == states
        assert lab.agent_status()["tunnels"]           # still running
    finally:
        assert lab.stop() == {"agent": 0, "anchor0": 0}


def test_a_ruleset_the_agent_could_not_install_exits_2(topo: Topology,
                                                        tmp_path: Path) -> None:
    lab = Lab(topo, tmp_path / "lab", rules='[[rule]]\nname = "app"\ncgroup = "no/such"\n')
    _, agent = lab.write_configs()
    before = host_state(topo, "mh")
    r = topo.run("mh", *exe("upmt-agent"), "check", "--config", str(agent), check=False)
    assert r.returncode == 2
    assert r.stderr.startswith("upmt-agent: error: the nftables ruleset is refused: ")
    assert "no/such" in r.stderr and len(r.stderr.splitlines()) == 1
    assert r.stdout == ""
    # nft itself is asked, and what it refuses is reported in its words
    chain = "table ip t {\\n chain c {\\n type filter hook input priority 0\\n %s\\n }\\n}"
    probe = ("from upmt_tun.check import dry_run; "
             f"print(dry_run('{chain % 'bogus'}', 'ip', 't')); "
             f"print(dry_run('{chain % 'counter'}', 'ip', 't'))")
    bad, good = topo.run("mh", sys.executable, "-c", probe).stdout.splitlines()
    assert bad.startswith("Error:") and good == "None"
    assert host_state(topo, "mh") == before
