"""Batched data path: one decision per TUN super-packet, one open per UDP GRO read.

The batch paths must do exactly what the per-packet paths do: the same bytes on the
wire and into the TUN, the same counters, the same drops. Each test compares the two."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from upmt_tun import nat
from upmt_tun.dataplane import io as dio
from upmt_tun.dataplane import offload as O
from upmt_tun.dataplane.crypto import PyReplayWindow, Session, py_open_many, py_seal_run
from upmt_tun.dataplane.forwarder import AnchorForwarder, Association
from upmt_tun.dataplane.packet import TYPE_CONTROL, TYPE_DATA
from upmt_tun.tables import Tunnel

from . import pktbuild as pb
from .test_e2e_memory import CH, RULES, World
from .test_offload import partial

try:
    from upmt_tun.dataplane import _fast
except ImportError:  # pragma: no cover - the build decides
    _fast = None  # type: ignore[assignment]

K1, K2 = os.urandom(32), os.urandom(32)


def pair(plain: bool = False) -> tuple[Session, Session]:
    """Sender (index 1) and receiver (index 2) of one handshake's keys."""
    return (Session(1, 2, K1, K2, 0.0, plain_data=plain),
            Session(2, 1, K2, K1, 0.0, plain_data=plain))


@pytest.mark.parametrize("plain", [False, True])
def test_seal_run_is_seal_one_by_one_back_to_back(plain: bool) -> None:
    a, b = Session(1, 2, K1, K2, 0.0, plain_data=plain), Session(1, 2, K1, K2, 0.0,
                                                                 plain_data=plain)
    payloads = [os.urandom(1400), os.urandom(1400), os.urandom(333)]
    assert a.seal_run(TYPE_DATA, payloads, 9) == b"".join(
        b.seal(TYPE_DATA, p, 9) for p in payloads)
    assert a.send_counter == b.send_counter == 3
    assert a.seal_run(TYPE_DATA, []) == b"" and a.send_counter == 3
    for bad in ([b"x" * 10, b"x" * 11], [b"x" * 10, b"x" * 9, b"x" * 10]):
        with pytest.raises(ValueError):      # not a run: GSO would cut it wrong
            a.seal_run(TYPE_DATA, bad)
        assert a.send_counter == 3           # and no counter spent on it
    a.send_counter = (1 << 64) - (1 << 13) - 2
    with pytest.raises(OverflowError):
        a.seal_run(TYPE_DATA, payloads)


@pytest.mark.parametrize("plain", [False, True])
def test_open_many_opens_what_open_opens_in_order(plain: bool) -> None:
    tx, rx = pair(plain)
    ref = Session(2, 1, K2, K1, 0.0, plain_data=plain)
    dgs = [tx.seal(TYPE_DATA, os.urandom(100)) for _ in range(5)]
    forged = bytearray(dgs[2])
    forged[-1] ^= 1
    stranger = bytearray(dgs[3])
    stranger[4:8] = (77).to_bytes(4, "big")              # another session's index
    control = tx.seal(TYPE_CONTROL, os.urandom(100 - 16 * plain))     # sealed either way
    mix = [dgs[1], dgs[0], dgs[1], bytes(forged), control, bytes(stranger), dgs[4],
           dgs[3][:20]]                                   # a replay; the short one is last
    size = len(dgs[0])
    counters, pts, others, bad = rx.open_many(b"".join(mix), size)
    opened = list(zip(counters, pts, strict=True))
    want_opened, want_others, want_bad = [], [], 0
    for d in mix:
        if len(d) < 32 - 16 * plain or d[0] != TYPE_DATA or d[4:8] != b"\0\0\0\2":
            want_others.append(d)
            continue
        r = ref.open(d)
        if r is None:
            want_bad += 1
        else:
            want_opened.append(r)
    assert opened == want_opened and others == want_others and bad == want_bad
    # plaintext mode authenticates nothing: the forged and the short one open there
    assert len(opened) == (5 if plain else 3) and bad == (1 if plain else 2)
    assert rx.rx_packets == ref.rx_packets
    w, wr = (rx.plain_window, ref.plain_window) if plain else (rx.window, ref.window)
    assert (w.highest, w.seen_any) == (wr.highest, wr.seen_any)


@pytest.mark.skipif(_fast is None, reason="compiled hot path not built")
@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 5)), min_size=1, max_size=40),
       st.booleans())
def test_compiled_loops_match_the_reference(picks: list[tuple[int, int]], plain: bool) -> None:
    """Random runs of fresh, replayed, forged, foreign and short datagrams: the compiled
    seal_run/open_many give the reference's bytes, results and window."""
    tx = Session(1, 2, K1, K2, 0.0, plain_data=plain)
    run = tx.seal_run(TYPE_DATA, [os.urandom(64) for _ in range(41)], 3)
    step = len(run) // 41
    dgs = [run[i:i + step] for i in range(0, len(run), step)]
    mix = []
    for i, how in picks:
        d = bytearray(dgs[i])
        if how == 1:
            d[-1] ^= 1                            # forged (plaintext: just different)
        elif how == 2:
            d[4] ^= 1                             # another receiver
        elif how == 3:
            d[0] = TYPE_CONTROL
        mix.append(bytes(d))
    data = b"".join(mix) + (b"\x80" * 20 if picks[-1][1] == 4 else b"")
    size = len(dgs[0])
    rx = Session(2, 1, K2, K1, 0.0)
    ref_w, c_w = PyReplayWindow(), _fast.ReplayWindow()
    ref = py_open_many(AESGCM(K1), ref_w, 2, plain, data, size)   # what tx sealed with
    got = _fast.open_many(rx._recv, c_w, 2, plain, data, size)
    assert got == ref
    assert (c_w.highest, c_w.seen_any) == (ref_w.highest, ref_w.seen_any)
    assert all(c_w.check(c) == ref_w.check(c) for c in range(0, 45))
    for payloads in ([os.urandom(1400), os.urandom(1400), bytearray(os.urandom(7))],
                     [b""], [os.urandom(1)]):
        want = py_seal_run(AESGCM(K1), 0x80000005, 9, 2**64 - 3, payloads, plain)
        assert _fast.seal_run(Session(1, 2, K1, K2, 0.0)._send, 0x80000005, 9, 2**64 - 3,
                              payloads, plain) == want
        assert _fast.seal_run(AESGCM(K1), 0x80000005, 9, 2**64 - 3, payloads, plain) == want
    for fn in (py_seal_run, _fast.seal_run):
        with pytest.raises(ValueError):
            fn(AESGCM(K1), 0x80000005, 9, 0, [b"ab", b"abc"], plain)


@pytest.mark.skipif(_fast is None or _fast.LIBCRYPTO is None, reason="no compiled AEAD")
@pytest.mark.parametrize("evp", [False, True])
def test_compiled_aead_is_cryptographys_aes_gcm(evp: bool) -> None:
    """The libcrypto AES-256-GCM gives cryptography's bytes, refuses what it refuses:
    on the path Aead takes by default (the provider's functions on OpenSSL 3) and on
    the EVP calls."""
    ref = AESGCM(K1)
    seal, open_ = _fast.Aead(K1, True, evp=evp), _fast.Aead(K1, False, evp=evp)
    assert seal.path == open_.path == ("evp" if evp else _fast.AEAD_PATH)
    for n in (0, 1, 15, 16, 17, 1400, 9000):
        nonce, data, ad = os.urandom(12), os.urandom(n), os.urandom(n % 40)
        ct = seal.encrypt(nonce, data, ad)
        assert ct == ref.encrypt(nonce, data, ad)
        assert open_.decrypt(nonce, ct, ad) == data
        assert seal.encrypt(bytearray(nonce), memoryview(data), None if not ad else ad) == \
            ref.encrypt(nonce, data, ad or None)
        for bad in (ct[:-1] + bytes([ct[-1] ^ 1]), ct[:15], b""):
            with pytest.raises(InvalidTag):
                open_.decrypt(nonce, bad, ad)
        with pytest.raises(InvalidTag):
            open_.decrypt(nonce, ct, ad + b"x")
        assert open_.decrypt(nonce, ct, ad) == data            # a failure leaves no state
    with pytest.raises(ValueError):
        seal.encrypt(bytes(8), b"x", b"")
    with pytest.raises(ValueError):
        open_.encrypt(bytes(12), b"x", b"")                   # one direction per object
    with pytest.raises(ValueError):
        _fast.Aead(bytes(16), True, evp=evp)


@pytest.mark.skipif(_fast is None or _fast.LIBCRYPTO is None, reason="no compiled AEAD")
def test_the_environment_can_keep_the_evp_calls() -> None:
    """UPMT_AEAD=evp (read when _fast loads): the EVP calls, the same bytes."""
    code = ("from upmt_tun.dataplane import _fast; "
            "print(_fast.AEAD_PATH, _fast.Aead(bytes(32), True).path, "
            "_fast.Aead(bytes(32), True).encrypt(bytes(12), b'x' * 100, b'ad').hex())")
    env = dict(os.environ, UPMT_AEAD="evp")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[:2] == ["evp", "evp"]
    assert bytes.fromhex(out[2]) == AESGCM(bytes(32)).encrypt(bytes(12), b"x" * 100, b"ad")


def test_the_environment_can_force_cryptographys_aead(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UPMT_AEAD", "cryptography")
    a, b = pair()
    assert isinstance(a._send, AESGCM) and isinstance(b._recv, AESGCM)
    monkeypatch.delenv("UPMT_AEAD")
    c, d = pair()
    assert b.open(c.seal(TYPE_DATA, b"x")) is not None     # interoperate either way
    assert d.open(a.seal(TYPE_DATA, b"y")) is not None
    if _fast is not None and _fast.LIBCRYPTO:
        assert isinstance(c._send, _fast.Aead)


def test_flow_runs_group_one_flows_consecutive_packets() -> None:
    a = pb.tcp("100.64.0.1", CH, 40000, 80, b"a")
    b = pb.tcp("100.64.0.1", CH, 40000, 80, b"bb" * 300)       # same flow, other size
    c = pb.tcp("100.64.0.1", CH, 40001, 80, b"c")               # another port
    u = pb.udp("100.64.0.1", CH, 40000, 80, b"u")               # another protocol
    icmp = pb.icmp_echo("100.64.0.1", CH, 1, 1)
    frag = bytearray(a)
    frag[6] |= 0x20                                             # more fragments: alone
    opts = bytearray(b)
    opts[0] = 0x46                                              # IP options: alone
    pkts = [a, b, a, c, c, u, u, bytes(frag), a, bytes(opts), b, b"\x45" * 10, icmp, icmp]
    want = [3, 2, 2, 1, 1, 1, 1, 1, 1, 1]
    impls = [O.py_flow_runs] + ([_fast.flow_runs] if _fast is not None else [])
    for runs in impls:
        assert runs(pkts) == want
        assert runs([]) == []


def test_rewrite_run_is_nat_per_packet() -> None:
    pkts = [pb.tcp(CH, "100.100.0.2", 80, 40000, os.urandom(n)) for n in (0, 1, 1400)]
    pkts.append(pb.udp(CH, "100.100.0.2", 53, 40000, b"x"))
    pkts.append(pb.udp(CH, "100.100.0.2", 53, 40000, b"y", zero_csum=True))
    new = pb.ip("100.64.0.1")
    for is_src in (False, True):
        want = []
        for p in pkts[1:4]:
            b = bytearray(p)
            assert (nat.py_rewrite_src if is_src else nat.py_rewrite_dst)(b, new)
            want.append(bytes(b))
        assert O.py_rewrite_run(pkts, 1, 4, new, is_src) == want
        if _fast is not None:
            assert _fast.rewrite_run(pkts, 1, 4, new, is_src) == want
            assert _fast.rewrite_run(pkts, 0, 5, new, is_src) == \
                O.py_rewrite_run(pkts, 0, 5, new, is_src)
    assert all(pb.checksums_ok(p) for p in O.py_rewrite_run(pkts, 0, 5, new, False))


def anchor_with_host() -> tuple[AnchorForwarder, Tunnel, Tunnel]:
    """An anchor forwarder with one host (VIpA 100.100.0.2, session index 2) and two
    validated tunnels, at MH_A and MH_B."""
    fwd = AnchorForwarder()
    a = Association("laptop", "100.100.0.2", pb.ip("100.100.0.2"), created=0.0)
    fwd.add_association(a)
    s = Session(2, 1, K2, K1, 0.0, peer="laptop")
    a.session = fwd.sessions[2] = s
    ts = []
    for i, ep in enumerate((MH_A, MH_B)):
        t = Tunnel(fwd.tunnels.new_tid(), f"wan{i}", ("203.0.113.1", 5060), ep, "laptop",
                   "100.100.0.2", pb.ip("100.100.0.2"), i + 1, state="up")
        fwd.tunnels.add(t)
        a.tunnels[t.tid] = t
        a.by_addr[ep] = t
        ts.append(t)
    return fwd, ts[0], ts[1]


MH_A, MH_B = ("203.0.113.11", 40000), ("203.0.113.12", 40001)


def test_anchor_batch_learns_flows_as_per_packet() -> None:
    """Interleaved flows, a spoofed inner source and a flow moving to the other tunnel:
    from_path_many ends with the PAFT, counters and drops of from_path per datagram."""
    tx = Session(1, 2, K1, K2, 0.0)
    vip = "100.100.0.2"
    inner = [pb.tcp(vip, CH, 40000, 80, b"a" * 100), pb.tcp(vip, CH, 40000, 80, b"b" * 100),
             pb.tcp(vip, CH, 40001, 80, b"c" * 100), pb.tcp("100.100.0.3", CH, 1, 80, b"d" * 100),
             pb.tcp(vip, CH, 40000, 80, b"e" * 100), pb.tcp(vip, CH, 40000, 80, b"f" * 100)]
    first = [tx.seal(TYPE_DATA, p) for p in inner]              # all on tunnel A
    then = [tx.seal(TYPE_DATA, p) for p in inner[4:]]           # flow 40000 moves to B
    per, pa, pb_ = anchor_with_host()
    many, ma, mb = anchor_with_host()
    got_per = [per.from_path(d, MH_A, 1.0) for d in first] + \
        [per.from_path(d, MH_B, 2.0) for d in then]
    got_many, rest = many.from_path_many(b"".join(first), len(first[0]), MH_A, 1.0)
    more, rest2 = many.from_path_many(b"".join(then), len(then[0]), MH_B, 2.0)
    assert rest == rest2 == []
    assert got_many + more == [p for p in got_per if p is not None]
    assert per.drops == many.drops == {"spoofed_inner": 1}

    def table(f: AnchorForwarder) -> list[tuple[object, ...]]:
        return sorted((fl.key, fl.tunnel, fl.tx_packets, fl.last_seq,
                       [h[1:] for h in fl.history]) for fl in f.paft.flows())
    assert table(per) == table(many)
    assert [(t.rx_packets, t.rx_bytes, t.newest) for t in (pa, pb_)] == \
        [(t.rx_packets, t.rx_bytes, t.newest) for t in (ma, mb)]
    moved = [fl for fl in many.paft.flows() if fl.key[3] == 40000]
    assert moved[0].tunnel == mb.tid and moved[0].history[-1][3] == "implicit handover"


def vnet_tso(pkt: bytes, hdr_len: int, gso: int) -> bytes:
    return O.VNET_HDR.pack(O.NEEDS_CSUM, O.GSO_TCPV4, hdr_len, gso, 20, 16) + bytes(partial(pkt))


async def test_super_packets_cross_the_tunnel_whole_both_ways(tmp_path: Path) -> None:
    """A TSO read at the host: one route decision, its segments NATed and sealed as one
    GSO send; the anchor opens them as one GRO batch and writes each segment; and back."""
    w = World(tmp_path, rules=RULES)
    await w.start()
    try:
        vipa = w.agent.status()["anchors"][0]["vipa"]
        up = pb.tcp("100.64.0.1", CH, 40000, 80, os.urandom(6000))
        batches: list[int] = []
        an = w.anchors[0]
        on_batch = an.path.on_batch                                # type: ignore[attr-defined]
        assert on_batch is not None

        def spy(data: bytes, size: int, src: tuple[str, int]) -> None:
            batches.append(-(-len(data) // size))
            on_batch(data, size, src)

        an.path.on_batch = spy                                     # type: ignore[attr-defined]
        assert w.mh_tun.inject_read(vnet_tso(up, 40, 1400))
        await w.settle()
        assert batches == [5]                                      # one GSO send, 5 segments
        assert w.an_tuns[0].written == O.tso_split(up, 1400, pb.ip(vipa))
        assert all(pb.checksums_ok(p) for p in w.an_tuns[0].written)
        (flow,) = w.agent.status()["flows"]
        assert flow["tx_packets"] == 5
        (an_flow,) = an.status()["flows"]
        assert an_flow["tx_packets"] == 5 and an_flow["interface"] == "wan1"

        down = pb.tcp(CH, vipa, 80, 40000, os.urandom(5000))
        w.an_tuns[0].inject_read(vnet_tso(down, 40, 1000))
        await w.settle()
        want = []
        for seg in O.tso_split(down, 1000):
            b = bytearray(seg)
            assert nat.rewrite_dst(b, pb.ip("100.64.0.1"))
            want.append(bytes(b))
        assert w.mh_tun.written == want
        (flow,) = w.agent.status()["flows"]
        assert flow["rx_packets"] == 5
        tun = {t["interface"]: t for t in w.agent.status()["tunnels"]}["wan1"]
        assert tun["rx_packets"] == 5 and tun["tx_packets"] == 5
        assert not w.agent.fwd.drops and not an.fwd.drops
    finally:
        await w.stop()


async def test_path_socket_gso_send_and_gro_batch_on_loopback() -> None:
    """The real socket: a queue_run leaves in one UDP_SEGMENT send, and a GRO
    receiver with on_batch gets them whole (or one by one where the kernel did not
    coalesce: the same datagrams either way)."""
    loop = asyncio.get_running_loop()
    rs = dio.open_udp("127.0.0.1", 0)
    ss = dio.open_udp("127.0.0.1", 0)
    rx = dio.PathSocket(rs, loop, rs.getsockname())
    tx = dio.PathSocket(ss, loop, ss.getsockname())
    got: list[bytes] = []
    batches: list[int] = []

    def on_batch(data: bytes, size: int, src: tuple[str, int]) -> None:
        batches.append(size)
        got.extend(data[at:at + size] for at in range(0, len(data), size))

    rx.start(lambda d, a: got.append(d), None, on_batch)
    dgs = [bytes([i]) * (1016 if i < 3 else 516) for i in range(4)]
    tx.queue(b"single", rx.local)
    tx.queue_run(b"".join(dgs), 1016, rx.local)
    tx.flush()
    want = [b"single"] + dgs
    for _ in range(100):
        if len(got) >= len(want):
            break
        await asyncio.sleep(0.01)
    assert got == want and tx.send_errors == 0
    if tx.gso and rx.gro:
        assert batches == [1016]            # the four leave and arrive as one
    rx.close()
    tx.close()


class _Loop:
    """Just enough of an event loop: remembers the reader callback."""

    def __init__(self) -> None:
        self.readers: dict[int, Callable[[], None]] = {}

    def add_reader(self, fd: int, cb: Callable[[], None]) -> None:
        self.readers[fd] = cb

    def remove_reader(self, fd: int) -> bool:
        return self.readers.pop(fd, None) is not None


def test_tun_reader_flushes_small_packets_per_burst_and_super_packets_at_once() -> None:
    """TunDevice's reader on a SOCK_SEQPACKET pair standing in for /dev/net/tun (one
    message per read, EAGAIN when drained): small packets of one wake-up leave in one
    flush, a super-packet's datagrams right after its read."""
    import socket as so
    a, b = so.socketpair(so.AF_UNIX, so.SOCK_SEQPACKET)
    a.setblocking(False)
    tun = dio.TunDevice.__new__(dio.TunDevice)
    tun.loop, tun.fd, tun.vnet_hdr, tun.dropped, tun.name = _Loop(), a.fileno(), True, 0, "t"
    events: list[str] = []
    tun.start(lambda p: events.append(f"pkt{len(p)}"), lambda: events.append("flush"),
              lambda sp, gso: events.append(f"super{gso}"))
    small = [pb.udp("100.64.0.1", CH, 1, 2, b"x" * n) for n in (1, 2, 3)]
    big = pb.tcp("100.64.0.1", CH, 1, 2, os.urandom(3000))
    try:
        for p in small:
            b.send(bytes(O.VNET_HDR_LEN) + p)
        b.send(vnet_tso(big, 40, 1000))
        b.send(bytes(O.VNET_HDR_LEN) + small[0])
        tun.loop.readers[a.fileno()]()
        assert events == ["pkt29", "pkt30", "pkt31", "super1000", "flush", "pkt29", "flush"]
        assert tun.dropped == 0
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("how", ["raises", "wrong bytes"])
def test_a_libcrypto_aead_that_misbehaves_is_not_used(monkeypatch: pytest.MonkeyPatch,
                                                       how: str) -> None:
    """The libcrypto AEAD is checked against cryptography's once per process; one that
    refuses (a FIPS-mode libcrypto, say) or disagrees means AESGCM, not a failure."""
    from upmt_tun.dataplane import crypto

    class Bad:
        def __init__(self, key: bytes, seal: bool) -> None:
            if how == "raises":
                raise RuntimeError("EVP_CipherInit_ex failed")

        def encrypt(self, nonce: bytes, data: bytes, ad: bytes | None) -> bytes:
            return bytes(len(data) + 16)

        def decrypt(self, nonce: bytes, data: bytes, ad: bytes | None) -> bytes:
            return data[:-16]

    monkeypatch.setattr(crypto, "_FastAead", Bad)
    monkeypatch.setattr(crypto, "_fast_checked", [])
    monkeypatch.delenv("UPMT_AEAD", raising=False)     # the check runs whatever the run's
    a, b = pair()
    assert isinstance(a._send, AESGCM) and isinstance(b._recv, AESGCM)
    assert b.open(a.seal(TYPE_DATA, b"x")) == (0, b"x")
    assert crypto._fast_checked == [False]


class _SendRecorder:
    """A socket stand-in for PathSocket's send side: records what each call carried."""

    def __init__(self, refuse_gso: int = 0) -> None:
        self.calls: list[tuple[str, bytes, int]] = []     # (how, bytes, gso size or 0)
        self.refuse_gso = refuse_gso                      # an errno for UDP_SEGMENT sends

    def setsockopt(self, *a: object) -> None:
        pass

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        self.calls.append(("one", bytes(data), 0))

    def sendmsg(self, bufs: list[bytes], cmsg: list[tuple[int, int, bytes]], flags: int,
                addr: tuple[str, int]) -> None:
        if cmsg and self.refuse_gso:
            raise OSError(self.refuse_gso, os.strerror(self.refuse_gso))
        size = int.from_bytes(cmsg[0][2], "little") if cmsg else 0
        self.calls.append(("gso", b"".join(bytes(b) for b in bufs), size))


def _recorded(refuse_gso: int = 0) -> tuple[dio.PathSocket, _SendRecorder]:
    rec = _SendRecorder(refuse_gso)
    return dio.PathSocket(rec, None, ("10.0.0.1", 5060)), rec  # type: ignore[arg-type]


def test_flush_cuts_a_run_at_the_kernels_gso_limits_in_order() -> None:
    """47 sealed segments of a 64 KB super-packet (1472 bytes, a shorter last) leave in
    two UDP_SEGMENT sends, the first as large as the limits allow; queued small datagrams
    before and after keep their place, equal ones joined into one send."""
    ps, rec = _recorded()
    dst = ("10.0.0.2", 5060)
    run = b"".join(bytes([i]) * (1472 if i < 46 else 900) for i in range(47))
    ps.queue(b"a" * 60, dst)
    ps.queue(b"b" * 60, dst)
    ps.queue(b"c" * 40, dst)            # shorter: ends that GSO run
    ps.queue(b"d" * 100, dst)
    ps.queue_run(run, 1472, dst)
    ps.queue(b"e" * 10, ("10.0.0.3", 5060))
    ps.flush()
    per = min(dio.GSO_MAX_SEGMENTS, dio.GSO_MAX_BYTES // 1472)
    assert rec.calls == [("gso", b"a" * 60 + b"b" * 60 + b"c" * 40, 60), ("one", b"d" * 100, 0),
                         ("gso", run[:per * 1472], 1472), ("gso", run[per * 1472:], 1472),
                         ("one", b"e" * 10, 0)]
    assert all(len(c[1]) <= dio.GSO_MAX_BYTES for c in rec.calls)
    ps.flush()                          # the queue was emptied
    assert len(rec.calls) == 5 and ps.send_errors == 0


@pytest.mark.parametrize("refused", [errno.EIO, errno.EINVAL])
def test_a_refused_gso_send_falls_back_to_one_datagram_per_send(refused: int) -> None:
    ps, rec = _recorded(refused)
    dst = ("10.0.0.2", 5060)
    run = b"".join(bytes([i]) * (100 if i < 4 else 30) for i in range(5))
    ps.queue_run(run, 100, dst)
    ps.queue(b"x" * 50, dst)
    ps.queue(b"y" * 50, dst)
    ps.flush()
    want = [run[k:k + 100] for k in range(0, len(run), 100)] + [b"x" * 50, b"y" * 50]
    assert rec.calls == [("one", d, 0) for d in want]
    assert ps.gso is False and ps.send_errors == 0


def test_other_send_errors_count_every_datagram_they_lost() -> None:
    ps, rec = _recorded(errno.ENOBUFS)
    ps.queue_run(b"z" * 250, 100, ("10.0.0.2", 5060))    # 3 datagrams in one GSO send
    ps.flush()
    assert rec.calls == [] and ps.send_errors == 3 and ps.gso is True
