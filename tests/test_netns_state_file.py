r"""The agent's sysctl state file, attacked for real (security round two, item 6).

::

    ns mh: upmt-agent "laptop", its control socket in a world-writable directory (1777)
         wan1 / wan2 -> ns nat1 / nat2 (masq) -> ns inet -> ns an: upmt-anchor

An unprivileged user (uid 65534) who can write to the control socket's directory plants
``<control>.state`` before the agent starts, naming sysctls of the agent's namespace
(``net.ipv4.ip_default_ttl`` and ``icmp_echo_ignore_all`` are per network namespace, so
the test changes nothing outside its own namespaces). Before the fix the agent applied
them at start and they stayed after it stopped; now it refuses the file with one line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from upmt_tun.lab import Lab
from upmt_tun.testbed import Topology

from .conftest import netns_missing

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(netns_missing() is not None, reason=str(netns_missing()))]

PLANTED = {"net.ipv4.ip_default_ttl": "3", "net.ipv4.icmp_echo_ignore_all": "1",
           "net.ipv4.ip_forward": "1"}


@pytest.fixture
def topo() -> Iterator[Topology]:
    t = Topology()
    t.up()
    try:
        yield t
    finally:
        t.down()


def sysctls(topo: Topology) -> dict[str, str]:
    return {k: topo.run("mh", "sysctl", "-n", k).stdout.strip() for k in PLANTED}


def test_a_state_file_planted_by_another_user_changes_no_sysctl(topo: Topology,
                                                                 tmp_path: Path) -> None:
    lab = Lab(topo, tmp_path)
    lab.run_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(lab.run_dir, 0o1777)               # like /tmp: anyone may create files here
    state = Path(lab.agent_control + ".state")
    state.write_text(json.dumps(PLANTED))
    os.chown(state, 65534, 65534)               # written by "nobody"
    before = sysctls(topo)
    assert before != PLANTED
    try:
        lab.start()
        during = sysctls(topo)
        log = (tmp_path / "agent.log").read_text()
    finally:
        lab.stop()
    after = sysctls(topo)
    print(f"\n[state file] before={before} during={during} after={after}")
    assert during == before and after == before
    assert "refusing state file" in log and "owned by uid 65534" in log
