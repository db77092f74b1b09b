"""ice/demux.py: is_stun, table-driven, and agreeing with the shared port's classifier."""

from __future__ import annotations

import pytest
from aioice import stun
from hypothesis import given
from hypothesis import strategies as st

from upmt_tun.dataplane.packet import KIND_STUN, classify
from upmt_tun.ice.demux import MAX_STUN, is_stun

COOKIE = b"\x21\x12\xa4\x42"
TID = bytes(range(12))


def _stun(body: bytes = b"", first: bytes = b"\x00\x01", length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return first + n.to_bytes(2, "big") + COOKIE + TID + body


def _binding() -> bytes:
    m = stun.Message(stun.Method.BINDING, stun.Class.REQUEST, transaction_id=TID)
    m.attributes["USERNAME"] = "abcd:efgh"
    m.add_message_integrity(b"x" * 22)
    return bytes(m)


@pytest.mark.parametrize(("data", "expected"), [
    (_binding(), True),
    (_stun(), True),                                    # header only: a shape, not a check
    (_stun(b"\0" * 8), True),
    (_stun(b"\0" * 8, first=b"\x01\x01"), True),        # success response
    (b"", False),
    (_stun()[:19], False),                              # shorter than a header
    (_stun(b"\0" * 8, length=12), False),               # length field lies
    (_stun(b"\0" * 6), False),                          # not a multiple of 4
    (_stun(first=b"\x40\x01"), False),                  # top bits 01
    (_stun(first=b"\x80\x01"), False),                  # a tunnel type byte
    (_stun(first=b"\xc0\x01"), False),
    (b"\x00\x01\x00\x00" + b"\x21\x12\xa4\x43" + TID, False),   # wrong cookie
    (b"INVITE sip:x SIP/2.0\r\n" + b"\0" * 20, False),
    (_stun(b"\0" * (MAX_STUN - 20)), True),
    (_stun(b"\0" * (MAX_STUN - 16)), False),            # larger than any check
])
def test_is_stun(data: bytes, expected: bool) -> None:
    assert is_stun(data) is expected
    assert is_stun(memoryview(data)) is expected
    assert is_stun(bytearray(data)) is expected


@given(st.binary(max_size=64) | st.builds(lambda b: _stun(b[:40] + b"\0" * (-len(b[:40]) % 4)),
                                          st.binary(max_size=40)))
def test_is_stun_never_raises_and_implies_the_classifier_says_stun(data: bytes) -> None:
    if is_stun(data):
        assert classify(data) == KIND_STUN
