#!/usr/bin/env python3
"""The mesh (UPMT-DAM) measured: relay, direct path, fallback (issue 11, item 9).

    python benchmarks/mesh.py [--seconds 5] [--json PATH] [--workdir DIR]

One :class:`upmt_tun.testbed.Topology` with ``second_mh=True``: laptop (ns mh, wan1 and
wan2 behind nat1/nat2) and phone (ns mh2, wan1 behind nat3, the same private subnet as
laptop's wan1), an anchor with ``mesh = true`` (203.0.113.1) and a correspondent
(203.0.113.100); real ``upmt-anchor`` and ``upmt-agent`` (:class:`upmt_tun.lab.Lab`).
In this order, in one run:

1. **upgrade**: a UDP stream laptop -> phone's VIpA (``streams.py``, 500 datagrams/s of
   200 bytes) starts before laptop knows phone: its first packets wait for the lookup and
   the hosts' handshake (8 are kept, the rest dropped), go through the relay, then the
   agents find a direct path. ``to_direct_ms``: from the flow's first packet to its move
   to the direct path (the agent's flow history); ``first_arrival_ms``: from the first
   datagram sent to the first one phone received; ``lost_setup``: datagrams lost before
   that; ``gap_ms``/``lost`` after the first arrival (the relay -> direct switch).
2. **iperf3** (TCP, ``--seconds`` each) laptop -> phone's VIpA over the direct path;
   laptop -> the correspondent through the anchor (rule ``bulk``); then **move**: the UDP
   stream again, its flow moved to laptop's wan2 after 1.5 s (``upmt-agent move``):
   ``gap_ms``, ``lost``, which path carries it after the move, and the anchor's relay
   bytes in the 2 s after it;
3. **fallback**: the same UDP stream; after 2 s nat3 drops every UDP datagram that is not
   to or from the anchor (the direct paths die, nothing else does): ``gap_ms`` (largest
   inter-arrival gap from the cut), ``recovery_ms`` (cut -> first datagram after that
   gap), ``lost``;
4. **iperf3** laptop -> phone's VIpA again, now relayed by the anchor (the cut stays), and
   the anchor's relay byte counters around it.

The machine is shared: ``loadavg`` before and after is in the output; one run is one
sample. Results: a table on stdout and JSON (default ``benchmarks/results/mesh.json``).
Only addresses inside the namespaces built here are contacted.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import streams  # noqa: E402 (benchmarks/ dir)
from common import BenchError, iperf3_client, loadavg, source_version  # noqa: E402

from upmt_tun.lab import Lab
from upmt_tun.testbed import Topology, tool_missing

PY = sys.executable
STREAMS = str(Path(__file__).resolve().with_name("streams.py"))
UDP_PORT, IPERF_PORT, CH_IPERF = 9000, 5202, 5201
RATE, SIZE = 500.0, 200
CUT_DIRECT = """table ip cut_direct {
  chain forward {
    type filter hook forward priority 0; policy accept;
    meta l4proto udp ip saddr != 203.0.113.1 ip daddr != 203.0.113.1 counter drop
  }
}
"""


def _stream(topo: Topology, work: Path, name: str, dst: str, seconds: float,
            during: Any = None) -> tuple[dict[str, Any], dict[str, Any], list[Any]]:
    """A UDP stream laptop -> ``dst``:UDP_PORT for ``seconds``; ``during(t0)`` runs while it
    flows and returns events [(name, monotonic time)]. Returns (sender, receiver, events)."""
    rx_out, tx_out = work / f"{name}-recv.json", work / f"{name}-send.json"
    rx = topo.popen("mh2", PY, STREAMS, "udp-recv", "--bind", f"0.0.0.0:{UDP_PORT}",
                    "--out", str(rx_out))
    time.sleep(0.5)
    tx = topo.popen("mh", PY, STREAMS, "udp-send", "--bind", "0.0.0.0:0", "--dst",
                    f"{dst}:{UDP_PORT}", "--rate", str(RATE), "--size", str(SIZE),
                    "--duration", str(seconds), "--out", str(tx_out))
    t0 = time.monotonic()
    events = during(t0) if during is not None else []
    tx.wait(timeout=seconds + 20)
    time.sleep(1.0)
    rx.send_signal(signal.SIGTERM)
    rx.wait(timeout=10)
    return json.loads(tx_out.read_text()), json.loads(rx_out.read_text()), events


def _mbps(res: dict[str, Any]) -> float:
    return round(float(res["end"]["sum_received"]["bits_per_second"]) / 1e6, 1)


def _relayed(lab: Lab) -> int:
    return sum(int(a["relay_rx_bytes"]) for a in lab.anchor_status()["associations"])


def run(seconds: int, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"source": source_version(), "loadavg_before": loadavg()}
    with Topology(second_mh=True) as topo:
        topo.popen("mh2", "iperf3", "-s", "-p", str(IPERF_PORT), stdout=subprocess.DEVNULL)
        topo.popen("ch", "iperf3", "-s", "-p", str(CH_IPERF), stdout=subprocess.DEVNULL)
        lab = Lab(topo, work / "lab", anchor_extra="mesh = true\n").start()
        try:
            phone = str(lab.agent_status("agent2")["anchors"][0]["vipa"])
            # 1. upgrade: the stream's first packet is the first packet to phone
            send, recv, _ = _stream(topo, work, "upgrade", phone, 4.0)
            st = lab.agent_status()
            (flow,) = [f for f in st["flows"] if f.get("peer") == "phone"]
            hist = flow["history"]
            direct = next((h for h in hist if h["reason"] == "direct path"), None)
            arr, t_start = recv["arrival"], float(send["t_start"])
            gaps = [arr[i + 1] - arr[i] for i in range(len(arr) - 1)]
            got = set(recv["seq"])
            missing = [s for s in range(int(send["sent"])) if s not in got]
            # datagrams sent before the first one arrived: the lookup and the handshakes
            first = (arr[0] - t_start) * RATE if arr else float("inf")
            out["upgrade"] = {
                "to_direct_ms": None if direct is None else
                round((hist[0]["age_s"] - direct["age_s"]) * 1000, 1),
                "first_arrival_ms": round((arr[0] - t_start) * 1000, 1) if arr else None,
                "sent": int(send["sent"]), "received": len(got),
                "lost_setup": sum(1 for s in missing if s < first),
                "lost_after_first": sum(1 for s in missing if s >= first),
                "gap_ms": round(max(gaps) * 1000, 1) if gaps else None,
                "history": [(h["age_s"], h["reason"]) for h in hist],
            }
            # 2. throughput, direct and to the correspondent
            p = lab.agent_status()["peers"][0]
            out["peer_before_cut"] = {k: p[k] for k in ("path", "interface", "remote")}
            r0 = _relayed(lab)
            out["iperf3_direct_mbps"] = _mbps(iperf3_client(
                lambda *a, **k: topo.run("mh", *a, **k), phone, IPERF_PORT, seconds))
            out["relayed_bytes_during_direct"] = _relayed(lab) - r0
            out["iperf3_to_correspondent_mbps"] = _mbps(iperf3_client(
                lambda *a, **k: topo.run("mh", *a, **k), "203.0.113.100", CH_IPERF, seconds))

            # 2b. a handover: the stream's flow moved to laptop's wan2 (direct there: it
            # has a direct path of its own; before per-interface paths: the relay)
            def move(t0: float) -> list[tuple[str, float]]:
                time.sleep(max(0.0, t0 + 1.5 - time.monotonic()))
                fid = max(f["id"] for f in lab.agent_status()["flows"]   # this stream's
                          if f.get("peer") == "phone" and f["dport"] == UDP_PORT)
                r0 = _relayed(lab)
                t = time.monotonic()
                lab.agent_cli("move", "--flow", str(fid), "--via", "wan2")
                time.sleep(2.0)
                out["relayed_bytes_2s_after_move"] = _relayed(lab) - r0
                return [("move", t)]

            send, recv, events = _stream(topo, work, "move", phone, 5.0, move)
            a = streams.udp_analysis(recv, send, events)
            ev = a["events"][0]
            f = max((f for f in lab.agent_status()["flows"]
                     if f.get("peer") == "phone" and f["dport"] == UDP_PORT),
                    key=lambda f: int(f["id"]))
            tunnels = {t["id"]: t for t in lab.agent_status()["tunnels"]}
            t = tunnels.get(f["tunnel"], {})
            out["move"] = {"gap_ms": ev.get("gap_ms"), "lost": ev.get("lost"),
                           "sent": a["sent"], "interface": f["interface"],
                           "path_after": "relay" if str(t.get("remote", "")).startswith(
                               "relay") else "direct",
                           "background_gap_ms": ev.get("gap_before_ms")}

            # 3. fallback: cut every direct path at phone's NAT, 2 s into the stream
            def cut(t0: float) -> list[tuple[str, float]]:
                time.sleep(max(0.0, t0 + 2.0 - time.monotonic()))
                t = time.monotonic()
                topo.run("nat3", "nft", "-f", "-", input=CUT_DIRECT.encode())
                return [("cut", t)]

            send, recv, events = _stream(topo, work, "fallback", phone, 5.0, cut)
            a = streams.udp_analysis(recv, send, events)
            ev = a["events"][0]
            out["fallback"] = {k: ev.get(k) for k in ("gap_ms", "recovery_ms", "lost")}
            out["fallback"].update(sent=a["sent"], received=a["unique"],
                                   background_gap_ms=ev.get("gap_before_ms"))
            out["peer_after_cut"] = {k: lab.agent_status()["peers"][0][k]
                                     for k in ("path", "why_relay")}
            # 4. relayed throughput (the cut stays: the direct paths cannot come back)
            r0 = _relayed(lab)
            out["iperf3_relayed_mbps"] = _mbps(iperf3_client(
                lambda *a, **k: topo.run("mh", *a, **k), phone, IPERF_PORT, seconds))
            out["relayed_bytes_during_relayed"] = _relayed(lab) - r0
        finally:
            out["exit_codes"] = lab.stop()
    out["loadavg_after"] = loadavg()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5, help="iperf3 run length (default 5)")
    ap.add_argument("--json", default=str(Path(__file__).with_name("results") / "mesh.json"))
    ap.add_argument("--workdir")
    args = ap.parse_args(argv)
    missing = tool_missing("ip", "nft", "iperf3")
    if missing:
        print(f"mesh.py: missing programs: {', '.join(missing)}", file=sys.stderr)
        return 2
    work = Path(args.workdir or tempfile.mkdtemp(prefix="upmt-mesh-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        res = run(args.seconds, work)
    except KeyboardInterrupt:
        return 130
    except (BenchError, subprocess.SubprocessError, OSError, ValueError) as e:
        print(f"mesh.py: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=1))
    u, f = res["upgrade"], res["fallback"]
    print(f"first packet -> direct path: {u['to_direct_ms']} ms "
          f"(first datagram arrived after {u['first_arrival_ms']} ms, via the relay)")
    print(f"upgrade relay -> direct: largest gap {u['gap_ms']} ms, lost after the first "
          f"arrival {u['lost_after_first']} of {u['sent']} (setup: {u['lost_setup']})")
    m = res["move"]
    print(f"move to wan2: now {m['path_after']} on {m['interface']}, gap {m['gap_ms']} ms, "
          f"lost {m['lost']} of {m['sent']}, the anchor relayed "
          f"{res['relayed_bytes_2s_after_move']} bytes in the 2 s after")
    print(f"fallback direct -> relay: gap {f['gap_ms']} ms, recovery {f['recovery_ms']} ms, "
          f"lost {f['lost']} of {f['sent']} (background gap {f['background_gap_ms']} ms)")
    print(f"iperf3 laptop -> phone direct {res['iperf3_direct_mbps']} Mbit/s, relayed "
          f"{res['iperf3_relayed_mbps']} Mbit/s, laptop -> correspondent through the anchor "
          f"{res['iperf3_to_correspondent_mbps']} Mbit/s")
    print(f"loadavg before {res['loadavg_before']}, after {res['loadavg_after']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
