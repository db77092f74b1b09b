#!/usr/bin/env python3
"""Interleaved A/B of upmt_tun builds or settings: single-stream TCP, pair topology.

    python benchmarks/ab.py [--rounds N] [--seconds S] [--quick] [--json PATH]
                            VARIANT [VARIANT ...]

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
the agent's own tunnel counters). Reported per variant: the median, min and max of Gbit/s
and of the daemons' CPU seconds per GB, and the medians' ratio to the first variant. Only
compare variants of one run. Results go to ``benchmarks/results/ab-<time>.json``. Exit 0
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
    stop_proc,
    tcp_test,
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


def one_round(pair: Pair, name: str, env: dict[str, str], seconds: float, work: Path
              ) -> dict[str, Any]:
    """Start ``name``'s daemons, run the upload and the download, stop them."""
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
            for way, reverse in (("up", False), ("down", True)):
                t = tcp_test(c, pair, seconds, 1, reverse)
                out[way] = {"gbit_s": t["gbit_s"], "cpu_s_per_gb": t["cpu_s_per_gb"],
                            "bytes": t["bytes"], "through_contender": t["through_contender"]}
                time.sleep(0.3)
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
        for way in ("up", "down"):
            for key, label in (("gbit_s", "Gbit/s"), ("cpu_s_per_gb", "CPU s/GB")):
                vals = [r[way][key] for r in runs[name] if way in r and r[way][key] is not None]
                if not vals:
                    continue
                med = statistics.median(vals)
                row[f"{way} {label}"] = {"median": med, "min": min(vals), "max": max(vals),
                                         "n": len(vals)}
                base.setdefault(f"{way} {label}", med)
                row[f"{way} {label}"]["ratio"] = med / base[f"{way} {label}"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("variants", nargs="+", type=parse_variant, metavar="VARIANT")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=6.0, help="per iperf3 test (6)")
    p.add_argument("--quick", action="store_true", help="1 round of 1 s tests (smoke)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
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
                    res = one_round(pair, name, env, args.seconds, work / f"{name}-{r}")
                except BenchError as e:
                    errors.append(f"round {r} {name}: {e}")
                    print(f"round {r} {name}: FAILED {e}", file=sys.stderr)
                    continue
                runs[name].append(res)
                print(f"round {r} {name}: up {res['up']['gbit_s']:.2f} Gbit/s "
                      f"{res['up']['cpu_s_per_gb']:.2f} s/GB, down {res['down']['gbit_s']:.2f}"
                      f" Gbit/s {res['down']['cpu_s_per_gb']:.2f} s/GB", file=sys.stderr)
    except KeyboardInterrupt:
        errors.append("interrupted")
    finally:
        pair.down()
    result["summary"] = rows = summary(args.variants, runs)
    result["meta"]["loadavg_end"] = loadavg()
    fm = foreign.measure()
    result["meta"]["foreign_cpu_s"], result["meta"]["foreign_top"] = fm["cpu_s"], fm["top"]
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    cols = ["up Gbit/s", "down Gbit/s", "up CPU s/GB", "down CPU s/GB"]
    body = [[row["variant"], *(
        f"{row[c]['median']:.2f} ({row[c]['min']:.2f}-{row[c]['max']:.2f}) x{row[c]['ratio']:.2f}"
        if c in row else "-" for c in cols)] for row in rows]
    print(f"\n{args.rounds} rounds, {args.seconds:g} s per test, variants interleaved; "
          f"median (min-max) x ratio of medians to {names[0]}; other processes' CPU "
          f"{fm['cpu_s']} s")
    print(render(["variant", *cols], body))
    print(f"\nsaved {json_path}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
