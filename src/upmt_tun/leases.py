"""VIpA leases: a host keeps its VIpA across anchor restarts and upgrades.

The anchor maps each host name (its ``[[peer]]`` name, which the handshake
authenticates) to the VIpA it was given, in a small SQLite file under ``state_dir``.
Every host's connections are bound to its VIpA: if an anchor restart handed a host
another address, each of its connections would die (issue 13), while the kernel's
conntrack/masquerade entries of those connections survive the restart untouched.

Durability: a new or changed lease is committed *before* the association is answered
(:meth:`Leases.put` returns after the commit). The file is in WAL mode with
``synchronous=FULL``: a commit is one append and one ``fsync`` of the WAL (a rollback
journal costs three), and it survives a power cut, which ``synchronous=NORMAL`` in WAL
mode does not promise. ``locking_mode=EXCLUSIVE`` keeps the WAL index in memory (no
``-shm`` file) and holds the file's lock for the anchor's life, so a second anchor
configured onto the same file is refused instead of sharing it. Writes are rare: a
lease is written when a host gets its first VIpA, and its ``last_seen`` is refreshed at
most once every :data:`REFRESH` seconds.

Safety: the anchor must start whatever the disk says. A state directory that cannot be
created or is writable by others, a lease file that is not ours (another owner, writable
by others, a link), a file that is not a lease file of ours (corrupt, or some other
SQLite database), a locked file, a full or read-only disk: each costs exactly one
warning line, and the anchor goes on with leases in memory (the addresses it hands out
stay consistent for this run; they are just not kept across a restart). A corrupt or
foreign file is left in place for the operator to look at.

Trust: the same rule as the sysctl state file (``system/sysctl.py``): the file is used
only if it is a regular file owned by us and writable by nobody else; the directory must
not be writable by group or others either (someone who can create files there could
plant a ``-wal`` file that SQLite would replay into ours).

The class is the store only; what to do with a lease (pool, reserved addresses, which
host is live) is :class:`upmt_tun.signalling.anchor_side.AnchorSignalling`'s business.
The wall clock is injected: ``last_seen`` must mean something after a reboot, which the
anchor's monotonic clock does not.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import sqlite3
import stat
import time
from collections.abc import Callable, Collection, Iterable
from pathlib import Path

__all__ = ["Leases", "lease_file", "DEFAULT_STATE_DIR", "DEFAULT_LEASE_DAYS", "REFRESH"]

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = "/var/lib/upmt"
DEFAULT_LEASE_DAYS = 30.0
REFRESH = 3600.0             # seconds: a live lease's last_seen is rewritten at most this often
APPLICATION_ID = 0x55504D4C  # "UPML": PRAGMA application_id of a lease file
SCHEMA_VERSION = 1
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")     # config.py's peer name rule

_SCHEMA = """
CREATE TABLE lease (
    name TEXT PRIMARY KEY NOT NULL,   -- the host's [[peer]] name
    vipa TEXT NOT NULL UNIQUE,        -- dotted IPv4
    last_seen REAL NOT NULL           -- wall clock (seconds since the epoch)
) WITHOUT ROWID;
"""


class _Refused(Exception):
    """Why the lease file cannot be used (the text of the one warning line)."""


def lease_file(state_dir: str, control_path: str) -> str:
    """The lease file of the anchor whose control socket is ``control_path``.

    Several anchors on one machine share ``state_dir`` but never a control socket (the
    second one refuses to start on a live socket), and an anchor keeps its socket across
    restarts: so the file is named after the socket's absolute path, escaped into one
    file name without loss (``/run/upmt/anchor.sock`` -> ``leases-run-upmt-anchor.sock.sqlite``;
    ``-`` and every character but letters, digits and ``.`` become ``_XX``)."""
    full = os.path.abspath(control_path).strip("/")
    out = []
    for c in full:
        if c == "/":
            out.append("-")
        elif c.isascii() and (c.isalnum() or c == "."):
            out.append(c)
        else:
            out.append("".join(f"_{b:02x}" for b in c.encode()))
    return str(Path(state_dir) / f"leases-{''.join(out)}.sqlite")


def _check_dir(path: Path) -> None:
    """Create the state directory (0700) if needed; refuse one others could write to."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.stat(path)
    except OSError as e:
        raise _Refused(f"cannot create state directory {path}: {e.strerror or e}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise _Refused(f"state_dir {path} is not a directory")
    if st.st_uid not in (os.geteuid(), 0):
        raise _Refused(f"state directory {path} is owned by uid {st.st_uid}")
    if st.st_mode & 0o022:
        raise _Refused(f"state directory {path} is writable by group or others "
                       f"(mode {stat.S_IMODE(st.st_mode):o})")


def _check_own(path: str, create: bool) -> None:
    """The file at ``path`` (and its ``-wal``) must be regular, ours, not writable by
    others; with ``create``, a missing main file is created (0600, never through a link)."""
    for p, may_create in ((path, create), (path + "-wal", False)):
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            fd = os.open(p, flags)
        except FileNotFoundError:
            if not may_create:
                continue
            try:
                fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            except OSError as e:
                raise _Refused(f"cannot create {p}: {e.strerror or e}") from None
        except OSError as e:
            raise _Refused(f"refusing {p}: {e.strerror or e}") from None
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Refused(f"refusing {p}: not a regular file")
        if st.st_uid != os.geteuid():
            raise _Refused(f"refusing {p}: owned by uid {st.st_uid}, not {os.geteuid()}")
        if st.st_mode & 0o022:
            raise _Refused(f"refusing {p}: writable by group or others "
                           f"(mode {stat.S_IMODE(st.st_mode):o})")


def _connect(path: str) -> sqlite3.Connection:
    """Open (or initialise) the lease file; _Refused if it is not a lease file of ours."""
    conn = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        conn.execute("PRAGMA synchronous=FULL")
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if (app_id, version, tables) == (0, 0, 0):          # a new, empty file
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            # one transaction: a crash never leaves a file that looks like someone else's
            conn.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} "
                               f"PRAGMA application_id={APPLICATION_ID}; "
                               f"PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
        elif app_id != APPLICATION_ID or version != SCHEMA_VERSION:
            raise _Refused(f"{path} is not a lease file of ours (application_id {app_id:#x}, "
                           f"version {version}); leaving it alone")
        else:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise _Refused(f"{path} is damaged ({str(check)[:60]}); leaving it alone")
            conn.execute("BEGIN IMMEDIATE")   # takes the exclusive lock now, not later
            conn.execute("COMMIT")
        if str(mode).lower() != "wal":
            raise _Refused(f"{path}: cannot switch to WAL mode (got {mode})")
    except BaseException:
        conn.close()
        raise
    return conn


class Leases:
    """Host name -> VIpA, durable when backed by a file (see the module docstring).

    Reads are served from memory; every change goes to the file first (committed), then
    to memory. After any file error the store is memory-only for the rest of the run,
    having said so in one line: the mapping in memory is kept, so a VIpA handed out
    stays its host's for this run either way."""

    def __init__(self, conn: sqlite3.Connection | None = None, path: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._conn = conn
        self.path = path
        self.clock = clock
        self._by_name: dict[str, tuple[str, float]] = {}    # name -> (vipa, last_seen)
        self._by_vipa: dict[str, str] = {}                  # vipa -> name

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def memory(cls, clock: Callable[[], float] = time.time) -> Leases:
        """A store that keeps leases for this run only (tests; ``state_dir = ""``)."""
        return cls(clock=clock)

    @classmethod
    def open(cls, path: str, clock: Callable[[], float] = time.time) -> Leases:
        """The store in file ``path`` (created if missing, with its directory). Never
        raises: when the file cannot be used, one warning line and a memory store."""
        try:
            _check_dir(Path(path).parent)
            _check_own(path, create=True)
            conn = _connect(path)
        except _Refused as e:
            log.warning("leases: %s; VIpAs are kept in memory only (not across a restart)", e)
            return cls(clock=clock)
        except sqlite3.Error as e:
            log.warning("leases: cannot use %s (%s); VIpAs are kept in memory only (not "
                        "across a restart)", path, _why(e))
            return cls(clock=clock)
        store = cls(conn, path, clock)
        store._load()
        return store

    def _load(self) -> None:
        assert self._conn is not None
        bad: list[object] = []
        try:
            rows = self._conn.execute("SELECT name, vipa, last_seen FROM lease").fetchall()
        except sqlite3.Error as e:
            self._fail("reading", e)
            return
        for name, vipa, seen in rows:
            ok = isinstance(name, str) and _NAME.fullmatch(name) is not None \
                and isinstance(seen, (int, float)) and _is_ipv4(vipa)
            if ok and vipa not in self._by_vipa:
                self._by_name[name] = (vipa, float(seen))
                self._by_vipa[vipa] = name
            else:
                bad.append(name)
        if bad:
            log.warning("leases: dropping %d malformed lease(s) in %s", len(bad), self.path)
            self._write("DELETE FROM lease WHERE name = ?", [(n,) for n in bad])

    # -- reading ---------------------------------------------------------------------------
    @property
    def durable(self) -> bool:
        """Whether changes still go to the file."""
        return self._conn is not None

    def get(self, name: str) -> str | None:
        """The VIpA leased to host ``name``, or None."""
        got = self._by_name.get(name)
        return got[0] if got is not None else None

    def owner(self, vipa: str) -> str | None:
        """The host holding a lease on ``vipa``, or None."""
        return self._by_vipa.get(vipa)

    def in_use(self) -> Collection[str]:
        """Every leased VIpA (a live view: do not change the store while iterating it)."""
        return self._by_vipa.keys()

    def items(self) -> dict[str, tuple[str, float]]:
        """name -> (VIpA, last_seen): a copy, for status and tests."""
        return dict(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    # -- changing --------------------------------------------------------------------------
    def put(self, name: str, vipa: str) -> None:
        """Lease ``vipa`` to ``name`` (replacing its old lease; ``vipa`` must not be another
        host's: :meth:`forget` that one first). Committed to the file when this returns.
        Rewrites nothing when the lease is unchanged and was seen within :data:`REFRESH`."""
        now = self.clock()
        old = self._by_name.get(name)
        if old is not None and old[0] == vipa and 0 <= now - old[1] < REFRESH:
            return
        holder = self._by_vipa.get(vipa)
        if holder is not None and holder != name:
            raise ValueError(f"VIpA {vipa} is leased to {holder}")
        self._write("INSERT INTO lease (name, vipa, last_seen) VALUES (?, ?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET vipa = excluded.vipa, "
                    "last_seen = excluded.last_seen", [(name, vipa, now)])
        if old is not None:
            self._by_vipa.pop(old[0], None)
        self._by_name[name] = (vipa, now)
        self._by_vipa[vipa] = name

    def touch(self, names: Iterable[str]) -> None:
        """Mark these hosts seen now (one transaction; hosts without a lease are skipped)."""
        now = self.clock()
        seen = [(n, v) for n in names if (v := self._by_name.get(n)) is not None
                and not 0 <= now - v[1] < REFRESH]
        if not seen:
            return
        self._write("UPDATE lease SET last_seen = ? WHERE name = ?", [(now, n) for n, _ in seen])
        for n, (vipa, _) in seen:
            self._by_name[n] = (vipa, now)

    def forget(self, names: Iterable[str]) -> None:
        """Drop the leases of these hosts (one transaction)."""
        gone = [n for n in dict.fromkeys(names) if n in self._by_name]
        if not gone:
            return
        self._write("DELETE FROM lease WHERE name = ?", [(n,) for n in gone])
        for n in gone:
            vipa, _ = self._by_name.pop(n)
            self._by_vipa.pop(vipa, None)

    def compact(self, *, peers: Collection[str], pool: ipaddress.IPv4Network,
                reserved: Collection[ipaddress.IPv4Address], max_age: float) -> list[str]:
        """Drop leases of hosts that are no longer ``peers``, not seen for ``max_age``
        seconds, or whose VIpA is outside ``pool`` or ``reserved`` (the pool changed).
        Returns the names dropped."""
        now = self.clock()
        drop = []
        for name, (vipa, seen) in self._by_name.items():
            ip = ipaddress.IPv4Address(vipa)
            if name not in peers or now - seen > max_age or ip not in pool or ip in reserved:
                drop.append(name)
        self.forget(drop)
        return drop

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None

    # -- the file --------------------------------------------------------------------------
    def _write(self, sql: str, rows: list[tuple[object, ...]]) -> None:
        """One committed transaction, or (once) the switch to memory only."""
        conn = self._conn
        if conn is None:
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(sql, rows)
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            self._fail("writing", e)

    def _fail(self, doing: str, e: sqlite3.Error) -> None:
        log.warning("leases: %s %s failed (%s); VIpAs are kept in memory only from now on",
                    doing, self.path, _why(e))
        self.close()


def _is_ipv4(v: object) -> bool:
    if not isinstance(v, str):
        return False
    try:
        return str(ipaddress.IPv4Address(v)) == v
    except ValueError:
        return False


def _why(e: sqlite3.Error) -> str:
    return " ".join(str(e).split())[:100] or type(e).__name__
