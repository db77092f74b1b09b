"""A small paced HTTP/1.0 file server for the correspondent host.

``python http_server.py PORT ROOT LOG [--rate BYTES_PER_S] [--delay SECONDS]``

GET /NAME answers ``200`` with the file ROOT/NAME, sent in 16 KiB chunks at most RATE
bytes per second (0: as fast as possible), after waiting DELAY seconds. Pacing at the
server makes the *network* flow last (curl's --limit-rate only paces the reader, and
the kernel may buffer the whole file at once). During DELAY the client has nothing to
send. One log line per request: ``CLIENT_IP GET /NAME``. Prints ``listening`` once bound.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from pathlib import Path

CHUNK = 16384


def serve(conn: socket.socket, peer: str, a: argparse.Namespace, lock: threading.Lock) -> None:
    with conn:
        conn.settimeout(30)
        buf = b""
        try:
            while b"\r\n\r\n" not in buf:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                buf += chunk
            method, path = buf.split(b" ", 2)[:2]
            with lock, open(a.log, "a") as f:
                f.write(f"{peer} {method.decode(errors='replace')} "
                        f"{path.decode(errors='replace')}\n")
            name = Path(path.decode(errors="replace").lstrip("/")).name
            file = Path(a.root) / name
            if method != b"GET" or not name or not file.is_file():
                conn.sendall(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                return
            time.sleep(a.delay)
            data = file.read_bytes()
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(data))
            t0 = time.monotonic()
            for off in range(0, len(data), CHUNK):
                conn.sendall(data[off:off + CHUNK])
                if a.rate > 0:
                    ahead = t0 + (off + CHUNK) / a.rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
        except OSError:
            pass                                  # the client went away: nothing to report


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("root")
    ap.add_argument("log")
    ap.add_argument("--rate", type=float, default=0.0)
    ap.add_argument("--delay", type=float, default=0.0)
    a = ap.parse_args()
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", a.port))
    srv.listen(16)
    open(a.log, "a").close()
    print("listening", flush=True)
    lock = threading.Lock()
    while True:
        conn, (peer, _) = srv.accept()
        threading.Thread(target=serve, args=(conn, peer, a, lock), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
