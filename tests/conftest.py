"""Shared test plumbing: run ``async def`` tests on a fresh event loop (no plugin needed);
tests marked ``virtual_time`` get a loop whose clock jumps to the next timer when idle."""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil

import pytest

from .vtime import VirtualTimeLoop


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if inspect.iscoroutinefunction(pyfuncitem.obj):
        args = {k: pyfuncitem.funcargs[k] for k in pyfuncitem._fixtureinfo.argnames}
        virtual = pyfuncitem.get_closest_marker("virtual_time") is not None
        with asyncio.Runner(loop_factory=VirtualTimeLoop if virtual else None) as runner:
            runner.run(asyncio.wait_for(pyfuncitem.obj(**args), 60))
        return True
    return None


def netns_missing() -> str | None:
    """Why the netns layer cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None
