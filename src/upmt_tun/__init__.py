"""upmt_tun: Universal Per-application Mobility management using Tunnels.

A Mobile Host runs ``upmt-agent up``; an Anchor Node runs ``upmt-anchor``; a program
embeds either one with the asyncio API exported here (``docs/api.md``)::

    async with upmt_tun.Agent.open("/etc/upmt/agent.toml") as agent:
        await agent.ready()
        async for ev in agent.events():
            ...

The pure cores (``tables``, ``nat``, ``policy``, ``dataplane.packet``,
``dataplane.forwarder``, ``signalling``) do no I/O; ``agent`` and ``anchor``
drive them with asyncio; ``system`` changes the host and undoes it; ``api`` puts
them together in the caller's event loop.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .config import (
    AgentConfig,
    AnchorConfig,
    ConfigError,
    Rule,
    load_agent_config,
    load_anchor_config,
)
from .events import (
    AnchorAssociated,
    AnchorLost,
    Dropped,
    Event,
    FlowClosed,
    FlowMoved,
    FlowNew,
    HostAssociated,
    HostLost,
    PathQuality,
    PeerPath,
    Subscription,
    TunnelDown,
    TunnelUp,
)

if TYPE_CHECKING:   # imported on first use: the CLI's status/move need none of it
    from .agent import MoveError, UsageError
    from .api import Agent, Anchor, FlowChoice, PathOption, Policy, ReturnChoice
    from .control import ControlError
    from .system.errors import StartupError, SystemSetupError

__all__ = [
    "Agent", "AgentConfig", "Anchor", "AnchorAssociated", "AnchorConfig", "AnchorLost",
    "ConfigError", "ControlError", "Dropped", "Event", "FlowChoice", "FlowClosed",
    "FlowMoved", "FlowNew",
    "HostAssociated", "HostLost", "MoveError", "PathOption", "PathQuality", "PeerPath",
    "Policy", "ReturnChoice", "Rule", "StartupError", "Subscription", "SystemSetupError",
    "TunnelDown", "TunnelUp", "UsageError", "__version__", "load_agent_config",
    "load_anchor_config",
]
__version__ = "0.1.0"

_LAZY = {
    "Agent": "api", "Anchor": "api", "FlowChoice": "api", "PathOption": "api",
    "Policy": "api", "ReturnChoice": "api", "MoveError": "agent", "UsageError": "agent",
    "ControlError": "control", "StartupError": "system.errors", "SystemSetupError": "system.errors",
}


def __getattr__(name: str) -> Any:
    """The API (and with it pyroute2 and the data plane) is imported on first use."""
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'upmt_tun' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


logging.getLogger(__name__).addHandler(logging.NullHandler())
