"""A classic-BPF socket filter that sheds most mac2-less initiations in the kernel, under load.

Under a flood of initiations from forged sources (which never see their cookies, so never
carry mac2), the anchor answers at most its cookie budget (:class:`HandshakeGate`) and
drops the rest. Even a cheap drop in Python costs a wake-up, a ``recvmsg`` and a few
microseconds per datagram: at tens of thousands per second that is the anchor's CPU, and
the socket's queue -- shared with every tunnel's data -- fills up. So while under load
the anchor attaches this filter to its UDP socket: of the datagrams that look like an
initiation without mac2 (type 0x81, 148 bytes, the last 16 zero) the kernel keeps a
random fraction ``keep`` (``ld rand``) and drops the others before they are queued;
everything else passes untouched (data, signalling, initiations with a mac2, i.e. real
hosts that answered their cookie). ``keep`` follows the flood so that about the cookie
budget still reaches the anchor: a real host's mac2-less initiation has the same odds of
a cookie as without the filter (the budget over the flood's rate), at no cost per shed
datagram. The filter is detached when the load ends.

For a UDP socket the filter sees the datagram from its UDP header (payload at offset 8);
``len`` is the UDP header plus payload.
"""

from __future__ import annotations

import ctypes
import socket
import struct

__all__ = ["attach", "detach", "program"]

SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
_LD_B_ABS, _LD_W_ABS, _LD_W_LEN = 0x30, 0x20, 0x80
_JEQ_K, _JGT_K, _RET_K = 0x15, 0x25, 0x06
_SKF_AD_RANDOM = (-0x1000 + 56) & 0xFFFFFFFF
_INSN = struct.Struct("HBBI")
INIT_LEN = 148
MAC_LEN = 16


def program(keep: float) -> list[tuple[int, int, int, int]]:
    """The filter's instructions (code, jt, jf, k): keep a fraction ``keep`` of mac2-less
    initiations, all else."""
    threshold = max(0, min(0xFFFFFFFF, int(keep * 0xFFFFFFFF)))
    mac2 = 8 + INIT_LEN - MAC_LEN
    body: list[tuple[int, int, int, int]] = [
        (_LD_B_ABS, 0, 0, 8),                     # the type byte
        (_JEQ_K, 0, 0, 0x81),                     # not an initiation: accept (jf patched)
        (_LD_W_LEN, 0, 0, 0),
        (_JEQ_K, 0, 0, 8 + INIT_LEN),
    ]
    for off in range(0, MAC_LEN, 4):
        body += [(_LD_W_ABS, 0, 0, mac2 + off), (_JEQ_K, 0, 0, 0)]   # a mac2 word not zero
    body += [(_LD_W_ABS, 0, 0, _SKF_AD_RANDOM), (_JGT_K, 1, 0, threshold)]  # beyond: drop
    accept = len(body)
    out = []
    for i, (code, jt, jf, k) in enumerate(body):
        if code == _JEQ_K:
            jf = accept - i - 1                   # a test failed: jump to accept
        out.append((code, jt, jf, k))
    return [*out, (_RET_K, 0, 0, 0x40000), (_RET_K, 0, 0, 0)]


def attach(sock: socket.socket, keep: float) -> None:
    """Attach (or replace) the filter on ``sock`` (OSError: leave it as it was)."""
    insns = program(keep)
    buf = ctypes.create_string_buffer(b"".join(_INSN.pack(*i) for i in insns))
    fprog = struct.pack("HL", len(insns), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def detach(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
    except OSError:
        pass                                      # (ENOENT: none attached)
