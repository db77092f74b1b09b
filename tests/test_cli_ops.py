"""The command line for operators: --version, --help of every command, key hygiene (a
private key others can read). No root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from upmt_tun import __version__, keys, runtime
from upmt_tun.cli import agent_main, anchor_main

from .test_cli import AGENT_PY, ANCHOR_PY, KEYLESS_AGENT, KEYLESS_ANCHOR, one_line, run

AGENT_COMMANDS = ("up", "down", "status", "reload", "move", "run", "cleanup", "check",
                  "genkey", "pubkey")
ANCHOR_COMMANDS = ("status", "reload", "cleanup", "check", "genkey", "pubkey")


@pytest.mark.parametrize("code,prog", [(AGENT_PY, "upmt-agent"), (ANCHOR_PY, "upmt-anchor")])
def test_version(code: str, prog: str) -> None:
    r = run(code, "--version")
    assert r.returncode == 0
    assert r.stdout.decode().strip() == f"{prog} {__version__}"


def test_agent_help_lists_every_command_and_each_has_its_own() -> None:
    r = run(AGENT_PY, "--help")
    assert r.returncode == 0
    top = r.stdout.decode()
    for cmd in AGENT_COMMANDS:
        assert f"\n    {cmd} " in top, cmd
        sub = run(AGENT_PY, cmd, "--help")
        assert sub.returncode == 0, cmd
        text = sub.stdout.decode()
        assert text.startswith(f"usage: upmt-agent {cmd}"), text
        # a description of its own, not just the usage line and the options
        assert len(text.split("\n\n")) >= 3, text


def test_anchor_help_lists_its_commands_and_each_has_its_own() -> None:
    r = run(ANCHOR_PY, "--help")
    assert r.returncode == 0
    top = r.stdout.decode()
    for cmd in ANCHOR_COMMANDS:
        assert f"\n  {cmd} " in top, cmd
        sub = run(ANCHOR_PY, cmd, "--help")
        assert sub.returncode == 0, cmd
        text = sub.stdout.decode()
        assert text.startswith(f"usage: upmt-anchor {cmd}"), text
        assert len(text.split("\n\n")) >= 3, text
    assert "--config" in top and "--version" in top


@pytest.mark.parametrize("code", [AGENT_PY, ANCHOR_PY])
def test_reload_help_says_what_is_applied_and_what_needs_a_restart(code: str) -> None:
    text = " ".join(run(code, "reload", "--help").stdout.decode().split())
    assert "Restart needed:" in text and "restart needed for" in text
    assert "SIGHUP" in text and "changes nothing" in text and "(exit 2)" in text


@pytest.mark.parametrize("code", [AGENT_PY, ANCHOR_PY])
def test_reload_with_nothing_running_is_one_line(tmp_path: Path, code: str) -> None:
    r = run(code, "reload", "--control", str(tmp_path / "none.sock"))
    assert r.returncode == 1
    assert "nothing is running on control socket" in one_line(r.stderr.decode())


@pytest.mark.parametrize("code", [AGENT_PY, ANCHOR_PY])
@pytest.mark.parametrize("mode,warns", [(0o644, True), (0o640, True), (0o600, False)])
def test_genkey_warns_when_the_file_is_readable_by_others(tmp_path: Path, code: str,
                                                          mode: int, warns: bool) -> None:
    key = tmp_path / "key"
    key.touch()
    key.chmod(mode)
    with open(key, "w") as out:
        r = subprocess.run([sys.executable, "-c", code, "genkey"], stdout=out,
                           stderr=subprocess.PIPE, timeout=30)
    assert r.returncode == 0
    keys.public_of(key.read_text())              # the key is written either way
    err = r.stderr.decode()
    if warns:
        assert "group/others can read" in one_line(err) and f"{mode:04o}" in err
    else:
        assert err == ""


def test_genkey_to_a_pipe_does_not_warn() -> None:
    r = run(AGENT_PY, "genkey")
    assert r.returncode == 0 and r.stderr == b""


def _key_file(tmp_path: Path, mode: int) -> None:
    (tmp_path / "k.key").write_text(keys.generate() + "\n")
    (tmp_path / "k.key").chmod(mode)


def test_agent_warns_about_a_key_file_others_can_read(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    started: list[Any] = []
    monkeypatch.setattr(runtime, "run_agent", lambda cfg, control: started.append(cfg))
    cfg = tmp_path / "agent.toml"
    cfg.write_text('private_key_file = "k.key"\n' + KEYLESS_AGENT)
    _key_file(tmp_path, 0o644)
    assert agent_main(["up", "--config", str(cfg)]) == 0
    (warning,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "private_key_file" in warning.message and "0644" in warning.message
    assert len(started) == 1                   # a warning: the agent still starts
    caplog.clear()
    (tmp_path / "k.key").chmod(0o600)
    assert agent_main(["up", "--config", str(cfg)]) == 0
    assert [r for r in caplog.records if r.levelname == "WARNING"] == []


def test_anchor_refuses_a_key_file_others_can_read(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    started: list[Any] = []
    monkeypatch.setattr(runtime, "run_anchor", lambda cfg, control: started.append(cfg))
    cfg = tmp_path / "anchor.toml"
    cfg.write_text('private_key_file = "k.key"\n' + KEYLESS_ANCHOR)
    _key_file(tmp_path, 0o604)
    assert anchor_main(["--config", str(cfg)]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"upmt-anchor: {cfg}: private_key_file: ") and "0604" in line
    assert "chmod 600" in line
    assert started == []
    (tmp_path / "k.key").chmod(0o400)
    assert anchor_main(["--config", str(cfg)]) == 0
    assert len(started) == 1


def test_inline_key_and_missing_key_file_are_not_this_check(tmp_path: Path) -> None:
    from upmt_tun.cli import key_file_exposed

    cfg = tmp_path / "anchor.toml"
    cfg.write_text(f'private_key = "{keys.generate()}"\n')
    assert key_file_exposed(str(cfg)) is None
    cfg.write_text('private_key_file = "nope.key"\n')
    assert key_file_exposed(str(cfg)) is None      # loading reports a missing file
    assert key_file_exposed(str(tmp_path / "absent.toml")) is None
