"""Smoke run of benchmarks/throughput.py: it works end to end. No timing assertions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from upmt_tun.testbed import tool_missing

from .conftest import netns_missing

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
_WHY = netns_missing() or ("needs iperf3" if tool_missing("iperf3") else None)

pytestmark = [pytest.mark.netns, pytest.mark.skipif(_WHY is not None, reason=str(_WHY))]


def test_throughput_quick_run(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["errors"] == []
    for path in ("raw", "upmt_tun"):
        for test in ("tcp_upload", "tcp_download"):
            assert data["paths"][path][test]["bytes"] > 0, (path, test)
    assert data["steering_check"]["tcp_5201_via_tunnel"] is True
    assert data["steering_check"]["nothing_5202_in_tunnel"] is True
    assert {row["metric"] for row in data["table"]} >= {"TCP upload Gbit/s",
                                                        "TCP download Gbit/s"}
