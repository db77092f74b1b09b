"""Which tunnel carries a flow: pure functions, no I/O.

A flow goes to the first anchor in ``anchors`` that has a usable tunnel on one
of the ``via`` interfaces, and on that anchor to the first usable interface in
``via`` order. A fixed host only carries flows to its own addresses; when a
flow's destination *is* a fixed host that the flow may use, that fixed host is
tried first (UPMT-DAM's direct MH->FH path instead of a relay through an anchor).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol, TypeVar

__all__ = ["choose_tunnel"]

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
