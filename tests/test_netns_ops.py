"""Operations in network namespaces: how the daemons stop (signals, a closed terminal), what
``cleanup`` does after a killed one. Each test compares the mobile host with its state
before the agent ever ran (rules, routes, links, addresses, nftables, sysctls)."""

from __future__ import annotations

import fcntl
import os
import select
import shutil
import signal
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from upmt_tun.lab import Lab, exe
from upmt_tun.testbed import Topology

from .conftest import netns_missing
from .test_netns_e2e import CH, HttpServer, curl, host_state

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(netns_missing() is not None, reason=str(netns_missing()))]


@pytest.fixture
def topo() -> Iterator[Topology]:
    t = Topology()
    t.up()
    try:
        yield t
    finally:
        t.down()


@pytest.fixture
def www(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    root.mkdir()
    (root / "file.bin").write_bytes(os.urandom(256 << 10))
    return root


def _start_anchor(lab: Lab) -> Path:
    """The lab's anchor started, the agent's config written (the test starts the agent)."""
    anchors, agent = lab.write_configs()
    lab._start("anchor0", "an", [*exe("upmt-anchor"), "--config", str(anchors[0])])
    return agent


def _wait_ready(fd: int, timeout: float = 20.0) -> str:
    """Read the terminal ``fd`` until the agent printed ``ready``; return what it printed."""
    seen = b""
    deadline = time.monotonic() + timeout
    while b"ready" not in seen and time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    return seen.decode(errors="replace")


def test_closing_the_terminal_stops_the_agent_cleanly(topo: Topology, www: Path,
                                                      tmp_path: Path) -> None:
    """`upmt-agent up` on a terminal that is then closed: the kernel sends SIGHUP to the
    agent (the terminal's session leader) and every later write to the terminal fails
    with EIO. The agent stops as with `down` (exit 0) and leaves the host as it found it."""
    before = host_state(topo, "mh")
    HttpServer(topo, "ch", 8080, www)
    lab = Lab(topo, tmp_path / "lab")
    master, slave = os.openpty()
    agent: subprocess.Popen[bytes] | None = None
    try:
        cfg = _start_anchor(lab)
        agent = topo.popen(
            "mh", *exe("upmt-agent"), "up", "-v", "--config", str(cfg),
            stdin=slave, stdout=slave, stderr=slave,
            # the pty becomes the controlling terminal of the agent's new session
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        os.close(slave)
        slave = -1
        out = _wait_ready(master)
        assert "ready" in out, out
        assert curl(topo, f"http://{CH}:8080/file.bin").stdout == "200"
        assert "upmt_agent" in topo.run("mh", "nft", "list", "tables").stdout
        os.close(master)                           # the terminal goes away: SIGHUP
        master = -1
        assert agent.wait(15) == 0
    finally:
        for fd in (master, slave):
            if fd >= 0:
                os.close(fd)
        if agent is not None and agent.poll() is None:
            agent.kill()
        lab.stop()
    assert host_state(topo, "mh") == before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT],
                         ids=lambda s: signal.Signals(s).name)
def test_stop_signals_stop_cleanly(topo: Topology, tmp_path: Path, sig: int) -> None:
    """SIGTERM and SIGINT (systemd, Ctrl-C) stop the agent and the anchor like `down`:
    exit 0, host restored. (SIGHUP stops only a daemon in a terminal, the test above;
    these daemons have none, so SIGHUP reloads them: test_netns_reload.py.)"""
    before = {role: host_state(topo, role) for role in ("mh", "an")}
    lab = Lab(topo, tmp_path / "lab").start()
    try:
        for key in ("agent", "anchor0"):
            lab.procs[key].send_signal(sig)
        codes = {key: lab.procs[key].wait(15) for key in ("agent", "anchor0")}
    finally:
        lab.stop()
    assert codes == {"agent": 0, "anchor0": 0}
    assert {role: host_state(topo, role) for role in ("mh", "an")} == before


def _one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_cleanup_after_sigkill_restores_the_host(topo: Topology, tmp_path: Path) -> None:
    """SIGKILL leaves everything behind; `cleanup` removes it (and refuses while the daemon
    lives: what a live one holds is not a leftover)."""
    before = {role: host_state(topo, role) for role in ("mh", "an")}
    lab = Lab(topo, tmp_path / "lab").start()
    agent_cfg, anchor_cfg = str(lab.dir / "agent.toml"), str(lab.dir / "anchor0.toml")
    try:
        live = topo.run("mh", *exe("upmt-agent"), "cleanup", "--config", agent_cfg, check=False)
        assert live.returncode == 1
        assert "running agent holds control socket" in _one_line(live.stderr)
        live = topo.run("an", *exe("upmt-anchor"), "cleanup", "--config", anchor_cfg,
                        check=False)
        assert live.returncode == 1
        assert "running anchor holds control socket" in _one_line(live.stderr)
        lab.agent_status()                                  # untouched, still running
        for key in ("agent", "anchor0"):
            lab.procs[key].send_signal(signal.SIGKILL)
            lab.procs[key].wait(10)
        left = {role: host_state(topo, role) for role in ("mh", "an")}
        assert "upmt_agent" in left["mh"]["nft"] and "upmt_anchor" in left["an"]["nft"]
        assert "5551" in left["mh"]["rules"]
        assert os.path.exists(lab.agent_control)
        r = topo.run("mh", *exe("upmt-agent"), "cleanup", "--config", agent_cfg, check=False)
        assert r.returncode == 0, r.stderr
        r = topo.run("an", *exe("upmt-anchor"), "cleanup", "--config", anchor_cfg, check=False)
        assert r.returncode == 0, r.stderr
        assert {role: host_state(topo, role) for role in ("mh", "an")} == before
        assert not os.path.exists(lab.agent_control)
        assert not os.path.exists(lab.agent_control + ".state")
        again = topo.run("mh", *exe("upmt-agent"), "cleanup", "--config", agent_cfg,
                         check=False)                       # nothing left: fine, quiet
        assert (again.returncode, again.stderr) == (0, "")
    finally:
        lab.stop()


def test_readiness_and_journal_priorities_as_under_systemd(topo: Topology, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """What a Type=notify unit sees (systemd is not running here: its two interfaces are
    played by hand): READY=1 on $NOTIFY_SOCKET once, when `ready` is printed, STOPPING=1 at
    the stop; with JOURNAL_STREAM naming stderr, log lines carry `<N>` priorities."""
    import socket

    lab = Lab(topo, tmp_path / "lab")
    _, agent_cfg = lab.write_configs()
    lab._start("anchor0", "an", [*exe("upmt-anchor"), "--config", str(lab.dir / "anchor0.toml")])
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(path)
        srv.settimeout(5)
        log = lab.dir / "agent.log"               # lab opens it with "w": the same inode
        log.touch()
        st = os.stat(log)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        try:
            lab._start("agent", "mh", [*exe("upmt-agent"), "up", "--config", str(agent_cfg)])
            assert srv.recv(256) == b"READY=1"     # it printed `ready` (lab waited for it)
            srv.settimeout(0.5)
            with pytest.raises(TimeoutError):
                srv.recv(256)                      # once
            srv.settimeout(5)
            lab.agent_cli("down")
            assert srv.recv(256) == b"STOPPING=1"
        finally:
            codes = lab.stop()
    assert codes["agent"] == 0
    lines = log.read_text().splitlines()
    assert lines and all(line[:3] in ("<6>", "<4>", "<7>", "<3>") for line in lines), lines
    assert any(line.startswith("<6>") for line in lines)


UNIT_CAPS = ["setpriv", "--bounding-set", "-all,+net_admin"]   # the units' capability set


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_daemons_work_with_the_units_capability_set(topo: Topology, www: Path,
                                                    tmp_path: Path) -> None:
    """The units give the daemons CAP_NET_ADMIN only (CapabilityBoundingSet): root with
    that bounding set, as systemd would start them, sets up, carries a download, stops,
    and cleans up after a SIGKILL."""
    before = {role: host_state(topo, role) for role in ("mh", "an")}
    HttpServer(topo, "ch", 8080, www)
    lab = Lab(topo, tmp_path / "lab")
    anchors, agent_cfg = lab.write_configs()
    try:
        lab._start("anchor0", "an", [*UNIT_CAPS, *exe("upmt-anchor"), "--config",
                                     str(anchors[0])])
        lab._start("agent", "mh", [*UNIT_CAPS, *exe("upmt-agent"), "up", "--config",
                                   str(agent_cfg)])
        caps = topo.run("mh", "grep", "CapEff", f"/proc/{lab.procs['agent'].pid}/status")
        assert caps.stdout.split()[1] == f"{1 << 12:016x}"          # CAP_NET_ADMIN only
        assert curl(topo, f"http://{CH}:8080/file.bin").stdout == "200"
        (flow,) = lab.agent_status()["flows"]
        assert flow["rule"] == "web"
        lab.procs["agent"].send_signal(signal.SIGKILL)
        lab.procs["agent"].wait(10)
        r = topo.run("mh", *UNIT_CAPS, *exe("upmt-agent"), "cleanup", "--config",
                     str(agent_cfg), check=False)
        assert r.returncode == 0, r.stderr
        lab.procs["anchor0"].terminate()
        assert lab.procs["anchor0"].wait(15) == 0
    finally:
        lab.stop()
    assert {role: host_state(topo, role) for role in ("mh", "an")} == before


def _tailscale_like(topo: Topology) -> None:
    """The routing rules Tailscale installs (marks and priorities), with an exit node: its
    table 52 sends everything into its device (here `ts0`, one end of a veth pair, counting
    what it gets)."""
    for cmd in ("link add ts0 type veth peer name ts0p", "link set ts0 up", "link set ts0p up",
                "route add default dev ts0 table 52",
                "rule add pref 5210 fwmark 0x80000/0xff0000 table main",
                "rule add pref 5230 fwmark 0x80000/0xff0000 table default",
                "rule add pref 5250 fwmark 0x80000/0xff0000 unreachable",
                "rule add pref 5270 table 52"):
        topo.run("mh", "ip", *cmd.split())


def _wg_quick_like(topo: Topology) -> None:
    """The rules `wg-quick up` adds for a full tunnel (AllowedIPs 0.0.0.0/0): everything not
    marked 0xca6c (its own socket's mark) goes to table 51820, whose default route is its
    device (`ts0` here too), and main is consulted first for all but its default route."""
    for cmd in ("link add ts0 type veth peer name ts0p", "link set ts0 up", "link set ts0p up",
                "route add default dev ts0 table 51820",
                "rule add not fwmark 0xca6c table 51820",
                "rule add table main suppress_prefixlength 0"):
        topo.run("mh", "ip", *cmd.split())


def _ts0_tx(topo: Topology) -> int:
    out = topo.run("mh", "cat", "/sys/class/net/ts0/statistics/tx_packets").stdout
    return int(out)


NINE_RULES = "".join(
    f'[[rule]]\nname = "other{i}"\nprotocol = "tcp"\ndst = "{CH}/32"\ndst_port = {9000 + i}\n\n'
    for i in range(7)) + """[[rule]]
name = "web"
protocol = "tcp"
dst = "203.0.113.100/32"
dst_port = 8080
via = ["wan1", "wan2"]

[[rule]]
name = "rest"
protocol = "tcp"
dst = "203.0.113.100/32"
"""


@pytest.mark.parametrize("other", [_tailscale_like, _wg_quick_like],
                         ids=["tailscale", "wg-quick"])
def test_beside_tailscale_no_steered_packet_escapes(topo: Topology, www: Path,
                                                    tmp_path: Path, other: Any) -> None:
    """Tailscale's rules (fwmark 0x80000/0xff0000 at 5210-5250, table 52 at 5270 with an
    exit node's default route), or wg-quick's full tunnel: the agent's rules come first
    (5200/5201 by default) and its packet marks never carry Tailscale's bits nor wg-quick's
    mark, so a flow of the 8th rule (whose rule index is 0x80000 in the ct mark) goes
    through the tunnel and nothing steered reaches the other tool's device `ts0`."""
    other(topo)
    before = host_state(topo, "mh")
    srv = HttpServer(topo, "ch", 8080, www)
    lab = Lab(topo, tmp_path / "lab", rules=NINE_RULES).start()
    try:
        rules = topo.run("mh", "ip", "rule").stdout
        ours = [int(line.split(":")[0]) for line in rules.splitlines() if "lookup 55" in line]
        assert ours and max(ours) < 5210, rules          # before every Tailscale rule
        sent = _ts0_tx(topo)
        got = tmp_path / "got.bin"
        assert curl(topo, f"http://{CH}:8080/file.bin", got).stdout == "200"
        assert got.read_bytes() == (www / "file.bin").read_bytes()
        assert srv.clients() == ["203.0.113.1"]               # via the anchor
        (flow,) = lab.agent_status()["flows"]
        assert flow["rule"] == "web"
        assert _ts0_tx(topo) == sent                          # nothing escaped to table 52
    finally:
        assert lab.stop()["agent"] == 0
    assert host_state(topo, "mh") == before


def test_cleanup_removes_a_left_over_tun_but_no_other_device(topo: Topology,
                                                             tmp_path: Path) -> None:
    """A TUN of the configured name left behind (persistent) is removed; a device of that
    name that is not a TUN is someone else's: one line, exit 1, left alone."""
    lab = Lab(topo, tmp_path / "lab")
    _, agent_cfg = lab.write_configs()
    cleanup = [*exe("upmt-agent"), "cleanup", "--config", str(agent_cfg)]
    topo.run("mh", "ip", "tuntap", "add", "mode", "tun", "name", "upmt0")
    r = topo.run("mh", *cleanup, check=False)
    assert r.returncode == 0, r.stderr
    assert "removed leftover TUN device upmt0" in r.stderr
    assert "upmt0" not in topo.run("mh", "ip", "-o", "link").stdout
    topo.run("mh", "ip", "link", "add", "upmt0", "type", "veth", "peer", "name", "upmt0p")
    r = topo.run("mh", *cleanup, check=False)
    assert r.returncode == 1
    assert "upmt0 exists but is a veth device, not a TUN" in _one_line(r.stderr)
    assert "upmt0" in topo.run("mh", "ip", "-o", "link").stdout


def test_a_stop_while_waiting_for_the_tunnels_is_not_held_up(topo: Topology,
                                                              tmp_path: Path) -> None:
    """No anchor answers, so the agent waits (up to 10 s) for its tunnels before `ready`:
    SIGTERM cuts that wait short (had it run out, the agent would have logged that not
    every tunnel answered and printed `ready`), and the host is restored."""
    before = host_state(topo, "mh")
    lab = Lab(topo, tmp_path / "lab")
    _, agent_cfg = lab.write_configs()                     # the anchor is never started
    log = tmp_path / "agent.log"
    with open(log, "w") as err:
        agent = topo.popen("mh", *exe("upmt-agent"), "up", "--config", str(agent_cfg),
                           stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        deadline = time.monotonic() + 10
        while ("upmt_agent" not in topo.run("mh", "nft", "list", "tables").stdout
               and time.monotonic() < deadline):
            time.sleep(0.05)
        assert agent.poll() is None, log.read_text()
        time.sleep(0.3)                                    # into the wait for the tunnels
        agent.terminate()
        assert agent.wait(30) == 0
        assert agent.stdout is not None
        assert "ready" not in agent.stdout.read()
    finally:
        if agent.poll() is None:
            agent.kill()
        lab.stop()
    text = log.read_text()
    assert "SIGTERM: stopping" in text
    assert "not every tunnel answered" not in text, text
    assert host_state(topo, "mh") == before
