"""Noise IK against the published cacophony vector, and its failure modes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from upmt_tun.signalling.noise import (
    PROTOCOL_NAME,
    HandshakeState,
    NoiseError,
    nonce,
    public_key,
)

V = json.loads((Path(__file__).parent / "vectors" / "noise_ik_25519_aesgcm_blake2s.json")
               .read_text())
X = bytes.fromhex


def _pair() -> tuple[HandshakeState, HandshakeState]:
    i = HandshakeState(initiator=True, static=X(V["init_static"]),
                       ephemeral=X(V["init_ephemeral"]),
                       remote_static=X(V["init_remote_static"]), prologue=X(V["init_prologue"]))
    r = HandshakeState(initiator=False, static=X(V["resp_static"]),
                       ephemeral=X(V["resp_ephemeral"]), prologue=X(V["resp_prologue"]))
    return i, r


def test_published_vector() -> None:
    assert V["protocol_name"].encode() == PROTOCOL_NAME
    assert public_key(X(V["resp_static"])) == X(V["init_remote_static"])
    i, r = _pair()
    m = V["messages"]
    c1 = i.write_message1(X(m[0]["payload"]))
    assert c1 == X(m[0]["ciphertext"])
    # This vector file's handshake_hash equals h after message 1 (not after message 2, as
    # the spec's GetHandshakeHash would give); the ciphertexts below pin the rest down.
    assert i.handshake_hash == X(V["handshake_hash"])
    assert r.read_message1(c1) == X(m[0]["payload"])
    assert r.remote_static == public_key(X(V["init_static"]))
    c2 = r.write_message2(X(m[1]["payload"]))
    assert c2 == X(m[1]["ciphertext"])
    assert i.read_message2(c2) == X(m[1]["payload"])
    assert i.handshake_hash == r.handshake_hash
    # transport messages alternate initiator, responder, ... with nonces 0, 0, 1, 1, ...
    k_ir, k_ri = i.split()
    assert (k_ir, k_ri) == r.split()
    counters = {0: 0, 1: 0}
    for n, msg in enumerate(m[2:]):
        side = n % 2
        key = AESGCM(k_ir if side == 0 else k_ri)
        assert key.encrypt(nonce(counters[side]), X(msg["payload"]), b"") == X(msg["ciphertext"])
        counters[side] += 1


def test_tampered_message1_fails_and_wrong_responder_key_fails() -> None:
    i, r = _pair()
    c1 = bytearray(i.write_message1(b"hello"))
    c1[40] ^= 1
    with pytest.raises(NoiseError):
        r.read_message1(bytes(c1))
    other = HandshakeState(initiator=False, static=bytes(range(32)))
    i, _ = _pair()
    with pytest.raises(NoiseError):
        other.read_message1(i.write_message1(b"hello"))


def test_truncated_and_low_order_points_raise_noise_error_only() -> None:
    r = HandshakeState(initiator=False, static=X(V["resp_static"]))
    for msg in (b"", bytes(10), bytes(96), b"\x01" + bytes(127)):
        with pytest.raises(NoiseError):
            r = HandshakeState(initiator=False, static=X(V["resp_static"]))
            r.read_message1(msg)


def test_random_ephemerals_agree() -> None:
    a_s, b_s = bytes(range(1, 33)), bytes(range(2, 34))
    i = HandshakeState(initiator=True, static=a_s, remote_static=public_key(b_s))
    r = HandshakeState(initiator=False, static=b_s)
    r.read_message1(i.write_message1(b""))
    i.read_message2(r.write_message2(b""))
    assert i.split() == r.split() and r.remote_static == public_key(a_s)
