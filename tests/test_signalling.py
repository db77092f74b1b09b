"""Signalling: UPMT JSON bodies, SIP MESSAGE codec and timers, the agent's SIP client. No root.

Remote garbage raises only ValueError (upmt.decode) or MalformedSip (sip.parse), never
anything else; the client survives stray and malformed answers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from upmt_tun.signalling import sip, upmt
from upmt_tun.signalling.client import SipClient, SipError

FAST = settings(max_examples=400, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# -- UPMT bodies -------------------------------------------------------------------------------

FULL: dict[str, dict[str, Any]] = {
    "AssociationReq": {"sipId": "laptop", "vipa": None, "addressInUse": ["10.1.0.2"],
                       "dataPlaintext": False},
    "AssociationResp": {"associationSuccess": True, "vipa": "100.100.0.2", "reason": "",
                        "role": "anchor", "addressesInUse": [], "dataPlaintext": False,
                        "mesh": True, "meshPool": "100.100.0.0/16", "vipa6": "fd64::2"},
    "TunnelSetupReq": {"sipId": "laptop", "vipa": "100.100.0.2", "tunnelId": 7,
                       "interface": "wan1"},
    "TunnelSetupResp": {"serverTunnelID": 3, "yourAddress": "203.0.113.11", "yourPort": 40001,
                        "challenge": "00ff"},
    "KeepAlive": {"sipId": "laptop", "tunnelId": 3, "lastDelay": 12.5, "challenge": "00ff"},
    "KeepAliveResp": {"tunnelId": 3, "yourAddress": "203.0.113.11", "yourPort": 40001,
                      "challenge": ""},
    "HandoverReq": {"sipId": "laptop", "tunnelId": 3,
                    "flows": [[6, "100.100.0.2", "203.0.113.100", 40000, 80]]},
    "HandoverResp": {"moved": 1},
    "PeerReq": {"sipId": "laptop", "vipa": "100.100.0.3"},
    "PeerResp": {"found": True, "name": "phone", "vipa": "100.100.0.3",
                 "publicKey": "c3RhbmQtaW4gZm9yIGEgMzItYnl0ZSBYMjU1MTkga2V5IQ=="},
}


def required(mtype: str) -> dict[str, Any]:
    return {k: v for k, v in FULL[mtype].items() if upmt.SCHEMA[mtype][k][1]}


def body(*items: Any) -> bytes:
    return json.dumps(list(items)).encode()


def test_every_schema_type_has_a_sample() -> None:
    assert set(FULL) == set(upmt.SCHEMA)
    for mtype, fields in upmt.SCHEMA.items():
        assert set(FULL[mtype]) == set(fields)


@pytest.mark.parametrize("mtype", sorted(upmt.SCHEMA))
def test_roundtrip_each_type(mtype: str) -> None:
    for content in (FULL[mtype], required(mtype)):
        assert upmt.decode(upmt.encode([(mtype, content)])) == [(mtype, content)]


def test_roundtrip_several_signals_and_extra_fields() -> None:
    sigs = [(t, FULL[t]) for t in sorted(upmt.SCHEMA)]
    for at in range(0, len(sigs), upmt.MAX_SIGNALS):      # at most 8 per body
        assert upmt.decode(upmt.encode(sigs[at:at + 8])) == sigs[at:at + 8]
    newer = [("KeepAlive", {**FULL["KeepAlive"], "futureField": {"x": [1, 2]}})]
    assert upmt.decode(upmt.encode(newer)) == newer       # unknown fields are ignored
    eight = [("KeepAlive", required("KeepAlive"))] * 8
    assert upmt.decode(upmt.encode(eight)) == eight
    assert upmt.decode(upmt.encode([("KeepAlive", {**required("KeepAlive"),
                                                   "lastDelay": None})]))
    assert upmt.decode(upmt.encode([("KeepAlive", {**required("KeepAlive"),
                                                   "lastDelay": 3})]))
    edge = [("TunnelSetupResp", {"serverTunnelID": 0xFFFFFFFF, "yourAddress": "x" * 256,
                                 "yourPort": 0})]
    assert upmt.decode(upmt.encode(edge)) == edge


KA = required("KeepAlive")

BAD_BODIES = {
    "not json": b"hello",
    "not utf-8": b"\xff\xfe\xfd",
    "empty": b"",
    "utf-8 bom": b"\xef\xbb\xbf[]",
    "object": body()[:0] + b'{"MType": "KeepAlive"}',
    "string": b'"KeepAlive"',
    "number": b"7",
    "null": b"null",
    "empty array": b"[]",
    "nine signals": body(*[{"MType": "KeepAlive", "MContent": KA}] * 9),
    "item not object": body(["KeepAlive", KA]),
    "unknown MType": body({"MType": "Bogus", "MContent": {}}),
    "MType not string": body({"MType": 1, "MContent": KA}),
    "MType list": body({"MType": ["KeepAlive"], "MContent": KA}),
    "missing MType": body({"MContent": KA}),
    "missing MContent": body({"MType": "KeepAlive"}),
    "MContent list": body({"MType": "KeepAlive", "MContent": [KA]}),
    "missing required": body({"MType": "KeepAlive", "MContent": {"sipId": "x"}}),
    "one good one bad": body({"MType": "KeepAlive", "MContent": KA},
                             {"MType": "KeepAlive", "MContent": {}}),
    "str as int": body({"MType": "KeepAlive", "MContent": {**KA, "tunnelId": "3"}}),
    "int as str": body({"MType": "KeepAlive", "MContent": {**KA, "sipId": 3}}),
    "float as int": body({"MType": "KeepAlive", "MContent": {**KA, "tunnelId": 3.0}}),
    "bool as int": body({"MType": "KeepAlive", "MContent": {**KA, "tunnelId": True}}),
    "bool as port": body({"MType": "TunnelSetupResp", "MContent": {
        "serverTunnelID": 1, "yourAddress": "a", "yourPort": False}}),
    "bool as delay": body({"MType": "KeepAlive", "MContent": {**KA, "lastDelay": True}}),
    "int as bool": body({"MType": "AssociationResp", "MContent": {"associationSuccess": 1}}),
    "null required": body({"MType": "KeepAlive", "MContent": {**KA, "sipId": None}}),
    "negative int": body({"MType": "KeepAlive", "MContent": {**KA, "tunnelId": -1}}),
    "int > u32": body({"MType": "KeepAlive", "MContent": {**KA, "tunnelId": 1 << 32}}),
    "huge int": body({"MType": "KeepAlive", "MContent": {**KA, "tunnelId": 10 ** 60}}),
    "long string": body({"MType": "KeepAlive", "MContent": {**KA, "sipId": "x" * 257}}),
    "list as string": body({"MType": "TunnelSetupReq", "MContent": {
        "sipId": "a", "vipa": ["1.2.3.4"], "tunnelId": 1}}),
    "huge body": body({"MType": "KeepAlive", "MContent": {**KA, "pad": "x" * upmt.MAX_BODY}}),
    "deep nesting, unbalanced": b"[" * 8000,
    "deep nesting, balanced": b"[" * 4000 + b"]" * 4000,
    "deep objects": b'{"a":' * 1500 + b"1" + b"}" * 1500,
}


@pytest.mark.parametrize("name", sorted(BAD_BODIES))
def test_decode_rejects(name: str) -> None:
    with pytest.raises(ValueError):
        upmt.decode(BAD_BODIES[name])


def test_decode_rejects_huge_digit_strings() -> None:
    with pytest.raises(ValueError):
        upmt.decode(b'[{"MType":"KeepAlive","MContent":{"sipId":"a","tunnelId":'
                    + b"9" * 5000 + b"}}]")


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=5),
    max_leaves=10)


_FIELDS = sorted({f for fields in upmt.SCHEMA.values() for f in fields} | {"extra"})
_signal_like = st.fixed_dictionaries(
    {"MType": st.sampled_from(sorted(upmt.SCHEMA) + ["Nope", ""])},
    optional={"MContent": st.dictionaries(st.sampled_from(_FIELDS), _json, max_size=6)
              | st.fixed_dictionaries({"sipId": st.text(max_size=5),
                                       "tunnelId": st.integers(-2, 2**32 + 1) | st.booleans()},
                                      optional={"vipa": st.text(max_size=5)})})


@FAST
@given(st.binary(max_size=600))
def test_decode_random_bytes_only_valueerror(data: bytes) -> None:
    try:
        out = upmt.decode(data)
    except ValueError:
        return
    assert isinstance(out, list) and 1 <= len(out) <= 8


@settings(FAST, max_examples=200)
@given(_json | st.lists(_signal_like, min_size=0, max_size=9))
def test_decode_random_json_only_valueerror(doc: Any) -> None:
    try:
        out = upmt.decode(json.dumps(doc).encode())
    except ValueError:
        return
    for mtype, content in out:                 # what passes is well typed
        for name, (types, req) in upmt.SCHEMA[mtype].items():
            if req:
                assert name in content
            if name in content:
                v = content[name]
                assert isinstance(v, types)
                assert not (isinstance(v, bool) and bool not in types)
                if isinstance(v, int) and not isinstance(v, bool):
                    assert 0 <= v <= 0xFFFFFFFF


# -- SIP codec ---------------------------------------------------------------------------------

TARGET = ("203.0.113.1", 5060)
VIA = ("10.1.0.2", 40001)
BRANCH = "z9hG4bK0123456789abcdef"
CALL_ID = "cafebabe12345678"
BODY = upmt.encode([("AssociationReq", {"sipId": "laptop"})])


def request(body: bytes = BODY, cseq: int = 7, branch: str = BRANCH) -> bytes:
    return sip.build_request(target=TARGET, from_user="laptop", via=VIA, call_id=CALL_ID,
                             cseq=cseq, branch=branch, body=body)


def header_lines(raw: bytes) -> tuple[list[str], bytes]:
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep, raw
    return head.decode().split("\r\n"), rest


def header(lines: list[str], name: str) -> list[str]:
    return [ln.split(":", 1)[1].strip() for ln in lines[1:]
            if ln.split(":", 1)[0].strip().lower() == name.lower()]


def test_build_request_parse() -> None:
    raw = request()
    msg = sip.parse(raw)
    assert isinstance(msg, sip.SipRequest)
    assert msg.method == "MESSAGE"
    assert msg.body == BODY
    h = msg.headers
    via = h.get_first("Via")
    assert via is not None and via.startswith("SIP/2.0/UDP 10.1.0.2:40001")
    assert ";rport" in via
    key = sip.transaction_key(msg)
    assert key is not None and key[0] == BRANCH and key[0].startswith("z9hG4bK")
    assert h.get_first("Call-ID") == CALL_ID
    assert h.get_first("CSeq") == "7 MESSAGE"
    assert h.get_first("Subject") == "UPMT"
    assert h.get_first("Content-Type") == "application/json"
    assert h.get_first("Max-Forwards") == "70"
    assert "laptop" in (h.get_first("From") or "") and ";tag=" in (h.get_first("From") or "")
    assert h.get_first("To")
    # on the wire: exact Content-Length, the body follows the blank line, nothing else
    lines, rest = header_lines(raw)
    assert lines[0] == "MESSAGE sip:upmt@203.0.113.1:5060 SIP/2.0"
    assert header(lines, "Content-Length") == [str(len(BODY))]
    assert rest == BODY


def test_build_request_empty_and_binary_body() -> None:
    raw = request(body=b"")
    lines, rest = header_lines(raw)
    assert header(lines, "Content-Length") == ["0"] and rest == b""
    raw = request(body=b"\x00\r\n\r\n\xff" * 3)
    assert sip.parse(raw).body == b"\x00\r\n\r\n\xff" * 3


def test_build_response_copies_headers() -> None:
    req = sip.parse(request())
    assert isinstance(req, sip.SipRequest)
    answer = upmt.encode([("AssociationResp", {"associationSuccess": True})])
    raw = sip.build_response(req, 200, "OK", answer, received=("198.51.100.9", 41234))
    resp = sip.parse(raw)
    assert isinstance(resp, sip.SipResponse)
    assert (resp.status_code, resp.reason_phrase) == (200, "OK")
    assert resp.body == answer
    h = resp.headers
    via = h.get_first("Via") or ""
    assert via.startswith("SIP/2.0/UDP 10.1.0.2:40001")
    assert f"branch={BRANCH}" in via
    assert "received=198.51.100.9" in via and "rport=41234" in via
    assert sip.transaction_key(resp) == sip.transaction_key(req)
    assert h.get_first("From") == req.headers.get_first("From")
    assert h.get_first("Call-ID") == CALL_ID
    assert h.get_first("CSeq") == "7 MESSAGE"
    to = h.get_first("To") or ""
    assert to.startswith(req.headers.get_first("To") or "") and ";tag=" in to
    assert h.get_first("Content-Type") == "application/json"
    lines, rest = header_lines(raw)
    assert lines[0] == "SIP/2.0 200 OK"
    assert header(lines, "Content-Length") == [str(len(answer))] and rest == answer


def test_build_response_keeps_existing_to_tag_and_only_the_top_via() -> None:
    raw = (b"MESSAGE sip:upmt@203.0.113.1:5060 SIP/2.0\r\n"
           b"Via: SIP/2.0/UDP 10.9.9.9:5060;branch=z9hG4bKtop;rport\r\n"
           b"Via: SIP/2.0/UDP 10.8.8.8:5060;branch=z9hG4bKsecond\r\n"
           b"From: <sip:a@upmt.invalid>;tag=aaa\r\nTo: <sip:upmt@x>;tag=bbb\r\n"
           b"Call-ID: c1\r\nCSeq: 1 MESSAGE\r\nContent-Length: 0\r\n\r\n")
    req = sip.parse(raw)
    assert isinstance(req, sip.SipRequest)
    resp = sip.parse(sip.build_response(req, 501, "Not Implemented", received=("1.2.3.4", 99)))
    assert isinstance(resp, sip.SipResponse)
    vias = resp.headers.get("Via")
    assert len(vias) == 1   # no proxies in UPMT: an answer never outgrows its request
    assert "received=1.2.3.4" in vias[0] and "rport=99" in vias[0]
    assert resp.headers.get_first("To") == "<sip:upmt@x>;tag=bbb"
    assert resp.body == b""


def _without(raw: bytes, name: str) -> bytes:
    return b"\r\n".join(ln for ln in raw.split(b"\r\n")
                        if not ln.lower().startswith(name.lower().encode() + b":"))


@pytest.mark.parametrize("name", ["Via", "Call-ID", "CSeq", "From", "To"])
def test_parse_rejects_request_missing_header(name: str) -> None:
    raw = _without(request(), name)
    assert raw != request()
    with pytest.raises(sip.MalformedSip):
        sip.parse(raw)


_HDRS = b"Via: x\r\nCall-ID: c\r\nCSeq: 1 MESSAGE\r\nFrom: a\r\nTo: b\r\n\r\n"


@pytest.mark.parametrize("raw", [
    b"",
    b"MESSAGE",
    b"\r\n\r\n",
    b"SIP/2.0 999 Weird\r\nVia: SIP/2.0/UDP a;branch=z9hG4bKx\r\n\r\n",
    b"SIP/2.0 99 Low\r\n\r\n",
    b"message sip:a@b SIP/2.0\r\n" + _HDRS,
    b"MES-SAGE sip:a@b SIP/2.0\r\n" + _HDRS,
    b"HTTP/1.1 200 OK\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\xff\xfe\xfd\xfc",
])
def test_parse_rejects_garbage(raw: bytes) -> None:
    with pytest.raises(sip.MalformedSip):
        sip.parse(raw)


def test_parse_rejects_oversize() -> None:
    big = request(body=b"x" * (sip.MAX_SIP + 1))
    with pytest.raises(sip.MalformedSip):
        sip.parse(big)


def test_malformed_sip_is_a_valueerror() -> None:
    assert issubclass(sip.MalformedSip, ValueError)


def test_transaction_key_needs_magic_branch() -> None:
    msg = sip.parse(request(branch="oldstyle123"))
    assert sip.transaction_key(msg) is None


def _mutate(base: bytes) -> st.SearchStrategy[bytes]:
    def apply(data: bytes, ops: list[tuple[int, int, bytes]]) -> bytes:
        for kind, pos, chunk in ops:
            pos %= len(data) + 1
            if kind == 0:
                data = data[:pos] + chunk + data[pos:]
            elif kind == 1:
                data = data[:pos] + data[pos + len(chunk) + 1:]
            else:
                data = data[:pos] + chunk + data[pos + len(chunk):]
        return data
    return st.lists(st.tuples(st.integers(0, 2), st.integers(0, 10_000),
                              st.binary(min_size=0, max_size=12)
                              | st.sampled_from([b"\r\n", b":", b";", b" ", b"\r\n\r\n",
                                                 b"Via:", b"Content-Length: 9999", b"\x00"])),
                    min_size=1, max_size=6).map(lambda ops: apply(base, ops))


@FAST
@given(st.binary(max_size=400) | _mutate(request())
       | _mutate(sip.build_response(sip.parse(request()), 200, "OK", b"[]",  # type: ignore[arg-type]
                                    received=("1.2.3.4", 5))))
def test_parse_random_only_malformedsip(data: bytes) -> None:
    lg = logging.getLogger("aiosipua")
    old = lg.level
    lg.setLevel(logging.CRITICAL)
    try:
        try:
            msg = sip.parse(data)
        except sip.MalformedSip:
            return
        sip.transaction_key(msg)
        if isinstance(msg, sip.SipRequest):
            sip.build_response(msg, 200, "OK", b"[]", received=("1.2.3.4", 5))
        else:
            assert 100 <= msg.status_code <= 699
    finally:
        lg.setLevel(old)


SHORT_BODY = (b"MESSAGE sip:upmt@203.0.113.1:5060 SIP/2.0\r\n"
              b"Via: SIP/2.0/UDP 10.1.0.2:40001;branch=z9hG4bKabc;rport\r\n"
              b"From: <sip:a@upmt.invalid>;tag=1\r\nTo: <sip:upmt@x>\r\nCall-ID: c\r\n"
              b"CSeq: 1 MESSAGE\r\nContent-Length: 58\r\n\r\n[]")


def test_parse_rejects_truncated_body() -> None:
    with pytest.raises(sip.MalformedSip):
        sip.parse(SHORT_BODY)


def test_parse_garbage_does_not_log_warnings(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        for raw in (SHORT_BODY, request() + b"trailing junk"):
            try:
                sip.parse(raw)
            except sip.MalformedSip:
                pass
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


# -- timers and the response cache ------------------------------------------------------------


def test_retransmit_schedule_rfc3261() -> None:
    s = list(sip.retransmit_schedule(32))
    assert s == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 0.5]
    assert sum(s) == 32.0                       # Timer F = 64*T1
    assert sip.T1 == 0.5 and sip.T2 == 4.0
    s = list(sip.retransmit_schedule(1.6))
    assert s[:2] == [0.5, 1.0] and len(s) == 3
    assert sum(s) == pytest.approx(1.6)
    assert list(sip.retransmit_schedule(1.5)) == [0.5, 1.0]
    assert sum(sip.retransmit_schedule(0.2)) == pytest.approx(0.2)
    for t in (0.7, 3.3, 10.0, 31.9, 64.0):
        s = list(sip.retransmit_schedule(t))
        assert sum(s) == pytest.approx(t) and all(d > 0 for d in s)
        assert all(d <= sip.T2 for d in s)


def test_response_cache_timer_j() -> None:
    c = sip.ResponseCache()
    k = (("z9hG4bKa", "c", "1 MESSAGE"), ("1.2.3.4", 5))
    c.put(k, 100.0, b"resp")
    assert c.get(k, 100.0) == b"resp"
    assert c.get(k, 131.9) == b"resp"          # within Timer J (32 s)
    assert c.get(k, 132.5) is None             # after it
    assert c.get(("other",), 100.0) is None
    c.put(k, 200.0, b"new")
    assert c.get(k, 200.0) == b"new"


def test_response_cache_is_bounded() -> None:
    c = sip.ResponseCache(cap=50)
    for i in range(1000):
        c.put((i,), 0.0, b"r%d" % i)
    assert c.get((999,), 1.0) == b"r999"
    assert c.get((950,), 1.0) == b"r950"
    assert c.get((949,), 1.0) is None          # evicted: oldest first
    assert c.get((0,), 1.0) is None
    assert len(c._d) <= 50                     # noqa: SLF001 (white-box: memory bound)


def test_response_cache_expires_old_entries_on_put() -> None:
    c = sip.ResponseCache(cap=10_000)
    for i in range(1000):
        c.put((i,), float(i), b"x")
    # every put forgets what is older than Timer J: only ~33 s worth remain
    assert len(c._d) <= 34                     # noqa: SLF001
    assert c.get((999,), 999.0) == b"x"


# -- the SIP client over a fake path -----------------------------------------------------------


class FakePath:
    def __init__(self) -> None:
        self.local = ("10.1.0.2", 40001)
        self.sent: list[tuple[float, bytes, tuple[str, int]]] = []
        self.event = asyncio.Event()

    def start(self, on_datagram: Any) -> None:
        pass

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((asyncio.get_running_loop().time(), data, addr))
        self.event.set()

    def close(self) -> None:
        pass

    async def next_send(self, n: int) -> sip.SipRequest:
        while len(self.sent) < n:
            self.event.clear()
            await asyncio.wait_for(self.event.wait(), 5)
        msg = sip.parse(self.sent[n - 1][1])
        assert isinstance(msg, sip.SipRequest)
        return msg


DEST = ("203.0.113.1", 5060)
ASSOC = [("AssociationReq", {"sipId": "laptop"})]
ASSOC_RESP = [("AssociationResp", {"associationSuccess": True, "vipa": "100.100.0.2"})]


async def test_client_retransmits_then_times_out() -> None:
    c = SipClient("laptop")
    p = FakePath()
    t0 = asyncio.get_running_loop().time()
    with pytest.raises(SipError) as ei:
        await c.request(p, DEST, ASSOC, 1.6)
    elapsed = asyncio.get_running_loop().time() - t0
    assert "203.0.113.1:5060" in str(ei.value)
    assert 1.55 <= elapsed < 3.0
    times = [s[0] - t0 for s in p.sent]
    assert len(times) == 3                                  # t = 0, 0.5, 1.5
    assert times[0] < 0.1
    assert times[1] == pytest.approx(0.5, abs=0.15)
    assert times[2] == pytest.approx(1.5, abs=0.3)
    assert all(s[2] == DEST for s in p.sent)
    assert len({s[1] for s in p.sent}) == 1                 # retransmissions are identical
    assert c.stats["requests"] == 1 and c.stats["retransmits"] == 2
    assert c.stats["timeouts"] == 1
    assert c.pending == {}
    msg = sip.parse(p.sent[0][1])
    assert isinstance(msg, sip.SipRequest)
    assert upmt.decode(msg.body) == ASSOC
    assert (msg.headers.get_first("Via") or "").startswith("SIP/2.0/UDP 10.1.0.2:40001")


async def test_client_completes_on_matching_response_and_ignores_strays() -> None:
    c = SipClient("laptop")
    p = FakePath()
    task = asyncio.create_task(c.request(p, DEST, ASSOC, 5.0))
    req = await p.next_send(1)
    other = sip.parse(request(branch="z9hG4bKsomethingelse"))
    assert isinstance(other, sip.SipRequest)
    c.on_datagram(sip.build_response(other, 200, "OK", upmt.encode(ASSOC_RESP)))
    c.on_datagram(b"SIP/2.0 garbage")
    c.on_datagram(b"\xff\x00 not sip at all")
    c.on_datagram(sip.build_response(req, 100, "Trying"))    # provisional: keep waiting
    c.on_datagram(bytes(request()))                          # a request: we serve none
    await asyncio.sleep(0.05)
    assert not task.done()
    assert c.stats["stray"] == 3 and c.stats["malformed"] >= 1
    c.on_datagram(sip.build_response(req, 200, "OK", upmt.encode(ASSOC_RESP),
                                     received=("203.0.113.11", 40002)))
    code, reason, sigs = await asyncio.wait_for(task, 2)
    assert (code, reason, sigs) == (200, "OK", ASSOC_RESP)
    assert len(p.sent) == 1                                  # answered before any retransmit
    assert c.stats["timeouts"] == 0 and c.pending == {}
    # a late duplicate of the answer is a stray, not a crash
    c.on_datagram(sip.build_response(req, 200, "OK", upmt.encode(ASSOC_RESP)))
    assert c.stats["stray"] == 4


async def test_client_answer_after_a_retransmission() -> None:
    c = SipClient("laptop")
    p = FakePath()
    task = asyncio.create_task(c.request_timed(p, DEST, ASSOC, 5.0))
    await p.next_send(2)
    req = sip.parse(p.sent[1][1])
    assert isinstance(req, sip.SipRequest)
    c.on_datagram(sip.build_response(req, 200, "OK", upmt.encode(ASSOC_RESP)))
    (code, _, sigs), rtt = await asyncio.wait_for(task, 2)
    assert code == 200 and sigs == ASSOC_RESP
    assert 0 <= rtt < 0.3                                    # measured from the last send
    assert c.stats["retransmits"] == 1


async def test_client_error_status_and_bad_body() -> None:
    c = SipClient("laptop")
    p = FakePath()
    task = asyncio.create_task(c.request(p, DEST, ASSOC, 5.0))
    req = await p.next_send(1)
    c.on_datagram(sip.build_response(req, 501, "not registered"))
    assert await asyncio.wait_for(task, 2) == (501, "not registered", [])
    task = asyncio.create_task(c.request(p, DEST, ASSOC, 5.0))
    req = await p.next_send(2)
    c.on_datagram(sip.build_response(req, 200, "OK", b"{not json"))
    with pytest.raises(SipError):
        await asyncio.wait_for(task, 2)
    assert c.pending == {}


async def test_client_concurrent_transactions() -> None:
    c = SipClient("laptop")
    p = FakePath()
    t1 = asyncio.create_task(c.request(p, DEST, ASSOC, 5.0))
    r1 = await p.next_send(1)
    t2 = asyncio.create_task(c.request(p, DEST, [("KeepAlive", KA)], 5.0))
    r2 = await p.next_send(2)
    assert sip.transaction_key(r1) != sip.transaction_key(r2)
    cseqs = [r.headers.get_first("CSeq") for r in (r1, r2)]
    assert cseqs == ["1 MESSAGE", "2 MESSAGE"]
    ka_resp = [("KeepAliveResp", {"tunnelId": 3, "yourAddress": "a", "yourPort": 1})]
    c.on_datagram(sip.build_response(r2, 200, "OK", upmt.encode(ka_resp)))
    c.on_datagram(sip.build_response(r1, 200, "OK", upmt.encode(ASSOC_RESP)))
    assert (await asyncio.wait_for(t1, 2))[2] == ASSOC_RESP
    assert (await asyncio.wait_for(t2, 2))[2] == ka_resp


async def test_client_cancelled_request_leaves_nothing_pending() -> None:
    c = SipClient("laptop")
    p = FakePath()
    task = asyncio.create_task(c.request(p, DEST, ASSOC, 5.0))
    req = await p.next_send(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert c.pending == {}
    c.on_datagram(sip.build_response(req, 200, "OK", upmt.encode(ASSOC_RESP)))
    assert c.stats["stray"] == 1


def test_branch_tokens_are_unique() -> None:
    toks = {sip.new_token() for _ in range(1000)}
    assert len(toks) == 1000 and all(re.fullmatch(r"[0-9a-f]{16}", t) for t in toks)
