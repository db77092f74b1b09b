"""Flood senders that spend the attacker's CPU on the network, not on Python (2 shared cores).

:class:`BatchSender` keeps a list of pre-built datagrams (whole IPv4 packets for a raw
``IP_HDRINCL`` socket, or UDP payloads for an ordinary socket) in ctypes arrays and sends
them with ``sendmmsg(2)`` (through ``ctypes``: the standard library has no binding), up
to 1024 per system call, round and round. :meth:`BatchSender.run` paces to ``pps`` (0: as
fast as the kernel takes them) until a deadline or a stop flag, and can pause.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import socket
import struct
import time
from collections.abc import Callable, Sequence

__all__ = ["BatchSender"]

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.POINTER(_Iovec)), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


_libc.sendmmsg.argtypes = [ctypes.c_int, ctypes.POINTER(_Mmsghdr), ctypes.c_uint, ctypes.c_int]
_libc.sendmmsg.restype = ctypes.c_int
BATCH = 1024


def _sockaddr_in(addr: tuple[str, int]) -> bytes:
    return (struct.pack("=H", socket.AF_INET) + struct.pack("!H", addr[1])
            + socket.inet_aton(addr[0]) + bytes(8))


class BatchSender:
    """``packets`` sent round and round to ``dst`` through ``sock`` (a raw socket: ``dst``'s
    port is ignored, each packet carries its own header)."""

    def __init__(self, sock: socket.socket, packets: Sequence[bytes],
                 dst: tuple[str, int]) -> None:
        n = len(packets)
        assert n > 0
        self.sock, self.n = sock, n
        self._name = ctypes.create_string_buffer(_sockaddr_in(dst), 16)
        self._bufs = [ctypes.create_string_buffer(p, len(p)) for p in packets]
        self._iov = (_Iovec * n)()
        self._msgs = (_Mmsghdr * n)()
        for i, (b, p) in enumerate(zip(self._bufs, packets, strict=True)):
            self._iov[i].iov_base = ctypes.addressof(b)
            self._iov[i].iov_len = len(p)
            h = self._msgs[i].msg_hdr
            h.msg_name = ctypes.addressof(self._name)
            h.msg_namelen = 16
            h.msg_iov = ctypes.pointer(self._iov[i])
            h.msg_iovlen = 1
        self._sizes = [len(p) for p in packets]
        self.sent = self.sent_bytes = self.errors = 0
        self._at = 0

    def send(self, count: int) -> int:
        """Up to ``count`` (at most the rest of the ring) datagrams in one system call."""
        at = self._at
        count = min(count, self.n - at, BATCH)
        ptr = ctypes.cast(ctypes.addressof(self._msgs) + at * ctypes.sizeof(_Mmsghdr),
                          ctypes.POINTER(_Mmsghdr))
        r = _libc.sendmmsg(self.sock.fileno(), ptr, count, 0)
        if r <= 0:
            self.errors += 1                 # e.g. ENOBUFS: counted, the next call goes on
            return 0
        self.sent += r
        self.sent_bytes += sum(self._sizes[at:at + r])
        self._at = (at + r) % self.n
        return r

    def run(self, seconds: float, pps: float = 0.0,
            stop: Callable[[], bool] = lambda: False,
            paused: Callable[[], bool] = lambda: False) -> float:
        """Send for ``seconds`` at ``pps`` (0: flat out), except while ``paused()``; the
        seconds it was active. Behind its pace (paused, or starved of CPU) it does not
        catch up in a burst: it goes on at ``pps`` from there."""
        t_start = t0 = time.monotonic()
        t_end = t0 + seconds
        sent0 = self.sent
        idle = 0.0
        chunk = BATCH if pps <= 0 else max(1, min(BATCH, int(pps / 200)))  # ~200 calls/s
        while not stop():
            now = time.monotonic()
            if now >= t_end:
                break
            if paused():
                time.sleep(0.01)
                idle += time.monotonic() - now
                t0, sent0 = time.monotonic(), self.sent
                continue
            if pps > 0:
                ahead = (self.sent - sent0) / pps - (now - t0)
                if ahead > 0:
                    time.sleep(min(ahead, t_end - now))
                    continue
                if ahead < -0.05:
                    t0, sent0 = now, self.sent
            if self.send(chunk) == 0:
                time.sleep(0.0005)           # the queue is full: let the kernel drain it
        return time.monotonic() - t_start - idle
