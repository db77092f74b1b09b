"""Handshake packets: authorization, mac1, replayed initiations, rate limits, and the
cookies (mac2) that keep a flood from forged sources from starving real hosts."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import socket
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from upmt_tun import keys
from upmt_tun.anchor import HS_PER_TURN, Anchor
from upmt_tun.config import load_anchor_config
from upmt_tun.dataplane import shedfilter
from upmt_tun.dataplane.io import FakeTun
from upmt_tun.dataplane.packet import KIND_TUNNEL, TYPE_COOKIE, TYPE_DATA, TYPE_HS_RESP, classify
from upmt_tun.signalling.handshake import (
    COOKIE,
    COOKIE_LEN,
    COOKIE_LIMITED,
    COOKIE_SECRET_LIFE,
    INIT_LEN,
    MAC_LEN,
    QUEUE_FULL,
    QUEUED,
    RATE_LIMITED,
    RESP_LEN,
    HandshakeGate,
    Initiation,
    RateLimiter,
    Responder,
    TokenBucket,
)
from upmt_tun.signalling.noise import public_key

from .test_e2e_memory import World

AN, MH, EVE = bytes(range(32)), bytes(range(1, 33)), bytes(range(2, 34))
idx = itertools.count(100)


def test_handshake_gives_matching_sessions() -> None:
    r = Responder(AN, {public_key(MH): "laptop"})
    i = Initiation(static=MH, remote_static=public_key(AN), local_index=7, wall_ns=10**18)
    assert len(i.packet) == INIT_LEN and r.mac_ok(i.packet)
    acc = r.accept(i.packet, 0.0, lambda: next(idx))
    assert acc is not None and acc.peer == "laptop" and len(acc.response) == RESP_LEN
    s_mh = i.consume(acc.response, 0.0)
    assert s_mh is not None and s_mh.remote_index == acc.session.local_index
    assert acc.session.open(s_mh.seal(TYPE_DATA, b"up")) == (0, b"up")
    assert s_mh.open(acc.session.seal(TYPE_DATA, b"down")) == (0, b"down")


def test_unknown_key_gets_nothing_and_replayed_initiation_creates_nothing() -> None:
    r = Responder(AN, {public_key(MH): "laptop"})
    eve = Initiation(static=EVE, remote_static=public_key(AN), local_index=1, wall_ns=10**18)
    assert r.mac_ok(eve.packet)                      # she knows the anchor's public key ...
    assert r.accept(eve.packet, 0.0, lambda: next(idx)) is None   # ... but is not a peer
    i = Initiation(static=MH, remote_static=public_key(AN), local_index=7, wall_ns=10**18)
    assert r.accept(i.packet, 0.0, lambda: next(idx)) is not None
    assert r.accept(i.packet, 1.0, lambda: next(idx)) is None     # the same packet again
    old = Initiation(static=MH, remote_static=public_key(AN), local_index=8, wall_ns=10**18 - 1)
    assert r.accept(old.packet, 1.0, lambda: next(idx)) is None   # older timestamp
    new = Initiation(static=MH, remote_static=public_key(AN), local_index=9, wall_ns=10**18 + 1)
    assert r.accept(new.packet, 1.0, lambda: next(idx)) is not None


def test_mac1_filters_strangers_and_garbage() -> None:
    r = Responder(AN, {public_key(MH): "laptop"})
    wrong = Initiation(static=MH, remote_static=public_key(EVE), local_index=7, wall_ns=1)
    assert not r.mac_ok(wrong.packet)                # aimed at another anchor
    assert not r.mac_ok(b"\x81" + bytes(INIT_LEN - 1))
    assert not r.mac_ok(b"\x81" + bytes(10))
    i = Initiation(static=MH, remote_static=public_key(AN), local_index=7, wall_ns=1)
    bad = bytearray(i.packet)
    bad[50] ^= 1
    assert not r.mac_ok(bytes(bad))


def test_response_only_accepted_by_its_initiation() -> None:
    r = Responder(AN, {public_key(MH): "laptop"})
    i1 = Initiation(static=MH, remote_static=public_key(AN), local_index=7, wall_ns=5)
    i2 = Initiation(static=MH, remote_static=public_key(AN), local_index=8, wall_ns=6)
    acc = r.accept(i1.packet, 0.0, lambda: next(idx))
    assert acc is not None
    assert i2.consume(acc.response, 0.0) is None     # wrong receiver index / keys
    assert i1.consume(acc.response[:-1] + b"\0", 0.0) is None
    assert i1.consume(acc.response, 0.0) is not None


def test_token_bucket_and_rate_limiter() -> None:
    tb = TokenBucket(10.0, burst=3)
    assert [tb.take(0.0) for _ in range(4)] == [True, True, True, False]   # the burst
    assert tb.take(0.1) and not tb.take(0.1)                               # 10/s
    assert sum(tb.take(5.0) for _ in range(10)) == 3                       # never beyond burst
    assert not tb.take(4.0)                      # a clock going back refills nothing
    rl = RateLimiter(rate=5, burst=10)
    assert sum(rl.allow("1.1.1.1", 0.0) for _ in range(100)) == 10        # the burst
    assert rl.allow("2.2.2.2", 0.0)                                        # others unaffected
    assert sum(rl.allow("1.1.1.1", 1.0) for _ in range(100)) == 5         # refilled at its rate
    rl2 = RateLimiter(max_keys=10)
    for i in range(100):
        rl2.allow(f"10.0.0.{i}", 0.0)
    assert len(rl2.buckets) == 10                                          # bounded memory


def _never() -> bool:
    raise AssertionError("mac2 checked while not under load")


def test_gate_not_under_load_only_the_global_bound() -> None:
    g = HandshakeGate(capacity=256, total=50, load_hold=1.0)
    host = ("203.0.113.11", 40001)
    # 40/s from ONE address (a spoofer's, say): no per-source bucket, no mac2, no load
    for i in range(200):
        assert g.offer(b"i", host, i / 40, _never) == QUEUED
        g.take(1)
    assert not g.under_load(5.0)
    # beyond the global bucket: this very initiation puts the anchor under load
    verdicts = []
    for _ in range(60):
        verdicts.append(g.offer(b"i", host, 10.0, lambda: False))
        g.take(1)                                   # (drained: the queue does not fill)
    assert verdicts.count(QUEUED) == 50 and verdicts[50:] == [COOKIE] * 10
    assert g.under_load(10.5) and not g.under_load(11.0)                   # the hold time


def test_gate_under_load_cookies_then_per_source_for_proven_only() -> None:
    g = HandshakeGate(capacity=256, total=10, per_source=5, burst=10, cookies=100,
                      load_hold=1e9)
    for _ in range(11):
        g.offer(b"i", ("198.18.0.1", 1), 0.0, lambda: False)
    g.take(100)
    assert g.under_load(0.0)
    # unproven: cookie replies, bounded by their own bucket, whatever the source
    v = [g.offer(b"i", (f"198.18.{i >> 8}.{i & 255}", 1), 0.0, lambda: False)
         for i in range(300)]
    assert v.count(COOKIE) == 99 and v.count(COOKIE_LIMITED) == 201     # (one went above)
    # no cookie budget left: an initiation without mac2 is shed unchecked, one with a mac2
    # (maybe a real host's) is not; nothing is shed while not under load
    no_mac2, some_mac2 = bytes(INIT_LEN), bytes(INIT_LEN - 1) + b"\x01"
    assert g.shed(no_mac2, 0.0) and not g.shed(some_mac2, 0.0)
    assert not HandshakeGate(cookies=0.0).shed(no_mac2, 0.0)
    assert g.offer(b"i", ("198.18.9.9", 1), 0.5, lambda: False) == COOKIE   # refilled
    # unproven ones from the host's address spent nothing of its bucket
    host = ("203.0.113.11", 40001)
    for _ in range(50):
        g.offer(b"i", host, 1.0, lambda: False)
    v = [g.offer(b"i", host, 1.0, lambda: True) for _ in range(20)]
    assert v.count(QUEUED) == 10 and v.count(RATE_LIMITED) == 10          # its own burst
    assert g.offer(b"i", host, 1.3, lambda: True) == QUEUED                # 5/s refill
    assert g.offer(b"i", ("203.0.113.12", 1), 1.3, lambda: True) == QUEUED  # others: own


def test_gate_queue_bounded_and_load_from_its_fill_level() -> None:
    g = HandshakeGate(capacity=16, total=1000, load_hold=1.0)
    v = [g.offer(bytes([i]), ("10.0.0.1", i), 0.0, lambda: True) for i in range(40)]
    # the queue reaches 16 // 8 = 2: under load (mac2 decides, here proven: per source
    # bucket of 10), then full: counted drops
    assert v[:2] == [QUEUED, QUEUED]
    assert g.under_load(0.0) and len(g.queue) <= 16
    assert v.count(QUEUED) == len(g.queue) == 12 and v.count(RATE_LIMITED) == 28
    g2 = HandshakeGate(capacity=16, total=1000, load_hold=1.0, per_source=1e6, burst=1e6)
    v = [g2.offer(bytes([i]), ("10.0.0.1", i), 0.0, lambda: True) for i in range(40)]
    assert v.count(QUEUED) == 16 and v.count(QUEUE_FULL) == 24
    assert [d for d, _ in g2.take(3)] == [b"\x00", b"\x01", b"\x02"]     # oldest first
    assert len(g2.take(100)) == 13 and g2.take(5) == []
    assert g2.under_load(0.9) and not g2.under_load(1.1)    # emptied: load ends after hold


# -- cookies (mac2) -----------------------------------------------------------------------------

HOST = ("203.0.113.11", 40001)
OTHER = ("203.0.113.66", 40001)


def counting_random() -> Callable[[int], bytes]:
    """Deterministic 'randomness' for the responder: secrets and nonces all differ."""
    n = itertools.count(1)
    return lambda k: next(n).to_bytes(k, "big")


def test_initiation_layout_and_sizes() -> None:
    i = Initiation(static=MH, remote_static=public_key(AN), local_index=7, wall_ns=1)
    assert len(i.packet) == INIT_LEN == 148
    assert i.packet[-2 * MAC_LEN:-MAC_LEN] == i.mac1 and i.packet[-MAC_LEN:] == bytes(MAC_LEN)
    assert COOKIE_LEN == 52 < RESP_LEN < INIT_LEN          # no answer is bigger than a question
    assert classify(b"\x84" + bytes(COOKIE_LEN - 1)) == KIND_TUNNEL


def test_cookie_round_trip() -> None:
    r = Responder(AN, {public_key(MH): "laptop"}, random_bytes=counting_random())
    i = Initiation(static=MH, remote_static=public_key(AN), local_index=7, wall_ns=10**18)
    assert r.mac_ok(i.packet) and not r.mac2_ok(i.packet, HOST, 0.0)   # no cookie yet
    reply = r.cookie_reply(i.packet, HOST, 0.0)
    assert reply[0] == TYPE_COOKIE and len(reply) == COOKIE_LEN and reply[4:8] == i.packet[4:8]
    cookie = i.consume_cookie(reply)
    assert cookie is not None and cookie == r.cookie(HOST, 0.0) and len(cookie) == MAC_LEN
    # only this initiation takes it: another one (other index, other mac1), a tampered reply,
    # the same index with another mac1 (the AD), or a reply of another anchor
    i2 = Initiation(static=MH, remote_static=public_key(AN), local_index=8, wall_ns=10**18 + 1)
    assert i2.consume_cookie(reply) is None
    same_idx = Initiation(static=MH, remote_static=public_key(AN), local_index=7, wall_ns=2)
    assert same_idx.consume_cookie(reply) is None
    for k in (5, 20, COOKIE_LEN - 1):
        bad = bytearray(reply)
        bad[k] ^= 1
        assert i.consume_cookie(bytes(bad)) is None
    other_anchor = Responder(EVE, {public_key(MH): "laptop"})
    assert i.consume_cookie(other_anchor.cookie_reply(i.packet, HOST, 0.0)) is None
    assert i.consume_cookie(reply[:-1]) is None
    # the next initiation carries mac2: valid from that address, still a normal initiation
    j = Initiation(static=MH, remote_static=public_key(AN), local_index=9, wall_ns=10**18 + 2,
                   cookie=cookie)
    assert len(j.packet) == INIT_LEN and r.mac_ok(j.packet) and r.mac2_ok(j.packet, HOST, 1.0)
    acc = r.accept(j.packet, 1.0, lambda: next(idx))
    assert acc is not None and j.consume(acc.response, 1.0) is not None


def test_mac2_from_another_source_address_is_rejected() -> None:
    r = Responder(AN, {public_key(MH): "laptop"})
    i = Initiation(static=MH, remote_static=public_key(AN), local_index=7, wall_ns=1)
    cookie = i.consume_cookie(r.cookie_reply(i.packet, HOST, 0.0))
    assert cookie is not None
    j = Initiation(static=MH, remote_static=public_key(AN), local_index=8, wall_ns=2,
                   cookie=cookie)
    assert r.mac2_ok(j.packet, HOST, 0.0)
    assert not r.mac2_ok(j.packet, OTHER, 0.0)                       # another address
    assert not r.mac2_ok(j.packet, (HOST[0], HOST[1] + 1), 0.0)      # same address, other port
    assert not r.mac2_ok(j.packet, ("::ffff:203.0.113.11", HOST[1]), 0.0)
    assert not r.mac2_ok(j.packet, ("fe80::1%eth0", HOST[1]), 0.0)   # (no exception either)
    tampered = bytearray(j.packet)
    tampered[-1] ^= 1
    assert not r.mac2_ok(bytes(tampered), HOST, 0.0)


def test_cookie_secret_rotation() -> None:
    r = Responder(AN, {public_key(MH): "laptop"}, random_bytes=counting_random())
    t0 = 1000.0
    first = r.cookie(HOST, t0)
    assert r.cookie(HOST, t0 + COOKIE_SECRET_LIFE - 1) == first      # one secret, 2 minutes
    assert r.cookie(OTHER, t0) != first                               # per source address
    i = Initiation(static=MH, remote_static=public_key(AN), local_index=7, wall_ns=1,
                   cookie=first)
    assert r.mac2_ok(i.packet, HOST, t0 + COOKIE_SECRET_LIFE - 1)
    assert not r.mac2_ok(i.packet, HOST, t0 + COOKIE_SECRET_LIFE)     # a new secret
    second = r.cookie(HOST, t0 + COOKIE_SECRET_LIFE)
    assert second != first
    j = Initiation(static=MH, remote_static=public_key(AN), local_index=8, wall_ns=2,
                   cookie=second)
    assert r.mac2_ok(j.packet, HOST, t0 + COOKIE_SECRET_LIFE + 5)
    assert not r.mac2_ok(j.packet, HOST, t0 + 2 * COOKIE_SECRET_LIFE + 1)


# -- the anchor's rules, with an injected clock -------------------------------------------------

AN_PRIV, AN_PUB = keys.keypair()
MH_PRIV, MH_PUB = keys.keypair()
EVE_PRIV = keys.keypair()[0]


class Sent:
    local = ("203.0.113.1", 5060)

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def start(self, on_datagram: Callable[[bytes, tuple[str, int]], None],
              on_flush: object = None, on_batch: object = None) -> None:
        pass

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((bytes(data), addr))

    queue = sendto

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class AnchorRig:
    def __init__(self, tmp: Path) -> None:
        p = tmp / "anchor.toml"
        p.write_text(textwrap.dedent(f'''
            listen = "203.0.113.1:5060"
            vipa_pool = "100.100.0.0/16"
            nat_interface = "eth0"
            private_key = "{AN_PRIV}"
            [[peer]]
            name = "laptop"
            public_key = "{MH_PUB}"
            '''))
        self.now = 1000.0
        self.wall = 1_700_000_000 * 10**9
        self.path = Sent()
        self.anchor = Anchor(load_anchor_config(str(p)), tun=FakeTun(), path=self.path,
                             clock=lambda: self.now)
        self.an_pub = _b64(AN_PUB)

    def wall_ns(self) -> int:
        self.wall += 1_000_000
        return self.wall

    def feed(self, data: bytes, src: tuple[str, int]) -> list[tuple[bytes, tuple[str, int]]]:
        m = len(self.path.sent)
        self.anchor._on_datagram(data, src)      # noqa: SLF001 (the code under test)
        self.anchor.drain_handshakes(1 << 20)    # (the worker's DH work, done at once)
        return self.path.sent[m:]

    def initiation(self, key: str, index: int, cookie: bytes | None = None) -> Initiation:
        return Initiation(static=_b64(key), remote_static=self.an_pub, local_index=index,
                          wall_ns=self.wall_ns(), cookie=cookie)


def _b64(text: str) -> bytes:
    return base64.b64decode(text)


def forged(n: int) -> tuple[str, int]:
    return (f"198.18.{(n >> 8) & 0xFF}.{n & 0xFF}", 1024 + n % 60000)


def test_no_reply_when_not_under_load(tmp_path: Path) -> None:
    rig = AnchorRig(tmp_path)
    stranger = rig.initiation(EVE_PRIV, 1)
    sent: list[tuple[bytes, tuple[str, int]]] = []
    for n in range(150):                            # 50/s from 150 sources: below the bound
        rig.now += 0.02
        sent += rig.feed(stranger.packet, forged(n))
    for _ in range(50):                             # one source, 50/s: no per-source limit
        rig.now += 0.02
        sent += rig.feed(rig.initiation(EVE_PRIV, 2).packet, OTHER)
    garbage_mac2 = stranger.packet[:-MAC_LEN] + b"\x55" * MAC_LEN
    sent += rig.feed(garbage_mac2, OTHER)
    assert sent == []
    assert not rig.anchor.gate.under_load(rig.now)
    drops = rig.anchor.fwd.drops
    assert drops["handshake_rate_limited"] == 0 and drops["handshake_cookie_sent"] == 0
    assert drops["handshake_refused"] == 201         # each got its DH (and is no peer)
    # and the host gets its session at once, no cookie round trip
    i = rig.initiation(MH_PRIV, 3)
    (resp, to), = rig.feed(i.packet, HOST)
    assert to == HOST and resp[0] == TYPE_HS_RESP and i.consume(resp, rig.now) is not None


def test_forged_flood_cannot_starve_a_host_that_receives_its_cookie(tmp_path: Path) -> None:
    rig = AnchorRig(tmp_path)
    stranger = rig.initiation(EVE_PRIV, 1)           # valid mac1: it knows the anchor's key
    sent: list[tuple[bytes, tuple[str, int], bytes]] = []
    sessions = 0
    for n in range(20_000):                          # 2 500/s from 20 000 forged addresses
        rig.now += 0.0004                            # (within the cookie replies' budget)
        sent += [(d, a, stranger.packet) for d, a in rig.feed(stranger.packet, forged(n))]
        if n % 2000 == 1999:                         # now and then the real host tries
            i = rig.initiation(MH_PRIV, 10_000 + n)
            (reply, to), = rig.feed(i.packet, HOST)  # under load: a cookie, not the DH
            assert to == HOST and reply[0] == TYPE_COOKIE and len(reply) < len(i.packet)
            cookie = i.consume_cookie(reply)
            assert cookie is not None
            j = rig.initiation(MH_PRIV, 20_000 + n, cookie)   # at once, with mac2
            (resp, to), = rig.feed(j.packet, HOST)
            assert to == HOST and resp[0] == TYPE_HS_RESP
            assert j.consume(resp, rig.now, "anchor") is not None
            sessions += 1
    assert sessions == 10                            # each in one cookie round trip
    assert rig.anchor.gate.under_load(rig.now)
    drops = rig.anchor.fwd.drops
    # the DH work for forged sources: only before the anchor noticed the load
    assert drops["handshake_refused"] <= 210, drops        # the burst (+ its refill)
    assert drops["handshake_cookie_sent"] >= 19_000, drops
    # every answer to a forged source is a cookie reply, never bigger than its question
    assert {d[0] for d, _, _ in sent} == {TYPE_COOKIE}
    assert all(len(d) <= len(q) for d, _, q in sent)
    assert len(rig.anchor._peer_sessions["laptop"]) == 3    # noqa: SLF001 (capped as ever)
    # a forged source never sees its cookie; one obtained for the attacker's own address
    # (it can receive there) does not pass from a forged one: a new cookie reply, no DH
    assert drops["handshake_cookie_limited"] == 0          # (within the cookies' bucket)
    rig.now += 0.5                                   # (refills the cookies' bucket; loaded)
    refused = drops["handshake_refused"]
    atk_init = rig.initiation(EVE_PRIV, 5)
    (reply, _), = rig.feed(atk_init.packet, OTHER)
    atk_cookie = atk_init.consume_cookie(reply)
    assert atk_cookie is not None
    for n in range(100):
        p = rig.initiation(EVE_PRIV, 6 + n, atk_cookie).packet
        (d, a), = rig.feed(p, forged(n))
        assert d[0] == TYPE_COOKIE and a == forged(n)
    assert drops["handshake_refused"] == refused
    # from its own address the attacker is limited per source (and is no peer anyway)
    for n in range(100):
        rig.feed(rig.initiation(EVE_PRIV, 200 + n, atk_cookie).packet, OTHER)
    assert drops["handshake_refused"] - refused == 10       # its burst, then its rate
    # the flood stops: after the hold time the anchor is silent again and needs no mac2
    rig.now += 2.0
    i = rig.initiation(MH_PRIV, 99_999)
    (resp, _), = rig.feed(i.packet, HOST)
    assert resp[0] == TYPE_HS_RESP


@pytest.mark.virtual_time      # the forged burst is "fast" however loaded the machine is
async def test_agent_handshake_through_cookie_under_load(tmp_path: Path) -> None:
    """The real agent, anchor under load: each handshake takes a cookie round trip."""
    w = World(tmp_path)
    an = w.anchors[0]
    an.gate = HandshakeGate(load_hold=1e9)             # under load for the whole test
    stranger = Initiation(static=_b64(EVE_PRIV), remote_static=an.responder.hs_probe.s_pub,
                          local_index=1, wall_ns=1)
    for n in range(300):                               # a forged burst sets it off
        an._on_datagram(stranger.packet, forged(n))    # noqa: SLF001
    assert an.gate.under_load(w.agent.clock())
    cookies0 = an.fwd.drops["handshake_cookie_sent"]
    await w.start()
    try:
        st = w.agent.status()
        assert [t["state"] for t in st["tunnels"]] == ["up", "up"], st
        assert st["anchors"][0]["state"] == "associated"
        assert an.fwd.drops["handshake_cookie_sent"] - cookies0 >= 1
        assert w.agent.drops.get("bad_cookie", 0) == 0
        assert {x.peer.name for x in w.agent.links.values() if x.cookie} == {"an1"}
    finally:
        await w.stop()


# -- the kernel's share of a flood (dataplane/shedfilter.py) ------------------------------------


def test_gate_keep_fraction_follows_the_flood() -> None:
    g = HandshakeGate(total=100, cookies=1000, load_hold=1.0)
    no_mac2 = bytes(INIT_LEN)
    assert g.keep_fraction(0.0) == 1.0                    # no load: no filter
    t = 0.0
    for _ in range(20_000):                               # 20 000/s, mac2-less
        t += 1 / 20_000
        g.shed(no_mac2, t) or g.offer(no_mac2, ("198.18.0.1", 1), t, lambda: False)
    assert g.keep_fraction(t) == pytest.approx(1500 / 20_000, rel=0.05)
    keep = g.keep
    for _ in range(round(20_000 * keep)):                 # what the filter lets through
        t += 1 / (20_000 * keep)
        g.shed(no_mac2, t) or g.offer(no_mac2, ("198.18.0.1", 1), t, lambda: False)
    assert g.keep_fraction(t) == pytest.approx(keep, rel=0.05)   # the same estimate
    # the flood stopped: nothing arrives, the filter goes (back within a second if not)
    assert g.keep_fraction(t + 0.5) == 1.0
    assert g.keep_fraction(t + 2.5) == 1.0


def test_shed_filter_keeps_its_share_of_mac2_less_initiations_only() -> None:
    """On a loopback socket: the kernel drops mac2-less initiations beyond ``keep``;
    data, initiations with a mac2, other sizes always pass."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(0.05)
        kinds = {"no_mac2": b"\x81" + bytes(INIT_LEN - 1),
                 "mac2": b"\x81" + bytes(INIT_LEN - 2) + b"\x01",
                 "data": b"\x80" + bytes(INIT_LEN - 1), "short": b"\x81" + bytes(99)}

        def passed(p: bytes, n: int = 200) -> int:
            for _ in range(n):
                tx.sendto(p, rx.getsockname())
            got = 0
            with contextlib.suppress(TimeoutError):
                while True:
                    rx.recv(256)
                    got += 1
            return got

        for keep, expect in ((0.0, 0), (1.0, 200)):
            shedfilter.attach(rx, keep)
            assert {k: passed(p) for k, p in kinds.items()} == {
                "no_mac2": expect, "mac2": 200, "data": 200, "short": 200}
        shedfilter.attach(rx, 0.5)
        assert 50 < passed(kinds["no_mac2"]) < 150
        shedfilter.detach(rx)
        assert passed(kinds["no_mac2"]) == 200
        shedfilter.detach(rx)                              # none attached: no error
    finally:
        rx.close()
        tx.close()


async def test_handshake_worker_does_a_few_dh_per_loop_turn(tmp_path: Path) -> None:
    """The DH work is not done in the datagram callback: the worker drains the queue
    HS_PER_TURN at a time and lets the event loop run other callbacks (forwarding) between
    two batches."""
    rig = AnchorRig(tmp_path)
    an = rig.anchor
    inits = [rig.initiation(MH_PRIV, 500 + n) for n in range(12)]
    for i in inits:
        an._on_datagram(i.packet, HOST)                  # noqa: SLF001
    assert rig.path.sent == [] and len(an.gate.queue) == 12     # nothing done yet
    seen: list[int] = []
    loop = asyncio.get_running_loop()
    worker = asyncio.create_task(an._handshakes())      # noqa: SLF001

    def other() -> None:                                 # e.g. a TUN or socket read
        seen.append(len(an.gate.queue))
        if an.gate.queue:
            loop.call_soon(other)

    loop.call_soon(other)
    try:
        for _ in range(100):
            if len(rig.path.sent) == 12:
                break
            await asyncio.sleep(0)
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
    assert [to for _, to in rig.path.sent] == [HOST] * 12
    assert seen == [8, 4, 0], seen                       # one batch per turn
    assert HS_PER_TURN == 4
