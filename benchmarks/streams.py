#!/usr/bin/env python3
"""Traffic helpers for benchmarks/handover.py, run inside the testbed's namespaces, and the
functions that analyse what they recorded.

    python3 streams.py sample --ifaces wan1,wan2 [--interval 0.05]
        one line per interval on stdout: "<monotonic s> <rx_packets> <tx_packets> ..." for
        each interface in order (read from /sys/class/net/<if>/statistics/), so sampling is
        not limited by process start-up;
    python3 streams.py udp-send --bind IP:PORT [--dst IP:PORT] --rate N --size B --out F
        a constant-rate UDP stream of B-byte datagrams, each with a sequence number and its
        send time. Without --dst it waits for one datagram (a hello) and streams to its
        source address and port (a legacy downlink: the client asks, the server streams);
    python3 streams.py udp-recv --bind IP:PORT [--hello IP:PORT] --out F
        records every datagram's arrival time and sequence number; with --hello it first
        sends hellos there (every 0.2 s until data comes); with --rehello S it asks again
        (every 1 s) once nothing arrived for S seconds, as an application with a liveness
        timeout would (chaos.py: a downlink that never resumes by itself still gets measured
        after its application asked again; each hello's time is recorded);
    udp-send ... --follow: keeps listening for hellos while it streams and streams to the
        newest hello's source (the stream's return address may change when a NAT or the
        anchor forgot the flow).

Both stream ends run until SIGTERM (or --duration) and then write F (JSON). Every time is
``time.monotonic()``: CLOCK_MONOTONIC is the same in every network namespace of the
machine, so events logged by handover.py line up with arrivals recorded here.
Standard library only.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import signal
import socket
import struct
import sys
import time
from array import array
from typing import Any

HELLO = b"HELLO upmt handover"
_HDR = struct.Struct("!Qd")      # sequence number, send time (monotonic s)
MIN_SIZE = _HDR.size
OUTAGE_S = 0.05        # a gap this long is an outage (the stream's period is 0.5 ms)

_stop = False


def _on_term(signum: int, frame: Any) -> None:
    global _stop
    _stop = True


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "0.0.0.0", int(port)


def _write(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


# -- programs ---------------------------------------------------------------------------------

def sample(ifaces: list[str], interval: float) -> int:
    fds = []
    for name in ifaces:
        for k in ("rx_packets", "tx_packets"):
            fds.append(os.open(f"/sys/class/net/{name}/statistics/{k}", os.O_RDONLY))
    out = sys.stdout
    t0 = time.monotonic()
    n = 0
    while not _stop:
        vals = [os.pread(fd, 32, 0).strip().decode() for fd in fds]
        out.write(f"{time.monotonic():.6f} {' '.join(vals)}\n")
        out.flush()
        n += 1
        delay = t0 + n * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:   # fell behind (busy machine): keep the period, skip the missed ticks
            n = int((time.monotonic() - t0) / interval)
    return 0


def udp_send(bind: tuple[str, int], dst: tuple[str, int] | None, rate: float, size: int,
             duration: float, out: str, wait_hello: float, follow: bool = False) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    sock.bind(bind)
    res: dict[str, Any] = {"role": "udp-send", "rate": rate, "size": size, "sent": 0,
                           "send_errors": 0, "t_start": None, "t_end": None, "dst": None}
    if dst is None:    # wait for the receiver's hello, stream to where it came from
        sock.settimeout(0.1)
        deadline = time.monotonic() + wait_hello
        while dst is None and not _stop and time.monotonic() < deadline:
            try:
                data, src = sock.recvfrom(2048)
            except TimeoutError:
                continue
            if data.startswith(HELLO):
                dst = src
        if dst is None:
            res["error"] = f"no hello within {wait_hello:.0f} s"
            _write(out, res)
            return 1
    res["dst"] = f"{dst[0]}:{dst[1]}"
    res["dst_changes"] = []
    if follow:
        sock.setblocking(False)
    pad = bytes(max(0, size - MIN_SIZE))
    t0 = time.monotonic()
    res["t_start"] = t0
    seq = 0
    end = t0 + duration if duration > 0 else float("inf")
    while not _stop:
        now = time.monotonic()
        if now >= end:
            break
        due = t0 + seq / rate
        if now < due:
            if follow:
                dst = _newest_hello(sock, dst, res, now)
            time.sleep(min(due - now, 0.01))
            continue
        try:
            sock.sendto(_HDR.pack(seq, now) + pad, dst)
        except OSError:     # e.g. no route for a moment: the datagram is lost, count it
            res["send_errors"] += 1
        seq += 1
    res["sent"] = seq
    res["t_end"] = time.monotonic()
    _write(out, res)
    return 0


def _newest_hello(sock: socket.socket, dst: tuple[str, int], res: dict[str, Any],
                  now: float) -> tuple[str, int]:
    """--follow: drain pending hellos; the newest one's source is where to stream now."""
    while True:
        try:
            data, src = sock.recvfrom(2048)
        except (BlockingIOError, InterruptedError):
            return dst
        except OSError:      # e.g. an ICMP error queued on the socket: not a hello
            continue
        if data.startswith(HELLO) and src != dst:
            res["dst_changes"].append([now, f"{src[0]}:{src[1]}"])
            dst = src


def udp_recv(bind: tuple[str, int], hello: tuple[str, int] | None, duration: float,
             out: str, rehello: float = 0.0) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(bind)
    sock.settimeout(0.05)
    arrivals, seqs, sent_at = array("d"), array("q"), array("d")
    hellos = 0
    hello_at: list[float] = []
    next_hello = 0.0
    last_rx = 0.0
    t_begin = time.monotonic()
    end = t_begin + duration if duration > 0 else float("inf")
    while not _stop:
        now = time.monotonic()
        if now >= end:
            break
        silent = rehello > 0 and bool(seqs) and now - last_rx >= rehello
        if hello is not None and (not seqs or silent) and now >= next_hello:
            with contextlib.suppress(OSError):     # no route for a moment: try again later
                sock.sendto(HELLO, hello)
            hellos += 1
            hello_at.append(now)
            next_hello = now + (0.2 if not seqs else 1.0)
        try:
            data, _ = sock.recvfrom(4096)
        except TimeoutError:
            continue
        t = time.monotonic()
        if len(data) < MIN_SIZE:
            continue
        last_rx = t
        s, ts = _HDR.unpack_from(data)
        arrivals.append(t)
        seqs.append(s)
        sent_at.append(ts)
    _write(out, {"role": "udp-recv", "hellos": hellos, "hello_at": hello_at,
                 "t_begin": t_begin,
                 "t_end": time.monotonic(), "arrival": arrivals.tolist(), "seq": seqs.tolist(),
                 "sent_at": sent_at.tolist()})
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("sample")
    sp.add_argument("--ifaces", required=True)
    sp.add_argument("--interval", type=float, default=0.05)
    sd = sub.add_parser("udp-send")
    sd.add_argument("--bind", required=True)
    sd.add_argument("--dst")
    sd.add_argument("--rate", type=float, default=2000.0)
    sd.add_argument("--size", type=int, default=200)
    sd.add_argument("--duration", type=float, default=0.0)
    sd.add_argument("--wait-hello", type=float, default=20.0)
    sd.add_argument("--out", required=True)
    sd.add_argument("--follow", action="store_true")
    rv = sub.add_parser("udp-recv")
    rv.add_argument("--bind", required=True)
    rv.add_argument("--hello")
    rv.add_argument("--duration", type=float, default=0.0)
    rv.add_argument("--out", required=True)
    rv.add_argument("--rehello", type=float, default=0.0)
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_term)
    if a.cmd == "sample":
        return sample(a.ifaces.split(","), a.interval)
    if a.cmd == "udp-send":
        if a.size < MIN_SIZE or a.rate <= 0:
            p.error(f"--size must be >= {MIN_SIZE} and --rate > 0")
        return udp_send(_addr(a.bind), _addr(a.dst) if a.dst else None, a.rate, a.size,
                        a.duration, a.out, a.wait_hello, a.follow)
    return udp_recv(_addr(a.bind), _addr(a.hello) if a.hello else None, a.duration, a.out,
                    a.rehello)


# -- analysis (imported by handover.py) ---------------------------------------------------------

def parse_samples(text: str, ifaces: list[str]) -> dict[str, list[float]]:
    """The sampler's output -> {"t": [...], "<if>_rx": [...], "<if>_tx": [...]} (counters)."""
    cols: dict[str, list[float]] = {"t": []}
    for name in ifaces:
        cols[f"{name}_rx"], cols[f"{name}_tx"] = [], []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 1 + 2 * len(ifaces):
            continue             # a line cut short when the sampler was stopped
        try:
            vals = [float(parts[0]), *(int(x) for x in parts[1:])]
        except ValueError:
            continue
        cols["t"].append(vals[0])
        for i, name in enumerate(ifaces):
            cols[f"{name}_rx"].append(vals[1 + 2 * i])
            cols[f"{name}_tx"].append(vals[2 + 2 * i])
    return cols


def rates(t: list[float], counter: list[float]) -> tuple[list[float], list[float]]:
    """Counter samples -> (interval mid-times, per-second rates)."""
    mids, out = [], []
    for i in range(1, len(t)):
        dt = t[i] - t[i - 1]
        if dt <= 0:
            continue
        mids.append((t[i] + t[i - 1]) / 2)
        out.append((counter[i] - counter[i - 1]) / dt)
    return mids, out


def _send_time_of(missing: int, seqs_sorted: list[int], sent_sorted: list[float],
                  t_start: float, rate: float) -> float:
    """When a lost datagram was sent: between its received neighbours' send times, else its
    nominal time on the sender's schedule."""
    i = bisect.bisect_left(seqs_sorted, missing)
    if 0 < i < len(seqs_sorted):
        s0, s1 = seqs_sorted[i - 1], seqs_sorted[i]
        t0, t1 = sent_sorted[i - 1], sent_sorted[i]
        return t0 + (t1 - t0) * (missing - s0) / (s1 - s0)
    return t_start + missing / rate


def udp_analysis(recv: dict[str, Any], send: dict[str, Any],
                 events: list[tuple[str, float]], after_s: float = 1.0) -> dict[str, Any]:
    """Loss, duplicates, reordering and gaps of one recorded stream.

    ``events``: (name, monotonic time) in time order. For each event, over the window from
    the event to the next one (or the end): the largest inter-arrival gap that ends after
    the event (``gap_ms``) and when it began (``gap_at_ms``, from the event); if it is an
    outage (>= 50 ms), the time from the event to the first arrival after it
    (``recovery_ms``: for a failover, when traffic flows on the new path); the largest gap
    in the second before (``gap_before_ms``, the background); the datagrams lost among those
    sent from ``after_s`` before the event to the end of the window; how many arrived in the
    second before the event and in the window after it; duplicates and reordered (late)
    datagrams that arrived in the window."""
    arr: list[float] = recv.get("arrival", [])
    seq: list[int] = recv.get("seq", [])
    sent = int(send.get("sent") or 0)
    rate = float(send.get("rate") or 1.0)
    t_start = float(send.get("t_start") or 0.0)
    seen: set[int] = set()
    dup_at: list[float] = []         # arrival times of duplicates
    late_at: list[float] = []        # ... and of datagrams older than one already received
    high = -1
    for s, t in zip(seq, arr, strict=False):
        if s in seen:
            dup_at.append(t)
            continue
        seen.add(s)
        if s < high:
            late_at.append(t)
        high = max(high, s)
    missing = [s for s in range(sent) if s not in seen]
    pairs = sorted(zip(seq, recv.get("sent_at", []), strict=False))
    seqs_sorted = [p[0] for p in pairs]
    sent_sorted = [p[1] for p in pairs]
    lost_at = [_send_time_of(s, seqs_sorted, sent_sorted, t_start, rate) for s in missing]
    gaps = [arr[i + 1] - arr[i] for i in range(len(arr) - 1)]
    out: dict[str, Any] = {
        "sent": sent, "received": len(seq), "unique": len(seen), "lost": len(missing),
        "duplicates": len(dup_at), "reordered": len(late_at),
        "send_errors": send.get("send_errors", 0),
        "max_gap_ms": round(max(gaps) * 1000, 2) if gaps else None,
        "median_gap_ms": round(sorted(gaps)[len(gaps) // 2] * 1000, 3) if gaps else None,
        "events": [],
    }
    t_end = arr[-1] if arr else t_start
    for k, (name, te) in enumerate(events):
        tw = events[k + 1][1] if k + 1 < len(events) else max(t_end, te)
        best, best_i = 0.0, None
        before = 0.0
        for i, g in enumerate(gaps):
            if arr[i + 1] > te and arr[i] < tw and g > best:
                best, best_i = g, i
            if te - 1.0 <= arr[i + 1] <= te:
                before = max(before, g)
        lo, hi = bisect.bisect_left(arr, te - 1.0), bisect.bisect_left(arr, te)
        after = bisect.bisect_left(arr, tw) - hi
        ev: dict[str, Any] = {"event": name, "gap_ms": None, "gap_at_ms": None,
                              "recovery_ms": None}
        if best_i is not None:
            ev["gap_ms"] = round(best * 1000, 2)
            ev["gap_at_ms"] = round((arr[best_i] - te) * 1000, 1)
            if best >= OUTAGE_S:
                ev["recovery_ms"] = round(max(0.0, arr[best_i + 1] - te) * 1000, 1)
        ev.update({
            "gap_before_ms": round(before * 1000, 2),
            "lost": sum(1 for t in lost_at if te - after_s <= t < tw),
            "duplicates": sum(1 for t in dup_at if te <= t < tw),
            "reordered": sum(1 for t in late_at if te <= t < tw),
            "received_1s_before": hi - lo,
            "received_after": after,
        })
        out["events"].append(ev)
    return out


if __name__ == "__main__":
    sys.exit(main())
