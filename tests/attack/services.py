"""A host's services bound to 0.0.0.0, as most are: a UDP echo and a TCP banner, one port.

``python services.py PORT LOGFILE``; prints ``listening`` once bound; runs until killed.
One JSON line per datagram (``{"udp": src}``) and per accepted connection
(``{"tcp": src}``): what really reached the host's sockets, whatever way it came.
"""

from __future__ import annotations

import json
import select
import socket
import sys


def main() -> int:
    port, log = int(sys.argv[1]), sys.argv[2]
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", port))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("0.0.0.0", port))
    tcp.listen(64)
    print("listening", flush=True)
    with open(log, "a") as f:
        while True:
            ready, _, _ = select.select([udp, tcp], [], [])
            if udp in ready:
                data, src = udp.recvfrom(65535)
                udp.sendto(b"echo " + data, src)
                f.write(json.dumps({"udp": src[0]}) + "\n")
            if tcp in ready:
                conn, src = tcp.accept()
                f.write(json.dumps({"tcp": src[0]}) + "\n")
                try:
                    conn.sendall(b"SSH-2.0-victim\r\n")
                except OSError:
                    pass
                conn.close()
            f.flush()


if __name__ == "__main__":
    sys.exit(main())
