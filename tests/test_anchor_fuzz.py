"""In-process fuzz of the anchor's receive path (``Anchor._on_datagram``), over the fakes.

    attacker sockets 198.51.100.66:4000x --\\
                                            >-- anchor 203.0.113.1:5060 (FakeSocket) -> FakeTun
    mobile host      203.0.113.11:40001 ---/

Remote garbage is counted and dropped: no exception escapes the callback, nothing reaches the
TUN, no association/tunnel/flow state appears, and the only answers are SIP responses to
SIP-looking input. A bulk loop of 100 000 datagrams from ``random.Random(seed)`` (reproducible)
runs in a few seconds. Note: a syntactically valid AssociationReq does create an association
today (authentication arrives with the security issue), so mutated valid SIP is checked
separately, for "no exception, answers are SIP responses" only.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import struct
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from upmt_tun import nat
from upmt_tun.anchor import Anchor
from upmt_tun.config import load_anchor_config
from upmt_tun.dataplane.forwarder import AnchorForwarder
from upmt_tun.dataplane.io import FakeNetwork, FakeSocket, FakeTun
from upmt_tun.dataplane.packet import HEADER, STUN_COOKIE, TYPE_DATA
from upmt_tun.signalling import sip, upmt

from . import pktbuild as pb

LISTEN = ("203.0.113.1", 5060)
MH = ("203.0.113.11", 40001)
ATTACKERS = [("198.51.100.66", 40000 + i) for i in range(4)]
CH = "198.51.100.7"
SEED = 0x5EED
N_BULK = 100_000


class Rig:
    """An anchor over FakeNetwork/FakeTun; every source we use has a recording socket."""

    def __init__(self, tmp: Path) -> None:
        p = tmp / "anchor.toml"
        p.write_text(textwrap.dedent(f'''
            listen = "{LISTEN[0]}:{LISTEN[1]}"
            vipa_pool = "100.100.0.0/16"
            nat_interface = "eth0"
            '''))
        self.cfg = load_anchor_config(str(p))
        self.net = FakeNetwork()                 # synchronous delivery
        self.tun = FakeTun()
        self.now = 1000.0
        self.anchor = Anchor(self.cfg, tun=self.tun, path=self.net.socket(*LISTEN),
                             clock=lambda: self.now)
        self.replies: dict[tuple[str, int], list[bytes]] = {}
        self.peers: dict[tuple[str, int], FakeSocket] = {}
        for addr in [MH, *ATTACKERS]:
            self.replies[addr] = []
            s = self.net.socket(*addr)
            s.start(self._recorder(self.replies[addr]))
            self.peers[addr] = s

    @staticmethod
    def _recorder(box: list[bytes]) -> Callable[[bytes, tuple[str, int]], None]:
        def record(data: bytes, _src: tuple[str, int]) -> None:
            box.append(data)
        return record

    @property
    def fwd(self) -> AnchorForwarder:
        return self.anchor.fwd

    def sent(self) -> int:
        return sum(len(v) for v in self.replies.values()) + self.net.dropped

    def feed(self, data: bytes, src: tuple[str, int]) -> None:
        self.anchor._on_datagram(data, src)      # noqa: SLF001 (the code under test)

    def no_state(self) -> None:
        assert self.fwd.by_mh == {}
        assert self.fwd.by_vipa == {}
        assert len(self.fwd.tunnels) == 0
        assert len(self.fwd.paft) == 0
        assert self.tun.written == []


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


@pytest.fixture(autouse=True)
def _quiet_aiosipua() -> Iterator[None]:
    # aiosipua warns once per malformed Content-Length (see test_signalling's xfail): keep the
    # bulk loop from spending its time in log records.
    lg = logging.getLogger("aiosipua")
    old = lg.level
    lg.setLevel(logging.CRITICAL)
    yield
    lg.setLevel(old)


# -- generators ---------------------------------------------------------------------------------


def _inner_pool(rng: random.Random) -> list[bytes]:
    """Valid-looking IPv4 packets (right checksums), from many sources to many places."""
    addrs = [CH, "100.100.0.2", "100.100.0.1", "10.0.0.1", "8.8.8.8", "0.0.0.0",
             "255.255.255.255", "100.100.255.255"]
    pool = []
    for _ in range(300):
        s, d = rng.choice(addrs), rng.choice(addrs)
        sp, dp = rng.randrange(65536), rng.randrange(65536)
        payload = rng.randbytes(rng.randrange(0, 40))
        kind = rng.randrange(5)
        if kind == 0:
            pool.append(pb.udp(s, d, sp, dp, payload))
        elif kind == 1:
            pool.append(pb.tcp(s, d, sp, dp, payload))
        elif kind == 2:
            pool.append(pb.icmp_echo(s, d, sp, reply=rng.random() < 0.5))
        elif kind == 3:     # an ICMP error embedding a packet
            emb = pb.udp(rng.choice(addrs), rng.choice(addrs), sp, dp)[:28]
            pool.append(pb.ipv4(s, d, 1, bytes([3, 3, 0, 0, 0, 0, 0, 0]) + emb))
        else:               # a valid header with a damaged rest
            pkt = bytearray(pb.udp(s, d, sp, dp, payload))
            for _ in range(rng.randrange(1, 4)):
                pkt[rng.randrange(len(pkt))] = rng.randrange(256)
            pool.append(bytes(pkt))
    return pool


def _valid_request(signals: list[tuple[str, dict[str, object]]], branch: str,
                   via: tuple[str, int] = MH, cseq: int = 1) -> bytes:
    return sip.build_request(target=LISTEN, from_user="laptop", via=via,
                             call_id="c0ffee" + branch[-10:], cseq=cseq, branch=branch,
                             body=upmt.encode(signals))


SIP_WORDS = [b"MESSAGE", b"INVITE", b"REGISTER", b"OPTIONS", b"SIP/2.0", b"Via:", b"From:",
             b"To:", b"Call-ID:", b"CSeq:", b"Content-Length:", b"\r\n", b"\r\n\r\n", b";branch=",
             b"z9hG4bK", b"sip:", b"@", b":", b" ", b"200", b"OK"]


def _bulk(rng: random.Random, n: int) -> Iterator[tuple[str, bytes]]:
    """(category, datagram) for the no-state fuzz: nothing here is a complete valid request."""
    inners = _inner_pool(rng)
    # Requests that are complete SIP but carry no usable UPMT body (so create no state).
    junk_bodies = [b"", b"[]", b"{}", b"null", b"[" * 50, b'[{"MType":"Bogus"}]',
                   b'[{"MType":"KeepAlive","MContent":{"sipId":"x","tunnelId":1}}]',
                   b'[{"MType":"TunnelSetupReq","MContent":{"sipId":"x","vipa":"1.2.3.4",'
                   b'"tunnelId":1}}]',
                   b'[{"MType":"AssociationResp","MContent":{"associationSuccess":true}}]',
                   b'[{"MType":"AssociationReq","MContent":{"sipId":7}}]']
    valid = _valid_request([("AssociationReq", {"sipId": "laptop"})], "z9hG4bKfeedface00")
    body_at = valid.index(b"\r\n\r\n")
    randbytes, randrange, random_ = rng.randbytes, rng.randrange, rng.random
    for _ in range(n):
        r = random_()
        if r < 0.25:                                   # pure random bytes
            data = randbytes(randrange(0, 200))
            yield ("sip" if data[:1].isalpha() and data[:1].isupper() else "junk"), data
        elif r < 0.50:                                 # our tunnel header, random index
            idx = randrange(8) if random_() < 0.5 else randrange(1 << 32)
            hdr = HEADER.pack(TYPE_DATA, idx, randrange(1 << 64))
            inner = inners[randrange(len(inners))] if random_() < 0.6 else randbytes(
                randrange(0, 80))
            yield "data", hdr + inner
        elif r < 0.60:                                 # tunnel-looking, other type bytes
            yield "junk", bytes([0x81 + randrange(0x7F)]) + randbytes(randrange(0, 60))
        elif r < 0.70:                                 # STUN-looking
            yield "stun", (bytes([randrange(2), randrange(256)]) + randbytes(2) + STUN_COOKIE
                           + randbytes(randrange(12, 80)))
        elif r < 0.80:                                 # SIP-looking token soup
            words = [SIP_WORDS[randrange(len(SIP_WORDS))] for _ in range(randrange(1, 25))]
            yield "sip", bytes([65 + randrange(26)]) + b"".join(words) + randbytes(randrange(8))
        elif r < 0.90:                                 # a valid request cut before its body
            cut = randrange(1, body_at + 4)
            yield "sip", valid[:cut]
        else:                                          # complete request, unusable body
            branch = f"z9hG4bK{randrange(1 << 64):016x}"
            req = _valid_request([], branch)
            b = junk_bodies[randrange(len(junk_bodies))]
            head = req[:req.index(b"\r\n\r\n")].replace(b"Content-Length: 2",
                                                        b"Content-Length: %d" % len(b))
            yield "sip", head + b"\r\n\r\n" + b


# -- the bulk loop ----------------------------------------------------------------------------


def test_bulk_random_datagrams_create_nothing(rig: Rig) -> None:
    rng = random.Random(SEED)
    counts = {"junk": 0, "data": 0, "stun": 0, "sip": 0}
    answered = 0
    long_data = 0
    t0 = time.perf_counter()
    for i, (cat, data) in enumerate(_bulk(rng, N_BULK)):
        src = ATTACKERS[i & 3]
        box = rig.replies[src]
        before = len(box)
        before_all = rig.sent()
        rig.now += 0.001
        try:
            rig.feed(data, src)
        except Exception as e:  # pragma: no cover - the failure message
            pytest.fail(f"datagram #{i} ({cat}) raised {type(e).__name__}: {e}: {data[:120]!r}")
        counts[cat] += 1
        if data[:1] == b"\x80" and len(data) >= HEADER.size + 20:
            long_data += 1
        new = rig.sent() - before_all
        if cat != "sip":
            assert new == 0, f"datagram #{i} ({cat}) was answered: {data[:80]!r}"
            continue
        assert new == len(box) - before <= 1, "an answer went elsewhere than the source"
        if new:
            answered += 1
            reply = box[-1]
            msg = sip.parse(reply)
            assert isinstance(msg, sip.SipResponse), reply[:200]
            assert msg.status_code != 200, f"#{i} got 200 OK for {data[:200]!r}"
            assert len(reply) <= len(data) + 512, "amplification"
    elapsed = time.perf_counter() - t0
    assert sum(counts.values()) == N_BULK
    assert min(counts.values()) > 5000
    rig.no_state()
    assert rig.net.dropped == 0
    for addr in ATTACKERS:
        for reply in rig.replies[addr]:
            assert reply.startswith(b"SIP/2.0 ")
    # every datagram that classifies as ours was dropped as an unknown tunnel (the counter
    # `status` shows)
    assert rig.fwd.drops["unknown_tunnel"] == long_data > 20_000
    assert elapsed < 10, f"bulk loop took {elapsed:.1f} s"
    print(f"\nanchor fuzz: {N_BULK} datagrams in {elapsed:.2f} s, {counts}, "
          f"{answered} SIP answers, signalling {dict(rig.anchor.sig.stats)}")


# -- mutated valid SIP (creates associations: only "no exception, answers are SIP") ------------


def _mutations(rng: random.Random, base: bytes, n: int) -> Iterator[bytes]:
    lines = base.split(b"\r\n")
    for _ in range(n):
        r = rng.random()
        d = bytearray(base)
        if r < 0.25:                                    # flip bytes
            for _ in range(rng.randrange(1, 6)):
                d[rng.randrange(len(d))] = rng.randrange(256)
            yield bytes(d)
        elif r < 0.40:                                  # insert/delete a chunk
            pos = rng.randrange(len(d) + 1)
            if rng.random() < 0.5:
                yield bytes(d[:pos]) + rng.choice(SIP_WORDS + [rng.randbytes(4)]) + bytes(d[pos:])
            else:
                yield bytes(d[:pos]) + bytes(d[pos + rng.randrange(1, 20):])
        elif r < 0.55:                                  # drop / duplicate / shuffle header lines
            ls = list(lines)
            i = rng.randrange(1, len(ls) - 2)
            op = rng.randrange(3)
            if op == 0:
                del ls[i]
            elif op == 1:
                ls.insert(i, ls[i])
            else:
                j = rng.randrange(1, len(ls) - 2)
                ls[i], ls[j] = ls[j], ls[i]
            yield b"\r\n".join(ls)
        elif r < 0.65:                                  # lie about the length
            yield re_len(base, rng.choice([0, 1, 5, 57, 59, 10_000, -1]))
        elif r < 0.75:                                  # truncate anywhere
            yield base[:rng.randrange(len(base))]
        elif r < 0.85:                                  # mutate the JSON body only
            head, _, body = base.partition(b"\r\n\r\n")
            b = bytearray(body)
            for _ in range(rng.randrange(1, 4)):
                b[rng.randrange(len(b))] = rng.choice(b'{}[]":,0123456789truefalsn\\ ')
            yield head + b"\r\n\r\n" + bytes(b)
        elif r < 0.92:                                  # huge header values
            yield base.replace(b"Subject: UPMT", b"Subject: " + b"A" * rng.randrange(100, 9000))
        else:                                           # many Via headers
            via = [ln for ln in lines if ln.startswith(b"Via:")][0]
            extra = b"\r\n".join([via] * rng.randrange(2, 200))
            yield base.replace(via, extra, 1)


def re_len(raw: bytes, n: int) -> bytes:
    head, sep, body = raw.partition(b"\r\n\r\n")
    out = []
    for ln in head.split(b"\r\n"):
        out.append(b"Content-Length: %d" % n if ln.startswith(b"Content-Length:") else ln)
    return b"\r\n".join(out) + sep + body


def test_mutated_valid_sip(rig: Rig) -> None:
    rng = random.Random(SEED + 1)
    bases = [
        _valid_request([("AssociationReq", {"sipId": "laptop"})], "z9hG4bKa000000001"),
        _valid_request([("AssociationReq", {"sipId": "laptop"}),
                        ("TunnelSetupReq", {"sipId": "laptop", "vipa": "100.100.0.2",
                                            "tunnelId": 7, "interface": "wan1"})],
                       "z9hG4bKa000000002"),
        _valid_request([("TunnelSetupReq", {"sipId": "laptop", "vipa": "100.100.0.2",
                                            "tunnelId": 7})], "z9hG4bKa000000003"),
        _valid_request([("KeepAlive", {"sipId": "laptop", "tunnelId": 1, "lastDelay": 3.5})],
                       "z9hG4bKa000000004"),
    ]
    n = 0
    answered = 0
    t0 = time.perf_counter()
    for base in bases:
        for data in _mutations(rng, base, 4000):
            src = ATTACKERS[n & 3] if n % 5 else MH
            n += 1
            rig.now += 0.01
            box = rig.replies[src]
            before, before_all = len(box), rig.sent()
            cached = rig.anchor.sig.stats["retransmission"]
            try:
                rig.feed(data, src)
            except Exception as e:  # pragma: no cover
                pytest.fail(f"mutation #{n} raised {type(e).__name__}: {e}: {data[:200]!r}")
            new = rig.sent() - before_all
            assert new == len(box) - before <= 1
            if new:
                answered += 1
                assert data[:1].isalpha() and data[:1].isupper(), data[:40]
                msg = sip.parse(box[-1])
                assert isinstance(msg, sip.SipResponse)
                if rig.anchor.sig.stats["retransmission"] == cached:   # not a cached answer
                    assert len(box[-1]) <= len(data) + 512, "amplification"
    assert rig.net.dropped == 0
    assert answered > 0
    assert time.perf_counter() - t0 < 15
    # whatever state the valid ones created stays within the configured bounds
    assert len(rig.fwd.by_mh) <= rig.cfg.max_associations
    for a in rig.fwd.by_mh.values():
        assert ipaddress.IPv4Address(a.vipa) in rig.cfg.vipa_pool


# -- a correctly set-up association: only its own traffic reaches the TUN ---------------------


def _associate(rig: Rig) -> tuple[str, int]:
    """Associate 'laptop' and set up one tunnel from MH; (VIpA, the anchor's tunnel id)."""
    rig.feed(_valid_request([("AssociationReq", {"sipId": "laptop"})], "z9hG4bKb000000001"), MH)
    resp = sip.parse(rig.replies[MH][-1])
    assert isinstance(resp, sip.SipResponse) and resp.status_code == 200
    ((_, ar),) = upmt.decode(resp.body)
    vipa = ar["vipa"]
    rig.feed(_valid_request([("TunnelSetupReq", {"sipId": "laptop", "vipa": vipa,
                                                 "tunnelId": 7, "interface": "wan1"})],
                            "z9hG4bKb000000002", cseq=2), MH)
    resp = sip.parse(rig.replies[MH][-1])
    assert isinstance(resp, sip.SipResponse) and resp.status_code == 200
    ((_, tr),) = upmt.decode(resp.body)
    assert (tr["yourAddress"], tr["yourPort"]) == MH
    return vipa, tr["serverTunnelID"]


def test_only_the_association_reaches_the_tun(rig: Rig) -> None:
    vipa, tid = _associate(rig)
    vb = ipaddress.IPv4Address(vipa).packed
    rng = random.Random(SEED + 2)
    inners = _inner_pool(rng)
    good = [pb.udp(vipa, CH, 5000 + i, 53, b"q%d" % i) for i in range(50)]
    expected = []
    for i in range(30_000):
        r = rng.random()
        if r < 0.3:
            inner = good[rng.randrange(len(good))]
        elif r < 0.8:
            inner = inners[rng.randrange(len(inners))]
        else:
            inner = rng.randbytes(rng.randrange(0, 60))
        src = MH if rng.random() < 0.7 else ATTACKERS[i & 3]
        idx = tid if rng.random() < 0.7 else rng.choice([0, tid + 1, tid ^ 0x80000000])
        data = HEADER.pack(TYPE_DATA, idx, i) + inner
        rig.now += 0.001
        before = rig.sent()
        rig.feed(data, src)
        assert rig.sent() == before, "a data packet was answered on the path"
        key = nat.five_tuple(inner)
        if src == MH and idx == tid and key is not None and inner[12:16] == key[1] == vb:
            expected.append(inner)
    assert rig.tun.written == expected
    assert len(expected) > 4000        # the accept path was exercised
    for pkt in rig.tun.written:
        assert nat.five_tuple(pkt) is not None
    # flows were learnt only for the association's VIpA, all on its tunnel
    assert len(rig.fwd.paft) > 0
    for f in rig.fwd.paft.flows():
        assert f.key[1] == vb and f.tunnel == tid
    assert list(rig.fwd.by_mh) == ["laptop"]
    assert len(rig.fwd.tunnels) == 1


def test_icmp_error_with_spoofed_outer_source_is_dropped(rig: Rig) -> None:
    vipa, tid = _associate(rig)
    embedded = pb.udp(CH, vipa, 53, 5000, b"x")[:28]        # what the MH received from CH
    spoofed = pb.ipv4("8.8.8.8", CH, 1, bytes([3, 3, 0, 0, 0, 0, 0, 0]) + embedded)
    honest = pb.ipv4(vipa, CH, 1, bytes([3, 3, 0, 0, 0, 0, 0, 0]) + embedded)
    rig.feed(HEADER.pack(TYPE_DATA, tid, 1) + honest, MH)
    assert rig.tun.written == [honest]
    rig.feed(HEADER.pack(TYPE_DATA, tid, 2) + spoofed, MH)
    for pkt in rig.tun.written:
        assert pkt[12:16] == ipaddress.IPv4Address(vipa).packed, "spoofed source reached TUN"


def test_data_from_a_new_address_of_the_mh_is_dropped_until_keepalive(rig: Rig) -> None:
    vipa, tid = _associate(rig)
    pkt = pb.udp(vipa, CH, 5000, 53, b"q")
    rig.feed(HEADER.pack(TYPE_DATA, tid, 1) + pkt, ("203.0.113.99", 40001))
    assert rig.tun.written == []
    assert rig.fwd.drops["unknown_tunnel"] == 1
    rig.feed(HEADER.pack(TYPE_DATA, tid, 2) + pkt, MH)
    assert rig.tun.written == [pkt]


def test_truncated_headers_and_short_datagrams(rig: Rig) -> None:
    vipa, tid = _associate(rig)
    good = HEADER.pack(TYPE_DATA, tid, 1) + pb.udp(vipa, CH, 5000, 53, b"q")
    for n in range(len(good)):
        rig.feed(good[:n], MH)
    assert rig.tun.written == []
    rig.feed(good, MH)
    assert len(rig.tun.written) == 1
    for lie in (0, 19, 21, 0xFFFF):                    # inner total length lies
        bad = bytearray(good)
        struct.pack_into("!H", bad, 16 + 2, lie)
        rig.feed(bytes(bad), MH)
    # 0, 19: shorter than the header; 0xFFFF: longer than the datagram; 21 is consistent
    # (the kernel trims the surplus)
    assert len(rig.tun.written) == 2


def test_cached_answer_does_not_amplify(rig: Rig) -> None:
    branch = "z9hG4bKc000000001"
    big = _valid_request([("AssociationReq", {"sipId": "laptop"})], branch)
    via = [ln for ln in big.split(b"\r\n") if ln.startswith(b"Via:")][0]
    big = big.replace(via, b"\r\n".join([via] * 100), 1)
    assert len(big) < sip.MAX_SIP
    victim = ATTACKERS[0]
    rig.feed(big, victim)
    assert len(rig.replies[victim]) == 1
    small = (b"MESSAGE sip:u@x SIP/2.0\r\nVia: SIP/2.0/UDP 1.2.3.4:1;branch=" + branch.encode()
             + b"\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:c@d>\r\nCall-ID: c0ffee"
             + branch[-10:].encode() + b"\r\nCSeq: 1 MESSAGE\r\n\r\n")
    for _ in range(10):
        rig.feed(small, victim)
    sent_bytes = sum(len(r) for r in rig.replies[victim][1:])
    assert sent_bytes <= 10 * (len(small) + 512), (
        f"{10 * len(small)} bytes in, {sent_bytes} bytes out")


def test_icmp_error_quoting_another_hosts_flow_plants_no_key(rig: Rig) -> None:
    """A host's ICMP error whose quoted packet names another VIpA's flow must not create a
    PAFT entry for that flow (it would steal that host's downlink)."""
    vipa, tid = _associate(rig)
    victim = "100.100.0.77"
    quoted = pb.tcp(CH, victim, 80, 40000)[:28]          # CH -> victim, as if we received it
    icmp = struct.pack("!BBHI", 3, 3, 0, 0) + quoted
    icmp = icmp[:2] + struct.pack("!H", pb.csum(icmp)) + icmp[4:]
    pkt = pb.ipv4(vipa, CH, 1, icmp)
    rig.feed(HEADER.pack(TYPE_DATA, tid, 1) + pkt, MH)
    assert not rig.tun.written
    assert all(f.key[1] == ipaddress.IPv4Address(vipa).packed for f in rig.fwd.paft.flows())
