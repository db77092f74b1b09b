#!/usr/bin/env python3
"""An application that moves its own flows when its tunnel's RTT rises above a threshold.

    sudo python3 rtt_mover.py --config agent.toml --rule video --threshold-ms 150

Runs an agent inside this program (``upmt_tun.Agent.open``: the same host set-up as
``upmt-agent up``, restored on exit), watches the event stream, and when the tunnel
that carries ``--rule`` reports a smoothed RTT above the threshold, moves the rule to
the interface whose tunnel measures the lowest RTT (at most once per ``--hold``
seconds, so two bad paths do not ping-pong). A video or VoIP client would do this
with its own quality measure. Ctrl-C ends it; ``--once`` ends after the first move.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import upmt_tun


class Mover:
    """The decision, apart from any I/O: fed every event, it answers an interface to move
    the rule to, or None."""

    def __init__(self, rule_via: list[str], threshold_ms: float, hold_s: float) -> None:
        self.via = rule_via[0] if rule_via else None   # where the rule's flows are now
        self.threshold = threshold_ms
        self.hold = hold_s
        self.rtt: dict[str, float] = {}                # interface -> last RTT (up tunnels)
        self.last_move = -float("inf")

    def feed(self, ev: upmt_tun.Event, now: float) -> str | None:
        if isinstance(ev, upmt_tun.TunnelDown) and ev.interface:
            self.rtt.pop(ev.interface, None)
        if not isinstance(ev, upmt_tun.PathQuality) or ev.rtt_ms is None:
            return None
        self.rtt[ev.interface] = ev.rtt_ms
        if ev.interface != self.via or ev.rtt_ms <= self.threshold:
            return None
        if now - self.last_move < self.hold:
            return None
        better = min((i for i in self.rtt if i != self.via), key=self.rtt.__getitem__,
                     default=None)
        if better is None or self.rtt[better] >= ev.rtt_ms:
            return None
        self.last_move = now
        return better


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--control", help="control socket (default: the config's)")
    p.add_argument("--rule", required=True)
    p.add_argument("--threshold-ms", type=float, default=150.0)
    p.add_argument("--hold", type=float, default=10.0, help="seconds between two moves")
    p.add_argument("--once", action="store_true", help="stop after the first move")
    args = p.parse_args()
    cfg = upmt_tun.load_agent_config(args.config)
    rule = next((r for r in cfg.rules if r.name == args.rule), None)
    if rule is None:
        print(f"{args.config}: no rule {args.rule!r}", file=sys.stderr)
        return 2
    mover = Mover(list(rule.via) or [i.name for i in cfg.interfaces], args.threshold_ms,
                  args.hold)
    async with upmt_tun.Agent.open(cfg, control=args.control) as agent:
        events = agent.events()           # subscribed before ready: nothing is missed
        await agent.ready()
        print("ready", flush=True)
        async for ev in events:
            to = mover.feed(ev, time.monotonic())
            if to is None:
                continue
            rtt = mover.rtt[mover.via or ""]
            moved = await agent.move(rule=args.rule, via=to)
            print(f"moved rule {args.rule}: {mover.via} -> {to} (rtt {rtt:.1f} ms > "
                  f"{args.threshold_ms:g} ms; {moved} flow(s) now)", flush=True)
            mover.via = to
            if args.once:
                break
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except KeyboardInterrupt:
        sys.exit(130)
    except (upmt_tun.ConfigError, upmt_tun.StartupError, upmt_tun.SystemSetupError) as e:
        print(e, file=sys.stderr)
        sys.exit(2 if isinstance(e, upmt_tun.ConfigError) else 1)
