"""Where the per-rule cgroups of `upmt-agent run` go (issue 12 item 7): in the unit's
delegated subtree under systemd, at the cgroup v2 root otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from upmt_tun.system import cgroups
from upmt_tun.system.cgroups import RuleCgroups, own_cgroup, rule_base

UNIT = "system.slice/upmt-agent.service"


def test_own_cgroup_is_the_v2_line() -> None:
    text = "12:pids:/x\n1:name=systemd:/y\n0::/system.slice/upmt-agent.service\n"
    assert own_cgroup(text) == "/" + UNIT
    assert own_cgroup("4:memory:/a\n") is None            # v1 only: no v2 line
    assert own_cgroup("0::/\n") == "/"


@pytest.mark.parametrize("own,systemd,base", [
    ("/" + UNIT, True, UNIT),                        # the service: its delegated subtree
    (f"/{UNIT}/.control", True, UNIT),               # its ExecStopPost (cleanup): the same
    ("/" + UNIT, False, ""),                         # not a service: the root, as before
    ("/user.slice/user-1000.slice/session-2.scope", False, ""),   # `sudo upmt-agent up`
    ("/", True, ""),                                 # a service at the root? the root
    (None, True, ""),                                # unreadable /proc/self/cgroup
    ("/a/../b", True, ""),                           # odd: the root
])
def test_rule_base(own: str | None, systemd: bool, base: str) -> None:
    assert rule_base(own, systemd) == base


def _cgroups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, own: str, systemd: bool,
             make_unit_dir: bool = True) -> RuleCgroups:
    root = tmp_path / "cg"
    (root / UNIT if make_unit_dir else root).mkdir(parents=True)
    monkeypatch.setattr(cgroups, "cgroup2_root", lambda: root)
    proc = tmp_path / "self-cgroup"
    proc.write_text(f"0::{own}\n")
    return RuleCgroups("/run/upmt/agent.sock", ["web", "ssh"], proc_cgroup=str(proc),
                       under_systemd=systemd)


def test_rule_cgroups_under_systemd_live_in_the_units_subtree(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cg = _cgroups(tmp_path, monkeypatch, "/" + UNIT, True)
    root = tmp_path / "cg"
    assert cg.relative("web") == f"{UNIT}/{cg.tag}/web"     # what nft's socket cgroupv2 gets
    assert cg.path("web") == root / UNIT / cg.tag / "web"    # what `run` joins
    cg.create()
    assert (root / UNIT / cg.tag / "ssh").is_dir() and not (root / cg.tag).exists()
    cg.remove()
    assert not (root / UNIT / cg.tag).exists()
    # ExecStopPost's cleanup (in the unit's .control subgroup) finds a killed run's
    again = _cgroups(tmp_path / "2", monkeypatch, "/" + UNIT, True)
    again.create()
    (tmp_path / "ctl").write_text(f"0::/{UNIT}/.control\n")
    after = RuleCgroups("/run/upmt/agent.sock", [], proc_cgroup=str(tmp_path / "ctl"),
                        under_systemd=True)
    assert after.remove_leftovers() == 3
    assert not (tmp_path / "2" / "cg" / UNIT / cg.tag).exists()


def test_rule_cgroups_elsewhere_stay_at_the_root(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cg = _cgroups(tmp_path, monkeypatch, "/user.slice/session-2.scope", False)
    assert cg.relative("web") == f"{cg.tag}/web"
    assert cg.path("web") == tmp_path / "cg" / cg.tag / "web"
    # a service whose cgroup is not in this mount (a namespace's own cgroup2 mount): root
    other = _cgroups(tmp_path / "3", monkeypatch, "/" + UNIT, True, make_unit_dir=False)
    assert other.relative("web") == f"{other.tag}/web"
