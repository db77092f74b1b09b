#!/usr/bin/env python3
"""Per-packet CPU cost of upmt_tun's crypto and data path, measured in process.

    python benchmarks/crypto_cost.py [--packets N] [--repeat R] [--quick] [--json PATH]

No root, no namespaces, no network: every case calls the real code of ``upmt_tun``
(``dataplane.crypto``, ``nat``, ``dataplane.forwarder``, ``signalling.handshake``) on
packets built here, under :mod:`timeit` (garbage collector off while timing). Each case
runs ``R`` repeats of ``N`` operations; the table shows the best repeat (the least
disturbed one, the usual figure for micro-benchmarks) and the median repeat, in
microseconds per operation.

Cases:

* ``Session.seal`` / ``Session.open`` of a DATA packet with a 64-byte and a 1400-byte
  inner packet, sealed (AES-256-GCM, header as associated data) and with
  ``plain_data=True`` (``insecure_plaintext_for_benchmarks``: header only, no tag);
* ``ReplayWindow.check`` + ``update``, ``nat.five_tuple`` and ``nat.rewrite_src`` on a
  1400-byte TCP packet, a 1400-byte ``bytearray`` copy (the forwarder makes one), and the
  bare ``AESGCM.encrypt``/``decrypt`` call of the ``cryptography`` package that
  ``Session`` makes (what the AEAD costs without the session's bookkeeping), and
  ``ChaCha20Poly1305`` beside it (the cipher before; why the suite moved to AES-GCM);
* the four per-packet pipelines of :mod:`upmt_tun.dataplane.forwarder`, in steady state
  (the flow is already in the PAFT), sealed and plaintext: agent uplink
  ``AgentForwarder.from_tun``, anchor uplink ``AnchorForwarder.from_path``, anchor
  downlink ``AnchorForwarder.from_tun``, agent downlink ``AgentForwarder.from_path``;
* one Noise IK handshake: ``Initiation`` (builds HS_INIT), ``Responder.mac_ok`` +
  ``accept`` (verifies it, builds HS_RESP), ``Initiation.consume`` (verifies HS_RESP).

Packets that must be opened (``open``, ``from_path``) are sealed beforehand, outside the
timed loop, with increasing counters, and fed one by one with ``list.pop``; the rows
``timeit loop`` and ``list.pop feed`` show what that harness itself costs per operation
(it is not subtracted). After each case the script checks that every packet really went
through (opened, forwarded, no drop counter moved): a fast path that silently drops would
otherwise look cheap.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import itertools
import json
import os
import platform
import statistics
import struct
import sys
import timeit
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import cryptography
from common import loadavg, render, source_version  # noqa: E402 (benchmarks/ dir)
from cryptography.hazmat.backends.openssl.backend import backend as openssl_backend
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from upmt_tun import nat
from upmt_tun.dataplane.crypto import ReplayWindow, Session
from upmt_tun.dataplane.forwarder import AgentForwarder, AnchorForwarder, Association, FlowClass
from upmt_tun.dataplane.packet import TYPE_DATA
from upmt_tun.signalling.handshake import Initiation, Responder
from upmt_tun.signalling.noise import public_key
from upmt_tun.tables import Tunnel

RESULTS_DIR = Path(__file__).resolve().parent / "results"

VIPA_FIX = "100.64.0.1"
VIPA = "100.100.0.2"
CH = "203.0.113.100"
ANCHOR_EP = ("203.0.113.1", 5060)      # the anchor's listen address, as the agent sees it
MH_EP = ("203.0.113.11", 40000)        # the host's NATed tunnel address, as the anchor sees it
MH_STATIC = bytes(range(1, 33))
AN_STATIC = bytes(range(2, 34))


# -- packets ------------------------------------------------------------------------------

def _ip(a: str) -> bytes:
    return ipaddress.IPv4Address(a).packed


def tcp_packet(src: str, dst: str, sport: int, dport: int, total_len: int) -> bytes:
    """A well-formed IPv4/TCP packet of ``total_len`` bytes with valid checksums."""
    payload = bytes(i & 0xFF for i in range(total_len - 40))
    tcp = bytearray(struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, 0x18, 65535, 0, 0))
    pseudo = _ip(src) + _ip(dst) + struct.pack("!BBH", 0, 6, len(tcp) + len(payload))
    struct.pack_into("!H", tcp, 16, nat.ipv4_checksum(pseudo + tcp + payload))
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, total_len, 1, 0x4000, 64, 6, 0,
                                _ip(src), _ip(dst)))
    struct.pack_into("!H", hdr, 10, nat.ipv4_checksum(hdr))
    return bytes(hdr + tcp + payload)


SEGS, GSO = 44, 1360       # a TSO super-packet: 44 segments of 1400 bytes (MTU 1440 tunnel)


def super_packet(src: str, dst: str, sport: int) -> bytes:
    """What a TSO read hands over (after the virtio-net header): SEGS segments' worth."""
    return tcp_packet(src, dst, sport, 5201 if sport == 40000 else 40000, 40 + SEGS * GSO)


def uplink_packet(size: int) -> bytes:
    return tcp_packet(VIPA_FIX, CH, 40000, 5201, size)


def downlink_packet(size: int) -> bytes:
    return tcp_packet(CH, VIPA, 5201, 40000, size)


# -- sessions and forwarders --------------------------------------------------------------

_wall = itertools.count(10**18, 1000)
_index = itertools.count(1000)


def session_pair(plain: bool) -> tuple[Session, Session]:
    """(mobile host's, anchor's) sessions from a real Noise IK handshake."""
    r = Responder(AN_STATIC, {public_key(MH_STATIC): "laptop"})
    init = Initiation(static=MH_STATIC, remote_static=public_key(AN_STATIC),
                      local_index=next(_index), wall_ns=next(_wall))
    acc = r.accept(init.packet, 0.0, lambda: next(_index))
    assert acc is not None
    mh = init.consume(acc.response, 0.0, "an1")
    assert mh is not None
    mh.plain_data = acc.session.plain_data = plain
    return mh, acc.session


@dataclass
class Pipes:
    """An agent and an anchor forwarder sharing one association, one tunnel up."""

    agent: AgentForwarder
    anchor: AnchorForwarder
    mh_session: Session
    an_session: Session
    agent_tunnel: Tunnel
    anchor_tunnel: Tunnel
    uplink: dict[int, bytes] = field(default_factory=dict)
    downlink: dict[int, bytes] = field(default_factory=dict)


def make_pipes(plain: bool) -> Pipes:
    mh_s, an_s = session_pair(plain)
    agent = AgentForwarder(VIPA_FIX, ["wan1", "wan2"], ["an1"],
                           lambda key: FlowClass("bench", ("wan1", "wan2"), None))
    t = agent.add_tunnel("wan1", 0, "an1", ("10.1.0.2", 40000), ANCHOR_EP, 0.0)
    agent.set_association("an1", VIPA, "anchor", frozenset())
    agent.tunnel_up(t, un_tid=1, now=0.0)
    agent.add_session("an1", mh_s)

    anchor = AnchorForwarder()
    a = Association("laptop", VIPA, _ip(VIPA), created=0.0, plain_data=plain)
    anchor.add_association(a)
    a.session = an_s
    anchor.sessions[an_s.local_index] = an_s
    at = Tunnel(anchor.tunnels.new_tid(), "wan1", ANCHOR_EP, MH_EP, "laptop", VIPA, _ip(VIPA),
                t.tid, state="up")
    anchor.tunnels.add(at)
    a.tunnels[at.tid] = at
    a.by_addr[MH_EP] = at
    a.last_tunnel = at
    p = Pipes(agent, anchor, mh_s, an_s, t, at)
    # one packet each way first, so every timed packet finds its flow in the PAFT
    for size in (64, 1400):
        up = agent.from_tun(uplink_packet(size), 0.0)
        assert up is not None and anchor.from_path(up[2], MH_EP, 0.0) is not None
        down = anchor.from_tun(downlink_packet(size), 0.0)
        assert down is not None and agent.from_path(0, down[1], ANCHOR_EP, 0.0) is not None
        p.uplink[size], p.downlink[size] = uplink_packet(size), downlink_packet(size)
    return p


def no_drops(*fwds: AgentForwarder | AnchorForwarder) -> Callable[[], str | None]:
    def check() -> str | None:
        bad = {k: v for f in fwds for k, v in f.drops.items() if v}
        return f"drop counters moved: {bad}" if bad else None
    return check


# -- the cases ----------------------------------------------------------------------------

@dataclass
class Case:
    group: str
    name: str
    stmt: str
    ns: dict[str, Any]
    setup: str = "pass"              # may use {n}: the number of operations of one repeat
    ops_per_stmt: int = 1
    number: int | None = None        # operations per repeat (default: --packets)
    # called just before the case runs; returns (total operations) -> problem or None
    check: Callable[[], Callable[[int], str | None]] | None = None
    note: str = ""


def rx_check(s: Session) -> Callable[[int], str | None]:
    start = s.rx_packets

    def check(total: int) -> str | None:
        got = s.rx_packets - start
        return None if got == total else f"opened {got} of {total} packets"
    return check


def seal_batch(s: Session, payload: bytes) -> Callable[[int], list[bytes]]:
    """n packets sealed by ``s``, in the order list.pop() hands them out (oldest first)."""
    def make(n: int) -> list[bytes]:
        out = [s.seal(TYPE_DATA, payload) for _ in range(n)]
        out.reverse()
        return out
    return make


def cases(n_hs: int) -> list[Case]:
    out: list[Case] = [
        Case("harness", "timeit loop (empty statement)", "pass", {}),
        Case("harness", "list.pop feed", "pop()", {}, setup="pop = [b''] * {n}; pop = pop.pop"),
    ]
    # Session.seal / Session.open
    for plain in (False, True):
        mode = "plaintext" if plain else "sealed"
        for size in (64, 1400):
            tx, rx = session_pair(plain)
            payload = uplink_packet(size)
            out.append(Case("session", f"Session.seal {size} B {mode}", "seal(T, p)",
                            {"seal": tx.seal, "T": TYPE_DATA, "p": payload}))
            tx2, rx2 = session_pair(plain)
            out.append(Case("session", f"Session.open {size} B {mode}", "op(pop())",
                            {"op": rx2.open, "make": seal_batch(tx2, payload)},
                            setup="pop = make({n}).pop", check=partial(rx_check, rx2)))
    # building blocks
    w = ReplayWindow()
    pkt = bytearray(uplink_packet(1400))
    aead = AESGCM(bytes(range(32)))
    chacha = ChaCha20Poly1305(bytes(range(32)))
    out += [
        Case("parts", "ReplayWindow.check+update", "c = nxt(); chk(c) and upd(c)",
             {"nxt": itertools.count(1).__next__, "chk": w.check, "upd": w.update},
             note="includes itertools.count().__next__"),
        Case("parts", "nat.five_tuple 1400 B TCP", "ft(p)",
             {"ft": nat.five_tuple, "p": bytes(pkt)}),
        Case("parts", "nat.rewrite_src 1400 B TCP", "rw(b, A); rw(b, B)",
             {"rw": nat.rewrite_src, "b": pkt, "A": _ip(VIPA), "B": _ip(VIPA_FIX)},
             ops_per_stmt=2, note="alternates between two addresses (same address: no-op)"),
        Case("parts", "bytearray copy 1400 B", "bytearray(p)", {"p": bytes(pkt)}),
    ]
    for name, cipher in (("AESGCM", aead), ("ChaCha20Poly1305", chacha)):
        out += [
            Case("parts", f"{name}.encrypt 1400 B (library call alone)", "enc(N, p, AD)",
                 {"enc": cipher.encrypt, "N": bytes(12), "p": bytes(pkt), "AD": bytes(16)}),
            Case("parts", f"{name}.decrypt 1400 B (library call alone)", "dec(N, c, AD)",
                 {"dec": cipher.decrypt, "N": bytes(12), "AD": bytes(16),
                  "c": cipher.encrypt(bytes(12), bytes(pkt), bytes(16))}),
        ]
    # pipelines
    pipes = {plain: make_pipes(plain) for plain in (False, True)}
    for size in (1400, 64):
        for plain in (False, True):
            mode = "plaintext" if plain else "sealed"
            p = pipes[plain]
            out.append(Case("pipeline", f"agent from_tun (uplink) {size} B {mode}",
                            "ft(pkt, 1.0)", {"ft": p.agent.from_tun, "pkt": p.uplink[size]},
                            check=partial(_tx_check, p.agent_tunnel, p.agent)))
            out.append(Case("pipeline", f"anchor from_path (uplink) {size} B {mode}",
                            "fp(pop(), SRC, 1.0)",
                            {"fp": p.anchor.from_path, "SRC": MH_EP,
                             "make": _pipe_batch(p.agent.from_tun, p.uplink[size], 2)},
                            setup="pop = make({n}).pop",
                            check=partial(_rx_tunnel_check, p.anchor_tunnel, p.anchor)))
            if size != 1400:
                continue
            out.append(Case("pipeline", f"anchor from_tun (downlink) {size} B {mode}",
                            "ft(pkt, 1.0)", {"ft": p.anchor.from_tun, "pkt": p.downlink[size]},
                            check=partial(_tx_check, p.anchor_tunnel, p.anchor)))
            out.append(Case("pipeline", f"agent from_path (downlink) {size} B {mode}",
                            "fp(0, pop(), SRC, 1.0)",
                            {"fp": p.agent.from_path, "SRC": ANCHOR_EP,
                             "make": _pipe_batch(p.anchor.from_tun, p.downlink[size], 1)},
                            setup="pop = make({n}).pop",
                            check=partial(_rx_tunnel_check, p.agent_tunnel, p.agent)))
    # batched pipelines: a TSO super-packet of SEGS segments, a GRO run of SEGS datagrams
    for plain in (False, True):
        mode = "plaintext" if plain else "sealed"
        p = pipes[plain]
        size = 1400 + 16 + (0 if plain else 16)
        up, down = memoryview(super_packet(VIPA_FIX, CH, 40000)), \
            memoryview(super_packet(CH, VIPA, 5201))
        # (direction, sender, its forwarder and tunnel, receiver, ..., the super-packet,
        #  where the sender's result holds the parts, the receiver's call, its source)
        ends = (("uplink", "agent", p.agent, p.agent_tunnel, "anchor", p.anchor,
                 p.anchor_tunnel, up, 2, "fp(pop(), Z, SRC, 1.0)", MH_EP),
                ("downlink", "anchor", p.anchor, p.anchor_tunnel, "agent", p.agent,
                 p.agent_tunnel, down, 1, "fp(0, pop(), Z, SRC, 1.0)", ANCHOR_EP))
        for way, sname, sfwd, stun, rname, rfwd, rtun, sp, at, stmt, src in ends:
            out += [
                Case("batch", f"{sname} from_tun_super ({way}) 1400 B x{SEGS} {mode}",
                     "ft(sp, G, 1.0)", {"ft": sfwd.from_tun_super, "sp": sp, "G": GSO},
                     ops_per_stmt=SEGS, check=partial(_tx_check, stun, sfwd)),
                Case("batch", f"{rname} from_path_many ({way}) 1400 B x{SEGS} {mode}", stmt,
                     {"fp": rfwd.from_path_many, "Z": size, "SRC": src,
                      "make": _gso_batch(sfwd.from_tun_super, sp, at)},
                     setup="pop = make({n}).pop", ops_per_stmt=SEGS,
                     check=partial(_rx_tunnel_check, rtun, rfwd)),
            ]
    # handshake
    r = Responder(AN_STATIC, {public_key(MH_STATIC): "laptop"})
    an_pub = public_key(AN_STATIC)

    def new_init() -> Initiation:
        return Initiation(static=MH_STATIC, remote_static=an_pub, local_index=next(_index),
                          wall_ns=next(_wall))

    def inits(n: int) -> list[Initiation]:
        out = [new_init() for _ in range(n)]
        out.reverse()
        return out

    def answered(n: int) -> list[tuple[Initiation, bytes]]:
        pairs = []
        for _ in range(n):     # accepted in timestamp order, or the replay guard refuses them
            i = new_init()
            acc = r.accept(i.packet, 0.0, lambda: next(_index))
            assert acc is not None
            pairs.append((i, acc.response))
        pairs.reverse()
        return pairs

    counts = {"accept": 0, "consume": 0}

    def accept(i: Initiation) -> None:
        if r.mac_ok(i.packet) and r.accept(i.packet, 0.0, lambda: next(_index)) is not None:
            counts["accept"] += 1

    def consume(pair: tuple[Initiation, bytes]) -> None:
        if pair[0].consume(pair[1], 0.0) is not None:
            counts["consume"] += 1

    def counted(key: str) -> Callable[[int], str | None]:
        start = counts[key]

        def check(total: int) -> str | None:
            got = counts[key] - start
            return None if got == total else f"{got} of {total} succeeded"
        return check

    out += [
        Case("handshake", "Initiation (build HS_INIT)", "new_init()", {"new_init": new_init},
             number=n_hs),
        Case("handshake", "Responder.mac_ok+accept (HS_INIT -> HS_RESP)", "acc(pop())",
             {"acc": accept, "make": inits}, setup="pop = make({n}).pop", number=n_hs,
             check=partial(counted, "accept")),
        Case("handshake", "Initiation.consume (HS_RESP -> session)", "con(pop())",
             {"con": consume, "make": answered}, setup="pop = make({n}).pop", number=n_hs,
             check=partial(counted, "consume")),
    ]
    return out


def _tx_check(t: Tunnel, fwd: AgentForwarder | AnchorForwarder) -> Callable[[int], str | None]:
    start = t.tx_packets
    drops = no_drops(fwd)

    def check(total: int) -> str | None:
        got = t.tx_packets - start
        return drops() or (None if got == total else f"forwarded {got} of {total}")
    return check


def _rx_tunnel_check(t: Tunnel, fwd: AgentForwarder | AnchorForwarder
                     ) -> Callable[[int], str | None]:
    start = t.rx_packets
    drops = no_drops(fwd)

    def check(total: int) -> str | None:
        got = t.rx_packets - start
        return drops() or (None if got == total else f"accepted {got} of {total}")
    return check


def _pipe_batch(fn: Callable[[bytes, float], Any], pkt: bytes, datagram_at: int
                ) -> Callable[[int], list[bytes]]:
    """n datagrams produced by the other end's pipeline ``fn`` (the datagram is item
    ``datagram_at`` of its result), oldest last (for pop)."""
    def make(n: int) -> list[bytes]:
        out = []
        for _ in range(n):
            r = fn(pkt, 0.5)
            assert r is not None
            out.append(r[datagram_at])
        out.reverse()
        return out
    return make


def _gso_batch(fn: Callable[[memoryview, int, float], Any], sp: memoryview, parts_at: int
               ) -> Callable[[int], list[bytes]]:
    """n GRO reads: each the datagrams the other end's batch pipeline ``fn`` made of one
    super-packet (back to back: item ``parts_at`` of the result); oldest last."""
    def make(n: int) -> list[bytes]:
        out = []
        for _ in range(n):
            r = fn(sp, GSO, 0.5)
            assert r is not None
            out.append(r[parts_at])
        out.reverse()
        return out
    return make


# -- running and reporting ----------------------------------------------------------------

def run_case(c: Case, number: int, repeat: int) -> dict[str, Any]:
    stmt_runs = max(1, number // c.ops_per_stmt)
    setup = c.setup.format(n=stmt_runs)          # runs once per repeat, untimed
    check = c.check() if c.check else None
    times = timeit.Timer(c.stmt, setup, globals=dict(c.ns)).repeat(repeat, stmt_runs)
    per_op = sorted(t / (stmt_runs * c.ops_per_stmt) * 1e6 for t in times)
    problem = check(stmt_runs * repeat * c.ops_per_stmt) if check else None
    return {"group": c.group, "case": c.name, "ops_per_repeat": stmt_runs * c.ops_per_stmt,
            "repeats": repeat, "best_us": per_op[0], "median_us": statistics.median(per_op),
            "worst_us": per_op[-1], "note": c.note, "problem": problem}


def derived(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sealed vs plaintext, per pipeline: what the AEAD adds and its share of the total."""
    best = {r["case"]: r["best_us"] for r in rows}
    med = {r["case"]: r["median_us"] for r in rows}
    out = []
    for r in rows:
        name = r["case"]
        if r["group"] not in ("pipeline", "session") or not name.endswith(" sealed"):
            continue
        base = name[: -len(" sealed")]
        plain = base + " plaintext"
        if plain not in best:
            continue
        add = best[name] - best[plain]
        out.append({"case": base, "sealed_us": best[name], "plaintext_us": best[plain],
                    "crypto_us": add, "crypto_share": add / best[name] if best[name] else None,
                    "sealed_median_us": med[name], "plaintext_median_us": med[plain]})
    for direction, a, b in (("uplink", "agent from_tun (uplink)", "anchor from_path (uplink)"),
                            ("downlink", "anchor from_tun (downlink)",
                             "agent from_path (downlink)")):
        s = [best.get(f"{x} 1400 B sealed") for x in (a, b)]
        p = [best.get(f"{x} 1400 B plaintext") for x in (a, b)]
        if None in s or None in p:
            continue
        ss, pp = sum(s), sum(p)    # type: ignore[arg-type]
        out.append({"case": f"{direction} both ends 1400 B", "sealed_us": ss,
                    "plaintext_us": pp, "crypto_us": ss - pp,
                    "crypto_share": (ss - pp) / ss if ss else None})
    hs = [r for r in rows if r["group"] == "handshake"]
    if len(hs) == 3:
        out.append({"case": "handshake total (3 steps)", "sealed_us": sum(r["best_us"] for r in hs),
                    "plaintext_us": None, "crypto_us": None, "crypto_share": None})
    return out


def fmt_us(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}" if v >= 0.1 else f"{v:.3f}"


def machine_facts() -> dict[str, Any]:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                         "?")
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "kernel": platform.release(),
            "python": platform.python_version(),
            "python_impl": platform.python_implementation(),
            "cryptography": cryptography.__version__,
            "openssl": openssl_backend.openssl_version_text()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--packets", type=int, default=10000,
                   help="operations per repeat for the per-packet cases (10000)")
    p.add_argument("--handshakes", type=int, default=100,
                   help="operations per repeat for the handshake cases (100)")
    p.add_argument("--repeat", type=int, default=15, help="repeats per case (15)")
    p.add_argument("--quick", action="store_true",
                   help="tiny counts (a smoke run; numbers are not meaningful)")
    p.add_argument("--json", type=Path, default=None,
                   help="where to save the results (benchmarks/results/crypto_cost-<ts>.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.packets, args.handshakes, args.repeat = 500, 10, 2
    if min(args.packets, args.handshakes, args.repeat) < 1:
        p.error("counts must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path: Path = args.json or RESULTS_DIR / f"crypto_cost-{stamp}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    load_start, source = loadavg(), source_version()
    rows = []
    for c in cases(args.handshakes):
        n = c.number if c.number is not None else args.packets
        print(f"  {c.name} ...", end="", flush=True, file=sys.stderr)
        r = run_case(c, n, args.repeat)
        print(f" {fmt_us(r['best_us'])} us" + (f"  PROBLEM: {r['problem']}" if r["problem"]
                                                 else ""), file=sys.stderr)
        rows.append(r)
    der = derived(rows)
    result: dict[str, Any] = {"meta": {"timestamp": dt.datetime.now().isoformat(timespec="seconds"),
                                       "loadavg_start": load_start, "loadavg_end": loadavg(),
                                       "source": source,
                       "argv": sys.argv[1:] if argv is None else argv,
                       "packets": args.packets, "handshakes": args.handshakes,
                       "repeat": args.repeat, "quick": args.quick, "machine": machine_facts()},
              "cases": rows, "sealed_vs_plaintext": der,
              "errors": [f"{r['case']}: {r['problem']}" for r in rows if r["problem"]]}
    json_path.write_text(json.dumps(result, indent=2) + "\n")

    m = result["meta"]["machine"]
    print(f"\nper-operation cost, us (best / median of {args.repeat} repeats; "
          f"{args.packets} packets or {args.handshakes} handshakes per repeat)")
    print(f"{m['cpu']}, nproc {m['nproc']}, Python {m['python']}, cryptography "
          f"{m['cryptography']}, {m['openssl']}; loadavg {load_start.split()[0]} at start, "
          f"{result['meta']['loadavg_end'].split()[0]} at end")
    print(f"source: commit {source['commit']}"
          + (f", uncommitted changes in {', '.join(source['src_changes'])}"
             if source["src_changes"] else ""))
    print(render(["case", "best us", "median us"],
                 [[r["case"], fmt_us(r["best_us"]), fmt_us(r["median_us"])] for r in rows]))
    print("\nsealed vs plaintext (best us; crypto = sealed - plaintext)")
    print(render(["case", "sealed", "plaintext", "crypto", "crypto share"],
                 [[d["case"], fmt_us(d["sealed_us"]), fmt_us(d["plaintext_us"]),
                   fmt_us(d["crypto_us"]),
                   "-" if d["crypto_share"] is None else f"{100 * d['crypto_share']:.0f} %"]
                  for d in der]))
    if result["errors"]:
        print("\nerrors:", *result["errors"], sep="\n  ")
    print(f"\nsaved {json_path}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
