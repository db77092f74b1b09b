r"""Network-namespace topologies for the demo, the netns tests and the benchmarks.

::

           ns "mh" (Mobile Host, rp_filter=1 on all/default/ifaces)
        wan1 10.1.0.2/24        wan2 10.2.0.2/24   (same_subnet=True: both 192.168.1.2/24,
             |                       |               gw 192.168.1.1)
   ns "nat1" 10.1.0.1        ns "nat2" 10.2.0.1     (nftables masquerade out of their "inet" side)
   inet side 203.0.113.11    inet side 203.0.113.12
             \                      /
              ns "inet": bridge br0 (no address), one veth port per host below
             /          |             \
   ns "an" 203.0.113.1  ns "ch" 203.0.113.100   ns "atk" 203.0.113.66 (optional attacker)
   (anchor, eth0)       (legacy correspondent host)

Optional second anchor ``an2`` 203.0.113.2 (``anchors=2``).

Optional IPv6 inside the tunnels (``inner_v6=True``): ``mh`` has IPv6 enabled (for its
TUN) and the anchors and the correspondent are dual stack on the segment, whose IPv6 plan
is one for every option (:data:`SEGMENT6`): ``an`` 2001:db8:113::1/64, ``an2``
2001:db8:113::2/64, ``ch`` 2001:db8:113::100/64 (no DAD); alone, the access networks stay
IPv4 only.

Optional second mobile host (``second_mh=True``, UPMT-DAM mesh tests), behind a NAT of its
own and on the *same* private subnet as the first one's wan1::

   ns "mh2" wan1 10.1.0.2/24 (192.168.1.2 with same_subnet)
             |
   ns "nat3" 10.1.0.1, inet side 203.0.113.21 (masquerade), a port of br0 like the others

Optional IPv6 access (``v6_access=True``, outer IPv6 tests): wan2's network is IPv6 only,
routed (no NAT) by nat2 behind a firewall that lets only outgoing connections and their
replies through (``ip6 testbed_fw``), and the anchor is dual-stack::

   ns "mh" wan2 2001:db8:2::2/64, default via fe80::1 (nat2's lan, as from an RA); no IPv4
   ns "nat2" lan fe80::1, 2001:db8:2::1/64; eth0 2001:db8:113::12/64 (and its IPv4 one)
   ns "an" eth0 2001:db8:113::1/64 besides 203.0.113.1 (route to 2001:db8:2::/64 via nat2)

Both together (``v6_access=True, inner_v6=True``: issue 14's item 6 in one topology):
wan2 IPv6-only behind the IPv6 firewall, wan1 IPv4 behind its NAT, the anchor and the
correspondent dual-stack, the segment's addresses as above (the union of both).

IPv6 is on only in the namespaces these options name (DAD and router advertisements off).

Interface names: the MH has ``wan1``/``wan2``; each NAT has ``lan`` (towards the MH) and
``eth0`` (its inet side); an, an2, ch and atk have ``eth0``; the ports of ``br0`` in ``inet``
are named after their role. Veth pairs are created directly inside their namespaces, so names
never collide with the root namespace or with a parallel run. The MH has two default routes:
via NAT1 (metric 100) and via NAT2 (metric 200). Hosts on 203.0.113.0/24 need no default route.

All traffic stays inside the namespaces created here; :meth:`Topology.down` removes everything
(also when :meth:`Topology.up` fails half-way) and is registered with :mod:`atexit`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from types import TracebackType
from typing import Any

SEGMENT_PREFIX = 24
MH_IFACES = ("wan1", "wan2")
NAT_LAN_IF = "lan"
HOST_IF = "eth0"
BRIDGE = "br0"
KILL_GRACE = 3.0

# The segment's one IPv6 plan (a /64), whichever of v6_access and inner_v6 are on: each
# puts its roles on it (v6_access: an, nat2; inner_v6: an, an2, ch).
SEGMENT6 = {"an": "2001:db8:113::1", "an2": "2001:db8:113::2", "nat2": "2001:db8:113::12",
            "ch": "2001:db8:113::100"}
V6_SEGMENT = SEGMENT6                         # the name the outer IPv6 test imports
V6_ACCESS = ("2001:db8:2::2", "fe80::1")     # wan2's address and gateway with v6_access
V6_ACCESS_NET = "2001:db8:2::/64"
_SEGMENT = {
    "an": "203.0.113.1",
    "an2": "203.0.113.2",
    "nat1": "203.0.113.11",
    "nat2": "203.0.113.12",
    "nat3": "203.0.113.21",
    "atk": "203.0.113.66",
    "ch": "203.0.113.100",
}


def tool_missing(*names: str) -> list[str]:
    """Return the programs among ``names`` that are not on PATH."""
    return [name for name in names if shutil.which(name) is None]


def _ip(args: str) -> None:
    """Run ``ip <args>`` (split on blanks); raise :class:`RuntimeError` with stderr on failure."""
    proc = subprocess.run(["ip", *args.split()], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {args}: {proc.stderr.strip()}")


class Topology:
    """The MH / two NATs / inet bridge / anchor(s) / CH / attacker topology (see module doc)."""

    def __init__(
        self,
        *,
        prefix: str | None = None,
        same_subnet: bool = False,
        anchors: int = 1,
        attacker: bool = False,
        second_mh: bool = False,
        v6_access: bool = False,
        inner_v6: bool = False,
    ) -> None:
        if anchors not in (1, 2):
            raise ValueError("anchors must be 1 or 2")
        self.prefix = prefix or f"u{os.getpid() % 100000}{secrets.token_hex(2)[:3]}"
        self.same_subnet = same_subnet
        self.anchors = anchors
        self.attacker = attacker
        hosts = ["an"] + (["an2"] if anchors == 2 else []) + ["ch"] + (["atk"] if attacker else [])
        self.hosts: list[str] = hosts
        self.second_mh = second_mh
        self.v6_access = v6_access
        if v6_access and same_subnet:
            raise ValueError("v6_access and same_subnet do not go together")
        self.inner_v6 = inner_v6
        self.nats = ["nat1", "nat2"] + (["nat3"] if second_mh else [])
        # who is on the segment's IPv6 plan (SEGMENT6), and who has IPv6 at all
        on6 = ({"an", "nat2"} if v6_access else set()) | (set(hosts) if inner_v6 else set())
        self.addresses6: dict[str, str] = {r: a for r, a in SEGMENT6.items() if r in on6}
        self.v6_roles: tuple[str, ...] = (("mh",) if on6 else ()) + tuple(self.addresses6)
        self.roles: list[str] = ["mh", *(["mh2"] if second_mh else []), *self.nats, "inet",
                                 *hosts]
        self.addresses: dict[str, str] = {r: _SEGMENT[r] for r in (*self.nats, *hosts)}
        # Access networks: (MH address, gateway = NAT lan address) per MH interface.
        if same_subnet:
            self.access: dict[str, tuple[str, str]] = {
                "wan1": ("192.168.1.2", "192.168.1.1"),
                "wan2": ("192.168.1.2", "192.168.1.1"),
            }
        else:
            self.access = {"wan1": ("10.1.0.2", "10.1.0.1"), "wan2": ("10.2.0.2", "10.2.0.1")}
        if v6_access:
            self.access["wan2"] = V6_ACCESS
        self._procs: list[subprocess.Popen[Any]] = []

    def ns(self, role: str) -> str:
        """Namespace name for ``role`` (``mh``, ``nat1``, ``nat2``, ``inet``, ``an``, ...)."""
        if role not in self.roles:
            raise KeyError(f"no role {role!r} in this topology")
        return f"{self.prefix}-{role}"

    # -- building -------------------------------------------------------------------------

    def up(self) -> Topology:
        """Build everything; on any failure tear down what exists and re-raise."""
        atexit.register(self.down)
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _sysctl(self, role: str, *settings: str) -> None:
        self.run(role, "sysctl", "-q", "-w", *settings)

    def _build(self) -> None:
        for role in self.roles:
            _ip(f"netns add {self.ns(role)}")
            # Before any interface exists, so new interfaces inherit: no IPv6 (no DAD
            # delays); in the IPv6 roles, IPv6 without DAD (no "tentative" addresses that
            # change under a before/after comparison) or router advertisements.
            if role in self.v6_roles:
                self._sysctl(role, "net.ipv6.conf.all.accept_dad=0",
                             "net.ipv6.conf.default.accept_dad=0",
                             "net.ipv6.conf.all.accept_ra=0", "net.ipv6.conf.default.accept_ra=0")
            else:
                self._sysctl(
                    role,
                    "net.ipv6.conf.all.disable_ipv6=1",
                    "net.ipv6.conf.default.disable_ipv6=1",
                )
            _ip(f"-n {self.ns(role)} link set lo up")
        for mh in ("mh", "mh2") if self.second_mh else ("mh",):
            self._sysctl(mh, "net.ipv4.conf.all.rp_filter=1",
                         "net.ipv4.conf.default.rp_filter=1")

        inet = self.ns("inet")
        _ip(f"-n {inet} link add {BRIDGE} type bridge stp_state 0")
        _ip(f"-n {inet} link set {BRIDGE} up")
        for role in (*self.nats, *self.hosts):
            self._veth("inet", role, role, HOST_IF)
            _ip(f"-n {inet} link set {role} master {BRIDGE}")
            _ip(f"-n {inet} link set {role} up")
            self._addr(role, HOST_IF, self.addresses[role])

        for i, wan in enumerate(MH_IFACES, start=1):
            nat = f"nat{i}"
            mh_addr, gw = self.access[wan]
            if ":" in mh_addr:
                self._v6_access(wan, nat)       # its routes once the segment has IPv6
                continue
            self._veth("mh", wan, nat, NAT_LAN_IF)
            self._addr("mh", wan, mh_addr)
            self._addr(nat, NAT_LAN_IF, gw)
            self._sysctl("mh", f"net.ipv4.conf.{wan}.rp_filter=1")
            _ip(f"-n {self.ns('mh')} route add default via {gw} dev {wan} metric {100 * i}")
            self._sysctl(nat, "net.ipv4.ip_forward=1")
            self.run(nat, "nft", "-f", "-", input=self._nat_ruleset().encode())
        if self.second_mh:            # the same private subnet as mh's wan1, its own NAT
            mh_addr, gw = self.access["wan1"]
            self._veth("mh2", "wan1", "nat3", NAT_LAN_IF)
            self._addr("mh2", "wan1", mh_addr)
            self._addr("nat3", NAT_LAN_IF, gw)
            self._sysctl("mh2", "net.ipv4.conf.wan1.rp_filter=1")
            _ip(f"-n {self.ns('mh2')} route add default via {gw} dev wan1 metric 100")
            self._sysctl("nat3", "net.ipv4.ip_forward=1")
            self.run("nat3", "nft", "-f", "-", input=self._nat_ruleset().encode())
        for role, addr in self.addresses6.items():
            _ip(f"-n {self.ns(role)} -6 addr add {addr}/64 dev {HOST_IF} nodad")
        if self.v6_access:        # after the segment's addresses: the route needs nat2's
            self._v6_access_routes("wan2", "nat2")

    def _v6_access(self, wan: str, router: str) -> None:
        """The IPv6-only access network of ``wan`` behind ``router`` (see module doc)."""
        mh_addr, gw = self.access[wan]
        self._veth("mh", wan, router, NAT_LAN_IF)
        for role, ifname, addr in (("mh", wan, f"{mh_addr}/64"),
                                   (router, NAT_LAN_IF, f"{gw}/64"),
                                   (router, NAT_LAN_IF, "2001:db8:2::1/64")):
            _ip(f"-n {self.ns(role)} addr add {addr} dev {ifname} nodad")
        self._sysctl(router, "net.ipv6.conf.all.forwarding=1")
        self.run(router, "nft", "-f", "-", input=(
            "table ip6 testbed_fw {\n"
            "  counter refused {\n  }\n"
            "  chain forward {\n"
            "    type filter hook forward priority filter; policy drop;\n"
            "    ct state established,related accept\n"
            f'    iifname "{NAT_LAN_IF}" accept\n'
            '    counter name "refused"\n'
            "  }\n"
            "}\n").encode())

    def _v6_access_routes(self, wan: str, router: str) -> None:
        """The MH's IPv6 default route out of ``wan`` and the anchor's route back to the
        access network, once the segment's IPv6 addresses exist."""
        gw = self.access[wan][1]
        _ip(f"-n {self.ns('mh')} -6 route add default via {gw} dev {wan} metric 200")
        _ip(f"-n {self.ns('an')} -6 route add {V6_ACCESS_NET} via {SEGMENT6[router]} "
            f"dev {HOST_IF}")

    def _veth(self, role_a: str, if_a: str, role_b: str, if_b: str) -> None:
        """Create a veth pair with one end in each namespace, both up."""
        ns_a, ns_b = self.ns(role_a), self.ns(role_b)
        _ip(f"link add {if_a} netns {ns_a} type veth peer name {if_b} netns {ns_b}")
        _ip(f"-n {ns_a} link set {if_a} up")
        _ip(f"-n {ns_b} link set {if_b} up")

    def _addr(self, role: str, ifname: str, address: str) -> None:
        _ip(f"-n {self.ns(role)} addr add {address}/{SEGMENT_PREFIX} dev {ifname}")

    @staticmethod
    def _nat_ruleset() -> str:
        # As a home router's firewall does, unsolicited UDP to the NAT itself is dropped:
        # dropped before conntrack confirms it, it leaves no entry behind. (Delivered, it
        # would leave one whose tuple is the very mapping masquerade keeps for the host's
        # socket, so the host's own packet to that peer would get another port: the first
        # hole-punching check to arrive would break the other's mapping.)
        return (
            "table ip testbed_nat {\n"
            "  chain postrouting {\n"
            "    type nat hook postrouting priority srcnat; policy accept;\n"
            f'    oifname "{HOST_IF}" masquerade\n'
            "  }\n"
            "  chain input {\n"
            "    type filter hook input priority filter; policy accept;\n"
            f'    iifname "{HOST_IF}" meta l4proto udp ct state new drop\n'
            "  }\n"
            "}\n"
        )

    # -- processes --------------------------------------------------------------------------

    def run(
        self,
        role: str,
        *argv: str,
        timeout: float = 30,
        check: bool = True,
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the namespace of ``role``; output is captured and decoded."""
        cmd = ["ip", "netns", "exec", self.ns(role), *argv]
        raw = subprocess.run(cmd, input=input, capture_output=True, timeout=timeout)
        out = raw.stdout.decode(errors="replace")
        err = raw.stderr.decode(errors="replace")
        if check and raw.returncode != 0:
            raise subprocess.CalledProcessError(raw.returncode, cmd, out, err)
        return subprocess.CompletedProcess(cmd, raw.returncode, out, err)

    def popen(self, role: str, *argv: str, **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in the namespace of ``role``; :meth:`down` kills it (own session)."""
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns(role), *argv], **kw)
        self._procs.append(proc)
        return proc

    def set_link(self, role: str, ifname: str, up: bool) -> None:
        """Set ``ifname`` in the namespace of ``role`` up or down."""
        _ip(f"-n {self.ns(role)} link set dev {ifname} {'up' if up else 'down'}")

    def rebind_nat(self, nat: str) -> None:
        """Make NAT ``nat`` forget its UDP mappings and map anew on random ports (a NAT
        rebinding, as home routers and carrier NATs do after a timeout or a reboot)."""
        self.run(nat, "nft", "-f", "-", input=(
            "flush chain ip testbed_nat postrouting\n"
            f'add rule ip testbed_nat postrouting oifname "{HOST_IF}" masquerade random\n'
        ).encode())
        self.run(nat, "conntrack", "-D", "-p", "udp", check=False)   # 1 when none matched

    # -- teardown ---------------------------------------------------------------------------

    def down(self) -> None:
        """Kill our processes and anything left in our namespaces, delete them. Never raises."""
        try:
            self._down()
        except Exception:  # teardown must not raise
            pass
        with contextlib.suppress(Exception):
            atexit.unregister(self.down)

    def _down(self) -> None:
        procs, self._procs = self._procs, []
        for proc in procs:
            _signal_proc(proc, signal.SIGTERM)
        deadline = time.monotonic() + KILL_GRACE
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_proc(proc, signal.SIGKILL)
                with contextlib.suppress(Exception):
                    proc.wait(timeout=5)
        existing = _list_netns()
        names = [self.ns(r) for r in self.roles if self.ns(r) in existing]
        _kill_pids(names)
        for name in names:
            with contextlib.suppress(Exception):
                _ip(f"netns del {name}")

    def __enter__(self) -> Topology:
        return self.up()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()


def host_state(topo: Topology, role: str) -> dict[str, str]:
    """Everything a daemon (or a test) may change in ``role``'s namespace, as text, for a
    before/after comparison: rules, routes, links, addresses, nftables, the sysctls the
    daemons set."""
    out = {}
    for name, argv in {
        "rules": ("ip", "-4", "rule"),
        "routes": ("ip", "-4", "route", "show", "table", "all"),
        "links": ("ip", "-o", "link"),
        "addrs": ("ip", "-4", "-o", "addr"),
        "nft": ("nft", "list", "ruleset"),
        "rules6": ("ip", "-6", "rule"),
        "routes6": ("ip", "-6", "route", "show", "table", "all"),
        "addrs6": ("ip", "-6", "-o", "addr"),
        "sysctl": ("sh", "-c", "grep -H . /proc/sys/net/ipv4/ip_forward "
                   "/proc/sys/net/ipv4/conf/*/src_valid_mark /proc/sys/net/ipv4/conf/*/rp_filter "
                   "/proc/sys/net/ipv6/conf/all/forwarding"),
    }.items():
        text = topo.run(role, *argv).stdout
        if name == "links":   # counters and state flags are not ours to compare
            text = "\n".join(sorted(line.split(" state ")[0] for line in text.splitlines()))
        out[name] = text
    return out


def _signal_proc(proc: subprocess.Popen[Any], sig: int) -> None:
    """Signal the process group of ``proc`` (its own session), else the process itself."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            proc.send_signal(sig)


def _list_netns() -> set[str]:
    """Names of the existing network namespaces (empty set on error)."""
    try:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return set()
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def _netns_pids(name: str) -> set[int]:
    try:
        cmd = ["ip", "netns", "pids", name]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return set()
    return {int(tok) for tok in out.stdout.split() if tok.isdigit()} - {os.getpid()}


def _kill_pids(names: list[str]) -> None:
    """SIGTERM every process left in the namespaces ``names``, SIGKILL after the grace time."""
    pids = set().union(*(_netns_pids(n) for n in names)) if names else set()
    if not pids:
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + KILL_GRACE
    while time.monotonic() < deadline:
        pids = set().union(*(_netns_pids(n) for n in names))
        if not pids:
            return
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
