"""Handshake packets: authorization, mac1, replayed initiations, rate limits."""

from __future__ import annotations

import itertools

from upmt_tun.dataplane.packet import TYPE_DATA
from upmt_tun.signalling.handshake import INIT_LEN, RESP_LEN, Initiation, RateLimiter, Responder
from upmt_tun.signalling.noise import public_key

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


def test_rate_limiter_per_source_and_total() -> None:
    rl = RateLimiter(per_source=5, burst=10, total=50)
    assert sum(rl.allow("1.1.1.1", 0.0) for _ in range(100)) == 10   # the burst
    assert rl.allow("2.2.2.2", 0.0)                                   # others unaffected
    assert sum(rl.allow("1.1.1.1", 1.0) for _ in range(100)) == 5    # refilled at its rate
    total = sum(rl.allow(f"10.0.{i // 250}.{i % 250}", 2.0) for i in range(1000))
    assert total <= 50                                                # global cap
    rl2 = RateLimiter(max_sources=10)
    for i in range(100):
        rl2.allow(f"10.0.0.{i}", 0.0)
    assert len(rl2.buckets) == 10                                     # bounded memory
