"""Set sysctls, remembering the old values, and put them back."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from upmt_tun.system.errors import SystemSetupError

log = logging.getLogger(__name__)

_PROC_SYS = Path("/proc/sys")


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
        try:
            Path(self.state_file).parent.mkdir(parents=True, exist_ok=True)
            tmp = self.state_file + ".tmp"
            Path(tmp).write_text(json.dumps(self._saved))
            os.replace(tmp, self.state_file)
        except OSError as exc:
            log.warning("cannot save sysctl state to %s: %s", self.state_file, exc)

    def restore_leftovers(self) -> None:
        """Restore what a killed earlier run saved in ``state_file``, then forget it."""
        if self.state_file is None:
            return
        try:
            saved = json.loads(Path(self.state_file).read_text())
        except (OSError, ValueError):
            return
        if isinstance(saved, dict):
            self._saved = {str(k): str(v) for k, v in saved.items()}
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
