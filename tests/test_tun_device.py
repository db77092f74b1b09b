"""The real TUN device: python-pytun creates it, the fd is ours (non-blocking, close-on-exec).

Root only (it creates a TUN device, with a name unique to the run, and removes it)."""

from __future__ import annotations

import asyncio
import fcntl
import importlib
import os
import secrets
import subprocess

import pytest

from upmt_tun.dataplane import io

from .conftest import netns_missing

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(netns_missing() is not None, reason=str(netns_missing()))]


def link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


@pytest.mark.parametrize("with_pytun", [True, False], ids=["pytun", "ioctl"])
def test_tun_device_is_created_non_blocking_and_gone_on_close(
        with_pytun: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not with_pytun:
        real = importlib.import_module

        def no_pytun(name: str, package: str | None = None) -> object:
            if name == "pytun":
                raise ImportError(name)
            return real(name, package)

        monkeypatch.setattr(io.importlib, "import_module", no_pytun)
    name = f"ut{secrets.token_hex(3)}"
    loop = asyncio.new_event_loop()
    try:
        tun = io.TunDevice(name, loop, offload=True)
        try:
            assert tun.name == name and link_exists(name)
            assert (tun._owner is not None) == with_pytun        # noqa: SLF001
            assert not os.get_blocking(tun.fd)
            assert fcntl.fcntl(tun.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            with pytest.raises(BlockingIOError):
                os.read(tun.fd, 65536)                 # down, nothing queued: no wait
            tso = io.TUN_F_CSUM | io.TUN_F_TSO4 | io.TUN_F_TSO6
            assert tun.offloads in (tso, tso | io.TUN_F_USO4 | io.TUN_F_USO6)  # USO: 6.2+
            assert tun.uso == bool(tun.offloads & io.TUN_F_USO4)
        finally:
            tun.close()
        assert not link_exists(name)
    finally:
        loop.close()


def test_a_bad_tun_name_is_one_line() -> None:
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(OSError, match=r"^.*cannot create TUN device x{20}: "):
            io.TunDevice("x" * 20, loop)
    finally:
        loop.close()
