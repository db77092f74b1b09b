"""``upmt-demo``: the whole UPMT story on one machine, in network namespaces.

Builds a mobile host with two access networks, each behind its own NAT, an
anchor node and a legacy correspondent host (see ``testbed.py``); starts
``upmt-anchor`` and ``upmt-agent up``; downloads a file with a legacy ``curl``
through the tunnel and another one outside every rule; prints what the
correspondent saw, the agent's status, and checks that stopping restored the
host. The anchor is a mesh (UPMT-DAM): a second mobile host, "phone", behind a
NAT of its own, serves a file that the first one's legacy ``curl`` fetches at
phone's VIpA, relayed by the anchor first and then over the direct path the two
agents find through their NATs. Needs root, ``ip``, ``nft`` and ``curl``.
Removes everything it made.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .lab import Lab, exe
from .testbed import Topology, tool_missing

DIAGRAM = """
           mobile host "laptop" (ns mh): upmt-agent, curl     mobile host "phone" (ns mh2)
        wan1 10.1.0.2              wan2 10.2.0.2             wan1 10.1.0.2: upmt-agent,
             |                          |                     |   python -m http.server :8000
     NAT nat1 203.0.113.11      NAT nat2 203.0.113.12     NAT nat3 203.0.113.21
              \\                        /                    /
               ------ "Internet" ---------------------------
              /                        \\
   anchor (ns an) 203.0.113.1      correspondent (ns ch) 203.0.113.100
   upmt-anchor, masquerade,        python -m http.server :8080 and :8081
   mesh = true
"""

RULES = """
[[rule]]
name = "web"
protocol = "tcp"
dst = "203.0.113.100/32"
dst_port = 8080
via = ["wan1", "wan2"]
"""


def _say(msg: str) -> None:
    print(msg, flush=True)


def _clients(log: Path) -> list[str]:
    return [line.split(" ")[0] for line in log.read_text().splitlines() if '"GET ' in line]


def run(size_mb: int) -> int:
    why = "needs root" if os.geteuid() != 0 else None
    missing = tool_missing("ip", "nft", "curl")
    if why or missing:
        _say(f"upmt-demo: {why or 'missing programs: ' + ', '.join(missing)}")
        return 1
    _say("UPMT demo: per-application mobility through IP-in-UDP tunnels to an anchor node")
    _say(DIAGRAM)
    with tempfile.TemporaryDirectory(prefix="upmt-demo-") as tmp, \
            Topology(second_mh=True) as topo:
        work = Path(tmp)
        www = work / "www"
        www.mkdir()
        data = os.urandom(size_mb << 20)
        (www / "file.bin").write_bytes(data)
        logs = {}
        for port in (8080, 8081):
            logs[port] = work / f"http-{port}.log"
            topo.popen("ch", sys.executable, "-u", "-m", "http.server", str(port), "--bind",
                       "0.0.0.0", "--directory", str(www), stdout=open(logs[port], "w"),
                       stderr=subprocess.STDOUT)
        before = topo.run("mh", "sh", "-c", "ip rule; ip route show table all; nft list ruleset"
                          ).stdout
        logs[8000] = work / "http-8000.log"
        topo.popen("mh2", sys.executable, "-u", "-m", "http.server", "8000", "--bind",
                   "0.0.0.0", "--directory", str(www), stdout=open(logs[8000], "w"),
                   stderr=subprocess.STDOUT)
        lab = Lab(topo, work / "lab", rules=RULES, anchor_extra="mesh = true\n")
        _say("starting upmt-anchor (an) and upmt-agent up (mh, mh2) ...")
        t0 = time.monotonic()
        lab.start()
        _say(f"  agent printed 'ready' after {time.monotonic() - t0:.1f} s")
        try:
            out = work / "got.bin"
            _say(f"\n1. curl http://203.0.113.100:8080/file.bin ({size_mb} MB), "
                 "matched by rule 'web'")
            t1 = time.monotonic()
            r = topo.run("mh", "curl", "-sS", "-m", "60", "-o", str(out), "-w",
                         "%{http_code} %{speed_download}", "http://203.0.113.100:8080/file.bin",
                         check=False, timeout=70)
            dt = time.monotonic() - t1
            ok = r.stdout.startswith("200") and out.exists() and \
                hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()
            speed = float(r.stdout.split()[1]) * 8 / 1e6 if r.stdout.startswith("200") else 0.0
            _say(f"   HTTP {r.stdout.split()[0] if r.stdout else '-'} in {dt:.2f} s "
                 f"({speed:.0f} Mbit/s), content {'intact' if ok else 'WRONG'}")
            _say(f"   the correspondent saw the request from {', '.join(_clients(logs[8080]))}"
                 "  (the anchor's address: the flow went through the tunnel)")
            _say("\n2. curl http://203.0.113.100:8081/file.bin, matched by no rule")
            r2 = topo.run("mh", "curl", "-sS", "-m", "60", "-o", "/dev/null", "-w", "%{http_code}",
                          "http://203.0.113.100:8081/file.bin", check=False, timeout=70)
            _say(f"   HTTP {r2.stdout}; the correspondent saw "
                 f"{', '.join(_clients(logs[8081]))}  (NAT1's address: normal routing)")
            mesh_ok = _mesh(topo, lab, logs[8000], data, work, size_mb)
            _say("\n4. upmt-agent status\n")
            _say(lab.agent_cli("status").stdout)
            _say("5. upmt-anchor status\n")
            an = topo.run("an", *exe("upmt-anchor"), "status", "--control", lab.anchor_control(0),
                          check=False)
            _say(an.stdout)
        finally:
            codes = lab.stop()
        after = topo.run("mh", "sh", "-c", "ip rule; ip route show table all; nft list ruleset"
                         ).stdout
        restored = after == before
        verdict = "restored" if restored else "NOT restored"
        _say(f"6. stopped: agent exit {codes.get('agent')}, phone's agent exit "
             f"{codes.get('agent2')}, anchor exit {codes.get('anchor0')}; "
             f"mobile host's rules, routes and nftables {verdict}")
        good = ok and _clients(logs[8080]) == ["203.0.113.1"] and mesh_ok and \
            _clients(logs[8081]) == ["203.0.113.11"] and restored and set(codes.values()) == {0}
        _say("\ndemo " + ("succeeded" if good else "FAILED"))
        return 0 if good else 1


def _peer_lines(lab: Lab) -> str:
    """The PEER part of ``upmt-agent status`` (the peer and each path to it)."""
    text = lab.agent_cli("status").stdout.splitlines()
    start = next((i for i, line in enumerate(text) if line.startswith("PEER")), None)
    if start is None:
        return "   (no peer)"
    end = next((i for i in range(start + 1, len(text)) if not text[i].strip()), len(text))
    return "\n".join("   " + line for line in text[start:end])


def _relayed(lab: Lab) -> int:
    an = lab.anchor_status()
    return sum(int(a.get("relay_rx_bytes", 0)) for a in an["associations"])


def _mesh(topo: Topology, lab: Lab, log: Path, data: bytes, work: Path, size_mb: int
          ) -> bool:
    """Step 3: laptop's legacy curl reaches phone at phone's VIpA: relayed, then direct."""
    st = lab.agent_status("agent2")
    phone = str(st["anchors"][0]["vipa"])
    laptop = str(lab.agent_status()["anchors"][0]["vipa"])
    _say(f"\n3. mesh: phone (ns mh2, behind NAT nat3) got VIpA {phone} from the anchor;"
         f"\n   laptop: curl http://{phone}:8000/  (no rule, no config: the anchor's pool)")
    r = topo.run("mh", "curl", "-sS", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}",
                 f"http://{phone}:8000/", check=False, timeout=15)
    _say(f"   HTTP {r.stdout or '-'}; phone saw the request from "
         f"{', '.join(_clients(log)) or '-'}  (laptop's VIpA: nothing between them rewrote "
         "it)")
    t0 = time.monotonic()
    direct = None
    while time.monotonic() - t0 < 10 and direct is None:
        st = lab.agent_status()
        for f in st["flows"]:
            hist = f["history"] if f.get("peer") == "phone" else []
            if len(hist) >= 2 and hist[1]["reason"] == "direct path":
                direct = hist[0]["age_s"] - hist[1]["age_s"]
                tunnels = {t["id"]: t for t in st["tunnels"]}
                a, b = tunnels.get(hist[0]["to"]), tunnels.get(hist[1]["to"])
                _say(f"   its connection opened through the anchor's relay ("
                     f"{a['remote'] if a else '?'}, {hist[0]['to_interface']}) and moved "
                     f"{direct:.2f} s later to the direct path the agents found through "
                     f"their NATs (ICE: {b['remote'] if b else '?'}, "
                     f"{hist[1]['to_interface']}); the TCP connection did not notice")
                break
        else:
            time.sleep(0.1)
    if direct is None:
        _say("   no direct path within 10 s: the flows stay relayed")
    _say(_peer_lines(lab))
    out = work / "mesh.bin"
    before = _relayed(lab)
    r = topo.run("mh", "curl", "-sS", "-m", "60", "-o", str(out), "-w",
                 "%{http_code} %{speed_download}", f"http://{phone}:8000/file.bin",
                 check=False, timeout=70)
    ok = r.stdout.startswith("200") and out.exists() and \
        hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()
    speed = float(r.stdout.split()[1]) * 8 / 1e6 if r.stdout.startswith("200") else 0.0
    relayed = _relayed(lab) - before
    _say(f"   curl http://{phone}:8000/file.bin ({size_mb} MB): HTTP "
         f"{r.stdout.split()[0] if r.stdout else '-'} ({speed:.0f} Mbit/s), content "
         f"{'intact' if ok else 'WRONG'}; the anchor relayed {relayed} bytes meanwhile")
    return ok and direct is not None and _clients(log)[:1] == [laptop]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="upmt-demo", description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=20, help="download size in MB (default 20)")
    args = p.parse_args(argv)
    try:
        return run(args.size)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # the demo explains itself in one line
        print(f"upmt-demo: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
