"""A UDP sink for a correspondent host: one JSON line per datagram (source, port, payload).

``python sink.py PORT LOGFILE``; prints ``listening`` once bound; runs until killed.
"""

from __future__ import annotations

import json
import socket
import sys


def main() -> int:
    port, log = int(sys.argv[1]), sys.argv[2]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    print("listening", flush=True)
    with open(log, "a") as f:
        while True:
            data, (src, sport) = sock.recvfrom(65535)
            f.write(json.dumps({"src": src, "sport": sport,
                                "payload": data.decode(errors="replace")}) + "\n")
            f.flush()


if __name__ == "__main__":
    sys.exit(main())
