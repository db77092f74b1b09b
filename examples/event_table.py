#!/usr/bin/env python3
"""A live table of an embedded agent's events: tunnels with their RTT and loss, the last
flow events under it.

    sudo python3 event_table.py --config agent.toml            # redraws (a terminal)
    sudo python3 event_table.py --config agent.toml --plain    # one line per event

``--duration S`` stops after S seconds (the agent is stopped and the host restored).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import sys
import time

import upmt_tun


class Table:
    """What the screen shows, rebuilt from the events (pure: events in, text out)."""

    def __init__(self, keep: int = 8) -> None:
        self.tunnels: dict[int, dict[str, object]] = {}
        self.recent: collections.deque[str] = collections.deque(maxlen=keep)
        self.dropped = 0

    def feed(self, ev: upmt_tun.Event) -> None:
        if isinstance(ev, upmt_tun.TunnelUp):
            self.tunnels[ev.tunnel] = {"iface": ev.interface, "peer": ev.peer,
                                       "state": "up", "rtt": None, "loss": None}
        elif isinstance(ev, upmt_tun.TunnelDown) and ev.tunnel in self.tunnels:
            self.tunnels[ev.tunnel]["state"] = f"down ({ev.reason})"
        elif isinstance(ev, upmt_tun.PathQuality) and ev.tunnel in self.tunnels:
            self.tunnels[ev.tunnel].update(rtt=ev.rtt_ms, loss=ev.loss)
        elif isinstance(ev, upmt_tun.Dropped):
            self.dropped += ev.count
        if not isinstance(ev, upmt_tun.PathQuality):
            self.recent.append(line(ev))

    def render(self) -> str:
        rows = [f"{'TUNNEL':>6} {'IFACE':8} {'PEER':10} {'RTT ms':>8} {'LOSS':>6} STATE"]
        for tid, t in sorted(self.tunnels.items()):
            rtt = "-" if t["rtt"] is None else f"{t['rtt']:.1f}"
            loss = "-" if t["loss"] is None else f"{t['loss']:.0%}"
            rows.append(f"{tid:>6} {t['iface']!s:8} {t['peer']!s:10} {rtt:>8} {loss:>6} "
                        f"{t['state']}")
        rows += ["", "recent events:", *self.recent]
        if self.dropped:
            rows.append(f"({self.dropped} events dropped: the screen fell behind)")
        return "\n".join(rows)


def line(ev: upmt_tun.Event) -> str:
    fields = {k: v for k, v in ev.to_json().items() if k not in ("event", "time")}
    stamp = time.strftime("%H:%M:%S", time.localtime(ev.time))
    return f"{stamp} {ev.event:17} " + " ".join(f"{k}={v}" for k, v in fields.items())


async def show(events: upmt_tun.Subscription, plain: bool) -> None:
    table = Table()
    async for ev in events:
        if plain:
            print(line(ev), flush=True)
        else:
            table.feed(ev)
            print("\x1b[H\x1b[2J" + table.render(), flush=True)


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--control", help="control socket (default: the config's)")
    p.add_argument("--plain", action="store_true", help="one line per event, no redraw")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    args = p.parse_args()
    plain = args.plain or not sys.stdout.isatty()
    async with upmt_tun.Agent.open(args.config, control=args.control) as agent:
        shower = asyncio.create_task(show(agent.events(maxsize=256), plain))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(agent.stop_requested(), args.duration)
        shower.cancel()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except KeyboardInterrupt:
        sys.exit(130)
    except (upmt_tun.ConfigError, upmt_tun.StartupError, upmt_tun.SystemSetupError) as e:
        print(e, file=sys.stderr)
        sys.exit(2 if isinstance(e, upmt_tun.ConfigError) else 1)
