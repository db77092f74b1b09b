"""Which network device each ``[[interface]]`` entry stands for, as devices come and go.

An ``[[interface]]`` entry is a *slot*: one tunnel socket, one packet mark, one routing
table, one set of links, named after the entry (``wlan0``, or a pattern such as
``usb*``). The slot is fixed at start; the device behind it is not:

* a literal name stands for the device of that name, whenever it exists (a USB tether
  unplugged and plugged back is deleted and created again, with a new ifindex);
* a pattern (fnmatch-style: ``*``, ``?``, ``[...]``) stands for one matching device at a
  time: the first present one (by name) that no other entry holds; when it goes, the
  next matching device present (or the next to appear) takes its place.

Literal entries are served before patterns, so ``usb0`` listed beside ``usb*`` keeps
``usb0`` for itself. :class:`Slots` is pure: the driver feeds it the kernel's link
events (``RTM_NEWLINK``/``RTM_DELLINK``: index, name) and carries out the
:class:`Bind`/:class:`Unbind` it returns (re-bind the slot's socket, remake its route).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

__all__ = ["Bind", "Change", "Slots", "Unbind", "is_pattern", "matches"]

_WILD = frozenset("*?[")


def is_pattern(name: str) -> bool:
    """An entry with ``*``, ``?`` or ``[`` is a pattern (interface names never have them)."""
    return not _WILD.isdisjoint(name)


def matches(entry: str, device: str) -> bool:
    """Does ``device`` belong to the ``[[interface]]`` entry ``entry``?"""
    return fnmatchcase(device, entry) if is_pattern(entry) else device == entry


@dataclass(frozen=True)
class Bind:
    """Slot ``slot`` is now device ``device`` (interface index ``index``)."""

    slot: str
    device: str
    index: int


@dataclass(frozen=True)
class Unbind:
    """Slot ``slot`` lost its device ``device`` (deleted, or renamed away)."""

    slot: str
    device: str
    index: int


Change = Bind | Unbind


class Slots:
    def __init__(self, entries: list[str], present: dict[int, str]) -> None:
        """``entries``: the slots, in config order; ``present``: index -> name of every
        device that exists now. The initial binding is read from :attr:`bound`."""
        self.entries = list(entries)
        self.present = dict(present)
        self.bound: dict[str, tuple[int, str] | None] = dict.fromkeys(self.entries)
        self._fill()

    def device(self, slot: str) -> str | None:
        b = self.bound.get(slot)
        return b[1] if b is not None else None

    def slot_of(self, index: int) -> str | None:
        return next((s for s, b in self.bound.items() if b is not None and b[0] == index), None)

    def _order(self) -> list[str]:
        """Literal entries first (they name one device), then patterns in config order."""
        return ([e for e in self.entries if not is_pattern(e)]
                + [e for e in self.entries if is_pattern(e)])

    def _fill(self) -> list[Change]:
        """Give every slot without a device the first free present device it matches."""
        out: list[Change] = []
        for slot in self._order():
            if self.bound[slot] is not None:
                continue
            held = {b[0] for b in self.bound.values() if b is not None}
            for index, name in sorted(self.present.items(), key=lambda x: x[1]):
                if index not in held and matches(slot, name):
                    self.bound[slot] = (index, name)
                    out.append(Bind(slot, name, index))
                    break
        return out

    def would_bind(self, entry: str) -> str | None:
        """The device a new entry ``entry`` would get now (:meth:`add`), if any."""
        held = {b[0] for b in self.bound.values() if b is not None}
        return next((name for index, name in sorted(self.present.items(), key=lambda x: x[1])
                     if index not in held and matches(entry, name)), None)

    def add(self, entry: str) -> list[Change]:
        """``reload``: a new entry (last in config order); it takes a free device now if
        one matches (literal entries first, as at start)."""
        if entry in self.bound:
            return []
        self.entries.append(entry)
        self.bound[entry] = None
        return self._fill()

    def remove(self, entry: str) -> list[Change]:
        """``reload``: entry ``entry`` is gone; its device (if any) is free for another
        entry (a pattern) that has none: the :class:`Bind` returned."""
        if entry not in self.bound:
            return []
        self.entries.remove(entry)
        del self.bound[entry]
        return self._fill()

    def on_link(self, index: int, name: str | None, exists: bool) -> list[Change]:
        """A link event: device ``index`` exists now under ``name`` (RTM_NEWLINK: new,
        changed or renamed), or was deleted (RTM_DELLINK). Returns what to carry out,
        unbinds first."""
        out: list[Change] = []
        if exists and name:
            self.present[index] = name
        else:
            self.present.pop(index, None)
        slot = self.slot_of(index)
        if slot is not None:
            old = self.bound[slot]
            assert old is not None
            if not exists or name is None or not matches(slot, name):
                self.bound[slot] = None
                out.append(Unbind(slot, old[1], index))
            elif name != old[1]:                     # renamed, still matching
                self.bound[slot] = (index, name)
                out += [Unbind(slot, old[1], index), Bind(slot, name, index)]
        return out + self._fill()

    def resync(self, present: dict[int, str]) -> list[Change]:
        """Events were lost (netlink ENOBUFS): compare with a fresh listing."""
        out: list[Change] = []
        for slot, b in self.bound.items():
            if b is not None and present.get(b[0]) != b[1]:
                self.bound[slot] = None
                out.append(Unbind(slot, b[1], b[0]))
        self.present = dict(present)
        return out + self._fill()
