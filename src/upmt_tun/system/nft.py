"""Drive the ``nft`` program: apply generated scripts, delete our tables."""

from __future__ import annotations

import shutil
import subprocess

from upmt_tun.system.errors import SystemSetupError

_TIMEOUT = 10.0


def _run(args: list[str], script: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``nft`` with ``args`` (feeding ``script`` on stdin); OS errors become ours."""
    try:
        return subprocess.run(
            ["nft", *args],
            input=script,
            capture_output=True,
            text=True,
            timeout=_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        raise SystemSetupError("nft not found (install the nftables package)") from None
    except (OSError, subprocess.SubprocessError) as exc:
        raise SystemSetupError(f"cannot run nft: {exc}") from None


def _first_error(stderr: str) -> str:
    """The first meaningful line of nft's stderr (it prints the offending line after it)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if "Error:" in line:
            return line
    return lines[0] if lines else "unknown error"


def nft_available() -> bool:
    """True if the ``nft`` program exists and can talk to the kernel."""
    if shutil.which("nft") is None:
        return False
    try:
        return _run(["list", "tables"]).returncode == 0
    except SystemSetupError:
        return False


def apply(script: str) -> None:
    """Apply an nft script atomically (``nft -f -``); raise on the first error."""
    proc = _run(["-f", "-"], script)
    if proc.returncode != 0:
        raise SystemSetupError(f"nft: {_first_error(proc.stderr)}")


def check(script: str) -> None:
    """Dry-run an nft script (``nft -c -f -``: parsed and checked by the kernel, nothing
    committed); raise on the first error."""
    proc = _run(["-c", "-f", "-"], script)
    if proc.returncode != 0:
        raise SystemSetupError(f"nft: {_first_error(proc.stderr)}")


def table_exists(family: str, name: str) -> bool:
    """True if nft table ``family name`` exists."""
    return _run(["list", "table", family, name]).returncode == 0


def chain_exists(family: str, table: str, chain: str) -> bool:
    """True if chain ``chain`` of nft table ``family table`` exists."""
    return _run(["list", "chain", family, table, chain]).returncode == 0


def delete_table(family: str, name: str) -> None:
    """Delete nft table ``family name``; a missing table is not an error."""
    proc = _run(["delete", "table", family, name])
    if proc.returncode != 0 and "No such file" not in proc.stderr:
        raise SystemSetupError(f"nft: {_first_error(proc.stderr)}")


def table_script(family: str, table: str,
                 chains: list[tuple[str, str | None, list[str]]]) -> str:
    """The nft script of table ``family table`` with ``chains``: (name, its hook line
    without ``; policy accept;`` or None for a chain without hook, its rules)."""
    lines = [f"table {family} {table} {{"]
    for name, hook, rules in chains:
        lines.append(f"\tchain {name} {{")
        if hook is not None:
            lines.append(f"\t\t{hook}; policy accept;")
        lines += [f"\t\t{rule}" for rule in rules]
        lines.append("\t}")
    return "\n".join(lines) + "\n}\n"


def quote(name: str) -> str:
    """Quote an interface name (or cgroup path) as an nft string literal."""
    if any(ch in name for ch in '"\\\n\r\t;') or not name.isprintable():
        raise SystemSetupError(f"name not usable in an nft script: {name!r}")
    return f'"{name}"'
