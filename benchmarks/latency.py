#!/usr/bin/env python3
"""Where a ping's round trip through upmt_tun spends its time, hop by hop, and the floor.

    sudo python benchmarks/latency.py [--count N] [--interval S] [--plaintext] [--json PATH]

On the pair topology of ``suite.py`` (fresh namespaces A and B, one veth; removed at the
end), three measurements, each ``--count`` round trips paced ``--interval`` apart:

* ``raw ping``: A pings B over the veth; the kernel answers (no process wakes up).
* ``udp echo``: a Python client in A sends 64-byte datagrams to a Python echo server
  in B (blocking calls): two process wake-ups per round trip, each followed by one small
  system call. ``(udp echo - raw ping) / 2`` is what waking a process and letting it
  answer costs on this machine: the floor of one user-space hop.
* ``upmt_tun ping``: ``upmt-agent`` in A, ``upmt-anchor`` (fixed host) in B, A pings B
  through the tunnel while ``tcpdump`` in both namespaces timestamps every packet on
  the TUN devices and the veth (kernel timestamps, one clock). Each round trip splits
  into: agent up (request on A's TUN -> tunnel datagram on the veth), anchor up
  (datagram -> request on B's TUN), kernel B (request -> reply on B's TUN), anchor down,
  agent down. A user-space tunnel with both ends in user space has four hops per round
  trip; the first hop of each direction starts from an idle process.

Prints medians and p90s per part, saves JSON (``benchmarks/results/``). Needs root,
``ip``, ``ping``, ``tcpdump``.
"""

from __future__ import annotations

import argparse
import bisect
import datetime as dt
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BenchError, interruptible, source_version  # noqa: E402
from suite import A_IF, B_ADDR, B_IF, UPMT_PORT, Pair, Upmt  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ECHO_PORT = 7007
SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    d, a = s.recvfrom(2048)
    s.sendto(d, a)
"""
CLIENT = """
import json, socket, sys, time
count, interval, host, port = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.0)
rtts = []
for _ in range(count):
    t = time.perf_counter()
    s.sendto(b"x" * 64, (host, port))
    s.recvfrom(2048)
    rtts.append((time.perf_counter() - t) * 1e6)
    time.sleep(interval)
print(json.dumps(rtts))
"""
PARTS = ("agent up", "anchor up", "kernel B", "anchor down", "agent down", "round trip")
_LINE = re.compile(r"(\d+\.\d+) (\S+)\s+(In|Out)\s+IP \S+ > \S+: (.*)")


def stats(us: list[float]) -> dict[str, float | int]:
    if not us:
        return {"count": 0}
    q = sorted(us)
    return {"median_us": statistics.median(q), "p90_us": q[int(0.9 * (len(q) - 1))],
            "min_us": q[0], "count": len(q)}


def ping_rtts(pair: Pair, count: int, interval: float) -> list[float]:
    out = pair.run("a", "ping", "-c", str(count), "-i", str(interval), "-n", B_ADDR,
                   timeout=30 + count * interval * 3).stdout
    return [float(line.split("time=")[1].split()[0]) * 1e3
            for line in out.splitlines() if "time=" in line]


def udp_echo(pair: Pair, count: int, interval: float) -> list[float]:
    srv = pair.popen("b", sys.executable, "-u", "-c", SERVER, B_ADDR, str(ECHO_PORT),
                     stdout=subprocess.PIPE, text=True)
    if srv.stdout is None or srv.stdout.readline().strip() != "ready":
        raise BenchError("the echo server did not start")
    r = pair.run("a", sys.executable, "-c", CLIENT, str(count), str(interval), B_ADDR,
                 str(ECHO_PORT), timeout=30 + count * interval * 3)
    out: list[float] = json.loads(r.stdout)
    return out


def events(lines: list[str], iface: str, direction: str, what: str) -> list[float]:
    """Timestamps of the packets of one kind seen on ``iface`` in ``direction``."""
    out = []
    for line in lines:
        m = _LINE.match(line)
        if m and m.group(2) == iface and m.group(3) == direction and m.group(4).startswith(what):
            out.append(float(m.group(1)))
    return sorted(out)


def _next(series: list[float], t: float) -> float | None:
    k = bisect.bisect_right(series, t)
    return series[k] if k < len(series) else None


def split_round_trips(a: list[str], b: list[str], tun_a: str, tun_b: str
                      ) -> dict[str, list[float]]:
    """Per round trip (a request on A's TUN), the time of each part, in microseconds.
    tcpdump names port 5060 SIP: a tunnel datagram is "SIP" or "UDP" on the veth."""
    tunnel = ("SIP", "UDP")
    req_a = events(a, tun_a, "Out", "ICMP echo request")
    up_wire = sorted(events(a, A_IF, "Out", tunnel[0]) + events(a, A_IF, "Out", tunnel[1]))
    req_b = events(b, tun_b, "In", "ICMP echo request")
    rep_b = events(b, tun_b, "Out", "ICMP echo reply")
    down_wire = sorted(events(b, B_IF, "Out", tunnel[0]) + events(b, B_IF, "Out", tunnel[1]))
    rep_a = events(a, tun_a, "In", "ICMP echo reply")
    parts: dict[str, list[float]] = {p: [] for p in PARTS}
    for t0 in req_a:
        chain = [t0]
        for series in (up_wire, req_b, rep_b, down_wire, rep_a):
            t = _next(series, chain[-1])
            if t is None:
                break
            chain.append(t)
        if len(chain) != 6 or chain[-1] - t0 > 0.05:
            continue                       # lost, or matched to a later round trip
        for name, x, y in zip(PARTS, chain, chain[1:], strict=False):
            parts[name].append((y - x) * 1e6)
        parts["round trip"].append((chain[-1] - t0) * 1e6)
    return parts


def upmt_hops(pair: Pair, work: Path, count: int, interval: float, plaintext: bool
              ) -> dict[str, Any]:
    c = Upmt(pair, work, plaintext)
    try:
        c.start()
        caps = {side: pair.popen(side, "tcpdump", "-i", "any", "-n", "-tt", "-l",
                                 "--time-stamp-precision=micro",
                                 f"icmp or udp port {UPMT_PORT}", stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True)
                for side in "ab"}
        time.sleep(1.0)                          # tcpdump attached
        rtts = ping_rtts(pair, count, interval)
        time.sleep(0.3)
        lines: dict[str, list[str]] = {}
        for side, p in caps.items():
            p.terminate()
            lines[side] = p.communicate(timeout=10)[0].splitlines()
    finally:
        c.stop()
    tuns = {side: sorted({m.group(2) for line in lines[side] if (m := _LINE.match(line))
                          and m.group(2) not in (A_IF, B_IF)}) for side in "ab"}
    if len(tuns["a"]) != 1 or len(tuns["b"]) != 1:
        raise BenchError(f"cannot tell the TUN devices apart: {tuns}")
    parts = split_round_trips(lines["a"], lines["b"], tuns["a"][0], tuns["b"][0])
    if len(parts["round trip"]) < count // 2:
        raise BenchError(f"only {len(parts['round trip'])} of {count} round trips "
                         "could be followed hop by hop")
    return {"ping": stats(rtts), "parts": {k: stats(v) for k, v in parts.items()},
            "tun_devices": tuns, "name": c.name}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--interval", type=float, default=0.02)
    ap.add_argument("--plaintext", action="store_true",
                    help="the upmt_tun run with insecure_plaintext_for_benchmarks")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    interruptible()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = args.json or RESULTS_DIR / f"latency-{stamp}.json"
    work = path.with_name(path.stem + "-work")
    work.mkdir(parents=True, exist_ok=True)
    pair = Pair()
    try:
        pair.up()
        raw = stats(ping_rtts(pair, args.count, args.interval))
        echo = stats(udp_echo(pair, args.count, args.interval))
        upmt = upmt_hops(pair, work, args.count, args.interval, args.plaintext)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        pair.down()
    hop = (float(echo["median_us"]) - float(raw["median_us"])) / 2
    res = {"raw_ping": raw, "udp_echo": echo, "one_hop_floor_us": hop, "upmt": upmt,
           "count": args.count, "interval_s": args.interval, "source": source_version()}
    print(f"{'':24} | median us |  p90 us")
    rows = [("raw ping (kernel)", raw), ("udp echo (2 processes)", echo),
            (f"{upmt['name']} ping", upmt["ping"])]
    rows += [(f"  {k}", v) for k, v in upmt["parts"].items()]
    for name, s in rows:
        print(f"{name:24} | {s.get('median_us', 0):9.0f} | {s.get('p90_us', 0):7.0f}")
    print(f"one user-space hop (wake-up + one small system call), floor: {hop:.0f} us; "
          f"a ping through agent and anchor crosses four")
    path.write_text(json.dumps(res, indent=1))
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
