#!/usr/bin/env python3
"""What the agent's uplink costs per TUN burst in the forwarder: the Python path
(``AgentForwarder.from_tun_many``) against the compiled lane (``_fast.UpLane``), in one
process, warm, no system calls (the sockets' queues are no-ops).

    python benchmarks/lane_cost.py [--bursts N] [--rounds R] [--sizes 1,8,64]

A burst of 1 is a ping's echo request (what an idle link's first hop carries); bursts of
8 and 64 are runs of one UDP flow's 64-byte packets (small-packet load). The two are run
in turn, ``--rounds`` times, each over ``--bursts`` bursts, after one burst that teaches
the lane the flow; printed: the median µs per burst and ns per packet, and the ratio.
No root, no network: the forwarder of ``tests/test_burst.py`` (one anchor up on two
interfaces).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import pktbuild as pb  # noqa: E402
from tests.test_burst import CH, FIX, agent_fwd  # noqa: E402
from upmt_tun.dataplane import _fast  # noqa: E402


def runner(lane_on: bool, size: int) -> Callable[[int], float]:
    fwd, _ = agent_fwd()
    queues = [lambda d, to: None] * 2
    runs = [lambda d, s, to: None] * 2
    lane = _fast.UpLane(fwd, queues, runs) if lane_on else None
    fwd.lane = lane
    burst = [pb.icmp_echo(FIX, CH, 7, 1)] if size == 1 else \
        [pb.udp(FIX, CH, 5000, 6000, b"x" * 36)] * size

    def one(now: float) -> None:     # as Agent._on_packets
        pkts = burst
        if lane is not None:
            pkts = lane.run(pkts, now)
            if not pkts:
                return
        for index, to, data, sz in fwd.from_tun_many(pkts, now):
            if sz:
                runs[index](data, sz, to)
            else:
                queues[index](data, to)

    one(0.5)

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            one(1.0)
        return (time.perf_counter() - t0) / n
    return timed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bursts", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sizes", default="1,8,64")
    args = ap.parse_args()
    print("burst | Python path us/burst (ns/pkt) | lane us/burst (ns/pkt) | Python / lane")
    for size in (int(x) for x in args.sizes.split(",")):
        py, lane = runner(False, size), runner(True, size)
        a: list[float] = []
        b: list[float] = []
        for _ in range(args.rounds):
            a.append(py(args.bursts))
            b.append(lane(args.bursts))
        ma, mb = statistics.median(a), statistics.median(b)
        print(f"{size:5d} | {ma * 1e6:8.2f} ({ma / size * 1e9:5.0f}) | "
              f"{mb * 1e6:8.2f} ({mb / size * 1e9:5.0f}) | {ma / mb:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
