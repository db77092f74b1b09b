#!/usr/bin/env python3
"""Handover experiments: the UPMT paper's Figure 5 and the gaps of failover.

    python benchmarks/handover.py [--quick] [--scenarios swap,udp-move,link-down,silent-death]
                                  [--json PATH] [--png-dir DIR] [--workdir DIR]

Each scenario runs in a fresh :class:`upmt_tun.testbed.Topology` (MH with wan1/wan2 behind
NATs nat1/nat2, anchor 203.0.113.1, CH 203.0.113.100) with a fresh
:class:`upmt_tun.lab.Lab` (real ``upmt-anchor`` and ``upmt-agent``), torn down at its end
whatever happens. Each NAT shapes its access network towards the MH with tbf
(``--shape``, 40 Mbit/s). A sampler inside ns ``mh`` (``streams.py sample``) records the rx/tx
packet counters of wan1 and wan2 every 50 ms for the whole scenario.

* **swap** (Figure 5): two legacy TCP downloads from the CH (``python3 -m http.server`` on
  ports 8080 = "http" and 2121 = "ftp", sending at two different rates, 20 and 10 Mbit/s,
  paced by htb in ns ``ch``; a plain ``curl`` on the MH fetches each). Rule ``http``
  prefers wan1, rule ``ftp`` wan2. At fixed times
  ``upmt-agent move --rule http --via wan2`` and ``--rule ftp --via wan1`` (both at once),
  later the reverse. Output: packets/s per interface and their total (``figure5.png``);
  both downloads must complete intact (sha256).
* **udp-move**: a legacy UDP downlink (``streams.py``: the MH's receiver sends a hello, the
  CH streams 2000 datagrams/s of 200 bytes, each with a sequence number, to where the hello
  came from) on rule ``udp-down``, and an uplink stream (MH -> CH) on rule ``udp-up``,
  both via ["wan1", "wan2"]. ``move --rule udp-down --via wan2`` in the middle, then
  ``move --rule udp-up --via wan2``. Lost, duplicated, reordered datagrams and the
  largest inter-arrival gap around each move. Target: no datagram lost.
* **link-down**: the UDP downlink plus a TCP download (rule ``http``); wan1 of the MH goes
  down (``Topology.set_link``), later up again; the flows should move to wan2 and return
  to wan1 after the agent's hysteresis (``return_after = 3`` when the agent's config
  accepts it). Target: traffic on the new path within 300 ms.
* **silent-death**: as link-down, but nat1 silently drops everything it forwards
  (nftables, link stays up), later the drop is removed. Target: flows moved within 1 s.

Per event, over the time up to the next event: ``gap_ms`` = the largest inter-arrival gap
of the UDP stream (``gap_at_ms``: when it began, from the event's command; ``gap_before_ms``:
the largest gap in the second before, the background); ``recovery_ms`` = from the event's
command to the first datagram after that gap, when it was an outage (>= 50 ms; for a
failover: when traffic flowed on the new path); ``lost`` = datagrams sent from 1 s before
the event on that never arrived; ``moved_ms`` = when the agent moved the flow (from its flow
history, about +-50 ms; for ``move`` this includes the CLI's start-up), after the event.
At the end each scenario records every flow's history from ``upmt-agent status --json``
(age, from, to, reason) and the anchor's, so the output shows why each flow moved.

Results: a table on stdout, a JSON file (default ``benchmarks/results/handover.json``),
``figure5.png`` and ``failover.png`` (matplotlib; skipped with a note when it is missing).
Daemon configs and logs: ``<json name>-lab/<scenario>/`` next to the JSON
(``benchmarks/results/handover-lab/``). Exit 0 when every
scenario ran without error (missed targets are results, not errors), 1 on errors, 2 when
something it needs is missing, 130 when interrupted. Only addresses inside the namespaces
built here are contacted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import streams  # noqa: E402 (benchmarks/ dir)
from common import (  # noqa: E402 (benchmarks/ dir)
    BenchError,
    interruptible,
    loadavg,
    render,
    rule_toml,
    source_version,
)

from upmt_tun.lab import Lab, LabError
from upmt_tun.testbed import MH_IFACES, Topology, tool_missing

CH = "203.0.113.100"
HTTP_PORT, FTP_PORT = 8080, 2121
UDP_DOWN_PORT, UDP_UP_PORT = 5004, 5006        # CH side
MH_UDP_PORT = 40004                            # the downlink receiver on the MH
SAMPLE_S = 0.05
SCENARIOS = ("swap", "udp-move", "link-down", "silent-death")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
STREAMS = str(Path(__file__).resolve().with_name("streams.py"))
PY = sys.executable
RETURN_AFTER = "return_after = 3"
TARGETS = {"udp-move": "0 UDP datagrams lost on an explicit move",
           "link-down": "traffic on the new path within 300 ms",
           "silent-death": "flows moved within 1 s"}

RULES = "".join(rule_toml(name, proto, dst=f"{CH}/32", dst_port=port, via=via)
                for name, proto, port, via in (
                    ("http", "tcp", HTTP_PORT, ("wan1", "wan2")),
                    ("ftp", "tcp", FTP_PORT, ("wan2", "wan1")),
                    ("udp-down", "udp", UDP_DOWN_PORT, ("wan1", "wan2")),
                    ("udp-up", "udp", UDP_UP_PORT, ("wan1", "wan2"))))



@dataclass
class Timing:
    """Durations (seconds) of one run; --quick shortens them."""

    pre: float            # steady traffic before the first event
    swap_hold: float      # swap: time between the two swaps and after the second
    http_mbit: float      # swap: the CH sends the "http" download at this rate (htb)
    ftp_mbit: float       # ... and the "ftp" one at this
    udp_rate: float       # datagrams/s
    move_hold: float      # udp-move: after each move
    link_hold: float      # link-down / silent-death: on the other path before the revival
    failover_wait: float  # how long to wait for the agent to move the flows away
    link_wait: float      # link-down: how long to wait for the flows to return
    silent_wait: float    # silent-death: same
    post: float           # after the last event
    bg_mbit: float        # the TCP download next to the UDP stream


FULL = Timing(pre=4.0, swap_hold=8.0, http_mbit=20, ftp_mbit=10, udp_rate=2000,
              move_hold=3.0, link_hold=4.0, failover_wait=45.0, link_wait=20.0,
              silent_wait=45.0, post=2.0, bg_mbit=8)
QUICK = Timing(pre=1.5, swap_hold=2.0, http_mbit=10, ftp_mbit=5, udp_rate=2000,
               move_hold=1.5, link_hold=1.5, failover_wait=12.0, link_wait=6.0,
               silent_wait=5.0, post=1.0, bg_mbit=4)


# -- small helpers --------------------------------------------------------------------------

def now() -> float:
    return time.monotonic()


def write_random(path: Path, size: int) -> str:
    """A file of ``size`` random bytes; return its sha256."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 1 << 20))
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return h.hexdigest()


def sha_prefix(path: Path, n: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = n
        while left:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def stop_proc(p: subprocess.Popen[Any], timeout: float = 5.0) -> int | None:
    """SIGTERM ``p`` (it is the program itself: ``ip netns exec`` execs), wait, SIGKILL."""
    if p.poll() is None:
        with suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                p.kill()
            with suppress(subprocess.TimeoutExpired):
                p.wait(5)
    return p.returncode


def read_json(path: Path, timeout: float = 5.0) -> dict[str, Any]:
    deadline = now() + timeout
    while not path.exists() and now() < deadline:
        time.sleep(0.05)
    if not path.exists():
        err = path.with_suffix(".err")
        tail = err.read_text(errors="replace").strip()[-300:] if err.exists() else ""
        raise BenchError(f"{path.name} was not written {tail}".strip())
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def wait_port(topo: Topology, role: str, proto: str, port: int, timeout: float = 10.0) -> None:
    flag = "-Hltn" if proto == "tcp" else "-Hlun"
    deadline = now() + timeout
    while now() < deadline:
        out = topo.run(role, "ss", flag, check=False).stdout
        if re.search(rf":{port}\s", out):
            return
        time.sleep(0.05)
    raise BenchError(f"nothing listening on {proto} port {port} in {role} after {timeout:.0f} s")


class SizeSampler:
    """Sizes of files being downloaded, every 50 ms, in a thread: per-download progress."""

    def __init__(self) -> None:
        self.files: dict[str, Path] = {}
        self.series: dict[str, list[tuple[float, int]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def add(self, name: str, path: Path) -> None:
        self.series[name] = []
        self.files[name] = path

    def start(self) -> SizeSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2)

    def _run(self) -> None:
        while not self._stop.is_set():
            t = now()
            for name, p in list(self.files.items()):
                try:
                    size = p.stat().st_size
                except OSError:
                    size = 0
                self.series[name].append((t, size))
            self._stop.wait(SAMPLE_S)


def stall(series: list[tuple[float, int]], t0: float, t1: float) -> float | None:
    """Longest time (s) without the file growing, among intervals overlapping [t0, t1)."""
    growth = [t for i, (t, s) in enumerate(series) if i == 0 or s > series[i - 1][1]]
    best = None
    for a, b in zip(growth, growth[1:], strict=False):
        if b > t0 and a < t1:
            best = max(best or 0.0, b - a)
    return best


# -- one scenario's run ------------------------------------------------------------------------

class Run:
    """A fresh topology + lab for one scenario, with the sampler; records everything."""

    def __init__(self, name: str, args: argparse.Namespace, tmp: Path, extra: str) -> None:
        self.name, self.args, self.tmp = name, args, tmp / name
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.workdir: Path = args.workdir / name
        self.extra = extra
        self.res: dict[str, Any] = {"ran": False, "agent_extra": extra, "events": [],
                                    "errors": [], "notes": []}
        self.topo: Topology | None = None
        self.lab: Lab | None = None
        self.t0 = 0.0
        self.sampler: subprocess.Popen[Any] | None = None
        self.sample_file = self.tmp / "samples.txt"
        self.sizes = SizeSampler()
        self.polls: list[dict[str, Any]] = []

    # -- setup / teardown
    @contextmanager
    def up(self) -> Iterator[Run]:
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        topo = self.topo = Topology()
        try:
            topo.up()
            self.res["topology_prefix"] = topo.prefix
            for nat in ("nat1", "nat2"):
                r = topo.run(nat, "tc", "qdisc", "add", "dev", "lan", "root", "tbf", "rate",
                             self.args.shape, "burst", "64kb", "latency", "50ms", check=False)
                if r.returncode != 0:
                    raise BenchError(f"tc tbf in {nat}: {r.stderr.strip()}")
            self.lab = Lab(topo, self.workdir, rules=RULES, agent_extra=self.extra)
            self.lab.start()
            self.sampler = topo.popen(
                "mh", PY, "-u", STREAMS, "sample", "--ifaces", ",".join(MH_IFACES),
                "--interval", str(SAMPLE_S), stdout=open(self.sample_file, "w"),
                stderr=subprocess.DEVNULL)
            self.t0 = now()
            self.res["ran"] = True
            yield self
        finally:
            self.sizes.stop()
            if self.sampler is not None:
                stop_proc(self.sampler)
            if self.lab is not None:
                try:
                    self.res["exit_codes"] = codes = self.lab.stop()
                    if any(c != 0 for c in codes.values()):
                        self.error(f"daemon exit codes {codes}")
                except Exception as e:
                    self.error(f"lab.stop: {e!r}")
                self.res["logs"] = log_findings(self.workdir)
            topo.down()
            self.finish_samples()

    def error(self, msg: str) -> None:
        self.res["errors"].append(" ".join(msg.split())[:800])   # one line

    def rel(self, t: float) -> float:
        return round(t - self.t0, 4)

    def finish_samples(self) -> None:
        try:
            text = self.sample_file.read_text()
        except OSError:
            return
        cols = streams.parse_samples(text, list(MH_IFACES))
        t = cols["t"]
        self.res["samples"] = {"interval_s": SAMPLE_S, "t": [self.rel(x) for x in t],
                               **{k: v for k, v in cols.items() if k != "t"}}

    # -- actions
    def event(self, name: str, action: Callable[[], Any]) -> float:
        """Run ``action`` as event ``name``; its time is when the command was issued."""
        t = now()
        action()
        t_done = now()
        self.res["events"].append({"event": name, "t": self.rel(t),
                                   "command_ms": round((t_done - t) * 1000, 1)})
        return t

    def move(self, rule: str, via: str) -> None:
        assert self.lab is not None
        r = self.lab.agent_cli("move", "--rule", rule, "--via", via, check=False)
        if r.returncode != 0:
            raise BenchError(f"move --rule {rule} --via {via}: exit {r.returncode} "
                             f"{(r.stderr or r.stdout).strip()}")

    def status(self) -> tuple[float, dict[str, Any]]:
        assert self.lab is not None
        st = self.lab.agent_status()
        return now(), st

    def rule_ifaces(self) -> dict[str, str | None]:
        t, st = self.status()
        m = {f["rule"]: f["interface"] for f in st["flows"]}
        self.polls.append({"t": self.rel(t), "interfaces": m})
        return m

    def wait_flows(self, want: dict[str, str], timeout: float) -> float | None:
        """Poll the agent until each rule's flow uses the wanted interface; the time, or None."""
        deadline = now() + timeout
        while True:
            got = self.rule_ifaces()
            if all(got.get(r) == i for r, i in want.items()):
                return now()
            if now() >= deadline:
                return None
            time.sleep(0.1)

    def http_server(self, port: int, root: Path) -> None:
        assert self.topo is not None
        self.topo.popen("ch", PY, "-m", "http.server", str(port), "--bind", "0.0.0.0",
                        "--directory", str(root), stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
        wait_port(self.topo, "ch", "tcp", port)

    def pace_servers(self, mbit: dict[int, float]) -> None:
        """The CH sends what leaves TCP port P at ``mbit[P]`` Mbit/s (htb on its eth0; a
        server-side rate: curl --limit-rate turns into bursts at line rate once a download
        fell behind, since it pauses reading and TCP then refills a large window at once)."""
        assert self.topo is not None
        cmds = [["qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default", "99",
                 "r2q", "100"],
                ["class", "add", "dev", "eth0", "parent", "1:", "classid", "1:99", "htb",
                 "rate", "10gbit"]]
        for n, (port, rate) in enumerate(sorted(mbit.items()), start=1):
            cmds += [["class", "add", "dev", "eth0", "parent", "1:", "classid", f"1:{n}", "htb",
                      "rate", f"{rate}mbit", "ceil", f"{rate}mbit"],
                     ["qdisc", "add", "dev", "eth0", "parent", f"1:{n}", "pfifo", "limit", "100"],
                     ["filter", "add", "dev", "eth0", "parent", "1:", "protocol", "ip", "prio",
                      "1", "u32", "match", "ip", "sport", str(port), "0xffff", "flowid", f"1:{n}"]]
        for c in cmds:
            r = self.topo.run("ch", "tc", *c, check=False)
            if r.returncode != 0:
                raise BenchError(f"tc {' '.join(c)} in ch: {r.stderr.strip()}")

    def curl(self, name: str, port: int, fname: str) -> tuple[subprocess.Popen[str], Path]:
        assert self.topo is not None
        out = self.tmp / f"got-{name}.bin"
        p = self.topo.popen("mh", "curl", "-sS", "-o", str(out),
                            "-w", "%{http_code}", f"http://{CH}:{port}/{fname}",
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.sizes.add(name, out)
        return p, out

    def udp_down(self) -> tuple[subprocess.Popen[Any], subprocess.Popen[Any], Path, Path]:
        """The CH's sender waiting for a hello, then the MH's receiver sending it."""
        assert self.topo is not None
        snd, rcv = self.tmp / "down-send.json", self.tmp / "down-recv.json"
        ps = self.topo.popen("ch", PY, STREAMS, "udp-send", "--bind", f"0.0.0.0:{UDP_DOWN_PORT}",
                             "--rate", str(self.args.timing.udp_rate), "--size", "200",
                             "--out", str(snd), stdout=subprocess.DEVNULL,
                             stderr=open(self.tmp / "down-send.err", "w"))
        wait_port(self.topo, "ch", "udp", UDP_DOWN_PORT)
        pr = self.topo.popen("mh", PY, STREAMS, "udp-recv", "--bind", f"0.0.0.0:{MH_UDP_PORT}",
                             "--hello", f"{CH}:{UDP_DOWN_PORT}", "--out", str(rcv),
                             stdout=subprocess.DEVNULL,
                             stderr=open(self.tmp / "down-recv.err", "w"))
        return ps, pr, snd, rcv

    def udp_up(self) -> tuple[subprocess.Popen[Any], subprocess.Popen[Any], Path, Path]:
        assert self.topo is not None
        snd, rcv = self.tmp / "up-send.json", self.tmp / "up-recv.json"
        pr = self.topo.popen("ch", PY, STREAMS, "udp-recv", "--bind", f"0.0.0.0:{UDP_UP_PORT}",
                             "--out", str(rcv), stdout=subprocess.DEVNULL,
                             stderr=open(self.tmp / "up-recv.err", "w"))
        wait_port(self.topo, "ch", "udp", UDP_UP_PORT)
        ps = self.topo.popen("mh", PY, STREAMS, "udp-send", "--bind", "0.0.0.0:0",
                             "--dst", f"{CH}:{UDP_UP_PORT}",
                             "--rate", str(self.args.timing.udp_rate), "--size", "200",
                             "--out", str(snd), stdout=subprocess.DEVNULL,
                             stderr=open(self.tmp / "up-send.err", "w"))
        return ps, pr, snd, rcv

    def stop_stream(self, ps: subprocess.Popen[Any], pr: subprocess.Popen[Any], snd: Path,
                    rcv: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """Sender first, then (what was in flight has arrived) the receiver."""
        stop_proc(ps)
        time.sleep(0.3)
        stop_proc(pr)
        sent, got = read_json(snd), read_json(rcv)
        if sent.get("error"):
            self.error(f"{snd.stem}: {sent['error']}")
        elif not got.get("seq"):
            self.error(f"{rcv.stem}: no datagram arrived ({sent.get('sent')} sent)")
        return sent, got

    def histories(self) -> None:
        """Every flow's history at the agent and at the anchor, with interface names and
        times relative to the scenario's start."""
        assert self.lab is not None
        t, st = self.status()
        tun = {x["id"]: x["interface"] for x in st["tunnels"]}
        flows = []
        for f in st["flows"]:
            flows.append({
                "id": f["id"], "rule": f.get("rule"), "protocol": f["protocol"],
                "dport": f["dport"], "interface": f["interface"],
                "tx_packets": f["tx_packets"], "rx_packets": f["rx_packets"],
                "history": [{**h, "at_s": round(t - h["age_s"] - self.t0, 3),
                             "from_if": tun.get(h["from"]), "to_if": tun.get(h["to"])}
                            for h in f["history"]]})
        self.res["flows"] = flows
        self.res["agent_drops"] = st.get("drops", {})
        self.res["agent_tunnels"] = [{k: x.get(k) for k in ("id", "interface", "state",
                                                            "rtt_ms", "tx_packets",
                                                            "rx_packets")}
                                     for x in st["tunnels"]]
        try:
            an = self.lab.anchor_status()
            t_an = now()   # ages are taken when the daemon answers: near the call's end
            an_tun = {x["id"]: x.get("interface") for a in an.get("associations", [])
                      for x in a.get("tunnels", [])}
            self.res["anchor_flows"] = [{
                "id": f["id"], "protocol": f["protocol"], "dport": f["dport"],
                "interface": f.get("interface"),
                "history": [{**h, "at_s": round(t_an - h["age_s"] - self.t0, 3),
                             "from_if": an_tun.get(h["from"]), "to_if": an_tun.get(h["to"])}
                            for h in f.get("history", [])]} for f in an.get("flows", [])]
            self.res["anchor_drops"] = an.get("drops", {})
            self.res["anchor_paths"] = an.get("paths", {})
        except Exception as e:
            self.res["notes"].append(f"anchor status: {e!r}")
        self.res["polls"] = self.polls

    def moved_at(self, rule: str, to_if: str, after: float) -> float | None:
        """Scenario time of the first move of ``rule``'s flow to ``to_if`` after ``after``."""
        for f in self.res.get("flows", []):
            if f["rule"] != rule:
                continue
            for h in f["history"]:
                if h["from"] is not None and h["to_if"] == to_if and h["at_s"] >= after - 0.05:
                    return float(h["at_s"])
        return None

    def tcp_stalls(self, events: list[tuple[str, float]], t_end: float) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, series in self.sizes.series.items():
            per = []
            for k, (ev, te) in enumerate(events):
                tw = events[k + 1][1] if k + 1 < len(events) else t_end
                before = stall(series, te - 1.0, te)
                per.append({"event": ev,
                            "stall_ms": round((stall(series, te, tw) or 0) * 1000, 1),
                            "stall_before_ms": round((before or 0) * 1000, 1)})
            out[name] = per
            out[f"{name}_progress"] = [[self.rel(t), s] for t, s in series[::2]]
        return out


def log_findings(workdir: Path) -> dict[str, Any]:
    """Warning/error lines of the daemons' logs."""
    out: dict[str, Any] = {}
    for log in sorted(workdir.glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()
        bad = [ln for ln in lines if re.search(r"WARN|ERROR|CRITICAL|Traceback|Exception", ln)]
        out[log.stem] = {"path": str(log), "lines": len(lines), "trouble": len(bad),
                         "first_trouble": bad[:12]}
    return out


def download_check(p: subprocess.Popen[str], got: Path, src: Path, src_sha: str,
                   complete: bool, timeout: float) -> dict[str, Any]:
    """``complete``: wait for curl and require the whole file; else stop curl and require the
    bytes received so far to equal the file's beginning."""
    if complete:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    finished = p.poll() is not None
    code = stop_proc(p)
    out, err = p.communicate()
    size = got.stat().st_size if got.exists() else 0
    res: dict[str, Any] = {"bytes": size, "file_bytes": src.stat().st_size,
                           "curl_exit": code, "http_code": out.strip() if finished else None,
                           "finished": finished}
    if complete:
        res["intact"] = (finished and code == 0 and out.strip() == "200"
                         and size == res["file_bytes"] and sha_prefix(got, size) == src_sha)
    else:
        res["intact"] = size > 0 and sha_prefix(got, size) == sha_prefix(src, size)
    if err.strip():
        res["curl_stderr"] = err.strip()[-300:]
    return res


# -- scenarios ------------------------------------------------------------------------------

def scenario_swap(run: Run, www: Path) -> None:
    tm: Timing = run.args.timing
    total = tm.pre + 2 * tm.swap_hold
    files = {}
    for name, mbit in (("http", tm.http_mbit), ("ftp", tm.ftp_mbit)):
        f = www / f"{name}.bin"   # a bit more than the run at the paced rate (less headers)
        files[name] = (f, write_random(f, int(mbit * 1e6 / 8 * 0.9 * (total + 1.0))))
    run.pace_servers({HTTP_PORT: tm.http_mbit, FTP_PORT: tm.ftp_mbit})
    run.http_server(HTTP_PORT, www)
    run.http_server(FTP_PORT, www)
    run.sizes.start()
    t_start = now()
    dl = {"http": run.curl("http", HTTP_PORT, "http.bin"),
          "ftp": run.curl("ftp", FTP_PORT, "ftp.bin")}
    if run.wait_flows({"http": "wan1", "ftp": "wan2"}, 10) is None:
        raise BenchError(f"downloads not seen on their interfaces: {run.polls[-1:]}")
    time.sleep(max(0.0, t_start + tm.pre - now()))

    def swap(http_via: str, ftp_via: str) -> Callable[[], None]:
        def go() -> None:   # both moves at once, as one handover of two applications
            with ThreadPoolExecutor(2) as ex:
                futs = [ex.submit(run.move, "http", http_via), ex.submit(run.move, "ftp", ftp_via)]
                for fu in futs:
                    fu.result()
        return go

    t1 = run.event("swap: http->wan2, ftp->wan1", swap("wan2", "wan1"))
    run.wait_flows({"http": "wan2", "ftp": "wan1"}, 3)
    time.sleep(max(0.0, t1 + tm.swap_hold - now()))
    t2 = run.event("swap back: http->wan1, ftp->wan2", swap("wan1", "wan2"))
    run.wait_flows({"http": "wan1", "ftp": "wan2"}, 3)
    time.sleep(max(0.0, t2 + tm.swap_hold - now()))
    t_end = now()
    run.res["tcp"] = {}
    for name, (p, got) in dl.items():
        src, sha = files[name]
        run.res["tcp"][name] = download_check(p, got, src, sha, complete=True, timeout=60)
    run.sizes.stop()
    run.histories()
    evs = [(e["event"], e["t"] + run.t0) for e in run.res["events"]]
    run.res["tcp_stalls"] = run.tcp_stalls(evs, t_end)
    for k, (_ev, te) in enumerate(evs):
        e = run.res["events"][k]
        e["moved"] = {r: run.moved_at(r, want, run.rel(te))
                      for r, want in zip(("http", "ftp"), (("wan2", "wan1"), ("wan1", "wan2"))[k],
                                         strict=True)}
    run.res["intervals"] = {"end": run.rel(t_end)}


def scenario_udp_move(run: Run, www: Path) -> None:
    tm: Timing = run.args.timing
    down = run.udp_down()
    up = run.udp_up()
    if run.wait_flows({"udp-down": "wan1", "udp-up": "wan1"}, 10) is None:
        raise BenchError(f"UDP flows not seen on wan1: {run.polls[-1:]}")
    time.sleep(tm.pre)
    t1 = run.event("move udp-down -> wan2", lambda: run.move("udp-down", "wan2"))
    time.sleep(max(0.0, t1 + tm.move_hold - now()))
    t2 = run.event("move udp-up -> wan2", lambda: run.move("udp-up", "wan2"))
    time.sleep(max(0.0, t2 + tm.move_hold - now()))
    run.wait_flows({"udp-down": "wan2", "udp-up": "wan2"}, 2)
    sd, rd = run.stop_stream(*down)
    su, ru = run.stop_stream(*up)
    run.histories()
    run.res["udp"] = {
        "downlink": streams.udp_analysis(rd, sd, [("move udp-down -> wan2", t1)]),
        "uplink": streams.udp_analysis(ru, su, [("move udp-up -> wan2", t2)]),
    }
    for key, rule, te in (("downlink", "udp-down", t1), ("uplink", "udp-up", t2)):
        at = run.moved_at(rule, "wan2", run.rel(te))
        run.res["udp"][key]["events"][0]["moved_ms"] = (
            round((at - run.rel(te)) * 1000) if at is not None else None)
    for key in ("downlink", "uplink"):
        for e in run.res["udp"][key]["events"]:
            e["target_met"] = e["lost"] == 0


def scenario_failover(run: Run, www: Path, kind: str) -> None:
    """link-down or silent-death: UDP downlink + TCP download, wan1 dies, later revives."""
    assert run.topo is not None
    topo = run.topo
    tm: Timing = run.args.timing
    back_wait = tm.link_wait if kind == "link-down" else tm.silent_wait
    longest = tm.pre + tm.failover_wait + tm.link_hold + back_wait + tm.post + 10
    f = www / "bg.bin"
    sha = write_random(f, int(tm.bg_mbit * 1e6 / 8 * longest))
    run.pace_servers({HTTP_PORT: tm.bg_mbit})
    run.http_server(HTTP_PORT, www)
    run.sizes.start()
    dl = run.curl("http", HTTP_PORT, "bg.bin")
    down = run.udp_down()
    if run.wait_flows({"udp-down": "wan1", "http": "wan1"}, 10) is None:
        raise BenchError(f"flows not seen on wan1: {run.polls[-1:]}")
    time.sleep(tm.pre)
    if kind == "link-down":
        die, die_name = (lambda: topo.set_link("mh", "wan1", False)), "wan1 link down"
        revive, revive_name = (lambda: topo.set_link("mh", "wan1", True)), "wan1 link up"
    else:
        def die() -> None:
            topo.run("nat1", "nft", "-f", "-", input=(
                b"table ip silent {\n  chain drop_all {\n    type filter hook forward priority -10;"
                b" policy drop;\n  }\n}\n"))

        def revive() -> None:
            topo.run("nat1", "nft", "delete", "table", "ip", "silent")
        die_name, revive_name = "nat1 drops silently", "nat1 forwards again"
    t1 = run.event(die_name, die)
    moved = run.wait_flows({"udp-down": "wan2", "http": "wan2"}, tm.failover_wait)
    if moved is None:
        run.res["notes"].append(f"flows not on wan2 within {tm.failover_wait:.0f} s of "
                                f"'{die_name}'")
    time.sleep(max(0.0, (moved or now()) + tm.link_hold - now()))
    t2 = run.event(revive_name, revive)
    back = run.wait_flows({"udp-down": "wan1"}, back_wait)
    if back is None:
        run.res["notes"].append(f"udp-down not back on wan1 within {back_wait:.0f} s of "
                                f"'{revive_name}'")
    time.sleep(tm.post)
    sd, rd = run.stop_stream(*down)
    t_end = now()
    src_bytes = run.sizes.series.get("http", [])
    run.res["tcp"] = {"http": download_check(dl[0], dl[1], f, sha, complete=False, timeout=0)}
    run.sizes.stop()
    run.histories()
    ev = [(die_name, t1), (revive_name, t2)]
    t_fail = run.moved_at("udp-down", "wan2", run.rel(t1))
    if t_fail is not None:
        run.res["events"].insert(1, {"event": "flows on wan2 (agent history)", "t": t_fail,
                                     "derived": True})
    t_back = run.moved_at("udp-down", "wan1", run.rel(t2))
    if t_back is not None:
        ev.append(("udp-down back on wan1", t_back + run.t0))
        run.res["events"].append({"event": "udp-down back on wan1 (agent history)",
                                  "t": t_back, "after_revival_s": round(t_back - run.rel(t2), 3),
                                  "derived": True})
    udp = streams.udp_analysis(rd, sd, ev)
    for e, (_, te) in zip(udp["events"], ev, strict=True):
        to_if = "wan1" if e["event"] != die_name else "wan2"
        if e["event"] == "udp-down back on wan1":
            continue
        at = run.moved_at("udp-down", to_if, run.rel(te))
        e["moved_ms"] = round((at - run.rel(te)) * 1000) if at is not None else None
    first = udp["events"][0]
    limit = 300 if kind == "link-down" else 1000
    rec = first["recovery_ms"]
    first["target_met"] = first["received_after"] > 0 and (
        rec <= limit if rec is not None else (first["gap_ms"] or 0) < limit)
    run.res["udp"] = {"downlink": udp}
    # the TCP download kept going after the last event: it survived every handover
    last = ev[-1][1]
    grew = [s for t, s in src_bytes if t > last]
    run.res["tcp"]["http"]["grew_after_last_event"] = bool(grew and grew[-1] > grew[0])
    run.res["tcp"]["http"]["intact"] = (run.res["tcp"]["http"]["intact"]
                                        and run.res["tcp"]["http"]["grew_after_last_event"])
    run.res["tcp_stalls"] = run.tcp_stalls(ev, t_end)


# -- output ---------------------------------------------------------------------------------

def reasons(res: dict[str, Any]) -> list[str]:
    seen: list[str] = []
    for f in res.get("flows", []):
        for h in f["history"]:
            r = h["reason"]
            if h["from"] is not None and r not in seen:
                seen.append(r)
    return seen


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    def ms(v: Any) -> str:
        return "-" if v is None else f"{v:.0f}" if abs(v) >= 10 else f"{v:.1f}"

    rows = []
    for name, res in results.items():
        why = ", ".join(reasons(res)) or "-"
        tcp = res.get("tcp")
        intact = "-" if not tcp else "yes" if all(d.get("intact") for d in tcp.values()) else "NO"
        if not res.get("ran") or res.get("errors") and "udp" not in res and "tcp" not in res:
            rows.append([name, "(failed)", "-", "-", "-", "-", "-", "-", "-", intact, why])
            continue
        if name == "swap":
            stalls = res.get("tcp_stalls", {})
            for k, e in enumerate(res["events"]):
                st = max((stalls[d][k]["stall_ms"] for d in ("http", "ftp") if d in stalls),
                         default=None)
                end = (res["events"][k + 1]["t"] if k + 1 < len(res["events"])
                       else res.get("intervals", {}).get("end", e["t"] + 3))
                moved = [v for v in e.get("moved", {}).values() if v is not None]
                rows.append([name, e["event"], ms(st), "-", "-",
                             ms((max(moved) - e["t"]) * 1000) if moved else "-", "-", "-",
                             ms(dip_ms(res, e["t"], min(3.0, end - e["t"]))), intact, why])
            continue
        for direction, u in res.get("udp", {}).items():
            for e in u["events"]:
                rows.append([name, f"{e['event']} ({direction})", ms(e["gap_ms"]),
                             ms(e["gap_at_ms"]), ms(e["recovery_ms"]), ms(e.get("moved_ms")),
                             str(e["lost"]),
                             f"{e['duplicates']}/{e['reordered']}", "-", intact, why])
    return rows


def dip_ms(res: dict[str, Any], te: float, window: float = 3.0) -> float | None:
    """Swap: how long the total rx packet rate stayed below half its level of the second
    before the event, within ``window`` s after it (sampler resolution, 50 ms)."""
    s = res.get("samples")
    if not s or len(s["t"]) < 3:
        return None
    t = s["t"]
    tot = [a + b for a, b in zip(s["wan1_rx"], s["wan2_rx"], strict=True)]
    mids, pps = streams.rates(t, tot)
    base = [r for m, r in zip(mids, pps, strict=True) if te - 1.0 <= m < te]
    if not base:
        return None
    level = sum(base) / len(base)
    low = [m for m, r in zip(mids, pps, strict=True) if te <= m < te + window and r < level / 2]
    return len(low) * 1000 * (t[1] - t[0]) if low else 0.0


HEADERS = ["scenario", "event", "gap ms", "gap at ms", "recovery ms", "moved ms", "UDP lost",
           "dup/reord", "total<50% ms", "TCP intact", "reasons seen"]


def plot(results: dict[str, Any], png_dir: Path, run_rate: float) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNGs (pip install matplotlib)", file=sys.stderr)
        return []
    written = []
    png_dir.mkdir(parents=True, exist_ok=True)

    def series(res: dict[str, Any], stride: int = 2) -> tuple[list[float], ...]:
        s = res["samples"]
        t = s["t"][::stride]
        w1 = s["wan1_rx"][::stride]
        w2 = s["wan2_rx"][::stride]
        m, r1 = streams.rates(t, w1)
        _, r2 = streams.rates(t, w2)
        return m, r1, r2, [a + b for a, b in zip(r1, r2, strict=True)]

    def markers(ax: Any, events: list[dict[str, Any]], top: float) -> None:
        for k, e in enumerate(events):
            style = ":" if e.get("derived") else "--"
            ax.axvline(e["t"], color="0.3", linestyle=style, linewidth=1)
            ax.text(e["t"], top * (0.97 - 0.07 * (k % 3)), " " + e["event"], fontsize=7,
                    va="top", ha="left", color="0.2")
            for t in (e.get("moved") or {}).values():   # swap: when the agent moved each flow
                if t is not None:
                    ax.axvline(t, color="0.5", linestyle=":", linewidth=1)

    sw = results.get("swap")
    if sw and sw.get("samples") and sw.get("events"):
        m, r1, r2, tot = series(sw)
        fig, ax = plt.subplots(figsize=(9, 4.5))
        ax.plot(m, tot, color="black", linewidth=1.6, label="total")
        ax.plot(m, r1, color="tab:blue", linewidth=1.2, label="wan1 (Ethernet)")
        ax.plot(m, r2, color="tab:red", linewidth=1.2, label="wan2 (Wi-Fi)")
        top = max(tot or [1]) * 1.25
        ax.set_ylim(0, top)
        markers(ax, sw["events"], top)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("received packets/s")
        ax.set_title("Per-application handover of two legacy downloads (HTTP :8080, FTP :2121)"
                     "\nupmt_tun, cf. UPMT paper Figure 5", fontsize=10)
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        out = png_dir / "figure5.png"
        fig.savefig(out, dpi=120)
        plt.close(fig)
        written.append(str(out))
    present = [n for n in ("link-down", "silent-death")
               if results.get(n, {}).get("samples") and results[n].get("events")]
    if present:
        fig, axes = plt.subplots(len(present), 1, figsize=(9, 3.8 * len(present)),
                                 squeeze=False)
        for ax, name in zip(axes[:, 0], present, strict=True):
            res = results[name]
            m, r1, r2, tot = series(res, stride=1)   # 50 ms: sharper edges at the events
            ax.plot(m, tot, color="black", linewidth=1.4, label="total")
            ax.plot(m, r1, color="tab:blue", linewidth=1.1, label="wan1")
            ax.plot(m, r2, color="tab:red", linewidth=1.1, label="wan2")
            top = max(tot or [1]) * 1.3
            ax.set_ylim(0, top)
            markers(ax, res["events"], top)
            e0 = res.get("udp", {}).get("downlink", {}).get("events", [{}])[0]
            rec = e0.get("recovery_ms")
            ax.set_title(f"{name}: UDP {run_rate:.0f} pkt/s + TCP download; largest gap "
                         f"{e0.get('gap_ms')} ms, "
                         + (f"traffic back after {rec:.0f} ms, " if rec is not None
                            else "no outage >= 50 ms, ")
                         + f"{e0.get('lost')} datagrams lost", fontsize=9)
            ax.set_ylabel("received packets/s")
            ax.legend(loc="lower right", fontsize=8)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("time (s)")
        fig.tight_layout()
        out = png_dir / "failover.png"
        fig.savefig(out, dpi=120)
        plt.close(fig)
        written.append(str(out))
    return written


# -- main -----------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short runs for the CI smoke test")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated subset of {','.join(SCENARIOS)}")
    p.add_argument("--json", type=Path, default=RESULTS_DIR / "handover.json")
    p.add_argument("--png-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--workdir", type=Path, default=None,
                   help="daemon configs and logs (default: next to the JSON, <name>-lab)")
    p.add_argument("--shape", default="40mbit", help="tbf rate of each access network")
    args = p.parse_args(argv)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    bad = [s for s in args.scenarios if s not in SCENARIOS]
    if bad or not args.scenarios:
        p.error(f"unknown scenario {', '.join(bad) or '(none)'}; choose from "
                f"{', '.join(SCENARIOS)}")
    args.timing = QUICK if args.quick else FULL
    args.workdir = args.workdir or args.json.resolve().with_name(args.json.stem + "-lab")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("handover.py: needs root (network namespaces)", file=sys.stderr)
        return 2
    missing = tool_missing("ip", "nft", "tc", "curl", "ss")
    if not os.path.exists("/dev/net/tun"):
        missing.append("/dev/net/tun")
    if missing:
        print(f"handover.py: missing {', '.join(missing)} (apt-get install iproute2 nftables "
              "curl)", file=sys.stderr)
        return 2
    interruptible()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tm: Timing = args.timing
    notes: list[str] = []
    result: dict[str, Any] = {
        "meta": {"timestamp": dt.datetime.now().isoformat(timespec="seconds"),
                 "argv": sys.argv[1:] if argv is None else argv, "quick": args.quick,
                 "timing": vars(tm), "shape": args.shape, "rules": RULES,
                 "return_after": RETURN_AFTER,
                 "targets": TARGETS, "workdir": str(args.workdir),
                 "loadavg_start": loadavg(), "source_start": source_version()},
        "notes": notes, "scenarios": {}, "errors": [],
    }
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    interrupted = False
    tmp = Path(tempfile.mkdtemp(prefix="upmt-handover-"))
    try:
        for name in args.scenarios:
            extra = RETURN_AFTER if name in ("link-down", "silent-death") else ""
            print(f"scenario {name}{' (' + extra + ')' if extra else ''} ...", file=sys.stderr)
            www = tmp / name / "www"
            www.mkdir(parents=True)
            run = Run(name, args, tmp, extra)
            t_run = now()
            try:
                with run.up():
                    if name == "swap":
                        scenario_swap(run, www)
                    elif name == "udp-move":
                        scenario_udp_move(run, www)
                    else:
                        scenario_failover(run, www, name)
            except KeyboardInterrupt:
                interrupted = True
                run.error("interrupted")
            except (LabError, BenchError, subprocess.CalledProcessError) as e:
                detail = e.stderr.strip() if isinstance(e, subprocess.CalledProcessError) else ""
                run.error(f"{type(e).__name__}: {e} {detail}".strip())
            except Exception as e:
                run.error(f"{type(e).__name__}: {e}")
            run.res["seconds"] = round(now() - t_run, 1)
            result["scenarios"][name] = run.res
            result["errors"] += [f"[{name}] {m}" for m in run.res["errors"]]
            shutil.rmtree(tmp / name, ignore_errors=True)
            if interrupted:
                break
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    result["meta"]["loadavg_end"] = loadavg()
    result["meta"]["source_end"] = source_version()
    if result["meta"]["source_end"] != result["meta"]["source_start"]:
        result["meta"]["warning"] = "src/ changed during the run: scenarios ran different code"
    rows = table_rows(result["scenarios"])
    result["table"] = [dict(zip(HEADERS, r, strict=True)) for r in rows]
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    try:
        result["pngs"] = plot(result["scenarios"], args.png_dir, tm.udp_rate)
    except Exception as e:   # the numbers are saved; a plot that fails is one more error
        result["pngs"] = []
        result["errors"].append(f"plot: {type(e).__name__}: {e}")
    args.json.write_text(json.dumps(result, indent=1) + "\n")

    print(f"\nhandover scenarios ({'quick' if args.quick else 'full'} run; UDP "
          f"{tm.udp_rate:.0f} pkt/s x 200 B; access networks shaped to {args.shape})")
    print(render(HEADERS, rows))
    print("\ngap = largest UDP inter-arrival gap between the event and the next one (swap: "
          "longest TCP stall of either download), gap at = when it began after the event; "
          "recovery = event -> first datagram after that gap if it was an outage (>= 50 ms); "
          "moved = event -> the agent moved the flow (its history, +-50 ms; a move's includes "
          "the CLI's start-up); total<50% = time the total rx rate spent below half its "
          "pre-event level")
    for name, res in result["scenarios"].items():
        for f in res.get("flows", []):
            hist = "; ".join(f"{h['at_s']:.2f}s {h['from_if'] or '-'}->{h['to_if']} "
                             f"({h['reason']})" for h in f["history"])
            print(f"  [{name}] flow {f['rule']} {f['protocol']}/{f['dport']}: {hist}")
        for n in res.get("notes", []):
            print(f"  [{name}] note: {n}")
        for key, info in res.get("logs", {}).items():
            if info["trouble"]:
                print(f"  [{name}] {key}.log: {info['trouble']} warning/error lines, e.g. "
                      f"{info['first_trouble'][0][:140]}")
    for name, target in TARGETS.items():
        res = result["scenarios"].get(name)
        if not res or "udp" not in res:
            continue
        met = all(e.get("target_met", True) for u in res["udp"].values() for e in u["events"]
                  if "target_met" in e)
        print(f"target {name}: {target}: {'met' if met else 'NOT met'}")
    for n in notes:
        print(f"note: {n}")
    if "warning" in result["meta"]:
        print(f"WARNING: {result['meta']['warning']}")
    for png in result["pngs"]:
        print(f"wrote {png}")
    print(f"saved {args.json}")
    if interrupted:
        print("handover.py: interrupted", file=sys.stderr)
        return 130
    if result["errors"]:
        print(f"handover.py: {len(result['errors'])} error(s): "
              + " | ".join(result["errors"])[:600], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
