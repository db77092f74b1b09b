#!/usr/bin/env python3
"""A minimal anchor embedded in another asyncio service: an HTTP status endpoint.

    sudo python3 anchor_status_service.py --config anchor.toml --http 127.0.0.1:8081
    curl http://127.0.0.1:8081/status      # the anchor's status (as status --json)
    curl http://127.0.0.1:8081/hosts       # associated hosts, from the event stream

The service owns the event loop; the anchor (``upmt_tun.Anchor.open``: the same host
set-up as ``upmt-anchor``, restored on exit) is one of its parts, next to a plain
asyncio HTTP/1.0 server (no framework) and a task that keeps the associated hosts from
the events. Ctrl-C or SIGTERM stops both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

import upmt_tun


class Service:
    def __init__(self, anchor: upmt_tun.Anchor) -> None:
        self.anchor = anchor
        self.hosts: dict[str, str] = {}          # host -> VIpA, from the events

    async def follow(self) -> None:
        async for ev in self.anchor.events():
            if isinstance(ev, upmt_tun.HostAssociated):
                self.hosts[ev.host] = ev.vipa
            elif isinstance(ev, upmt_tun.HostLost):
                self.hosts.pop(ev.host, None)

    async def http(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(r.readline(), 5)
            while (await asyncio.wait_for(r.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass                                     # headers: not needed here
            parts = request.split()
            path = parts[1].decode(errors="replace") if len(parts) >= 2 else ""
            if path == "/status":
                code, body = "200 OK", self.anchor.status()
            elif path == "/hosts":
                code, body = "200 OK", self.hosts
            else:
                code, body = "404 Not Found", {"error": "try /status or /hosts"}
            data = json.dumps(body).encode()
            w.write(f"HTTP/1.0 {code}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
            await w.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            w.close()


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--control", help="control socket (default: the config's)")
    p.add_argument("--http", default="127.0.0.1:8081", metavar="ADDR:PORT")
    args = p.parse_args()
    host, _, port = args.http.rpartition(":")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with upmt_tun.Anchor.open(args.config, control=args.control) as anchor:
        service = Service(anchor)
        follower = asyncio.create_task(service.follow())
        server = await asyncio.start_server(service.http, host, int(port))
        print(f"ready: anchor up, status on http://{host}:{port}/status", flush=True)
        async with server:
            done = asyncio.create_task(stop.wait())
            down = asyncio.create_task(anchor.stop_requested())   # `upmt-anchor` has no down,
            await asyncio.wait({done, down}, return_when=asyncio.FIRST_COMPLETED)
            done.cancel()
            down.cancel()
        follower.cancel()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except (upmt_tun.ConfigError, upmt_tun.StartupError, upmt_tun.SystemSetupError) as e:
        print(e, file=sys.stderr)
        sys.exit(2 if isinstance(e, upmt_tun.ConfigError) else 1)
