"""The anchor's side of the UPMT-DAM mesh: rendezvous (PeerReq) and the sealed relay.

    laptop 203.0.113.11:40001 --\\                       /-- phone 203.0.113.21:40003
                                 >-- anchor, mesh = true --<
    tv 203.0.113.31:40004 -------/   (tv: mesh = false)

Hosts are played by hand (tests/test_anchor_fuzz.py's ``Host``): real handshakes, sealed
signalling and sealed RELAY datagrams. What the two hosts relay to each other is opaque
to the anchor (here random bytes standing for their end-to-end sealed datagrams).
"""

from __future__ import annotations

import base64
import ipaddress
import os
import textwrap
from pathlib import Path

import pytest

from upmt_tun import keys
from upmt_tun.anchor import Anchor
from upmt_tun.config import ConfigError, load_anchor_config
from upmt_tun.dataplane.io import FakeTun
from upmt_tun.dataplane.packet import TYPE_RELAY

from .test_anchor_fuzz import (
    AN_PRIV,
    AN_PUB,
    LISTEN,
    MH,
    PEER_KEYS,
    PHONE,
    Host,
    RecordingPath,
    Rig,
    raw,
)

TV = ("203.0.113.31", 40004)
TV_KEYS = keys.keypair()
STRANGER = ("198.51.100.66", 40000)


class MeshRig(Rig):
    """Rig's anchor, with mesh on and a third peer "tv" outside the mesh."""

    def __init__(self, tmp: Path, mesh: str = "mesh = true") -> None:
        p = tmp / "anchor.toml"
        p.write_text(textwrap.dedent(f'''
            listen = "{LISTEN[0]}:{LISTEN[1]}"
            vipa_pool = "100.100.0.0/16"
            nat_interface = "eth0"
            private_key = "{AN_PRIV}"
            {mesh}
            ''') + "".join(f'[[peer]]\nname = "{n}"\npublic_key = "{PEER_KEYS[n][1]}"\n'
                           for n in ("laptop", "phone"))
            + f'[[peer]]\nname = "tv"\npublic_key = "{TV_KEYS[1]}"\nmesh = false\n')
        self.cfg = load_anchor_config(str(p))
        self.an_pub = raw(AN_PUB)
        self.path = RecordingPath()
        self.tun = FakeTun()
        self.now = 1000.0
        self.wall_ns = 1_700_000_000 * 10**9
        self.anchor = Anchor(self.cfg, tun=self.tun, path=self.path, clock=lambda: self.now)


@pytest.fixture
def rig(tmp_path: Path) -> MeshRig:
    return MeshRig(tmp_path)


def hosts(rig: MeshRig) -> tuple[Host, Host, Host]:
    laptop, phone = Host(rig, "laptop", MH), Host(rig, "phone", PHONE, seed=2)
    tv = Host(rig, "tv", TV, key=TV_KEYS[0], seed=3)
    for h in (laptop, phone, tv):
        h.establish((h.addr,))
    return laptop, phone, tv


def relay(rig: MeshRig, h: Host, dst_vipa: str, blob: bytes, src: tuple[str, int] | None = None,
          tid: int = 0) -> list[tuple[bytes, tuple[str, int]]]:
    m = rig.mark()
    pkt = h.s.seal(TYPE_RELAY, ipaddress.IPv4Address(dst_vipa).packed + blob, tid)
    rig.feed(pkt, src or h.addr)
    return rig.since(m)


def test_association_tells_a_mesh_host_the_mesh_pool(rig: MeshRig) -> None:
    laptop, phone, tv = hosts(rig)
    code, _, sigs = laptop.ask([("AssociationReq", {"sipId": "laptop"})])
    assert code == 200 and sigs["AssociationResp"]["mesh"] is True
    assert sigs["AssociationResp"]["meshPool"] == "100.100.0.0/16"
    code, _, sigs = tv.ask([("AssociationReq", {"sipId": "tv"})])
    assert sigs["AssociationResp"]["mesh"] is False and "meshPool" not in sigs["AssociationResp"]


def test_peer_request_vouches_for_mesh_hosts_only(rig: MeshRig) -> None:
    laptop, phone, tv = hosts(rig)
    code, _, sigs = laptop.ask([("PeerReq", {"sipId": "laptop", "vipa": phone.vipa})])
    assert code == 200 and sigs["PeerResp"] == {
        "found": True, "name": "phone", "vipa": phone.vipa,
        "publicKey": PEER_KEYS["phone"][1]}
    assert base64.b64decode(sigs["PeerResp"]["publicKey"]) == raw(PEER_KEYS["phone"][1])
    for vipa in (tv.vipa, laptop.vipa, "100.100.9.9", "not an address"):
        code, _, sigs = laptop.ask([("PeerReq", {"sipId": "laptop", "vipa": vipa})])
        assert code == 200 and sigs["PeerResp"] == {"found": False}, vipa
    code, reason, _ = tv.ask([("PeerReq", {"sipId": "tv", "vipa": laptop.vipa})])
    assert code == 403, reason


def test_relay_between_mesh_hosts_is_resealed_for_the_receiver_only(rig: MeshRig) -> None:
    laptop, phone, tv = hosts(rig)
    blob = os.urandom(300)
    sent = relay(rig, laptop, phone.vipa, blob)
    assert [a for _, a in sent] == [PHONE]
    out = sent[0][0]
    assert out[0] == TYPE_RELAY and blob not in out          # re-sealed, not copied
    opened = phone.s.open(out)
    assert opened is not None and opened[1] == bytes([100, 100, 0, 2]) + blob
    assert laptop.s.open(out) is None
    # and back
    sent = relay(rig, phone, laptop.vipa, b"pong" * 10)
    assert [a for _, a in sent] == [MH]
    assert laptop.s.open(sent[0][0])[1][4:] == b"pong" * 10  # type: ignore[index]
    st = rig.anchor.status()
    by = {a["mh"]: a for a in st["associations"]}
    assert by["laptop"]["relay_rx_bytes"] == 300 and by["phone"]["relay_tx_bytes"] == 300
    assert by["phone"]["relay_rx_bytes"] == 40 and by["laptop"]["relay_tx_bytes"] == 40
    assert rig.tun.written == []                               # never into the kernel


def test_relay_refusals_are_counted_silence(rig: MeshRig) -> None:
    laptop, phone, tv = hosts(rig)
    drops = rig.fwd.drops
    assert relay(rig, tv, laptop.vipa, b"x" * 50) == [] and drops["relay_not_mesh"] == 1
    assert relay(rig, laptop, tv.vipa, b"x" * 50) == [] and drops["relay_no_peer"] == 1
    assert relay(rig, laptop, laptop.vipa, b"x") == [] and drops["relay_no_peer"] == 2
    assert relay(rig, laptop, "100.100.7.7", b"x") == [] and drops["relay_no_peer"] == 3
    # from an address that is no validated tunnel of the laptop: nothing
    before = drops["unvalidated_path"]
    assert relay(rig, laptop, phone.vipa, b"x" * 50, src=STRANGER) == []
    assert drops["unvalidated_path"] == before + 1
    # a replayed RELAY datagram is dropped by the hop's replay window
    pkt = laptop.s.seal(TYPE_RELAY, ipaddress.IPv4Address(phone.vipa).packed + b"y" * 20)
    m = rig.mark()
    rig.feed(pkt, MH)
    rig.feed(pkt, MH)
    assert len(rig.since(m)) == 1
    # a stranger's datagram of that type opens nothing
    m = rig.mark()
    rig.feed(bytes([TYPE_RELAY]) + os.urandom(80), STRANGER)
    assert rig.since(m) == []


def test_mesh_off_by_default_and_per_peer_needs_it(tmp_path: Path) -> None:
    rig = MeshRig(tmp_path, mesh="")
    assert rig.cfg.mesh is False and not any(p.mesh for p in rig.cfg.peers)
    laptop, phone = Host(rig, "laptop", MH), Host(rig, "phone", PHONE, seed=2)
    laptop.establish()
    phone.establish((PHONE,))
    assert relay(rig, laptop, phone.vipa, b"x" * 50) == []
    assert rig.fwd.drops["relay_not_mesh"] == 1
    p = tmp_path / "bad.toml"
    p.write_text(f'listen = "{LISTEN[0]}:{LISTEN[1]}"\nnat_interface = "eth0"\n'
                 f'private_key = "{AN_PRIV}"\n[[peer]]\nname = "laptop"\n'
                 f'public_key = "{PEER_KEYS["laptop"][1]}"\nmesh = true\n')
    with pytest.raises(ConfigError, match=r"peer\[0\]\.mesh.*needs mesh = true"):
        load_anchor_config(str(p))
