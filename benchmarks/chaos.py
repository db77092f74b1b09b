#!/usr/bin/env python3
"""Chaos soak: legacy streams through upmt_tun while links, NATs and daemons misbehave.

    python benchmarks/chaos.py [--seconds 600] [--quick] [--seed N] [--json PATH] [--png PATH]
                               [--workdir DIR] [--kinds flap,nat-flush,loss,...]

One :class:`upmt_tun.testbed.Topology` (MH with wan1/wan2 behind nat1/nat2, anchor, CH) and
one :class:`upmt_tun.lab.Lab` (the real ``upmt-anchor`` and ``upmt-agent``) for the whole run.
Two legacy streams run all the time (issue 13, item 4):

* **TCP**: ``curl`` on the MH downloads a random file from ``python3 -m http.server`` on the
  CH (port 8080, paced by htb on the CH at 10 Mbit/s, --quick 8); a download that ends
  normally is checked (size, sha256) and started again. 30 s without a byte end it with
  curl's exit 28 (a connection that never comes back). Every download that ends with an
  error is a failure: by the issue's goals no event of this script may break a TCP
  connection (a link flap leaves the other link, a NAT flush or loss only costs
  retransmissions, the VIpA survives an anchor restart, an agent restart keeps the flows
  the kernel tracks).
* **UDP downlink** (``streams.py``): the MH's receiver sends one hello, the CH then streams
  200 datagrams/s of 200 bytes with sequence numbers to where it came from, and the MH
  sends nothing more: a downlink-only flow. If nothing arrives for 12 s (longer than the
  agent's 10 s keepalive, which renews a NAT's mapping towards the anchor) the receiver
  asks again (every second), as an application with a liveness timeout would:
  without that a stream the tunnel never resumes would leave the rest of the run
  unmeasured. A recovery that needed such a re-hello is reported per event (it did not
  resume by itself).

Chaos events on a seeded random schedule (``--seed``; the kinds are dealt from a shuffled
deck, so each kind comes as often as the others and a short run still has every kind):

* ``flap``: wan1 or wan2 of the MH down for 0.5-3 s (``Topology.set_link``);
* ``nat-flush``: ``conntrack -F`` in nat1 or nat2: the NAT forgets every mapping;
* ``loss``: nat1 or nat2 drops P % (5-30) of what it forwards in both directions for 2-8 s
  (nftables ``numgen random mod 100 < P drop``). This kernel has no netem and nftables
  cannot delay a packet, so there is no reordering: drop only (a userspace NFQUEUE delayer
  would be needed, and is not here);
* ``anchor-restart``: SIGKILL the anchor, start it again with the same config 1 s later;
* ``agent-restart``: SIGUSR2 (a stop for a restart: what ``systemctl restart`` sends) or
  SIGKILL (chosen by the seed) the agent, start it again 1 s later; the new agent takes
  over what the old one left to hold its steered connections (its nft table, the steered
  mark's ip rule and table's blackhole) and removes the rest (its state file);
* **rekeys**: no control command forces a rekey and agent.py is not ours to change, so the
  agent runs with its rekey interval (``upmt_tun.link.REKEY_AFTER``, 120 s) lowered to
  ``--rekey-after`` s by a launcher (``python -c``, this file's AGENT_LAUNCHER): the agent's
  own timer renews the session during the run. Each new session while neither daemon
  restarted (the timer's, or a re-handshake after an outage) is found from the anchor's
  ``session_age_s`` going down and drawn as an event (``rekey``, not caused by a command).

Every second the sampler records the bytes of the TCP download, and of both daemons the
resident set (``/proc/PID/status`` VmRSS), the open descriptors (``/proc/PID/fd``) and the
asyncio tasks (``"tasks"`` of the control socket's status answer). UDP arrivals are counted
per second afterwards.

Verdict (exit 1, one line per reason): a resource grows without bound (see
:func:`growth`), a download ended with an error or the TCP stream was not flowing at the end,
the UDP stream was dead at the end or its sender failed, a daemon died by itself or did not
exit 0 when stopped, a stream stopped for longer than ``--max-gap`` s, or something was left
behind: the state of mh, an, nat1 and nat2 (ip rules, routes, links, addresses, nftables,
sysctls) after the daemons stopped must equal the state before they started, no process may
remain in those namespaces, and after the teardown no namespace of the run, no process
naming its directories and no ``/run/upmt-<prefix>`` may remain.

Results: a table on stdout, a JSON summary (default ``benchmarks/results/chaos.json``) and a
PNG (``chaos.png`` beside it): goodput of both streams, RSS, descriptors and tasks on one
time axis, events as labelled vertical marks. Exit 0: verdict ok; 1: a failure; 2: a tool
is missing; 130: interrupted. Only addresses inside the namespaces built here are contacted.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import datetime as dt
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import streams  # noqa: E402 (benchmarks/ dir)
from common import BenchError, interruptible, loadavg, render, rule_toml, source_version
from handover import sha_prefix, stop_proc, wait_port, write_random

from upmt_tun import control
from upmt_tun.lab import Lab, LabError, exe
from upmt_tun.testbed import Topology, host_state, tool_missing

CH = "203.0.113.100"
HTTP_PORT = 8080
UDP_PORT = 5004                 # CH side of the downlink
MH_UDP_PORT = 40004
UDP_SIZE = 200
KINDS = ("flap", "nat-flush", "loss", "anchor-restart", "agent-restart")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
STREAMS = str(Path(__file__).resolve().with_name("streams.py"))
PY = sys.executable
DAEMONS = {"agent": "agent", "anchor": "anchor0"}      # name -> Lab.procs key
STATE_ROLES = ("mh", "an", "nat1", "nat2")
RULES = (rule_toml("web", "tcp", dst=f"{CH}/32", dst_port=HTTP_PORT)
         + rule_toml("udp-down", "udp", dst=f"{CH}/32", dst_port=UDP_PORT))
AGENT_LAUNCHER = (
    "import sys\n"
    "import upmt_tun.link as link\n"
    "from upmt_tun.cli import agent_main\n"
    "if hasattr(link, 'REKEY_AFTER'):\n"
    "    link.REKEY_AFTER = float(sys.argv[1])\n"
    "else:\n"
    "    print('chaos: upmt_tun.link.REKEY_AFTER is gone: no forced rekeys', file=sys.stderr)\n"
    "sys.exit(agent_main(sys.argv[2:]))\n")


@dataclass
class Params:
    """What one run does; --quick shortens the gaps between events."""

    seconds: float
    lead_in: float          # undisturbed start
    tail: float             # undisturbed end: the last event's recovery is visible
    gap_min: float          # time between two events
    gap_max: float
    tcp_mbit: float
    file_s: float           # each download lasts about this long at tcp_mbit
    speed_time: int         # curl gives up after this long without a byte
    udp_rate: float
    rehello: float          # > the agent's keepalive_s (10 s), which renews NAT mappings
    rekey_after: float
    max_gap: float
    warmup: float           # resource samples this soon after a (re)start are not judged


def params(quick: bool, seconds: float | None) -> Params:
    if quick:
        return Params(seconds=seconds or 60.0, lead_in=5.0, tail=15.0, gap_min=4.0,
                      gap_max=7.0, tcp_mbit=8.0, file_s=20.0, speed_time=30, udp_rate=200.0,
                      rehello=12.0, rekey_after=8.0, max_gap=30.0, warmup=5.0)
    return Params(seconds=seconds or 600.0, lead_in=10.0, tail=20.0, gap_min=6.0,
                  gap_max=18.0, tcp_mbit=10.0, file_s=60.0, speed_time=30, udp_rate=200.0,
                  rehello=12.0, rekey_after=40.0, max_gap=30.0, warmup=10.0)


# -- the schedule (pure) --------------------------------------------------------------------

@dataclass
class Planned:
    t: float                          # seconds after the streams started
    kind: str
    args: dict[str, Any] = field(default_factory=dict)


def schedule(seed: int, p: Params, kinds: tuple[str, ...] = KINDS) -> list[Planned]:
    """The events of a run, from ``seed`` alone: the same seed gives the same run."""
    rng = random.Random(seed)
    out: list[Planned] = []
    deck: list[str] = []
    t = p.lead_in
    while t < p.seconds - p.tail:
        if not deck:
            deck = list(kinds)
            rng.shuffle(deck)
        kind = deck.pop()
        args: dict[str, Any] = {}
        if kind == "flap":
            args = {"iface": rng.choice(("wan1", "wan2")), "down_s": round(rng.uniform(0.5, 3), 2)}
        elif kind == "nat-flush":
            args = {"nat": rng.choice(("nat1", "nat2"))}
        elif kind == "loss":
            args = {"nat": rng.choice(("nat1", "nat2")), "pct": rng.randint(5, 30),
                    "for_s": round(rng.uniform(2, 8), 1)}
        elif kind == "agent-restart":
            args = {"signal": rng.choice(("USR2", "KILL"))}
        out.append(Planned(round(t, 2), kind, args))
        t += rng.uniform(p.gap_min, p.gap_max)
    return out


# -- resource growth (pure) ---------------------------------------------------------------------

LIMITS = {"rss_kb": (16 * 1024, 0.25), "fds": (8, 0.25), "tasks": (16, 0.5)}


def growth(samples: list[dict[str, Any]], metric: str, warmup: float) -> dict[str, Any]:
    """Whether ``metric`` of one daemon grows without bound over a run.

    ``samples``: {"t", "pid", metric} per second. A restart gives a new process that starts
    low again, and a young process grows while it warms up (imports, handshakes, heap), so
    only samples at least ``warmup`` s after their process started are judged. Rule: the
    largest value of the last quarter of the run (by time) may exceed the largest of the
    first quarter by at most max(absolute, relative x first) (:data:`LIMITS`): a level that
    keeps rising fails, one that went up and stays flat passes, a restart only lowers values.
    Restarts can hide a slow leak (each process is young), so each process that lived at
    least half the run is also judged alone the same way (quarters of its own life)."""
    absolute, relative = LIMITS[metric]
    born: dict[int, float] = {}
    for s in samples:
        if s.get("pid") is not None:
            born.setdefault(s["pid"], s["t"])
    warm = [s for s in samples if s.get(metric) is not None and s.get("pid") is not None
            and s["t"] - born[s["pid"]] >= warmup]
    res: dict[str, Any] = {"metric": metric, "samples": len(warm), "ok": True}
    if len(warm) < 8:
        res["note"] = "too few samples to judge"
        return res

    def quarters(rows: list[dict[str, Any]]) -> tuple[float, float]:
        t0, t1 = rows[0]["t"], rows[-1]["t"]
        q = (t1 - t0) / 4
        first = [r[metric] for r in rows if r["t"] <= t0 + q] or [rows[0][metric]]
        last = [r[metric] for r in rows if r["t"] >= t1 - q] or [rows[-1][metric]]
        return float(max(first)), float(max(last))

    first, last = quarters(warm)
    allowed = max(absolute, relative * first)
    res.update(first_quarter_max=first, last_quarter_max=last, allowed_growth=allowed)
    if last - first > allowed:
        res["ok"] = False
        res["why"] = f"last quarter max {last:.0f} > first quarter max {first:.0f} + {allowed:.0f}"
    span = warm[-1]["t"] - warm[0]["t"]
    for pid in born:
        rows = [s for s in warm if s["pid"] == pid]
        if len(rows) >= 8 and rows[-1]["t"] - rows[0]["t"] >= span / 2:
            f, la = quarters(rows)
            if la - f > max(absolute, relative * f):
                res["ok"] = False
                res["why"] = (f"process {pid} alone: last quarter max {la:.0f} > first "
                              f"quarter max {f:.0f} + {max(absolute, relative * f):.0f}")
    return res


# -- helpers ------------------------------------------------------------------------------------

def now() -> float:
    return time.monotonic()


def diff_state(before: dict[str, str], after: dict[str, str]) -> list[str]:
    out = []
    for k in before:
        b, a = set(before[k].splitlines()), set(after.get(k, "").splitlines())
        for line in sorted(a - b):
            out.append(f"{k} +{line.strip()[:120]}")
        for line in sorted(b - a):
            out.append(f"{k} -{line.strip()[:120]}")
    return out


def proc_rss_fds(pid: int) -> tuple[int | None, int | None]:
    rss = fds = None
    with contextlib.suppress(OSError, ValueError):
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                    break
    with contextlib.suppress(OSError):
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    return rss, fds


def pids_naming(*needles: str) -> list[str]:
    """Processes whose command line contains one of ``needles``: what a run left running."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(n in cmd for n in needles):
            found.append(f"{d} {cmd[:160]}")
    return found


class ChaosLab(Lab):
    """A Lab whose agent runs through AGENT_LAUNCHER (rekeys every ``rekey_after`` s) and
    whose daemons can be killed and started again, their earlier logs kept."""

    def __init__(self, topo: Topology, workdir: Path, rekey_after: float) -> None:
        super().__init__(topo, workdir, rules=RULES)
        self.rekey_after = rekey_after
        self.cfg_anchor: Path | None = None
        self.cfg_agent: Path | None = None
        self.generation: dict[str, int] = {"agent": 0, "anchor0": 0}

    def argv(self, key: str) -> list[str]:
        if key == "agent":
            return [PY, "-c", AGENT_LAUNCHER, str(self.rekey_after), "up", "--config",
                    str(self.cfg_agent)]
        return [*exe("upmt-anchor"), "--config", str(self.cfg_anchor)]

    def start(self) -> ChaosLab:
        anchors, self.cfg_agent = self.write_configs()
        self.cfg_anchor = anchors[0]
        try:
            self._start("anchor0", "an", self.argv("anchor0"))
            self._start("agent", "mh", self.argv("agent"))
        except BaseException:
            self.stop()
            raise
        return self

    def restart(self, key: str, sig: int, pause: float = 1.0) -> dict[str, Any]:
        """Signal ``key``'s process, wait for its end, ``pause``, start it again (until it
        prints ready). Its log so far is kept as ``<key>.<n>.log``."""
        p = self.procs[key]
        t_kill = now()
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(sig)
        try:
            code = p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            code = p.wait(5)
        t_dead = now()
        self.generation[key] += 1
        log = self.dir / f"{key}.log"
        with contextlib.suppress(OSError):
            log.rename(self.dir / f"{key}.{self.generation[key]}.log")
        time.sleep(max(0.0, t_dead + pause - now()))
        role = "mh" if key == "agent" else "an"
        t_start = now()
        self._start(key, role, self.argv(key))
        return {"old_exit": code, "dead_after_s": round(t_dead - t_kill, 3),
                "ready_after_s": round(now() - t_start, 3), "pid": self.procs[key].pid}

    def control_path(self, key: str) -> str:
        return self.agent_control if key == "agent" else self.anchor_control(0)


# -- the streams -------------------------------------------------------------------------------

class Download:
    """The TCP stream: curl downloads again and again; each run's end is recorded."""

    def __init__(self, topo: Topology, tmp: Path, src: Path, sha: str, p: Params,
                 clock0: float) -> None:
        self.topo, self.tmp, self.src, self.sha = topo, tmp, src, sha
        self.p, self.clock0 = p, clock0
        self.size = src.stat().st_size
        self.runs: list[dict[str, Any]] = []
        self.fine: list[tuple[float, int]] = []     # (monotonic, bytes so far) every 0.1 s
        self.done_bytes = 0
        self.current: Path | None = None
        self.proc: subprocess.Popen[str] | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> Download:
        self._thread.start()
        return self

    def bytes(self) -> int:
        with self._lock:
            cur = self.current
            done = self.done_bytes
        size = 0
        if cur is not None:
            with contextlib.suppress(OSError):
                size = cur.stat().st_size
        return done + size

    def _loop(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            out = self.tmp / f"dl-{n % 2}.bin"
            with contextlib.suppress(OSError):
                out.unlink()
            t0 = now()
            proc = self.topo.popen(
                "mh", "curl", "-sS", "-o", str(out), "-w", "%{http_code}",
                "--speed-limit", "1", "--speed-time", str(self.p.speed_time),
                f"http://{CH}:{HTTP_PORT}/file.bin",
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            with self._lock:
                self.current, self.proc = out, proc
            while proc.poll() is None and not self._stop.is_set():
                time.sleep(0.1)
                self.fine.append((now(), self.bytes()))
            stopped = self._stop.is_set() and proc.poll() is None
            code = stop_proc(proc)
            stdout, stderr = proc.communicate()
            size = out.stat().st_size if out.exists() else 0
            run: dict[str, Any] = {"n": n, "t_start": round(t0 - self.clock0, 3),
                                   "t_end": round(now() - self.clock0, 3), "bytes": size,
                                   "curl_exit": None if stopped else code,
                                   "http_code": stdout.strip(), "stopped_by_us": stopped}
            if stderr.strip():
                run["curl_stderr"] = stderr.strip()[-300:]
            if stopped:   # the end of the run: what came so far must be the file's start
                run["intact"] = size == 0 or sha_prefix(out, size) == sha_prefix(self.src, size)
            else:
                run["intact"] = (code == 0 and stdout.strip() == "200" and size == self.size
                                 and sha_prefix(out, size) == self.sha)
            self.runs.append(run)
            with self._lock:
                self.done_bytes += size
                self.current = None
            with contextlib.suppress(OSError):
                out.unlink()
            if not stopped and code != 0:
                self._stop.wait(1.0)     # an error: start again, but not in a tight loop

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(20)


class Sampler:
    """Every second: TCP bytes so far; RSS, descriptors and asyncio tasks of both daemons;
    the anchor's session age (a rekey makes it go down)."""

    def __init__(self, lab: ChaosLab, dl: Download, clock0: float) -> None:
        self.lab, self.dl, self.clock0 = lab, dl, clock0
        self.rows: list[dict[str, Any]] = []
        self.restarting: set[str] = set()
        self.died: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _loop(self) -> None:
        k = 0
        while not self._stop.is_set():
            t = now()
            row: dict[str, Any] = {"t": round(t - self.clock0, 3), "tcp_bytes": self.dl.bytes()}
            for name, key in DAEMONS.items():
                d: dict[str, Any] = {"pid": None, "rss_kb": None, "fds": None, "tasks": None}
                p = self.lab.procs.get(key)
                if p is not None and p.poll() is None:
                    d["pid"] = p.pid
                    d["rss_kb"], d["fds"] = proc_rss_fds(p.pid)
                    try:
                        st = control.request(self.lab.control_path(key), {"cmd": "status"},
                                             timeout=1.0).get("status", {})
                        d["tasks"] = st.get("tasks")
                        if name == "anchor":
                            d["sessions"] = [a.get("session_age_s")
                                             for a in st.get("associations", [])]
                            d["flows"] = len(st.get("flows", []))
                        else:
                            d["anchor_state"] = [a.get("state") for a in st.get("anchors", [])]
                            d["flows"] = len(st.get("flows", []))
                    except (control.ControlError, OSError, ValueError):
                        pass
                elif p is not None and key not in self.restarting:
                    msg = f"{name} died by itself (exit {p.returncode}) at {row['t']:.0f} s"
                    if msg not in self.died and not any(m.startswith(f"{name} died")
                                                        for m in self.died):
                        self.died.append(msg)
                row[name] = d
            self.rows.append(row)
            k += 1
            self._stop.wait(max(0.0, self.clock0 + k - now()))


def udp_stream(topo: Topology, tmp: Path, p: Params) -> tuple[
        subprocess.Popen[Any], subprocess.Popen[Any], Path, Path]:
    snd, rcv = tmp / "udp-send.json", tmp / "udp-recv.json"
    ps = topo.popen("ch", PY, STREAMS, "udp-send", "--bind", f"0.0.0.0:{UDP_PORT}", "--follow",
                    "--rate", str(p.udp_rate), "--size", str(UDP_SIZE), "--out", str(snd),
                    stdout=subprocess.DEVNULL, stderr=open(tmp / "udp-send.err", "w"))
    wait_port(topo, "ch", "udp", UDP_PORT)
    pr = topo.popen("mh", PY, STREAMS, "udp-recv", "--bind", f"0.0.0.0:{MH_UDP_PORT}",
                    "--hello", f"{CH}:{UDP_PORT}", "--rehello", str(p.rehello),
                    "--out", str(rcv), stdout=subprocess.DEVNULL,
                    stderr=open(tmp / "udp-recv.err", "w"))
    return ps, pr, snd, rcv


def pace(topo: Topology, mbit: float) -> None:
    """What leaves the CH's TCP port 8080 goes at ``mbit`` (htb; as handover.py paces)."""
    cmds = [["qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default", "99",
             "r2q", "100"],
            ["class", "add", "dev", "eth0", "parent", "1:", "classid", "1:99", "htb", "rate",
             "10gbit"],
            ["class", "add", "dev", "eth0", "parent", "1:", "classid", "1:1", "htb", "rate",
             f"{mbit}mbit", "ceil", f"{mbit}mbit"],
            ["qdisc", "add", "dev", "eth0", "parent", "1:1", "pfifo", "limit", "100"],
            ["filter", "add", "dev", "eth0", "parent", "1:", "protocol", "ip", "prio", "1", "u32",
             "match", "ip", "sport", str(HTTP_PORT), "0xffff", "flowid", "1:1"]]
    for c in cmds:
        r = topo.run("ch", "tc", *c, check=False)
        if r.returncode != 0:
            raise BenchError(f"tc {' '.join(c)} in ch: {r.stderr.strip()}")


# -- the run ------------------------------------------------------------------------------------

class Chaos:
    """Carries out the planned events (timers for the ends of flaps and losses)."""

    def __init__(self, topo: Topology, lab: ChaosLab, sampler: Sampler, clock0: float) -> None:
        self.topo, self.lab, self.sampler, self.clock0 = topo, lab, sampler, clock0
        self.events: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.down: set[str] = set()
        self.lossy: set[str] = set()
        self.timers: list[threading.Timer] = []
        self.lock = threading.Lock()

    def rel(self, t: float) -> float:
        return round(t - self.clock0, 3)

    def record(self, t: float, kind: str, label: str, **extra: Any) -> dict[str, Any]:
        ev = {"t": self.rel(t), "kind": kind, "label": label, **extra}
        with self.lock:
            self.events.append(ev)
        return ev

    def later(self, delay: float, fn: Callable[[], None]) -> None:
        tm = threading.Timer(delay, fn)
        tm.daemon = True
        self.timers.append(tm)
        tm.start()

    def do(self, ev: Planned) -> None:
        t = now()
        a = ev.args
        if ev.kind == "flap":
            iface = a["iface"] if a["iface"] not in self.down else \
                ({"wan1", "wan2"} - self.down or {a["iface"]}).pop()
            if iface in self.down:
                self.record(t, "skipped", f"flap {iface}: already down")
                return
            self.topo.set_link("mh", iface, False)
            self.down.add(iface)
            e = self.record(t, "flap", f"{iface} down {a['down_s']}s", iface=iface,
                            down_s=a["down_s"])

            def up() -> None:
                try:
                    self.topo.set_link("mh", iface, True)
                    # the kernel dropped the main table's default route with the link; a
                    # host's DHCP client or network manager puts it back (the agent
                    # re-makes only its own table)
                    n = 1 + ("wan1", "wan2").index(iface)
                    self.topo.run("mh", "ip", "route", "replace", "default", "via",
                                  self.topo.access[iface][1], "dev", iface, "metric",
                                  str(100 * n))
                except Exception as ex:   # the run goes on; the verdict says it
                    self.errors.append(f"link up {iface}: {ex}")
                e["up_t"] = self.rel(now())
                self.down.discard(iface)
            self.later(a["down_s"], up)
        elif ev.kind == "nat-flush":
            r = self.topo.run(a["nat"], "conntrack", "-F", check=False)
            self.record(t, "nat-flush", f"{a['nat']} conntrack -F", nat=a["nat"],
                        ok=r.returncode == 0, output=(r.stderr or r.stdout).strip()[-200:])
        elif ev.kind == "loss":
            nat = a["nat"] if a["nat"] not in self.lossy else \
                ({"nat1", "nat2"} - self.lossy or {a["nat"]}).pop()
            if nat in self.lossy:
                self.record(t, "skipped", f"loss {nat}: already lossy")
                return
            self.topo.run(nat, "nft", "-f", "-", input=(
                "table ip chaos_loss {\n  chain lossy {\n"
                "    type filter hook forward priority -5; policy accept;\n"
                f"    numgen random mod 100 < {a['pct']} drop\n  }}\n}}\n").encode())
            self.lossy.add(nat)
            e = self.record(t, "loss", f"{nat} {a['pct']}% loss {a['for_s']}s", nat=nat,
                            pct=a["pct"], for_s=a["for_s"])

            def clear() -> None:
                r = self.topo.run(nat, "nft", "delete", "table", "ip", "chaos_loss", check=False)
                if r.returncode != 0:
                    self.errors.append(f"nft delete chaos_loss in {nat}: {r.stderr.strip()}")
                e["end_t"] = self.rel(now())
                self.lossy.discard(nat)
            self.later(a["for_s"], clear)
        elif ev.kind in ("anchor-restart", "agent-restart"):
            key = "anchor0" if ev.kind == "anchor-restart" else "agent"
            sig = "KILL" if key == "anchor0" else a["signal"]
            self.sampler.restarting.add(key)
            try:
                info = self.lab.restart(key, signal.Signals[f"SIG{sig}"])
            finally:
                self.sampler.restarting.discard(key)
            self.record(t, ev.kind, f"{'anchor' if key == 'anchor0' else 'agent'} "
                        f"SIG{sig}+start", signal=sig, back_t=self.rel(now()), **info)
        else:
            raise BenchError(f"unknown event kind {ev.kind}")

    def settle(self) -> None:
        """Let pending link-ups and loss removals happen now."""
        for tm in self.timers:
            if tm.is_alive():
                tm.cancel()
                tm.function()   # type: ignore[attr-defined]
        self.timers.clear()


def run(args: argparse.Namespace) -> dict[str, Any]:
    p: Params = args.params
    plan = schedule(args.seed, p, args.kinds)
    res: dict[str, Any] = {"plan": [asdict(e) for e in plan], "errors": [], "notes": []}
    tmp = Path(tempfile.mkdtemp(prefix="upmt-chaos-"))
    workdir: Path = args.workdir
    if workdir.exists():
        shutil.rmtree(workdir)
    topo = Topology()
    lab: ChaosLab | None = None
    procs: list[subprocess.Popen[Any]] = []
    dl: Download | None = None
    sampler: Sampler | None = None
    chaos: Chaos | None = None
    before: dict[str, dict[str, str]] = {}
    udp_files: tuple[Path, Path] | None = None
    interrupted = False
    try:
        topo.up()
        res["topology_prefix"] = topo.prefix
        before = {r: host_state(topo, r) for r in STATE_ROLES}
        www = tmp / "www"
        www.mkdir()
        src = www / "file.bin"
        sha = write_random(src, int(p.tcp_mbit * 1e6 / 8 * p.file_s))
        pace(topo, p.tcp_mbit)
        procs.append(topo.popen("ch", PY, "-m", "http.server", str(HTTP_PORT), "--bind",
                                "0.0.0.0", "--directory", str(www), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL))
        wait_port(topo, "ch", "tcp", HTTP_PORT)
        lab = ChaosLab(topo, workdir, p.rekey_after).start()
        clock0 = now()
        res["clock0"] = clock0
        dl = Download(topo, tmp, src, sha, p, clock0).start()
        ps, pr, snd, rcv = udp_stream(topo, tmp, p)
        procs += [ps, pr]
        udp_files = (snd, rcv)
        sampler = Sampler(lab, dl, clock0).start()
        chaos = Chaos(topo, lab, sampler, clock0)
        for ev in plan:
            time.sleep(max(0.0, clock0 + ev.t - now()))
            try:
                chaos.do(ev)
            except (LabError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
                chaos.errors.append(f"{ev.kind} at {ev.t:.0f} s: {type(e).__name__}: {e}")
                if isinstance(e, LabError):
                    break          # a daemon that does not come back: no point going on
        time.sleep(max(0.0, clock0 + p.seconds - now()))
    except KeyboardInterrupt:
        interrupted = True
        res["errors"].append("interrupted")
    except (LabError, BenchError, subprocess.CalledProcessError, OSError) as e:
        detail = e.stderr.strip() if isinstance(e, subprocess.CalledProcessError) else ""
        res["errors"].append(f"{type(e).__name__}: {e} {detail}".strip()[:800])
    finally:
        if chaos is not None:
            chaos.settle()
        t_end = now()
        if sampler is not None:
            sampler.stop()
        if dl is not None:
            dl.stop()
        for proc in procs[1:]:          # the UDP sender first, then (in flight landed) the rest
            stop_proc(proc)
            time.sleep(0.2)
        if procs:
            stop_proc(procs[0])
        if lab is not None:
            try:
                res["exit_codes"] = lab.stop()
            except Exception as e:
                res["errors"].append(f"lab.stop: {e!r}")
        res["leftovers"] = leftovers(topo, before, lab) if before else []
        topo.down()
        gone = gone_check(topo, tmp, workdir)
        res["leftovers"] += gone
    res["interrupted"] = interrupted
    if chaos is not None and sampler is not None and dl is not None:
        clock0 = res["clock0"]
        res["events"] = sorted(chaos.events, key=lambda e: e["t"])
        res["errors"] += chaos.errors
        res["daemon_deaths"] = sampler.died
        res["samples"] = sampler.rows
        res["tcp_runs"] = dl.runs
        res["tcp_fine"] = dl.fine
        res["t_end"] = round(t_end - clock0, 3)
        if udp_files is not None:
            try:
                sent = streams_json(udp_files[0])
                got = streams_json(udp_files[1])
                res["udp_raw"] = (sent, got)
            except BenchError as e:
                res["errors"].append(str(e))
    shutil.rmtree(tmp, ignore_errors=True)
    return res


def streams_json(path: Path) -> dict[str, Any]:
    deadline = now() + 5
    while not path.exists() and now() < deadline:
        time.sleep(0.05)
    if not path.exists():
        raise BenchError(f"{path.name} was not written")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def leftovers(topo: Topology, before: dict[str, dict[str, str]], lab: Lab | None) -> list[str]:
    """After the daemons stopped: each namespace as before they started, nobody left in it."""
    out = []
    for role, state in before.items():
        try:
            after = host_state(topo, role)
        except Exception as e:
            out.append(f"{role}: state unreadable: {e}")
            continue
        out += [f"{role}: {d}" for d in diff_state(state, after)]
        pids = subprocess.run(["ip", "netns", "pids", topo.ns(role)], capture_output=True,
                              text=True, timeout=10).stdout.split()
        pids = [x for x in pids if x.isdigit() and int(x) != os.getpid()]
        if pids:
            out.append(f"{role}: processes left: {' '.join(pids)}")
    if lab is not None and lab.run_dir.exists():
        out.append(f"{lab.run_dir} left")
    return out


def gone_check(topo: Topology, tmp: Path, workdir: Path) -> list[str]:
    """After the teardown: no namespace, no process, no run directory of this run."""
    out = []
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    left = [ln.split()[0] for ln in ns.splitlines() if ln.startswith(topo.prefix + "-")]
    if left:
        out.append(f"namespaces left: {' '.join(left)}")
    procs = pids_naming(str(tmp), str(workdir), f"upmt-{topo.prefix}")
    out += [f"process left: {x}" for x in procs]
    if Path(f"/run/upmt-{topo.prefix}").exists():
        out.append(f"/run/upmt-{topo.prefix} left")
    return out


# -- analysis -----------------------------------------------------------------------------------

GAP_SLACK = 0.1       # a gap that began this long before an event's command is its own
TCP_STALL_S = 0.5     # the download's bytes are polled every 0.1 s: a stall is 5 polls


def gap_from(times: list[float], t0: float, t1: float) -> tuple[float, float | None]:
    """The longest interval between consecutive ``times`` (sorted) that *begins* in
    [t0, t1), and when it ended: the outage an event caused, not one still running from the
    event before. (0.0, None) when no interval begins there."""
    i = bisect.bisect_left(times, t0)
    best, end = 0.0, None
    while i + 1 < len(times) and times[i] < t1:
        g = times[i + 1] - times[i]
        if g > best:
            best, end = g, times[i + 1]
        i += 1
    return best, end


EFFECT_S = 2.0        # an outage that begins later than this after an event's own time is not its


def effect_end(e: dict[str, Any], next_t: float) -> float:
    """Until when an outage that begins may be blamed on event ``e`` (relative times):
    its own time (a link down, a loss burst, a restart until the new daemon was ready)
    plus :data:`EFFECT_S`, and not after the next event. Without this bound, a hiccup
    of 50 ms many seconds later (a rekey) was reported as the event's recovery time."""
    own = e.get("down_s") or e.get("for_s") or max(0.0, e.get("back_t", e["t"]) - e["t"])
    return min(next_t, e["t"] + own + EFFECT_S)


def analyse(res: dict[str, Any], p: Params) -> dict[str, Any]:
    """Per-second goodput, per-event recovery, resources, verdict."""
    clock0 = res.get("clock0", 0.0)
    rows = res.get("samples", [])
    events = res.get("events", [])
    out: dict[str, Any] = {}
    # rekeys: the anchor's session got younger while neither daemon restarted (the agent's
    # timer, or a re-handshake after an outage: both are new sessions under load)
    rekeys = []
    for a, b in zip(rows, rows[1:], strict=False):
        sa, sb = a["anchor"].get("sessions"), b["anchor"].get("sessions")
        same = (a["anchor"]["pid"] == b["anchor"]["pid"] and a["agent"]["pid"] == b["agent"]["pid"]
                and a["anchor"]["pid"] is not None)
        if same and sa and sb and sa[0] is not None and sb[0] is not None and sb[0] < sa[0]:
            rekeys.append({"t": round(b["t"] - sb[0], 3), "kind": "rekey",
                           "label": f"new session (old one {sa[0]:.0f} s)", "derived": True})
    out["rekeys"] = rekeys
    chaos_events = [e for e in events if e["kind"] != "skipped"]
    # TCP goodput per second
    tcp = []
    for a, b in zip(rows, rows[1:], strict=False):
        dt_ = b["t"] - a["t"]
        if dt_ > 0:
            tcp.append([b["t"], round((b["tcp_bytes"] - a["tcp_bytes"]) * 8 / dt_ / 1e6, 4)])
    out["tcp_mbit"] = tcp
    fine = res.get("tcp_fine", [])
    grew = [t for i, (t, b) in enumerate(fine) if i == 0 or b > fine[i - 1][1]]
    t_end_abs = clock0 + res.get("t_end", rows[-1]["t"] if rows else 0.0)
    # UDP
    sent, got = res.get("udp_raw", ({}, {}))
    ev_abs = [(f"{e['kind']}@{e['t']:.1f}", e["t"] + clock0) for e in chaos_events]
    udp = streams.udp_analysis(got, sent, ev_abs) if got else {"events": []}
    arr = got.get("arrival", []) if got else []
    per_s: dict[int, int] = {}
    for t in arr:
        per_s[int(t - clock0)] = per_s.get(int(t - clock0), 0) + 1
    horizon = int(res.get("t_end", 0)) + 1
    out["udp_pps"] = [[s + 1, per_s.get(s, 0)] for s in range(horizon)]
    hello_at = [t - clock0 for t in (got.get("hello_at", []) if got else [])]
    out["udp"] = {k: v for k, v in udp.items() if k != "events"}
    out["udp"]["rehellos"] = [round(t, 3) for t in hello_at if t > 1.0]
    out["udp"]["dst_changes"] = sent.get("dst_changes", []) if sent else []
    # per event: UDP gap / recovery, TCP stall, and whether the UDP needed a re-hello
    per_event = []
    for k, e in enumerate(chaos_events):
        te = e["t"] + clock0
        tw = effect_end(e, chaos_events[k + 1]["t"] if k + 1 < len(chaos_events)
                        else t_end_abs - clock0) + clock0
        u = udp["events"][k] if k < len(udp["events"]) else {}
        gap, end = gap_from(arr, te - GAP_SLACK, tw - GAP_SLACK)
        rec = round((end - te) * 1000) if end is not None and gap >= streams.OUTAGE_S else None
        needed = bool(rec is not None and any(e["t"] < h < e["t"] + rec / 1000
                                              for h in hello_at))
        st, st_end = gap_from(grew, te - GAP_SLACK, tw - GAP_SLACK)
        per_event.append({
            "t": e["t"], "kind": e["kind"], "label": e["label"],
            "udp_gap_ms": round(gap * 1000, 1), "udp_recovery_ms": rec,
            "udp_lost": u.get("lost"), "udp_received_after": u.get("received_after"),
            "udp_needed_rehello": needed,
            "tcp_stall_ms": round(st * 1000),
            "tcp_recovery_ms": round((st_end - te) * 1000)
            if st_end is not None and st >= TCP_STALL_S else None})
    out["per_event"] = per_event
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in sorted({e["kind"] for e in per_event}):
        evs = [e for e in per_event if e["kind"] == kind]
        udp_rec = [e["udp_recovery_ms"] or 0.0 for e in evs]
        tcp_st = [e["tcp_recovery_ms"] or 0 for e in evs]
        by_kind[kind] = {"count": len(evs),
                         "udp_gap_ms_median": statistics.median(udp_rec) if udp_rec else None,
                         "udp_gap_ms_max": max(udp_rec) if udp_rec else None,
                         "tcp_stall_ms_median": statistics.median(tcp_st) if tcp_st else None,
                         "tcp_stall_ms_max": max(tcp_st) if tcp_st else None,
                         "udp_needed_rehello": sum(e["udp_needed_rehello"] for e in evs)}
    out["recovery_by_kind"] = by_kind
    # resources
    resources: dict[str, Any] = {}
    for name in DAEMONS:
        srows = [{"t": r["t"], **r[name]} for r in rows]
        live = [r for r in srows if r["pid"] is not None]
        pids = list(dict.fromkeys(r["pid"] for r in live))
        resources[name] = {
            "processes": len(pids),
            "start": {m: next((r[m] for r in live if r[m] is not None), None)
                      for m in ("rss_kb", "fds", "tasks")},
            "end": {m: next((r[m] for r in reversed(live) if r[m] is not None), None)
                    for m in ("rss_kb", "fds", "tasks")},
            "max": {m: max((r[m] for r in live if r[m] is not None), default=None)
                    for m in ("rss_kb", "fds", "tasks")},
            "growth": {m: growth(srows, m, p.warmup) for m in ("rss_kb", "fds", "tasks")},
        }
    out["resources"] = resources
    out["verdict"] = verdict(res, out, p)
    return out


def verdict(res: dict[str, Any], an: dict[str, Any], p: Params) -> dict[str, Any]:
    fails: list[dict[str, Any]] = []

    def fail(reason: str) -> None:
        fails.append({"reason": reason})

    for e in res.get("errors", []):
        fail(f"run error: {e}")
    for name, r in an.get("resources", {}).items():
        for m, g in r["growth"].items():
            if not g["ok"]:
                fail(f"{name} {m} grows without bound: {g['why']}")
    for d in res.get("daemon_deaths", []):
        fail(d)
    for key, code in (res.get("exit_codes") or {}).items():
        if code != 0:
            fail(f"{key} exit code {code} when stopped")
    fine = res.get("tcp_fine", [])
    clock0 = res.get("clock0", 0.0)

    def stalled_since(t_end: float) -> float:
        """When the download ending at ``t_end`` got its last byte (the stall's start)."""
        grew = [t - clock0 for i, (t, b) in enumerate(fine)
                if i and b > fine[i - 1][1] and t - clock0 <= t_end]
        return grew[-1] if grew else t_end

    for run_ in res.get("tcp_runs", []):
        if run_["stopped_by_us"]:
            if not run_["intact"]:
                fail(f"tcp download {run_['n']}: bytes received differ from the file")
            continue
        if run_["curl_exit"] != 0 or not run_["intact"]:
            after = [e for e in res.get("events", []) if e["t"] <= run_["t_end"]]
            last = f" (last event before: {after[-1]['label']} at {after[-1]['t']:.1f} s)" \
                if after else ""
            # the stall's start: what came before the download's last byte caused it
            t_fail = stalled_since(run_["t_end"]) if fine else \
                run_["t_end"] - (p.speed_time if run_["curl_exit"] == 28 else 0)
            stalled = f" (stalled since {t_fail:.1f} s)" if t_fail < run_["t_end"] - 1 else ""
            fail(f"tcp download {run_['n']} ended with curl exit {run_['curl_exit']} at "
                 f"{run_['t_end']:.1f} s{last}{stalled}: "
                 f"{run_.get('curl_stderr', '')[:120]}")
    tcp = an.get("tcp_mbit", [])
    tail = [v for t, v in tcp if t >= res.get("t_end", 0) - 5]
    if tcp and not any(v > 0 for v in tail):
        fail("tcp: no byte in the last 5 s of the run")
    if not res.get("udp_raw"):
        fail("udp: no record of the stream")
    else:
        sent, got = res["udp_raw"]
        if sent.get("error"):
            fail(f"udp sender: {sent['error']}")
        arr = got.get("arrival", [])
        t_stop = res.get("clock0", 0.0) + res.get("t_end", 0.0)
        if not arr or arr[-1] < t_stop - 5:
            fail("udp: nothing arrived in the last 5 s of the run")
    for e in an.get("per_event", []):
        for what, gap in (("udp", e["udp_recovery_ms"]), ("tcp", e["tcp_recovery_ms"])):
            if (gap or 0) > p.max_gap * 1000:
                fail(f"{what} stopped for {gap / 1000:.1f} s after {e['label']} at "
                     f"{e['t']:.1f} s")
        if e["udp_needed_rehello"]:
            fail(f"udp downlink did not resume by itself after {e['label']} at {e['t']:.1f} s "
                 f"(back {e['udp_recovery_ms'] / 1000:.1f} s later, after the application "
                 "sent again)")
    for x in res.get("leftovers", []):
        fail(f"leftover: {x}")
    return {"ok": not fails, "failures": fails}


# -- output -------------------------------------------------------------------------------------

def plot(res: dict[str, Any], an: dict[str, Any], png: Path, title: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib)", file=sys.stderr)
        return None
    rows = res.get("samples", [])
    fig, axes = plt.subplots(4, 1, figsize=(11, 8.5), sharex=True,
                             gridspec_kw={"height_ratios": [3, 2, 2, 2]})
    ax_tcp, ax_udp, ax_rss, ax_fd = axes
    if an.get("tcp_mbit"):
        t, v = zip(*an["tcp_mbit"], strict=True)
        ax_tcp.plot(t, v, color="tab:blue", linewidth=1, label="TCP download")
    ax_tcp.set_ylabel("TCP Mbit/s")
    if an.get("udp_pps"):
        t, v = zip(*an["udp_pps"], strict=True)
        ax_udp.plot(t, v, color="tab:green", linewidth=1, label="UDP downlink")
    for h in an.get("udp", {}).get("rehellos", []):
        ax_udp.plot([h], [0], marker="^", color="tab:red", markersize=4)
    ax_udp.set_ylabel("UDP datagrams/s")
    colours = {"agent": "tab:purple", "anchor": "tab:orange"}
    for name, c in colours.items():
        pts = [(r["t"], r[name]["rss_kb"] / 1024) for r in rows if r[name]["rss_kb"]]
        if pts:
            ax_rss.plot(*zip(*pts, strict=True), color=c, linewidth=1, label=f"{name} RSS")
        fd = [(r["t"], r[name]["fds"]) for r in rows if r[name]["fds"] is not None]
        if fd:
            ax_fd.plot(*zip(*fd, strict=True), color=c, linewidth=1, label=f"{name} fds")
        tk = [(r["t"], r[name]["tasks"]) for r in rows if r[name]["tasks"] is not None]
        if tk:
            ax_fd.plot(*zip(*tk, strict=True), color=c, linewidth=1, linestyle="--",
                       label=f"{name} asyncio tasks")
    ax_rss.set_ylabel("RSS MiB")
    ax_fd.set_ylabel("count")
    ax_fd.set_xlabel("time (s)")
    colour = {"flap": "tab:blue", "nat-flush": "tab:cyan", "loss": "tab:olive",
              "anchor-restart": "tab:red", "agent-restart": "tab:purple", "rekey": "0.6"}
    top = max([v for _, v in an.get("tcp_mbit", [])] or [1]) * 1.6
    ax_tcp.set_ylim(0, top)
    evs = [e for e in res.get("events", []) if e["kind"] != "skipped"] + an.get("rekeys", [])
    long_run = (res.get("t_end") or 0) > 120
    for k, e in enumerate(sorted(evs, key=lambda e: e["t"])):
        for ax in axes:
            ax.axvline(e["t"], color=colour.get(e["kind"], "0.3"), linewidth=0.6 if long_run
                       else 0.8, linestyle=":" if e.get("derived") else "--", alpha=0.8)
        if long_run:      # many events: short upright labels, none for the rekeys
            if not e.get("derived"):
                ax_tcp.text(e["t"], top * 0.99, e["kind"], fontsize=5, rotation=90, va="top",
                            ha="right", color=colour.get(e["kind"], "0.2"))
        else:
            ax_tcp.text(e["t"], top * (0.98 - 0.09 * (k % 4)), " " + e["label"], fontsize=6,
                        va="top", ha="left", color=colour.get(e["kind"], "0.2"))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=7)
    ax_tcp.set_title(title, fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    dpi = 80 if (res.get("t_end") or 0) > 120 else 90
    fig.savefig(png, dpi=dpi)
    plt.close(fig)
    with contextlib.suppress(ImportError, OSError):   # a palette PNG: a third of the size
        from PIL import Image

        with Image.open(png) as im:
            small = im.convert("RGB").quantize(colors=128)
        small.save(png, optimize=True)
    return str(png)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=None, help="600 (--quick: 60)")
    ap.add_argument("--quick", action="store_true", help="events closer together (CI)")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"subset of {','.join(KINDS)}")
    ap.add_argument("--json", type=Path, default=RESULTS_DIR / "chaos.json")
    ap.add_argument("--png", type=Path, default=None, help="default: beside the JSON")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="daemon configs and logs (default: next to the JSON, <name>-lab)")
    ap.add_argument("--rekey-after", type=float, default=None,
                    help="the agent's rekey interval, s (default 40; --quick 8)")
    args = ap.parse_args(argv)
    args.kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    bad = [k for k in args.kinds if k not in KINDS]
    if bad or not args.kinds:
        ap.error(f"unknown kind {', '.join(bad) or '(none)'}; choose from {', '.join(KINDS)}")
    args.params = params(args.quick, args.seconds)
    if args.rekey_after is not None:
        args.params.rekey_after = args.rekey_after
    if args.params.seconds < args.params.lead_in + args.params.tail + 5:
        ap.error("--seconds too short for the lead-in and the tail")
    args.png = args.png or args.json.with_suffix(".png")
    args.workdir = args.workdir or args.json.resolve().with_name(args.json.stem + "-lab")
    return args


def ms(v: Any) -> str:
    return "-" if v is None else f"{v:.0f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("chaos.py: needs root (network namespaces)", file=sys.stderr)
        return 2
    missing = tool_missing("ip", "nft", "tc", "curl", "ss", "conntrack")
    if not os.path.exists("/dev/net/tun"):
        missing.append("/dev/net/tun")
    if missing:
        print(f"chaos.py: missing {', '.join(missing)} (apt-get install iproute2 nftables "
              "curl conntrack)", file=sys.stderr)
        return 2
    interruptible()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    p: Params = args.params
    meta = {"timestamp": dt.datetime.now().isoformat(timespec="seconds"),
            "argv": sys.argv[1:] if argv is None else argv, "quick": args.quick,
            "seed": args.seed, "kinds": list(args.kinds), "params": asdict(p),
            "workdir": str(args.workdir), "loadavg_start": loadavg(),
            "source_start": source_version(),
            "reordering": "none: no netem on this kernel and nftables cannot delay; drop only",
            "rekeys": f"the agent's REKEY_AFTER lowered to {p.rekey_after} s by a launcher "
                      "(no control command forces one)"}
    print(f"chaos soak: {p.seconds:.0f} s, seed {args.seed}, kinds {','.join(args.kinds)}",
          file=sys.stderr)
    res = run(args)
    an = analyse(res, p) if res.get("samples") else {"verdict": verdict(res, {}, p)}
    meta["loadavg_end"] = loadavg()
    meta["source_end"] = source_version()
    raw = res.pop("udp_raw", None)
    result = {"meta": meta, **{k: v for k, v in res.items() if k not in ("clock0", "tcp_fine")},
              **an}
    if raw is not None:
        result["udp_sender"] = {k: v for k, v in raw[0].items()}
    v = an["verdict"]
    title = (f"upmt_tun chaos soak, {p.seconds:.0f} s, seed {args.seed}: "
             + ("OK" if v["ok"] else f"FAILED ({len(v['failures'])} failure(s))"))
    try:
        result["png"] = plot(res, an, args.png, title) if res.get("samples") else None
    except Exception as e:      # the numbers are saved either way
        result["png"] = None
        result["notes"].append(f"plot: {type(e).__name__}: {e}")
    args.json.write_text(json.dumps(result, indent=1) + "\n")

    rows = [[e["label"], f"{e['t']:.1f}", ms(e.get("udp_recovery_ms")), str(e.get("udp_lost")),
             "yes" if e.get("udp_needed_rehello") else "-", ms(e.get("tcp_recovery_ms")),
             ms(e.get("tcp_stall_ms"))]
            for e in an.get("per_event", [])]
    print(render(["event", "t s", "UDP back after ms", "UDP lost", "needed re-hello",
                  "TCP back after ms", "TCP stall ms"], rows))
    rk = an.get("recovery_by_kind", {})
    if rk:
        print()
        print(render(["kind", "n", "UDP back median ms", "max", "TCP back median ms", "max"],
                     [[k, str(x["count"]), ms(x["udp_gap_ms_median"]), ms(x["udp_gap_ms_max"]),
                       ms(x["tcp_stall_ms_median"]), ms(x["tcp_stall_ms_max"])]
                      for k, x in rk.items()]))
    u = an.get("udp", {})
    if u:
        print(f"\nUDP: {u.get('sent')} sent, {u.get('unique')} received, {u.get('lost')} lost "
              f"({100 * (u.get('lost') or 0) / max(1, u.get('sent') or 1):.2f} %), "
              f"{len(u.get('rehellos', []))} re-hello(s)")
    runs = res.get("tcp_runs", [])
    if runs:
        total = sum(r["bytes"] for r in runs)
        print(f"TCP: {len(runs)} download(s), {total / 1e6:.1f} MB, "
              f"{sum(1 for r in runs if r['curl_exit'] not in (0, None))} error(s)")
    print(f"new sessions without a restart (rekeys): {len(an.get('rekeys', []))}")
    for name, r in an.get("resources", {}).items():
        s, e = r["start"], r["end"]
        print(f"{name}: {r['processes']} process(es); RSS {fmt_kb(s['rss_kb'])} -> "
              f"{fmt_kb(e['rss_kb'])} (max {fmt_kb(r['max']['rss_kb'])}), fds {s['fds']} -> "
              f"{e['fds']}, tasks {s['tasks']} -> {e['tasks']}")
    if result.get("png"):
        print(f"wrote {result['png']}")
    print(f"saved {args.json}")
    if res.get("interrupted"):
        print("chaos.py: interrupted", file=sys.stderr)
        return 130
    for f in v["failures"]:
        print(f"FAIL: {f['reason']}")
    print("verdict: " + ("ok" if v["ok"] else "FAILED"))
    return 0 if v["ok"] else 1


def fmt_kb(kb: Any) -> str:
    return "-" if kb is None else f"{kb / 1024:.1f} MiB"


if __name__ == "__main__":
    sys.exit(main())
