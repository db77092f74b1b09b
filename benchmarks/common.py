"""Helpers shared by the benchmark scripts (run as `python benchmarks/NAME.py`)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any


def render(headers: list[str], body: list[list[str]]) -> str:
    cells = [headers, *body]
    widths = [max(len(c[i]) for c in cells) for i in range(len(headers))]
    lines = []
    for n, c in enumerate(cells):
        lines.append(" | ".join(c[0].ljust(widths[0]) if i == 0 else c[i].rjust(widths[i])
                                for i in range(len(c))))
        if n == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def source_version() -> dict[str, Any]:
    """The commit of this checkout and which files under src/ differ from it: the daemons
    and the in-process code run from this tree (editable install)."""
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "src"],
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return {"commit": "?", "src_changes": []}
    return {"commit": head or "?", "src_changes": sorted(ln[3:] for ln in dirty if ln.strip())}


def loadavg() -> str:
    """/proc/loadavg: whether something else kept the machine busy during the run."""
    try:
        with open("/proc/loadavg") as f:
            return f.read().strip()
    except OSError:
        return "?"


def fmt(v: Any) -> str:
    """A table cell: thousands separators for big numbers, 2-3 digits for small ones."""
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if math.isinf(v) or math.isnan(v):
            return str(v)
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.3f}" if abs(v) < 0.1 else f"{v:.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def rule_toml(name: str, protocol: str, *, dst: str | None = None, dst_port: int | None = None,
              via: tuple[str, ...] | None = ("wan1", "wan2"), uid: int | None = None) -> str:
    """One agent [[rule]] table."""
    lines = ["[[rule]]", f'name = "{name}"', f'protocol = "{protocol}"']
    if dst is not None:
        lines.append(f'dst = "{dst}"')
    if dst_port is not None:
        lines.append(f"dst_port = {dst_port}")
    if uid is not None:
        lines.append(f"uid = {uid}")
    if via is not None:
        lines.append("via = [" + ", ".join(f'"{v}"' for v in via) + "]")
    return "\n".join(lines) + "\n\n"


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def interruptible() -> None:
    """SIGTERM and SIGINT raise KeyboardInterrupt (so `finally` tears the testbed down),
    even when the script was started with SIGINT ignored."""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)


CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), seconds, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2:].split()   # fields[0] is field 3 (state)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent not idle since boot (/proc/stat: all but idle, iowait)."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:9]]
    return (sum(vals) - vals[3] - vals[4]) / CLK_TCK


def proc_cmdline(pid: int) -> str:
    """The command line of ``pid``, or "?" when it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


class BenchError(Exception):
    """An expected problem: reported as one line, no traceback."""


def iperf3_client(run: Callable[..., subprocess.CompletedProcess[str]], target: str, port: int,
                  seconds: float, *extra: str) -> dict[str, Any]:
    """Run an iperf3 client (``run(*argv, check=, timeout=)`` runs it where it belongs)
    against target:port; its parsed -J output. ``seconds`` = 0: no ``-t`` (``extra``
    holds another end condition)."""
    argv = ["iperf3", "-c", target, "-p", str(port), "-J", "--connect-timeout", "5000",
            *(["-t", str(seconds)] if seconds else []), *extra]
    try:
        r = run(*argv, check=False, timeout=(seconds or 5) + 30)
    except subprocess.TimeoutExpired:
        raise BenchError(f"iperf3 {' '.join(extra)} to {target}:{port} timed out") from None
    try:
        res: dict[str, Any] = json.loads(r.stdout)
    except json.JSONDecodeError:
        raise BenchError(f"iperf3 exit {r.returncode}, no JSON: "
                         f"{(r.stdout + r.stderr).strip()[-300:]}") from None
    if "error" in res:
        raise BenchError(f"iperf3: {res['error']}")
    return res

