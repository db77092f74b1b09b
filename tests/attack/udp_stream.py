"""A victim's UDP stream: ``python udp_stream.py DST PORT PPS SECONDS``.

Sends ``seq N`` (padded to 100 bytes) every 1/PPS s until SECONDS elapsed or killed; the
receiver (sink.py) can then tell exactly which sequence numbers arrived, and how often.
The socket is connected (as a VoIP or QUIC client's): its 5-tuple stays the same when the
interface it first left through goes down.
"""

from __future__ import annotations

import socket
import sys
import time


def main() -> int:
    dst, port, pps, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), \
        float(sys.argv[4])
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((dst, port))
    t0 = time.monotonic()
    n = 0
    while time.monotonic() - t0 < seconds:
        try:
            sock.send(f"seq {n} ".encode().ljust(100, b"."))
        except OSError:
            pass                                  # no route for a moment: keep the pace
        n += 1
        delay = t0 + n / pps - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    return 0


if __name__ == "__main__":
    sys.exit(main())
