"""Whether each access interface can carry tunnels, kept up to date from kernel events.

An interface is usable when it has carrier (and is up) *and* an IPv4 address. On an
address or default-route event (:mod:`linkwatch`) the interface is read again
(debounced: DHCP sends bursts): losing its address makes it unusable (its tunnels
go down, their flows move at once); a new default gateway in the main table is
copied into the interface's own routing table, and the agent is told the path
changed (its tunnels then follow the new NAT mapping; the anchor validates it).

A legacy application's socket keeps the source address the kernel chose when it
connected: the access interface's (the agent SNATs it to ``vipa_fix`` on the way
into the TUN). When that address leaves the interface, ``adopt`` keeps it as a /32
on the TUN, so the steered connections that use it live on through another
interface (the paper's promise); ``release`` gives it back when the interface
gets it again. The seams are injected so this runs in tests without root.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

__all__ = ["InterfaceState"]

log = logging.getLogger(__name__)

DEBOUNCE = 0.05


class InterfaceState:
    def __init__(self, names: dict[int, str], addresses: dict[str, str | None],
                 gateways: dict[str, str | None], configured: dict[str, str | None], *,
                 read: Callable[[str], tuple[str | None, str | None]],
                 set_route: Callable[[str, str | None], Awaitable[None]],
                 on_usable: Callable[[str, bool, str], None],
                 on_changed: Callable[[str], None],
                 adopt: Callable[[str], Awaitable[None]] | None = None,
                 release: Callable[[str], Awaitable[None]] | None = None,
                 carrier: dict[str, bool] | None = None) -> None:
        """``read(name)`` -> (IPv4 address, default gateway in the main table), blocking
        (run in a thread); ``set_route(name, gateway)`` re-makes the interface's table;
        ``on_usable(name, usable, why)``; ``on_changed(name)``: same link, new address or
        gateway. ``carrier``: as read at start (default: every interface has it); an
        interface without carrier or address at start is unusable until an event says
        otherwise, and its route is made then (the agent may start before the network)."""
        self.names = names
        self.gateway = dict(gateways)
        self.configured = configured
        self.read, self.set_route = read, set_route
        self.on_usable, self.on_changed = on_usable, on_changed
        self.adopt, self.release = adopt, release
        self.adopted: set[str] = set()
        self.carrier = dict.fromkeys(gateways, True)
        self.carrier.update(carrier or {})
        self.address = dict(addresses)
        self._dirty: set[str] = set()          # carrier returned: route to re-make
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def usable(self, name: str) -> bool:
        return self.carrier[name] and self.address[name] is not None

    def on_event(self, kind: str, index: int, up: bool) -> None:
        """A :mod:`linkwatch` event."""
        if kind == "route" and index == 0:       # every entry that has a device now
            names = [n for n in self.gateway if n in self.names.values()]
        elif index in self.names:
            names = [self.names[index]]
        else:
            return
        for name in names:
            if kind == "link" and not up:
                self._dirty.discard(name)
                if self.carrier[name]:
                    self.carrier[name] = False
                    self.on_usable(name, False, "link down")   # at once: its flows move now
            elif kind == "link":
                if not self.carrier[name]:
                    # usable again only once recheck re-made its route (the kernel dropped
                    # the interface's routes when it went down)
                    self._dirty.add(name)
                    self._schedule(name)
            else:
                self._schedule(name)

    def _schedule(self, name: str) -> None:
        if name in self._timers:
            return
        loop = asyncio.get_running_loop()
        self._timers[name] = loop.call_later(DEBOUNCE, self._start, name)

    def _start(self, name: str) -> None:
        del self._timers[name]
        task = asyncio.get_running_loop().create_task(self.recheck(name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def recheck(self, name: str) -> None:
        """Read ``name`` again and act on what changed."""
        if name not in self.gateway:             # removed by a reload meanwhile
            return
        try:
            address, gateway = await asyncio.to_thread(self.read, name)
        except Exception as e:       # the interface vanished: unusable until it returns
            log.warning("interface %s: %s", name, e)
            address, gateway = None, None
        if name not in self.gateway:
            return
        was_usable, old_address = self.usable(name), self.address[name]
        returned = name in self._dirty
        self._dirty.discard(name)
        self.address[name] = address
        changed = old_address not in (None, address) and address is not None
        if old_address and old_address != address and self.adopt is not None:
            await self._call(self.adopt, old_address, "keep")
            self.adopted.add(old_address)
        if address in self.adopted and self.release is not None:
            await self._call(self.release, address, "give back")
            self.adopted.discard(address)
        new_gw = self.configured.get(name) or gateway
        if new_gw is not None and new_gw != self.gateway[name]:
            changed = True
            self.gateway[name] = new_gw
        if address is not None and (changed or returned or old_address is None):
            try:
                await self.set_route(name, self.gateway[name])
            except Exception as e:   # the tunnel task retries anyway
                log.warning("interface %s: cannot re-make its route: %s", name, e)
        if returned:
            self.carrier[name] = True
        if changed:
            log.info("interface %s: now %s via %s", name, address, self.gateway[name])
        if self.usable(name) != was_usable:
            self.on_usable(name, self.usable(name),
                           "link up" if self.usable(name) else "address lost")
        elif changed and self.usable(name):
            self.on_changed(name)

    def bind(self, name: str, index: int) -> None:
        """Entry ``name`` is device #``index`` from now on (hotplug: a device created
        after the start, or deleted and created again). It starts as a new device: no
        carrier, no address; the link event that follows (or :meth:`on_event`) brings it
        up as any interface that comes back: route re-made, then usable."""
        self._forget_index(name)
        self.names[index] = name
        self.carrier[name] = False
        self.gateway[name] = self.configured.get(name)

    def unbind(self, name: str) -> None:
        """Entry ``name`` lost its device (deleted, renamed away): unusable at once (its
        flows move now), and its address is kept on the TUN for the connections that use
        it, as when an interface loses its address."""
        self._forget_index(name)
        if (h := self._timers.pop(name, None)) is not None:
            h.cancel()
        self._dirty.discard(name)
        was_usable, old = self.usable(name), self.address[name]
        self.carrier[name], self.address[name] = False, None
        if was_usable:
            self.on_usable(name, False, "interface gone")
        if old and self.adopt is not None:
            self.adopted.add(old)
            task = asyncio.get_running_loop().create_task(self._call(self.adopt, old, "keep"))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def add(self, name: str, gateway: str | None) -> None:
        """``reload``: a new entry, without a device for now (:meth:`bind` gives it one;
        ``gateway``: the configured one, None: the main table's)."""
        self.configured[name] = gateway
        self.gateway[name] = gateway
        self.carrier[name], self.address[name] = False, None

    def remove(self, name: str) -> None:
        """``reload``: entry ``name`` is no longer used: forgotten (no event about it is
        acted on from now on; the driver moved its flows)."""
        self._forget_index(name)
        if (h := self._timers.pop(name, None)) is not None:
            h.cancel()
        self._dirty.discard(name)
        self.configured.pop(name, None)
        self.gateway.pop(name, None)
        self.carrier.pop(name, None)
        self.address.pop(name, None)

    def set_gateway(self, name: str, gateway: str | None) -> None:
        """``reload``: entry ``name``'s configured ``gateway`` changed (None: the main
        table's from now on): its table's route is made again (when it has an address)."""
        if name not in self.gateway:
            return
        self.configured[name] = gateway
        self.gateway[name] = None         # whatever it was: recheck makes the route again
        if name in self.names.values():
            self._schedule(name)

    def _forget_index(self, name: str) -> None:
        for index in [i for i, n in self.names.items() if n == name]:
            del self.names[index]

    @staticmethod
    async def _call(fn: Callable[[str], Awaitable[None]], address: str, what: str) -> None:
        try:
            await fn(address)
            log.info("%s %s for the connections that use it", what, address)
        except Exception as e:
            log.warning("cannot %s %s: %s", what, address, e)

    def close(self) -> None:
        for h in self._timers.values():
            h.cancel()
        self._timers.clear()
        for t in self._tasks:
            t.cancel()
