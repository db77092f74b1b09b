"""Path probing and the return-to-preferred decision: pure state machines, clock passed in.

Each tunnel of the agent has a :class:`PathMonitor`. The agent ticks it every
:data:`TICK` seconds with the tunnel's packet counters; the monitor answers whether
to send a probe now and whether the path is dead.

* Any packet received on the tunnel proves the path alive (as WireGuard's passive
  keepalive): a busy tunnel needs no probe answer to stay up.
* While the tunnel carries traffic (data either way within ``idle_after``), a probe goes
  out every ``active_interval``: a path that dies silently behind a NAT is noticed
  after ``dead_after()`` (at least ``dead_min``, more on slow paths) *and*
  ``lost_probes`` probes without any answer.
* An idle tunnel backs off: probes every 1 s, then 2 s, 4 s ... up to ``idle_max``
  (the NAT keepalive). Detection then takes longer, but nothing suffers; the interval
  tightens on the first tick that sees traffic again.
* Probes are answered by the anchor, so they double as NAT keepalives, and give the
  RTT (smoothed as TCP does, RFC 6298) and a loss estimate.

:func:`should_return` is the hysteresis: a flow goes back to a better-preferred
interface only once that interface's tunnel has been up for ``return_after``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["TICK", "PathMonitor", "ProbeParams", "should_return"]

TICK = 0.05            # seconds between monitor ticks (all tunnels in one timer)


@dataclass(frozen=True)
class ProbeParams:
    active_interval: float = 0.1   # probe period while the tunnel carries traffic
    idle_after: float = 1.0        # no data sent for this long: the tunnel is idle
    idle_first: float = 1.0        # first idle probe period; doubles up to idle_max
    idle_max: float = 10.0         # the NAT keepalive period (config ``keepalive``)
    dead_min: float = 0.5          # silence shorter than this never kills a path
    dead_max: float = 5.0          # ... and longer than this always does (with lost probes)
    lost_probes: int = 3           # unanswered probes needed as well


@dataclass
class PathMonitor:
    params: ProbeParams
    started: float                    # when the tunnel came up
    last_rx: float = field(init=False)
    last_data: float = float("-inf")  # when data was last seen going out or coming in
    last_probe: float = float("-inf")
    interval: float = field(init=False)
    unanswered: int = 0               # probes sent since anything was received
    srtt: float | None = None
    rttvar: float = 0.0
    probes_sent: int = 0
    probes_answered: int = 0
    _tx_seen: int = -1
    _rx_seen: int = -1

    def __post_init__(self) -> None:
        self.last_rx = self.started
        self.interval = self.params.active_interval

    def dead_after(self) -> float:
        """Silence (with lost probes) that means the path is dead: twice the smoothed
        RTT plus four deviations (TCP's RTO, doubled), within [dead_min, dead_max]."""
        p = self.params
        if self.srtt is None:
            return p.dead_min
        return min(p.dead_max, max(p.dead_min, 2 * self.srtt + 4 * self.rttvar))

    def on_pong(self, now: float, rtt: float) -> None:
        """A probe came back after ``rtt`` seconds (its own send time, echoed)."""
        self.probes_answered += 1
        self.last_rx = now
        self.unanswered = 0
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt

    def tick(self, now: float, tx_packets: int, rx_packets: int) -> tuple[bool, bool]:
        """(send a probe now?, is the path dead?) given the tunnel's data packet counters
        (probes are not counted in them)."""
        p = self.params
        if rx_packets != self._rx_seen:
            if self._rx_seen >= 0:
                self.last_rx = self.last_data = now
                self.unanswered = 0
            self._rx_seen = rx_packets
        if tx_packets != self._tx_seen:
            if self._tx_seen >= 0:
                self.last_data = now
            self._tx_seen = tx_packets
        if self.unanswered >= p.lost_probes and now - self.last_rx >= self.dead_after():
            return False, True
        active = now - self.last_data < p.idle_after
        if active:
            self.interval = wait = p.active_interval    # traffic: tighten at once
        else:
            self.interval = max(self.interval, p.idle_first)
            # a probe not answered yet: retry after idle_first, not after the long period
            wait = p.idle_first if self.unanswered else self.interval
        if now - self.last_probe < wait - TICK / 2:   # ticks jitter
            return False, False
        if not active and not self.unanswered and self.probes_sent:
            self.interval = min(p.idle_max, self.interval * 2)   # answered: back off
        self.last_probe = now
        self.unanswered += 1
        self.probes_sent += 1
        return True, False

    def quiet_until(self, now: float) -> float:
        """When the next :meth:`tick` can change anything if no packet moves meanwhile:
        the next tick while the tunnel carries traffic or a probe is unanswered (dead-path
        detection), else when the next idle probe is due. An idle agent then wakes once
        per keepalive instead of every TICK; the driver ticks at once when traffic starts
        again (the counters only move with packets, which the driver sees)."""
        p = self.params
        if self.unanswered or now - self.last_data < p.idle_after:
            return now + TICK
        # a hair past tick()'s threshold (wait - TICK / 2), so float rounding cannot make
        # the woken tick find the probe not yet due
        return max(now + TICK, self.last_probe + self.interval - TICK / 4)

    def loss(self) -> float | None:
        """Share of probes never answered (None before the first)."""
        if self.probes_sent == 0:
            return None
        return max(0.0, 1.0 - self.probes_answered / self.probes_sent)


def should_return(via: tuple[str, ...], current: str | None, candidate: str,
                  candidate_up_for: float, return_after: float) -> bool:
    """Move a flow from its ``current`` interface back to ``candidate``? Only if the
    candidate comes earlier in the rule's ``via`` order and its tunnel has been up for
    ``return_after`` seconds (hysteresis: a flapping interface does not drag flows).
    A flow whose tunnel is gone (``current`` None) takes any of its interfaces at once."""
    if candidate == current or candidate not in via:
        return False
    if current is None:
        return True
    if current is not None and current in via and via.index(candidate) > via.index(current):
        return False
    return candidate_up_for >= return_after
