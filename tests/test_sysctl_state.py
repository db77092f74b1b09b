"""The sysctl state file: what a killed run saved is restored, and nothing else.

Security round two, item 6: at start the agent applied ``<control path>.state`` whoever
owned it; with ``--control`` in a world-writable directory an unprivileged user set
``net.ipv4.ip_default_ttl``, ``ip_forward`` and ``icmp_echo_ignore_all`` (any sysctl,
``kernel.core_pattern`` included) and they stayed after the agent stopped. /proc/sys is
replaced by a directory of plain files here, so nothing on the machine changes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from upmt_tun.system import sysctl

KEYS = {"net.ipv4.ip_forward": "0", "net.ipv4.conf.wan1.src_valid_mark": "0",
        "net.ipv4.ip_default_ttl": "64", "kernel.core_pattern": "core"}


@pytest.fixture
def proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "proc-sys"
    for key, value in KEYS.items():
        p = sysctl.sysctl_path(key)          # still under the real /proc/sys: re-root it
        q = root / p.relative_to("/proc/sys")
        q.parent.mkdir(parents=True, exist_ok=True)
        q.write_text(value + "\n")
    monkeypatch.setattr(sysctl, "_PROC_SYS", root)
    return root


def now(key: str) -> str:
    return sysctl.read(key)


def attack_values() -> dict[str, str]:
    return {"net.ipv4.ip_forward": "1", "net.ipv4.conf.wan1.src_valid_mark": "1",
            "net.ipv4.ip_default_ttl": "1", "kernel.core_pattern": "|/tmp/evil %p"}


def test_own_state_is_restored_after_a_kill(proc: Path, tmp_path: Path) -> None:
    state = str(tmp_path / "agent.sock.state")
    s = sysctl.SysctlSaver(state)
    s.set("net.ipv4.conf.wan1.src_valid_mark", "1")
    s.set("net.ipv4.ip_forward", "1")
    st = os.stat(state)
    assert st.st_mode & 0o777 == 0o600 and st.st_uid == os.geteuid()
    # killed here: the next start mends it
    sysctl.SysctlSaver(state).restore_leftovers()
    assert now("net.ipv4.conf.wan1.src_valid_mark") == "0" and now("net.ipv4.ip_forward") == "0"
    assert not os.path.exists(state)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_state_file_owned_by_someone_else_is_refused(proc: Path, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "agent.sock.state"
    state.write_text(json.dumps(attack_values()))
    os.chmod(state, 0o600)
    os.chown(state, 65534, 65534)
    sysctl.SysctlSaver(str(state)).restore_leftovers()
    assert {k: now(k) for k in KEYS} == KEYS
    assert "refusing state file" in caplog.text and "owned by uid 65534" in caplog.text
    assert state.exists()                    # not ours: not even deleted


def test_a_state_file_others_can_write_is_refused(proc: Path, tmp_path: Path) -> None:
    state = tmp_path / "agent.sock.state"
    state.write_text(json.dumps(attack_values()))
    os.chmod(state, 0o666)
    sysctl.SysctlSaver(str(state)).restore_leftovers()
    assert {k: now(k) for k in KEYS} == KEYS


def test_only_the_keys_upmt_sets_are_restored(proc: Path, tmp_path: Path) -> None:
    state = tmp_path / "agent.sock.state"
    state.write_text(json.dumps({**attack_values(), "net.ipv4.ip_forward": "1; reboot",
                                 "net.ipv4.conf.wan1.src_valid_mark": "1"}))
    os.chmod(state, 0o600)
    sysctl.SysctlSaver(str(state)).restore_leftovers()
    assert now("net.ipv4.conf.wan1.src_valid_mark") == "1"      # ours: restored
    for key in ("net.ipv4.ip_forward", "net.ipv4.ip_default_ttl", "kernel.core_pattern"):
        assert now(key) == KEYS[key]


def test_a_planted_symlink_is_neither_read_nor_written_through(proc: Path,
                                                               tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text(json.dumps(attack_values()))
    os.chmod(target, 0o600)
    state = tmp_path / "agent.sock.state"
    state.symlink_to(target)
    (tmp_path / "agent.sock.state.tmp").symlink_to(target)
    sysctl.SysctlSaver(str(state)).restore_leftovers()
    assert {k: now(k) for k in KEYS} == KEYS
    s = sysctl.SysctlSaver(str(state))
    s.set("net.ipv4.ip_forward", "1")       # persisting replaces the links, not the target
    assert json.loads(target.read_text()) == attack_values()
    assert not state.is_symlink() and json.loads(state.read_text()) == {
        "net.ipv4.ip_forward": "0"}
