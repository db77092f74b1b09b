"""A malicious but *authorized* mobile host: its key is a [[peer]] of the anchor.

Run inside a namespace: it speaks the real protocol with the library (Noise IK handshake,
sealed CONTROL SIP MESSAGEs, path validation), then abuses what it got:

1. impersonation: signals that name another peer (``--victim``) as sipId, a TunnelSetupReq
   for the victim's VIpA, a KeepAlive for the victim's tunnel id;
2. inner source spoofing: sealed DATA whose inner UDP source is not its VIpA (the victim's
   VIpA, the correspondent, the anchor), plus a control group with its own VIpA;
3. egress: packets to the victim's VIpA and to the anchor itself;
4. an ICMP error from its own VIpA that quotes a packet of the victim's (so that its flow
   key would be the victim's).

With ``--invalid`` instead: from its own VIpA, packets that conntrack marks INVALID (TCP
with SYN|FIN, SYN|RST, no flags, FIN|PSH|URG; an ICMP error quoting no tracked
connection), beside a normal UDP packet each round (the control group, sport 40001).

Each UDP group uses its own source port (``PORTS``) so the receiver can tell them apart.
Prints one JSON object: the SIP answers (code, reason, body) and what was sent.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import select
import socket
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the repository

from tests.attack.rawsock import icmp_error, tcp, udp  # noqa: E402
from upmt_tun.dataplane.crypto import Session  # noqa: E402
from upmt_tun.dataplane.packet import TYPE_CONTROL, TYPE_DATA  # noqa: E402
from upmt_tun.signalling import sip, upmt  # noqa: E402
from upmt_tun.signalling.handshake import Initiation  # noqa: E402

PORTS = {"own": 40001, "victim_vipa": 40002, "ch_addr": 40003, "anchor_addr": 40004,
         "to_victim": 40005, "to_anchor": 40006, "to_anchor_tun": 40007,
         "icmp_quoting_victim": 40008}
# --invalid: TCP flag combinations no connection can have, each from its own port
INVALID_TCP = {"syn_fin": (40011, 0x03), "syn_rst": (40012, 0x06), "no_flags": (40013, 0x00),
               "fin_psh_urg": (40014, 0x29)}
ICMP_NOTHING_PORT = 40015      # the port of the never-sent packet the ICMP error quotes


class Evil:
    def __init__(self, anchor: tuple[str, int], anchor_pub: bytes, key: bytes,
                 name: str, attempts: int = 5) -> None:
        self.anchor, self.name = anchor, name
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("0.0.0.0", 0))
        self.local = (self.sock.getsockname()[0] or "0.0.0.0", self.sock.getsockname()[1])
        self.cseq = 0
        self.session = self._handshake(anchor_pub, key, attempts)

    def _recv(self, timeout: float) -> bytes | None:
        r, _, _ = select.select([self.sock], [], [], timeout)
        return self.sock.recv(65535) if r else None

    def _handshake(self, anchor_pub: bytes, key: bytes, attempts: int = 5) -> Session:
        """``attempts`` initiations with growing timeouts; a cookie reply (the anchor is under
        load) does not use one up: the next initiation, sent at once, carries mac2 (at most
        3 such extra initiations)."""
        self.attempts = self.cookies = 0
        cookie: bytes | None = None
        attempt = 0
        while attempt < attempts:
            self.attempts += 1
            init = Initiation(static=key, remote_static=anchor_pub,
                              local_index=int.from_bytes(os.urandom(4), "big") or 1,
                              wall_ns=time.time_ns(), cookie=cookie)
            self.sock.sendto(init.packet, self.anchor)
            deadline = time.monotonic() + 0.5 * (attempt + 1)
            fresh = False
            while (left := deadline - time.monotonic()) > 0:
                data = self._recv(left)
                if data is None:
                    break
                s = init.consume(data, time.monotonic(), "anchor")
                if s is not None:
                    return s
                c = init.consume_cookie(data)
                if c is not None:
                    cookie, fresh = c, True
                    self.cookies += 1
                    break
            if not fresh or self.cookies > 3:
                attempt += 1
        raise SystemExit("no handshake answer")

    def request(self, signals: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
        """One sealed MESSAGE transaction: {"code", "reason", "body"} (code 0: no answer)."""
        self.cseq += 1
        branch = sip.BRANCH_MAGIC + sip.new_token()
        req = sip.build_request(target=self.anchor, from_user=self.name,
                                via=("203.0.113.66", self.local[1]), call_id=sip.new_token(),
                                cseq=self.cseq, branch=branch, body=upmt.encode(signals))
        for delay in (0.5, 1.0, 2.0):
            self.sock.sendto(self.session.seal(TYPE_CONTROL, req), self.anchor)
            deadline = time.monotonic() + delay
            while (left := deadline - time.monotonic()) > 0:
                data = self._recv(left)
                if data is None or data[0] != TYPE_CONTROL:
                    continue
                opened = self.session.open(data)
                if opened is None:
                    continue
                msg = sip.parse(opened[1])
                if not isinstance(msg, sip.SipResponse) or branch not in str(
                        msg.headers.get_first("via")):
                    continue
                body = upmt.decode(msg.body) if msg.status_code == 200 else []
                return {"code": msg.status_code, "reason": msg.reason_phrase, "body": body}
        return {"code": 0, "reason": "no answer", "body": []}

    def data(self, inner: bytes) -> None:
        self.sock.sendto(self.session.seal(TYPE_DATA, inner), self.anchor)


def keepalive_flood(a: argparse.Namespace, anchor: tuple[str, int]) -> dict[str, Any]:
    """An authorized host floods the anchor with sealed, valid KeepAlives for its own
    validated tunnel: every one a new SIP transaction (a new branch and Call-ID, so no
    cached answer), each sealed under a new counter. Pre-built, then sent with sendmmsg."""
    from tests.attack.fastsend import BatchSender

    ev = Evil(anchor, base64.b64decode(a.anchor_pub), base64.b64decode(a.key), a.name)
    vipa = first(ev.request([("AssociationReq", {"sipId": a.name, "addressInUse": [],
                                                  "dataPlaintext": False})]),
                 "AssociationResp").get("vipa")
    setup = first(ev.request([("TunnelSetupReq", {"sipId": a.name, "vipa": vipa,
                                                   "tunnelId": 1, "interface": "x"})]),
                  "TunnelSetupResp")
    tid = setup.get("serverTunnelID")
    ok = ev.request([("KeepAlive", {"sipId": a.name, "tunnelId": tid,
                                    "challenge": setup.get("challenge", "")})])["code"] == 200
    mark = "0123456789abcdef"                # replaced by a unique token per request
    template = sip.build_request(
        target=anchor, from_user=a.name, via=("203.0.113.66", ev.local[1]), call_id=mark,
        cseq=1, branch=sip.BRANCH_MAGIC + mark,
        body=upmt.encode([("KeepAlive", {"sipId": a.name, "tunnelId": tid})]))
    n = max(1, min(int(a.pps * a.keepalive_flood) + 1, 300_000))
    packets = [ev.session.seal(TYPE_CONTROL, template.replace(mark.encode(),
                                                              f"{i:016x}".encode()))
               for i in range(n)]
    ev.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sender = BatchSender(ev.sock, packets, anchor)
    t_cpu = time.process_time()
    took = sender.run(a.keepalive_flood, a.pps)
    cpu = time.process_time() - t_cpu
    answers = 0
    while ev._recv(0.5) is not None:       # noqa: SLF001 (what came back)
        answers += 1
    return {"vipa": vipa, "validated": ok, "sent": sender.sent, "send_errors": sender.errors,
            "pps": round(sender.sent / took) if took > 0 else 0, "cpu_s": round(cpu, 2),
            "run_s": round(took, 2), "answers": answers}


def first(answer: dict[str, Any], mtype: str) -> dict[str, Any]:
    return next((c for t, c in answer["body"] if t == mtype), {})


def own_tunnel(ev: Evil, name: str, out: dict[str, Any]) -> str | None:
    """Associate as ``name``, set up a tunnel and validate it (echo the challenge): the
    VIpA (None if refused); the answers go to ``out["answers"]``."""
    ans = out["answers"]
    ans["assoc"] = ev.request([("AssociationReq", {
        "sipId": name, "addressInUse": [], "dataPlaintext": False})])
    vipa: str | None = first(ans["assoc"], "AssociationResp").get("vipa")
    out["vipa"] = vipa
    if not vipa:
        return None
    ans["setup"] = ev.request([("TunnelSetupReq", {
        "sipId": name, "vipa": vipa, "tunnelId": 1, "interface": "x"})])
    setup = first(ans["setup"], "TunnelSetupResp")
    ans["validate"] = ev.request([("KeepAlive", {
        "sipId": name, "tunnelId": setup.get("serverTunnelID"),
        "challenge": setup.get("challenge", "")})])
    out["validated"] = (ans["validate"]["code"] == 200 and
                        first(ans["validate"], "KeepAliveResp").get("challenge", "") == "")
    return vipa


def send_invalid(ev: Evil, vipa: str, ch: str, count: int, tcp_port: int) -> dict[str, int]:
    """``count`` rounds: the control UDP packet, each invalid TCP kind, the ICMP error."""
    sent: dict[str, int] = {}
    for i in range(count):
        packets = {"own": udp(vipa, ch, PORTS["own"], 9999, f"own {i}".encode())}
        for kind, (sport, flags) in INVALID_TCP.items():
            packets[kind] = tcp(vipa, ch, sport, tcp_port, seq=int.from_bytes(os.urandom(4)),
                                ack=int.from_bytes(os.urandom(4)) if flags & 0x10 else 0,
                                flags=flags)
        # port unreachable about a datagram ch -> us that never was (no connection)
        packets["icmp_quoting_nothing"] = icmp_error(
            vipa, ch, udp(ch, vipa, 9999, ICMP_NOTHING_PORT, b"x"))
        for kind, pkt in packets.items():
            ev.data(pkt)
            sent[kind] = sent.get(kind, 0) + 1
        time.sleep(0.002)
    return sent


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--anchor", default="203.0.113.1:5060")
    ap.add_argument("--anchor-pub", required=True)
    ap.add_argument("--key", required=True, help="our private key (base64)")
    ap.add_argument("--name", default="evil")
    ap.add_argument("--victim", default="laptop")
    ap.add_argument("--victim-vipa", default="")
    ap.add_argument("--victim-tunnel", type=int, default=0, help="its serverTunnelID")
    ap.add_argument("--ch", default="203.0.113.100")
    ap.add_argument("--anchor-tun", default="100.100.0.1")
    ap.add_argument("--count", type=int, default=20, help="packets per data group")
    ap.add_argument("--handshake-only", action="store_true",
                    help="only try the handshake; print whether and when it succeeded")
    ap.add_argument("--attempts", type=int, default=5)
    ap.add_argument("--associate", action="store_true",
                    help="with --handshake-only: then an AssociationReq (as --name)")
    ap.add_argument("--invalid", action="store_true",
                    help="only send packets conntrack marks INVALID (and a control group)")
    ap.add_argument("--tcp-port", type=int, default=8080, help="--invalid: TCP destination")
    ap.add_argument("--keepalive-flood", type=float, default=0.0, metavar="SECONDS",
                    help="associate, set up and validate a tunnel, then flood sealed "
                         "KeepAlives (each a new transaction) at --pps for SECONDS")
    ap.add_argument("--pps", type=float, default=10000.0)
    a = ap.parse_args()
    host, _, port = a.anchor.rpartition(":")
    anchor = (host, int(port))
    if a.keepalive_flood:
        print(json.dumps(keepalive_flood(a, anchor)))
        return 0
    if a.handshake_only:
        t0 = time.monotonic()
        try:
            ev = Evil(anchor, base64.b64decode(a.anchor_pub), base64.b64decode(a.key), a.name,
                      a.attempts)
        except SystemExit:
            print(json.dumps({"handshake": False, "attempts": a.attempts, "association": 0,
                              "seconds": round(time.monotonic() - t0, 2)}))
            return 0
        res: dict[str, Any] = {"handshake": True, "attempts": ev.attempts,
                               "cookies": ev.cookies,
                               "seconds": round(time.monotonic() - t0, 2)}
        if a.associate:
            ans = ev.request([("AssociationReq", {"sipId": a.name, "addressInUse": [],
                                                  "dataPlaintext": False})])
            res["association"] = ans["code"]
            res["vipa"] = first(ans, "AssociationResp").get("vipa")
            res["total_seconds"] = round(time.monotonic() - t0, 2)
        print(json.dumps(res))
        return 0
    ev = Evil(anchor, base64.b64decode(a.anchor_pub), base64.b64decode(a.key), a.name)
    out: dict[str, Any] = {"answers": {}, "sent": {}}
    ans = out["answers"]
    if a.invalid:
        own = own_tunnel(ev, a.name, out)
        if not own or not out["validated"]:
            print(json.dumps(out))
            return 1
        out["sent"] = send_invalid(ev, own, a.ch, a.count, a.tcp_port)
        time.sleep(0.2)
        print(json.dumps(out))
        return 0

    # impersonation before and after we have our own association
    ans["assoc_as_victim"] = ev.request([("AssociationReq", {
        "sipId": a.victim, "addressInUse": [], "dataPlaintext": False})])
    ans["assoc"] = ev.request([("AssociationReq", {
        "sipId": a.name, "addressInUse": [], "dataPlaintext": False})])
    vipa = first(ans["assoc"], "AssociationResp").get("vipa")
    out["vipa"] = vipa
    if not vipa:
        print(json.dumps(out))
        return 1
    ans["setup_victim_vipa"] = ev.request([("TunnelSetupReq", {
        "sipId": a.name, "vipa": a.victim_vipa, "tunnelId": 1, "interface": "x"})])
    ans["setup_as_victim"] = ev.request([("TunnelSetupReq", {
        "sipId": a.victim, "vipa": a.victim_vipa, "tunnelId": 1, "interface": "x"})])
    ans["keepalive_victim_tunnel"] = ev.request([("KeepAlive", {
        "sipId": a.name, "tunnelId": a.victim_tunnel})])
    ans["keepalive_as_victim"] = ev.request([("KeepAlive", {
        "sipId": a.victim, "tunnelId": a.victim_tunnel})])

    # our own tunnel, validated by echoing the challenge
    ans["setup"] = ev.request([("TunnelSetupReq", {
        "sipId": a.name, "vipa": vipa, "tunnelId": 1, "interface": "x"})])
    setup = first(ans["setup"], "TunnelSetupResp")
    tid = setup.get("serverTunnelID")
    ans["validate"] = ev.request([("KeepAlive", {
        "sipId": a.name, "tunnelId": tid, "challenge": setup.get("challenge", "")})])
    out["validated"] = (ans["validate"]["code"] == 200 and
                        first(ans["validate"], "KeepAliveResp").get("challenge", "") == "")

    groups = {
        "own": (vipa, a.ch),
        "victim_vipa": (a.victim_vipa, a.ch),
        "ch_addr": (a.ch, a.ch),
        "anchor_addr": (anchor[0], a.ch),
        "to_victim": (vipa, a.victim_vipa),
        "to_anchor": (vipa, anchor[0]),
        "to_anchor_tun": (vipa, a.anchor_tun),
    }
    for i in range(a.count):
        for group, (src, dst) in groups.items():
            ev.data(udp(src, dst, PORTS[group], 9999, f"{group} {i}".encode()))
            out["sent"][group] = out["sent"].get(group, 0) + 1
        quoted = udp(a.ch, a.victim_vipa, 9999, PORTS["icmp_quoting_victim"], b"x")
        ev.data(icmp_error(vipa, a.ch, quoted))
        out["sent"]["icmp_quoting_victim"] = out["sent"].get("icmp_quoting_victim", 0) + 1
        time.sleep(0.002)
    time.sleep(0.2)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
