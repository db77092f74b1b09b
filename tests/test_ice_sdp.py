"""ice/sdp.py: the rendezvous SDP body, built and parsed strictly, fuzzed with Hypothesis."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from upmt_tun.ice.candidates import TunnelSocket, gather
from upmt_tun.ice.sdp import (
    MAX_BODY,
    MAX_REMOTE_CANDIDATES,
    IceDescription,
    build,
    new_credentials,
    parse,
)

CANDS = gather([TunnelSocket(0, "wlan0", ("192.168.1.10", 4000), ("203.0.113.7", 61000)),
                TunnelSocket(1, "wwan0", ("10.0.0.5", 4001), ("192.0.2.9", 62000))])
KEY = bytes(range(32))
DESC = IceDescription(ufrag="abcdEFGH", pwd="p" * 22, candidates=CANDS, vipa="100.100.0.3",
                      public_key=KEY, session_id=42, session_version=2)


def _remote(desc: IceDescription) -> IceDescription:
    """What the peer parses: candidates lose their socket ids."""
    return IceDescription(
        ufrag=desc.ufrag, pwd=desc.pwd, vipa=desc.vipa, public_key=desc.public_key,
        session_id=desc.session_id, session_version=desc.session_version,
        end_of_candidates=desc.end_of_candidates,
        candidates=tuple(type(c)(c.foundation, c.priority, c.ip, c.port, c.type,
                                 related=c.related) for c in desc.candidates))


def test_build_gives_the_documented_body() -> None:
    body = build(DESC)
    lines = body.split("\r\n")
    assert body.endswith("\r\n") and lines[-1] == ""
    assert lines[:9] == [
        "v=0", "o=- 42 2 IN IP4 192.168.1.10", "s=-", "c=IN IP4 192.168.1.10", "t=0 0",
        "a=ice-options:ice2", "m=application 4000 UDP/UPMT upmt", "a=ice-ufrag:abcdEFGH",
        "a=ice-pwd:" + "p" * 22]
    assert "a=upmt-vipa:100.100.0.3" in lines
    assert f"a=upmt-key:{'AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8='}" in lines
    assert sum(x.startswith("a=candidate:") for x in lines) == 4
    assert lines[-2] == "a=end-of-candidates"


@pytest.mark.parametrize("desc", [
    DESC,
    IceDescription(ufrag="abcd", pwd="q" * 22, candidates=()),
    IceDescription(ufrag="a+/b", pwd="Z9+/" * 8, candidates=CANDS[:1], vipa=None,
                   public_key=KEY, end_of_candidates=False),
])
def test_parse_inverts_build(desc: IceDescription) -> None:
    assert parse(build(desc)) == _remote(desc)
    assert parse(build(desc).encode()) == _remote(desc)
    assert parse(build(desc).replace("\r\n", "\n")) == _remote(desc)


def test_no_candidates_defaults_to_port_9() -> None:
    assert "m=application 9 UDP/UPMT upmt" in build(IceDescription("abcd", "q" * 22, ()))


def test_unknown_attributes_and_session_lines_are_ignored() -> None:
    body = build(DESC).replace("a=ice-options:ice2", "a=ice-options:ice2\r\na=sendrecv\r\n"
                               "b=AS:64\r\ni=info")
    assert parse(body) == _remote(DESC)


def _with(body: str, old: str, new: str) -> str:
    assert old in body
    return body.replace(old, new, 1)


B = build(DESC)
BAD = [
    ("", "v missing"),
    ("x", "malformed line 1"),
    (B.replace("v=0", "v=1"), "must start with v=0"),
    ("s=-\r\n" + B, "must start with v=0"),
    (_with(B, "s=-\r\n", ""), "s missing"),
    (_with(B, "t=0 0\r\n", ""), "t missing"),
    (_with(B, "s=-", "s=-\r\ns=again"), "s repeated"),
    (_with(B, "a=ice-ufrag:abcdEFGH\r\n", ""), "ice-ufrag missing"),
    (_with(B, "a=ice-pwd:" + "p" * 22 + "\r\n", ""), "ice-pwd missing"),
    (_with(B, "a=ice-ufrag:abcdEFGH", "a=ice-ufrag:abcdEFGH\r\na=ice-ufrag:x"),
     "ice-ufrag repeated"),
    (_with(B, "a=ice-ufrag:abcdEFGH", "a=ice-ufrag:abc"), "ice-ufrag must be"),
    (_with(B, "a=ice-ufrag:abcdEFGH", "a=ice-ufrag:ab:cd"), "ice-ufrag must be"),
    (_with(B, "a=ice-ufrag:abcdEFGH", "a=ice-ufrag:" + "a" * 65), "ice-ufrag must be"),
    (_with(B, "a=ice-pwd:" + "p" * 22, "a=ice-pwd:" + "p" * 21), "ice-pwd must be"),
    (_with(B, "a=ice-pwd:" + "p" * 22, "a=ice-pwd:" + "p" * 21 + "-"), "ice-pwd must be"),
    (_with(B, "a=ice-pwd:" + "p" * 22, "a=ice-pwd"), "ice-pwd needs a value"),
    (_with(B, "m=application 4000 UDP/UPMT upmt", "m=audio 4000 RTP/AVP 0"), "m= must be"),
    (_with(B, "m=application 4000", "m=application 99999"), "bad m= port"),
    (_with(B, "m=application 4000", "m=application -1"), "bad m= port"),
    (_with(B, "m=application 4000 UDP/UPMT upmt", "m=application 4000 UDP/UPMT"),
     "m= must be"),
    (B + "m=application 5 UDP/UPMT upmt\r\n", "only one m= line"),
    (_with(B, "m=application 4000 UDP/UPMT upmt\r\n", ""), "candidate before m="),
    (_with(B, "o=- 42 2 IN IP4", "o=- 42 2 IN XX"), "bad o= line"),
    (_with(B, "o=- 42 2", "o=- x 2"), "bad o= line"),
    (_with(B, "o=- 42 2 IN IP4 192.168.1.10", "o=-"), "bad o= line"),
    (B + "t=0 0\r\n", "t= after m="),
    (B + "q=what\r\n", "unknown line type"),
    (B + "a=end-of-candidates\r\n", "end-of-candidates repeated"),
    (B.replace("a=end-of-candidates", "a=end-of-candidates:1"), "takes no value"),
    (B + "a=candidate:1 1 udp 5 host.local 4000 typ host\r\n", "not an IP literal"),
    (B + "a=candidate:1 1 udp 5 10.0.0.1 4000\r\n", "wrong number of fields"),
    (B + "".join(f"a=candidate:{i} 1 udp 5 10.0.0.{i} 4000 typ host\r\n"
                 for i in range(1, MAX_REMOTE_CANDIDATES)), "more than 16 candidates"),
    (_with(B, "a=upmt-vipa:100.100.0.3", "a=upmt-vipa:100.100.0.300"), "upmt-vipa is not"),
    (_with(B, "a=upmt-vipa:100.100.0.3", "a=upmt-vipa:2001:db8::1"), "upmt-vipa is not"),
    (_with(B, "a=upmt-key:AAEC", "a=upmt-key:!!EC"), "upmt-key is not base64"),
    (_with(B, "a=upmt-key:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
           "a=upmt-key:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHg=="), "must be 32 bytes"),
    (B + "a=x" * 2000 + "\r\n", "body too long"),
    (B + "a=" + "x" * 300 + "\r\n", "line too long"),
    (B + "a=x\r\n" * 40, "too many lines"),
    (B.replace("\r\n", "\r"), "stray CR"),
    (B + "a=ta\tb\r\n", "malformed line"),
    (B + "A=x\r\n", "malformed line"),
    (B + "a=bad name:x\r\n", "bad attribute name"),
]


@pytest.mark.parametrize(("body", "message"), BAD)
def test_malformed_bodies_are_one_clear_value_error(body: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        parse(body)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(("sdp: ", "candidate: "))


def test_bytes_that_are_not_utf8_or_too_long() -> None:
    with pytest.raises(ValueError, match="not UTF-8"):
        parse(b"v=0\r\n\xff\r\n")
    with pytest.raises(ValueError, match="too long"):
        parse(b"v" * (MAX_BODY + 1))


@pytest.mark.parametrize(("desc", "message"), [
    (IceDescription("abc", "p" * 22, ()), "ice-ufrag"),
    (IceDescription("abcd", "p" * 21, ()), "ice-pwd"),
    (IceDescription("abcd", "p" * 22, CANDS * 5), "more than 16"),
    (IceDescription("abcd", "p" * 22, (), public_key=b"short"), "32 bytes"),
])
def test_build_refuses_local_misuse(desc: IceDescription, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build(desc)


def test_credentials_have_rfc_8445_lengths_and_come_from_the_injected_rng() -> None:
    a = new_credentials(random.Random(1).randbytes)
    assert a == new_credentials(random.Random(1).randbytes)
    assert a != new_credentials(random.Random(2).randbytes)
    ufrag, pwd = a
    assert len(ufrag) == 8 and len(pwd) == 24          # 48 and 144 random bits
    assert re.fullmatch(r"[A-Za-z0-9+/]+", ufrag + pwd)
    assert parse(build(IceDescription(ufrag, pwd, ()))).pwd == pwd


@settings(max_examples=400)
@given(st.text(max_size=600) | st.binary(max_size=600))
def test_fuzz_random_input_parses_or_raises_value_error(body: str | bytes) -> None:
    try:
        parse(body)
    except ValueError:
        pass


@settings(max_examples=300)
@given(st.data())
def test_fuzz_mutated_valid_bodies_parse_or_raise_value_error(data: st.DataObject) -> None:
    lines = B.split("\r\n")
    i = data.draw(st.integers(0, len(lines) - 1))
    how = data.draw(st.sampled_from(["replace", "insert", "delete", "truncate", "dup"]))
    junk = data.draw(st.text(max_size=80))
    if how == "replace":
        lines[i] = lines[i][:2] + junk
    elif how == "insert":
        lines.insert(i, junk)
    elif how == "delete":
        del lines[i]
    elif how == "truncate":
        lines[i] = lines[i][:data.draw(st.integers(0, len(lines[i])))]
    else:
        lines.insert(i, lines[i])
    try:
        d = parse("\r\n".join(lines))
    except ValueError:
        return
    assert len(d.candidates) <= MAX_REMOTE_CANDIDATES
