"""Host-changing layer against a real kernel, each test in its own network namespace.

Every check runs in a forked child that joins the namespace (``in_netns``), so the
test process and the host stay untouched; the namespace is always deleted.
"""

from __future__ import annotations

import fcntl
import os
import pickle
import random
import select
import shutil
import socket
import struct
import subprocess
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("nft") is None or not os.path.exists("/dev/net/tun"),
        reason="needs root, nft and /dev/net/tun",
    ),
]

F = 0x100
T = 1000
VIPA = "100.64.0.1"
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
SO_MARK = 36


# ---------------------------------------------------------------- helpers


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh namespace with lo up and two access interfaces (veth pairs).

    ua0 10.0.1.2/24, default via 10.0.1.1 metric 100; ub0 10.0.2.2/24, default via
    10.0.2.1 metric 50. All rp_filter strict, as on RHEL.
    """
    name = f"ut{os.getpid()}{random.randrange(1 << 30):x}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        script = """
            ip link set lo up
            ip link add ua0 type veth peer name pa0
            ip link add ub0 type veth peer name pb0
            for d in ua0 pa0 ub0 pb0; do ip link set $d up; done
            ip addr add 10.0.1.2/24 dev ua0
            ip addr add 10.0.2.2/24 dev ub0
            ip route add default via 10.0.1.1 dev ua0 metric 100
            ip route add default via 10.0.2.1 dev ub0 metric 50
            sysctl -qw net.ipv4.conf.all.rp_filter=1 net.ipv4.conf.default.rp_filter=1
        """
        subprocess.run(["ip", "netns", "exec", name, "sh", "-ec", script], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def in_netns(name: str, func: Callable[..., Any], *args: Any) -> Any:
    """Run ``func(*args)`` in a forked child inside namespace ``name``; return its result."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        status = 0
        try:
            os.close(read_fd)
            from pyroute2 import netns as pyroute2_netns

            pyroute2_netns.setns(name, flags=0)
            result: tuple[str, Any] = ("ok", func(*args))
        except BaseException:
            result, status = ("error", traceback.format_exc()), 1
        try:
            with os.fdopen(write_fd, "wb") as out:
                out.write(pickle.dumps(result))
        finally:
            os._exit(status)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(data)
    if kind == "error":
        pytest.fail(f"in netns {name}:\n{value}")
    return value


def sh(*args: str) -> str:
    """Output of a command (run in the current namespace)."""
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


def snapshot(ifaces: tuple[str, ...] = ("ua0", "ub0")) -> dict[str, str]:
    """Everything the system layer may change, as text."""
    state = {
        "rules": sh("ip", "-4", "rule"),
        "routes": sh("ip", "-4", "route", "show", "table", "all"),
        "addrs": sh("ip", "-4", "addr"),
        "nft": sh("nft", "list", "ruleset"),
        "ip_forward": sh("sysctl", "-n", "net.ipv4.ip_forward"),
    }
    for iface in ifaces:
        state[f"svm_{iface}"] = sh("sysctl", "-n", f"net.ipv4.conf.{iface}.src_valid_mark")
    return state


def open_tun(name: str) -> int:
    """Create TUN device ``name`` (IFF_TUN | IFF_NO_PI) and return its fd (non-blocking)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def read_ipv4(fd: int, proto: int, timeout: float = 1.0) -> bytes | None:
    """Next IPv4 packet of protocol ``proto`` read from a TUN fd, or None."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([fd], [], [], left)[0]:
            break
        packet = os.read(fd, 65535)
        if packet[0] >> 4 == 4 and packet[9] == proto:
            return packet
    return None


def checksum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF


def udp_packet(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """An IPv4/UDP packet (UDP checksum 0 = none)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
        socket.inet_aton(src), socket.inet_aton(dst),
    )  # fmt: skip
    return header[:10] + struct.pack("!H", checksum(header)) + header[12:] + udp


def agent_host(tun: str = "ut0", **changes: Any) -> Any:
    from upmt_tun.system.agent_host import AgentHost, IfacePlan, RuleMatch

    args: dict[str, Any] = {
        "tun": tun,
        "vipa_fix": VIPA,
        "fwmark": F,
        "table": T,
        "ifaces": [IfacePlan(0, "ua0", "10.0.1.1", 5000), IfacePlan(1, "ub0", None, 5001)],
        "rules": [
            RuleMatch(0, "udp", "198.51.100.0/24", (9000, 9000), None, None, None),
            RuleMatch(1, "any", "203.0.113.0/24", None, None, None, None),
            RuleMatch(2, "tcp", None, (443, 443), (1024, 65535), 0, None),
        ],
    }
    args.update(changes)
    return AgentHost(**args)


# ---------------------------------------------------------------- netlink


def _netlink_checks() -> dict[str, Any]:
    from upmt_tun.system import SystemSetupError
    from upmt_tun.system.netlink import configure_tun, default_route_interfaces, interface_info

    fd = open_tun("ut0")
    try:
        configure_tun("ut0", VIPA, 32, 1400)
        configure_tun("ut0", VIPA, 32, 1400)  # twice: no error
        try:
            interface_info("nosuch0")
            missing = "no error"
        except SystemSetupError as exc:
            missing = str(exc)
        return {
            "tun": interface_info("ut0"),
            "defaults": default_route_interfaces(),
            "link": sh("ip", "-br", "link", "show", "ut0"),
            "routes": sh("ip", "-4", "route", "show", "table", "all", "dev", "ut0"),
            "missing": missing,
        }
    finally:
        os.close(fd)


def test_configure_tun_and_interface_info(netns: str) -> None:
    from upmt_tun.system.netlink import IfaceInfo

    got = in_netns(netns, _netlink_checks)
    assert got["tun"] == IfaceInfo("ut0", got["tun"].index, VIPA, 32, 1400, None)
    assert "UP" in got["link"]
    assert "/8" not in got["routes"] and "100.0.0.0" not in got["routes"]
    assert [(i.name, i.address, i.prefixlen, i.gateway) for i in got["defaults"]] == [
        ("ub0", "10.0.2.2", 24, "10.0.2.1"),
        ("ua0", "10.0.1.2", 24, "10.0.1.1"),
    ]
    assert got["missing"] == "interface nosuch0 does not exist"


# ---------------------------------------------------------------- agent


def _agent_lifecycle() -> dict[str, Any]:
    from upmt_tun.system.conntrack import Conntrack

    fd = open_tun("ut0")
    from upmt_tun.system.netlink import configure_tun

    configure_tun("ut0", VIPA, 32, 1400)
    before = snapshot(("ut0", "ua0", "ub0"))
    host = agent_host()
    host.setup()
    out: dict[str, Any] = {"before": before, "during": snapshot(("ut0", "ua0", "ub0"))}
    out["get_steered"] = sh("ip", "route", "get", "198.51.100.7", "mark", hex(F | 0x10000))
    out["get_sock_a"] = sh("ip", "route", "get", "203.0.113.5", "mark", hex(F + 1))
    out["get_sock_b"] = sh("ip", "route", "get", "203.0.113.5", "mark", hex(F + 2))

    # A flow matching rule 0 goes into the TUN, SNATed to vipa_fix, with its rule's ct mark.
    app = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    app.bind(("0.0.0.0", 0))
    app.settimeout(1.0)
    app.sendto(b"ping", ("198.51.100.7", 9000))
    packet = read_ipv4(fd, 17)
    assert packet is not None, "steered packet did not reach the TUN"
    src, dst = socket.inet_ntoa(packet[12:16]), socket.inet_ntoa(packet[16:20])
    sport, dport = struct.unpack("!HH", packet[20:24])
    out["tun_packet"] = (src, dst, dport)
    ct = Conntrack()
    out["ct"] = ct.lookup_reply(17, dst, src, dport, sport)

    # The reply written into the TUN passes strict rp_filter and reaches the app.
    os.write(fd, udp_packet(dst, src, dport, sport, b"pong"))
    try:
        out["reply"] = app.recvfrom(100)
    except TimeoutError:
        out["reply"] = None

    # A tunnel socket (mark F+1) to the anchor's network is never steered,
    # while an ordinary socket to it is (rule 1, protocol "any").
    tunnel = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tunnel.setsockopt(socket.SOL_SOCKET, SO_MARK, F + 1)
    tunnel.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"ua0")
    tunnel.bind(("0.0.0.0", 5000))
    tunnel.sendto(b"tunnel", ("203.0.113.5", 4000))
    out["tunnel_on_tun"] = read_ipv4(fd, 17, timeout=0.2)
    out["tunnel_ct"] = ct.lookup_reply(17, "203.0.113.5", "10.0.1.2", 4000, 5000)
    app.sendto(b"any", ("203.0.113.5", 4000))
    packet = read_ipv4(fd, 17)
    assert packet is not None
    out["any_ct"] = ct.lookup_reply(
        17, "203.0.113.5", VIPA, 4000, struct.unpack("!H", packet[20:22])[0]
    )
    ct.close()

    # A mesh anchor's pool: routed into the TUN with the relay's MTU (also for steered
    # flows), and its hosts may open connections here; others still may not.
    host.add_mesh_pool("100.100.0.0/16", 1364)
    out["mesh"] = snapshot(("ut0", "ua0", "ub0"))
    out["get_mesh"] = sh("ip", "route", "get", "100.100.0.3")
    out["get_mesh_steered"] = sh("ip", "route", "get", "100.100.0.3", "mark", hex(F))
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("0.0.0.0", 0))
    listener.settimeout(0.5)
    lport = listener.getsockname()[1]
    os.write(fd, udp_packet("198.51.100.9", VIPA, 7000, lport, b"stranger"))
    os.write(fd, udp_packet("100.100.0.3", VIPA, 7000, lport, b"peer"))
    try:
        out["mesh_in"] = [listener.recvfrom(100)]
    except TimeoutError:
        out["mesh_in"] = []
    listener.close()

    host.teardown()
    host.teardown()  # idempotent
    out["after"] = snapshot(("ut0", "ua0", "ub0"))
    os.close(fd)
    return out


def test_agent_setup_steers_and_teardown_restores(netns: str) -> None:
    got = in_netns(netns, _agent_lifecycle)
    during = got["during"]
    assert f"5200:\tfrom all fwmark {F + 1:#x}/0xffff lookup {T + 1}" in during["rules"]
    assert f"5200:\tfrom all fwmark {F + 2:#x}/0xffff lookup {T + 2}" in during["rules"]
    assert f"5201:\tfrom all fwmark {F:#x}/0xffff lookup {T}" in during["rules"]
    assert f"default dev ut0 table {T}" in during["routes"]
    assert f"blackhole default table {T} proto static metric 4294967295" in during["routes"]
    assert f"default via 10.0.1.1 dev ua0 table {T + 1}" in during["routes"]
    assert f"default dev ub0 table {T + 2}" in during["routes"]
    assert "table ip upmt_agent" in during["nft"]
    assert 'oifname "ut0" snat to 100.64.0.1' in during["nft"]
    assert ('iifname "ut0" ip saddr != @mesh_pools ct state != { established, related } '
            'counter name "unsolicited_from_tun" drop') in during["nft"]
    mesh = got["mesh"]
    assert "100.100.0.0/16 dev ut0 proto static scope link mtu 1364" in mesh["routes"]
    assert f"100.100.0.0/16 dev ut0 table {T} proto static scope link mtu 1364" in mesh["routes"]
    assert "elements = { 100.100.0.0/16 }" in mesh["nft"]
    assert "dev ut0" in got["get_mesh"] and "mtu 1364" in got["get_mesh"]
    assert "mtu 1364" in got["get_mesh_steered"]
    assert got["mesh_in"] == [(b"peer", ("100.100.0.3", 7000))]      # the stranger dropped
    assert "100.100.0.0" not in got["after"]["routes"]
    assert all(during[f"svm_{i}"].strip() == "1" for i in ("ut0", "ua0", "ub0"))
    assert got["get_steered"].startswith("198.51.100.7 dev ut0")
    assert "via 10.0.1.1 dev ua0" in got["get_sock_a"]
    assert "dev ub0" in got["get_sock_b"]

    assert got["tun_packet"] == (VIPA, "198.51.100.7", 9000)
    assert got["ct"] == (0x10000 | F, "10.0.2.2")  # ub0 has the best default route
    assert got["reply"] == (b"pong", ("198.51.100.7", 9000))
    assert got["tunnel_on_tun"] is None
    assert got["tunnel_ct"] == (0, "10.0.1.2")
    assert got["any_ct"] == (0x20000 | F, "10.0.2.2")

    assert got["after"] == got["before"]


def _agent_killed_then_cleanup() -> dict[str, Any]:
    from upmt_tun.system import SystemSetupError
    from upmt_tun.system.netlink import Rule, add_rule, configure_tun

    before = snapshot()
    pid = os.fork()
    if pid == 0:  # the "killed" agent: sets up and dies without teardown
        status = 1
        try:
            fd = open_tun("ut0")
            configure_tun("ut0", VIPA, 32, 1400)
            agent_host().setup()
            os.close(fd)
            status = 0
        finally:
            os._exit(status)
    assert os.waitpid(pid, 0)[1] == 0
    add_rule(Rule(5200, T + 5, F + 5, 0xFFFF))  # from a run with more interfaces
    add_rule(Rule(5200, T + 40, F + 7, 0xFFFF))  # someone else's: must stay
    fd = open_tun("ut0")
    configure_tun("ut0", VIPA, 32, 1400)
    left = snapshot()
    try:
        agent_host().setup()
        refused = "no error"
    except SystemSetupError as exc:
        refused = str(exc)
    refused_state = snapshot()
    agent_host().cleanup_leftovers()
    os.close(fd)  # the new run's TUN goes: compare with the state before the killed run
    cleaned = snapshot()
    agent_host().cleanup_leftovers()  # nothing there: fine
    return {
        "before": before,
        "left": left,
        "refused": refused,
        "refused_state": refused_state,
        "cleaned": cleaned,
    }


def test_agent_cleanup_leftovers_of_killed_run(netns: str) -> None:
    got = in_netns(netns, _agent_killed_then_cleanup)
    assert "upmt_agent" in got["left"]["nft"]
    assert f"lookup {T + 1}" in got["left"]["rules"]
    assert "upmt_agent exists" in got["refused"]
    assert got["refused_state"] == got["left"]
    cleaned, before = got["cleaned"], got["before"]
    assert cleaned["nft"] == before["nft"]
    assert cleaned["routes"] == before["routes"]
    foreign = f"5200:\tfrom all fwmark {F + 7:#x}/0xffff lookup {T + 40}\n"
    assert foreign in cleaned["rules"]
    assert cleaned["rules"].replace(foreign, "") == before["rules"]


def _agent_stopped_for_a_restart(vipa6: str) -> dict[str, Any]:
    from upmt_tun.system.agent_host import is_paused
    from upmt_tun.system.netlink import configure_tun

    def start() -> tuple[int, Any]:
        fd = open_tun("ut0")
        configure_tun("ut0", VIPA, 32, 1400, vipa6)
        host = agent_host(vipa6_fix=vipa6)
        host.cleanup_leftovers(keep_steering=True)      # what a start does
        host.setup()
        return fd, host

    def v6() -> str:        # (not table local: its link-local entries come when DAD ends)
        routes = sh("ip", "-6", "route", "show", "table", "all").splitlines(keepends=True)
        return sh("ip", "-6", "rule") + "".join(r for r in routes if "table local" not in r)

    before, v6_before = snapshot(), v6()
    fd, host = start()
    running = snapshot()
    host.pause_on_teardown = True                       # SIGUSR2
    host.teardown()
    os.close(fd)
    paused, v6_paused, flag = snapshot(), v6(), is_paused()
    agent_host().cleanup_leftovers(keep_steering=True)  # cleanup --keep-paused
    kept = snapshot()
    fd, again = start()                                 # takes the hold over
    resumed = snapshot()
    again.pause_on_teardown = True
    again.teardown()
    os.close(fd)
    agent_host().cleanup_leftovers()                    # an operator's `cleanup`
    return {"before": before, "running": running, "paused": paused, "flag": flag,
            "kept": kept, "resumed": resumed, "after": snapshot(),
            "v6_before": v6_before, "v6_paused": v6_paused, "v6_after": v6()}


@pytest.mark.parametrize("vipa6", ["", "fd55:504d:5400::1"], ids=["v4", "v4+v6"])
def test_agent_stopped_for_a_restart_holds_steered_connections(netns: str, vipa6: str
                                                               ) -> None:
    """A stop for a restart leaves only what holds the steered connections (their ct mark
    -> mark F -> table T's blackhole): no new connection is steered, nothing else stays;
    the next start takes it over (the same host state as a fresh start) and a plain
    cleanup removes it. With IPv6 inside, the same for IPv6."""
    got = in_netns(netns, _agent_stopped_for_a_restart, vipa6)
    paused = got["paused"]
    if vipa6:
        assert "table ip6 upmt_agent6" in paused["nft"], paused["nft"]
        assert f"fwmark {F:#x}/0xffff lookup {T}" in got["v6_paused"], got["v6_paused"]
        assert f"blackhole default dev lo table {T}" in got["v6_paused"], got["v6_paused"]
    assert got["v6_after"] == got["v6_before"]
    assert got["flag"] is True
    assert "chain paused" in paused["nft"], paused["nft"]
    assert f"ct mark & 0x0000ffff == {F:#010x} meta mark set ct mark & 0x0000ffff" \
        in paused["nft"], paused["nft"]
    assert "snat" not in paused["nft"] and "ct mark set" not in paused["nft"]
    assert f"fwmark {F:#x}/0xffff lookup {T}" in paused["rules"]
    assert f"lookup {T + 1}" not in paused["rules"], paused["rules"]
    assert f"blackhole default table {T}" in paused["routes"]
    assert "ut0" not in paused["routes"] and f"table {T + 1}" not in paused["routes"]
    before = got["before"]
    assert {k: v for k, v in paused.items() if k.startswith("svm_")} == \
        {k: v for k, v in before.items() if k.startswith("svm_")}
    assert got["kept"] == paused
    for part in ("rules", "routes", "nft"):
        assert got["resumed"][part] == got["running"][part], part
    assert got["after"] == before


def _agent_start_fails_after_keeping() -> dict[str, Any]:
    from upmt_tun.system.netlink import configure_tun

    before = snapshot()
    fd = open_tun("ut0")
    configure_tun("ut0", VIPA, 32, 1400)
    agent_host().setup()                     # a run killed: nothing undone
    os.close(fd)
    host = agent_host()
    host.cleanup_leftovers(keep_steering=True)
    kept = snapshot()
    host.teardown()                          # the start failed before its setup
    return {"before": before, "kept": kept, "after": snapshot()}


def test_agent_start_that_fails_removes_what_it_kept(netns: str) -> None:
    got = in_netns(netns, _agent_start_fails_after_keeping)
    assert "table ip upmt_agent" in got["kept"]["nft"]
    for part in ("rules", "routes", "nft"):   # (sysctls: no state file here to restore)
        assert got["after"][part] == got["before"][part], part


def _agent_failure_half_way() -> dict[str, Any]:
    from upmt_tun.system import SystemSetupError
    from upmt_tun.system import agent_host as agent_module
    from upmt_tun.system.netlink import configure_tun

    fd = open_tun("ut0")
    configure_tun("ut0", VIPA, 32, 1400)
    before = snapshot(("ut0", "ua0", "ub0"))

    def broken_apply(script: str) -> None:
        raise SystemSetupError("nft: simulated failure")

    agent_module.nft.apply = broken_apply
    try:
        agent_host().setup()
        error = "no error"
    except SystemSetupError as exc:
        error = str(exc)
    after = snapshot(("ut0", "ua0", "ub0"))
    bad_iface = agent_host(ifaces=[agent_module.IfacePlan(0, "nosuch0", None, 5000)])
    try:
        bad_iface.setup()
    except SystemSetupError as exc:
        error_iface = str(exc)
    os.close(fd)
    return {"before": before, "after": after, "error": error, "error_iface": error_iface}


def test_agent_failure_half_way_undoes_everything(netns: str) -> None:
    got = in_netns(netns, _agent_failure_half_way)
    assert got["error"] == "nft: simulated failure"
    assert got["after"] == got["before"]
    assert got["error_iface"] == "interface nosuch0 does not exist"


def _agent_teardown_without_tun() -> dict[str, Any]:
    from upmt_tun.system.netlink import configure_tun

    before = snapshot()
    fd = open_tun("ut0")
    configure_tun("ut0", VIPA, 32, 1400)
    host = agent_host()
    host.setup()
    os.close(fd)  # the TUN vanishes first (crash of the data plane)
    host.teardown()
    return {"before": before, "after": snapshot()}


def test_agent_teardown_after_tun_is_gone(netns: str) -> None:
    got = in_netns(netns, _agent_teardown_without_tun)
    assert got["after"] == got["before"]


# ---------------------------------------------------------------- anchor


def _anchor_lifecycle(role: str) -> dict[str, Any]:
    from upmt_tun.system.anchor_host import AnchorHost
    from upmt_tun.system.netlink import interface_info

    fd = open_tun("ut0")
    before = snapshot()
    host = AnchorHost(
        tun="ut0",
        tun_address="100.64.1.1",
        pool_prefixlen=24,
        pool="100.64.1.0/24",
        mtu=1400,
        role=role,
        nat_interface="ua0",
    )
    host.cleanup_leftovers()
    host.setup()
    during = snapshot()
    during["tun"] = sh("ip", "-4", "-o", "addr", "show", "dev", "ut0")
    during["mtu"] = str(interface_info("ut0").mtu)
    host.teardown()
    host.teardown()
    after = snapshot()
    os.close(fd)
    return {"before": before, "during": during, "after": after}


def test_anchor_setup_teardown(netns: str) -> None:
    got = in_netns(netns, _anchor_lifecycle, "anchor")
    during = got["during"]
    assert "100.64.1.1/24" in during["tun"]
    assert "100.64.1.0/24 dev ut0" in during["routes"]
    assert during["mtu"] == "1400"
    assert during["ip_forward"].strip() == "1"
    assert 'ip saddr 100.64.1.0/24 oifname "ua0" masquerade' in during["nft"]
    assert "maxseg size set rt mtu" in during["nft"]
    # (issue 17) into the tunnels only replies; nothing untrackable out of them
    assert ('oifname "ut0" ct state != { established, related } '
            'counter name "unsolicited_inbound" drop') in during["nft"]
    assert ('iifname "ut0" ct state { invalid, untracked } '
            'counter name "invalid_from_hosts" drop') in during["nft"]
    assert got["before"]["ip_forward"].strip() == "0"
    assert got["after"] == got["before"]


def _anchor_stopped_for_a_restart() -> dict[str, Any]:
    from upmt_tun.system.anchor_host import AnchorHost, is_paused

    def host() -> AnchorHost:
        made = AnchorHost(tun="ut0", tun_address="100.64.1.1", pool_prefixlen=24,
                          pool="100.64.1.0/24", mtu=1400, role="anchor", nat_interface="ua0",
                          pool6="fd55:1::/64")
        made.cleanup_leftovers(keep_table=True)     # what a start does
        return made

    fd = open_tun("ut0")
    before = snapshot()
    first = host()
    first.setup()
    first.pause_on_teardown = True                  # SIGUSR2
    first.teardown()
    paused, flag = sh("nft", "list", "ruleset"), is_paused()
    again = host()
    again.setup()                                   # takes both stubs over
    resumed = sh("nft", "list", "ruleset")
    again.teardown()
    after = snapshot()
    os.close(fd)
    return {"before": before, "paused": paused, "flag": flag, "resumed": resumed,
            "after": after}


def test_anchor_stopped_for_a_restart_keeps_ipv4_and_ipv6_nat(netns: str) -> None:
    """A stop for a restart leaves both families' NAT paused (an empty NAT chain, replies
    to the pool dropped); the next start replaces both stubs, a stop for good removes
    everything."""
    got = in_netns(netns, _anchor_stopped_for_a_restart)
    paused = got["paused"]
    assert got["flag"] is True
    assert "table ip upmt_anchor" in paused and "table ip6 upmt_anchor6" in paused, paused
    assert paused.count("chain paused") == 2 and "masquerade" not in paused
    assert "ip6 daddr fd55:1::/64 ct state established,related counter" in paused
    assert "ip daddr 100.64.1.0/24 ct state established,related counter" in paused
    assert "chain paused" not in got["resumed"] and "masquerade" in got["resumed"]
    assert got["after"] == got["before"]


def test_fixed_host_configures_tun_and_relays_nothing(netns: str) -> None:
    got = in_netns(netns, _anchor_lifecycle, "fixed-host")
    during = got["during"]
    assert "100.64.1.1/24" in during["tun"]
    assert "masquerade" not in during["nft"]
    assert 'iifname "ut0" drop' in during["nft"]        # nothing forwarded from the tunnels
    assert ('oifname "ut0" ct state != { established, related } '
            'counter name "unsolicited_inbound" drop') in during["nft"]   # nor into them
    assert during["ip_forward"].strip() == "0"
    assert got["after"] == got["before"]


# ---------------------------------------------------------------- conntrack


def _conntrack_checks() -> dict[str, Any]:
    from upmt_tun.system import nft
    from upmt_tun.system.conntrack import Conntrack

    nft.apply(
        "table ip ctt {\n chain out {\n type filter hook output priority 0;\n"
        " udp dport 9999 ct mark set 0x20100\n"
        " icmp type echo-request ct mark set 0x30100\n }\n}\n"
    )
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.sendto(b"x", ("127.0.0.2", 9999))
    sport = udp.getsockname()[1]
    icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    echo = struct.pack("!BBHHH", 8, 0, 0, 0x4242, 1) + b"abcd"
    icmp.sendto(echo[:2] + struct.pack("!H", checksum(echo)) + echo[4:], ("127.0.0.3", 0))
    with Conntrack() as ct:
        started = time.perf_counter()
        found = ct.lookup_reply(17, "127.0.0.2", "127.0.0.1", 9999, sport)
        took = time.perf_counter() - started
        return {
            "udp": found,
            "took": took,
            "udp_miss": ct.lookup_reply(17, "127.0.0.2", "127.0.0.1", 9998, sport),
            "icmp": ct.lookup_reply(1, "127.0.0.3", "127.0.0.1", 0x4242, 0),
            "icmp_miss": ct.lookup_reply(1, "127.0.0.3", "127.0.0.1", 0x4243, 0),
            "tcp_miss": ct.lookup_reply(6, "127.0.0.2", "127.0.0.1", 9999, sport),
        }


def test_conntrack_lookup_reply(netns: str) -> None:
    got = in_netns(netns, _conntrack_checks)
    assert got["udp"] == (0x20100, "127.0.0.1")
    assert got["icmp"] == (0x30100, "127.0.0.1")
    assert got["udp_miss"] is None and got["icmp_miss"] is None and got["tcp_miss"] is None
    assert got["took"] < 0.05


def _reload_chains() -> dict[str, Any]:
    """reload's nft side against the kernel: the agent's output chain and the anchor's
    egress chains replaced in one transaction each; one nft refuses changes nothing."""
    from upmt_tun.system import SystemSetupError, nft
    from upmt_tun.system.agent_host import AgentHost, IfacePlan, RuleMatch, agent_ruleset
    from upmt_tun.system.anchor_host import AnchorHost, anchor_ruleset

    ifaces = [IfacePlan(0, "ua0", None, 4000)]
    web = RuleMatch(0, "tcp", None, (80, 80), None, None, None)
    nft.apply(agent_ruleset(tun="ub0", vipa_fix=VIPA, fwmark=F, ifaces=ifaces, rules=[web]))
    nft.apply(anchor_ruleset(tun="ub0", pool="100.100.0.0/16", mtu=1400,
                             nat_interface="ua0", deny_egress=("10.0.0.0/8",)))
    agent = AgentHost(tun="ub0", vipa_fix=VIPA, fwmark=F, table=T, ifaces=ifaces, rules=[web])
    anchor = AnchorHost(tun="ub0", tun_address="100.100.0.1", pool_prefixlen=16,
                        pool="100.100.0.0/16", mtu=1400, role="anchor", nat_interface="ua0",
                        deny_egress=("10.0.0.0/8",))
    out: dict[str, Any] = {}
    agent.replace_rules([RuleMatch(3, "udp", "192.0.2.0/24", (53, 53), None, None, None),
                         web])
    anchor.replace_egress(("10.1.0.0/16",), ("10.0.0.0/8", "192.168.0.0/16"), 100)
    out["agent"] = sh("nft", "list", "chain", "ip", "upmt_agent", "output")
    out["anchor"] = sh("nft", "list", "table", "ip", "upmt_anchor")
    try:
        agent.replace_rules([RuleMatch(4, "any", None, None, None, 1 << 40, None)])
    except SystemSetupError as e:
        out["refused"] = str(e)
    out["agent_after"] = sh("nft", "list", "chain", "ip", "upmt_agent", "output")
    return out


def test_reload_replaces_chains_in_one_transaction(netns: str) -> None:
    got = in_netns(netns, _reload_chains)
    lines = [line.strip() for line in got["agent"].splitlines()]
    rules = [line for line in lines if "ct mark set" in line]
    assert len(rules) == 2                                   # the new first-match order
    assert "udp dport 53" in rules[0] and rules[0].endswith(f"ct mark set {(4 << 16) | F:#010x}")
    assert "tcp dport 80" in rules[1] and rules[1].endswith(f"ct mark set {(1 << 16) | F:#010x}")
    assert 'ip daddr 10.1.0.0/16 accept' in got["anchor"]
    assert "ip daddr { 10.0.0.0/8, 192.168.0.0/16 } drop" in got["anchor"]
    assert "ct count over 100" in got["anchor"]
    assert got["anchor"].count('counter name "invalid_from_hosts"') == 1   # counters kept
    assert got["refused"].startswith("nft: ") and got["agent_after"] == got["agent"]
