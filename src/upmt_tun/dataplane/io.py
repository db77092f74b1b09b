"""The two I/O seams of the data path, real and fake.

* TUN seam: ``start(on_packet)``, ``write(pkt)``, ``close()``.
* Path-socket seam (one UDP socket per access network / per listen address):
  ``start(on_datagram)``, ``sendto(data, addr)``, ``close()``, ``local``.

The real ones read inline in the event loop's reader callback, draining until
EAGAIN, with no queue hop per packet. The fakes (:class:`FakeNetwork`,
:class:`FakeTun`) let agent and anchor run end to end in memory, NATs included.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct
from collections.abc import Callable
from typing import Protocol

__all__ = ["FakeNetwork", "FakeSocket", "FakeTun", "PathSocket", "TunDevice", "open_udp"]

log = logging.getLogger(__name__)

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
SO_MARK = 36
IP_MTU_DISCOVER = 10      # not named by Python's socket module
IP_PMTUDISC_DONT = 0
READ_SIZE = 65535
MAX_BURST = 256          # datagrams per wake-up before yielding to other callbacks

OnPacket = Callable[[bytes], None]
OnDatagram = Callable[[bytes, tuple[str, int]], None]


class Loop(Protocol):
    def add_reader(self, fd: int, cb: Callable[[], None]) -> None: ...
    def remove_reader(self, fd: int) -> bool: ...


class Tun(Protocol):
    name: str

    def start(self, on_packet: OnPacket) -> None: ...
    def write(self, pkt: bytes) -> None: ...
    def close(self) -> None: ...


class Path(Protocol):
    local: tuple[str, int]

    def start(self, on_datagram: OnDatagram) -> None: ...
    def sendto(self, data: bytes, addr: tuple[str, int]) -> None: ...
    def close(self) -> None: ...


class TunDevice:
    """A real TUN device (IFF_TUN | IFF_NO_PI), non-blocking, read with os.read.

    Opened with an ioctl on /dev/net/tun (python-pytun's wrapper needs the same
    ioctl; using the fd directly avoids its blocking reads and classful route,
    see TRAPS.md). The device disappears when the fd is closed.
    """

    def __init__(self, name: str, loop: Loop) -> None:
        self.loop = loop
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise OSError(e.errno, f"cannot open /dev/net/tun: {e.strerror}") from None
        try:
            ifr = struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI)
            res = fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError as e:
            os.close(fd)
            raise OSError(e.errno, f"cannot create TUN device {name}: {e.strerror}") from None
        self.fd = fd
        self.name = res[:16].rstrip(b"\0").decode()
        self.write_errors = 0

    def start(self, on_packet: OnPacket) -> None:
        fd, read = self.fd, os.read

        def readable() -> None:
            for _ in range(MAX_BURST):
                try:
                    pkt = read(fd, READ_SIZE)
                except BlockingIOError:
                    return
                except OSError as e:
                    log.warning("TUN read failed: %s", e)
                    return
                on_packet(pkt)

        self.loop.add_reader(fd, readable)

    def write(self, pkt: bytes) -> None:
        try:
            os.write(self.fd, pkt)
        except OSError:
            self.write_errors += 1   # EINVAL for a bad packet, EAGAIN when full: drop

    def close(self) -> None:
        if self.fd >= 0:
            self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1


def open_udp(host: str, port: int, *, device: str | None = None, mark: int | None = None,
             bufsize: int = 4 << 20) -> socket.socket:
    """A non-blocking UDP socket, optionally bound to ``device`` and carrying SO_MARK ``mark``."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setblocking(False)
        if mark is not None:
            s.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        if device is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        # Let oversized tunnel packets fragment rather than vanish (PMTUD fails silently).
        s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                s.setsockopt(socket.SOL_SOCKET, opt, bufsize)
            except OSError:
                pass
        s.bind((host, port))
    except OSError:
        s.close()
        raise
    return s


class PathSocket:
    """A real UDP socket used as a tunnel end (and for SIP on the same port)."""

    def __init__(self, sock: socket.socket, loop: Loop, local: tuple[str, int]) -> None:
        self.sock = sock
        self.loop = loop
        self.local = local
        self.send_errors = 0

    def start(self, on_datagram: OnDatagram) -> None:
        recvfrom = self.sock.recvfrom

        def readable() -> None:
            for _ in range(MAX_BURST):
                try:
                    data, addr = recvfrom(READ_SIZE)
                except BlockingIOError:
                    return
                except OSError as e:
                    if e.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                        log.debug("recvfrom: %s", e)
                    continue
                on_datagram(data, addr)

        self.loop.add_reader(self.sock.fileno(), readable)

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self.sock.sendto(data, addr)
        except OSError:
            self.send_errors += 1   # full buffer, no route, interface gone: counted drop

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()


# -- fakes ---------------------------------------------------------------------------------


class FakeTun:
    """In-memory TUN: ``inject`` plays the kernel sending a packet into the TUN;
    packets the program writes are collected in ``written`` (or passed to ``sink``)."""

    def __init__(self, name: str = "faketun") -> None:
        self.name = name
        self.on_packet: OnPacket | None = None
        self.written: list[bytes] = []
        self.sink: OnPacket | None = None

    def start(self, on_packet: OnPacket) -> None:
        self.on_packet = on_packet

    def inject(self, pkt: bytes) -> None:
        assert self.on_packet is not None, "TUN not started"
        self.on_packet(pkt)

    def write(self, pkt: bytes) -> None:
        if self.sink is not None:
            self.sink(pkt)
        else:
            self.written.append(pkt)

    def close(self) -> None:
        self.on_packet = None


class FakeNetwork:
    """Delivers datagrams between fake sockets by address, synchronously or via a
    scheduler. ``nat(inside_ip, public_ip)`` makes every socket bound on
    ``inside_ip`` appear from ``public_ip`` with a fresh port, like a NAT."""

    def __init__(self, schedule: Callable[[Callable[[], None]], None] | None = None) -> None:
        self.sockets: dict[tuple[str, int], FakeSocket] = {}
        self.nats: dict[str, str] = {}
        self.mappings: dict[tuple[str, int], tuple[str, int]] = {}   # inside -> public
        self.reverse: dict[tuple[str, int], tuple[str, int]] = {}
        self.down: set[str] = set()            # local IPs whose link is down
        self.schedule = schedule
        self._next_port = 40000
        self.delivered = 0
        self.dropped = 0

    def nat(self, inside_ip: str, public_ip: str) -> None:
        self.nats[inside_ip] = public_ip

    def socket(self, ip: str, port: int = 0) -> FakeSocket:
        if port == 0:
            self._next_port += 1
            port = self._next_port
        s = FakeSocket(self, (ip, port))
        self.sockets[(ip, port)] = s
        return s

    def rebind_nat(self, inside: tuple[str, int]) -> None:
        """Forget a NAT mapping (the next datagram gets a new public port)."""
        pub = self.mappings.pop(inside, None)
        if pub is not None:
            self.reverse.pop(pub, None)

    def _send(self, src: FakeSocket, data: bytes, dst: tuple[str, int]) -> None:
        if src.local[0] in self.down:
            self.dropped += 1
            return
        from_addr = src.local
        pub_ip = self.nats.get(src.local[0])
        if pub_ip is not None:
            m = self.mappings.get(src.local)
            if m is None:
                self._next_port += 1
                m = (pub_ip, self._next_port)
                self.mappings[src.local] = m
                self.reverse[m] = src.local
            from_addr = m
        target = self.sockets.get(dst)
        if target is None:
            inside = self.reverse.get(dst)
            target = self.sockets.get(inside) if inside else None
        if target is None or target.on_datagram is None or target.local[0] in self.down:
            self.dropped += 1
            return
        cb = target.on_datagram
        self.delivered += 1
        if self.schedule is None:
            cb(data, from_addr)
        else:
            self.schedule(lambda: cb(data, from_addr))


class FakeSocket:
    def __init__(self, net: FakeNetwork, local: tuple[str, int]) -> None:
        self.net = net
        self.local = local
        self.on_datagram: OnDatagram | None = None

    def start(self, on_datagram: OnDatagram) -> None:
        self.on_datagram = on_datagram

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        self.net._send(self, bytes(data), addr)

    def close(self) -> None:
        self.on_datagram = None
        self.net.sockets.pop(self.local, None)
