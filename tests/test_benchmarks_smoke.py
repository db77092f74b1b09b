"""Smoke runs of benchmarks/crypto_cost.py and throughput.py: they work end to end.

No timing assertions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from upmt_tun.testbed import tool_missing

from .conftest import netns_missing

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCH / "throughput.py"
_WHY = netns_missing() or ("needs iperf3" if tool_missing("iperf3") else None)


def test_crypto_cost_quick_run(tmp_path: Path) -> None:
    """In process, no root: every case ran and really pushed its packets through."""
    out = tmp_path / "crypto.json"
    r = subprocess.run([sys.executable, str(BENCH / "crypto_cost.py"), "--quick", "--json",
                        str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["errors"] == []
    names = {c["case"] for c in data["cases"]}
    for pipe in ("agent from_tun (uplink)", "anchor from_path (uplink)",
                 "anchor from_tun (downlink)", "agent from_path (downlink)"):
        assert {f"{pipe} 1400 B sealed", f"{pipe} 1400 B plaintext"} <= names, pipe
    assert all(c["best_us"] > 0 for c in data["cases"])


@pytest.mark.netns
@pytest.mark.skipif(_WHY is not None, reason=str(_WHY))
def test_throughput_quick_run(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["errors"] == []
    # all three paths carried TCP both ways: raw, the encrypted tunnel, the plaintext one
    for path in ("raw", "upmt_tun", "upmt_plain"):
        for test in ("tcp_upload", "tcp_download"):
            assert data["paths"][path][test]["bytes"] > 0, (path, test)
    # each lab steered port 5201 into its tunnel and left the raw port alone
    for lab in ("upmt_tun", "upmt_plain"):
        check = data["steering_check"][lab]
        assert check["tcp_5201_via_tunnel"] is True, lab
        assert check["nothing_5202_in_tunnel"] is True, lab
    # ... and the plaintext lab really sent DATA unsealed (no 16-byte tag on the wire)
    assert data["steering_check"]["upmt_tun"]["data_sealed"] is True
    assert data["steering_check"]["upmt_plain"]["data_plaintext"] is True
    for exit_codes in data["exit_codes"].values():
        assert all(code == 0 for code in exit_codes.values()), data["exit_codes"]
    rows = {row["metric"]: row for row in data["table"]}
    assert set(rows) >= {"TCP upload Gbit/s", "TCP download Gbit/s"}
    assert set(rows["TCP upload Gbit/s"]) >= {"raw", "upmt_tun", "upmt_plain", "enc/raw",
                                              "enc/plain"}


@pytest.mark.netns
@pytest.mark.skipif(netns_missing() is not None or bool(tool_missing("curl", "tc", "ss")),
                    reason=str(netns_missing() or "needs curl, tc and ss"))
def test_handover_quick_run(tmp_path: Path) -> None:
    """benchmarks/handover.py --quick: every scenario ran, downloads stayed intact, the UDP
    streams flowed before and after every event. Correctness only, no timing."""
    out = tmp_path / "handover.json"
    r = subprocess.run([sys.executable, str(BENCH / "handover.py"), "--quick", "--json",
                        str(out), "--png-dir", str(tmp_path), "--workdir", str(tmp_path / "lab")],
                       capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["errors"] == []
    scen = data["scenarios"]
    assert set(scen) == {"swap", "udp-move", "link-down", "silent-death"}
    for name, res in scen.items():
        assert res["ran"] and res["errors"] == [], name
        assert all(code == 0 for code in res["exit_codes"].values()), (name, res["exit_codes"])
        assert res["flows"], name                       # the agent's flow histories were kept
    # both Figure 5 downloads completed intact; the two rules swapped interfaces twice
    for dl in ("http", "ftp"):
        assert scen["swap"]["tcp"][dl]["intact"] is True, scen["swap"]["tcp"][dl]
        assert scen["swap"]["tcp"][dl]["http_code"] == "200"
    swapped = {f["rule"]: [h["to_if"] for h in f["history"] if h["reason"] == "operator"]
               for f in scen["swap"]["flows"]}
    assert swapped == {"http": ["wan2", "wan1"], "ftp": ["wan1", "wan2"]}, swapped
    # the TCP download next to the UDP stream survived link-down and silent death
    for name in ("link-down", "silent-death"):
        assert scen[name]["tcp"]["http"]["intact"] is True, (name, scen[name]["tcp"])
    # every UDP stream got datagrams before and after each of its events
    for name in ("udp-move", "link-down", "silent-death"):
        for direction, u in scen[name]["udp"].items():
            assert u["events"], (name, direction)
            for e in u["events"]:
                assert e["received_1s_before"] > 0 and e["received_after"] > 0, (name, e)
    # an explicit move between two working paths loses nothing, either direction (a
    # property of the design, not a timing: in-flight packets on the old tunnel still land)
    for direction, u in scen["udp-move"]["udp"].items():
        assert [e["lost"] for e in u["events"]] == [0], (direction, u["events"])
    # each failover moved the flows to wan2 and says why
    for name in ("link-down", "silent-death"):
        udp = next(f for f in scen[name]["flows"] if f["rule"] == "udp-down")
        assert any(h["from_if"] == "wan1" and h["to_if"] == "wan2" and h["reason"]
                   for h in udp["history"]), udp["history"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    for png in ("figure5.png", "failover.png"):
        assert (tmp_path / png).stat().st_size > 10_000, png
