"""`status --watch`: rates from two successive status answers (pure), the screens, and the
command (Ctrl-C exits 0)."""

from __future__ import annotations

import io
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from upmt_tun.watch import agent_view, anchor_view, fmt_bits, rates, watch

from .test_cli import AGENT_STATUS

T = ("tx_bytes", "rx_bytes", "tx_packets", "rx_packets")


def tun(i: int, txb: int, rxb: int, txp: int, rxp: int, **kw: Any) -> dict[str, Any]:
    return {"id": i, "tx_bytes": txb, "rx_bytes": rxb, "tx_packets": txp, "rx_packets": rxp,
            **kw}


def test_rates_are_differences_over_the_time_between_answers() -> None:
    prev = [tun(1, 1000, 5000, 10, 50), tun(2, 0, 0, 0, 0)]
    cur = [tun(1, 3000, 5000, 30, 60), tun(2, 500, 250, 5, 1), tun(3, 9, 9, 9, 9)]
    r = rates(prev, cur, 2.0, T)
    assert r[1] == {"tx_bytes": 1000.0, "rx_bytes": 0.0, "tx_packets": 10.0,
                    "rx_packets": 5.0}
    assert r[2] == {"tx_bytes": 250.0, "rx_bytes": 125.0, "tx_packets": 2.5,
                    "rx_packets": 0.5}
    assert r[3] == dict.fromkeys(T)              # new: no rate yet
    assert set(r) == {1, 2, 3}                   # gone items (none here) are not shown


def test_no_rate_rather_than_a_wrong_one() -> None:
    prev = [tun(1, 1000, 1000, 10, 10)]
    # the id now names a tunnel that started again: counters went down
    assert rates(prev, [tun(1, 10, 2000, 1, 20)], 1.0, T)[1] == {
        "tx_bytes": None, "rx_bytes": 1000.0, "tx_packets": None, "rx_packets": 10.0}
    assert rates(prev, [tun(1, 2000, 2000, 20, 20)], 0.0, T)[1] == dict.fromkeys(T)
    assert rates(prev, [{"id": 1, "tx_bytes": "x", "rx_bytes": True}], 1.0,
                 ("tx_bytes", "rx_bytes", "tx_packets"))[1] == {
        "tx_bytes": None, "rx_bytes": None, "tx_packets": None}
    assert rates([], [tun(1, 1, 1, 1, 1)], 1.0, T)[1] == dict.fromkeys(T)


def test_bits_per_second_are_short() -> None:
    assert [fmt_bits(v) for v in (None, 0, 100, 125_000, 1_562_500, 2.5e9)] == [
        "-", "0", "800", "1.0M", "12.5M", "20.0G"]
    assert fmt_bits(124.9) == "999"


def _agent_status(txb: int, flow_tx: int) -> dict[str, Any]:
    st = json.loads(json.dumps(AGENT_STATUS))
    st["tunnels"][0].update(tx_bytes=txb, rx_bytes=0, tx_packets=txb // 1000, rx_packets=0)
    st["flows"][0].update(tx_packets=flow_tx, rx_packets=0)
    return st


def test_agent_screen_shows_the_rates() -> None:
    first = agent_view(None, _agent_status(0, 0), 0.0)
    assert "rates over" not in first
    row = next(line for line in first.splitlines() if line.split()[:2] == ["1", "wan1"])
    assert row.split()[-4:] == ["-", "-", "-", "-"]
    second = agent_view(_agent_status(0, 0), _agent_status(250_000, 40), 2.0)
    assert "(rates over 2.0 s)" in second
    row = next(line for line in second.splitlines() if line.split()[:2] == ["1", "wan1"])
    assert row.split()[-4:] == ["1.0M", "0", "125", "0"]
    flow = next(line for line in second.splitlines() if line.split()[:2] == ["7", "tcp"])
    assert flow.split()[-2:] == ["20", "0"]


def test_anchor_screen_shows_the_rates() -> None:
    def st(rx: int) -> dict[str, Any]:
        return {"role": "anchor", "listen": "0.0.0.0:5060", "vipa_pool": "100.100.0.0/16",
                "associations": [{"mh": "laptop", "vipa": "100.100.0.2",
                                  "tunnels": [tun(5, 0, rx, 0, rx // 100,
                                                  remote="198.51.100.7:4000")]}],
                "flows": [{"id": 3, "protocol": "tcp", "dst": "203.0.113.100", "dport": 80,
                           "mh": "laptop", "tx_packets": rx // 100, "rx_packets": 0}]}
    screen = anchor_view(st(0), st(100_000), 1.0)
    row = next(line for line in screen.splitlines() if line.startswith("laptop"))
    assert row.split()[-4:] == ["0", "800.0k", "0", "1000"]
    flow = next(line for line in screen.splitlines() if line.split()[:2] == ["3", "tcp"])
    assert flow.split()[-2:] == ["1000", "0"]


def test_watch_fetches_shows_and_waits() -> None:
    answers = iter([_agent_status(0, 0), _agent_status(1000, 1)])
    clock = iter([0.0, 0.0, 1.0])
    slept: list[float] = []
    out = io.StringIO()
    watch(lambda: next(answers), agent_view, 1.0, out, count=2,
          clock=lambda: next(clock), sleep=slept.append)
    assert slept == [1.0]
    text = out.getvalue()
    assert "\x1b[" not in text                    # not a terminal: screens one after another
    assert text.count("TUNNEL") == 2 and "(rates over 1.0 s)" in text


SERVER = """
import asyncio, sys, threading
from upmt_tun.control import ControlServer
from upmt_tun.cli import agent_main

ST = {st}
n = 0

async def handle(req):
    global n
    n += 1
    st = dict(ST, tunnels=[dict(ST["tunnels"][0], tx_bytes=1000 * n)])
    return {{"ok": True, "status": st}}

ready = threading.Event()

def serve():
    loop = asyncio.new_event_loop()
    srv = ControlServer(sys.argv[1], handle)
    loop.run_until_complete(srv.start())
    ready.set()
    loop.run_forever()

threading.Thread(target=serve, daemon=True).start()
ready.wait()
sys.exit(agent_main(["status", "--watch", "--interval", "0.2", "--control", sys.argv[1]]))
"""


def test_status_watch_until_ctrl_c_exits_0(tmp_path: Path) -> None:
    script = SERVER.format(st=repr(_agent_status(0, 0)))
    p = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "s.sock")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None
    seen = b""
    deadline = time.monotonic() + 20
    while seen.count(b"rates over") < 2 and time.monotonic() < deadline:
        if select.select([p.stdout], [], [], 0.5)[0]:
            seen += os.read(p.stdout.fileno(), 65536)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=10)
    assert p.returncode == 0, err
    assert err == b""
    assert seen.count(b"rates over") >= 2, seen
    assert b"Traceback" not in out + err


def test_status_watch_refuses_json_and_a_bad_interval(capsys: Any) -> None:
    from upmt_tun.cli import agent_main, anchor_main

    assert agent_main(["status", "--watch", "--json", "--control", "/nonexistent"]) == 2
    assert "do not go together" in capsys.readouterr().err
    assert anchor_main(["status", "--watch", "--interval", "0", "--control", "/x"]) == 2
    assert "--interval" in capsys.readouterr().err
