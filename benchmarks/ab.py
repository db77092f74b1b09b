#!/usr/bin/env python3
"""Interleaved A/B of upmt_tun builds or settings: single-stream TCP, pair topology.

    python benchmarks/ab.py [--rounds N] [--seconds S] [--quick] [--json PATH]
                            [--tests tcp,udp64,ping,ping_load] VARIANT [VARIANT ...]

    VARIANT = NAME[:KEY=VALUE[,KEY=VALUE ...]]

Each ``KEY=VALUE`` goes into the daemons' environment (``UPMT_AEAD=evp``,
``UPMT_NO_OFFLOAD=1``, ``MALLOC_TRIM_THRESHOLD_=...``); the key ``bin`` names another
install's ``bin`` directory whose ``upmt-agent``/``upmt-anchor`` run instead of this one's
(build an older commit into a venv to compare with it). Example::

    python3 -m venv /tmp/old && /tmp/old/bin/pip install "git+file://$PWD@<commit>"
    sudo python benchmarks/ab.py --rounds 5 old:bin=/tmp/old/bin now evp:UPMT_AEAD=evp

Why: the VMs here drift by +-20 % from one minute to the next, more than most changes are
worth, so two suite runs minutes apart do not compare. This runs the variants in turn, round
after round, on one pair of namespaces (``suite.Pair``: agent in A, fixed-host anchor in B,
as ``suite.py``'s ``upmt_tun``), each round starting each variant's daemons afresh and
measuring iperf3 1 stream upload then download (``suite.tcp_test``: the bytes must pass
the agent's own tunnel counters) and, with ``--tests``, the suite's other rows: ``udp64``
(UDP 64 B upload, ``-b 0``: received packets/s and loss), ``ping`` (idle RTT median and
p90) and ``ping_load`` (ping under a 1-stream upload). Reported per variant: the median,
min and max of each figure, and the medians' ratio to the first variant. Only compare
variants of one run. Results go to ``benchmarks/results/ab-<time>.json``. Exit 0
when every test ran and passed its check, 1 otherwise, 2 when something is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import BenchError, interruptible, loadavg, render, source_version  # noqa: E402
from suite import (  # noqa: E402
    PORT,
    RESULTS_DIR,
    ForeignCpu,
    Pair,
    Upmt,
    ping_load_test,
    ping_test,
    stop_proc,
    tcp_test,
    udp_test,
)

from upmt_tun.testbed import tool_missing


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, rest = text.partition(":")
    env: dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, got {item!r}")
        env[key] = value
    if not name:
        raise argparse.ArgumentTypeError(f"{text!r}: a variant needs a name")
    if "bin" in env and not (Path(env["bin"]) / "upmt-agent").exists():
        raise argparse.ArgumentTypeError(f"{text!r}: no upmt-agent in {env['bin']}")
    return name, env


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Any:
    saved = dict(os.environ)
    os.environ.update({k: v for k, v in env.items() if k != "bin"})
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


TESTS = ("tcp", "udp64", "ping", "ping_load")
# (test, key in its result, label in the summary)
FIGURES = (
    ("up", "gbit_s", "up Gbit/s"), ("down", "gbit_s", "down Gbit/s"),
    ("up", "cpu_s_per_gb", "up CPU s/GB"), ("down", "cpu_s_per_gb", "down CPU s/GB"),
    ("udp64", "received_pps", "udp64 recv pkt/s"), ("udp64", "lost_percent", "udp64 loss %"),
    ("ping", "rtt_median_ms", "ping median ms"), ("ping", "rtt_p90_ms", "ping p90 ms"),
    ("ping_load", "rtt_median_ms", "ping_load median ms"),
)


def one_round(pair: Pair, name: str, env: dict[str, str], seconds: float, work: Path,
              tests: tuple[str, ...] = ("tcp",)) -> dict[str, Any]:
    """Start ``name``'s daemons, run the chosen tests (TCP: the upload and the download),
    stop them."""
    c = Upmt(pair, work, plaintext=False)
    if "bin" in env:
        c.exe = lambda name: [str(Path(env["bin"]) / name)]
    out: dict[str, Any] = {}
    server = None
    with environment(env):
        try:
            c.start()
            server = pair.popen("b", "iperf3", "-s", "-p", str(PORT), "-B", c.target,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            pair.wait_listening("b", PORT)
            if "ping" in tests or "ping_load" in tests:    # ARP and the icmp flow first
                pair.run("a", "ping", "-n", "-q", "-c", "2", "-i", "0.1", "-W", "2",
                         c.target, check=False)
            for way, reverse in (("up", False), ("down", True)) if "tcp" in tests else ():
                t = tcp_test(c, pair, seconds, 1, reverse)
                out[way] = {"gbit_s": t["gbit_s"], "cpu_s_per_gb": t["cpu_s_per_gb"],
                            "bytes": t["bytes"], "through_contender": t["through_contender"]}
                time.sleep(0.3)
            if "udp64" in tests:
                u = udp_test(c, pair, max(1.0, seconds * 2 / 3), 64)
                out["udp64"] = {k: u[k] for k in ("received_pps", "lost_percent", "sent_pps",
                                                  "cpu_s", "through_contender")}
                time.sleep(0.3)
            if "ping" in tests:
                pg = ping_test(c, pair, 50, 0.02)
                out["ping"] = {k: pg[k] for k in ("rtt_median_ms", "rtt_p90_ms", "received")}
            if "ping_load" in tests:
                pl = ping_load_test(c, pair, 100, 0.02)
                out["ping_load"] = {k: pl[k] for k in ("rtt_median_ms", "rtt_p90_ms",
                                                       "received", "load_gbit_s")}
        finally:
            if server is not None:
                stop_proc(server)
            out["exit_codes"] = c.stop()
    if any(code != 0 for code in out["exit_codes"].values()):
        raise BenchError(f"daemons exited {out['exit_codes']}")
    return out


def summary(variants: list[tuple[str, dict[str, str]]], runs: dict[str, list[dict[str, Any]]]
            ) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    base: dict[str, float] = {}
    for name, _ in variants:
        row: dict[str, Any] = {"variant": name}
        for test, key, label in FIGURES:
            vals = [r[test][key] for r in runs[name] if test in r and r[test][key] is not None]
            if not vals:
                continue
            med = statistics.median(vals)
            row[label] = {"median": med, "min": min(vals), "max": max(vals), "n": len(vals)}
            base.setdefault(label, med)
            row[label]["ratio"] = med / base[label] if base[label] else None
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("variants", nargs="+", type=parse_variant, metavar="VARIANT")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=6.0, help="per iperf3 test (6)")
    p.add_argument("--quick", action="store_true", help="1 round of 1 s tests (smoke)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--tests", default="tcp",
                   help=f"comma-separated, of {','.join(TESTS)} (default tcp)")
    args = p.parse_args(argv)
    tests = tuple(filter(None, args.tests.split(",")))
    if not tests or any(t not in TESTS for t in tests):
        p.error(f"--tests: choose from {','.join(TESTS)}, got {args.tests!r}")
    if args.quick:
        args.rounds, args.seconds = 1, 1.0
    names = [n for n, _ in args.variants]
    if len(set(names)) != len(names):
        p.error("variant names must differ")
    if os.geteuid() != 0:
        print("ab.py: needs root (network namespaces)", file=sys.stderr)
        return 2
    missing = tool_missing("ip", "iperf3", "ss", "ping", "nft")
    if missing or not os.path.exists("/dev/net/tun"):
        print(f"ab.py: missing {', '.join(missing) or '/dev/net/tun'}", file=sys.stderr)
        return 2
    interruptible()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path: Path = args.json or RESULTS_DIR / f"ab-{stamp}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    work = json_path.with_name(json_path.stem + "-work")
    foreign = ForeignCpu()
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    errors: list[str] = []
    result: dict[str, Any] = {
        "meta": {"argv": sys.argv[1:] if argv is None else argv, "rounds": args.rounds,
                 "tests": list(tests),
                 "seconds": args.seconds, "source": source_version(), "loadavg_start": loadavg(),
                 "variants": {n: env for n, env in args.variants}},
        "runs": runs, "errors": errors}
    pair = Pair()
    try:
        pair.up()
        result["meta"]["namespaces"] = dict(pair.names)
        for r in range(args.rounds):
            for name, env in args.variants:
                try:
                    res = one_round(pair, name, env, args.seconds, work / f"{name}-{r}",
                                    tests)
                except BenchError as e:
                    errors.append(f"round {r} {name}: {e}")
                    print(f"round {r} {name}: FAILED {e}", file=sys.stderr)
                    continue
                runs[name].append(res)
                print(f"round {r} {name}: " + ", ".join(
                    f"{label} {res[test][key]:.4g}" for test, key, label in FIGURES
                    if test in res and res[test][key] is not None), file=sys.stderr)
    except KeyboardInterrupt:
        errors.append("interrupted")
    finally:
        pair.down()
    result["summary"] = rows = summary(args.variants, runs)
    result["meta"]["loadavg_end"] = loadavg()
    fm = foreign.measure()
    result["meta"]["foreign_cpu_s"], result["meta"]["foreign_top"] = fm["cpu_s"], fm["top"]
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    cols = [label for _, _, label in FIGURES if any(label in row for row in rows)]
    body = [[row["variant"], *(
        f"{row[c]['median']:.3g} ({row[c]['min']:.3g}-{row[c]['max']:.3g}) "
        f"x{row[c]['ratio'] or 0:.2f}" if c in row else "-" for c in cols)] for row in rows]
    print(f"\n{args.rounds} rounds, {args.seconds:g} s per test, variants interleaved; "
          f"median (min-max) x ratio of medians to {names[0]}; other processes' CPU "
          f"{fm['cpu_s']} s")
    print(render(["variant", *cols], body))
    print(f"\nsaved {json_path}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
