"""Which tunnel carries a flow: pure functions, no I/O.

A flow goes to the first anchor in ``anchors`` that has a usable tunnel on one
of the ``via`` interfaces, and on that anchor to the first usable interface in
``via`` order. A fixed host only carries flows to its own addresses; when a
flow's destination *is* a fixed host that the flow may use, that fixed host is
tried first (UPMT-DAM's direct MH->FH path instead of a relay through an anchor).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, TypeVar

__all__ = ["HomeAnchor", "choose_tunnel"]

T = TypeVar("T")


class _Link(Protocol):
    role: str
    serves: frozenset[bytes]


def choose_tunnel(*, via: tuple[str, ...], anchors: tuple[str, ...], dst: bytes,
                  links: Mapping[str, _Link], usable: Callable[[str, str], T | None]) -> T | None:
    """The tunnel for a flow to ``dst``, or None when none of its paths is usable."""
    direct = [a for a in anchors if a in links and links[a].role == "fixed-host"
              and dst in links[a].serves]
    relays = [a for a in anchors if a in links and links[a].role != "fixed-host"]
    for a in direct + relays:
        for iface in via:
            t = usable(iface, a)
            if t is not None:
                return t
    return None


# -- which anchor new flows use when their rule names none (UPMT-DAM multiAN) ----------------
HOME_MIN_GAIN = 0.010     # seconds: a better anchor must be at least this much faster ...
HOME_MIN_RATIO = 2 / 3    # ... and at most this fraction of the current one's RTT ...
HOME_HOLD = 2.0           # ... for this long without a break, before new flows go there


class HomeAnchor:
    """The anchor that new flows of rules without ``anchor`` go to: the reachable one with
    the best measured RTT, with hysteresis against flapping.

    The paper leaves anchor selection to future work ("with the goal to optimize the
    performances"); Tailscale's rule for its home relay is a good one: keep the current
    home unless another is more than about 10 ms *and* a third better. Here that must also
    hold for :data:`HOME_HOLD` seconds in a row (one probe's spike does not count). An
    unreachable home (no RTT) is left at once for the best reachable anchor. Anchors never
    measured keep the config order among themselves, after the measured ones. Existing
    flows never follow: a flow keeps its anchor (its public address).

    Pure: ``now`` and the RTTs (smoothed, seconds; None = not reachable) are passed in.
    """

    def __init__(self, order: Sequence[str]) -> None:
        self.order = list(order)
        self.home: str | None = None
        self._better: tuple[str, float] | None = None   # challenger and since when

    def update(self, now: float, rtts: Mapping[str, float | None]) -> list[str]:
        """Call after RTTs change (each probe tick): the anchors in the order new flows
        try them (home first)."""
        measured = {a: r for a, r in rtts.items() if r is not None and a in self.order}
        if measured:
            best = min(measured, key=lambda a: (measured[a], self.order.index(a)))
            cur = self.home
            if cur not in measured:
                self.home, self._better = best, None
            elif best == cur:
                self._better = None
            else:
                assert cur is not None
                gain = measured[cur] - measured[best]
                if gain > HOME_MIN_GAIN and measured[best] < measured[cur] * HOME_MIN_RATIO:
                    if self._better is None or self._better[0] != best:
                        self._better = (best, now)
                    elif now - self._better[1] >= HOME_HOLD:
                        self.home, self._better = best, None
                else:
                    self._better = None
        return self.ranked(measured)

    def ranked(self, measured: Mapping[str, float]) -> list[str]:
        rest = sorted((a for a in self.order if a != self.home),
                      key=lambda a: (a not in measured, measured.get(a, 0.0),
                                     self.order.index(a)))
        return [self.home, *rest] if self.home is not None else rest
