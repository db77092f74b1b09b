#!/usr/bin/env python3
"""Throughput / latency / CPU of upmt_tun, encrypted and plaintext, against the raw path.

    python benchmarks/throughput.py [--seconds N] [--json PATH] [--quick]

Builds the :class:`upmt_tun.testbed.Topology` (MH behind two NATs, anchor, CH), starts a
real ``upmt-anchor`` (ns ``an``) and ``upmt-agent`` (ns ``mh``) with :class:`upmt_tun.lab.Lab`,
and runs two iperf3 servers in ns ``ch`` (203.0.113.100):

* port 5202: outside every rule -> **raw** path: mh -wan1-> nat1 -> inet -> ch;
* port 5201: tcp and udp to it are steered by the agent's rules -> **upmt_tun** path:
  mh -> TUN -> agent -> UDP tunnel (wan1) -> nat1 -> inet -> anchor -> TUN -> masquerade
  -> inet -> ch, and back the same way.

ICMP has no ports, so the ping of a tunnel path is steered by a ``uid`` rule: it runs as
uid 65534 (``setpriv``), while the raw ping runs as root and matches no rule.

Two labs run one after the other on the same testbed, each with its own workdir:

1. ``upmt_tun``: the normal, encrypted tunnel. Raw and upmt_tun are measured alternately
   (raw first) for each test, while the agent and anchor run.
2. ``upmt_plain``: a fresh agent and anchor with ``insecure_plaintext_for_benchmarks =
   true`` on both ends (DATA packets unsealed; handshake and signalling stay
   authenticated); the same tests on the same steered port.

After each lab's tests the agent's flow table must show the steered tests inside the
tunnel and nothing to the raw port, and the bytes on the MH's wire per tunnel packet must
show whether DATA packets carried the 16-byte tag (sealed) or not (plaintext).
Everything (namespaces, processes) is removed at the end, also on errors, Ctrl-C and
SIGTERM. Only addresses inside the namespaces built here are ever contacted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import (  # noqa: E402 (benchmarks/ dir)
    BenchError,
    fmt,
    interruptible,
    iperf3_client,
    loadavg,
    proc_cmdline,
    proc_cpu_seconds,
    render,
    rule_toml,
    source_version,
)

from upmt_tun.lab import Lab
from upmt_tun.testbed import MH_IFACES, Topology, tool_missing

CH = "203.0.113.100"
STEERED_PORT = 5201
RAW_PORT = 5202
PING_UID = 65534
PATHS = ("raw", "upmt_tun", "upmt_plain")
PORT = {"raw": RAW_PORT, "upmt_tun": STEERED_PORT, "upmt_plain": STEERED_PORT}
PLAINTEXT = "insecure_plaintext_for_benchmarks = true"
# tunnel path -> (extra top-level config line of both ends, paths measured while it runs)
LABS: dict[str, tuple[str, tuple[str, ...]]] = {
    "upmt_tun": ("", ("raw", "upmt_tun")),
    "upmt_plain": (PLAINTEXT, ("upmt_plain",)),
}
# bytes a tunnel packet adds on the MH's veth: Ethernet 14 + IPv4 20 + UDP 8 + header 16,
# plus the 16-byte Poly1305 tag when sealed
WIRE_OVERHEAD = {"plaintext": 14 + 20 + 8 + 16, "sealed": 14 + 20 + 8 + 16 + 16}
RESULTS_DIR = Path(__file__).resolve().parent / "results"

RULES = (rule_toml("bench-tcp", "tcp", dst=f"{CH}/32", dst_port=STEERED_PORT)
         + rule_toml("bench-udp", "udp", dst=f"{CH}/32", dst_port=STEERED_PORT)
         + rule_toml("bench-ping", "icmp", dst=f"{CH}/32", uid=PING_UID))



# -- helpers ------------------------------------------------------------------------------



class CpuMeter:
    """CPU seconds used by the daemons of a :class:`Lab` between start() and stop()."""

    def __init__(self, lab: Lab) -> None:
        self.pids = {key: p.pid for key, p in lab.procs.items()}
        self.before: dict[str, float] = {}

    def start(self) -> None:
        self.before = {k: proc_cpu_seconds(pid) for k, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        return {k: round(proc_cpu_seconds(pid) - self.before[k], 3)
                for k, pid in self.pids.items()}


class TunnelProbe:
    """Tunnel packets/bytes counted by the agent and the anchor, and the bytes and packets
    on the MH's interfaces (``ip -s link`` in ns mh), between two snapshots.

    The agent's tunnel counters count inner packets (``len`` of the IPv4 packet), so the
    MH's interface bytes minus the agent's tunnel bytes, per tunnel packet, is what the
    tunnel adds on the wire (Ethernet + IPv4 + UDP + tunnel header [+ tag])."""

    def __init__(self, topo: Topology, lab: Lab) -> None:
        self.topo, self.lab = topo, lab

    def snapshot(self) -> dict[str, int]:
        out: dict[str, int] = {}
        agent = self.lab.agent_status()
        for k in ("tx_packets", "rx_packets", "tx_bytes", "rx_bytes"):
            out[f"agent_{k}"] = sum(int(t[k]) for t in agent["tunnels"])
        anchor = self.lab.anchor_status()
        for k in ("tx_packets", "rx_packets"):
            out[f"anchor_{k}"] = sum(int(t[k]) for a in anchor["associations"]
                                     for t in a["tunnels"])
        links = json.loads(self.topo.run("mh", "ip", "-s", "-j", "link").stdout)
        for link in links:
            if link["ifname"] in MH_IFACES:
                st = link.get("stats64", {})
                for d in ("rx", "tx"):
                    for k in ("bytes", "packets"):
                        key = f"wire_{d}_{k}"
                        out[key] = out.get(key, 0) + int(st.get(d, {}).get(k, 0))
        return out

    def around(self, fn: Callable[[], Any]) -> tuple[Any, dict[str, int]]:
        """``fn()`` and the counters' delta over it (snapshots take ~0.5 s, outside fn)."""
        before = self.snapshot()
        res = fn()
        after = self.snapshot()
        return res, {k: v - before.get(k, 0) for k, v in after.items()}


def per_packet(used: dict[str, float], d: dict[str, int], upload: bool) -> dict[str, Any]:
    """CPU microseconds per tunnel packet of each daemon, and the wire overhead per packet
    in the data direction, from a :class:`TunnelProbe` delta."""
    agent_pkts = d["agent_tx_packets"] + d["agent_rx_packets"]
    anchor_pkts = d["anchor_tx_packets"] + d["anchor_rx_packets"]
    pkts = {"agent": agent_pkts, "anchor0": anchor_pkts}
    side = "tx" if upload else "rx"
    n = d[f"agent_{side}_packets"]
    # With UDP GSO one skb on the veth (one packet in its counters) carries several tunnel
    # datagrams but their Ethernet + IPv4 + UDP headers (42 bytes) once: count those headers
    # once per tunnel packet, as on the wire after segmentation, so 74/58 holds either way.
    extra = (d.get(f"wire_{side}_bytes", 0) - d[f"agent_{side}_bytes"]
             + 42 * (n - d.get(f"wire_{side}_packets", 0)))
    overhead = extra / n if n else None
    return {
        "tunnel_counters": d,
        "cpu_us_per_packet": {k: (used[k] * 1e6 / pkts[k] if pkts.get(k) else None)
                              for k in used},
        "wire_overhead_bytes_per_packet": overhead,
    }


def iperf3(topo: Topology, port: int, seconds: int, *extra: str) -> dict[str, Any]:
    """Run an iperf3 client in mh against ch:port; return its parsed -J output."""
    return iperf3_client(functools.partial(topo.run, "mh"), CH, port, seconds, *extra)


def metered(cpu: CpuMeter, probe: TunnelProbe | None, port: int, seconds: int, topo: Topology,
            *extra: str) -> tuple[dict[str, Any], dict[str, float], dict[str, int] | None]:
    """iperf3 (see :func:`iperf3`) with the daemons' CPU time around it, and the tunnel
    counters around that when ``probe`` is given: (iperf3 JSON, CPU s, counters or None)."""
    def go() -> tuple[dict[str, Any], dict[str, float]]:
        cpu.start()
        res = iperf3(topo, port, seconds, *extra)
        return res, cpu.stop()
    if probe is None:
        return (*go(), None)
    (res, used), counters = probe.around(go)
    return res, used, counters


def tcp_test(topo: Topology, port: int, seconds: int, reverse: bool,
             cpu: CpuMeter, probe: TunnelProbe | None) -> dict[str, Any]:
    res, used, counters = metered(cpu, probe, port, seconds, topo, *(["-R"] if reverse else []))
    end = res["end"]
    recv, sent = end["sum_received"], end["sum_sent"]
    sender_stream = end["streams"][0]["sender"] if end.get("streams") else {}
    gb = recv["bytes"] / 1e9
    total_cpu = sum(used.values())
    out: dict[str, Any] = {
        "direction": "download (ch->mh)" if reverse else "upload (mh->ch)",
        "seconds": recv["seconds"],
        "bytes": recv["bytes"],
        "sender_bytes": sent["bytes"],
        "gbit_s": recv["bits_per_second"] / 1e9,
        "retransmits": sent.get("retransmits"),
        "cpu_s": used,
        "cpu_s_total": round(total_cpu, 3),
        "cpu_s_per_gb": total_cpu / gb if gb > 0 else None,
    }
    if not reverse and "mean_rtt" in sender_stream:   # the sender is local: its smoothed RTT
        out["sender_mean_rtt_ms"] = sender_stream["mean_rtt"] / 1000
    if counters is not None:
        out.update(per_packet(used, counters, upload=not reverse))
    return out


def udp_test(topo: Topology, port: int, seconds: int, cpu: CpuMeter,
             probe: TunnelProbe | None) -> dict[str, Any]:
    before = kernel_counters(topo)
    res, used, counters = metered(cpu, probe, port, seconds, topo, "-u", "-b", "0", "-l", "64")
    kernel_drops = counter_delta(before, kernel_counters(topo))
    end = res["end"]
    snd = end.get("sum_sent", end["sum"])
    rcv = end.get("sum_received", end["sum"])
    sent = int(snd["packets"])
    # the receiver's "packets" is the highest sequence number it saw, "lost" the gaps below it
    received = max(0, int(rcv["packets"]) - int(rcv["lost_packets"]))
    secs = float(rcv["seconds"]) or float(seconds)
    return {
        "direction": "upload (mh->ch)",
        "payload_bytes": 64,
        "seconds": secs,
        "sent_packets": sent,
        "received_packets": received,
        "lost_packets": sent - received,
        "lost_percent": 100.0 * (sent - received) / sent if sent else None,
        "iperf3_lost_percent": float(rcv["lost_percent"]),
        "sent_pps": sent / float(snd["seconds"] or secs),
        "received_pps": received / secs,
        "jitter_ms": float(rcv.get("jitter_ms", 0.0)),
        "cpu_s": used,
        "kernel_drop_counters": kernel_drops,
        **(per_packet(used, counters, upload=True) if counters is not None else {}),
    }


_RTT = re.compile(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms")
_LOSS = re.compile(r"(\d+) packets transmitted, (\d+) received")
_TIME = re.compile(r"time=([\d.]+) ms")


def ping_test(topo: Topology, uid: int | None, count: int) -> dict[str, Any]:
    pre = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"] if uid else []
    argv = [*pre, "ping", "-n", "-c", str(count), "-i", "0.05", "-W", "2", CH]
    r = topo.run("mh", *argv, check=False, timeout=count * 0.05 + 30)
    loss = _LOSS.search(r.stdout)
    rtt = _RTT.search(r.stdout)
    if loss is None or rtt is None or int(loss.group(2)) == 0:
        raise BenchError(f"ping exit {r.returncode}: {(r.stdout + r.stderr).strip()[-300:]}")
    times = [float(t) for t in _TIME.findall(r.stdout)]   # one per reply, in order
    return {
        "uid": uid if uid is not None else 0,
        "transmitted": int(loss.group(1)),
        "received": int(loss.group(2)),
        "rtt_min_ms": float(rtt.group(1)),
        "rtt_avg_ms": float(rtt.group(2)),
        "rtt_max_ms": float(rtt.group(3)),
        "rtt_mdev_ms": float(rtt.group(4)),
        "rtt_median_ms": statistics.median(times) if times else None,
        "rtt_first_ms": times[0] if times else None,   # includes setting up the new flow
    }


def wait_listening(topo: Topology, ports: tuple[int, ...], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = topo.run("ch", "ss", "-Hltn", check=False).stdout
        if all(re.search(rf":{p}\s", out) for p in ports):
            return
        time.sleep(0.05)
    raise BenchError(f"iperf3 servers on {ports} not listening after {timeout}s")


def kernel_counters(topo: Topology) -> dict[str, int]:
    """UDP socket errors (/proc/net/snmp) and per-interface drops of mh, an and ch."""
    out: dict[str, int] = {}
    for role in ("mh", "an", "ch"):
        snmp = topo.run(role, "cat", "/proc/net/snmp", check=False).stdout.splitlines()
        udp = [ln.split()[1:] for ln in snmp if ln.startswith("Udp:")]
        if len(udp) == 2:
            for k, v in zip(*udp, strict=False):
                if k in ("InErrors", "RcvbufErrors", "SndbufErrors", "NoPorts"):
                    out[f"{role}.udp.{k}"] = int(v)
        try:
            links = json.loads(topo.run(role, "ip", "-s", "-j", "link", check=False).stdout)
        except json.JSONDecodeError:
            links = []
        for link in links:
            st = link.get("stats64", {})
            for d in ("rx", "tx"):
                out[f"{role}.{link['ifname']}.{d}_dropped"] = int(st.get(d, {}).get("dropped", 0))
    return out


def counter_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def steered_flows(lab: Lab) -> list[dict[str, Any]]:
    st = lab.agent_status()
    return [f for f in st["flows"] if f["dst"] == CH]


def log_findings(lab: Lab) -> dict[str, Any]:
    """Lines of the daemons' logs that look like trouble (warnings, errors, tracebacks)."""
    out: dict[str, Any] = {}
    for log in sorted(lab.dir.glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()
        bad = [ln for ln in lines
               if re.search(r"WARN|ERROR|CRITICAL|Traceback|Exception", ln)]
        out[log.stem] = {"path": str(log), "lines": len(lines), "trouble": len(bad),
                         "first_trouble": bad[:10]}
    return out


# -- the run ------------------------------------------------------------------------------

def measure(topo: Topology, lab: Lab, tunnel: str, args: argparse.Namespace,
            result: dict[str, Any]) -> None:
    """The tests of LABS[tunnel]'s paths while ``lab`` runs, then that lab's checks."""
    paths: dict[str, dict[str, Any]] = result["paths"]
    errors: list[str] = result["errors"]
    here = LABS[tunnel][1]
    cpu = CpuMeter(lab)
    probe = TunnelProbe(topo, lab)
    result["meta"]["daemons"][tunnel] = {k: {"pid": pid, "cmdline": proc_cmdline(pid)}
                                         for k, pid in cpu.pids.items()}
    tcp_s, udp_s = args.seconds, args.udp_seconds

    def probe_for(path: str) -> TunnelProbe | None:
        return None if path == "raw" else probe

    def attempt(path: str, name: str, fn: Any, *a: Any) -> None:
        label = f"{name} [{path}]"
        print(f"  {label} ...", end="", flush=True, file=sys.stderr)
        try:
            paths[path][name] = fn(*a)
            print(" ok", file=sys.stderr)
        except BenchError as e:
            paths[path][name] = {"error": str(e)}
            errors.append(f"{label}: {e}")
            print(f" FAILED: {e}", file=sys.stderr)
        time.sleep(0.3)   # let the previous connection close on both ends

    # warm-up: ARP, conntrack, the tunnel's first flow set-up. The raw port is warmed up
    # with every lab, so that "nothing_5202_in_tunnel" checks each lab's rules.
    for path in dict.fromkeys(("raw", *here)):
        topo.run("mh", "ping", "-n", "-q", "-c", "1", "-W", "2", CH, check=False)
        try:
            iperf3(topo, PORT[path], 0, "-n", "64K")
        except BenchError as e:
            errors.append(f"warm-up [{path}] ({tunnel} lab): {e}")

    for path in here:
        attempt(path, "ping", ping_test, topo, None if path == "raw" else PING_UID,
                args.ping_count)
    for path in here:
        attempt(path, "tcp_upload", tcp_test, topo, PORT[path], tcp_s, False, cpu,
                probe_for(path))
    for path in here:
        attempt(path, "tcp_download", tcp_test, topo, PORT[path], tcp_s, True, cpu,
                probe_for(path))
    for path in here:
        attempt(path, "udp64_upload", udp_test, topo, PORT[path], udp_s, cpu, probe_for(path))

    # Did the steered tests really use the tunnel, and did the raw ones stay outside it?
    flows = steered_flows(lab)
    seen = {(f["protocol"], f["dport"]) for f in flows}
    check = {
        "tcp_5201_via_tunnel": ("tcp", STEERED_PORT) in seen,
        "udp_5201_via_tunnel": ("udp", STEERED_PORT) in seen,
        "icmp_uid_via_tunnel": any(f["protocol"] == "icmp" for f in flows),
        "nothing_5202_in_tunnel": not any(f["dport"] == RAW_PORT for f in flows),
        "flow_interfaces": sorted({str(f["interface"]) for f in flows}),
    }
    # Sealed or not, as configured? The wire overhead per tunnel packet of the TCP upload
    # is 74 bytes sealed, 58 plaintext; anything else (no data, other traffic) fails.
    expect = "plaintext" if LABS[tunnel][0] == PLAINTEXT else "sealed"
    overhead = paths[tunnel].get("tcp_upload", {}).get("wire_overhead_bytes_per_packet")
    check["data_expected"] = expect
    check["wire_overhead_bytes_per_packet"] = overhead
    check["data_" + expect] = (isinstance(overhead, float)
                               and abs(overhead - WIRE_OVERHEAD[expect]) < 4)
    result["steering_check"][tunnel] = check
    for k, ok in check.items():
        if isinstance(ok, bool) and not ok:
            errors.append(f"check failed [{tunnel}]: {k}")


def ratio(num: Any, den: Any) -> float | None:
    if not isinstance(den, int | float) or not isinstance(num, int | float) or den == 0:
        return None
    return num / den


def table_rows(paths: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    def get(path: str, test: str, key: str, sub: str | None = None) -> Any:
        v = paths.get(path, {}).get(test, {}).get(key)
        if sub is not None:
            v = v.get(sub) if isinstance(v, dict) else None
        return v

    spec = [
        ("TCP upload Gbit/s", "tcp_upload", "gbit_s", None),
        ("TCP upload retransmits", "tcp_upload", "retransmits", None),
        ("TCP download Gbit/s", "tcp_download", "gbit_s", None),
        ("TCP download retransmits", "tcp_download", "retransmits", None),
        ("UDP 64B upload sent pkt/s", "udp64_upload", "sent_pps", None),
        ("UDP 64B upload recv pkt/s", "udp64_upload", "received_pps", None),
        ("UDP 64B upload loss %", "udp64_upload", "lost_percent", None),
        ("ping RTT avg ms", "ping", "rtt_avg_ms", None),
        ("ping RTT median ms", "ping", "rtt_median_ms", None),
        ("CPU s agent (TCP up)", "tcp_upload", "cpu_s", "agent"),
        ("CPU s anchor (TCP up)", "tcp_upload", "cpu_s", "anchor0"),
        ("CPU s/GB agent+anchor (TCP up)", "tcp_upload", "cpu_s_per_gb", None),
        ("CPU s agent (TCP down)", "tcp_download", "cpu_s", "agent"),
        ("CPU s anchor (TCP down)", "tcp_download", "cpu_s", "anchor0"),
        ("CPU s/GB agent+anchor (TCP down)", "tcp_download", "cpu_s_per_gb", None),
        ("CPU us/pkt agent (TCP up)", "tcp_upload", "cpu_us_per_packet", "agent"),
        ("CPU us/pkt anchor (TCP up)", "tcp_upload", "cpu_us_per_packet", "anchor0"),
        ("CPU us/pkt agent (TCP down)", "tcp_download", "cpu_us_per_packet", "agent"),
        ("CPU us/pkt anchor (TCP down)", "tcp_download", "cpu_us_per_packet", "anchor0"),
        ("CPU us/pkt agent (UDP 64B)", "udp64_upload", "cpu_us_per_packet", "agent"),
        ("CPU us/pkt anchor (UDP 64B)", "udp64_upload", "cpu_us_per_packet", "anchor0"),
        ("wire B/pkt overhead (TCP up)", "tcp_upload", "wire_overhead_bytes_per_packet", None),
    ]
    rows = []
    for label, test, key, sub in spec:
        row: dict[str, Any] = {"metric": label}
        for path in PATHS:
            row[path] = get(path, test, key, sub)
        row["enc/raw"] = ratio(row["upmt_tun"], row["raw"])
        row["enc/plain"] = ratio(row["upmt_tun"], row["upmt_plain"])
        rows.append(row)
    return rows



def render_table(rows: list[dict[str, Any]]) -> str:
    cols = ["metric", "raw", "upmt_tun (encrypted)", "upmt_plain", "enc/raw", "enc/plain"]
    body = [[r["metric"], *(fmt(r[p]) for p in PATHS),
             *("-" if r[k] is None else f"{r[k]:.3f}" for k in ("enc/raw", "enc/plain"))]
            for r in rows]
    return render(cols, body)


def machine_facts() -> dict[str, Any]:
    try:
        ver = subprocess.run(["iperf3", "--version"], capture_output=True, text=True,
                             timeout=10).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        ver = "?"
    return {"nproc": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "iperf3": ver}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=int, default=10, help="length of each TCP test (10)")
    p.add_argument("--json", type=Path, default=None,
                   help="where to save the results (benchmarks/results/throughput-<ts>.json)")
    p.add_argument("--quick", action="store_true",
                   help="1-second tests (CI smoke run; numbers are not meaningful)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="directory for daemon configs and logs (next to the JSON file)")
    args = p.parse_args(argv)
    if args.seconds < 1:
        p.error("--seconds must be >= 1")
    if args.quick:
        args.seconds = 1
    args.udp_seconds = min(args.seconds, 3)
    args.ping_count = 20
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("throughput.py: needs root (network namespaces)", file=sys.stderr)
        return 2
    missing = tool_missing("ip", "nft", "iperf3", "ping", "ss", "setpriv")
    if missing or not os.path.exists("/dev/net/tun"):
        print(f"throughput.py: missing {', '.join(missing) or '/dev/net/tun'}", file=sys.stderr)
        return 2
    interruptible()

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path: Path = args.json or RESULTS_DIR / f"throughput-{stamp}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    workdir: Path = args.workdir or json_path.with_name(json_path.stem + "-lab")
    if workdir.exists():
        shutil.rmtree(workdir)

    result: dict[str, Any] = {
        "meta": {"timestamp": dt.datetime.now().isoformat(timespec="seconds"),
                 "argv": sys.argv[1:] if argv is None else argv,
                 "tcp_seconds": args.seconds, "udp_seconds": args.udp_seconds,
                 "ping": {"count": args.ping_count, "interval_s": 0.05},
                 "quick": args.quick, "machine": machine_facts(), "workdir": str(workdir),
                 "loadavg_start": loadavg(), "source_start": source_version(),
                 "ports": dict(PORT), "rules": RULES,
                 "labs": {t: {"workdir": str(workdir / t), "extra_config": extra,
                              "paths": list(here)} for t, (extra, here) in LABS.items()},
                 "daemons": {}},
        "paths": {p: {"port": PORT[p]} for p in PATHS},
        "steering_check": {}, "agent_status": {}, "anchor_status": {}, "exit_codes": {},
        "logs": {},
        "errors": [],
    }
    interrupted = False
    print(f"building testbed; daemon logs in {workdir}/{{{','.join(LABS)}}}", file=sys.stderr)
    try:
        with Topology() as topo:
            result["meta"]["topology_prefix"] = topo.prefix
            for port in (STEERED_PORT, RAW_PORT):
                topo.popen("ch", "iperf3", "-s", "-p", str(port),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_listening(topo, (STEERED_PORT, RAW_PORT))
            for tunnel, (extra, _) in LABS.items():
                print(f"lab {tunnel}{' (' + extra + ')' if extra else ''}:", file=sys.stderr)
                lab = Lab(topo, workdir / tunnel, rules=RULES, agent_extra=extra,
                          anchor_extra=extra)
                try:
                    lab.start()
                    measure(topo, lab, tunnel, args, result)
                    result["agent_status"][tunnel] = lab.agent_status()
                    result["anchor_status"][tunnel] = lab.anchor_status()
                except Exception as e:   # note it, go on with the next lab
                    result["errors"].append(f"[{tunnel}] {type(e).__name__}: {e}")
                finally:
                    try:
                        result["exit_codes"][tunnel] = lab.stop()
                    except Exception as e:   # the topology teardown still kills everything
                        result["errors"].append(f"[{tunnel}] lab.stop: {e!r}")
                    result["logs"][tunnel] = log_findings(lab)
    except KeyboardInterrupt:
        interrupted = True
        result["errors"].append("interrupted")
    except Exception as e:
        result["errors"].append(f"{type(e).__name__}: {e}")

    result["meta"]["loadavg_end"] = loadavg()
    result["meta"]["source_end"] = src_end = source_version()
    if src_end != result["meta"]["source_start"]:   # someone changed src/ during the run
        result["meta"]["warning"] = "src/ changed during the run: the labs ran different code"
    result["table"] = table_rows(result["paths"])
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    m = result["meta"]["machine"]
    print(f"\nraw path vs upmt_tun encrypted vs upmt_tun plaintext  (TCP {args.seconds}s, "
          f"UDP {args.udp_seconds}s, nproc {m['nproc']}, kernel {m['kernel']}, {m['iperf3']}; "
          f"loadavg {result['meta']['loadavg_start'].split()[0]} at start, "
          f"{result['meta']['loadavg_end'].split()[0]} at end)")
    print(render_table(result["table"]))
    for tunnel, logs in result["logs"].items():
        for name, info in logs.items():
            if info["trouble"]:
                print(f"\n[{tunnel}] {name}.log: {info['trouble']} warning/error lines, "
                      "first ones:")
                for ln in info["first_trouble"][:5]:
                    print(f"  {ln}")
    for who in ("agent", "anchor"):
        for tunnel, st in result[f"{who}_status"].items():
            if st.get("drops"):
                print(f"[{tunnel}] {who} drop counters: {st['drops']}")
    for path in PATHS:
        kd = result["paths"][path].get("udp64_upload", {}).get("kernel_drop_counters")
        if kd:
            print(f"kernel drop counters during UDP test [{path}]: {kd}")
    for tunnel, check in result["steering_check"].items():
        print(f"[{tunnel}] checks: " + ", ".join(
            f"{k}={f'{v:.1f}' if isinstance(v, float) else v}" for k, v in check.items()))
    bad_codes = {t: c for t, c in result["exit_codes"].items()
                 if any(x != 0 for x in c.values())}
    if bad_codes:
        result["errors"].append(f"daemon exit codes {bad_codes}")
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    src = result["meta"]["source_start"]
    print(f"\nsource: commit {src['commit']}"
          + (f", uncommitted changes in {', '.join(src['src_changes'])}" if src["src_changes"]
             else ""))
    if "warning" in result["meta"]:
        print(f"WARNING: {result['meta']['warning']}")
    if result["errors"]:
        print("\nerrors:", *result["errors"], sep="\n  ")
    print(f"\nsaved {json_path}")
    if interrupted:
        return 130
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
