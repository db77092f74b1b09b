"""Command line: ``upmt-agent`` and ``upmt-anchor`` (shared/SPEC.md).

Exit codes: 0 success; 2 bad usage or bad config (one line naming file, key,
problem); 1 any other failure, one clear line. Never a bare traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import stat
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from . import __version__, keys
from .config import (
    DEFAULT_AGENT_CONFIG,
    DEFAULT_AGENT_CONTROL,
    DEFAULT_ANCHOR_CONFIG,
    DEFAULT_ANCHOR_CONTROL,
    ConfigError,
    _load_toml,
    load_agent_config,
    load_anchor_config,
)
from .control import ControlError, follow, request
from .service import ConsoleHandler, mute

__all__ = ["agent_main", "anchor_main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}\n")


def _fail(prog: str, msg: str, code: int = 1) -> int:
    try:
        print(f"{prog}: {msg}", file=sys.stderr)
    except (OSError, ValueError):   # stderr is gone (closed terminal): the code still counts
        mute(2)
    return code


def _logging(verbose: bool, prog: str) -> None:
    """Log lines on stderr (journald priorities under systemd; a closed terminal mutes)."""
    logging.basicConfig(level=logging.WARNING, handlers=[ConsoleHandler(prog)])
    logging.getLogger("upmt_tun").setLevel(logging.DEBUG if verbose else logging.INFO)


def _control_path(args: argparse.Namespace, kind: str) -> str:
    """--control, else the config's ``control`` key (if the config is readable), else default."""
    if args.control:
        return str(args.control)
    loader = load_agent_config if kind == "agent" else load_anchor_config
    default = DEFAULT_AGENT_CONTROL if kind == "agent" else DEFAULT_ANCHOR_CONTROL
    path = args.config or (DEFAULT_AGENT_CONFIG if kind == "agent" else DEFAULT_ANCHOR_CONFIG)
    if not os.path.exists(path):
        return default
    return loader(path).control


def _others_can_read(mode: int) -> bool:
    return bool(mode & (stat.S_IRGRP | stat.S_IROTH))


def genkey(prog: str) -> int:
    """A new private key on stdout; a warning (as ``wg genkey`` gives) when stdout is a
    file that group or others can read: ``umask 077`` first, or ``chmod 600`` after."""
    try:
        st = os.fstat(sys.stdout.fileno())
        if stat.S_ISREG(st.st_mode) and _others_can_read(st.st_mode):
            print(f"{prog}: warning: writing a private key to a file that group/others can "
                  f"read (mode {stat.S_IMODE(st.st_mode):04o}); set umask 077 first or "
                  "chmod 600 it", file=sys.stderr)
    except (OSError, ValueError):      # no real file descriptor (captured): nothing to check
        pass
    print(keys.generate())
    return 0


def key_file_exposed(config_path: str) -> str | None:
    """One line if the config's ``private_key_file`` is readable by group or others, else
    None (also when there is no key file or it cannot be read: loading reports that)."""
    try:
        name = _load_toml(config_path).get("private_key_file")
    except ConfigError:
        return None
    if not isinstance(name, str):
        return None
    full = os.path.join(os.path.dirname(config_path), name)
    try:
        mode = os.stat(full).st_mode
    except OSError:
        return None
    if not _others_can_read(mode):
        return None
    return (f"{config_path}: private_key_file: {full} is readable by group/others "
            f"(mode {stat.S_IMODE(mode):04o}); chmod 600 it")


def pubkey(prog: str) -> int:
    try:
        print(keys.public_of(sys.stdin.buffer.read()))
    except ValueError:
        return _fail(prog, "stdin: not a base64 X25519 private key (as printed by genkey)", 2)
    return 0


def _print_agent_status(st: dict[str, Any]) -> None:
    print(f"agent {st.get('name', '')}  vipa_fix {st['vipa_fix']}")
    for a in st.get("anchors", []):
        print(f"anchor {a['name']} {a['address'] or '-'}  {a['state']}  vipa {a['vipa'] or '-'}"
              f"  ({a['role']})")
    for i in st.get("interfaces", []):
        if i["device"] != i["name"] or not i["up"]:     # a pattern, or not there (yet)
            print(f"interface {i['name']} {i['device'] or '(no device)'}  "
                  f"{'up' if i['up'] else 'down'}")
    if st.get("peers"):
        print(f"\n{'PEER':12} {'ANCHOR':8} {'VIPA':15} {'PATH':6} {'IFACE':8} {'REMOTE':21} "
              f"{'RTT ms':>7}")
        for p in st["peers"]:
            rtt = "-" if p["rtt_ms"] is None else f"{p['rtt_ms']:.1f}"
            print(f"{p['name']:12} {p['anchor']:8} {p['vipa']:15} {p['path']:6} "
                  f"{p['interface'] or '-':8} {p['remote'] or '-':21} {rtt:>7}")
            for q in p.get("paths", ()):        # every path to it, the one above included
                rtt = "-" if q["rtt_ms"] is None else f"{q['rtt_ms']:.1f}"
                print(f"{'':12} {'':8} {'  ' + q['state']:15} {q['path']:6} "
                      f"{q['interface']:8} {q['remote'] or '-':21} {rtt:>7}")
    print(f"\n{'TUNNEL':>6} {'IFACE':8} {'ANCHOR':8} {'STATE':5} {'LOCAL':21} {'REMOTE':21} "
          f"{'VIPA':15} {'RTT ms':>7} {'TX':>9} {'RX':>9}")
    for t in st["tunnels"]:
        rtt = "-" if t["rtt_ms"] is None else f"{t['rtt_ms']:.1f}"
        print(f"{t['id']:>6} {t['interface']:8} {t['anchor'].split('~')[0]:8} {t['state']:5} "
              f"{t['local']:21} "
              f"{t['remote']:21} {t['vipa'] or '-':15} {rtt:>7} {t['tx_packets']:>9} "
              f"{t['rx_packets']:>9}")
    print(f"\n{'FLOW':>6} {'PROTO':5} {'SOURCE':21} {'DESTINATION':21} {'RULE':10} "
          f"{'TUNNEL':>6} {'IFACE':8} {'TX':>9} {'RX':>9}")
    for f in st["flows"]:
        print(f"{f['id']:>6} {f['protocol']:5} {f['src'] + ':' + str(f['sport']):21} "
              f"{f['dst'] + ':' + str(f['dport']):21} {f['rule'] or '-':10} {f['tunnel']:>6} "
              f"{f['interface'] or '-':8} {f['tx_packets']:>9} {f['rx_packets']:>9}")
        _print_history(f.get("history", []))
    if st.get("drops"):
        print("\ndrops: " + ", ".join(f"{k} {v}" for k, v in sorted(st["drops"].items())))


def _print_history(history: list[dict[str, Any]]) -> None:
    """A flow's moves, newest first, under its row: when, where from and to, and why."""
    for h in reversed(history):
        if h.get("from") is None:
            continue                          # the flow's start: its row says where it is
        src = h.get("from_interface") or f"tunnel {h['from']}"
        dst = h.get("to_interface") or f"tunnel {h['to']}"
        print(f"{'':>8}{h['age_s']:>9.1f} s ago  {src} -> {dst}  ({h['reason']})")


def _print_anchor_status(st: dict[str, Any]) -> None:
    print(f"{st['role']} on {st.get('listen', '')}  pool {st.get('vipa_pool', '')}")
    for a in st["associations"]:
        print(f"\nhost {a['mh']}  vipa {a['vipa']}")
        for t in a["tunnels"]:
            print(f"  tunnel {t['id']:>5} {t['interface'] or '-':8} from {t['remote']:21} "
                  f"rx {t['rx_packets']:>9} tx {t['tx_packets']:>9} idle {t['idle_s']:.1f}s")
    print(f"\n{'FLOW':>6} {'PROTO':5} {'SOURCE':21} {'DESTINATION':21} {'HOST':10} {'TUNNEL':>6} "
          f"{'UP':>9} {'DOWN':>9}")
    for f in st["flows"]:
        print(f"{f['id']:>6} {f['protocol']:5} {f['src'] + ':' + str(f['sport']):21} "
              f"{f['dst'] + ':' + str(f['dport']):21} {f['mh']:10} {f['tunnel']:>6} "
              f"{f['tx_packets']:>9} {f['rx_packets']:>9}")
        _print_history(f.get("history", []))
    if st.get("drops"):
        print("\ndrops: " + ", ".join(f"{k} {v}" for k, v in sorted(st["drops"].items())))


def _watch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--watch", action="store_true",
                   help="refresh every --interval seconds, with rates per tunnel and per "
                        "flow; Ctrl-C ends it")
    p.add_argument("--interval", type=float, default=1.0, metavar="S",
                   help="seconds between refreshes with --watch (default 1)")


def _status(prog: str, args: argparse.Namespace, kind: str,
            show: Callable[[dict[str, Any]], None]) -> int:
    if args.watch:
        return _status_watch(prog, args, kind)
    answer = request(_control_path(args, kind), {"cmd": "status"})
    if not answer.get("ok"):
        return _fail(prog, str(answer.get("error", "status failed")))
    if args.json:
        print(json.dumps(answer["status"], indent=2))
    else:
        show(answer["status"])
    return 0


def _events(prog: str, args: argparse.Namespace, kind: str) -> int:
    """``events``: one JSON object per line for each event, until Ctrl-C (exit 0) or the
    daemon stops (exit 0: the stream ended)."""
    try:
        for line in follow(_control_path(args, kind), {"cmd": "events"}):
            print(line, flush=True)
    except KeyboardInterrupt:
        return 0
    return 0


def _sudo_user() -> tuple[int, int, list[int]] | None:
    """(uid, gid, groups) of the user who ran ``sudo upmt-agent run``, when root through
    sudo; None otherwise (root itself, or a user: nothing to give up)."""
    if os.geteuid() != 0:
        return None
    try:
        uid, gid = int(os.environ["SUDO_UID"]), int(os.environ["SUDO_GID"])
    except (KeyError, ValueError):
        return None
    if uid == 0:
        return None
    user = os.environ.get("SUDO_USER", "")
    try:
        groups = os.getgrouplist(user, gid) if user else [gid]
    except OSError:
        groups = [gid]
    return uid, gid, groups


def _status_watch(prog: str, args: argparse.Namespace, kind: str) -> int:
    """``status --watch``: until Ctrl-C (exit 0) or the daemon stops answering (exit 1)."""
    from .watch import agent_view, anchor_view, watch

    if args.json:
        return _fail(prog, "status: --watch and --json do not go together", 2)
    if not 0.1 <= args.interval <= 3600:
        return _fail(prog, "status: --interval must be between 0.1 and 3600 seconds", 2)
    path = _control_path(args, kind)

    def fetch() -> dict[str, Any]:
        answer = request(path, {"cmd": "status"})
        if not answer.get("ok"):
            raise ControlError(str(answer.get("error", "status failed")))
        st: dict[str, Any] = answer["status"]
        return st

    try:
        watch(fetch, agent_view if kind == "agent" else anchor_view, args.interval,
              sys.stdout)
    except KeyboardInterrupt:
        return 0
    return 0  # pragma: no cover - watch returns only when counted


def _run_program(prog: str, args: argparse.Namespace) -> int:
    """``upmt-agent run --rule R -- PROGRAM ...``: join R's cgroup, then become PROGRAM,
    as the calling user: the agent moves this very process (it knows it by the socket's
    peer credentials), so no privilege is needed here; under ``sudo`` the program runs
    as the user who ran sudo, never as root."""
    argv = list(args.program)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        return _fail(prog, "run: give a program after --", 2)
    answer = request(_control_path(args, "agent"), {"cmd": "join", "rule": args.rule})
    if not answer.get("ok"):
        return _fail(prog, str(answer.get("error")), 2 if answer.get("usage") else 1)
    if (user := _sudo_user()) is not None:
        uid, gid, groups = user
        try:
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
        except OSError as e:
            return _fail(prog, f"cannot become uid {uid} (from sudo): {e.strerror}")
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        return _fail(prog, f"cannot run {argv[0]}: {e.strerror}", 127)


RELOAD_HELP = (
    "Make the running {daemon} apply its config file again (the one it was started with, "
    "or --config FILE: that one from then on), without a restart. {what} A config that "
    "does not load, does not fit the running {daemon}, or whose nftables change nft "
    "refuses changes nothing: one line says why (exit 2). Other keys keep their running "
    "value until a restart; the reply names them (\"restart needed for ...\"). SIGHUP "
    "does the same when the {daemon} has no controlling terminal (systemd: `systemctl "
    "reload`); in a terminal SIGHUP stops it (the terminal closed).")
AGENT_RELOAD = (
    "Applied: [[rule]]s added, removed, edited or reordered (one nftables transaction; "
    "a rule is known by its name: its connections keep their marks, and existing flows "
    "keep going as they were, an edit applies to new connections), [[anchor]]s added, "
    "removed or moved (a removed anchor's flows end), return_after. Restart needed: "
    "interfaces, vipa_fix, mtu, fwmark, table, mark_mask, rule_priority, tun, keys, "
    "metrics, group, keepalive, direct.")
ANCHOR_RELOAD = (
    "Applied: [[peer]]s added, removed (its association ends now) or re-keyed (it must "
    "authenticate again), mesh, allow_egress, deny_egress, max_flows_per_host (nftables, "
    "one transaction; per-host counts start over), max_associations, lease_days; other "
    "associations are not touched. Restart needed: role, listen, vipa_pool, "
    "nat_interface, mtu, tun, private key, metrics, group, state_dir.")


def _reload(prog: str, args: argparse.Namespace, kind: str) -> int:
    """``reload``: the running daemon loads its config file (or --config) again."""
    path = os.path.abspath(args.config) if args.config else None
    if path is not None:       # a file that does not load: the same line, without asking
        (load_agent_config if kind == "agent" else load_anchor_config)(path)
    answer = request(_control_path(args, kind), {"cmd": "reload", "config": path},
                     timeout=30.0)
    if not answer.get("ok"):
        return _fail(prog, str(answer.get("error", "reload failed")),
                     2 if answer.get("usage") else 1)
    changes = answer.get("changes") or []
    print("reloaded: " + (", ".join(map(str, changes)) or "no change"))
    restart = answer.get("restart") or []
    if restart:
        print(f"restart needed for {', '.join(map(str, restart))}")
    return 0


def _check(prog: str, kind: str, path: str) -> int:
    """``check``: the config loads (else exit 2 from the loader), then one line per finding
    on stderr; exit 2 if the daemon would refuse to start (a ruleset nft refuses, the
    anchor's exposed key), else 0, warnings or not. Changes nothing on the host."""
    from .check import check_agent, check_anchor

    exposed = key_file_exposed(path)
    if kind == "agent":
        found = check_agent(load_agent_config(path))
        if exposed:
            found.warnings.insert(0, exposed)
    else:
        found = check_anchor(load_anchor_config(path))
        if exposed:
            found.errors.insert(0, exposed)
    for line in found.errors:
        print(f"{prog}: error: {line}", file=sys.stderr)
    for line in found.warnings:
        print(f"{prog}: warning: {line}", file=sys.stderr)
    if found.errors:
        return 2
    print(f"{path}: ok" + (f", {len(found.warnings)} warning(s)" if found.warnings else ""))
    return 0


def _common(p: argparse.ArgumentParser, config_default: str) -> None:
    p.add_argument("--config", help=f"config file (default {config_default})")
    p.add_argument("--control", help="control socket path (default: config's, else /run/upmt/)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _run(prog: str, fn: Callable[[], int]) -> int:
    from .system.errors import StartupError, SystemSetupError

    try:
        return fn()
    except ConfigError as e:
        return _fail(prog, str(e), 2)
    except (ControlError, StartupError, SystemSetupError) as e:
        return _fail(prog, str(e))
    except PermissionError as e:
        return _fail(prog, f"permission denied ({e.strerror}); run as root")
    except OSError as e:
        return _fail(prog, f"{e.strerror or e}")
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # never a bare traceback
        logging.getLogger("upmt_tun").debug("internal error", exc_info=True)
        return _fail(prog, f"internal error: {type(e).__name__}: {e} (run with -v for details)")


CHECK_HELP = ("Load the config, dry-run the nftables ruleset the {daemon} would install "
              "(nft -c), and warn, one line each on stderr, about what will bite. Changes "
              "nothing on the host; run it as root (the ruleset and the firewall are only "
              "checked then). Exit 0: ok or warnings only; 2: a bad config or a ruleset nft "
              "refuses (the {daemon} would not start).")

AGENT_COMMANDS = """\
`upmt-agent COMMAND --help` describes each. Exit 0 on success, 2 for bad usage or a bad
config (one line naming file, key and problem), 1 for anything else (one line).
"""


def _sub(sub: Any, name: str, hlp: str, desc: str) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, help=hlp, description=desc)
    return p


def agent_main(argv: list[str] | None = None) -> int:
    prog = "upmt-agent"
    p = _Parser(prog=prog, description="UPMT mobile-host agent: steers the traffic of chosen "
                "applications through tunnels to anchors, over chosen access networks.",
                epilog=AGENT_COMMANDS, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser, metavar="COMMAND")
    up = _sub(sub, "up", "run the agent in the foreground",
              "Set the host up (TUN, nftables, routing rules), associate with every anchor "
              "over every interface, print `ready`, and run until `down`, SIGTERM, SIGINT or "
              "SIGHUP in a terminal; then restore the host exactly. Without a controlling "
              "terminal (systemd, setsid) SIGHUP means `reload`. SIGUSR2 (what `systemctl "
              "restart` sends) stops it for a restart: the connections it steers are held "
              "(their packets dropped, never routed around the tunnel) until the next start "
              "takes them over, so they survive.")
    _common(up, DEFAULT_AGENT_CONFIG)
    down = _sub(sub, "down", "stop a running agent",
                "Ask the running agent to stop; it restores the host before it exits.")
    _common(down, DEFAULT_AGENT_CONFIG)
    st = _sub(sub, "status", "show anchors, tunnels and flows",
              "Show the running agent's anchors, tunnels (RTT, packets) and flows with their "
              "last moves; --watch refreshes it with rates (bits and packets per second "
              "per tunnel, packets per second per flow).")
    _common(st, DEFAULT_AGENT_CONFIG)
    st.add_argument("--json", action="store_true", help="everything, as JSON")
    _watch_args(st)
    ev = _sub(sub, "events", "print events as they happen, one JSON object per line",
              "Print the running agent's events as they happen, one JSON object per line "
              "with at least \"event\" and \"time\" (tunnel_up/down, path_quality, "
              "flow_new/moved/closed with the move's reason, anchor_associated/lost, "
              "peer_path; \"dropped\" when this reader fell behind), until Ctrl-C or the "
              "agent stops. Members of the config's `group` may read them.")
    _common(ev, DEFAULT_AGENT_CONFIG)
    cl = _sub(sub, "cleanup", "remove what a killed agent left",
              "Remove what an agent killed with SIGKILL (or crashed) left: its nft table, ip "
              "rules and routing tables, the sysctls it changed, cgroups, a TUN device and "
              "the stale control socket. Refuses (exit 1) while an agent answers on the "
              "control socket; does nothing when nothing is left.")
    _common(cl, DEFAULT_AGENT_CONFIG)
    cl.add_argument("--keep-paused", action="store_true",
                    help="leave what an agent stopped for a restart (SIGUSR2) keeps to "
                         "hold its steered connections, for the next start (the unit's "
                         "ExecStopPost)")
    ck = _sub(sub, "check", "check the config and the host before `up`",
              CHECK_HELP.format(daemon="agent") + " Agent: routing rules of other tools "
              "(Tailscale, wg-quick) that would take the steered traffic before ours, "
              "vipa_fix overlapping an address or route of the host, interfaces that do "
              "not exist or have no IPv4 address, anchor names that do not resolve, a "
              "private key file others can read.")
    _common(ck, DEFAULT_AGENT_CONFIG)
    rl = _sub(sub, "reload", "apply a changed config to the running agent",
              RELOAD_HELP.format(daemon="agent", what=AGENT_RELOAD))
    _common(rl, DEFAULT_AGENT_CONFIG)
    mv = _sub(sub, "move", "move a rule's or a flow's traffic to an interface",
              "Move every flow of a rule (and its new ones) or one flow to another access "
              "interface; the anchor follows by itself.")
    _common(mv, DEFAULT_AGENT_CONFIG)
    g = mv.add_mutually_exclusive_group(required=True)
    g.add_argument("--rule", help="the rule's name (it prefers IFACE from now on)")
    g.add_argument("--flow", type=int, help="a flow's id (from `status`)")
    mv.add_argument("--via", required=True, metavar="IFACE", help="the interface to move to")
    mv.add_argument("--anchor", help="the anchor to use (default: the flow's own)")
    rn = _sub(sub, "run", "start a program whose traffic belongs to a rule",
              "Start PROGRAM in the rule's cgroup (v2): every socket it opens follows the "
              "rule, whatever its ports. PROGRAM runs as you: members of the config's "
              "`group` need no sudo, and under sudo it runs as the user who ran sudo, "
              "never as root. Example: upmt-agent run --rule web -- firefox")
    _common(rn, DEFAULT_AGENT_CONFIG)
    rn.add_argument("--rule", required=True, help="the rule's name")
    rn.add_argument("program", nargs=argparse.REMAINDER, metavar="-- PROGRAM [ARGS]",
                    help="the program to run and its arguments, after --")
    _sub(sub, "genkey", "print a new private key",
         "Print a new base64 X25519 private key. Keep it private: `umask 077; upmt-agent "
         "genkey > key` (a warning is printed when the file is readable by others).")
    _sub(sub, "pubkey", "read a private key on stdin, print its public key",
         "Read a private key (from genkey) on stdin and print its public key, to give to "
         "the other side.")
    args = p.parse_args(argv)
    if args.cmd == "genkey":
        return genkey(prog)
    if args.cmd == "pubkey":
        return pubkey(prog)
    _logging(getattr(args, "verbose", False), prog)

    def go() -> int:
        if args.cmd == "up":
            from .runtime import run_agent

            path = args.config or DEFAULT_AGENT_CONFIG
            cfg = load_agent_config(path)
            if exposed := key_file_exposed(path):
                logging.getLogger("upmt_tun").warning("%s", exposed)
            run_agent(cfg, args.control or cfg.control)
            return 0
        if args.cmd == "cleanup":
            from .runtime import cleanup_agent

            cfg = load_agent_config(args.config or DEFAULT_AGENT_CONFIG)
            cleanup_agent(cfg, args.control or cfg.control, args.keep_paused)
            return 0
        if args.cmd == "check":
            return _check(prog, "agent", args.config or DEFAULT_AGENT_CONFIG)
        if args.cmd == "down":
            answer = request(_control_path(args, "agent"), {"cmd": "down"})
            return 0 if answer.get("ok") else _fail(prog, str(answer.get("error")))
        if args.cmd == "status":
            return _status(prog, args, "agent", _print_agent_status)
        if args.cmd == "reload":
            return _reload(prog, args, "agent")
        if args.cmd == "events":
            return _events(prog, args, "agent")
        if args.cmd == "move":
            answer = request(_control_path(args, "agent"),
                             {"cmd": "move", "rule": args.rule, "flow": args.flow,
                              "via": args.via, "anchor": args.anchor})
            if not answer.get("ok"):
                return _fail(prog, str(answer.get("error")), 2 if answer.get("usage") else 1)
            what = f"rule {args.rule}" if args.rule else f"flow {args.flow}"
            print(f"{what}: {answer.get('moved', 0)} flow(s) moved to {args.via}")
            return 0
        return _run_program(prog, args)

    return _run(prog, go)


ANCHOR_COMMANDS = """\
commands (without one, the anchor runs in the foreground):
  status    show associations, tunnels and flows (--json for all of it)
  reload    apply a changed config (peers, mesh, egress lists, limits)
  events    print events (hosts associated/lost, tunnels up/down), one JSON line each
  cleanup   remove what a killed anchor left
  check     check the config and the host before starting
  genkey    print a new private key
  pubkey    read a private key on stdin, print its public key

`upmt-anchor COMMAND --help` describes each. The anchor prints `ready` once it listens
and runs until SIGTERM, SIGINT or (in a terminal) SIGHUP, then restores the host;
without a controlling terminal (systemd, setsid) SIGHUP means `reload`. SIGUSR2 (what
`systemctl restart` sends) stops it for a restart: its NAT stays until the next start,
so the connections it masquerades survive. Exit 0 on success, 2 for
bad usage or a bad config (one line), 1 for anything else (one line).
"""

ANCHOR_SUBCOMMANDS = {
    "status": "Show the running anchor's associations, tunnels and flows; --watch "
              "refreshes it with rates per tunnel and per flow.",
    "reload": RELOAD_HELP.format(daemon="anchor", what=ANCHOR_RELOAD),
    "events": "Print the running anchor's events as they happen, one JSON object per line "
              "with at least \"event\" and \"time\" (host_associated, host_lost, "
              "tunnel_up, tunnel_down; \"dropped\" when this reader fell behind), until "
              "Ctrl-C or the anchor stops.",
    "cleanup": "Remove what an anchor killed with SIGKILL (or crashed) left: its nft table, "
               "the sysctls it changed, a TUN device and the stale control socket, and the "
               "NAT an anchor stopped for a restart (SIGUSR2) keeps. Refuses "
               "(exit 1) while an anchor answers on the control socket.",
    "check": CHECK_HELP.format(daemon="anchor") + " Anchor: a firewall whose forward "
             "policy is drop (Docker, ufw), vipa_pool overlapping an address or route of "
             "the host, a nat_interface that does not exist, a listen address the host "
             "does not have; a private key file others can read is an error.",
    "genkey": "Print a new base64 X25519 private key. Keep it private: `umask 077; "
              "upmt-anchor genkey > key` (a warning is printed when the file is readable by "
              "others).",
    "pubkey": "Read a private key (from genkey) on stdin and print its public key, to list "
              "as the anchor's public_key in the agents' configs.",
}


def anchor_main(argv: list[str] | None = None) -> int:
    prog = "upmt-anchor"
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ANCHOR_SUBCOMMANDS:
        cmd = argv[0]
        sp = _Parser(prog=f"{prog} {cmd}", description=ANCHOR_SUBCOMMANDS[cmd])
        if cmd in ("status", "cleanup", "check", "reload", "events"):
            _common(sp, DEFAULT_ANCHOR_CONFIG)
        if cmd == "status":
            sp.add_argument("--json", action="store_true", help="everything, as JSON")
            _watch_args(sp)
        if cmd == "cleanup":
            sp.add_argument("--keep-paused", action="store_true",
                            help="leave the NAT an anchor stopped for a restart (SIGUSR2) "
                                 "keeps, for the next start (the unit's ExecStopPost)")
        args = sp.parse_args(argv[1:])
        if cmd == "genkey":
            return genkey(prog)
        if cmd == "pubkey":
            return pubkey(prog)
        _logging(args.verbose, prog)
        if cmd == "status":
            return _run(prog, lambda: _status(prog, args, "anchor", _print_anchor_status))
        if cmd == "reload":
            return _run(prog, lambda: _reload(prog, args, "anchor"))
        if cmd == "events":
            return _run(prog, lambda: _events(prog, args, "anchor"))
        if cmd == "check":
            return _run(prog, lambda: _check(prog, "anchor",
                                             args.config or DEFAULT_ANCHOR_CONFIG))

        def clean() -> int:
            from .runtime import cleanup_anchor

            cfg = load_anchor_config(args.config or DEFAULT_ANCHOR_CONFIG)
            cleanup_anchor(cfg, args.control or cfg.control, args.keep_paused)
            return 0

        return _run(prog, clean)
    p = _Parser(prog=prog, usage=f"{prog} [COMMAND] [-h] [--version] [--config CONFIG] "
                "[--control CONTROL] [-v]", description="UPMT anchor node / fixed host: "
                "terminates the mobile hosts' tunnels and relays (NATs) their flows.",
                epilog=ANCHOR_COMMANDS, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"{prog} {__version__}")
    _common(p, DEFAULT_ANCHOR_CONFIG)
    args = p.parse_args(argv)
    _logging(args.verbose, prog)

    def go() -> int:
        from .runtime import run_anchor

        path = args.config or DEFAULT_ANCHOR_CONFIG
        cfg = load_anchor_config(path)
        if exposed := key_file_exposed(path):
            raise ConfigError(path, "private_key_file", exposed.split(": ", 2)[2])
        run_anchor(cfg, args.control or cfg.control)
        return 0

    return _run(prog, go)
