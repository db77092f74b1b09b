"""Who may use the control socket (``group``): the permission rule, the socket's mode and
owner, ``join`` (what `upmt-agent run` asks) moving the connecting process and no other,
and `run` under sudo giving root up. No root needed (the netns test runs it for real as
an unprivileged user: test_netns_group.py)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from upmt_tun import control
from upmt_tun.config import ConfigError, load_agent_config, load_anchor_config
from upmt_tun.control import GROUP_COMMANDS, ControlServer, Peer, permitted

from .test_cli import AN_KEY, KEYLESS_AGENT, KEYLESS_ANCHOR, MH_KEY

GID = 4242
ROOT = Peer(100, 0, 0)
MEMBER = Peer(200, 1000, GID)                        # the group is its primary group
SUPPLEMENTARY = Peer(201, 1001, 1001, frozenset({27, GID}))
STRANGER = Peer(300, 1002, 1002, frozenset({27}))
ALL = ("status", "join", "events", "run", "move", "down", "reload", "cgroup", "nope", None)


def test_root_and_the_daemons_own_user_may_do_everything() -> None:
    for cmd in ALL:
        assert permitted(cmd, ROOT, GID, own_uid=0)
        assert permitted(cmd, ROOT, None, own_uid=0)
        assert permitted(cmd, Peer(1, 999, 999), None, own_uid=999)


def test_members_may_only_status_join_and_events() -> None:
    # events: a GUI run by a member of the group watches what status shows, as it happens
    assert GROUP_COMMANDS == {"status", "join", "events"}
    for peer in (MEMBER, SUPPLEMENTARY):
        for cmd in ALL:
            assert permitted(cmd, peer, GID, own_uid=0) == (cmd in ("status", "join",
                                                                   "events")), cmd


def test_others_and_unknown_peers_may_do_nothing() -> None:
    for cmd in ALL:
        assert not permitted(cmd, STRANGER, GID, own_uid=0)
        assert not permitted(cmd, MEMBER, None, own_uid=0)      # no group configured
        assert not permitted(cmd, None, GID, own_uid=0)


def _seen_handler(seen: list[dict[str, Any]], cg: Path) -> Any:
    async def handle(req: dict[str, Any]) -> dict[str, Any]:
        seen.append(req)
        if req.get("cmd") == "cgroup":
            if req.get("rule") != "web":
                return {"ok": False, "usage": True, "error": f"no rule {req.get('rule')!r}"}
            return {"ok": True, "path": str(cg)}
        return {"ok": True}
    return handle


def _server(tmp_path: Path, seen: list[dict[str, Any]], group: int | None = GID
            ) -> tuple[ControlServer, Path]:
    cg = tmp_path / "cg"
    cg.mkdir()
    (cg / "cgroup.procs").write_text("")
    return ControlServer(str(tmp_path / "s.sock"), _seen_handler(seen, cg), group), cg


async def test_a_members_move_down_reload_cgroup_never_reach_the_daemon(tmp_path: Path
                                                                         ) -> None:
    seen: list[dict[str, Any]] = []
    srv, _ = _server(tmp_path, seen)
    for cmd in ("move", "down", "reload", "cgroup"):
        ans = await srv._answer({"cmd": cmd, "rule": "web"}, MEMBER)
        assert ans == {"ok": False, "error": f"{cmd}: permission denied (root only)"}
    assert await srv._answer({"cmd": "status"}, STRANGER) == {"ok": False,
                                                              "error": "permission denied"}
    assert seen == []
    assert await srv._answer({"cmd": "status"}, MEMBER) == {"ok": True}
    assert await srv._answer({"cmd": "down"}, ROOT) == {"ok": True}
    assert seen == [{"cmd": "status"}, {"cmd": "down"}]


async def test_join_moves_the_connecting_process_not_a_pid_it_names(tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []
    srv, cg = _server(tmp_path, seen)
    me = Peer(os.getpid(), os.getuid(), GID)          # a live process of that uid
    ans = await srv._answer({"cmd": "join", "rule": "web", "pid": 1}, me)
    assert ans == {"ok": True, "path": str(cg)}
    assert (cg / "cgroup.procs").read_text() == str(me.pid)
    assert seen == [{"cmd": "cgroup", "rule": "web"}]
    # an unknown rule: the daemon's answer, nothing written
    (cg / "cgroup.procs").write_text("")
    ans = await srv._answer({"cmd": "join", "rule": "nope"}, me)
    assert ans == {"ok": False, "usage": True, "error": "no rule 'nope'"}
    # the asker hung up, or its pid now belongs to another user: nothing written
    ans = await srv._answer({"cmd": "join", "rule": "web"}, me, lambda: False)
    assert ans == {"ok": False, "error": "the process that asked is gone"}
    ans = await srv._answer({"cmd": "join", "rule": "web"},
                            Peer(os.getpid(), os.getuid() + 1, GID))
    assert ans == {"ok": False, "error": "the process that asked is gone"}
    assert (cg / "cgroup.procs").read_text() == ""
    # a peer the kernel could not name (another pid namespace): refused
    ans = await srv._answer({"cmd": "join", "rule": "web"}, Peer(0, 1000, GID))
    assert ans["ok"] is False and "which process" in ans["error"]
    # the cgroup cannot be written: one line
    (cg / "cgroup.procs").unlink()
    (cg / "cgroup.procs").mkdir()
    ans = await srv._answer({"cmd": "join", "rule": "web"}, me)
    assert ans["ok"] is False and ans["error"].startswith(f"cannot move pid {me.pid}")


async def test_a_hung_up_client_is_not_connected() -> None:
    import socket

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a:
        reader = asyncio.StreamReader()
        assert control._still_connected(a.fileno(), reader)
        b.close()
        assert not control._still_connected(a.fileno(), reader)
        reader.feed_eof()
        assert not control._still_connected(a.fileno(), reader)


async def test_the_socket_is_group_owned_0660_with_group_else_owner_only(tmp_path: Path) -> None:
    gid = os.getgroups()[0] if os.getgroups() else os.getegid()   # one we may give it to
    srv = ControlServer(str(tmp_path / "g.sock"), _seen_handler([], tmp_path), gid)
    await srv.start()
    try:
        st = os.stat(tmp_path / "g.sock")
        assert (st.st_mode & 0o777, st.st_gid) == (0o660, gid)
        # a real connection: the server reads this process's credentials from the kernel
        ans = await asyncio.to_thread(control.request, str(tmp_path / "g.sock"),
                                      {"cmd": "status"})
        assert ans == {"ok": True}
    finally:
        await srv.close()
    srv = ControlServer(str(tmp_path / "p.sock"), _seen_handler([], tmp_path))
    await srv.start()
    try:
        assert os.stat(tmp_path / "p.sock").st_mode & 0o077 == 0   # the owner's alone
    finally:
        await srv.close()


def test_peer_of_a_real_connection_is_this_process() -> None:
    import socket

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        peer = control.peer_of(a)
    assert peer is not None
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.geteuid(), os.getegid())
    assert peer.groups == frozenset(os.getgroups())


@pytest.mark.parametrize("kind", ["agent", "anchor"])
def test_group_config_key(tmp_path: Path, kind: str) -> None:
    text = MH_KEY + KEYLESS_AGENT if kind == "agent" else AN_KEY + KEYLESS_ANCHOR
    load = load_agent_config if kind == "agent" else load_anchor_config
    p = tmp_path / "c.toml"
    p.write_text(text)
    assert load(str(p)).group is None
    p.write_text('group = "nogroup"\n' + text)
    assert load(str(p)).group == 65534
    p.write_text("group = 65534\n" + text)
    assert load(str(p)).group == 65534
    for bad, why in (('"no-such-group-here"', "no such group"), ("0", "above 0"),
                     ("-3", "above 0"), ("true", "expected")):
        p.write_text(f"group = {bad}\n" + text)
        with pytest.raises(ConfigError, match=why):
            load(str(p))
