"""The systemd units in the package: what they promise (notify, ordering after the
network, restart, runtime directory, cleanup after stop, capabilities) and their install.
No root, no systemd (it is not running on the test machine: `systemd-analyze verify` is
used where it exists, offline)."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from upmt_tun import units


def _parse(text: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(interpolation=None, strict=True)
    cp.optionxform = str               # type: ignore[assignment,method-assign]
    cp.read_string(text)
    return cp


@pytest.mark.parametrize("name,prog", [("upmt-agent.service", "upmt-agent"),
                                       ("upmt-anchor.service", "upmt-anchor")])
def test_unit_promises(name: str, prog: str) -> None:
    u = _parse(units.unit_text(name, "/opt/upmt/bin"))
    unit, svc = u["Unit"], u["Service"]
    assert "network-online.target" in unit["After"].split()
    assert "network-online.target" in unit["Wants"].split()
    assert svc["Type"] == "notify"
    assert svc["Restart"] == "on-failure"
    assert svc["RestartPreventExitStatus"] == "2"        # a bad config: no retry loop
    assert svc["RuntimeDirectory"] == "upmt"
    assert svc["CapabilityBoundingSet"].split() == ["CAP_NET_ADMIN"]
    start = shlex.split(svc["ExecStart"])
    post = shlex.split(svc["ExecStopPost"].lstrip("-"))
    assert start[0] == post[0] == f"/opt/upmt/bin/{prog}"
    assert "cleanup" in post
    assert start[start.index("--config") + 1] == post[post.index("--config") + 1]
    reload = shlex.split(svc["ExecReload"])            # `systemctl reload`: synchronous,
    assert reload[:2] == [f"/opt/upmt/bin/{prog}", "reload"]   # fails when refused
    assert reload[reload.index("--config") + 1] == start[start.index("--config") + 1]
    assert u["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.parametrize("name", units.UNITS)
def test_unit_command_lines_parse(name: str, tmp_path: Path) -> None:
    """ExecStart, ExecStopPost and ExecReload are command lines the CLI accepts: with a
    missing config they fail on the config (exit 2, file not found), not on the usage."""
    svc = _parse(units.unit_text(name, str(Path(sys.executable).parent)))["Service"]
    for key in ("ExecStart", "ExecStopPost", "ExecReload"):
        argv = shlex.split(svc[key].lstrip("-"))
        argv[argv.index("--config") + 1] = str(tmp_path / "absent.toml")
        fn = "agent_main" if "agent" in name else "anchor_main"
        code = f"import sys; from upmt_tun.cli import {fn}; sys.exit({fn}())"
        r = subprocess.run([sys.executable, "-c", code, *argv[1:]], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 2 and "absent.toml: -: file not found" in r.stderr, r.stderr


def test_units_install_with_the_bindir(tmp_path: Path) -> None:
    assert units.main(["install", str(tmp_path / "u"), "/x/bin"]) == 0
    for name in units.UNITS:
        text = (tmp_path / "u" / name).read_text()
        assert "/usr/local/bin/" not in text and "/x/bin/upmt-" in text
        assert (tmp_path / "u" / name).stat().st_mode & 0o777 == 0o644
    assert units.main(["show", "nope.service"]) == 1
    assert units.main([]) == 2


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_units_verify(tmp_path: Path) -> None:
    """systemd's own checker, offline, against this install's commands."""
    bindir = str(Path(sys.executable).parent)
    if not Path(bindir, "upmt-agent").exists():
        pytest.skip("console scripts not installed next to this Python")
    paths = units.install(str(tmp_path), bindir)
    r = subprocess.run(["systemd-analyze", "verify", *map(str, paths)], capture_output=True,
                       text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    bad = [line for line in r.stderr.splitlines() if "upmt-" in line]
    assert bad == [], bad


@pytest.mark.parametrize("unit", ["upmt-anchor.service", "upmt-agent.service"])
def test_units_restart_keeping_connections(unit: str) -> None:
    """`systemctl restart` sends SIGUSR2 (a stop for a restart: the anchor keeps its NAT,
    the agent holds its steered connections) and ExecStopPost leaves that for the new
    start; `systemctl stop` sends SIGTERM (restore exactly)."""
    service = _parse(units.unit_text(unit, "/opt/upmt/bin"))["Service"]
    assert service["RestartKillSignal"] == "SIGUSR2" and "KillSignal" not in service
    assert "--keep-paused" in shlex.split(service["ExecStopPost"].lstrip("-"))


def test_paused_ruleset_keeps_nat_and_conntrack_and_drops_the_pool() -> None:
    from upmt_tun.system.anchor_host import PAUSED_CHAIN, paused_ruleset

    script = paused_ruleset("100.100.0.0/16")
    assert "type nat hook postrouting" in script               # NAT hooks stay registered
    assert f"chain {PAUSED_CHAIN}" in script
    # a rule using conntrack (else the kernel stops looking packets up: no de-NAT)
    assert "ip daddr 100.100.0.0/16 ct state established,related counter drop" in script
    assert "masquerade" not in script                           # no new connection NATed


def test_agent_unit_delegates_its_cgroup_for_the_rule_cgroups() -> None:
    """`run`'s per-rule cgroups go into the agent unit's own subtree (system/cgroups.py
    rule_base): systemd must hand it over (Delegate) and let the agent move the programs
    out before anything else is killed (KillMode=mixed)."""
    agent = _parse(units.unit_text("upmt-agent.service", "/opt/upmt/bin"))["Service"]
    assert agent["Delegate"] == "yes" and agent["KillMode"] == "mixed"
