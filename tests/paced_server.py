"""A legacy TCP server for the restart tests: after one client connects it sends ``lines``
numbered 100-byte lines, one every ``every`` seconds, so a stall or a reset shows where
the stream stopped. It prints ``listening`` when it listens and ``peer IP:PORT`` (the
address it saw the client at) when the client connects."""

from __future__ import annotations

import textwrap


def paced_tcp_server(port: int, lines: int, every: float, host: str = "0.0.0.0",
                     drain: bool = False) -> str:
    """The server's source, for ``python3 -u -c``; ``host`` ``"::"`` listens on IPv6 (and
    IPv4-mapped), the peer then printed as ``peer [IP]:PORT``. ``drain``: read and discard
    what the client sends (closing with unread data would send a reset, not a FIN)."""
    family = "AF_INET6" if ":" in host else "AF_INET"
    return textwrap.dedent(f"""
        import socket, time
        srv = socket.socket(socket.{family})
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(({host!r}, {port}))
        srv.listen(1)
        print("listening", flush=True)
        c, peer = srv.accept()
        print(("peer [%s]:%d" if ":" in peer[0] else "peer %s:%d") % peer[:2], flush=True)
        if {drain}:
            import threading
            threading.Thread(target=lambda: [None for _ in iter(lambda: c.recv(4096), b"")],
                             daemon=True).start()
        t0 = time.monotonic()
        for i in range({lines}):
            c.sendall(b"%099d\\n" % i)
            time.sleep(max(0.0, t0 + (i + 1) * {every} - time.monotonic()))
        c.close()
        """)
