"""Interfaces created after the start and ``[[interface]]`` patterns (issue 12 item 5):
the pure slot selection, the link-name parsing, the config, the ruleset, the state of
an entry whose device goes and comes back, and a path socket reopened on its port."""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path

import pytest

from upmt_tun.config import ConfigError, load_agent_config
from upmt_tun.hotplug import Bind, Slots, Unbind, is_pattern, matches
from upmt_tun.system import linkwatch as lw
from upmt_tun.system.agent_host import IfacePlan, agent_ruleset
from upmt_tun.system.ifstate import DEBOUNCE

from .test_ifstate import Seams


def test_patterns_are_fnmatch_style_and_literals_match_themselves() -> None:
    assert is_pattern("usb*") and is_pattern("wl?n0") and is_pattern("eth[01]")
    assert not is_pattern("wlan0") and not is_pattern("eth0.100")
    assert matches("usb*", "usb0") and matches("usb*", "usb") and not matches("usb*", "xusb0")
    assert matches("eth[01]", "eth1") and not matches("eth[01]", "eth2")
    assert matches("wlan0", "wlan0") and not matches("wlan0", "wlan01")
    assert not matches("USB*", "usb0")                      # case matters, as in the kernel


def test_start_literals_first_then_patterns_in_order_each_one_device() -> None:
    present = {1: "lo", 2: "usb1", 3: "usb0", 4: "wlan0"}
    s = Slots(["usb*", "usb0", "wwan0", "usb?"], present)
    # usb0 is the literal entry's; usb* takes the first other match by name, usb? none left
    assert s.bound == {"usb0": (3, "usb0"), "usb*": (2, "usb1"), "wwan0": None, "usb?": None}
    assert s.device("usb*") == "usb1" and s.device("wwan0") is None
    assert s.slot_of(3) == "usb0" and s.slot_of(4) is None


def test_a_device_created_later_deleted_and_created_again_is_followed() -> None:
    s = Slots(["wlan0", "usb*"], {1: "lo", 2: "wlan0"})
    assert s.bound["usb*"] is None
    assert s.on_link(5, "eth9", True) == []                    # not ours
    assert s.on_link(7, "usb0", True) == [Bind("usb*", "usb0", 7)]
    assert s.on_link(7, "usb0", True) == []                    # a change of flags: nothing
    assert s.on_link(7, "usb0", False) == [Unbind("usb*", "usb0", 7)]
    assert s.on_link(9, "usb0", True) == [Bind("usb*", "usb0", 9)]   # a new ifindex
    # the literal one too: deleted and back
    assert s.on_link(2, "wlan0", False) == [Unbind("wlan0", "wlan0", 2)]
    assert s.on_link(11, "wlan0", True) == [Bind("wlan0", "wlan0", 11)]


def test_a_pattern_moves_to_the_next_match_and_follows_renames() -> None:
    s = Slots(["usb*"], {3: "usb0", 4: "usb1"})
    assert s.bound["usb*"] == (3, "usb0")
    assert s.on_link(3, None, False) == [Unbind("usb*", "usb0", 3), Bind("usb*", "usb1", 4)]
    # udev renames a new device after its creation: the pattern follows the name
    assert s.on_link(4, "usbtether", True) == [Unbind("usb*", "usb1", 4),
                                               Bind("usb*", "usbtether", 4)]
    assert s.on_link(4, "eth5", True) == [Unbind("usb*", "usbtether", 4)]   # renamed away
    assert s.on_link(8, "enx0", True) == []
    assert s.on_link(8, "usb2", True) == [Bind("usb*", "usb2", 8)]          # renamed in


def test_resync_after_lost_events() -> None:
    s = Slots(["usb*", "wlan0"], {3: "usb0", 4: "wlan0"})
    got = s.resync({4: "wlan0", 6: "usb0"})       # usb0 went and came back unseen
    assert got == [Unbind("usb*", "usb0", 3), Bind("usb*", "usb0", 6)]
    assert s.resync({4: "wlan0", 6: "usb0"}) == []


def _nl(mtype: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), mtype, 0, 0, 0) + body


def _link(mtype: int, index: int, name: bytes | None) -> bytes:
    attrs = b""
    if name is not None:
        raw = name + b"\0"
        attrs = struct.pack("=HH", 4 + len(raw), lw.IFLA_IFNAME) + raw
        attrs += b"\0" * (-len(attrs) % 4)
    mtu = struct.pack("=HHI", 8, 4, 1500)                       # IFLA_MTU before the name
    return _nl(mtype, struct.pack("=BxHiII", 0, 1, index, lw.IFF_UP, 0) + mtu + attrs)


def test_link_names_from_newlink_and_dellink() -> None:
    data = (_link(lw.RTM_NEWLINK, 7, b"usb0") + _link(lw.RTM_DELLINK, 7, b"usb0")
            + _link(lw.RTM_NEWLINK, 8, None) + _nl(lw.RTM_NEWADDR, b"\0" * 8))
    assert list(lw.link_names(data)) == [(7, "usb0", True), (7, "usb0", False),
                                         (8, None, True)]
    broken = _link(lw.RTM_NEWLINK, 9, b"usb9")[:-8]                # a cut attribute
    assert list(lw.link_names(struct.pack("=I", len(broken)) + broken[4:])) == [(9, None, True)]
    assert list(lw.link_names(b"\x01" * 5)) == []


def _agent_toml(tmp_path: Path, iface: str) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text('name = "laptop"\nprivate_key = "' + "A" * 43 + '="\n'
                 f'[[interface]]\nname = "wan1"\n[[interface]]\nname = "{iface}"\n'
                 '[[anchor]]\nname = "an1"\naddress = "192.0.2.1:5060"\n'
                 'public_key = "' + "B" * 43 + '="\n'
                 f'[[rule]]\nname = "t"\nvia = ["{iface}"]\n')
    return p


def test_config_takes_patterns_in_names_and_via(tmp_path: Path) -> None:
    cfg = load_agent_config(str(_agent_toml(tmp_path, "usb*")))
    assert [i.name for i in cfg.interfaces] == ["wan1", "usb*"]
    assert cfg.rules[0].via == ("usb*",)
    for bad in ("usb 0", "usb/0", "a" * 16, "x;y"):
        with pytest.raises(ConfigError, match="interface name or pattern"):
            load_agent_config(str(_agent_toml(tmp_path, bad)))


def test_ruleset_marks_a_pattern_entrys_port_without_iifname() -> None:
    script = agent_ruleset(tun="upmt0", vipa_fix="100.64.0.1", fwmark=0x5550,
                           ifaces=[IfacePlan(0, "wan1", None, 4000),
                                   IfacePlan(1, "usb*", None, 4001, absent=True)],
                           rules=[])
    assert 'iifname "wan1" udp dport 4000 meta mark set 0x5551' in script
    assert "\t\tudp dport 4001 meta mark set 0x5552" in script
    assert "usb" not in script
    assert "meta mark and 0xffff == 0x5552 return" in script    # its own packets: no rule


async def test_an_entry_whose_device_goes_and_a_new_one_comes() -> None:
    k = Seams()
    s = k.state()
    s.unbind("wan2")                                 # deleted: down at once
    assert k.usable == [("wan2", False)]
    await asyncio.sleep(0)
    assert k.on_tun == {"10.2.0.2"}                  # kept for the connections using it
    s.on_event("link", 4, True)                      # the old index: no longer ours
    s.on_event("route", 0, False)                    # "every interface": not one gone
    await asyncio.sleep(DEBOUNCE * 3)
    assert k.usable == [("wan2", False)] and k.routes == []
    s.bind("wan2", 12)                               # created again, new index, down
    s.on_event("link", 12, False)
    assert k.usable == [("wan2", False)]
    s.on_event("link", 12, True)                     # up: read, route, usable
    await asyncio.sleep(DEBOUNCE * 3)
    assert k.routes == [("wan2", "10.2.0.1")] and k.usable[-1] == ("wan2", True)
    assert k.on_tun == set()                         # its address is its own again
    s.close()


async def test_a_path_socket_reopened_on_its_port_keeps_receiving() -> None:
    from upmt_tun.dataplane.io import PathSocket, open_udp

    loop = asyncio.get_running_loop()
    path = PathSocket(open_udp("127.0.0.1", 0), loop, ("127.0.0.1", 0), offload=False)
    port = path.sock.getsockname()[1]
    got: list[bytes] = []
    path.start(lambda data, src: got.append(data))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        tx.sendto(b"one", ("127.0.0.1", port))
        for _ in range(50):
            if got:
                break
            await asyncio.sleep(0.01)
        old = path.sock
        path.reopen(lambda: open_udp("127.0.0.1", port))
        assert old.fileno() == -1 and path.sock.getsockname()[1] == port
        tx.sendto(b"two", ("127.0.0.1", port))
        for _ in range(50):
            if len(got) == 2:
                break
            await asyncio.sleep(0.01)
        assert got == [b"one", b"two"]
    finally:
        tx.close()
        path.close()


def test_reload_adds_and_removes_entries() -> None:
    """An entry added at run time takes a free matching device at once (would_bind says
    which, before); a removed entry's device goes to a pattern entry without one."""
    s = Slots(["wan1", "usb*"], {2: "wan1", 5: "usb0"})
    assert s.would_bind("wlan*") is None and s.add("wlan*") == []
    assert s.bound["wlan*"] is None
    s.on_link(7, "wlan0", True)
    assert s.device("wlan*") == "wlan0"
    assert s.would_bind("usb?") is None                  # usb0 is held by usb*
    assert s.add("wan1") == []                           # already there: nothing
    s.on_link(6, "usb1", True)
    assert s.would_bind("usb?") == "usb1"
    assert s.add("usb?") == [Bind("usb?", "usb1", 6)]
    assert s.remove("usb*") == []                        # nobody left to take usb0
    assert s.remove("usb?") == [] and s.entries == ["wan1", "wlan*"]
    assert s.add("usb*") == [Bind("usb*", "usb0", 5)]    # a free device: at once
    assert s.add("eth*") == [] and s.remove("nosuch") == []
    s2 = Slots(["usb0", "usb*"], {5: "usb0", 6: "usb1"})
    assert s2.device("usb*") == "usb1"
    s2.on_link(6, None, False)                           # usb1 unplugged: usb* waits
    assert s2.remove("usb0") == [Bind("usb*", "usb0", 5)]


async def test_reload_adds_removes_and_regateways_an_interface_state() -> None:
    """InterfaceState: an added entry starts down without a device (bind + a link event
    bring it up with its route); a removed one is forgotten (events and a recheck in
    flight do nothing); a new configured gateway re-makes the route."""
    k = Seams()
    k.kernel["wan3"] = ("10.3.0.2", "10.3.0.1")
    s = k.state()
    s.add("wan3", "10.3.0.254")
    assert not s.usable("wan3")
    s.bind("wan3", 9)
    s.on_event("link", 9, True)
    await asyncio.sleep(DEBOUNCE * 3)
    assert k.routes == [("wan3", "10.3.0.254")] and k.usable == [("wan3", True)]
    s.set_gateway("wan3", None)                          # the main table's from now on
    await asyncio.sleep(DEBOUNCE * 3)
    assert k.routes[-1] == ("wan3", "10.3.0.1")
    s.on_event("route", 9, True)
    s.remove("wan3")                                     # the recheck scheduled: cancelled
    s.on_event("link", 9, False)
    await asyncio.sleep(DEBOUNCE * 3)
    assert k.usable == [("wan3", True)] and len(k.routes) == 2
    await s.recheck("wan3")                              # in flight when removed: nothing
    s.set_gateway("wan3", "10.3.0.9")
    assert "wan3" not in s.gateway and len(k.routes) == 2
