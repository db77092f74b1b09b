"""The systemd units shipped in the package (``upmt_tun/systemd/*.service``).

``install.sh --systemd`` runs ``python -m upmt_tun.units install UNITDIR BINDIR``: the
units are written to UNITDIR with the commands' paths of that install (BINDIR) in place
of ``/usr/local/bin``. ``python -m upmt_tun.units show NAME`` prints one.
"""

from __future__ import annotations

import os
import sys
from importlib import resources
from pathlib import Path

__all__ = ["UNITS", "install", "unit_text"]

UNITS = ("upmt-agent.service", "upmt-anchor.service")
DEFAULT_BINDIR = "/usr/local/bin"


def unit_text(name: str, bindir: str = DEFAULT_BINDIR) -> str:
    """The unit ``name`` with its commands taken from ``bindir``."""
    if name not in UNITS:
        raise ValueError(f"no unit {name!r} (there are: {', '.join(UNITS)})")
    text = resources.files("upmt_tun").joinpath("systemd", name).read_text()
    return text.replace(f"{DEFAULT_BINDIR}/", f"{bindir.rstrip('/')}/")


def install(unitdir: str, bindir: str = DEFAULT_BINDIR) -> list[Path]:
    """Write every unit into ``unitdir`` (mode 644); the paths written."""
    out = []
    os.makedirs(unitdir, exist_ok=True)
    for name in UNITS:
        path = Path(unitdir) / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(unit_text(name, bindir))
        tmp.chmod(0o644)
        os.replace(tmp, path)
        out.append(path)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        if len(args) in (2, 3) and args[0] == "install":
            for p in install(*args[1:]):
                print(p)
            return 0
        if len(args) in (2, 3) and args[0] == "show":
            print(unit_text(*args[1:]), end="")
            return 0
    except (OSError, ValueError) as e:
        print(f"upmt_tun.units: {e}", file=sys.stderr)
        return 1
    print("usage: python -m upmt_tun.units install UNITDIR [BINDIR] | show NAME [BINDIR]",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
