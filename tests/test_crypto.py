"""Sealing and the RFC 6479 replay window."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from upmt_tun.dataplane.crypto import (
    REJECT_AFTER_MESSAGES,
    PyReplayWindow,
    ReplayWindow,
    Session,
)
from upmt_tun.dataplane.packet import HEADER_LEN, TYPE_DATA

K1, K2 = bytes(range(32)), bytes(range(1, 33))
# the reference and, when built, the compiled window (the one sessions use)
WINDOWS = [pytest.param(PyReplayWindow, id="python")]
if ReplayWindow is not PyReplayWindow:
    WINDOWS.append(pytest.param(ReplayWindow, id="cython"))


def pair() -> tuple[Session, Session]:
    return Session(1, 2, K1, K2, 0.0), Session(2, 1, K2, K1, 0.0)


def test_seal_open_roundtrip_and_header_is_authenticated() -> None:
    a, b = pair()
    pkt = a.seal(TYPE_DATA, b"inner packet")
    assert pkt[4:8] == (2).to_bytes(4, "big") and len(pkt) == HEADER_LEN + 12 + 16
    assert b.open(pkt) == (0, b"inner packet")
    assert b.open(pkt) is None                               # replay
    p2 = bytearray(a.seal(TYPE_DATA, b"x"))
    p2[5] ^= 1                                               # receiver index is in the AD
    assert b.open(bytes(p2)) is None
    p3 = bytearray(a.seal(TYPE_DATA, b"x"))
    p3[-1] ^= 1
    assert b.open(bytes(p3)) is None
    assert a.open(a.seal(TYPE_DATA, b"x")) is None           # own key does not open


def test_bad_tag_with_huge_counter_does_not_move_the_window() -> None:
    a, b = pair()
    good = [a.seal(TYPE_DATA, bytes([i])) for i in range(5)]
    assert b.open(good[0]) is not None
    forged = bytearray(good[1])
    forged[8:16] = (10**12).to_bytes(8, "big")               # counter far ahead, tag now wrong
    assert b.open(bytes(forged)) is None
    assert b.window.highest == 0
    assert all(b.open(p) is not None for p in good[1:])      # still accepted afterwards


@pytest.mark.parametrize("Window", WINDOWS)
def test_window_edges(Window: type[PyReplayWindow]) -> None:
    w = Window()
    for c in (0, 1, 5000):
        assert w.check(c)
        w.update(c)
    assert not w.check(5000) and not w.check(0)              # dup; too old
    assert w.check(5000 - Window.WINDOW + 1)           # oldest still inside
    assert not w.check(5000 - Window.WINDOW)           # just outside
    assert w.check(4999)
    w.update(4999)
    assert not w.check(4999)


@pytest.mark.parametrize("Window", WINDOWS)
@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 10_000), st.integers(0, 2**64 - 1)), max_size=300))
def test_window_matches_a_simple_model(Window: type[PyReplayWindow], counters: list[int]
                                       ) -> None:
    """Accept iff never seen, not older than WINDOW below the highest seen, and below the
    limit where a session must rekey."""
    w, seen, highest = Window(), set(), -1
    for c in counters:
        expect = (c not in seen and (highest < 0 or c > highest - ReplayWindow.WINDOW)
                  and c < REJECT_AFTER_MESSAGES)
        assert w.check(c) == expect, (c, highest)
        if expect:
            w.update(c)
            seen.add(c)
            highest = max(highest, c)


def test_reordered_delivery_within_window_all_accepted_once() -> None:
    a, b = pair()
    pkts = [a.seal(TYPE_DATA, i.to_bytes(2, "big")) for i in range(1500)]
    order = list(range(1500))
    random.Random(7).shuffle(order[:])
    rng = random.Random(1)
    for i in range(0, 1500, 100):                            # reorder inside chunks of 100
        chunk = order[i:i + 100]
        rng.shuffle(chunk)
        order[i:i + 100] = chunk
    assert all(b.open(pkts[i]) is not None for i in order)
    assert all(b.open(p) is None for p in pkts)
