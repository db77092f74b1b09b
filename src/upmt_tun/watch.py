"""``status --watch``: a refreshing table with rates per tunnel and per flow.

The daemons keep counters only (bytes and packets since the tunnel or flow began); the
rates are computed here, from two successive ``status`` answers and the time between
them (:func:`rates`, pure). A counter that went down (the id now names another tunnel)
or an item not in the previous answer has no rate yet ("-"), never a negative one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TextIO

__all__ = ["agent_view", "anchor_view", "fmt_bits", "rates", "watch"]

Rates = dict[Any, dict[str, float | None]]
TUNNEL_KEYS = ("tx_bytes", "rx_bytes", "tx_packets", "rx_packets")
FLOW_KEYS = ("tx_packets", "rx_packets")


def rates(prev: Iterable[Mapping[str, Any]], cur: Iterable[Mapping[str, Any]], dt: float,
          keys: tuple[str, ...], ident: Callable[[Mapping[str, Any]], Any] = lambda x: x["id"]
          ) -> Rates:
    """Per item of ``cur`` (by ``ident``): each counter in ``keys`` per second over ``dt``
    seconds since ``prev``; None where there is no earlier value, the counter went down,
    a value is not a number, or ``dt`` is not positive."""
    before = {ident(p): p for p in prev}
    out: Rates = {}
    for c in cur:
        p = before.get(ident(c))
        row: dict[str, float | None] = {}
        for k in keys:
            a, b = (p or {}).get(k), c.get(k)
            ok = (p is not None and dt > 0 and isinstance(a, int | float)
                  and isinstance(b, int | float) and not isinstance(a, bool)
                  and not isinstance(b, bool) and b >= a)
            row[k] = (b - a) / dt if ok else None     # type: ignore[operator]
        out[ident(c)] = row
    return out


def fmt_bits(bytes_per_s: float | None) -> str:
    """Bytes per second as bits per second, short: ``12.3M``; ``-`` for no rate."""
    if bytes_per_s is None:
        return "-"
    v = bytes_per_s * 8
    for unit in ("", "k", "M", "G"):
        if v < 1000 or unit == "G":
            return f"{v:.0f}{unit}" if unit == "" else f"{v:.1f}{unit}"
        v /= 1000
    return f"{v:.1f}G"  # pragma: no cover - the loop returns


def _pps(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def agent_view(prev: Mapping[str, Any] | None, st: Mapping[str, Any], dt: float) -> str:
    """The agent's watch screen: anchors, tunnels with bit and packet rates, flows with
    packet rates (flows count packets only)."""
    p = prev or {}
    tr = rates(p.get("tunnels", []), st.get("tunnels", []), dt, TUNNEL_KEYS)
    fr = rates(p.get("flows", []), st.get("flows", []), dt, FLOW_KEYS)
    lines = [f"agent {st.get('name', '')}  vipa_fix {st.get('vipa_fix', '')}  "
             f"(rates over {dt:.1f} s)" if prev else f"agent {st.get('name', '')}  "
             f"vipa_fix {st.get('vipa_fix', '')}"]
    for a in st.get("anchors", []):
        lines.append(f"anchor {a.get('name')} {a.get('address') or '-'}  {a.get('state')}  "
                     f"vipa {a.get('vipa') or '-'}")
    lines.append(f"\n{'TUNNEL':>6} {'IFACE':8} {'ANCHOR':8} {'STATE':5} {'RTT ms':>7} "
                 f"{'TX b/s':>8} {'RX b/s':>8} {'TX p/s':>7} {'RX p/s':>7}")
    for t in st.get("tunnels", []):
        r = tr[t["id"]]
        rtt = "-" if t.get("rtt_ms") is None else f"{t['rtt_ms']:.1f}"
        lines.append(f"{t['id']:>6} {t.get('interface', ''):8} {t.get('anchor', ''):8} "
                     f"{t.get('state', ''):5} {rtt:>7} {fmt_bits(r['tx_bytes']):>8} "
                     f"{fmt_bits(r['rx_bytes']):>8} {_pps(r['tx_packets']):>7} "
                     f"{_pps(r['rx_packets']):>7}")
    lines.append(f"\n{'FLOW':>6} {'PROTO':5} {'DESTINATION':21} {'RULE':10} {'IFACE':8} "
                 f"{'TX p/s':>7} {'RX p/s':>7}")
    for f in st.get("flows", []):
        r = fr[f["id"]]
        lines.append(f"{f['id']:>6} {f.get('protocol', ''):5} "
                     f"{str(f.get('dst')) + ':' + str(f.get('dport')):21} "
                     f"{f.get('rule') or '-':10} {f.get('interface') or '-':8} "
                     f"{_pps(r['tx_packets']):>7} {_pps(r['rx_packets']):>7}")
    return "\n".join(lines) + "\n"


def anchor_view(prev: Mapping[str, Any] | None, st: Mapping[str, Any], dt: float) -> str:
    """The anchor's watch screen: per host, its tunnels with rates; flows with rates."""
    p = prev or {}

    def tunnels(s: Mapping[str, Any]) -> list[dict[str, Any]]:
        return [dict(t, mh=a.get("mh")) for a in s.get("associations", [])
                for t in a.get("tunnels", [])]

    tr = rates(tunnels(p), tunnels(st), dt, TUNNEL_KEYS)
    fr = rates(p.get("flows", []), st.get("flows", []), dt, FLOW_KEYS)
    lines = [f"{st.get('role', 'anchor')} on {st.get('listen', '')}  pool "
             f"{st.get('vipa_pool', '')}" + (f"  (rates over {dt:.1f} s)" if prev else "")]
    lines.append(f"\n{'HOST':10} {'TUNNEL':>6} {'FROM':21} {'TX b/s':>8} {'RX b/s':>8} "
                 f"{'TX p/s':>7} {'RX p/s':>7}")
    for t in tunnels(st):
        r = tr[t["id"]]
        lines.append(f"{str(t.get('mh')):10} {t['id']:>6} {str(t.get('remote')):21} "
                     f"{fmt_bits(r['tx_bytes']):>8} {fmt_bits(r['rx_bytes']):>8} "
                     f"{_pps(r['tx_packets']):>7} {_pps(r['rx_packets']):>7}")
    lines.append(f"\n{'FLOW':>6} {'PROTO':5} {'DESTINATION':21} {'HOST':10} "
                 f"{'UP p/s':>7} {'DOWN p/s':>8}")
    for f in st.get("flows", []):
        r = fr[f["id"]]
        lines.append(f"{f['id']:>6} {f.get('protocol', ''):5} "
                     f"{str(f.get('dst')) + ':' + str(f.get('dport')):21} "
                     f"{str(f.get('mh', '')):10} {_pps(r['tx_packets']):>7} "
                     f"{_pps(r['rx_packets']):>8}")
    return "\n".join(lines) + "\n"


CLEAR = "\x1b[H\x1b[J"


def watch(fetch: Callable[[], Mapping[str, Any]],
          view: Callable[[Mapping[str, Any] | None, Mapping[str, Any], float], str],
          interval: float, out: TextIO, *, count: int | None = None,
          clock: Callable[[], float] = time.monotonic,
          sleep: Callable[[float], None] = time.sleep) -> None:
    """Fetch and show every ``interval`` seconds until interrupted (or ``count`` screens);
    on a terminal each screen replaces the last."""
    tty = out.isatty()
    prev: Mapping[str, Any] | None = None
    then = clock()
    shown = 0
    while count is None or shown < count:
        st = fetch()
        now = clock()
        screen = view(prev, st, now - then)
        out.write((CLEAR if tty else ("\n" if shown else "")) + screen)
        out.flush()
        prev, then = st, now
        shown += 1
        if count is None or shown < count:
            sleep(interval)
