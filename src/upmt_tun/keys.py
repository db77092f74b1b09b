"""X25519 keys in the base64 text form users see (as `wg genkey` / `wg pubkey`)."""

from __future__ import annotations

import base64
import binascii

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = ["generate", "public_of", "keypair"]


def generate() -> str:
    """A new private key, base64."""
    return base64.b64encode(X25519PrivateKey.generate().private_bytes_raw()).decode()


def public_of(private_b64: str | bytes) -> str:
    """The public key of a base64 private key; ValueError if it is not one."""
    try:
        raw = base64.b64decode(private_b64.strip(), validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise ValueError("not base64") from None
    if len(raw) != 32:
        raise ValueError("not 32 bytes")
    pub = X25519PrivateKey.from_private_bytes(raw).public_key()
    return base64.b64encode(pub.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


def keypair() -> tuple[str, str]:
    """(private, public), base64."""
    priv = generate()
    return priv, public_of(priv)
