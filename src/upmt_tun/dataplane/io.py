"""The two I/O seams of the data path, real and fake.

* TUN seam: ``start(on_packet, on_flush, on_super)``, ``write(pkt)``, ``close()``.
* Path-socket seam (one UDP socket per access network / per listen address):
  ``start(on_datagram, on_flush, on_batch)``, ``sendto(data, addr)`` (now),
  ``queue(data, addr)`` / ``queue_run(data, size, addr)`` + ``flush()`` (data path:
  sent together), ``close()``, ``local``.

The real ones read inline in the event loop's reader callback, draining until
EAGAIN, with no queue hop per packet. With offloads (the default where the kernel
has them), one TUN read is a TCP super-packet of up to 64 KB, handed over whole
(``on_super``: the forwarder decides once and cuts it into real segments), the
datagrams it becomes are queued and leave in one ``sendmsg`` with UDP GSO
(``UDP_SEGMENT``), and the receive side asks for UDP GRO and hands over what arrives
coalesced whole (``on_batch``). Each falls back to one packet per system call
when the kernel or device refuses it. The fakes (:class:`FakeNetwork`,
:class:`FakeTun`) let agent and anchor run end to end in memory, NATs included.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib
import logging
import os
import socket
import struct
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from ..resolve import normalise
from . import offload
from .packet import TYPE_DATA, datagrams

__all__ = ["FakeNetwork", "FakeSocket", "FakeTun", "PathSocket", "PyBurstReader", "TunDevice",
           "gro_reader", "open_udp", "py_write_all"]

log = logging.getLogger(__name__)

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04            # IPv6 TCP super-packets (IPv6 inside the tunnels)
TUN_F_USO4 = 0x20            # UDP super-packets (GSO_UDP_L4), Linux 6.2; both or neither
TUN_F_USO6 = 0x40
SO_MARK = 36
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
IP_MTU_DISCOVER = 10      # not named by Python's socket module
IP_PMTUDISC_DONT = 0
IPV6_MTU_DISCOVER = 23
IPV6_PMTUDISC_DONT = 0
SOL_UDP = 17
UDP_SEGMENT = 103         # UDP GSO (Linux 4.18), not named by Python 3.11
UDP_GRO = 104             # UDP GRO (Linux 5.0)
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000
READ_SIZE = 65535 + offload.VNET_HDR_LEN
MAX_BURST = 256          # datagrams per wake-up before yielding to other callbacks
BURST_BYTES = 1 << 20    # what one compiled TUN read call gathers at most (then the next)
_GSO_SIZE = struct.Struct("=H")
_GRO_SIZE = struct.Struct("=i")

class FastUplink(NamedTuple):
    """What a compiled TUN reader (``_fast.TunPump``) needs from its owner: the lane that
    carries learnt flows (``_fast.UpLane``), the owner's clock, the owner (its ``_quiet``
    says a flush is due even when every packet hit the lane) and where the packets the
    lane hands back go (the Python path)."""
    lane: Any
    clock: Callable[[], float]
    owner: Any
    rest: Callable[[list[bytes]], None]


OnPacket = Callable[[bytes], None]
OnPackets = Callable[[list[bytes]], None]
OnSuper = Callable[[memoryview, int], None]
OnDatagram = Callable[[bytes, tuple[str, int]], None]
OnBatch = Callable[[bytes, int, tuple[str, int]], None]


def gro_reader(open_run: Callable[[bytes, int, tuple[str, int]],
                                  tuple[list[bytes], list[bytes]]],
               write: OnPacket, on_datagram: OnDatagram) -> OnBatch:
    """An ``on_batch`` for a path socket: a GRO read of DATA goes to the forwarder whole
    (``open_run`` -> packets for the TUN, datagrams it left); the rest, and any read of
    other types, datagram by datagram to ``on_datagram``."""
    def on_batch(data: bytes, size: int, src: tuple[str, int]) -> None:
        if data[0] == TYPE_DATA:
            pkts, rest = open_run(data, size, src)
            for pkt in pkts:
                write(pkt)
        else:
            rest = datagrams(data, size)
        for d in rest:
            on_datagram(d, src)
    return on_batch


def deliver(data: bytes, hand: OnPackets, on_super: OnSuper | None) -> bool:
    """Hand one TUN read (virtio-net header + packet) to the callbacks: a TCP
    super-packet whole to ``on_super`` when given, else its packets as one list to
    ``hand``; False when it made no packet (a drop for the caller to count)."""
    if on_super is not None:
        sp = offload.tso_of(data)
        if sp is not None:
            on_super(*sp)
            return True
    pkts = offload.packets(data)
    if pkts:
        hand(pkts)
    return bool(pkts)


class PyBurstReader:
    """Reads up to ``max_n`` packets of up to ``size`` bytes from non-blocking ``fd`` per
    :meth:`read`, and at most about ``cap`` bytes: the reference of the compiled
    ``_fast.BurstReader`` (the same results, one ``os.read`` per packet). With ``vnet``
    (IFF_VNET_HDR) a read that :func:`offload.packets` makes one ordinary packet of comes
    as that packet; another read (a super-packet, a refused one) keeps its header and
    ends the call, so that it is handled before anything is read after it."""

    def __init__(self, fd: int, size: int, cap: int, max_n: int, vnet: bool = False) -> None:
        if size <= 0 or cap < 0 or max_n <= 0:
            raise ValueError("size and max_n must be > 0, cap >= 0")
        self.fd, self.size, self.cap, self.max_n, self.vnet = fd, size, cap, max_n, vnet

    def read(self, limit: int = 0) -> tuple[list[bytes], int, int]:
        """Up to ``limit`` (0: ``max_n``) reads -> (the packets, 0 when the fd is drained
        (EAGAIN), -1 when the limit or the byte cap was reached first, else the errno of
        a failed read, which ends the burst; 1 when the last read kept its virtio-net
        header, else 0)."""
        most = self.max_n if limit <= 0 or limit > self.max_n else limit
        out: list[bytes] = []
        off = 0
        while len(out) < most and off <= self.cap:
            try:
                data = os.read(self.fd, self.size)       # retries EINTR itself (PEP 475)
            except BlockingIOError:
                return out, 0, 0
            except OSError as e:
                return out, e.errno or errno.EIO, 0
            off += len(data)
            if self.vnet:
                pkts = offload.packets(data) if len(data) > 1 and not data[1] & 0x7F else []
                if len(pkts) != 1:
                    out.append(data)
                    return out, -1, 1        # handed over now, the super-packet first
                data = pkts[0]
            out.append(data)
        return out, -1, 0


def py_write_all(fd: int, pkts: list[bytes]) -> int:
    """Write each packet to ``fd`` -> how many failed (counted drops): the reference of
    the compiled ``_fast.write_all``."""
    failed = 0
    for data in pkts:
        try:
            os.write(fd, data)
        except OSError:
            failed += 1
    return failed


BurstReader: Callable[[int, int, int, int, bool], PyBurstReader]
write_all: Callable[[int, list[bytes]], int]
_CBurstReader: Any = ()                  # isinstance() of nothing without the build
TunPump: Any = None
try:   # the compiled loops, when pip built them
    from ._fast import BurstReader as _c_burst_reader
    from ._fast import TunPump as _c_tun_pump
    from ._fast import write_all as _c_write_all
except ImportError:   # pragma: no cover - depends on the build
    BurstReader, write_all = PyBurstReader, py_write_all
else:
    BurstReader, write_all = _c_burst_reader, _c_write_all   # type: ignore[assignment]
    _CBurstReader, TunPump = _c_burst_reader, _c_tun_pump


def _hander(on_packet: OnPacket, on_packets: OnPackets | None) -> OnPackets:
    """How a TUN hands over a list of packets: whole to ``on_packets`` when given, else
    one ``on_packet`` each."""
    if on_packets is not None:
        return on_packets

    def each(pkts: list[bytes]) -> None:
        for pkt in pkts:
            on_packet(pkt)
    return each


class Loop(Protocol):
    def add_reader(self, fd: int, cb: Callable[[], None]) -> None: ...
    def remove_reader(self, fd: int) -> bool: ...


class Tun(Protocol):
    name: str

    def start(self, on_packet: OnPacket, on_flush: Callable[[], None] | None = None,
              on_super: OnSuper | None = None, on_packets: OnPackets | None = None,
              fast: FastUplink | None = None) -> None: ...
    def write(self, pkt: bytes) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class Path(Protocol):
    local: tuple[str, int]

    def start(self, on_datagram: OnDatagram, on_flush: Callable[[], None] | None = None,
              on_batch: OnBatch | None = None) -> None: ...
    def sendto(self, data: bytes, addr: tuple[str, int]) -> None: ...
    def queue(self, data: bytes, addr: tuple[str, int]) -> None: ...
    def queue_run(self, data: bytes, size: int, addr: tuple[str, int]) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


def _create_tun(name: str, flags: int) -> tuple[int, str, Any]:
    """Create TUN device ``name``: (its fd, non-blocking and close-on-exec; its real name;
    the object that owns the fd, or None).

    python-pytun (the design card's choice) creates it: its ``TunTapDevice`` does the
    TUNSETIFF. Only its device creation is used: its fd opens blocking, its ``read``
    raises ``pytun.Error`` and its ``addr`` setter adds a classful route (TRAPS.md), so the
    fd is made non-blocking here and read with ``os.read``, and addresses are set through
    netlink. Without pytun (it is a dependency, but a stripped install may lack it) the
    same ioctl is done by hand."""
    try:
        pytun: Any = importlib.import_module("pytun")     # untyped: no stubs
    except ImportError:
        pytun = None
    if pytun is not None:
        try:
            dev = pytun.TunTapDevice(name=name, flags=flags)
        except pytun.Error as e:
            code = e.args[0] if e.args and isinstance(e.args[0], int) else errno.EINVAL
            why = e.args[-1] if e.args else "failed"
            raise OSError(code, f"cannot create TUN device {name}: {why}") from None
        fd = dev.fileno()
        os.set_blocking(fd, False)
        os.set_inheritable(fd, False)
        return fd, str(dev.name), dev
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise OSError(e.errno, f"cannot open /dev/net/tun: {e.strerror}") from None
    try:
        res = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
    except OSError as e:
        os.close(fd)
        raise OSError(e.errno, f"cannot create TUN device {name}: {e.strerror}") from None
    return fd, res[:16].rstrip(b"\0").decode(), None


class TunDevice:
    """A real TUN device (IFF_TUN | IFF_NO_PI), non-blocking, read with os.read.

    Created by python-pytun (:func:`_create_tun`); the device disappears when its fd is
    closed.
    """

    def __init__(self, name: str, loop: Loop, offload: bool = True) -> None:
        self.loop = loop
        flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if offload else 0)
        fd, self.name, self._owner = _create_tun(name, flags)
        self.fd = fd
        self.write_errors = 0
        self.vnet_hdr = offload
        self.offloads = 0
        if offload:
            tso = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
            for flags in (tso | TUN_F_USO4 | TUN_F_USO6, tso):
                try:    # super-packets and partial checksums; without them: 1 packet/read
                    fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
                    self.offloads = flags
                    break
                except OSError as e:    # USO: EINVAL before Linux 6.2, then TCP only
                    if flags == tso:
                        log.info("TUN offloads not available (%s): one packet per read",
                                 e.strerror)
        # runs of one UDP flow written as one GSO_UDP_L4 packet (the kernel cuts them)
        self.uso = bool(self.offloads & TUN_F_USO4)
        self.pump: Any = None        # the compiled reader callback, when start() made one
        self.dropped = 0             # reads that made no packet (unknown offload type)
        self._pending: list[bytes] = []

    def start(self, on_packet: OnPacket, on_flush: Callable[[], None] | None = None,
              on_super: OnSuper | None = None, on_packets: OnPackets | None = None,
              fast: FastUplink | None = None) -> None:
        """``on_super`` (optional) takes TCP super-packets whole: (packet, gso_size), one
        decision for all its segments; without it they come cut, one ``on_packet`` each.
        ``on_packets`` (optional) takes the other packets of a wake-up as one list, in
        order (those before a super-packet before it), so the forwarder decides once per
        run of one flow; without it, one ``on_packet`` each.

        The reads of a wake-up are done by :data:`BurstReader` (compiled: many reads per
        call), up to :data:`MAX_BURST` of them. With ``fast`` (and the compiled module)
        the reader callback itself is compiled (``_fast.TunPump``): the packets go to
        ``fast.lane`` first, and only what it hands back to ``fast.rest``."""
        vnet = self.vnet_hdr
        flush = on_flush or (lambda: None)
        reader = BurstReader(self.fd, READ_SIZE, BURST_BYTES, MAX_BURST, vnet)
        hand = _hander(on_packet, on_packets)

        def readable() -> None:
            try:
                burst()
            finally:
                flush()          # small packets of the burst leave together (UDP GSO)

        def burst() -> None:
            left = MAX_BURST
            while left > 0:
                reads, err, special = reader.read(left)
                left -= len(reads)
                if special:       # the last read kept its virtio-net header
                    if len(reads) > 1:
                        hand(reads[:-1])
                    odd(reads[-1])
                elif reads:       # all ordinary packets, their header gone
                    hand(reads)
                if err >= 0:
                    if err:
                        log.warning("TUN read failed: %s", os.strerror(err))
                    return

        def odd(data: bytes) -> None:
            """A read that is not one ordinary packet: a TCP super-packet (whole, or cut
            here without on_super), or a drop."""
            if deliver(data, hand, on_super):
                flush()          # its datagrams leave now, not after the burst
            else:
                self.dropped += 1

        def failed(err: int) -> None:
            log.warning("TUN read failed: %s", os.strerror(err))

        if fast is not None and TunPump is not None and isinstance(reader, _CBurstReader):
            self.pump = TunPump(reader, fast.lane, fast.clock, fast.rest, odd, flush, failed,
                                fast.owner, MAX_BURST)
            self.loop.add_reader(self.fd, self.pump)
            return
        self.loop.add_reader(self.fd, readable)

    def write(self, pkt: bytes) -> None:
        """Write now (no offload) or at the next :meth:`flush` (GRO: merged)."""
        if self.vnet_hdr:
            self._pending.append(pkt)
            return
        try:
            os.write(self.fd, pkt)
        except OSError:
            self.write_errors += 1   # EINVAL for a bad packet, EAGAIN when full: drop

    def flush(self) -> None:
        """Write what came since the last flush, consecutive segments of one TCP flow
        merged into one super-packet (the kernel's GRO, done here)."""
        pending = self._pending
        if not pending:
            return
        self._pending = []
        self.write_errors += write_all(self.fd, offload.coalesce(pending, self.uso))

    def close(self) -> None:
        if self.fd >= 0:
            self.loop.remove_reader(self.fd)
            if self._owner is not None:
                self._owner.close()
            else:
                os.close(self.fd)
            self.fd = -1


def open_udp(host: str, port: int, *, device: str | None = None, mark: int | None = None,
             bufsize: int = 4 << 20) -> socket.socket:
    """A non-blocking UDP socket, optionally bound to ``device`` and carrying SO_MARK ``mark``.

    An IPv6 ``host`` (``"::"``) makes an AF_INET6 socket with IPV6_V6ONLY off: it carries
    both families (IPv4 peers as ``::ffff:a.b.c.d``, which :class:`PathSocket` hides)."""
    v6 = ":" in host
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setblocking(False)
        if mark is not None:
            s.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        if device is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        # Let oversized tunnel packets fragment rather than vanish (PMTUD fails silently);
        # over IPv6 only the sender fragments, which this lets it do.
        s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
        if v6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DONT)
        for force, opt in ((SO_RCVBUFFORCE, socket.SO_RCVBUF),
                           (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
            try:    # beyond net.core.[rw]mem_max when root (bursts of 64 KB reads)
                s.setsockopt(socket.SOL_SOCKET, force, bufsize)
            except OSError:
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, opt, bufsize)
        s.bind((host, port))
    except OSError:
        s.close()
        raise
    return s


def mapped(addr: tuple[str, int]) -> tuple[str, int]:
    """Where an AF_INET6 socket sends to reach ``addr``: an IPv4 peer as ``::ffff:a.b.c.d``."""
    return ("::ffff:" + addr[0], addr[1]) if "." in addr[0] else addr


class PathSocket:
    """A real UDP socket used as a tunnel end (and for SIP on the same port)."""

    def __init__(self, sock: socket.socket, loop: Loop, local: tuple[str, int],
                 offload: bool = True) -> None:
        self.sock = sock
        self.loop = loop
        self.local = local
        # endpoints are (host, port) everywhere above this class: an AF_INET6 socket's
        # 4-tuples and ``::ffff:`` IPv4 peers are normalised here, once, in and out
        self.v6 = getattr(sock, "family", socket.AF_INET) == socket.AF_INET6
        self.send_errors = 0
        self.gso = offload
        self.gro = False
        if offload:
            try:
                sock.setsockopt(SOL_UDP, UDP_GRO, 1)
                self.gro = True
            except OSError:
                pass
        # the queue, in order: (addr, [datagram, ...], 0) for queue()'s consecutive
        # datagrams to one address, (addr, data, size) for a queue_run
        self._runs: list[tuple[tuple[str, int], list[bytes] | bytes, int]] = []
        self._started: tuple[OnDatagram, Callable[[], None] | None, OnBatch | None] | None = None

    def start(self, on_datagram: OnDatagram, on_flush: Callable[[], None] | None = None,
              on_batch: OnBatch | None = None) -> None:
        """``on_flush`` runs after each burst of reads (the TUN's writes go out merged).
        ``on_batch`` (optional) takes what UDP GRO coalesced whole: (data, size, sender),
        datagrams of ``size`` bytes back to back; without it they come one by one."""
        self._started = (on_datagram, on_flush, on_batch)
        sock = self.sock
        recvfrom, recvmsg = sock.recvfrom, sock.recvmsg
        gro, v6 = self.gro, self.v6
        cmsg_space = socket.CMSG_SPACE(_GRO_SIZE.size)

        def readable() -> None:
            try:
                burst()
            finally:
                if on_flush is not None:
                    on_flush()

        def burst() -> None:
            for _ in range(MAX_BURST):
                try:
                    if gro:
                        data, anc, _flags, addr = recvmsg(65535, cmsg_space)
                    else:
                        data, addr = recvfrom(65535)
                except BlockingIOError:
                    return
                except OSError as e:
                    if e.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                        log.debug("recvfrom: %s", e)
                    continue
                if v6:
                    addr = normalise(addr)
                if gro and anc:
                    level, kind, value = anc[0]
                    if level == SOL_UDP and kind == UDP_GRO and len(value) >= _GRO_SIZE.size:
                        size = _GRO_SIZE.unpack_from(value)[0]
                        if 0 < size < len(data):       # coalesced datagrams of one sender
                            if on_batch is not None:
                                on_batch(data, size, addr)
                            else:
                                for d in datagrams(data, size):
                                    on_datagram(d, addr)
                            continue
                on_datagram(data, addr)

        self.loop.add_reader(sock.fileno(), readable)

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self.sock.sendto(data, mapped(addr) if self.v6 else addr)
        except OSError:
            self.send_errors += 1   # full buffer, no route, interface gone: counted drop

    def queue(self, data: bytes, addr: tuple[str, int]) -> None:
        """Data path: send at the next :meth:`flush`, batched with UDP GSO."""
        runs = self._runs
        if runs:
            last_addr, dgs, _ = runs[-1]
            if last_addr == addr and isinstance(dgs, list):
                dgs.append(data)
                return
        runs.append((addr, [data], 0))

    def queue_run(self, data: bytes, size: int, addr: tuple[str, int]) -> None:
        """Data path: datagrams of ``size`` bytes back to back in ``data`` (the last may be
        shorter; ``Session.seal_run``'s), sent at the next :meth:`flush` in as few UDP GSO
        sends as the kernel's limits allow."""
        self._runs.append((addr, data, size))

    def flush(self) -> None:
        """Send the queue in order: a run in sends of up to :data:`GSO_MAX_SEGMENTS`
        datagrams or :data:`GSO_MAX_BYTES`; consecutive queued datagrams to one address,
        all of one size but the last, joined into one send (UDP GSO)."""
        runs = self._runs
        if not runs:
            return
        self._runs = []
        for addr, dgs, run_size in runs:
            if isinstance(dgs, bytes):
                self._send_run(dgs, run_size, addr)
                continue
            i, n = 0, len(dgs)
            while i < n:
                size = len(dgs[i])
                j, total = i + 1, size
                if self.gso:
                    while j < n and j - i < GSO_MAX_SEGMENTS:
                        m = len(dgs[j])
                        if m > size or total + m > GSO_MAX_BYTES:
                            break
                        total += m
                        j += 1
                        if m < size:
                            break                  # a shorter one ends a run
                if j - i == 1:
                    self._send(dgs[i], addr)
                else:
                    self._send_run(b"".join(dgs[i:j]), size, addr)
                i = j

    def _send(self, data: bytes | memoryview, addr: tuple[str, int]) -> None:
        try:
            self.sock.sendto(data, mapped(addr) if self.v6 else addr)
        except OSError:
            self.send_errors += 1

    def _send_run(self, data: bytes, size: int, addr: tuple[str, int]) -> None:
        """``data``'s datagrams of ``size`` bytes, with UDP GSO while the kernel takes it."""
        n = len(data)
        if n <= size or not self.gso:
            for k in range(0, n, size):
                self._send(data[k:k + size], addr)
            return
        step = size * max(1, min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // size))
        view = memoryview(data)
        dst = mapped(addr) if self.v6 else addr
        cmsg = [(SOL_UDP, UDP_SEGMENT, _GSO_SIZE.pack(size))]
        for k in range(0, n, step):
            chunk = view[k:k + step]
            try:
                if len(chunk) <= size:
                    self.sock.sendto(chunk, dst)
                else:
                    self.sock.sendmsg((chunk,), cmsg, 0, dst)
            except OSError as e:
                if e.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                    log.info("UDP GSO refused (%s): one datagram per send from now on",
                             e.strerror)
                    self.gso = False
                    self._send_run(data[k:], size, addr)
                    return
                self.send_errors += -(-len(chunk) // size)

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()

    def reopen(self, new: Callable[[], socket.socket]) -> None:
        """Close the socket and carry on with ``new()``, which must bind the same port
        (the peers, NAT mappings and nft rules know it), with the same callbacks. For an
        access interface created again (hotplug) where moving the bound socket to the new
        device is refused: that needs CAP_NET_RAW, which the systemd unit does not give.
        OSError from ``new()`` leaves the path closed (its sends are counted errors)."""
        self.close()
        self.sock = new()
        if self.gro:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        if self._started is not None:
            self.start(*self._started)


# -- fakes ---------------------------------------------------------------------------------


class FakeTun:
    """In-memory TUN: ``inject`` plays the kernel sending a packet into the TUN;
    packets the program writes are collected in ``written`` (or passed to ``sink``)."""

    def __init__(self, name: str = "faketun") -> None:
        self.name = name
        self.on_packet: OnPacket | None = None
        self.on_flush: Callable[[], None] | None = None
        self.on_super: OnSuper | None = None
        self.on_packets: OnPackets | None = None
        self.written: list[bytes] = []
        self.sink: OnPacket | None = None

    def start(self, on_packet: OnPacket, on_flush: Callable[[], None] | None = None,
              on_super: OnSuper | None = None, on_packets: OnPackets | None = None,
              fast: FastUplink | None = None) -> None:
        """As :meth:`TunDevice.start`; ``fast`` is not used (``on_packets`` is what the
        owner gives both paths: the lane runs there)."""
        self.on_packet = on_packet
        self.on_flush = on_flush
        self.on_super = on_super
        self.on_packets = on_packets

    def inject_burst(self, pkts: list[bytes]) -> None:
        """Packets the kernel queued together: one wake-up's reads, as the real reader
        hands them over (``on_packets`` when given, else one by one), then a flush."""
        assert self.on_packet is not None, "TUN not started"
        _hander(self.on_packet, self.on_packets)(list(pkts))
        if self.on_flush is not None:
            self.on_flush()

    def inject(self, pkt: bytes) -> None:
        assert self.on_packet is not None, "TUN not started"
        self.on_packet(pkt)
        if self.on_flush is not None:
            self.on_flush()

    def inject_read(self, data: bytes) -> bool:
        """A read with a virtio-net header, as the offloading TUN hands it over."""
        assert self.on_packet is not None, "TUN not started"
        made = deliver(data, _hander(self.on_packet, self.on_packets), self.on_super)
        if self.on_flush is not None:
            self.on_flush()
        return made

    def write(self, pkt: bytes) -> None:
        if self.sink is not None:
            self.sink(pkt)
        else:
            self.written.append(pkt)

    def flush(self) -> None:
        pass

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

    def _send(self, src: FakeSocket, data: bytes, dst: tuple[str, int], size: int = 0) -> None:
        """Deliver ``data``; with ``size``, it is datagrams of ``size`` bytes back to back
        (a GSO send) and reaches a receiver with ``on_batch`` whole, as with UDP GRO."""
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
        self.delivered += 1
        batch = target.on_batch
        if size and batch is not None:
            def deliver() -> None:
                batch(data, size, from_addr)
        else:
            cb = target.on_datagram

            def deliver() -> None:
                cb(data, from_addr)
        if self.schedule is None:
            deliver()
        else:
            self.schedule(deliver)


class FakeSocket:
    def __init__(self, net: FakeNetwork, local: tuple[str, int]) -> None:
        self.net = net
        self.local = local
        self.on_datagram: OnDatagram | None = None
        self.on_batch: OnBatch | None = None

    def start(self, on_datagram: OnDatagram, on_flush: Callable[[], None] | None = None,
              on_batch: OnBatch | None = None) -> None:
        self.on_datagram = on_datagram
        self.on_batch = on_batch

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        self.net._send(self, bytes(data), addr)

    def queue(self, data: bytes, addr: tuple[str, int]) -> None:
        self.net._send(self, bytes(data), addr)

    def queue_run(self, data: bytes, size: int, addr: tuple[str, int]) -> None:
        if len(data) > size:
            self.net._send(self, bytes(data), addr, size)    # one GSO send
        else:
            self.net._send(self, bytes(data), addr)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.on_datagram = None
        self.net.sockets.pop(self.local, None)
