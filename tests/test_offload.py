"""TUN offload handling (dataplane/offload.py): segmentation and checksum completion.

Every case runs against the pure-Python reference and the compiled hot path (``_fast``);
both must produce byte-identical packets whose checksums verify from scratch."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from upmt_tun import nat
from upmt_tun.dataplane import offload as O

from . import pktbuild as pb

try:
    from upmt_tun.dataplane import _fast
except ImportError:  # pragma: no cover - the build decides
    _fast = None  # type: ignore[assignment]

IMPLS = [pytest.param((O.py_tso_split, O.py_finish_csum), id="python")]
if _fast is not None:
    IMPLS.append(pytest.param((_fast.tso_split, _fast.finish_csum), id="cython"))


def test_the_compiled_hot_path_is_there_when_expected() -> None:
    """CI builds it (`pip install .` with a compiler): a silent fallback would hide a
    broken build behind slow numbers."""
    if os.environ.get("UPMT_EXPECT_FAST") == "1":
        assert _fast is not None and O.implementation == "cython"
        assert _fast.LIBCRYPTO is not None          # the AEAD on the system's libcrypto
        if _fast.LIBCRYPTO == "libcrypto.so.3" and os.environ.get("UPMT_AEAD") != "evp":
            assert _fast.AEAD_PATH == "provider"    # OpenSSL 3: its provider, not EVP


def partial(pkt: bytes) -> bytearray:
    """What the kernel hands over with TUN_F_CSUM: the L4 checksum field holds the
    uncomplemented pseudo-header sum."""
    b = bytearray(pkt)
    ihl = (b[0] & 15) * 4
    at = ihl + (16 if b[9] == 6 else 6)
    ps = b[12:20] + struct.pack("!BBH", 0, b[9], len(b) - ihl)
    s = sum(struct.unpack("!6H", ps))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    b[at:at + 2] = struct.pack("!H", s)
    return b


def super_packet(payload: bytes, flags: int = 0x18, seq: int = 1000, ident: int = 7,
                 tcp_opts: bytes = b"", ip_opts: bytes = b"") -> bytes:
    """An IPv4/TCP packet bigger than the MTU, as TSO hands it over (checksum partial)."""
    h = struct.pack("!HHIIBBHHH", 40000, 80, seq, 5, (5 + len(tcp_opts) // 4) << 4, flags,
                    512, 0, 0) + tcp_opts
    ihl = 5 + len(ip_opts) // 4
    ip = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(h) + len(payload), ident,
                     0x4000, 64, 6, 0, pb.ip("100.64.0.1"), pb.ip("198.51.100.7")) + ip_opts
    ip = ip[:10] + struct.pack("!H", pb.csum(ip)) + ip[12:]
    return bytes(partial(ip + h + payload))


@pytest.mark.parametrize("impl", IMPLS)
def test_tso_split_makes_real_segments(impl: tuple) -> None:
    split, _ = impl
    payload = os.urandom(10_000)
    segs = split(super_packet(payload, flags=0x18 | 0x01 | 0x80), 1448)
    assert [len(s) - 40 for s in segs] == [1448] * 6 + [10_000 - 6 * 1448]
    assert b"".join(s[40:] for s in segs) == payload
    for i, s in enumerate(segs):
        assert pb.checksums_ok(s), i
        assert struct.unpack_from("!H", s, 2)[0] == len(s)
        assert struct.unpack_from("!H", s, 4)[0] == 7 + i                 # IP id
        assert struct.unpack_from("!I", s, 24)[0] == 1000 + 1448 * i      # TCP seq
        flags = s[33]
        assert bool(flags & 0x08) == bool(flags & 0x01) == (i == len(segs) - 1)   # PSH, FIN
        assert bool(flags & 0x80) == (i == 0)                              # CWR
        assert flags & 0x10                                                # ACK everywhere


@pytest.mark.parametrize("impl", IMPLS)
def test_tso_split_refuses_what_it_cannot_cut(impl: tuple) -> None:
    split, _ = impl
    good = super_packet(b"x" * 3000)
    assert split(good[:39], 1448) == []                                   # too short
    assert split(b"\x60" + good[1:], 1448) == []                           # not IPv4
    assert split(good[:9] + b"\x11" + good[10:], 1448) == []               # not TCP
    assert split(good, 0) == []
    assert split(b"\x4f" + good[1:70], 1448) == []                        # IHL beyond data
    assert len(split(good, 1448)) == 3
    one = split(super_packet(b""), 1448)                                   # a bare header
    assert len(one) == 1 and pb.checksums_ok(one[0])


@pytest.mark.parametrize("impl", IMPLS)
def test_tso_split_with_new_source_is_split_then_nat(impl: tuple) -> None:
    """The agent's internal NAT folded into the split: the same bytes as cutting first and
    rewriting each segment's source with nat.py's incremental checksum update."""
    split, _ = impl
    pkt = super_packet(os.urandom(5000), flags=0x19)
    new = pb.ip("10.200.0.9")
    want = []
    for seg in split(pkt, 1400):
        b = bytearray(seg)
        assert nat.py_rewrite_src(b, new)
        want.append(bytes(b))
    got = split(pkt, 1400, new)
    assert got == want and all(pb.checksums_ok(s) for s in got)
    assert all(s[12:16] == new and s[16:20] == pkt[16:20] for s in got)
    with pytest.raises(ValueError):
        split(pkt, 1400, b"\x01\x02\x03")


@settings(max_examples=150, deadline=None)
@given(size=st.integers(0, 20_000), gso=st.integers(1, 3000), seq=st.integers(0, 2**32 - 1),
       ident=st.integers(0, 0xFFFF), flags=st.integers(0, 255),
       tcp_opts=st.sampled_from([b"", b"\x01\x01\x08\x0a" + bytes(8)]),
       ip_opts=st.sampled_from([b"", b"\x01\x01\x01\x00"]))
def test_both_implementations_agree(size: int, gso: int, seq: int, ident: int, flags: int,
                                    tcp_opts: bytes, ip_opts: bytes) -> None:
    pkt = super_packet(os.urandom(size), flags, seq, ident, tcp_opts, ip_opts)
    ref = O.py_tso_split(pkt, gso)
    assert all(pb.checksums_ok(s) for s in ref)
    # a run for Session.seal_run and one UDP GSO send: all of one size but a shorter last
    lens = [len(s) for s in ref]
    assert all(n == lens[0] for n in lens[:-1]) and (not lens or lens[-1] <= lens[0])
    assert b"".join(s[(s[0] & 15) * 4 + (s[(s[0] & 15) * 4 + 12] >> 4) * 4:]
                    for s in ref) == pkt[len(pkt) - size:]
    if _fast is not None:
        assert _fast.tso_split(pkt, gso) == ref
        assert _fast.tso_split(memoryview(pkt), gso) == ref
        new = bytes([10, 1, ident & 0xFF, flags])
        assert _fast.tso_split(pkt, gso, new) == O.py_tso_split(pkt, gso, new)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pkt", [
    pb.tcp("100.64.0.1", "198.51.100.7", 1, 2, b"hello world"),
    pb.tcp("100.64.0.1", "198.51.100.7", 1, 2, b"odd"),
    pb.udp("100.64.0.1", "198.51.100.7", 5, 53, b"q" * 100),
    pb.udp("100.64.0.1", "198.51.100.7", 5, 53, b""),
], ids=["tcp", "tcp-odd", "udp", "udp-empty"])
def test_finish_csum_completes_partial_checksums(impl: tuple, pkt: bytes) -> None:
    _, finish = impl
    b = partial(pkt)
    off = 16 if pkt[9] == 6 else 6
    assert finish(b, 20, off) is True
    assert bytes(b) == pkt
    assert finish(bytearray(pkt[:21]), 20, off) is False                  # field beyond data
    assert finish(bytearray(pkt), 8, off) is False                        # inside the IP header


@pytest.mark.parametrize("impl", IMPLS)
def test_packets_from_one_tun_read(impl: tuple) -> None:
    split, finish = impl
    plain = pb.udp("100.64.0.1", "198.51.100.7", 5, 53, b"q" * 50)
    hdr = O.VNET_HDR.pack
    assert O.packets(hdr(0, O.GSO_NONE, 0, 0, 0, 0) + plain, split, finish) == [plain]
    got = O.packets(hdr(O.NEEDS_CSUM, O.GSO_NONE, 0, 0, 20, 6) + bytes(partial(plain)), split,
                    finish)
    assert got == [plain]
    big = super_packet(os.urandom(5000))
    segs = O.packets(hdr(O.NEEDS_CSUM, O.GSO_TCPV4 | O.GSO_ECN, 40, 1400, 20, 16) + big,
                     split, finish)
    assert len(segs) == 4 and all(pb.checksums_ok(s) for s in segs)
    assert O.packets(hdr(0, 3, 0, 1400, 0, 0) + plain, split, finish) == []   # UFO: never
    assert O.packets(hdr(0, 0, 0, 0, 0, 0), split, finish) == []               # empty
    assert O.packets(hdr(O.NEEDS_CSUM, 0, 0, 0, 200, 6) + plain, split, finish) == []


# -- GRO towards the TUN ------------------------------------------------------------------

COALESCE = [pytest.param(O.py_coalesce, id="python")]
if _fast is not None:
    COALESCE.append(pytest.param(_fast.coalesce, id="cython"))


def segments(payload: bytes, gso: int = 1448, sport: int = 40000, seq: int = 1000,
             flags: int = 0x18) -> list[bytes]:
    return O.py_tso_split(super_packet(payload, flags=flags, seq=seq).replace(
        struct.pack("!H", 40000), struct.pack("!H", sport), 1), gso)


def unwrap(write: bytes) -> tuple[tuple[int, ...], bytes]:
    return O.VNET_HDR.unpack_from(write), write[O.VNET_HDR_LEN:]


@pytest.mark.parametrize("coalesce", COALESCE)
def test_coalesce_merges_one_flow_and_splitting_gives_it_back(coalesce) -> None:
    segs = segments(os.urandom(10_000))
    (w,) = coalesce(segs)
    hdr, pkt = unwrap(w)
    assert hdr == (O.NEEDS_CSUM, O.GSO_TCPV4, 40, 1448, 20, 16)
    assert len(pkt) == 40 + 10_000 and struct.unpack_from("!H", pkt, 2)[0] == len(pkt)
    assert pb.csum(pkt[:20]) == 0                                # IP header checksum valid
    assert pkt[33] & 0x08                                         # PSH of the last kept
    finished = bytearray(pkt)
    assert O.py_finish_csum(finished, 20, 16) and pb.checksums_ok(bytes(finished))
    assert O.py_tso_split(pkt, 1448) == segs                      # the exact segments again


@pytest.mark.parametrize("coalesce", COALESCE)
def test_coalesce_keeps_order_and_leaves_what_it_must_not_merge(coalesce) -> None:
    a = segments(os.urandom(4000), sport=1)
    b = segments(os.urandom(4000), sport=2)
    udp = pb.udp("100.64.0.1", "198.51.100.7", 5, 53, b"q")
    syn = pb.tcp("100.64.0.1", "198.51.100.7", 1, 2, b"", flags=0x02)
    gap = segments(os.urandom(3000), sport=3)
    writes = coalesce([a[0], a[1], b[0], udp, *a[2:], syn, gap[0], gap[2]])
    got = [unwrap(w) for w in writes]
    assert [h[1] for h, _ in got] == [O.GSO_TCPV4, 0, 0, 0, 0, 0, 0]
    assert got[0][1][40:] == a[0][40:] + a[1][40:]
    assert [p for _, p in got[1:]] == [b[0], udp, a[2], syn, gap[0], gap[2]]
    assert all(h == (0, 0, 0, 0, 0, 0) for h, _ in got[1:])
    assert coalesce([]) == [] and coalesce([udp]) == [bytes(10) + udp]


@settings(max_examples=150, deadline=None)
@given(sizes=st.lists(st.integers(1, 6000), min_size=1, max_size=6),
       gso=st.integers(500, 1448), order=st.randoms(use_true_random=False))
def test_coalesce_implementations_agree_and_lose_nothing(sizes: list[int], gso: int,
                                                         order) -> None:
    flows = [segments(os.urandom(s), gso=gso, sport=i + 1) for i, s in enumerate(sizes)]
    stream = [s for f in flows for s in f]
    if len(stream) > 3:                          # some interleaving, as the wire may do
        k = order.randrange(len(stream) - 1)
        stream[k], stream[k + 1] = stream[k + 1], stream[k]
    ref = O.py_coalesce(stream)
    if _fast is not None:
        assert _fast.coalesce(stream) == ref
    back = []
    for w in ref:
        hdr, pkt = unwrap(w)
        back += O.py_tso_split(pkt, hdr[3]) if hdr[1] == O.GSO_TCPV4 else [pkt]
    assert back == stream


_HEAP_PROBE = """
import ctypes, sys
from upmt_tun.runtime import keep_heap
class MI(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MI
ok = keep_heap() if sys.argv[1] == "keep" else None
bufs = [bytes(60000) for _ in range(60)]     # 3.6 MB of read-sized buffers on the heap
del bufs
print(ok, libc.mallinfo2().keepcost)
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "confstr")
                    or "glibc" not in (__import__("os").confstr("CS_GNU_LIBC_VERSION") or ""),
                    reason="glibc only")
def test_daemons_keep_freed_read_buffers_on_the_heap():
    """The daemons' malloc setting: freed 64 KB buffers stay on the heap (no brk/page-fault
    churn); by default glibc hands most of it back at once."""
    import subprocess
    import sys

    def run(mode: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode], capture_output=True,
                             text=True, check=True).stdout.split()
        return out[0], int(out[1])

    ok, kept = run("keep")
    _, default = run("default")
    assert ok == "True"
    assert default < 1 << 20          # 128 KiB, or more after mmapped blocks were freed
    # most of the 3.6 MB stays at the top of the heap (not all: other allocations of the
    # interpreter land between the buffers, and where depends on what was imported)
    assert kept >= 2 << 20
