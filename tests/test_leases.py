"""VIpA leases (issue 13 item 1): the store (``leases.py``) and the anchor's use of it.

The store: leases survive a close and a crash (committed before ``put`` returns); a
corrupt, foreign, foreign-owned or group-writable file, a directory others can write
to, a locked file, a read-only or full disk each cost exactly one warning line and
leave a memory store (the anchor starts and hands out fresh addresses); compaction drops
old leases, removed peers and addresses outside a changed pool.

The anchor (signalling over the in-memory anchor of test_anchor_fuzz): after a restart
each host gets its VIpA back whatever order the hosts come back in, a VIpA leased to a
host that left is not given to another, and a restarted agent (a new session, new
ports) is answered with its VIpA and its tunnels move to its new addresses at once.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from upmt_tun import keys, leases
from upmt_tun.config import ConfigError, load_anchor_config
from upmt_tun.leases import REFRESH, Leases, lease_file

from . import pktbuild as pb
from .test_anchor_fuzz import CH, MH, MH2, PEER_KEYS, Host, Rig

NAMES = ("laptop", "phone", "tablet", "desk", "car")
for _n in NAMES:
    PEER_KEYS.setdefault(_n, keys.keypair())
POOL = ipaddress.IPv4Network("100.100.0.0/16")
RESERVED = {POOL.network_address, POOL.broadcast_address, POOL.network_address + 1}
DAY = 86400.0


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == leases.__name__ and r.levelno >= logging.WARNING]


@pytest.fixture
def state(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    return d


# -- the store ---------------------------------------------------------------------------

def test_lease_file_is_distinct_per_control_socket(tmp_path: Path) -> None:
    assert lease_file("/var/lib/upmt", "/run/upmt/anchor.sock") == \
        "/var/lib/upmt/leases-run-upmt-anchor.sock.sqlite"
    names = {lease_file("/s", p) for p in ("/run/a/b.sock", "/run/a-b.sock", "/run/a_b.sock",
                                           "/run/a/b_2d.sock", "/run/a\u00e9.sock")}
    assert len(names) == 5
    assert all("/" not in Path(n).name for n in names)


def test_leases_survive_close_and_reopen(state: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = str(state / "l.sqlite")
    s = Leases.open(path)
    assert s.durable
    s.put("laptop", "100.100.0.2")
    s.put("phone", "100.100.0.3")
    s.put("laptop", "100.100.0.9")            # a changed lease replaces the old one
    s.close()
    again = Leases.open(path)
    assert again.durable
    assert {n: v for n, (v, _) in again.items().items()} == {"laptop": "100.100.0.9",
                                                            "phone": "100.100.0.3"}
    assert again.owner("100.100.0.2") is None and again.owner("100.100.0.9") == "laptop"
    st = os.stat(path)
    assert st.st_mode & 0o777 == 0o600 and os.stat(state).st_mode & 0o777 == 0o700
    assert warnings(caplog) == []


def test_a_put_is_committed_before_it_returns(state: Path) -> None:
    """A process killed right after put (no close, no atexit) left its lease behind."""
    path = str(state / "l.sqlite")
    code = textwrap.dedent(f"""
        import os
        from upmt_tun.leases import Leases
        s = Leases.open({path!r})
        assert s.durable
        s.put("laptop", "100.100.0.7")
        os._exit(0)
        """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert Leases.open(path).get("laptop") == "100.100.0.7"


def test_a_second_anchor_on_the_same_file_is_refused(state: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    path = str(state / "l.sqlite")
    first = Leases.open(path)
    first.put("laptop", "100.100.0.2")
    second = Leases.open(path)
    assert not second.durable and second.get("laptop") is None
    assert len(warnings(caplog)) == 1 and "locked" in warnings(caplog)[0]
    first.put("phone", "100.100.0.3")          # the first one goes on, on its file
    assert first.durable


@pytest.mark.parametrize("content", [b"this is not a database\n" * 100,
                                     b"SQLite format 3\x00" + os.urandom(4000)])
def test_corrupt_file_one_line_memory_and_left_alone(state: Path, content: bytes,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    state.mkdir(mode=0o700)
    path = state / "l.sqlite"
    path.write_bytes(content)
    path.chmod(0o600)
    s = Leases.open(str(path))
    assert not s.durable
    assert len(warnings(caplog)) == 1, warnings(caplog)
    s.put("laptop", "100.100.0.2")             # the anchor goes on: fresh, in memory
    assert s.get("laptop") == "100.100.0.2"
    assert path.read_bytes() == content        # for the operator to look at
    assert len(warnings(caplog)) == 1


def test_damaged_lease_file_is_refused(state: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = state / "l.sqlite"
    s = Leases.open(str(path))
    for i in range(300):
        s.put(f"h{i}", f"100.100.{i // 200}.{i % 200 + 2}")
    s.close()
    raw = bytearray(path.read_bytes())
    assert len(raw) > 3 * 4096
    raw[2 * 4096:3 * 4096] = os.urandom(4096)  # a page of the table's b-tree
    path.write_bytes(bytes(raw))
    caplog.clear()
    s = Leases.open(str(path))
    assert not s.durable and len(s) == 0
    assert len(warnings(caplog)) == 1, warnings(caplog)


def test_foreign_database_is_refused_and_left_alone(state: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    state.mkdir(mode=0o700)
    path = state / "l.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE lease (name TEXT, vipa TEXT, last_seen REAL)")
    db.execute("INSERT INTO lease VALUES ('laptop', '100.100.0.9', 0)")
    db.commit()
    db.close()
    path.chmod(0o600)
    before = path.read_bytes()
    s = Leases.open(str(path))
    assert not s.durable and s.get("laptop") is None
    (line,) = warnings(caplog)
    assert "not a lease file of ours" in line
    assert path.read_bytes() == before


@pytest.mark.parametrize("how", ["other_owner", "group_writable", "symlink", "fifo"])
def test_file_not_ours_is_refused(state: Path, how: str,
                                  caplog: pytest.LogCaptureFixture) -> None:
    if os.geteuid() != 0 and how == "other_owner":
        pytest.skip("chown needs root")
    path = state / "l.sqlite"
    Leases.open(str(path)).close()
    if how == "other_owner":
        os.chown(path, 65534, 65534)
    elif how == "group_writable":
        path.chmod(0o620)
    elif how == "symlink":
        target = state / "elsewhere.sqlite"
        path.rename(target)
        path.symlink_to(target)
    else:
        path.unlink()
        os.mkfifo(path, 0o600)
    caplog.clear()
    s = Leases.open(str(path))
    assert not s.durable
    (line,) = warnings(caplog)
    assert "refusing" in line


def test_planted_wal_file_is_refused(state: Path, caplog: pytest.LogCaptureFixture) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    path = state / "l.sqlite"
    Leases.open(str(path)).close()
    wal = Path(str(path) + "-wal")
    wal.write_bytes(b"")
    os.chown(wal, 65534, 65534)
    caplog.clear()
    assert not Leases.open(str(path)).durable
    assert len(warnings(caplog)) == 1


def test_directory_others_can_write_is_refused(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(0o1777)
    s = Leases.open(str(d / "l.sqlite"))
    assert not s.durable
    (line,) = warnings(caplog)
    assert "writable by group or others" in line
    assert not (d / "l.sqlite").exists()


def test_state_dir_that_cannot_be_created(tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "file").write_text("")
    s = Leases.open(str(tmp_path / "file" / "sub" / "l.sqlite"))
    assert not s.durable
    assert len(warnings(caplog)) == 1


def test_write_error_switches_to_memory_once(state: Path, caplog: pytest.LogCaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing commit (here: the file's connection replaced by one whose every write
    fails as a full disk does) -> one line, memory from then on, nothing lost in memory."""
    s = Leases.open(str(state / "l.sqlite"))
    s.put("laptop", "100.100.0.2")

    class Full:
        def execute(self, sql: str, *a: object) -> None:
            if sql.startswith(("BEGIN", "ROLLBACK")):
                return
            raise sqlite3.OperationalError("database or disk is full")

        executemany = execute

        def close(self) -> None:
            pass

    monkeypatch.setattr(s, "_conn", Full())
    s.put("phone", "100.100.0.3")
    s.put("tablet", "100.100.0.4")
    s.forget(["laptop"])
    assert not s.durable
    assert {n: v for n, (v, _) in s.items().items()} == {"phone": "100.100.0.3",
                                                        "tablet": "100.100.0.4"}
    (line,) = warnings(caplog)
    assert "disk is full" in line


UNSHARE = shutil.which("unshare")

_IN_NS = textwrap.dedent("""
    import logging, os, subprocess, sys
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(message)s")
    from upmt_tun.leases import Leases
    mnt = sys.argv[1]
    def mount(*opts):
        subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(opts), "tmpfs", mnt], check=True)
    mode = sys.argv[2]
    if mode == "full":
        mount("size=64k", "mode=0700")
        s = Leases.open(mnt + "/l.sqlite")
        assert s.durable
        n = 0
        while s.durable and n < 5000:
            s.put(f"host-{n:04d}-" + "x" * 50, f"100.100.{n // 250}.{n % 250 + 2}")
            n += 1
        assert not s.durable, "the tmpfs never filled up"
        s.put("after", "100.101.0.1")            # memory from then on
        assert s.get("after") == "100.101.0.1" and len(s) == n + 1
        print("filled-after", n)
    else:
        mount("size=64k", "mode=0700")
        if mode == "ro-existing":
            Leases.open(mnt + "/l.sqlite").close()
        subprocess.run(["mount", "-o", "remount,ro", mnt], check=True)
        s = Leases.open(mnt + "/l.sqlite")
        assert not s.durable
        s.put("laptop", "100.100.0.2")
        print("memory", s.get("laptop"))
    """)


@pytest.mark.skipif(os.geteuid() != 0 or UNSHARE is None,
                    reason="needs root and unshare (a tmpfs in a private mount namespace)")
@pytest.mark.parametrize("mode", ["full", "ro-new", "ro-existing"])
def test_full_or_read_only_disk_one_line_and_memory(tmp_path: Path, mode: str) -> None:
    """A real tmpfs of 64 KiB (full) or mounted read-only, in a private mount namespace."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    assert UNSHARE is not None
    r = subprocess.run([UNSHARE, "--mount", "--propagation", "private", sys.executable, "-c",
                        _IN_NS, str(mnt), mode], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("upmt_tun.leases")]
    assert len(lines) == 1, r.stderr
    assert "memory only" in lines[0]


def test_compaction(state: Path) -> None:
    clock = Clock()
    s = Leases.open(str(state / "l.sqlite"), clock=clock)
    s.put("laptop", "100.100.0.2")          # seen now
    s.put("phone", "100.100.0.3")           # will be old
    s.put("gone", "100.100.0.4")            # not a peer any more
    s.put("moved", "100.99.0.5")            # outside the pool
    s.put("tun", "100.100.0.1")             # the anchor's own address now
    clock.t += 31 * DAY
    s.touch(["laptop"])
    dropped = s.compact(peers={"laptop", "phone", "moved", "tun"}, pool=POOL,
                        reserved=RESERVED, max_age=30 * DAY)
    assert sorted(dropped) == ["gone", "moved", "phone", "tun"]
    s.close()
    assert list(Leases.open(str(state / "l.sqlite"), clock=clock).items()) == ["laptop"]


def test_touch_and_put_write_at_most_once_per_refresh(state: Path) -> None:
    clock = Clock()
    s = Leases.open(str(state / "l.sqlite"), clock=clock)
    s.put("laptop", "100.100.0.2")
    seen = s.items()["laptop"][1]
    clock.t += REFRESH / 2
    s.put("laptop", "100.100.0.2")
    s.touch(["laptop", "nobody"])
    assert s.items()["laptop"][1] == seen
    clock.t += REFRESH
    s.touch(["laptop"])
    assert s.items()["laptop"][1] == clock.t
    with pytest.raises(ValueError):
        s.put("phone", "100.100.0.2")        # another host's VIpA


def test_malformed_rows_are_dropped(state: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = str(state / "l.sqlite")
    s = Leases.open(path)
    s.put("laptop", "100.100.0.2")
    s.close()
    db = sqlite3.connect(path)
    db.execute("INSERT INTO lease VALUES ('bad name!', '100.100.0.3', 0)")
    db.execute("INSERT INTO lease VALUES ('phone', 'not-an-ip', 0)")
    db.commit()
    db.close()
    s = Leases.open(path)
    assert s.durable and list(s.items()) == ["laptop"]
    assert len(warnings(caplog)) == 1
    s.close()
    assert list(Leases.open(path).items()) == ["laptop"]


# -- config --------------------------------------------------------------------------------

def _anchor_toml(tmp_path: Path, extra: str) -> str:
    p = tmp_path / "anchor.toml"
    p.write_text(f'listen = "203.0.113.1:5060"\nnat_interface = "eth0"\n'
                 f'private_key = "{keys.keypair()[0]}"\n{extra}\n'
                 f'[[peer]]\nname = "laptop"\npublic_key = "{keys.keypair()[1]}"\n')
    return str(p)


def test_config_state_dir(tmp_path: Path) -> None:
    cfg = load_anchor_config(_anchor_toml(tmp_path, ""))
    assert (cfg.state_dir, cfg.lease_days) == ("/var/lib/upmt", 30.0)
    cfg = load_anchor_config(_anchor_toml(tmp_path, 'state_dir = "/srv/upmt"\nlease_days = 7'))
    assert (cfg.state_dir, cfg.lease_days) == ("/srv/upmt", 7.0)
    assert load_anchor_config(_anchor_toml(tmp_path, 'state_dir = ""')).state_dir == ""
    for extra, key in (('state_dir = "relative/dir"', "state_dir"), ("state_dir = 3", "state_dir"),
                       ("lease_days = 0", "lease_days"), ("lease_days = nan", "lease_days"),
                       ('lease_days = "30"', "lease_days")):
        with pytest.raises(ConfigError) as e:
            load_anchor_config(_anchor_toml(tmp_path, extra))
        assert e.value.key == key and "\n" not in str(e.value)


# -- the anchor ----------------------------------------------------------------------------

def anchor_with(tmp_path: Path, path: str, peers: tuple[str, ...] = NAMES,
                lease_days: float = 30.0) -> Rig:
    """A (re)started anchor whose leases are in ``path``."""
    rig = Rig(tmp_path, peers=peers)
    rig.anchor.sig.use_leases(Leases.open(path), peers=peers, max_age=lease_days * DAY)
    return rig


def come_back(rig: Rig, order: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for i, name in enumerate(order):
        h = Host(rig, name, (f"203.0.113.{30 + i}", 41000 + i), seed=100 + i)
        h.handshake()
        out[name] = h.associate()
    return out


def test_restarted_anchor_gives_each_host_its_vipa_in_any_order(tmp_path: Path) -> None:
    path = str(tmp_path / "state" / "l.sqlite")
    rig = anchor_with(tmp_path, path)
    first = come_back(rig, NAMES)
    assert len(set(first.values())) == len(NAMES)
    rig.anchor.sig.leases.close()          # (a SIGKILL closes nothing: see the netns test)

    rig = anchor_with(tmp_path, path)      # restart: hosts come back in another order
    assert come_back(rig, tuple(reversed(NAMES))) == first
    rig.anchor.sig.leases.close()
    rig = anchor_with(tmp_path, path)      # and again, only some of them, shuffled
    assert come_back(rig, ("desk", "laptop")) == {n: first[n] for n in ("desk", "laptop")}
    # a newcomer never gets the VIpA of a host that has a lease but is away
    rig.anchor.sig.leases.forget(["car"])
    assert come_back(rig, ("car",))["car"] not in {first[n] for n in NAMES if n != "car"}


def test_vipa_of_a_host_that_left_is_not_given_to_another(tmp_path: Path) -> None:
    rig = Rig(tmp_path, peers=("laptop", "phone"))
    rig.anchor.sig.use_leases(Leases.memory(), peers=("laptop", "phone"), max_age=30 * DAY)
    laptop = come_back(rig, ("laptop",))["laptop"]
    rig.now += 10_000                          # the laptop's association expires
    rig.anchor.sig.expire(rig.now, 90, 300, 600, 180)
    assert "laptop" not in rig.fwd.by_mh
    sig = rig.anchor.sig
    sig._hosts = sig.pool.hosts()              # noqa: SLF001 - the allocator starts over
    assert come_back(rig, ("phone",))["phone"] != laptop
    assert come_back(rig, ("laptop",))["laptop"] == laptop


def test_removed_peer_and_changed_pool_drop_leases(tmp_path: Path) -> None:
    path = str(tmp_path / "state" / "l.sqlite")
    rig = anchor_with(tmp_path, path)
    first = come_back(rig, NAMES)
    rig.anchor.sig.leases.close()
    # "car" is no longer a peer: its lease goes at start
    rig = anchor_with(tmp_path, path, peers=NAMES[:-1])
    assert "car" not in rig.anchor.sig.leases.items()
    assert come_back(rig, ("phone",)) == {"phone": first["phone"]}
    rig.anchor.sig.leases.close()
    # a pool that no longer holds the old addresses: every lease goes, fresh addresses
    from upmt_tun.anchor import Anchor
    from upmt_tun.signalling.anchor_side import AnchorSignalling
    rig = Rig(tmp_path, peers=NAMES)
    an: Anchor = rig.anchor
    an.sig = AnchorSignalling(an.fwd, ipaddress.IPv4Network("100.101.0.0/24"), role="anchor",
                              listen=("203.0.113.1", 5060))
    dropped = an.sig.use_leases(Leases.open(path), peers=NAMES, max_age=30 * DAY)
    assert sorted(dropped) == sorted(NAMES[:-1])
    assert ipaddress.IPv4Address(come_back(rig, ("laptop",))["laptop"]) in \
        ipaddress.IPv4Network("100.101.0.0/24")


def test_periodic_compaction_keeps_live_hosts(tmp_path: Path) -> None:
    clock = Clock()
    rig = Rig(tmp_path, peers=("laptop", "phone"))
    store = Leases.memory(clock=clock)
    rig.anchor.sig.use_leases(store, peers=("laptop", "phone"), max_age=30 * DAY)
    come_back(rig, ("laptop", "phone"))
    rig.anchor.sig.expire(rig.now, 1e9, 1e9, 1e9, 1e9)           # arms the sweep
    # the phone leaves; 40 days later the laptop is still associated
    rig.fwd.remove_association(rig.fwd.by_mh["phone"])
    clock.t += 40 * DAY
    rig.now += 4000
    rig.anchor.sig.expire(rig.now, 1e9, 1e9, 1e9, 1e9)
    assert list(store.items()) == ["laptop"]


def test_exhausted_pool_takes_the_oldest_lease_of_an_absent_host(tmp_path: Path) -> None:
    from upmt_tun.signalling.anchor_side import AnchorSignalling
    clock = Clock()
    rig = Rig(tmp_path, peers=("laptop", "phone", "tablet"))
    an = rig.anchor
    an.sig = AnchorSignalling(an.fwd, ipaddress.IPv4Network("100.100.0.0/29"), role="anchor",
                              listen=("203.0.113.1", 5060))        # 5 usable addresses
    store = Leases.memory(clock=clock)
    for i, vipa in enumerate(("100.100.0.2", "100.100.0.3", "100.100.0.4",
                              "100.100.0.5", "100.100.0.6")):
        store.put(f"old{i}", vipa)
        clock.t += 10
    an.sig.use_leases(store, peers=("laptop", "phone", "tablet", "old0", "old1", "old2",
                                    "old3", "old4"), max_age=30 * DAY)
    got = come_back(rig, ("laptop", "phone"))
    assert got == {"laptop": "100.100.0.2", "phone": "100.100.0.3"}   # old0, old1: oldest
    assert store.get("old0") is None and store.get("old2") == "100.100.0.4"


def test_agent_restart_is_answered_with_its_vipa_and_tunnels_move_at_once(
        tmp_path: Path) -> None:
    """Item 2, anchor side: the host's agent restarts (new handshake, new session, new
    ports) while its association is live. The anchor answers with the same VIpA, seals
    the downlink with the new session at once, and each tunnel the new agent sets up
    (it numbers its tunnels as before) moves to the new address: nothing goes to the
    dead agent's addresses, and the downlink reaches the new one as soon as it echoes."""
    rig = Rig(tmp_path)
    old = Host(rig, "laptop", MH)
    vipa, (tid,) = old.establish()
    a = rig.fwd.by_mh["laptop"]
    old_session = a.session
    down = pb.udp(CH, vipa, 5353, 4000, b"before")
    assert [addr for _, addr in rig.downlink(down)] == [MH]

    new = Host(rig, "laptop", MH2, seed=2)     # restarted: another port (here another NAT)
    new.handshake()
    assert new.associate() == vipa
    assert a.session is not None and a.session is not old_session
    assert a.session.local_index == new.s.remote_index     # the new session seals now
    tid2, challenge = new.setup(7, MH2)        # the agent's first tunnel id, as before
    assert tid2 == tid and challenge           # the same tunnel, moved, to be validated
    assert rig.downlink(down) == []            # not to the dead address; not yet the new one
    new.validate(tid2, challenge, MH2)
    sent = rig.downlink(down)
    assert [addr for _, addr in sent] == [MH2]
    opened = new.s.open(sent[0][0])
    assert opened is not None and opened[1] == down
    assert list(a.tunnels) == [tid]


def test_anchor_with_an_unusable_lease_file_still_serves(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """A corrupt file: one line, and the anchor associates hosts (fresh addresses)."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    path = state / "l.sqlite"
    path.write_bytes(b"garbage" * 1000)
    path.chmod(0o600)
    rig = anchor_with(tmp_path, str(path))
    got = come_back(rig, ("phone", "laptop"))
    assert got == {"phone": "100.100.0.2", "laptop": "100.100.0.3"}
    assert len(warnings(caplog)) == 1
    assert path.read_bytes() == b"garbage" * 1000
