"""UPMT signals: the JSON bodies carried by SIP MESSAGE (as the original implementation).

A body is a JSON array of ``{"MType": name, "MContent": {fields}}``, so one
MESSAGE can carry several signals; the answer is ``200 OK`` with the matching
``...Resp`` signals, or an error status with a reason. :func:`decode` checks
every field against :data:`SCHEMA` and raises ``ValueError`` on anything else,
so handlers only ever see well-typed content.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["SCHEMA", "decode", "encode", "MAX_BODY"]

MAX_BODY = 8192
MAX_SIGNALS = 8

# field -> (type(s), required). Unknown fields are ignored (newer peers may add some).
SCHEMA: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "AssociationReq": {"sipId": ((str,), True), "vipa": ((str, type(None)), False),
                       "addressInUse": ((list,), False), "dataPlaintext": ((bool,), False)},
    "AssociationResp": {"associationSuccess": ((bool,), True), "vipa": ((str, type(None)), False),
                        "reason": ((str,), False), "role": ((str,), False),
                        "addressesInUse": ((list,), False), "dataPlaintext": ((bool,), False),
                        "mesh": ((bool,), False), "meshPool": ((str,), False),
                        "vipa6": ((str,), False)},
    "TunnelSetupReq": {"sipId": ((str,), True), "vipa": ((str,), True),
                       "tunnelId": ((int,), True), "interface": ((str,), False)},
    "TunnelSetupResp": {"serverTunnelID": ((int,), True), "yourAddress": ((str,), True),
                        "yourPort": ((int,), True), "challenge": ((str,), False)},
    "KeepAlive": {"sipId": ((str,), True), "tunnelId": ((int,), True),
                  "lastDelay": ((int, float, type(None)), False), "challenge": ((str,), False)},
    "HandoverReq": {"sipId": ((str,), True), "tunnelId": ((int,), True),
                    "flows": ((list,), True)},
    "HandoverResp": {"moved": ((int,), True)},
    # UPMT-DAM mesh: who is the host at this VIpA of the anchor's pool (the anchor vouches
    # for its public key, so the two hosts can run their own handshake)
    "PeerReq": {"sipId": ((str,), True), "vipa": ((str,), True)},
    "PeerResp": {"found": ((bool,), True), "name": ((str,), False), "vipa": ((str,), False),
                 "publicKey": ((str,), False)},
    "KeepAliveResp": {"tunnelId": ((int,), True), "yourAddress": ((str,), True),
                      "yourPort": ((int,), True), "challenge": ((str,), False)},
}


def _utf8(s: str) -> bool:
    """JSON may carry lone surrogates ("\\ud800"): refuse them at the boundary."""
    try:
        s.encode()
    except UnicodeEncodeError:
        return False
    return True


def encode(signals: list[tuple[str, dict[str, Any]]]) -> bytes:
    """Serialise signals into a MESSAGE body."""
    return json.dumps([{"MType": t, "MContent": c} for t, c in signals],
                      separators=(",", ":")).encode()


def decode(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    """Parse and check a MESSAGE body; ``ValueError`` on anything malformed or unknown."""
    if len(body) > MAX_BODY:
        raise ValueError("body too large")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):   # JSONDecodeError, UnicodeDecodeError, and
        raise ValueError("body is not JSON") from None   # integers over 4300 digits
    if not isinstance(doc, list) or not 1 <= len(doc) <= MAX_SIGNALS:
        raise ValueError("body must be a JSON array of 1..8 signals")
    out: list[tuple[str, dict[str, Any]]] = []
    for item in doc:
        if not isinstance(item, dict):
            raise ValueError("signal is not an object")
        mtype, content = item.get("MType"), item.get("MContent")
        if not isinstance(mtype, str) or mtype not in SCHEMA:
            raise ValueError(f"unknown signal {str(mtype)[:40]!r}")
        if not isinstance(content, dict):
            raise ValueError(f"{mtype}: MContent is not an object")
        for name, (types, required) in SCHEMA[mtype].items():
            if name not in content:
                if required:
                    raise ValueError(f"{mtype}: missing {name}")
                continue
            v = content[name]
            if isinstance(v, bool) and bool not in types:
                raise ValueError(f"{mtype}: bad {name}")
            if not isinstance(v, types):
                raise ValueError(f"{mtype}: bad {name}")
            if isinstance(v, int) and not isinstance(v, bool) and not 0 <= v <= 0xFFFFFFFF:
                raise ValueError(f"{mtype}: {name} out of range")
            if isinstance(v, str) and (len(v) > 256 or not _utf8(v)):
                raise ValueError(f"{mtype}: {name} too long or not UTF-8")
        out.append((mtype, content))
    return out
