"""The driver of :mod:`hotplug`: devices created after the start follow their entry.

``runtime.run_agent`` reads the entries at start with :func:`entries` and hands the
kernel's link messages (:class:`system.linkwatch.LinkWatch` ``on_name``) to
:class:`Hotplug`, which carries out what :class:`hotplug.Slots` decides.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from collections.abc import Callable

from .agent import Agent
from .config import AgentConfig
from .dataplane.io import PathSocket, open_udp
from .hotplug import Bind, Change, Slots
from .system import netlink
from .system.agent_host import AgentHost
from .system.errors import SystemSetupError
from .system.ifstate import InterfaceState

__all__ = ["Hotplug", "entries"]

log = logging.getLogger(__name__)
Iface = tuple[netlink.IfaceInfo, str | None]


def entries(cfg: AgentConfig, discover: Callable[[AgentConfig], list[Iface]]
            ) -> tuple[list[Iface], Slots | None]:
    """(interface info, gateway) per ``[[interface]]`` entry, which may be a pattern or
    name a device that does not exist (yet); ``discover(cfg)`` when none is listed (the
    interfaces with a default route). Each info carries the *entry's* name (the name
    rules, links and status use) and the device behind it now; an entry without a device
    gets index 0, no address, no carrier (down until one comes: :class:`Hotplug`)."""
    if not cfg.interfaces:
        return discover(cfg), None
    slots = Slots([ic.name for ic in cfg.interfaces], netlink.list_links())
    out = []
    for ic in cfg.interfaces:
        device = slots.device(ic.name)
        if device is None:
            out.append((netlink.IfaceInfo(ic.name, 0, None, None, 0, None, carrier=False),
                        ic.gateway))
            continue
        info = dataclasses.replace(netlink.interface_info(device), name=ic.name)
        out.append((info, ic.gateway or info.gateway))
    return out, slots


class Hotplug:
    """Follows the devices behind the ``[[interface]]`` entries (:mod:`hotplug`) from the
    kernel's link events: a device created after the start, or deleted and created again
    (a USB tether plugged back: a new ifindex), gets the entry's tunnel socket (moved to
    it with SO_BINDTODEVICE), ``src_valid_mark``, its routing table (made when it has an
    address) and the entry's links, which handshake again; a device that goes takes the
    entry down (its flows move at once)."""

    def __init__(self, slots: Slots, seams: dict[str, PathSocket], marks: dict[str, int],
                 host: AgentHost, state: InterfaceState, agent: Agent) -> None:
        self.slots, self.seams, self.marks = slots, seams, marks
        self.host, self.state, self.agent = host, state, agent
        self._tasks: set[asyncio.Task[None]] = set()

    def on_name(self, index: int, name: str | None, exists: bool) -> None:
        """A :class:`LinkWatch` link message (index 0: events were lost, list again)."""
        if index == 0:
            task = asyncio.get_running_loop().create_task(self._resync())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        self.apply(self.slots.on_link(index, name, exists))

    async def _resync(self) -> None:
        try:
            present = await asyncio.to_thread(netlink.list_links)
        except SystemSetupError as e:
            log.warning("%s", e)
            return
        changes = self.slots.resync(present)
        self.apply(changes)
        for c in changes:         # no link event follows a listing: re-read each one
            if isinstance(c, Bind):
                self.state.on_event("link", c.index, True)

    def apply(self, changes: list[Change]) -> None:
        for c in changes:
            if isinstance(c, Bind):
                self._bind(c)
            else:
                log.info("interface %s: device %s is gone", c.slot, c.device)
                self.state.unbind(c.slot)
                self.host.bind_device(c.slot, None)
                self.agent.devices[c.slot] = None

    def _bind(self, c: Bind) -> None:
        path = self.seams[c.slot]
        try:
            path.sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, c.device.encode())
        except PermissionError:    # moving a bound socket needs CAP_NET_RAW: a new one
            port = path.local[1]
            # the same family as the socket it replaces (dual-stack for an IPv6 interface)
            any_ip = "::" if path.sock.family == socket.AF_INET6 else "0.0.0.0"
            try:
                path.reopen(lambda: open_udp(any_ip, port, device=c.device,
                                             mark=self.marks[c.slot]))
            except OSError as e:
                log.error("interface %s: cannot bind port %d to %s: %s", c.slot, port,
                          c.device, e.strerror or e)
                return
            log.info("interface %s: a new socket on port %d for %s (moving the bound one "
                     "needs CAP_NET_RAW)", c.slot, port, c.device)
        except OSError as e:
            log.error("interface %s: cannot bind its socket to %s: %s", c.slot, c.device,
                      e.strerror or e)
            return
        try:
            self.host.bind_device(c.slot, c.device)
        except SystemSetupError as e:    # src_valid_mark: strict rp_filter may drop then
            log.warning("interface %s: %s", c.slot, e)
        self.state.bind(c.slot, c.index)
        self.agent.devices[c.slot] = c.device
        log.info("interface %s: device %s (#%d)", c.slot, c.device, c.index)

    def add_entry(self, name: str, path: PathSocket, mark: int, gateway: str | None) -> None:
        """``reload``: a new ``[[interface]]`` entry whose socket, ip rules and nft rule
        exist (the reload driver made them): it takes a device now if one matches, and
        follows them from now on as the others do."""
        self.seams[name], self.marks[name] = path, mark
        self.state.add(name, gateway)
        changes = self.slots.add(name)
        self.apply(changes)
        self._bring_up(changes)

    def remove_entry(self, name: str) -> None:
        """``reload``: entry ``name`` is gone (its flows moved, its links stopped, the
        driver closes its socket): forgotten here; its device may go to a pattern
        entry without one."""
        self.state.remove(name)
        self.agent.devices.pop(name, None)
        self.seams.pop(name, None)
        self.marks.pop(name, None)
        changes = self.slots.remove(name)
        self.apply(changes)
        self._bring_up(changes)

    def _bring_up(self, changes: list[Change]) -> None:
        """A device bound now (not from a link event): read it as if one came, so its
        route is made and it turns usable when it has an address and carrier."""
        for c in changes:
            if isinstance(c, Bind):
                self.state.on_event("link", c.index, True)

    def close(self) -> None:
        for t in self._tasks:
            t.cancel()
