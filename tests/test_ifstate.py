"""InterfaceState: carrier + address + gateway from kernel events, with fake seams."""

from __future__ import annotations

import asyncio

from upmt_tun.system.ifstate import DEBOUNCE, InterfaceState


class Seams:
    def __init__(self) -> None:
        self.kernel = {"wan1": ("10.1.0.2", "10.1.0.1"), "wan2": ("10.2.0.2", "10.2.0.1")}
        self.routes: list[tuple[str, str | None]] = []
        self.usable: list[tuple[str, bool]] = []
        self.changed: list[str] = []
        self.on_tun: set[str] = set()          # addresses kept for the connections using them

    def state(self, configured: dict[str, str | None] | None = None) -> InterfaceState:
        return InterfaceState({3: "wan1", 4: "wan2"}, {"wan1": "10.1.0.2", "wan2": "10.2.0.2"},
                              {"wan1": "10.1.0.1", "wan2": "10.2.0.1"},
                              configured or {}, read=self.read, set_route=self.set_route,
                              on_usable=lambda n, u, why: self.usable.append((n, u)),
                              on_changed=self.changed.append, adopt=self.adopt,
                              release=self.release)

    async def adopt(self, address: str) -> None:
        self.on_tun.add(address)

    async def release(self, address: str) -> None:
        self.on_tun.discard(address)

    def read(self, name: str) -> tuple[str | None, str | None]:
        if name not in self.kernel:
            raise OSError(f"no interface {name}")
        return self.kernel[name]

    async def set_route(self, name: str, gw: str | None) -> None:
        self.routes.append((name, gw))


async def settle() -> None:
    await asyncio.sleep(DEBOUNCE * 3)


async def test_link_down_at_once_up_only_after_its_route_is_back() -> None:
    k = Seams()
    s = k.state()
    s.on_event("link", 3, False)
    assert k.usable == [("wan1", False)]              # synchronously: flows move now
    s.on_event("link", 3, False)                       # repeated: nothing new
    s.on_event("link", 3, True)
    assert k.usable == [("wan1", False)] and k.routes == []
    await settle()
    assert k.routes == [("wan1", "10.1.0.1")] and k.usable[-1] == ("wan1", True)
    s.on_event("link", 99, False)                      # not ours
    assert len(k.usable) == 2


async def test_losing_the_address_makes_it_unusable_until_one_returns() -> None:
    k = Seams()
    s = k.state()
    k.kernel["wan1"] = (None, None)                    # DHCP lease gone
    for _ in range(5):                                 # a burst of events: one re-read
        s.on_event("addr", 3, False)
    await settle()
    assert k.usable == [("wan1", False)] and k.routes == []
    assert k.on_tun == {"10.1.0.2"}                     # its connections live on
    k.kernel["wan1"] = ("10.1.0.77", "10.1.0.1")       # a new lease, another address
    s.on_event("addr", 3, False)
    await settle()
    assert k.usable == [("wan1", False), ("wan1", True)]
    assert k.routes == [("wan1", "10.1.0.1")]
    k.kernel["wan1"] = ("10.1.0.2", "10.1.0.1")        # the old address again: given back
    s.on_event("addr", 3, False)
    await settle()
    assert k.on_tun == {"10.1.0.77"}


async def test_new_address_or_gateway_on_a_working_link_is_a_path_change() -> None:
    k = Seams()
    s = k.state()
    s.on_event("addr", 3, False)                       # first read: nothing changed
    await settle()
    assert k.changed == [] and k.routes == []
    k.kernel["wan1"] = ("10.1.0.9", "10.1.0.1")
    s.on_event("addr", 3, False)
    await settle()
    assert k.changed == ["wan1"] and k.routes == [("wan1", "10.1.0.1")]
    k.kernel["wan2"] = ("10.2.0.2", "10.2.0.254")      # a new default gateway
    s.on_event("route", 0, False)                      # a route event without interface
    await settle()
    assert k.changed == ["wan1", "wan2"] and k.routes[-1] == ("wan2", "10.2.0.254")
    assert s.gateway == {"wan1": "10.1.0.1", "wan2": "10.2.0.254"}
    k.kernel["wan2"] = ("10.2.0.2", None)              # its main-table route went away:
    s.on_event("route", 4, False)                      # our own table keeps the last one
    await settle()
    assert s.gateway["wan2"] == "10.2.0.254" and len(k.routes) == 2
    assert all(u for _, u in k.usable)


async def test_a_configured_gateway_wins_and_a_vanished_interface_is_unusable() -> None:
    k = Seams()
    s = k.state({"wan1": "10.1.0.1"})
    k.kernel["wan1"] = ("10.1.0.2", "10.1.0.200")
    s.on_event("route", 3, False)
    await settle()
    assert s.gateway["wan1"] == "10.1.0.1" and k.changed == []
    del k.kernel["wan1"]
    s.on_event("addr", 3, False)
    await settle()
    assert k.usable == [("wan1", False)]
    s.close()
