"""`group`: an unprivileged member uses the running agent's control socket: `status`, and
`run`, whose program runs as that user and whose traffic follows the rule; `move` and
`down` are refused. Real daemons in network namespaces, the user made with setpriv."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from upmt_tun.lab import Lab, exe
from upmt_tun.testbed import Topology

from .conftest import netns_missing
from .test_netns_e2e import CH, HttpServer

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(netns_missing() is not None, reason=str(netns_missing()))]

NOBODY = 65534                       # nobody / nogroup: exist on every Debian/Ubuntu
AS_MEMBER = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
AS_STRANGER = ("setpriv", "--reuid=4243", "--regid=4243", "--clear-groups")
CGROUP2 = "mount -t cgroup2 none /sys/fs/cgroup && exec "   # as test_netns_e2e's run test


@pytest.fixture
def topo() -> Iterator[Topology]:
    t = Topology()
    t.up()
    try:
        yield t
    finally:
        t.down()


def test_a_member_may_status_and_run_as_itself_but_not_move_or_down(topo: Topology,
                                                                     tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    (www / "file.bin").write_bytes(os.urandom(64 << 10))
    www.chmod(0o755)
    srv = HttpServer(topo, "ch", 8080, www)
    rules = '[[rule]]\nname = "prog"\nprotocol = "udp"\ndst_port = 9\nvia = ["wan2"]\n'
    lab = Lab(topo, tmp_path / "lab", rules=rules, agent_extra=f"group = {NOBODY}\n",
              anchor_extra=f"group = {NOBODY}\n")
    lab.write_configs()
    lab._start("anchor0", "an", [*exe("upmt-anchor"), "--config",
                                 str(lab.dir / "anchor0.toml")])
    up = " ".join(exe("upmt-agent"))
    lab._start("agent", "mh", ["sh", "-c", CGROUP2 + f"{up} up --config {lab.dir}/agent.toml"])
    sock = lab.agent_control
    try:
        st = os.stat(sock)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o660, 0, NOBODY)

        def agent(who: tuple[str, ...], *args: str) -> tuple[int, str, str]:
            sub, *rest = args
            r = topo.run("mh", *who, *exe("upmt-agent"), sub, "--control", sock, *rest,
                         check=False)
            return r.returncode, r.stdout, r.stderr

        code, out, err = agent(AS_MEMBER, "status", "--json")
        assert code == 0 and '"tunnels"' in out, err
        r = topo.run("an", *AS_MEMBER, *exe("upmt-anchor"), "status", "--control",
                     lab.anchor_control(0), check=False)
        assert r.returncode == 0 and "host laptop" in r.stdout, r.stderr
        # run: the program is the member (never root) and its traffic follows the rule
        code, out, err = agent(AS_MEMBER, "run", "--rule", "prog", "--", "sh", "-c",
                               "id -u; id -g; curl -sS -m 10 -o /dev/null -w %{http_code} "
                               f"http://{CH}:8080/file.bin")
        assert code == 0, err
        assert out.split() == [str(NOBODY), str(NOBODY), "200"]
        assert srv.clients() == ["203.0.113.1"]                   # through the anchor
        (flow,) = lab.agent_status()["flows"]
        assert flow["rule"] == "prog" and flow["interface"] == "wan2" and flow["dport"] == 8080
        # root's commands stay root's
        code, _, err = agent(AS_MEMBER, "move", "--rule", "prog", "--via", "wan1")
        assert code == 1 and err == "upmt-agent: move: permission denied (root only)\n"
        code, _, err = agent(AS_MEMBER, "down")
        assert code == 1 and err == "upmt-agent: down: permission denied (root only)\n"
        (flow,) = lab.agent_status()["flows"]
        assert flow["interface"] == "wan2"                       # not moved, still up
        # not a member: the socket's mode keeps it out
        code, _, err = agent(AS_STRANGER, "status")
        assert code == 1 and "Permission denied" in err and len(err.splitlines()) == 1
        # root through sudo: the program runs as the user who ran sudo
        r = topo.run("mh", "env", f"SUDO_UID={NOBODY}", f"SUDO_GID={NOBODY}",
                     "SUDO_USER=nobody", *exe("upmt-agent"), "run", "--control", sock,
                     "--rule", "prog", "--", "id", "-u")
        assert r.stdout.strip() == str(NOBODY)
        r = topo.run("mh", *exe("upmt-agent"), "run", "--control", sock, "--rule", "prog",
                     "--", "id", "-u")
        assert r.stdout.strip() == "0"                            # root itself stays root
    finally:
        codes = lab.stop()
    assert codes == {"agent": 0, "anchor0": 0}
