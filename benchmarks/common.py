"""Helpers shared by the benchmark scripts (run as `python benchmarks/NAME.py`)."""

from __future__ import annotations

import subprocess
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
