"""SIP (RFC 3261) MESSAGE transactions over UDP, on top of aiosipua's message layer.

aiosipua parses and serialises messages well but its server side answers
MESSAGE with 405 and its non-INVITE transactions have no timers (TRAPS.md), so
this module builds requests/responses itself and provides:

* :func:`retransmit_schedule`: Timer E (T1 doubling up to T2) until Timer F.
* :class:`ResponseCache`: a server answers a retransmitted request with the
  same response, without acting twice (RFC 3261 17.2.2, Timer J = 64*T1).

Pure code: no sockets; ``now`` passed in.
"""

from __future__ import annotations

import logging
import secrets
from collections import OrderedDict
from collections.abc import Iterator

from aiosipua.message import SipMessage, SipRequest, SipResponse

__all__ = ["MalformedSip", "ResponseCache", "SipRequest", "SipResponse", "build_request",
           "build_response", "parse", "retransmit_schedule", "T1", "T2"]

# aiosipua logs a warning per malformed datagram: remote garbage must not flood our logs
logging.getLogger("aiosipua").setLevel(logging.ERROR)

T1 = 0.5
T2 = 4.0
TIMER_J = 64 * T1
MAX_SIP = 8192
BRANCH_MAGIC = "z9hG4bK"


class MalformedSip(ValueError):
    """A datagram that is not a usable SIP message: count and drop."""


def new_token() -> str:
    return secrets.token_hex(8)


def _hostport(host: str, port: int) -> str:
    """RFC 3261 hostport: an IPv6 reference in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def build_request(*, target: tuple[str, int], from_user: str, via: tuple[str, int], call_id: str,
                  cseq: int, branch: str, body: bytes, subject: str = "UPMT") -> bytes:
    """A MESSAGE request to ``target`` whose Via names ``via`` (host, port)."""
    dest = _hostport(*target)
    req = SipRequest(method="MESSAGE", uri=f"sip:upmt@{dest}")
    h = req.headers
    h.set_single("Via", f"SIP/2.0/UDP {_hostport(*via)};branch={branch};rport")
    h.set_single("Max-Forwards", "70")
    h.set_single("From", f"<sip:{from_user}@upmt.invalid>;tag={call_id[:8]}")
    h.set_single("To", f"<sip:upmt@{dest}>")
    h.set_single("Call-ID", call_id)
    h.set_single("CSeq", f"{cseq} MESSAGE")
    h.set_single("Subject", subject)
    h.set_single("Content-Type", "application/json")
    req.body = body
    return bytes(req)


def build_response(req: SipRequest, code: int, reason: str, body: bytes = b"",
                   received: tuple[str, int] | None = None) -> bytes:
    """The response to ``req`` (copies Via, From, To (+tag), Call-ID, CSeq)."""
    resp = SipResponse(status_code=code, reason_phrase=reason)
    h = resp.headers
    vias = req.headers.get("via")
    if vias:   # UPMT has no proxies: echo only the top Via, so an answer never outgrows its request
        v = vias[0]
        if received is not None:
            v = f"{v};received={received[0]}".replace(";rport", f";rport={received[1]}", 1)
        h.append("Via", v)
    for name in ("From", "Call-ID", "CSeq"):
        value = req.headers.get_first(name)
        if value is not None:
            h.set_single(name, value)
    to = req.headers.get_first("To") or ""
    h.set_single("To", to if ";tag=" in to else f"{to};tag=upmt")
    if body:
        h.set_single("Content-Type", "application/json")
    resp.body = body
    return bytes(resp)


def parse(data: bytes) -> SipRequest | SipResponse:
    """Parse a datagram; :class:`MalformedSip` for anything unusable (never another error)."""
    if len(data) > MAX_SIP:
        raise MalformedSip("too large")
    try:
        msg = SipMessage.parse(data)
    except Exception as e:  # the parser may raise several types on hostile input
        raise MalformedSip(f"unparsable ({type(e).__name__})") from None
    declared = msg.headers.get_first("content-length")
    if declared is not None:
        if not declared.strip().isdigit() or int(declared) != len(msg.body):
            raise MalformedSip("bad Content-Length")   # RFC 3261 18.3: discard
    if isinstance(msg, SipRequest):
        if not msg.method.isalpha() or not msg.method.isupper():
            raise MalformedSip("bad method")
        for name in ("via", "call-id", "cseq", "from", "to"):
            if not msg.headers.get_first(name):
                raise MalformedSip(f"missing {name}")
    elif not 100 <= msg.status_code <= 699:
        raise MalformedSip("bad status")
    return msg


def transaction_key(msg: SipMessage) -> tuple[str, str, str] | None:
    """(branch, Call-ID, CSeq) identifying a request's transaction, or None."""
    via = msg.headers.get_first("via") or ""
    branch = ""
    for part in via.split(";")[1:]:
        k, _, v = part.strip().partition("=")
        if k.lower() == "branch":
            branch = v
    if not branch.startswith(BRANCH_MAGIC):
        return None
    return branch, msg.headers.get_first("call-id") or "", msg.headers.get_first("cseq") or ""


def retransmit_schedule(timeout: float) -> Iterator[float]:
    """Delays between sends of a non-INVITE request over UDP (Timer E) until Timer F."""
    elapsed, interval = 0.0, T1
    while elapsed + interval < timeout:
        yield interval
        elapsed += interval
        interval = min(interval * 2, T2)
    yield timeout - elapsed  # last wait, then the transaction times out


class ResponseCache:
    """Server side: the response sent for each recent transaction, bounded."""

    def __init__(self, cap: int = 4096) -> None:
        self._d: OrderedDict[tuple[object, ...], tuple[float, bytes]] = OrderedDict()
        self.cap = cap

    def get(self, key: tuple[object, ...], now: float) -> bytes | None:
        hit = self._d.get(key)
        if hit is None or now - hit[0] > TIMER_J:
            return None
        return hit[1]

    def put(self, key: tuple[object, ...], now: float, response: bytes) -> None:
        self._d[key] = (now, response)
        self._d.move_to_end(key)
        while len(self._d) > self.cap:
            self._d.popitem(last=False)
        while self._d:
            k, (t, _) = next(iter(self._d.items()))
            if now - t <= TIMER_J:
                break
            del self._d[k]
