#!/usr/bin/env python3
"""IPv6 against IPv4 inside the tunnel: iperf3 TCP, one stream, upload and download.

    python benchmarks/inner_v6.py [--seconds N] [--rounds N] [--json PATH]

Builds :class:`upmt_tun.testbed.Topology` with ``inner_v6=True`` (IPv4-only access
networks behind their NATs; dual-stack anchor and correspondent), starts a real anchor
(with ``vipa6_pool``) and agent (:class:`upmt_tun.lab.Lab`), one iperf3 server in ns
``ch`` (dual stack, port 5201, steered by the rules ``bulk`` (IPv4) and ``bulk6``), and
runs the IPv4 and the IPv6 test alternately, ``--rounds`` times each, in one run of the
same daemons: the figures are the medians. Only addresses inside the namespaces built
here are contacted; everything is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from upmt_tun.lab import DEFAULT_RULES, Lab
from upmt_tun.testbed import Topology

CH4, CH6 = "203.0.113.100", "2001:db8:113::100"
RULES = DEFAULT_RULES + f"""
[[rule]]
name = "bulk6"
protocol = "tcp"
dst = "{CH6}/128"
dst_port = 5201
via = ["wan1", "wan2"]
"""


def iperf(topo: Topology, family: str, reverse: bool, seconds: float) -> float:
    """Mbit/s received of one TCP stream from mh to the CH (``reverse``: CH to mh)."""
    target = CH6 if family == "6" else CH4
    argv = ["iperf3", f"-{family}", "-c", target, "-p", "5201", "-t", str(seconds), "-J"]
    if reverse:
        argv.append("-R")
    r = topo.run("mh", *argv, timeout=seconds + 30)
    return float(json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    topo = Topology(inner_v6=True).up()
    out: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            topo.popen("ch", "iperf3", "-s", "-p", "5201", stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            lab = Lab(topo, Path(tmp) / "lab", rules=RULES,
                      anchor_extra='vipa6_pool = "fd64:6464::/112"\n').start()
            try:
                runs: dict[str, list[float]] = {}
                for _ in range(args.rounds):
                    for direction, rev in (("upload", False), ("download", True)):
                        for family in ("4", "6"):
                            key = f"ipv{family} {direction}"
                            runs.setdefault(key, []).append(
                                iperf(topo, family, rev, args.seconds))
                flows = {f["rule"] for f in lab.agent_status()["flows"]}
                if not {"bulk", "bulk6"} <= flows:
                    raise RuntimeError(f"not both through the tunnel: rules seen {flows}")
            finally:
                lab.stop()
        for key, vals in runs.items():
            out[key] = {"median_mbit_s": round(statistics.median(vals), 1),
                        "runs": [round(v, 1) for v in vals]}
        for direction in ("upload", "download"):
            v4 = out[f"ipv4 {direction}"]["median_mbit_s"]
            v6 = out[f"ipv6 {direction}"]["median_mbit_s"]
            out[f"ratio {direction}"] = round(v6 / v4, 3) if v4 else None
    finally:
        topo.down()
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
