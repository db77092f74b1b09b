#!/usr/bin/env python3
"""upmt_tun beside raw veth, wireguard-go and OpenVPN: one command, one table.

    python benchmarks/suite.py [--seconds N] [--quick] [--contenders raw,wireguard-go,...]
                               [--topologies pair,nat] [--json PATH] [--workdir DIR]
                               [--no-install]

**pair** topology (the main one): two fresh network namespaces ``<prefix>-a`` (A) and
``<prefix>-b`` (B) joined by one veth pair (A ``va`` 10.99.0.1/24, B ``vb`` 10.99.0.2/24).
The iperf3 server and the ping target live in B, the clients in A. The contenders run one
after the other on that same pair, each with its own processes, stopped before the next:

* ``raw``: straight over the veth addresses (kernel only);
* ``wireguard-go``: Debian's userspace ``wireguard-go`` (a TUN device, never the kernel
  module) in A and B, keys, peer and endpoint set with ``wg``; inner 10.98.0.1/2, MTU 1440;
* ``openvpn``: OpenVPN 2.6 point to point over UDP, TLS with a throw-away EC CA made by
  ``openssl``, data channel AES-256-GCM, ``--disable-dco`` (userspace data channel), tun
  device; inner 10.97.0.1/2, MTU 1440;
* ``upmt_tun``: ``upmt-agent up`` in A (one ``[[interface]]``: ``va``) and ``upmt-anchor`` in
  B with ``role = "fixed-host"`` listening on 10.99.0.2:5060: it terminates the tunnel and
  delivers to B's own applications, so the iperf3 server is reached at B's listen address
  10.99.0.2 *through the tunnel*. Rules steer tcp and udp to 10.99.0.2:5201 and icmp to
  10.99.0.2 into it. MTU 1440 at both ends (the agent's default for a 1500 link);
* ``upmt_plain``: the same with ``insecure_plaintext_for_benchmarks = true`` on both ends.

Tests per contender: iperf3 TCP with 1 and 4 streams (``-P 4``), upload (A -> B) and
download (``-R``), retransmits from iperf3's JSON; UDP ``-b 0`` at 64 and 1400 byte payloads
(A -> B: packets/s received and loss); ping RTT (median and p90), idle and again while one
iperf3 TCP upload saturates the tunnel (``ping_load``: bufferbloat in the path's queues);
after the tests, the contender's processes' idle CPU over ``--idle-seconds`` (default 60,
the busiest process's percentage in the table); CPU seconds per GB = the
contender's own processes' CPU time (utime + stime) over the four TCP tests / GB received
(raw: n/a), and the whole machine's busy CPU time per GB (/proc/stat, includes iperf3 and
the kernel) for every contender.

Sanity checks, each test: the contender's own counters (veth for raw, ``wg show transfer``,
the OpenVPN tun device, the upmt agent's tunnel counters) must have carried at least the
bytes the test moved in its direction; the tunnel devices must be TUNs (``ip -d link``);
OpenVPN must log AES-256-GCM; the upmt agent must show the tcp/udp/icmp flows to B in its
flow table, and each tunnel packet must add 32 bytes (header + tag, sealed) or 16 (header,
plaintext) to its inner packet on A's veth (the outer headers counted once per veth packet,
so this holds with UDP GSO too). A contender that bypasses its tunnel is an error, not a
number.

Other load on the machine: the CPU time of every process that is neither this script nor
one of its descendants (nor a kernel thread) is summed around each contender and the whole
run (``foreign_cpu_s``, the biggest users in ``foreign_top``; the commands that start and
end in between show up in the parent that reaps them). Compare columns within one run.

**nat** topology: agent to anchor through NATs (MH behind NAT1 -> anchor, masquerade ->
CH): ``benchmarks/throughput.py`` runs as a subprocess with ``--json`` and its table is
folded into the output and the JSON.

Missing ``wireguard-go``/``wg``/``openvpn``/``openssl`` are installed with apt (said on
stderr) unless ``--no-install``; contenders that still miss something are skipped with the
reason. Only addresses inside the namespaces built here are contacted; every process and
namespace is removed at the end, also on errors, Ctrl-C and SIGTERM. Exit 0 when everything
ran and passed its checks, 1 on errors, 2 when a prerequisite is missing, 130 when
interrupted.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime as dt
import functools
import json
import os
import platform
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import (  # noqa: E402 (benchmarks/ dir)
    CLK_TCK,
    BenchError,
    fmt,
    interruptible,
    iperf3_client,
    loadavg,
    machine_busy_seconds,
    proc_cmdline,
    proc_cpu_seconds,
    render,
    source_version,
)

from upmt_tun import keys
from upmt_tun.lab import exe

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"

A_ADDR, B_ADDR = "10.99.0.1", "10.99.0.2"
A_IF, B_IF = "va", "vb"
PORT = 5201
UPMT_PORT = 5060
TUNNEL_MTU = 1440          # every tunnel: fits a 1400-byte UDP payload, and upmt's default
CONTENDERS = ("raw", "wireguard-go", "openvpn", "upmt_tun", "upmt_plain")
TOPOLOGIES = ("pair", "nat")
TCP_TESTS = ("tcp1_up", "tcp1_down", "tcp4_up", "tcp4_down")
# tools each contender needs beyond ip/iperf3/ping, and the Debian packages holding them
NEEDS: dict[str, tuple[str, ...]] = {
    "raw": (), "wireguard-go": ("wireguard-go", "wg"), "openvpn": ("openvpn", "openssl"),
    "upmt_tun": ("nft",), "upmt_plain": ("nft",),
}
PACKAGE_OF = {"wireguard-go": "wireguard-go", "wg": "wireguard-tools", "openvpn": "openvpn",
              "openssl": "openssl"}
# bytes a upmt tunnel packet adds to its inner packet inside the outer UDP payload: header
# 16 (+ the 16-byte Poly1305 tag when sealed). The outer Ethernet + IPv4 + UDP headers (42)
# are there once per skb on the veth: once per datagram, or once per UDP GSO super-packet.
UPMT_TUNNEL_BYTES = {"plaintext": 16, "sealed": 16 + 16}
OUTER_HEADERS = 14 + 20 + 8
KILL_GRACE = 5.0



# -- small helpers ------------------------------------------------------------------------




def first_line(*argv: str) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "missing"
    lines = [ln.strip() for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    return lines[0] if lines else "?"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name"):
                    return ln.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def machine_facts() -> dict[str, Any]:
    return {
        "cpu_model": cpu_model(), "nproc": os.cpu_count(), "kernel": platform.release(),
        "python": platform.python_version(),
        "iperf3": first_line("iperf3", "--version"),
        "wireguard-go": first_line("wireguard-go", "--version"),
        "wg": first_line("wg", "--version"),
        "openvpn": first_line("openvpn", "--version"),
        "openssl": first_line("openssl", "version"),
    }


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


def _netns_list() -> set[str]:
    try:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    return {ln.split()[0] for ln in out.splitlines() if ln.strip()}


def _netns_pids(name: str) -> set[int]:
    try:
        out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    return {int(t) for t in out.split() if t.isdigit()} - {os.getpid()}


def stop_proc(proc: subprocess.Popen[Any], grace: float = KILL_GRACE) -> int | None:
    """SIGTERM the process group of ``proc`` (its own session), SIGKILL after ``grace``;
    its exit code (None when it had to be killed)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            return proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            return None
    return proc.returncode


class ForeignCpu:
    """CPU seconds used meanwhile by the processes that are not ours: neither this process
    nor its descendants, nor kernel threads. Sums utime + stime + the reaped children's
    time over those processes, at the start and at the end: a child's whole time moves into
    its parent's when it is reaped, so the difference counts the commands that started and
    ended in between too (also those that ran partly before: their earlier time is in the
    start sum). ``top()`` names the processes that used the most."""

    def __init__(self) -> None:
        self.start = self._scan()

    @staticmethod
    def _scan() -> dict[int, tuple[str, float]]:
        """pid -> (name, CPU s incl. reaped children) of every foreign process."""
        procs: dict[int, tuple[int, str, float]] = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fl = stat[stat.rindex(")") + 2:].split()
            name = stat[stat.find("(") + 1:stat.rindex(")")]
            procs[int(d)] = (int(fl[1]), name, sum(int(x) for x in fl[11:15]) / CLK_TCK)
        me = os.getpid()

        def foreign(pid: int) -> bool:
            if pid == 2 or procs[pid][0] == 2:      # kthreadd and kernel threads
                return False
            for _ in range(64):
                if pid == me:
                    return False
                if pid <= 1 or pid not in procs:
                    return True
                pid = procs[pid][0]
            return True

        return {pid: (name, cpu) for pid, (_, name, cpu) in procs.items() if foreign(pid)}

    def measure(self) -> dict[str, Any]:
        end = self._scan()
        total = sum(c for _, c in end.values()) - sum(c for _, c in self.start.values())
        per = sorted(((cpu - self.start.get(pid, ("", 0.0))[1], pid, name)
                      for pid, (name, cpu) in end.items()), reverse=True)
        return {"cpu_s": round(total, 2),
                "top": [f"{name}[{pid}] {d:.1f}s" for d, pid, name in per[:3] if d >= 0.5]}


# -- the pair of namespaces ---------------------------------------------------------------

class Pair:
    """Namespaces A and B joined by one veth pair; :meth:`down` kills everything in them
    and removes them (registered with atexit too)."""

    def __init__(self) -> None:
        # short: wireguard-go's device names (prefix + 2 chars) must fit IFNAMSIZ (15)
        self.prefix = f"s{os.getpid() % 100000}{secrets.token_hex(2)}"
        self.names = {"a": f"{self.prefix}-a", "b": f"{self.prefix}-b"}
        self.procs: list[subprocess.Popen[Any]] = []

    def up(self) -> Pair:
        atexit.register(self.down)
        try:
            for side, ns in self.names.items():
                _ip("netns", "add", ns)
                self.run(side, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",
                         "net.ipv6.conf.default.disable_ipv6=1")
                _ip("-n", ns, "link", "set", "lo", "up")
            _ip("link", "add", A_IF, "netns", self.names["a"], "type", "veth", "peer", "name",
                B_IF, "netns", self.names["b"])
            for side, ifname, addr in (("a", A_IF, A_ADDR), ("b", B_IF, B_ADDR)):
                _ip("-n", self.names[side], "addr", "add", f"{addr}/24", "dev", ifname)
                _ip("-n", self.names[side], "link", "set", ifname, "up")
        except BaseException:
            self.down()
            raise
        return self

    def run(self, side: str, *argv: str, timeout: float = 30, check: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        cmd = ["ip", "netns", "exec", self.names[side], *argv]
        r = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise BenchError(f"{' '.join(argv[:4])} in {side}: exit {r.returncode}: "
                             f"{(r.stderr or r.stdout).strip()[-300:]}")
        return r

    def popen(self, side: str, *argv: str, env: dict[str, str] | None = None,
              **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in ``side``'s namespace in its own session (``ip netns exec`` execs
        into it, so the pid is the program's own)."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(["ip", "netns", "exec", self.names[side], *argv],
                                start_new_session=True,
                                env={**os.environ, **(env or {})}, **kw)
        self.procs.append(proc)
        return proc

    def link_stats(self, side: str, ifname: str) -> dict[str, int]:
        links = json.loads(self.run(side, "ip", "-s", "-j", "link", "show", "dev", ifname).stdout)
        st = links[0].get("stats64", {})
        return {f"{d}_{k}": int(st.get(d, {}).get(k, 0))
                for d in ("rx", "tx") for k in ("bytes", "packets", "dropped")}

    def link_kind(self, side: str, ifname: str) -> str:
        """'tun' for a TUN device, else its ip -d link kind ('wireguard', 'veth', ...)."""
        links = json.loads(self.run(side, "ip", "-d", "-j", "link", "show", "dev", ifname).stdout)
        info = links[0].get("linkinfo", {})
        kind = str(info.get("info_kind", "?"))
        if kind == "tun":
            return "tun" if info.get("info_data", {}).get("type") == "tun" else "tap"
        return kind

    def wait_listening(self, side: str, port: int, proto: str = "t", timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.run(side, "ss", f"-Hln{proto}", check=False).stdout
            if re.search(rf":{port}\s", out):
                return
            time.sleep(0.05)
        raise BenchError(f"nothing listening on {port} in {side} after {timeout}s")

    def down(self) -> None:
        """Kill our processes and anything else in our namespaces, delete them. Never raises."""
        with contextlib.suppress(Exception):
            procs, self.procs = self.procs, []
            for p in procs:
                stop_proc(p, grace=2.0)
            names = [n for n in self.names.values() if n in _netns_list()]
            left = set().union(*(_netns_pids(n) for n in names)) if names else set()
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            for n in names:
                with contextlib.suppress(Exception):
                    _ip("netns", "del", n)
        with contextlib.suppress(Exception):
            atexit.unregister(self.down)


# -- contenders ---------------------------------------------------------------------------

class Contender:
    """One way from A to B. ``target`` is B's address as A's applications use it."""

    name = ""
    target = B_ADDR
    own_cpu = True          # has userspace processes whose CPU time is the contender's

    def __init__(self, pair: Pair, workdir: Path) -> None:
        self.pair = pair
        self.dir = workdir / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.daemons: dict[str, subprocess.Popen[Any]] = {}
        self.notes: dict[str, Any] = {}

    def start(self) -> None:
        pass

    def counters(self) -> dict[str, int]:
        """Bytes this contender carried A -> B (``up_bytes``) and B -> A (``down_bytes``),
        counted by the contender itself (plus anything else it wants to compare)."""
        raise NotImplementedError

    def final_checks(self, tests: dict[str, Any]) -> dict[str, Any]:
        """Checks after all tests (``tests`` = this contender's results); bools are checks."""
        return {}

    def pids(self) -> dict[str, int]:
        return {k: p.pid for k, p in self.daemons.items() if p.poll() is None}

    def _daemon(self, key: str, side: str, *argv: str,
                env: dict[str, str] | None = None) -> subprocess.Popen[Any]:
        out = open(self.dir / f"{key}.out", "w")
        err = open(self.dir / f"{key}.log", "w")
        try:
            p = self.pair.popen(side, *argv, env=env, stdout=out, stderr=err)
        finally:
            out.close()
            err.close()
        self.daemons[key] = p
        return p

    def _wait_for(self, key: str, pattern: str, file: str = "out", timeout: float = 20) -> None:
        path = self.dir / f"{key}.{file}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, path.read_text(errors="replace"), re.M):
                return
            if self.daemons[key].poll() is not None:
                break
            time.sleep(0.05)
        raise BenchError(f"{key} not ready ({pattern!r}), exit {self.daemons[key].poll()}: "
                         f"{self.tail(key)}")

    def tail(self, key: str, n: int = 8) -> str:
        text = ""
        for ext in ("log", "out"):
            with contextlib.suppress(OSError):
                text += (self.dir / f"{key}.{ext}").read_text(errors="replace")
        return " | ".join(text.strip().splitlines()[-n:])

    def wait_ping(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.pair.run("a", "ping", "-n", "-c", "1", "-W", "1", self.target, check=False)
            if r.returncode == 0:
                return
        raise BenchError(f"{self.target} not reachable through {self.name} after {timeout}s")

    def stop(self) -> dict[str, int | None]:
        return {k: stop_proc(p) for k, p in self.daemons.items()}

    def log_trouble(self) -> list[str]:
        bad: list[str] = []
        for log in sorted(self.dir.glob("*.log")):
            for ln in log.read_text(errors="replace").splitlines():
                if re.search(r"WARN|ERROR|CRITICAL|Traceback|Exception", ln):
                    bad.append(f"{log.name}: {ln}")
        return bad[:20]


class Raw(Contender):
    name = "raw"
    own_cpu = False

    def counters(self) -> dict[str, int]:
        st = self.pair.link_stats("a", A_IF)
        return {"up_bytes": st["tx_bytes"], "down_bytes": st["rx_bytes"]}


class WireguardGo(Contender):
    name = "wireguard-go"
    target = "10.98.0.2"

    def __init__(self, pair: Pair, workdir: Path) -> None:
        super().__init__(pair, workdir)
        self.dev = {"a": f"{pair.prefix}wa", "b": f"{pair.prefix}wb"}

    def start(self) -> None:
        inner = {"a": "10.98.0.1", "b": "10.98.0.2"}
        outer = {"a": A_ADDR, "b": B_ADDR}
        pairs = {side: keys.keypair() for side in ("a", "b")}
        for side in ("a", "b"):
            # -f and WG_PROCESS_FOREGROUND=1: no daemonizing, the pid is wireguard-go's own
            self._daemon(side, side, "wireguard-go", "-f", self.dev[side],
                         env={"WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "error"})
        for side in ("a", "b"):
            sock = Path(f"/var/run/wireguard/{self.dev[side]}.sock")
            deadline = time.monotonic() + 10
            while not sock.exists():
                if time.monotonic() > deadline or self.daemons[side].poll() is not None:
                    raise BenchError(f"wireguard-go in {side} did not start: {self.tail(side)}")
                time.sleep(0.05)
        for side, other in (("a", "b"), ("b", "a")):
            keyfile = self.dir / f"{side}.key"
            keyfile.write_text(pairs[side][0] + "\n")
            keyfile.chmod(0o600)
            self.pair.run(side, "wg", "set", self.dev[side], "private-key", str(keyfile),
                          "listen-port", "51820", "peer", pairs[other][1],
                          "endpoint", f"{outer[other]}:51820",
                          "allowed-ips", f"{inner[other]}/32")
            ns = self.pair.names[side]
            _ip("-n", ns, "addr", "add", f"{inner[side]}/24", "dev", self.dev[side])
            _ip("-n", ns, "link", "set", self.dev[side], "mtu", str(TUNNEL_MTU), "up")
        self.notes["device_kind"] = {s: self.pair.link_kind(s, self.dev[s]) for s in ("a", "b")}
        if set(self.notes["device_kind"].values()) != {"tun"}:
            raise BenchError(f"wireguard devices are not TUNs: {self.notes['device_kind']}")
        self.wait_ping()

    def counters(self) -> dict[str, int]:
        out = self.pair.run("a", "wg", "show", self.dev["a"], "transfer").stdout.split()
        rx, tx = (int(out[1]), int(out[2])) if len(out) >= 3 else (0, 0)
        return {"up_bytes": tx, "down_bytes": rx}

    def stop(self) -> dict[str, int | None]:
        codes = super().stop()
        for dev in self.dev.values():   # left behind only if it had to be killed
            Path(f"/var/run/wireguard/{dev}.sock").unlink(missing_ok=True)
        return codes


class OpenVPN(Contender):
    name = "openvpn"
    target = "10.97.0.2"
    dev = {"a": "ova", "b": "ovb"}

    def _pki(self) -> Path:
        """A throw-away CA and a server and client certificate (EC P-256), in our workdir."""
        pki = self.dir / "pki"
        pki.mkdir(exist_ok=True)

        def ossl(*argv: str) -> None:
            r = subprocess.run(["openssl", *argv], cwd=pki, capture_output=True, text=True,
                               timeout=30)
            if r.returncode != 0:
                raise BenchError(f"openssl {argv[0]}: {r.stderr.strip()[-300:]}")

        ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
        ossl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=upmt-bench-ca")
        for name, eku in (("server", "serverAuth"), ("client", "clientAuth")):
            ossl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN=upmt-bench-{name}")
            (pki / f"{name}.ext").write_text("basicConstraints=CA:FALSE\n"
                                             "keyUsage=digitalSignature\n"
                                             f"extendedKeyUsage={eku}\n")
            ossl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "2",
                 "-extfile", f"{name}.ext")
        for f in pki.glob("*.key"):
            f.chmod(0o600)
        return pki

    def start(self) -> None:
        pki = self._pki()
        inner = {"a": "10.97.0.1", "b": "10.97.0.2"}
        outer = {"a": A_ADDR, "b": B_ADDR}
        role = {"a": ("--tls-client", "--remote-cert-tls", "server"), "b": ("--tls-server",)}
        cert = {"a": "client", "b": "server"}
        for side, other in (("b", "a"), ("a", "b")):
            self._daemon(side, side, "openvpn", "--dev", self.dev[side], "--dev-type", "tun",
                         "--proto", "udp", "--local", outer[side], "--lport", "1194",
                         "--remote", outer[other], "1194",
                         "--ifconfig", inner[side], inner[other], "--tun-mtu", str(TUNNEL_MTU),
                         *role[side], "--ca", str(pki / "ca.crt"),
                         "--cert", str(pki / f"{cert[side]}.crt"),
                         "--key", str(pki / f"{cert[side]}.key"), "--dh", "none",
                         "--data-ciphers", "AES-256-GCM", "--disable-dco",
                         "--auth-nocache", "--verb", "3")
        for side in ("a", "b"):
            self._wait_for(side, r"Initialization Sequence Completed", timeout=30)
        logs = {s: (self.dir / f"{s}.out").read_text(errors="replace") for s in ("a", "b")}
        self.notes["data_cipher"] = {
            s: (m.group(1) if (m := re.search(r"Data Channel: cipher '([^']+)'", t)) else None)
            for s, t in logs.items()}
        self.notes["device_kind"] = {s: self.pair.link_kind(s, self.dev[s]) for s in ("a", "b")}
        if set(self.notes["data_cipher"].values()) != {"AES-256-GCM"}:
            raise BenchError(f"data channel cipher is not AES-256-GCM: {self.notes['data_cipher']}")
        if set(self.notes["device_kind"].values()) != {"tun"}:
            raise BenchError(f"openvpn devices are not TUNs (DCO?): {self.notes['device_kind']}")
        self.wait_ping()

    def counters(self) -> dict[str, int]:
        st = self.pair.link_stats("a", self.dev["a"])
        return {"up_bytes": st["tx_bytes"], "down_bytes": st["rx_bytes"]}


class Upmt(Contender):
    """``upmt-agent`` in A, ``upmt-anchor`` (role fixed-host) in B."""

    def __init__(self, pair: Pair, workdir: Path, plaintext: bool) -> None:
        self.name = "upmt_plain" if plaintext else "upmt_tun"
        super().__init__(pair, workdir)
        self.plaintext = plaintext
        self.run_dir = Path(f"/run/upmt-{pair.prefix}-{self.name}")
        self.agent_ctl = str(self.run_dir / "agent.sock")
        self.anchor_ctl = str(self.run_dir / "anchor.sock")

    exe = staticmethod(exe)

    def write_configs(self) -> tuple[Path, Path]:
        host_priv, host_pub = keys.keypair()
        fh_priv, fh_pub = keys.keypair()
        extra = "insecure_plaintext_for_benchmarks = true\n" if self.plaintext else ""
        anchor = self.dir / "anchor.toml"
        anchor.write_text(
            f'role = "fixed-host"\nlisten = "{B_ADDR}:{UPMT_PORT}"\n'
            f'vipa_pool = "100.100.0.0/16"\nmtu = {TUNNEL_MTU}\n'
            f'control = "{self.anchor_ctl}"\nprivate_key = "{fh_priv}"\n{extra}'
            f'state_dir = "{self.dir.resolve() / "state"}"\n\n'   # not the machine's /var/lib
            f'[[peer]]\nname = "bench"\npublic_key = "{host_pub}"\n')
        agent = self.dir / "agent.toml"
        rules = "".join(
            f'\n[[rule]]\nname = "bench-{proto}"\nprotocol = "{proto}"\ndst = "{B_ADDR}/32"\n'
            + (f"dst_port = {PORT}\n" if proto != "icmp" else "") + f'via = ["{A_IF}"]\n'
            for proto in ("tcp", "udp", "icmp"))
        agent.write_text(
            f'name = "bench"\ncontrol = "{self.agent_ctl}"\nprivate_key = "{host_priv}"\n'
            f'mtu = {TUNNEL_MTU}\n{extra}\n[[interface]]\nname = "{A_IF}"\n\n'
            f'[[anchor]]\nname = "fh"\naddress = "{B_ADDR}:{UPMT_PORT}"\n'
            f'public_key = "{fh_pub}"\n{rules}')
        for p in (anchor, agent):
            p.chmod(0o600)
        return anchor, agent

    def start(self) -> None:
        anchor, agent = self.write_configs()
        self._daemon("anchor", "b", *self.exe("upmt-anchor"), "--config", str(anchor))
        self._wait_for("anchor", r"^ready\s*$")
        self._daemon("agent", "a", *self.exe("upmt-agent"), "up", "--config", str(agent))
        self._wait_for("agent", r"^ready\s*$")
        self.wait_ping()

    def agent_status(self) -> dict[str, Any]:
        r = self.pair.run("a", *self.exe("upmt-agent"), "status", "--control", self.agent_ctl,
                          "--json")
        out: dict[str, Any] = json.loads(r.stdout)
        return out

    def anchor_status(self) -> dict[str, Any]:
        r = self.pair.run("b", *self.exe("upmt-anchor"), "status", "--json",
                          "--control", self.anchor_ctl)
        out: dict[str, Any] = json.loads(r.stdout)
        return out

    def counters(self) -> dict[str, int]:
        st = self.agent_status()
        out = {k: sum(int(t[k]) for t in st["tunnels"])
               for k in ("tx_packets", "rx_packets", "tx_bytes", "rx_bytes")}
        wire = self.pair.link_stats("a", A_IF)
        out.update({f"wire_{k}": v for k, v in wire.items()})
        out["up_bytes"], out["down_bytes"] = out["tx_bytes"], out["rx_bytes"]
        return out

    def final_checks(self, tests: dict[str, Any]) -> dict[str, Any]:
        st = self.agent_status()
        self.notes["agent_status"] = st
        with contextlib.suppress(Exception):
            self.notes["anchor_status"] = self.anchor_status()
        flows = [f for f in st["flows"] if f["dst"] == B_ADDR]

        def seen(proto: str, both: bool) -> bool:
            return any(f["protocol"] == proto and (proto == "icmp" or f["dport"] == PORT)
                       and f["tx_packets"] > 0 and (f["rx_packets"] > 0 or not both)
                       for f in flows)

        check: dict[str, Any] = {
            "tcp_flows_via_tunnel": seen("tcp", True),
            "udp_flows_via_tunnel": seen("udp", False),
            "icmp_flow_via_tunnel": seen("icmp", True),
            "flows": [{k: f.get(k) for k in ("protocol", "dport", "tx_packets", "rx_packets",
                                             "interface", "anchor")} for f in flows],
        }
        # sealed or not, as configured: header (+ tag) per tunnel packet, TCP 1 upload
        expect = "plaintext" if self.plaintext else "sealed"
        overhead = tests.get("tcp1_up", {}).get("tunnel_bytes_per_packet")
        check["tunnel_bytes_per_packet"] = overhead
        check["data_" + expect] = (isinstance(overhead, float)
                                   and abs(overhead - UPMT_TUNNEL_BYTES[expect]) < 4)
        return check

    def stop(self) -> dict[str, int | None]:
        agent = self.daemons.get("agent")
        if agent is not None and agent.poll() is None:
            with contextlib.suppress(Exception):
                self.pair.run("a", *self.exe("upmt-agent"), "down", "--control", self.agent_ctl,
                              check=False)
            with contextlib.suppress(subprocess.TimeoutExpired):
                agent.wait(10)    # it restores A's state and exits by itself
        codes = super().stop()
        with contextlib.suppress(OSError):
            if self.run_dir.exists() and not any(self.run_dir.iterdir()):
                self.run_dir.rmdir()
        return codes


def make_contender(name: str, pair: Pair, workdir: Path) -> Contender:
    if name == "raw":
        return Raw(pair, workdir)
    if name == "wireguard-go":
        return WireguardGo(pair, workdir)
    if name == "openvpn":
        return OpenVPN(pair, workdir)
    return Upmt(pair, workdir, plaintext=name == "upmt_plain")


# -- tests --------------------------------------------------------------------------------

class Meter:
    """Around one test: the contender's processes' CPU, the machine's busy CPU and the
    contender's byte counters."""

    def __init__(self, c: Contender) -> None:
        self.c = c

    def __enter__(self) -> Meter:
        self.counters0 = self.c.counters()
        self.pids = self.c.pids()
        self.cpu0 = {k: proc_cpu_seconds(pid) for k, pid in self.pids.items()}
        self.busy0 = machine_busy_seconds()
        return self

    def __exit__(self, *exc: Any) -> None:
        busy = machine_busy_seconds() - self.busy0
        self.cpu = {}
        for k, pid in self.pids.items():
            with contextlib.suppress(OSError, ValueError):
                self.cpu[k] = round(proc_cpu_seconds(pid) - self.cpu0[k], 3)
        self.busy = round(busy, 3)
        if exc[0] is None:
            after = self.c.counters()
            self.delta = {k: v - self.counters0.get(k, 0) for k, v in after.items()}


def iperf3(pair: Pair, target: str, seconds: float, *extra: str) -> dict[str, Any]:
    return iperf3_client(functools.partial(pair.run, "a"), target, PORT, seconds, *extra)


def through_check(out: dict[str, Any], delta: dict[str, int], key: str, moved: int,
                  name: str) -> None:
    """The contender's own counter ``key`` must have carried at least ``moved`` bytes."""
    carried = delta.get(key, 0)
    out[f"contender_{key}"] = carried
    ok = carried >= moved > 0
    out["through_contender"] = out.get("through_contender", True) and ok
    if not ok:
        raise BenchError(f"{name}'s own counters carried {carried} bytes ({key}) for a test "
                         f"that moved {moved}: traffic did not go through it")


def tcp_test(c: Contender, pair: Pair, seconds: float, streams: int,
             reverse: bool) -> dict[str, Any]:
    extra = [*(["-P", str(streams)] if streams > 1 else []), *(["-R"] if reverse else [])]
    with Meter(c) as m:
        res = iperf3(pair, c.target, seconds, *extra)
    end = res["end"]
    recv, sent = end["sum_received"], end["sum_sent"]
    gb = recv["bytes"] / 1e9
    own = sum(m.cpu.values())
    out: dict[str, Any] = {
        "direction": "download (B->A)" if reverse else "upload (A->B)", "streams": streams,
        "seconds": recv["seconds"], "bytes": recv["bytes"], "sender_bytes": sent["bytes"],
        "gbit_s": recv["bits_per_second"] / 1e9, "retransmits": sent.get("retransmits"),
        "cpu_s": m.cpu, "cpu_s_total": round(own, 3), "machine_cpu_s": m.busy,
        "cpu_s_per_gb": own / gb if gb > 0 and c.own_cpu else None,
        "machine_cpu_s_per_gb": m.busy / gb if gb > 0 else None,
        "counters": m.delta,
    }
    streams_json = end.get("streams") or []
    if not reverse and streams_json and "mean_rtt" in streams_json[0].get("sender", {}):
        out["sender_mean_rtt_ms"] = statistics.mean(
            s["sender"]["mean_rtt"] for s in streams_json) / 1000
    if isinstance(c, Upmt) and not reverse:
        # (veth bytes - inner bytes - outer headers once per veth packet) / tunnel packets:
        # the tunnel header and tag per packet, with or without UDP GSO
        n = m.delta.get("tx_packets", 0)
        added = (m.delta.get("wire_tx_bytes", 0) - m.delta.get("tx_bytes", 0)
                 - OUTER_HEADERS * m.delta.get("wire_tx_packets", 0))
        out["tunnel_bytes_per_packet"] = added / n if n else None
        out["tunnel_packets_per_wire_packet"] = (
            n / m.delta["wire_tx_packets"] if m.delta.get("wire_tx_packets") else None)
    through_check(out, m.delta, "down_bytes" if reverse else "up_bytes", int(recv["bytes"]),
                  c.name)
    return out


def udp_test(c: Contender, pair: Pair, seconds: float, size: int) -> dict[str, Any]:
    with Meter(c) as m:
        res = iperf3(pair, c.target, seconds, "-u", "-b", "0", "-l", str(size))
    end = res["end"]
    snd = end.get("sum_sent", end.get("sum"))
    rcv = end.get("sum_received", end.get("sum"))
    if snd is None or rcv is None:
        raise BenchError("iperf3 UDP: no sum in its JSON")
    sent = int(snd["packets"])
    # the receiver's "packets" is the highest sequence number seen, "lost" the gaps below it
    received = max(0, int(rcv["packets"]) - int(rcv["lost_packets"]))
    secs = float(rcv["seconds"]) or float(seconds)
    out: dict[str, Any] = {
        "direction": "upload (A->B)", "payload_bytes": size, "seconds": secs,
        "sent_packets": sent, "received_packets": received,
        "lost_percent": 100.0 * (sent - received) / sent if sent else None,
        "iperf3_lost_percent": float(rcv.get("lost_percent", 0.0)),
        "sent_pps": sent / float(snd["seconds"] or secs), "received_pps": received / secs,
        "jitter_ms": float(rcv.get("jitter_ms", 0.0)),
        "cpu_s": m.cpu, "machine_cpu_s": m.busy, "counters": m.delta,
    }
    through_check(out, m.delta, "up_bytes", received * size, c.name)
    return out


_TIME = re.compile(r"time=([\d.]+) ms")


def ping_test(c: Contender, pair: Pair, count: int, interval: float) -> dict[str, Any]:
    with Meter(c) as m:
        r = pair.run("a", "ping", "-n", "-c", str(count), "-i", str(interval), "-W", "2",
                     c.target, check=False, timeout=count * interval + 30)
    times = [float(t) for t in _TIME.findall(r.stdout)]
    if not times:
        raise BenchError(f"ping exit {r.returncode}: {(r.stdout + r.stderr).strip()[-300:]}")
    deciles = statistics.quantiles(times, n=10) if len(times) >= 2 else times * 9
    out: dict[str, Any] = {
        "transmitted": count, "received": len(times), "interval_s": interval,
        "rtt_median_ms": statistics.median(times), "rtt_p90_ms": deciles[8],
        "rtt_min_ms": min(times), "rtt_max_ms": max(times), "rtt_mean_ms": statistics.mean(times),
        "counters": m.delta,
    }
    through_check(out, m.delta, "up_bytes", len(times) * 64, c.name)
    through_check(out, m.delta, "down_bytes", len(times) * 64, c.name)
    return out


def ping_load_test(c: Contender, pair: Pair, count: int, interval: float) -> dict[str, Any]:
    """Pings while one iperf3 TCP upload saturates the tunnel (started 1 s before the first
    ping, lasting past the last): the queueing our path adds under load (bufferbloat)."""
    seconds = count * interval + 3
    load = pair.popen("a", "iperf3", "-c", c.target, "-p", str(PORT), "-J",
                      "--connect-timeout", "5000", "-t", f"{seconds:g}",
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(1.0)
        out = ping_test(c, pair, count, interval)
        stdout, _ = load.communicate(timeout=seconds + 30)
    finally:
        if load.poll() is None:
            stop_proc(load)
    try:
        res = json.loads(stdout)
        out["load_gbit_s"] = res["end"]["sum_received"]["bits_per_second"] / 1e9
    except (json.JSONDecodeError, KeyError, TypeError):
        raise BenchError(f"load iperf3 exit {load.returncode}: {stdout.strip()[-300:]}") from None
    return out


def idle_test(c: Contender, pair: Pair, seconds: float) -> dict[str, Any]:
    """CPU of the contender's own processes over ``seconds`` with no traffic (its own
    keepalives and timers only): a busy loop left spinning shows here."""
    with Meter(c) as m:
        time.sleep(seconds)
    return {"seconds": seconds, "cpu_s": m.cpu,
            "cpu_percent": {k: round(100.0 * v / seconds, 2) for k, v in m.cpu.items()},
            "cpu_percent_max": round(100.0 * max(m.cpu.values(), default=0.0) / seconds, 2)}


def run_contender(name: str, pair: Pair, args: argparse.Namespace, workdir: Path,
                  res: dict[str, Any], errors: list[str]) -> None:
    """Start ``name``'s processes, warm up, run every test, check, stop."""
    c = make_contender(name, pair, workdir)
    res.update({"status": "failed", "target": c.target, "workdir": str(c.dir), "tests": {}})
    tests: dict[str, Any] = res["tests"]
    server: subprocess.Popen[Any] | None = None

    def start_server() -> subprocess.Popen[Any]:
        # bound to the contender's address in B: a wildcard-bound UDP server on the upmt
        # fixed host answers from the TUN's address (100.100.0.1), which the agent's flow
        # does not match (see benchmarks/README.md)
        p = pair.popen("b", "iperf3", "-s", "-p", str(PORT), "-B", c.target,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pair.wait_listening("b", PORT)
        return p

    def attempt(test: str, fn: Any, *a: Any) -> None:
        nonlocal server
        print(f"  {test} [{name}] ...", end="", flush=True, file=sys.stderr)
        try:
            tests[test] = fn(c, pair, *a)
            print(" ok", file=sys.stderr)
        except BenchError as e:
            tests[test] = {"error": str(e)}
            errors.append(f"{name} {test}: {e}")
            print(f" FAILED: {e}", file=sys.stderr)
            if server is not None:            # a failed test may leave the server stuck
                stop_proc(server)
                server = start_server()
        time.sleep(0.3)   # let the previous connection close on both ends

    t0 = time.monotonic()
    foreign = ForeignCpu()
    try:
        print(f"contender {name}: starting", file=sys.stderr)
        if isinstance(c, Upmt):      # the tree may change under a long run
            res["source"] = source_version()
        c.start()
        res["start_s"] = round(time.monotonic() - t0, 2)
        res["daemons"] = {k: {"pid": pid, "cmdline": proc_cmdline(pid)}
                          for k, pid in c.pids().items()}
        server = start_server()
        # warm-up: ARP, handshakes, a first flow through each rule
        pair.run("a", "ping", "-n", "-q", "-c", "2", "-i", "0.1", "-W", "2", c.target,
                 check=False)
        for warm in (("-n", "256K"), ("-u", "-b", "10M", "-n", "64K")):
            try:
                iperf3(pair, c.target, 0, *warm)
            except BenchError as e:
                raise BenchError(f"warm-up iperf3 {' '.join(warm)}: {e}") from None
        attempt("ping", ping_test, args.ping_count, args.ping_interval)
        attempt("ping_load", ping_load_test, args.ping_count * 4, args.ping_interval)
        for test in TCP_TESTS:
            streams = 4 if test.startswith("tcp4") else 1
            attempt(test, tcp_test, args.seconds, streams, test.endswith("_down"))
        for size in (64, 1400):
            attempt(f"udp{size}_up", udp_test, args.udp_seconds, size)
        if c.own_cpu and args.idle_seconds > 0:
            attempt("idle", idle_test, args.idle_seconds)
        check = c.final_checks(tests)
        res["checks"] = check
        for k, ok in check.items():
            if isinstance(ok, bool) and not ok:
                errors.append(f"{name}: check failed: {k}")
        res["status"] = "ran"
    except BenchError as e:
        errors.append(f"{name}: {e}")
        print(f"  {name} FAILED: {e}", file=sys.stderr)
        res["error"] = str(e)
    finally:
        res["notes"] = {k: v for k, v in c.notes.items()}
        if server is not None:
            stop_proc(server)
        codes = c.stop()
        res["exit_codes"] = codes
        res["log_trouble"] = c.log_trouble()
        res["seconds_total"] = round(time.monotonic() - t0, 1)
        fm = foreign.measure()
        res["foreign_cpu_s"], res["foreign_top"] = fm["cpu_s"], fm["top"]
        if isinstance(c, Upmt) and any(code != 0 for code in codes.values()):
            errors.append(f"{name}: daemon exit codes {codes}")
        # nothing of this contender may survive into the next one's measurements
        left = [pid for p in c.daemons.values() if (pid := p.pid) and p.poll() is None]
        if left:
            errors.append(f"{name}: processes still running after stop: {left}")
    summarise(res)


def summarise(res: dict[str, Any]) -> None:
    """CPU per GB over the four TCP tests together."""
    tests = res.get("tests", {})
    tcp = [tests[t] for t in TCP_TESTS if "bytes" in tests.get(t, {})]
    gb = sum(t["bytes"] for t in tcp) / 1e9
    own = sum(t["cpu_s_total"] for t in tcp)
    busy = sum(t["machine_cpu_s"] for t in tcp)
    own_cpu = res.get("name") != "raw"
    res["tcp_total"] = {
        "tests": len(tcp), "gb": gb, "cpu_s": round(own, 3), "machine_cpu_s": round(busy, 3),
        "cpu_s_per_gb": own / gb if gb > 0 and own_cpu else None,
        "machine_cpu_s_per_gb": busy / gb if gb > 0 else None,
    }


# -- the table ----------------------------------------------------------------------------

def ratio(num: Any, den: Any) -> float | None:
    if not isinstance(num, int | float) or not isinstance(den, int | float) or den == 0:
        return None
    return float(num) / float(den)


ROWS: list[tuple[str, str, str]] = [
    ("TCP 1 stream upload Gbit/s", "tcp1_up", "gbit_s"),
    ("TCP 1 stream download Gbit/s", "tcp1_down", "gbit_s"),
    ("TCP 4 streams upload Gbit/s", "tcp4_up", "gbit_s"),
    ("TCP 4 streams download Gbit/s", "tcp4_down", "gbit_s"),
    ("TCP 1 upload retransmits", "tcp1_up", "retransmits"),
    ("TCP 1 download retransmits", "tcp1_down", "retransmits"),
    ("TCP 4 upload retransmits", "tcp4_up", "retransmits"),
    ("TCP 4 download retransmits", "tcp4_down", "retransmits"),
    ("UDP 64B recv pkt/s", "udp64_up", "received_pps"),
    ("UDP 64B loss %", "udp64_up", "lost_percent"),
    ("UDP 1400B recv pkt/s", "udp1400_up", "received_pps"),
    ("UDP 1400B loss %", "udp1400_up", "lost_percent"),
    ("ping RTT median ms", "ping", "rtt_median_ms"),
    ("ping RTT p90 ms", "ping", "rtt_p90_ms"),
    ("ping under 1-stream load median ms", "ping_load", "rtt_median_ms"),
    ("ping under 1-stream load p90 ms", "ping_load", "rtt_p90_ms"),
    ("idle CPU % (busiest process)", "idle", "cpu_percent_max"),
    ("CPU s/GB contender processes (TCP)", "tcp_total", "cpu_s_per_gb"),
    ("CPU s/GB whole machine (TCP)", "tcp_total", "machine_cpu_s_per_gb"),
    ("other processes' CPU s meanwhile", "", "foreign_cpu_s"),
]
RATIO_OF = ("tcp1_up", "tcp1_down", "tcp4_up", "tcp4_down")


def cell(res: dict[str, Any], test: str, key: str) -> Any:
    if res.get("status") == "skipped":
        return "skipped"
    if not test:
        return res.get(key)
    src = res.get(test) if test == "tcp_total" else res.get("tests", {}).get(test)
    if not isinstance(src, dict):
        return None
    if "error" in src:
        return "ERROR"
    return src.get(key)


def table_rows(contenders: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    names = list(contenders)
    rows = []
    for label, test, key in ROWS:
        rows.append({"metric": label, **{n: cell(contenders[n], test, key) for n in names}})
    gbit = {r["metric"]: r for r in rows}
    for base in ("raw", "upmt_tun"):
        for test in RATIO_OF:
            label = next(lbl for lbl, t, k in ROWS if t == test and k == "gbit_s")
            src = gbit[label]
            short = label.replace(" Gbit/s", "")
            rows.append({"metric": f"ratio to {base}: {short}",
                         **{n: ratio(src[n], src.get(base)) for n in names}})
    return rows



def render_rows(rows: list[dict[str, Any]], cols: list[str]) -> str:
    return render(["metric", *cols], [[r["metric"], *(fmt(r.get(c)) for c in cols)]
                                      for r in rows])


# -- install, prerequisites ---------------------------------------------------------------

def install_missing(wanted: list[str], no_install: bool) -> dict[str, str]:
    """Install what the wanted contenders miss (apt), unless ``no_install``; return
    {contender: reason} for those that still cannot run."""
    missing_tools = sorted({t for c in wanted for t in NEEDS[c] if shutil.which(t) is None})
    apt_tools = [t for t in missing_tools if t in PACKAGE_OF]
    if apt_tools and not no_install:
        pkgs = sorted({PACKAGE_OF[t] for t in apt_tools})
        print(f"suite: installing {' '.join(pkgs)} with apt-get (missing: "
              f"{', '.join(apt_tools)}; --no-install skips this)", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *pkgs]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
            if r.returncode != 0:   # perhaps no package lists yet
                subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env,
                               timeout=600)
                r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
            if r.returncode != 0:
                print(f"suite: apt-get failed: {r.stderr.strip()[-300:]}", file=sys.stderr)
        except (OSError, subprocess.SubprocessError) as e:
            print(f"suite: apt-get failed: {e}", file=sys.stderr)
    skipped: dict[str, str] = {}
    for c in wanted:
        miss = [t for t in NEEDS[c] if shutil.which(t) is None]
        if miss:
            how = "--no-install given" if no_install else "apt-get install did not provide it"
            skipped[c] = f"missing {', '.join(miss)} ({how})"
    return skipped


# -- the nat topology ---------------------------------------------------------------------

def run_nat(args: argparse.Namespace, workdir: Path, errors: list[str]) -> dict[str, Any]:
    """benchmarks/throughput.py (agent -> NAT -> anchor -> CH), as a subprocess."""
    out_json = workdir / "nat-throughput.json"
    log = workdir / "nat-throughput.stdout"
    argv = [sys.executable, str(BENCH_DIR / "throughput.py"), "--json", str(out_json),
            "--workdir", str(workdir / "nat-lab"),
            *(["--quick"] if args.quick else ["--seconds", str(int(args.seconds))])]
    print(f"topology nat: {' '.join(argv[1:])}", file=sys.stderr)
    t0 = time.monotonic()
    foreign = ForeignCpu()
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, stdout=f, stdin=subprocess.DEVNULL)
        try:
            code = proc.wait()
        except BaseException:           # Ctrl-C / SIGTERM: let it tear its testbed down
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            raise
    nat: dict[str, Any] = {"argv": argv[1:], "exit_code": code, "json": str(out_json),
                           "stdout": str(log), "seconds_total": round(time.monotonic() - t0, 1),
                           "foreign_cpu": foreign.measure()}
    try:
        data = json.loads(out_json.read_text())
    except (OSError, json.JSONDecodeError) as e:
        errors.append(f"nat: throughput.py exit {code}, no result ({e})")
        return nat
    nat["table"] = data.get("table", [])
    nat["steering_check"] = data.get("steering_check", {})
    nat["exit_codes"] = data.get("exit_codes", {})
    nat["meta"] = {k: data.get("meta", {}).get(k) for k in
                   ("tcp_seconds", "udp_seconds", "topology_prefix", "loadavg_start",
                    "loadavg_end", "source_start")}
    nat["errors"] = data.get("errors", [])
    errors.extend(f"nat: {e}" for e in nat["errors"])
    if code != 0 and not nat["errors"]:
        errors.append(f"nat: throughput.py exit {code}")
    return nat


NAT_COLS = ("raw", "upmt_tun", "upmt_plain", "enc/raw", "enc/plain")


def render_nat(rows: list[dict[str, Any]]) -> str:
    return render(["metric", *NAT_COLS],
                  [[r["metric"], *(("-" if r.get(c) is None else f"{r[c]:.3f}") if "/" in c
                                   else fmt(r.get(c)) for c in NAT_COLS)] for r in rows])


# -- main ---------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=None,
                   help="length of each TCP test (default 10; UDP tests: min(this, 4))")
    p.add_argument("--quick", action="store_true",
                   help="2-second TCP, 1-second UDP tests (CI smoke run; numbers mean little)")
    p.add_argument("--contenders", default=",".join(CONTENDERS),
                   help=f"comma-separated, from {','.join(CONTENDERS)} (default: all)")
    p.add_argument("--topologies", default=",".join(TOPOLOGIES),
                   help="pair, nat or both (default: pair,nat)")
    p.add_argument("--json", type=Path, default=None,
                   help="results file (default benchmarks/results/suite-<timestamp>.json)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="configs and logs (default: next to the JSON, <name>-work/)")
    p.add_argument("--idle-seconds", type=float, default=None,
                   help="idle CPU measured over this long after the tests (default 60; "
                        "--quick: 2; 0 skips it)")
    p.add_argument("--no-install", action="store_true",
                   help="never apt-get install; contenders missing a program are skipped")
    args = p.parse_args(argv)
    args.contender_list = [c.strip() for c in args.contenders.split(",") if c.strip()]
    bad = [c for c in args.contender_list if c not in CONTENDERS]
    if bad or not args.contender_list:
        p.error(f"unknown contender(s) {bad}; choose from {','.join(CONTENDERS)}")
    args.topology_list = [t.strip() for t in args.topologies.split(",") if t.strip()]
    if not args.topology_list or any(t not in TOPOLOGIES for t in args.topology_list):
        p.error(f"--topologies: choose from {','.join(TOPOLOGIES)}")
    if args.seconds is None:
        args.seconds = 2.0 if args.quick else 10.0
    if args.seconds < 1:
        p.error("--seconds must be >= 1")
    args.udp_seconds = 1.0 if args.quick else min(args.seconds, 4.0)
    args.ping_count = 20 if args.quick else 50
    args.ping_interval = 0.02
    if args.idle_seconds is None:
        args.idle_seconds = 2.0 if args.quick else 60.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("suite.py: needs root (network namespaces)", file=sys.stderr)
        return 2
    base = ["ip", "iperf3", "ping", "ss"]
    missing = [t for t in base if shutil.which(t) is None]
    if missing or not os.path.exists("/dev/net/tun"):
        print(f"suite.py: missing {', '.join(missing) or '/dev/net/tun'}", file=sys.stderr)
        return 2
    interruptible()
    started = time.monotonic()
    foreign = ForeignCpu()

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path: Path = args.json or RESULTS_DIR / f"suite-{stamp}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    workdir: Path = args.workdir or json_path.with_name(json_path.stem + "-work")
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)

    wanted = args.contender_list if "pair" in args.topology_list else []
    skipped = install_missing(wanted, args.no_install)
    errors: list[str] = []
    result: dict[str, Any] = {
        "meta": {"timestamp": dt.datetime.now().isoformat(timespec="seconds"),
                 "argv": sys.argv[1:] if argv is None else argv,
                 "tcp_seconds": args.seconds, "udp_seconds": args.udp_seconds,
                 "ping": {"count": args.ping_count, "interval_s": args.ping_interval},
                 "quick": args.quick, "topologies": args.topology_list,
                 "machine": machine_facts(), "source_start": source_version(),
                 "loadavg_start": loadavg(), "workdir": str(workdir),
                 "pair": {"a": f"{A_IF} {A_ADDR}/24", "b": f"{B_IF} {B_ADDR}/24",
                          "iperf3_port": PORT, "tunnel_mtu": TUNNEL_MTU}},
        "contenders": {}, "table": [], "nat": None, "errors": errors,
    }
    contenders: dict[str, dict[str, Any]] = result["contenders"]
    for name in wanted:
        contenders[name] = {"name": name, "status": "pending"}
        if name in skipped:
            contenders[name].update(status="skipped", reason=skipped[name])
            print(f"contender {name}: skipped ({skipped[name]})", file=sys.stderr)
    interrupted = False
    try:
        if wanted:
            pair = Pair()
            print(f"building pair {pair.names['a']} <-> {pair.names['b']}; logs in {workdir}",
                  file=sys.stderr)
            result["meta"]["pair"]["namespaces"] = dict(pair.names)
            try:
                pair.up()
                for name in wanted:
                    if contenders[name]["status"] == "skipped":
                        continue
                    run_contender(name, pair, args, workdir, contenders[name], errors)
            finally:
                pair.down()
        if "nat" in args.topology_list:
            result["nat"] = run_nat(args, workdir, errors)
    except KeyboardInterrupt:
        interrupted = True
        errors.append("interrupted")
    except Exception as e:
        errors.append(f"{type(e).__name__}: {e}")

    result["meta"]["loadavg_end"] = loadavg()
    result["meta"]["source_end"] = src_end = source_version()
    if src_end != result["meta"]["source_start"]:
        result["meta"]["warning"] = "src/ changed during the run: contenders ran different code"
    result["meta"]["seconds_total"] = round(time.monotonic() - started, 1)
    fm = foreign.measure()
    result["meta"]["foreign_cpu_s"], result["meta"]["foreign_top"] = fm["cpu_s"], fm["top"]
    result["table"] = table_rows(contenders) if contenders else []
    json_path.write_text(json.dumps(result, indent=2) + "\n")

    m = result["meta"]["machine"]
    print(f"\n{m['cpu_model']}, nproc {m['nproc']}, kernel {m['kernel']}; {m['iperf3']}; "
          f"loadavg {result['meta']['loadavg_start'].split()[0]} at start, "
          f"{result['meta']['loadavg_end'].split()[0]} at end; CPU used by other processes "
          f"during the run: {result['meta']['foreign_cpu_s']:.1f} s"
          + (f" ({', '.join(result['meta']['foreign_top'])})" if result["meta"]["foreign_top"]
             else ""))
    if contenders:
        print(f"\npair topology: A {A_ADDR} <-veth-> B {B_ADDR}  (TCP {args.seconds:g} s, "
              f"UDP {args.udp_seconds:g} s, ping {args.ping_count} x {args.ping_interval} s)")
        print(render_rows(result["table"], list(contenders)))
        for name, res in contenders.items():
            if res.get("status") == "skipped":
                print(f"  {name}: skipped: {res['reason']}")
            for ln in res.get("log_trouble", [])[:3]:
                print(f"  [{name}] {ln}")
    nat = result["nat"]
    if nat and nat.get("table"):
        print(f"\nnat topology (benchmarks/throughput.py: MH -> NAT1 -> anchor -> CH; "
              f"TCP {nat['meta'].get('tcp_seconds')} s; details {nat['json']})")
        print(render_nat(nat["table"]))
    src = result["meta"]["source_start"]
    print(f"\nupmt_tun source: commit {src['commit']}"
          + (f", uncommitted changes in {', '.join(src['src_changes'])}"
             if src["src_changes"] else ""))
    if "warning" in result["meta"]:
        print(f"WARNING: {result['meta']['warning']}")
    if errors:
        print("\nerrors:", *errors, sep="\n  ")
    print(f"\nsaved {json_path}  ({result['meta']['seconds_total']:.0f} s)")
    if interrupted:
        return 130
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
