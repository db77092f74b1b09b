"""install.sh's logic, without installing anything: a fake Python stands in for the
interpreter, its venv, pip and pytest (it logs how it was called), apt is off. The real
runs (a venv under /opt, the demo, the test suite) are done by hand and by CI."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "install.sh"

FAKE_PYTHON = r"""#!/bin/sh
echo "$PWD|$PATH|$*" >> "$FAKE_LOG"
case "$1" in
    -c) case "$2" in
            *'"%d.%d"'*) echo "${FAKE_VERSION:-3.11}" ;;
            *'sys.version_info < (3, 11)'*) [ "${FAKE_VERSION:-3.11}" != 3.10 ] ;;
            *get_config_var*) echo sh ;;
        esac
        exit $? ;;
    -m) case "$2" in
            venv) mkdir -p "$4/bin" && cp "$0" "$4/bin/python" && touch "$4/pyvenv.cfg" ;;
            pip) exit 0 ;;
            pytest) exit "${FAKE_RC:-0}" ;;
        esac ;;
esac
"""

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="install.sh runs as root")


def _fake(tmp_path: Path) -> Path:
    py = tmp_path / "fakepy"
    py.write_text(FAKE_PYTHON)
    py.chmod(0o755)
    return py


def _run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "FAKE_LOG": str(tmp_path / "log"), "PYTHON": str(_fake(tmp_path)),
            **env}
    return subprocess.run(["sh", str(SCRIPT), *args], capture_output=True, text=True,
                          env=full, timeout=60, stdin=subprocess.DEVNULL)


def test_posix_syntax() -> None:
    assert subprocess.run(["sh", "-n", str(SCRIPT)]).returncode == 0
    if shutil.which("dash"):
        assert subprocess.run(["dash", "-n", str(SCRIPT)]).returncode == 0


@needs_root
@pytest.mark.parametrize("rc,expect,says", [
    (0, 0, ""),
    (1, 1, "tests failed (pytest exit 1)"),
    (5, 1, "pytest collected no tests (exit 5)"),     # never a silent pass
])
def test_test_mode_runs_pytest_from_the_checkout_with_the_venv(tmp_path: Path, rc: int,
                                                               expect: int, says: str) -> None:
    venv = tmp_path / "venv"
    r = _run(tmp_path, "--test", "--no-apt", "--prefix", str(venv), "--", "-k", "x",
             FAKE_RC=str(rc))
    assert r.returncode == expect, r.stderr
    assert says in r.stderr
    calls = (tmp_path / "log").read_text().splitlines()
    pytest_call = [c for c in calls if "-m pytest" in c]
    assert len(pytest_call) == 1
    cwd, path, argv = pytest_call[0].split("|")
    assert cwd == str(ROOT)
    assert argv == "-m pytest -q -ra --durations=25 -k x"
    assert path.split(":")[0] == str(venv / "bin")          # the venv's commands first
    assert any(c.endswith("-m pip install -q .[test]") for c in calls)
    assert (venv / "pyvenv.cfg").exists()


@needs_root
def test_old_python_is_refused_in_one_line(tmp_path: Path) -> None:
    r = _run(tmp_path, "--test", "--no-apt", "--prefix", str(tmp_path / "v"),
             FAKE_VERSION="3.10")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"install.sh: {tmp_path / 'fakepy'} is Python 3.10; upmt_tun needs 3.11 or newer"]


@needs_root
def test_a_directory_that_is_not_a_venv_is_left_alone(tmp_path: Path) -> None:
    other = tmp_path / "data"
    other.mkdir()
    (other / "precious").write_text("x")
    r = _run(tmp_path, "--test", "--no-apt", "--prefix", str(other))
    assert r.returncode == 1 and "is not a venv; not touching it" in r.stderr
    assert (other / "precious").read_text() == "x"


def test_usage_errors(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("as a user the script first re-runs itself through sudo")
    r = _run(tmp_path, "--bogus")
    assert r.returncode == 1
    assert r.stderr.strip() == "install.sh: unknown option '--bogus' (try --help)"
    r = _run(tmp_path, "--prefix", "relative/dir")
    assert r.returncode == 1 and "absolute path" in r.stderr
    r = _run(tmp_path, "--help")
    assert r.returncode == 0 and "--demo" in r.stdout and "--test" in r.stdout


@needs_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
def test_as_a_user_it_reruns_itself_through_sudo_or_says_why_not() -> None:
    """Without root: through sudo when there is one (a fake sudo here prints what it was
    asked), else one line. The script must be readable by that user: a copy in a
    directory of its own under /tmp (pytest's are root-only)."""
    tmp_path = Path(tempfile.mkdtemp(prefix="upmt-install-"))
    try:
        _as_a_user(tmp_path)
    finally:
        shutil.rmtree(tmp_path)


def _as_a_user(tmp_path: Path) -> None:
    work = tmp_path / "co"
    work.mkdir()
    shutil.copy(SCRIPT, work / "install.sh")
    (work / "pyproject.toml").write_text("")
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    (fakebin / "sudo").write_text('#!/bin/sh\necho "sudo $*"\n')
    (fakebin / "sudo").chmod(0o755)
    for p in (tmp_path, work, fakebin):
        p.chmod(0o755)
    as_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    base = "/usr/bin:/bin"
    r = subprocess.run([*as_user, "env", f"PATH={fakebin}:{base}", "sh",
                        str(work / "install.sh"), "--demo"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("sudo -- env PYTHON=python3 ")
    assert r.stdout.rstrip().endswith(f"sh {work / 'install.sh'} --demo")
    nosudo = tmp_path / "empty"
    nosudo.mkdir()
    nosudo.chmod(0o755)
    for tool in ("id", "dirname", "basename"):
        found = shutil.which(tool, path=base)
        assert found
        os.symlink(found, nosudo / tool)
    r = subprocess.run([*as_user, "env", f"PATH={nosudo}", "/bin/sh",
                        str(work / "install.sh")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert r.stderr.strip() == ("install.sh: needs root: run it as root (sudo is not "
                                "installed here)")
