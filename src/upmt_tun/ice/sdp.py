"""The SDP body of the UPMT rendezvous (SIP INVITE / 200), an RFC 8866 + RFC 8839 subset.

One session, one ``m=application`` line (our tunnel is not RTP), the ICE attributes and
two UPMT attributes::

    v=0
    o=- <session id> <version> IN IP4 <default address>
    s=-
    c=IN IP4 <default address>
    t=0 0
    a=ice-options:ice2
    m=application <default port> UDP/UPMT upmt
    a=ice-ufrag:<4..64 ice-chars>
    a=ice-pwd:<22..128 ice-chars>
    a=upmt-vipa:<the sender's VIpA at the shared anchor>
    a=upmt-key:<the sender's X25519 public key, base64>
    a=candidate:<RFC 8839 candidate> (0..16 of them)
    a=end-of-candidates

The default address and port are those of the best candidate (RFC 8839 section 4.2.1.1),
or ``0.0.0.0`` port 9 when there is none. :func:`parse` is strict and small: a body over
:data:`MAX_BODY` bytes, an unknown line type, a missing or repeated mandatory line, a bad
value, more than :data:`MAX_REMOTE_CANDIDATES` candidates: ``ValueError`` with one line
saying what. Unknown ``a=`` attributes are ignored (RFC 8866 section 5.13), within the
line cap. The VIpA and key ride here for convenience; the anchor vouches for them over the
authenticated channel, so the driver must compare them with what the anchor said rather
than trust this body.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

from .candidates import IceCandidate

__all__ = [
    "MAX_BODY",
    "MAX_LINES",
    "MAX_REMOTE_CANDIDATES",
    "IceDescription",
    "build",
    "new_credentials",
    "parse",
]

MAX_BODY = 4096
MAX_LINES = 48
MAX_LINE = 256
MAX_REMOTE_CANDIDATES = 16
UFRAG_LEN = (4, 64)       # RFC 8839 allows 4..256; we never need more than 64
PWD_LEN = (22, 128)       # RFC 8839 allows 22..256
KEY_LEN = 32
PROTO = "UDP/UPMT"
_ICE_CHARS = re.compile(r"[A-Za-z0-9+/]+\Z")
_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+\Z")
_DIGITS = re.compile(r"[0-9]{1,20}\Z")
_SESSION_LINES = frozenset("vosiuepcbtrzka")


def new_credentials(rng: Callable[[int], bytes]) -> tuple[str, str]:
    """A fresh (ufrag, pwd): 48 and 144 random bits (RFC 8445 asks >= 24 and >= 128).

    ``rng(n)`` returns n random bytes (``os.urandom``; tests pass a seeded one). The base64
    alphabet is exactly RFC 8839's ice-char set, and 6/18 bytes encode without padding.
    """
    return (base64.b64encode(rng(6)).decode("ascii"),
            base64.b64encode(rng(18)).decode("ascii"))


@dataclass(frozen=True)
class IceDescription:
    ufrag: str
    pwd: str
    candidates: tuple[IceCandidate, ...]
    vipa: str | None = None
    public_key: bytes | None = None
    session_id: int = 0
    session_version: int = 0
    end_of_candidates: bool = True


def _check_ice_chars(what: str, value: str, bounds: tuple[int, int]) -> None:
    if not bounds[0] <= len(value) <= bounds[1] or not _ICE_CHARS.match(value):
        raise ValueError(f"sdp: {what} must be {bounds[0]}..{bounds[1]} ice-chars")


def build(desc: IceDescription) -> str:
    """The SDP body for ``desc`` (CRLF line ends). Raises ValueError on local misuse."""
    _check_ice_chars("ice-ufrag", desc.ufrag, UFRAG_LEN)
    _check_ice_chars("ice-pwd", desc.pwd, PWD_LEN)
    if len(desc.candidates) > MAX_REMOTE_CANDIDATES:
        raise ValueError(f"sdp: more than {MAX_REMOTE_CANDIDATES} candidates")
    if desc.public_key is not None and len(desc.public_key) != KEY_LEN:
        raise ValueError("sdp: public key must be 32 bytes")
    best = max(desc.candidates, key=lambda c: c.priority, default=None)
    ip, port = best.addr if best else ("0.0.0.0", 9)
    fam = "IP6" if ":" in ip else "IP4"
    lines = [
        "v=0",
        f"o=- {desc.session_id} {desc.session_version} IN {fam} {ip}",
        "s=-",
        f"c=IN {fam} {ip}",
        "t=0 0",
        "a=ice-options:ice2",
        f"m=application {port} {PROTO} upmt",
        f"a=ice-ufrag:{desc.ufrag}",
        f"a=ice-pwd:{desc.pwd}",
    ]
    if desc.vipa is not None:
        lines.append(f"a=upmt-vipa:{ipaddress.IPv4Address(desc.vipa)}")
    if desc.public_key is not None:
        lines.append(f"a=upmt-key:{base64.b64encode(desc.public_key).decode('ascii')}")
    lines += [f"a=candidate:{c.to_sdp()}" for c in desc.candidates]
    if desc.end_of_candidates:
        lines.append("a=end-of-candidates")
    body = "\r\n".join(lines) + "\r\n"
    if len(body) > MAX_BODY:
        raise ValueError("sdp: body too long")
    return body


class _Parsed:
    def __init__(self) -> None:
        self.once: dict[str, str] = {}
        self.candidates: list[IceCandidate] = []
        self.end = False
        self.media = False

    def set_once(self, key: str, value: str) -> None:
        if key in self.once:
            raise ValueError(f"sdp: {key} repeated")
        self.once[key] = value


def _session_origin(value: str) -> tuple[int, int]:
    f = value.split(" ")
    if len(f) != 6 or f[3] != "IN" or f[4] not in ("IP4", "IP6"):
        raise ValueError("sdp: bad o= line")
    if not _TOKEN.match(f[0]) or not _DIGITS.match(f[1]) or not _DIGITS.match(f[2]):
        raise ValueError("sdp: bad o= line")
    return int(f[1]), int(f[2])


def _media(value: str) -> None:
    f = value.split(" ")
    if len(f) < 4 or f[0] != "application" or f[2] != PROTO:
        raise ValueError(f"sdp: m= must be 'application <port> {PROTO} <fmt>'")
    if not _DIGITS.match(f[1]) or int(f[1]) > 65535:
        raise ValueError("sdp: bad m= port")
    if not all(_TOKEN.match(x) for x in f[3:]):
        raise ValueError("sdp: bad m= format")


def _attribute(p: _Parsed, value: str) -> None:
    name, sep, arg = value.partition(":")
    if not _TOKEN.match(name):
        raise ValueError("sdp: bad attribute name")
    if name == "candidate":
        if not p.media:
            raise ValueError("sdp: candidate before m=")
        if len(p.candidates) >= MAX_REMOTE_CANDIDATES:
            raise ValueError(f"sdp: more than {MAX_REMOTE_CANDIDATES} candidates")
        p.candidates.append(IceCandidate.from_sdp(arg))
    elif name == "end-of-candidates":
        if sep:
            raise ValueError("sdp: end-of-candidates takes no value")
        if p.end:
            raise ValueError("sdp: end-of-candidates repeated")
        p.end = True
    elif name in ("ice-ufrag", "ice-pwd", "upmt-vipa", "upmt-key", "ice-options"):
        if not sep:
            raise ValueError(f"sdp: {name} needs a value")
        p.set_once(name, arg)
    # any other attribute: ignored (RFC 8866 section 5.13)


def parse(body: str | bytes) -> IceDescription:
    """Parse a rendezvous SDP body strictly. ValueError (one line) on anything malformed."""
    if isinstance(body, bytes | bytearray):
        if len(body) > MAX_BODY:
            raise ValueError("sdp: body too long")
        try:
            body = bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("sdp: not UTF-8") from None
    if len(body) > MAX_BODY:
        raise ValueError("sdp: body too long")
    text = body.replace("\r\n", "\n")
    if "\r" in text:
        raise ValueError("sdp: stray CR")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) > MAX_LINES:
        raise ValueError("sdp: too many lines")
    p = _Parsed()
    for i, line in enumerate(lines):
        if len(line) > MAX_LINE:
            raise ValueError("sdp: line too long")
        if len(line) < 2 or line[1] != "=" or not line[0].islower() or not line.isprintable():
            raise ValueError(f"sdp: malformed line {i + 1}")
        kind, value = line[0], line[2:]
        if i == 0 and line != "v=0":
            raise ValueError("sdp: must start with v=0")
        if kind == "m":
            if p.media:
                raise ValueError("sdp: only one m= line")
            _media(value)
            p.media = True
        elif kind == "a":
            _attribute(p, value)
        elif kind in "vost":
            if p.media:
                raise ValueError(f"sdp: {kind}= after m=")
            p.set_once(kind, value)
        elif kind not in _SESSION_LINES:
            raise ValueError(f"sdp: unknown line type {kind}=")
    for need in ("v", "o", "s", "t", "ice-ufrag", "ice-pwd"):
        if need not in p.once:
            raise ValueError(f"sdp: {need} missing")
    if not p.media:
        raise ValueError("sdp: m= missing")
    session_id, version = _session_origin(p.once["o"])
    ufrag, pwd = p.once["ice-ufrag"], p.once["ice-pwd"]
    _check_ice_chars("ice-ufrag", ufrag, UFRAG_LEN)
    _check_ice_chars("ice-pwd", pwd, PWD_LEN)
    vipa = None
    if "upmt-vipa" in p.once:
        try:
            vipa = str(ipaddress.IPv4Address(p.once["upmt-vipa"]))
        except ValueError:
            raise ValueError("sdp: upmt-vipa is not an IPv4 address") from None
    key = None
    if "upmt-key" in p.once:
        try:
            key = base64.b64decode(p.once["upmt-key"], validate=True)
        except binascii.Error:
            raise ValueError("sdp: upmt-key is not base64") from None
        if len(key) != KEY_LEN:
            raise ValueError("sdp: upmt-key must be 32 bytes")
    return IceDescription(ufrag=ufrag, pwd=pwd, candidates=tuple(p.candidates), vipa=vipa,
                          public_key=key, session_id=session_id, session_version=version,
                          end_of_candidates=p.end)
