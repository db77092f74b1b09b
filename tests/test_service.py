"""How the daemons talk to their starter (service.py): sd_notify datagrams, journald
priority prefixes, and a terminal or pipe that went away. No root."""

from __future__ import annotations

import io
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from upmt_tun import service
from upmt_tun.service import ConsoleHandler, journal_priority, notify, on_journal


def test_notify_sends_one_datagram_to_the_notify_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(path)
        srv.settimeout(2)
        assert notify("READY=1", {"NOTIFY_SOCKET": path}) is True
        assert srv.recv(4096) == b"READY=1"


def test_notify_abstract_socket() -> None:
    name = f"upmt-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind("\0" + name)
        srv.settimeout(2)
        assert notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name}) is True
        assert srv.recv(4096) == b"STOPPING=1"


def test_notify_without_a_manager_or_with_a_dead_socket(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    assert notify("READY=1", {}) is False
    assert notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "nobody")}) is False
    assert notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:1234"}) is False
    assert "cannot notify" in caplog.text


def test_journal_priorities() -> None:
    assert [journal_priority(lv) for lv in (logging.CRITICAL, logging.ERROR, logging.WARNING,
                                            logging.INFO, logging.DEBUG)] == [2, 3, 4, 6, 7]


def _record(level: int, msg: str) -> logging.LogRecord:
    return logging.LogRecord("upmt_tun.x", level, __file__, 1, msg, None, None)


def test_log_lines_carry_priorities_on_the_journal() -> None:
    h = ConsoleHandler("upmt-agent", journal=True)
    assert h.format(_record(logging.ERROR, "boom")) == "<3>boom"
    assert h.format(_record(logging.WARNING, "hm")) == "<4>hm"
    assert h.format(_record(logging.INFO, "two\nlines")) == "<6>two\n<6>lines"
    plain = ConsoleHandler("upmt-agent", journal=False)
    assert plain.format(_record(logging.WARNING, "hm")) == "upmt-agent: WARNING: hm"


def test_journal_stream_must_name_this_stderr(tmp_path: Path) -> None:
    """JOURNAL_STREAM is inherited by children whose stderr was redirected: only a device
    and inode that match fd 2 mean the journal."""
    f = tmp_path / "err"
    with open(f, "w") as out:
        st = os.fstat(out.fileno())
        assert on_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, out.fileno())
        assert not on_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, out.fileno())
        assert not on_journal({"JOURNAL_STREAM": "garbage"}, out.fileno())
        assert not on_journal({}, out.fileno())


def test_journal_detected_from_the_environment() -> None:
    """The daemon's own handler under systemd: JOURNAL_STREAM = stderr's dev:ino."""
    code = ("import logging, os, sys\n"
            "st = os.fstat(2)\n"
            "os.environ['JOURNAL_STREAM'] = f'{st.st_dev}:{st.st_ino}'\n"
            "from upmt_tun.service import ConsoleHandler\n"
            "log = logging.getLogger('upmt_tun'); log.addHandler(ConsoleHandler('upmt-agent'))\n"
            "log.error('bad'); log.warning('meh')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.stderr.splitlines() == ["<3>bad", "<4>meh"]


def test_closed_stdout_and_stderr_never_raise(tmp_path: Path) -> None:
    """A reader that went away (EPIPE) while the daemon prints `ready` and logs: no
    exception, no traceback, and no exit 120 from the flush at exit."""
    done = tmp_path / "done"
    code = ("import logging, sys, time\n"
            "from upmt_tun.service import ConsoleHandler, say\n"
            "time.sleep(0.3)\n"                 # the parent closes the pipes meanwhile
            "log = logging.getLogger('upmt_tun'); log.addHandler(ConsoleHandler('upmt-agent'))\n"
            "ok = say('ready')\n"
            "log.warning('x' * 100000)\n"
            "print('more', flush=True)\n"
            "log.warning('again')\n"
            f"open({str(done)!r}, 'w').write(str(ok))\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()
    p.stderr.close()
    assert p.wait(30) == 0
    assert done.read_text() == "False"


def test_say_prints(capsys: pytest.CaptureFixture[str]) -> None:
    assert service.say("ready") is True
    assert capsys.readouterr().out == "ready\n"


def test_handler_passes_other_errors_on(capsys: pytest.CaptureFixture[str]) -> None:
    """Only a dead stream is muted; a formatting bug is reported as logging always does."""
    h = ConsoleHandler("upmt-agent", journal=False)
    h.setStream(io.StringIO())
    h.emit(logging.LogRecord("x", logging.INFO, __file__, 1, "%d", ("notanumber",), None))
    assert "Logging error" in capsys.readouterr().err
