"""Set sysctls, remembering the old values, and put them back.

The saved values also go to a state file, so that the next start mends what a killed run
left. That file is trusted only as far as it must be (security round two: an agent started
with ``--control`` in a world-writable directory applied a state file an unprivileged user
wrote, any sysctl included): it is read only if it is a regular file owned by us and
writable by nobody else, and only the keys upmt_tun itself sets (:data:`OWN_KEYS`), with
small integer values, are ever restored from it. It is written without following links,
mode 0600.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import stat
from pathlib import Path

from upmt_tun.system.errors import SystemSetupError

log = logging.getLogger(__name__)

_PROC_SYS = Path("/proc/sys")

# the sysctls upmt_tun sets (agent: src_valid_mark per access interface; anchor: forwarding)
OWN_KEYS = re.compile(r"net\.ipv4\.ip_forward|net\.ipv4\.conf\.[^.\s]{1,15}\.src_valid_mark")
_VALUE = re.compile(r"-?[0-9]{1,10}")
_STATE_MAX = 65536


def sysctl_path(key: str) -> Path:
    """Path of a sysctl key under /proc/sys, using sysctl(8)'s convention.

    Dots separate components; a slash stands for a dot inside one component
    (``net.ipv4.conf.eth0/100.rp_filter`` is ``.../conf/eth0.100/rp_filter``).
    """
    parts = [part.replace("/", ".") for part in key.split(".")]
    if not all(parts) or any(part in (".", "..") for part in parts):
        raise SystemSetupError(f"bad sysctl key {key!r}")
    return _PROC_SYS.joinpath(*parts)


def iface_key(family_conf: str, iface: str, name: str) -> str:
    """Key of a per-interface sysctl, e.g. ``iface_key("net.ipv4.conf", "eth0", "rp_filter")``."""
    return f"{family_conf}.{iface.replace('.', '/')}.{name}"


def read(key: str) -> str:
    """Current value of a sysctl (stripped)."""
    try:
        return sysctl_path(key).read_text().strip()
    except OSError as exc:
        raise SystemSetupError(f"cannot read sysctl {key}: {exc.strerror or exc}") from None


def _write(key: str, value: str) -> None:
    try:
        sysctl_path(key).write_text(value + "\n")
    except OSError as exc:
        raise SystemSetupError(f"cannot set sysctl {key}={value}: {exc.strerror or exc}") from None


def _read_own_state(path: str) -> dict[object, object] | None:
    """The JSON object in ``path`` if the file is ours (see the module docstring), else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("refusing state file %s: %s", path, exc.strerror or exc)
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            why = "not a regular file"
        elif st.st_uid != os.geteuid():
            why = f"owned by uid {st.st_uid}, not {os.geteuid()}"
        elif st.st_mode & 0o022:
            why = f"writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
        else:
            why = ""
        if why:
            log.warning("refusing state file %s: %s", path, why)
            return None
        raw = f.read(_STATE_MAX + 1)
    try:
        saved = json.loads(raw) if len(raw) <= _STATE_MAX else None
    except ValueError:
        saved = None
    if not isinstance(saved, dict):
        log.warning("ignoring state file %s: not a state file of ours", path)
        return None
    return saved


class SysctlSaver:
    """Sets sysctls and restores each to the value it had before the first ``set``.

    With ``state_file``, the saved values are also written there before any change,
    so that a run killed before it could restore them is mended by the next start
    (:meth:`restore_leftovers`).
    """

    def __init__(self, state_file: str | None = None) -> None:
        self._saved: dict[str, str] = {}
        self.state_file = state_file

    def set(self, key: str, value: str) -> None:
        """Write ``value`` to ``key``, saving the old value the first time this key is set."""
        old = read(key)
        if key not in self._saved:
            self._saved[key] = old
            self._persist()
        if old != value:
            _write(key, value)

    def _persist(self) -> None:
        if self.state_file is None:
            return
        tmp = self.state_file + ".tmp"
        try:
            Path(self.state_file).parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            # never through a link someone planted, never readable by others
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self._saved))
            os.replace(tmp, self.state_file)
        except OSError as exc:
            log.warning("cannot save sysctl state to %s: %s", self.state_file, exc)

    def restore_leftovers(self) -> None:
        """Restore what a killed earlier run saved in ``state_file``, then forget it.

        A state file we did not write (not a regular file, owned by another user, or
        writable by group or others) is refused with one warning and left alone; keys
        outside :data:`OWN_KEYS` or values that are not small integers are skipped."""
        if self.state_file is None:
            return
        saved = _read_own_state(self.state_file)
        if saved is None:
            return
        restorable = {}
        for k, v in saved.items():
            if isinstance(k, str) and isinstance(v, str) and OWN_KEYS.fullmatch(k) \
                    and _VALUE.fullmatch(v):
                restorable[k] = v
            else:
                log.warning("state file %s: ignoring %.60r (not a sysctl upmt_tun sets)",
                            self.state_file, k)
        self._saved = restorable
        self.restore()

    def restore(self) -> None:
        """Put every saved value back (newest first); never raises, logs failures.

        A key that vanished (its interface is gone) is skipped silently.
        """
        for key, value in reversed(list(self._saved.items())):
            try:
                if read(key) != value:
                    _write(key, value)
            except SystemSetupError as exc:
                if sysctl_path(key).exists():
                    log.warning("%s", exc)
                else:
                    log.debug("sysctl %s gone, nothing to restore", key)
        self._saved.clear()
        if self.state_file is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.state_file)
