#!/usr/bin/env python3
"""A per-program launcher: start an agent, run one program whose traffic belongs to a
rule (whatever its ports), stop when it ends. What ``upmt-agent up`` plus ``upmt-agent
run --rule`` do, in one program.

    sudo python3 launcher.py --config agent.toml --rule video -- mpv https://...

Exit status: the program's (127 when it cannot be started). The program runs in the
rule's cgroup (v2), as this process's user; the host is restored when it ends.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import upmt_tun


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--control", help="control socket (default: the config's)")
    p.add_argument("--rule", required=True)
    p.add_argument("--ready-timeout", type=float, default=10.0)
    p.add_argument("program", nargs=argparse.REMAINDER, help="-- PROGRAM [ARGS]")
    args = p.parse_args()
    argv = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not argv:
        p.error("give a program after --")
    async with upmt_tun.Agent.open(args.config, control=args.control) as agent:
        if args.rule not in agent.rules():
            print(f"no rule {args.rule!r} (rules: {', '.join(agent.rules())})",
                  file=sys.stderr)
            return 2
        if not await agent.ready(args.ready_timeout):
            print("not every tunnel is up yet; starting anyway", file=sys.stderr)
        try:
            proc = await agent.spawn(args.rule, argv)
        except upmt_tun.MoveError as e:          # no cgroup v2 here
            print(e, file=sys.stderr)
            return 1
        return await proc.wait()


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except KeyboardInterrupt:
        sys.exit(130)
    except (upmt_tun.ConfigError, upmt_tun.StartupError, upmt_tun.SystemSetupError) as e:
        print(e, file=sys.stderr)
        sys.exit(2 if isinstance(e, upmt_tun.ConfigError) else 1)
