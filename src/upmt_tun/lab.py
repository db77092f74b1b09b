"""Run real ``upmt-anchor`` / ``upmt-agent`` processes inside a :class:`testbed.Topology`.

Used by the demo, the netns tests and the benchmarks. Each process gets its own
config and control socket under a run-unique directory, so several labs can run
side by side on one machine; :meth:`Lab.stop` stops them and checks they exit.
"""

from __future__ import annotations

import json
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import keys
from .testbed import Topology

__all__ = ["Lab", "LabError", "DEFAULT_RULES", "exe"]

CH_PORT = 8080

DEFAULT_RULES = f"""
[[rule]]
name = "web"
protocol = "tcp"
dst = "203.0.113.100/32"
dst_port = {CH_PORT}
via = ["wan1", "wan2"]

[[rule]]
name = "bulk"
protocol = "tcp"
dst = "203.0.113.100/32"
dst_port = 5201
via = ["wan1", "wan2"]
"""


class LabError(Exception):
    pass


def exe(name: str) -> list[str]:
    """The console script next to this Python, else ``python -m upmt_tun.cli``."""
    cand = Path(sys.executable).with_name(name)
    if cand.exists():
        return [str(cand)]
    found = shutil.which(name)
    if found:
        return [found]
    fn = "agent_main" if name == "upmt-agent" else "anchor_main"
    return [sys.executable, "-c", f"import sys; from upmt_tun.cli import {fn}; sys.exit({fn}())"]


class Lab:
    def __init__(self, topo: Topology, workdir: str | Path, *, rules: str = DEFAULT_RULES,
                 anchor_roles: tuple[str, ...] = ("anchor",), agent_extra: str = "",
                 anchor_extra: str = "", peer_extra: dict[str, str] | None = None,
                 verbose: bool = False, listen: str | None = None,
                 anchor_address: str | None = None) -> None:
        """With ``topo.second_mh`` a second agent, "phone", runs in ``mh2`` (its one
        interface wan1, no rules); ``peer_extra`` adds lines to an anchor [[peer]]
        (by agent name, e.g. ``{"phone": "mesh = false"}``). ``listen`` (the first
        anchor's, e.g. ``"[::]:5060"``) and ``anchor_address`` (the agent's address of
        the first anchor, e.g. a name) replace the defaults (its IPv4 address)."""
        self.topo = topo
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rules = rules
        self.anchor_roles = anchor_roles
        self.agent_extra = agent_extra
        self.verbose = verbose
        self.run_dir = Path(f"/run/upmt-{topo.prefix}")
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.mh_key = keys.keypair()
        self.phone_key = keys.keypair()
        self.peer_extra = peer_extra or {}
        self.anchor_keys = [keys.keypair() for _ in anchor_roles]
        self.anchor_extra = anchor_extra
        self.listen, self.anchor_address = listen, anchor_address

    # -- configs -------------------------------------------------------------------------
    def anchor_role_name(self, i: int) -> str:
        return "an" if i == 0 else f"an{i + 1}"

    def anchor_control(self, i: int) -> str:
        return str(self.run_dir / f"anchor{i}.sock")

    @property
    def agent_control(self) -> str:
        return str(self.run_dir / "agent.sock")

    @property
    def agents(self) -> dict[str, tuple[str, str]]:
        """Agent key -> (its namespace role, its name)."""
        two = {"agent2": ("mh2", "phone")} if self.topo.second_mh else {}
        return {"agent": ("mh", "laptop"), **two}

    def control_of(self, agent: str) -> str:
        return str(self.run_dir / f"{agent}.sock")

    def write_configs(self) -> tuple[list[Path], Path]:
        anchors = []
        for i, role in enumerate(self.anchor_roles):
            addr = self.topo.addresses[self.anchor_role_name(i)]
            p = self.dir / f"anchor{i}.toml"
            nat = 'nat_interface = "eth0"\n' if role == "anchor" else ""
            # VIpA leases in this lab's own directory, not the machine's /var/lib/upmt
            if "state_dir" not in self.anchor_extra:
                nat += f'state_dir = "{self.dir.resolve() / "state"}"\n'
            peers = [("laptop", self.mh_key[1])]
            if self.topo.second_mh:
                peers.append(("phone", self.phone_key[1]))
            listen = self.listen if i == 0 and self.listen else f"{addr}:5060"
            p.write_text(f'role = "{role}"\nlisten = "{listen}"\nvipa_pool = "100.100.0.0/16"\n'
                         f'{nat}control = "{self.anchor_control(i)}"\n'
                         f'private_key = "{self.anchor_keys[i][0]}"\n{self.anchor_extra}\n'
                         + "".join(f'[[peer]]\nname = "{n}"\npublic_key = "{k}"\n'
                                   f'{self.peer_extra.get(n, "")}\n' for n, k in peers))
            anchors.append(p)
        agent = self.dir / "agent.toml"
        text = (f'name = "laptop"\ncontrol = "{self.agent_control}"\n'
                f'private_key = "{self.mh_key[0]}"\n{self.agent_extra}\n'
                '[[interface]]\nname = "wan1"\n\n[[interface]]\nname = "wan2"\n\n')
        for i, _ in enumerate(self.anchor_roles):
            addr = self.topo.addresses[self.anchor_role_name(i)]
            address = self.anchor_address if i == 0 and self.anchor_address else f"{addr}:5060"
            text += (f'[[anchor]]\nname = "an{i + 1}"\naddress = "{address}"\n'
                     f'public_key = "{self.anchor_keys[i][1]}"\n\n')
        agent.write_text(text + self.rules)
        if self.topo.second_mh:
            text = (f'name = "phone"\ncontrol = "{self.control_of("agent2")}"\n'
                    f'private_key = "{self.phone_key[0]}"\n{self.agent_extra}\n'
                    '[[interface]]\nname = "wan1"\n\n')
            for i, _ in enumerate(self.anchor_roles):
                addr = self.topo.addresses[self.anchor_role_name(i)]
                text += (f'[[anchor]]\nname = "an{i + 1}"\naddress = "{addr}:5060"\n'
                         f'public_key = "{self.anchor_keys[i][1]}"\n\n')
            (self.dir / "agent2.toml").write_text(text)
        return anchors, agent

    # -- processes -----------------------------------------------------------------------
    def _start(self, key: str, role: str, argv: list[str], timeout: float = 20.0) -> None:
        log = open(self.dir / f"{key}.log", "w")
        p = self.topo.popen(role, *argv, *(["-v"] if self.verbose else []),
                            stdout=subprocess.PIPE, stderr=log, text=True)
        self.procs[key] = p
        assert p.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r, _, _ = select.select([p.stdout], [], [], 0.2)
            if r:
                line = p.stdout.readline()
                if line.strip() == "ready":
                    return
                if not line and p.poll() is not None:
                    break
            elif p.poll() is not None:
                break
        raise LabError(f"{key} did not become ready: {self.log_tail(key)}")

    def log_tail(self, key: str, n: int = 15) -> str:
        try:
            return "\n".join((self.dir / f"{key}.log").read_text().splitlines()[-n:])
        except OSError:
            return "(no log)"

    def start(self) -> Lab:
        """Start the anchors, then the agent; if one does not come up, stop what did
        (its run directory included) and raise LabError."""
        anchors, agent = self.write_configs()
        try:
            for i, cfg in enumerate(anchors):
                self._start(f"anchor{i}", self.anchor_role_name(i),
                            [*exe("upmt-anchor"), "--config", str(cfg)])
            self._start("agent", "mh", [*exe("upmt-agent"), "up", "--config", str(agent)])
            if self.topo.second_mh:
                self._start("agent2", "mh2", [*exe("upmt-agent"), "up", "--config",
                                              str(self.dir / "agent2.toml")])
        except BaseException:
            self.stop()
            raise
        return self

    def agent_cli(self, *args: str, check: bool = True, agent: str = "agent"
                  ) -> subprocess.CompletedProcess[str]:
        sub, *rest = args      # --control right after the subcommand (run's program follows)
        return self.topo.run(self.agents[agent][0], *exe("upmt-agent"), sub, "--control",
                             self.control_of(agent), *rest, check=check)

    def agent_status(self, agent: str = "agent") -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.agent_cli("status", "--json",
                                                        agent=agent).stdout)
        return out

    def anchor_status(self, i: int = 0) -> dict[str, Any]:
        r = self.topo.run(self.anchor_role_name(i), *exe("upmt-anchor"), "status", "--json",
                          "--control", self.anchor_control(i))
        out: dict[str, Any] = json.loads(r.stdout)
        return out

    def stop(self) -> dict[str, int | None]:
        """Stop the agent (``down``) then the anchors (SIGTERM); return their exit codes."""
        codes: dict[str, int | None] = {}
        for agent in self.agents:
            if agent in self.procs and self.procs[agent].poll() is None:
                self.agent_cli("down", check=False, agent=agent)
        for key, p in self.procs.items():
            if key not in self.agents and p.poll() is None:
                p.terminate()
        for key, p in self.procs.items():
            try:
                codes[key] = p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                codes[key] = None
        self.procs.clear()
        # the run directory is this lab's own (named after its topology): also what a
        # killed daemon left in it (its control socket, its state file) goes
        shutil.rmtree(self.run_dir, ignore_errors=True)
        return codes
