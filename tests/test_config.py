"""Config loading (shared/SPEC.md "Agent config" / "Anchor config"): pure, no root.

Every bad input must raise ConfigError whose str is ONE line naming the file, the key and the
problem (the CLI prints it verbatim and exits 2).
"""

from __future__ import annotations

import base64
import ipaddress
import os
import textwrap
from pathlib import Path

import pytest

from upmt_tun import keys
from upmt_tun.config import (
    AgentConfig,
    AnchorConfig,
    ConfigError,
    Rule,
    load_agent_config,
    load_anchor_config,
)

# Keys are required (no unauthenticated mode): every config that should load carries them.
MH_PRIV, MH_PUB = keys.keypair()          # the mobile host
AN_PRIV, AN_PUB = keys.keypair()          # the anchor
PHONE_PRIV, PHONE_PUB = keys.keypair()    # a second mobile host


def raw(b64: str) -> bytes:
    return base64.b64decode(b64)


MH_KEY = f'private_key = "{MH_PRIV}"\n'
AN_KEY = f'private_key = "{AN_PRIV}"\n'
ANCHOR_PUB = f'public_key = "{AN_PUB}"\n'           # inside an agent's [[anchor]]
PEER = f'[[peer]]\nname = "mh"\npublic_key = "{MH_PUB}"\n'   # an anchor's [[peer]]

# The agent example of SPEC.md, verbatim (comments included), plus the wan2 interface its
# rule names.
SPEC_AGENT = f'''
private_key = "{MH_PRIV}"  # `genkey`; or private_key_file = "path" (relative to this file)
name = "laptop"                    # this host's identity towards anchors; default: the hostname
vipa_fix = "100.64.0.1"            # address of the TUN device; default 100.64.0.1
control = "/run/upmt/agent.sock"   # control socket; default as shown
# mtu = 1400                       # TUN MTU; default: smallest interface MTU minus all overhead
# fwmark = 0x5550, table = 5550    # mark and routing-table numbers it uses, to coexist with
                                   # wg-quick and Tailscale

[[interface]]                      # default: every interface that has a default route
name = "wan1"
# gateway = "192.168.1.1"          # default: taken from that interface's default route

[[interface]]
name = "wan2"
gateway = "192.168.2.1"

[[anchor]]
name = "an1"
address = "198.51.100.1:5060"      # host:port of the anchor's signalling+tunnel port
public_key = "{AN_PUB}"  # the anchor's `pubkey`

[[rule]]                           # flows matching no rule are left to normal routing
name = "web"
protocol = "tcp"                   # tcp | udp | icmp | any (default any)
dst = "198.51.100.0/24"            # optional CIDR
dst_port = 8080                    # optional: a number or "LOW-HIGH" (an error with icmp)
# src_port, uid (number or name), cgroup (path under the cgroup v2 root) # optional matches
via = ["wan1", "wan2"]             # preference order; default: every interface, config order
# anchor = "an1"                   # optional; default: the best reachable anchor (the first
                                   # reachable one until anchor choice by RTT exists)
'''

SPEC_ANCHOR = f'''
private_key = "{AN_PRIV}"
role = "anchor"                    # anchor | fixed-host
listen = "198.51.100.1:5060"       # UDP: signalling and tunnels share this port
vipa_pool = "100.100.0.0/16"       # VIpAs handed out at association
nat_interface = "eth0"             # masquerade MH traffic out of here (anchor role)
control = "/run/upmt/anchor.sock"

[[peer]]                           # a mobile host allowed to associate (at least one)
name = "laptop"                    # its identity: signalling must use it as sipId
public_key = "{MH_PUB}"
'''

MINI_AGENT = f'''
name = "mh"
{MH_KEY}[[interface]]
name = "wan1"
[[interface]]
name = "wan2"
[[anchor]]
name = "an1"
address = "198.51.100.1:5060"
{ANCHOR_PUB}'''

# top-level keys only: tests append more top-level keys, then PEER
MINI_ANCHOR = f'''
listen = "203.0.113.1:5060"
vipa_pool = "100.100.0.0/16"
nat_interface = "eth0"
{AN_KEY}'''


def _write(tmp_path: Path, text: str, name: str = "cfg.toml") -> str:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def agent(tmp_path: Path, text: str) -> AgentConfig:
    return load_agent_config(_write(tmp_path, text, "agent.toml"))


def anchor(tmp_path: Path, text: str) -> AnchorConfig:
    return load_anchor_config(_write(tmp_path, text, "anchor.toml"))


def assert_one_line_error(e: ConfigError, path: str, key: str, *words: str) -> None:
    msg = str(e)
    assert "\n" not in msg and "\r" not in msg, f"ConfigError spans several lines: {msg!r}"
    assert path in msg, msg
    assert key in msg, msg
    for w in words:
        assert w.lower() in msg.lower(), f"{w!r} not in {msg!r}"


def agent_err(tmp_path: Path, text: str, key: str, *words: str) -> ConfigError:
    path = _write(tmp_path, text, "agent.toml")
    with pytest.raises(ConfigError) as ei:
        load_agent_config(path)
    assert_one_line_error(ei.value, path, key, *words)
    return ei.value


def anchor_err(tmp_path: Path, text: str, key: str, *words: str) -> ConfigError:
    path = _write(tmp_path, text, "anchor.toml")
    with pytest.raises(ConfigError) as ei:
        load_anchor_config(path)
    assert_one_line_error(ei.value, path, key, *words)
    return ei.value


def rule_cfg(body: str) -> str:
    return MINI_AGENT + "[[rule]]\nname = \"r\"\n" + textwrap.dedent(body)


# -- SPEC examples and defaults ---------------------------------------------------------------


def test_spec_agent_example_parses(tmp_path: Path) -> None:
    cfg = agent(tmp_path, SPEC_AGENT)
    assert cfg.name == "laptop"
    assert cfg.vipa_fix == "100.64.0.1"
    assert cfg.control == "/run/upmt/agent.sock"
    assert cfg.mtu is None
    assert (cfg.fwmark, cfg.table) == (0x5550, 5550)
    assert [i.name for i in cfg.interfaces] == ["wan1", "wan2"]
    assert cfg.interfaces[0].gateway is None
    assert cfg.interfaces[1].gateway == "192.168.2.1"
    assert [(a.name, a.host, a.port) for a in cfg.anchors] == [("an1", "198.51.100.1", 5060)]
    (r,) = cfg.rules
    assert (r.index, r.name, r.protocol) == (0, "web", "tcp")
    assert r.dst == ipaddress.IPv4Network("198.51.100.0/24")
    assert r.dst_port == (8080, 8080)
    assert r.src_port is None and r.uid is None and r.cgroup is None
    assert r.via == ("wan1", "wan2")
    assert r.anchor is None


def test_spec_anchor_example_parses(tmp_path: Path) -> None:
    cfg = anchor(tmp_path, SPEC_ANCHOR)
    assert cfg.role == "anchor"
    assert (cfg.listen_host, cfg.listen_port) == ("198.51.100.1", 5060)
    assert cfg.vipa_pool == ipaddress.IPv4Network("100.100.0.0/16")
    assert cfg.nat_interface == "eth0"
    assert cfg.control == "/run/upmt/anchor.sock"


def test_agent_defaults(tmp_path: Path) -> None:
    cfg = agent(tmp_path, MH_KEY + '[[anchor]]\nname = "an1"\naddress = "198.51.100.1"\n'
                + ANCHOR_PUB)
    assert cfg.vipa_fix == "100.64.0.1"
    assert cfg.control == "/run/upmt/agent.sock"
    assert cfg.fwmark == 0x5550
    assert cfg.table == 5550
    assert cfg.mtu is None
    assert cfg.interfaces == ()          # every interface with a default route
    assert cfg.rules == ()
    assert cfg.anchors[0].port == 5060   # the default port
    assert cfg.name                      # the hostname
    assert cfg.private_key == raw(MH_PRIV)
    assert cfg.anchors[0].public_key == raw(AN_PUB)
    assert cfg.plaintext_data is False   # sealed data unless insecure_plaintext_for_benchmarks


def test_agent_explicit_values(tmp_path: Path) -> None:
    cfg = agent(tmp_path, f'''
        vipa_fix = "100.65.0.9"
        control = "/tmp/x.sock"
        mtu = 1400
        fwmark = 0x1230
        table = 4321
        private_key = "{MH_PRIV}"
        [[anchor]]
        name = "an1"
        address = "anchor.example:7000"
        public_key = "{AN_PUB}"
        ''')
    assert (cfg.vipa_fix, cfg.control, cfg.mtu, cfg.fwmark, cfg.table) == (
        "100.65.0.9", "/tmp/x.sock", 1400, 0x1230, 4321)
    assert (cfg.anchors[0].host, cfg.anchors[0].port) == ("anchor.example", 7000)


def test_rule_defaults_and_port_forms(tmp_path: Path) -> None:
    cfg = agent(tmp_path, MINI_AGENT + '''
[[rule]]
name = "all"
[[rule]]
name = "range"
protocol = "udp"
dst_port = "1000-2000"
src_port = "5000"
[[rule]]
name = "spaced"
protocol = "tcp"
dst_port = " 20 - 21 "
anchor = "an1"
uid = 0
cgroup = "/user.slice/app.scope/"
''')
    a, b, c = cfg.rules
    assert (a.index, a.protocol, a.dst, a.dst_port, a.via, a.anchor) == (0, "any", None, None,
                                                                          (), None)
    assert b.index == 1 and b.dst_port == (1000, 2000) and b.src_port == (5000, 5000)
    assert c.dst_port == (20, 21) and c.anchor == "an1" and c.uid == 0
    assert c.cgroup == "user.slice/app.scope"


def test_anchor_defaults_fixed_host(tmp_path: Path) -> None:
    cfg = anchor(tmp_path, 'role = "fixed-host"\nlisten = "0.0.0.0:5060"\n' + AN_KEY + PEER)
    assert cfg.role == "fixed-host"
    assert cfg.nat_interface is None
    assert cfg.vipa_pool == ipaddress.IPv4Network("100.100.0.0/16")
    assert cfg.control == "/run/upmt/anchor.sock"


def test_anchor_smallest_pool(tmp_path: Path) -> None:
    cfg = anchor(tmp_path, 'role = "fixed-host"\nlisten = "0.0.0.0:5060"\n'
                           'vipa_pool = "100.100.0.0/30"\n' + AN_KEY + PEER)
    assert cfg.vipa_pool.prefixlen == 30


# -- agent: bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(("extra", "key", "words"), [
    ('colour = "red"\n', "colour", ("unknown",)),
    ('vipa_fix = 5\n', "vipa_fix", ("string",)),
    ('vipa_fix = "100.64.0"\n', "vipa_fix", ("100.64.0",)),
    ('vipa_fix = "fe80::1"\n', "vipa_fix", ()),
    ('control = 1\n', "control", ()),
    ('mtu = "1400"\n', "mtu", ("integer",)),
    ('mtu = 100\n', "mtu", ("576",)),
    ('mtu = true\n', "mtu", ("boolean",)),
    ('fwmark = true\n', "fwmark", ("boolean",)),
    ('fwmark = 0\n', "fwmark", ()),
    ('fwmark = 0x10000\n', "fwmark", ()),
    ('table = false\n', "table", ("boolean",)),
    ('table = 254\n', "table", ()),
    ('table = 0\n', "table", ()),
    ('table = 1.5\n', "table", ()),
    ('name = "has space"\n', "name", ()),
    ('name = 7\n', "name", ()),
    ('keepalive = true\n', "keepalive", ("boolean",)),
    ('keepalive = 0\n', "keepalive", ()),
    ('return_after = -1\n', "return_after", ("between 0 and 3600",)),
    ('return_after = "soon"\n', "return_after", ()),
    ('tun = "this-name-is-much-too-long"\n', "tun", ()),
])
def test_agent_top_level_errors(tmp_path: Path, extra: str, key: str, words: tuple[str, ...]
                                ) -> None:
    agent_err(tmp_path, extra + MINI_AGENT.replace('name = "mh"\n', "", 1), key, *words)


@pytest.mark.parametrize(("body", "key", "words"), [
    ('[[interface]]\nname = "wan1"\ncolour = 1\n', "interface[2].colour", ("unknown",)),
    ('[[interface]]\ngateway = "1.2.3.4"\n', "interface[2].name", ("missing",)),
    ('[[interface]]\nname = "wan1"\n', "interface[2].name", ("twice",)),
    ('[[interface]]\nname = "x y"\n', "interface[2].name", ()),
    ('[[interface]]\nname = 3\n', "interface[2].name", ()),
    ('[[interface]]\nname = "wan3"\ngateway = "1.2.3"\n', "interface[2].gateway", ()),
    ('[[anchor]]\nname = "an1"\naddress = "1.2.3.4:5060"\n', "anchor[1].name", ("twice",)),
    ('[[anchor]]\nname = "an2"\n', "anchor[1].address", ("missing",)),
    ('[[anchor]]\naddress = "1.2.3.4"\n', "anchor[1].name", ("missing",)),
    ('[[anchor]]\nname = "an2"\naddress = "1.2.3.4:x"\n', "anchor[1].address", ()),
    ('[[anchor]]\nname = "an2"\naddress = "1.2.3.4:0"\n', "anchor[1].address", ()),
    ('[[anchor]]\nname = "an2"\naddress = "1.2.3.4:70000"\n', "anchor[1].address", ()),
    ('[[anchor]]\nname = "an2"\naddress = ":5060"\n', "anchor[1].address", ()),
    ('[[anchor]]\nname = "an2"\naddress = 5060\n', "anchor[1].address", ()),
    ('[[anchor]]\nname = "an2"\naddress = "1.2.3.4"\nport = 1\n' + ANCHOR_PUB, "anchor[1].port",
     ("unknown",)),
    ('[[anchor]]\nname = "an2"\naddress = "1.2.3.4"\n', "anchor[1].public_key", ("missing",)),
    ('[[anchor]]\nname = "an2"\naddress = "1.2.3.4"\npublic_key = "x"\n',
     "anchor[1].public_key", ("base64",)),
    ('[[anchor]]\nname = "an2"\naddress = "1.2.3.4"\npublic_key = 7\n',
     "anchor[1].public_key", ("string",)),
])
def test_agent_table_errors(tmp_path: Path, body: str, key: str, words: tuple[str, ...]) -> None:
    agent_err(tmp_path, MINI_AGENT + body, key, *words)


def test_missing_anchor(tmp_path: Path) -> None:
    agent_err(tmp_path, 'name = "mh"\n' + MH_KEY + '[[interface]]\nname = "wan1"\n', "anchor",
              "anchor")


def test_interface_not_an_array(tmp_path: Path) -> None:
    agent_err(tmp_path, MH_KEY + '[interface]\nname = "wan1"\n[[anchor]]\nname = "a"\n'
              'address = "1.2.3.4"\n' + ANCHOR_PUB, "interface")


def test_anchor_entry_not_a_table(tmp_path: Path) -> None:
    agent_err(tmp_path, MH_KEY + 'anchor = [1, 2]\n', "anchor[0]")


@pytest.mark.parametrize(("body", "key", "words"), [
    ('colour = "red"\n', "rule[0].colour", ("unknown",)),
    ('protocol = "sctp"\n', "rule[0].protocol", ("sctp",)),
    ('protocol = 6\n', "rule[0].protocol", ()),
    ('dst = "198.51.100.0/33"\n', "rule[0].dst", ()),
    ('dst = "not-a-net"\n', "rule[0].dst", ("not-a-net",)),
    ('dst = "2001:db8::/129"\n', "rule[0].dst", ()),
    ('dst = 10\n', "rule[0].dst", ()),
    ('protocol = "tcp"\ndst_port = "9-3"\n', "rule[0].dst_port", ("9-3",)),
    ('protocol = "tcp"\ndst_port = 0\n', "rule[0].dst_port", ()),
    ('protocol = "tcp"\ndst_port = 70000\n', "rule[0].dst_port", ("70000",)),
    ('protocol = "tcp"\ndst_port = "70000"\n', "rule[0].dst_port", ("70000",)),
    ('protocol = "tcp"\ndst_port = "1-70000"\n', "rule[0].dst_port", ()),
    ('protocol = "tcp"\ndst_port = -1\n', "rule[0].dst_port", ()),
    ('protocol = "tcp"\ndst_port = "http"\n', "rule[0].dst_port", ("http",)),
    ('protocol = "tcp"\ndst_port = "1-2-3"\n', "rule[0].dst_port", ()),
    ('protocol = "tcp"\ndst_port = 80.0\n', "rule[0].dst_port", ()),
    ('protocol = "tcp"\ndst_port = [80]\n', "rule[0].dst_port", ()),
    ('protocol = "tcp"\ndst_port = true\n', "rule[0].dst_port", ()),
    ('protocol = "udp"\nsrc_port = "5-1"\n', "rule[0].src_port", ()),
    ('protocol = "icmp"\ndst_port = 80\n', "rule[0].dst_port", ("icmp",)),
    ('protocol = "icmp"\nsrc_port = 80\n', "rule[0].src_port", ("icmp",)),
    ('via = ["wan9"]\n', "rule[0].via", ("wan9",)),
    ('via = "wan1"\n', "rule[0].via", ()),
    ('via = [1]\n', "rule[0].via", ()),
    ('anchor = "an9"\n', "rule[0].anchor", ("an9",)),
    ('anchor = 1\n', "rule[0].anchor", ()),
    ('uid = true\n', "rule[0].uid", ()),
    ('uid = -1\n', "rule[0].uid", ()),
    ('uid = "no-such-user-upmt-test"\n', "rule[0].uid", ("no-such-user-upmt-test",)),
    ('uid = 1.5\n', "rule[0].uid", ()),
    ('cgroup = "../etc"\n', "rule[0].cgroup", ()),
    ('cgroup = "/"\n', "rule[0].cgroup", ()),
    ('cgroup = 5\n', "rule[0].cgroup", ()),
])
def test_rule_errors(tmp_path: Path, body: str, key: str, words: tuple[str, ...]) -> None:
    agent_err(tmp_path, rule_cfg(body), key, *words)


def test_rule_missing_name(tmp_path: Path) -> None:
    agent_err(tmp_path, MINI_AGENT + '[[rule]]\nprotocol = "tcp"\n', "rule[0].name", "missing")


def test_rule_error_names_the_right_index(tmp_path: Path) -> None:
    agent_err(tmp_path, MINI_AGENT + '[[rule]]\nname = "a"\n[[rule]]\nname = "b"\nvia = ["x"]\n',
              "rule[1].via")


def test_duplicate_rule_names(tmp_path: Path) -> None:
    agent_err(tmp_path, MINI_AGENT + '[[rule]]\nname = "a"\n[[rule]]\nname = "a"\n', "rule",
              "name")


def test_via_is_free_when_no_interfaces_listed(tmp_path: Path) -> None:
    # With no [[interface]] the set is discovered at run time: any name is accepted.
    cfg = agent(tmp_path, MH_KEY + '[[anchor]]\nname = "a"\naddress = "1.2.3.4"\n' + ANCHOR_PUB
                + '[[rule]]\nname = "r"\nvia = ["wlan0"]\n')
    assert cfg.rules[0].via == ("wlan0",)


def test_dst_port_with_protocol_any_is_accepted(tmp_path: Path) -> None:
    cfg = agent(tmp_path, rule_cfg('dst_port = 443\n'))
    assert cfg.rules[0].dst_port == (443, 443)


def test_unknown_key_with_newline_is_one_line(tmp_path: Path) -> None:
    agent_err(tmp_path, '"bad\\nkey" = 1\n' + MINI_AGENT, "bad", "unknown")


def test_bad_toml(tmp_path: Path) -> None:
    agent_err(tmp_path, 'name = \n[[anchor]]\n', "-", "TOML")
    anchor_err(tmp_path, 'listen = "1.2.3.4:5060\n', "-", "TOML")


def test_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_bytes(b'name = "\xff\xfe"\n')
    with pytest.raises(ConfigError) as ei:
        load_agent_config(str(p))
    assert_one_line_error(ei.value, str(p), "-")


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    for loader in (load_agent_config, load_anchor_config):
        with pytest.raises(ConfigError) as ei:
            loader(path)
        assert_one_line_error(ei.value, path, "-", "not found")


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        load_agent_config(str(tmp_path))
    assert_one_line_error(ei.value, str(tmp_path), "-")


def test_configerror_fields(tmp_path: Path) -> None:
    e = agent_err(tmp_path, rule_cfg('protocol = "tcp"\ndst_port = "9-3"\n'), "rule[0].dst_port")
    assert e.key == "rule[0].dst_port"
    assert e.file.endswith("agent.toml")
    assert e.problem and e.problem in str(e)


# -- anchor: bad input ------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "key", "words"), [
    (MINI_ANCHOR + 'colour = 1\n', "colour", ("unknown",)),
    (MINI_ANCHOR + 'role = "relay"\n', "role", ("relay",)),
    (MINI_ANCHOR.replace('nat_interface = "eth0"\n', ""), "nat_interface", ("missing",)),
    ('role = "anchor"\nlisten = "1.2.3.4:5060"\n', "nat_interface", ("missing",)),
    ('nat_interface = "eth0"\n', "listen", ("missing",)),
    (MINI_ANCHOR.replace("203.0.113.1:5060", "203.0.113.1:0"), "listen", ()),
    (MINI_ANCHOR.replace("203.0.113.1:5060", "203.0.113.1:99999"), "listen", ()),
    (MINI_ANCHOR.replace("203.0.113.1:5060", "anchor.example:5060"), "listen", ()),
    (MINI_ANCHOR.replace('"203.0.113.1:5060"', "5060"), "listen", ()),
    (MINI_ANCHOR.replace("100.100.0.0/16", "100.100.0.1/16"), "vipa_pool", ()),
    (MINI_ANCHOR.replace("100.100.0.0/16", "banana"), "vipa_pool", ("banana",)),
    (MINI_ANCHOR.replace("100.100.0.0/16", "2001:db8::/64"), "vipa_pool", ()),
    (MINI_ANCHOR.replace("100.100.0.0/16", "100.100.0.0/31"), "vipa_pool", ("small",)),
    (MINI_ANCHOR.replace("100.100.0.0/16", "100.100.0.0/32"), "vipa_pool", ("small",)),
    (MINI_ANCHOR.replace('"100.100.0.0/16"', "16"), "vipa_pool", ()),
    (MINI_ANCHOR.replace('"eth0"', '"no such interface name"'), "nat_interface", ()),
    (MINI_ANCHOR + 'mtu = true\n', "mtu", ("boolean",)),
    (MINI_ANCHOR + 'mtu = 100\n', "mtu", ()),
    (MINI_ANCHOR + 'max_associations = true\n', "max_associations", ("boolean",)),
    (MINI_ANCHOR + 'max_associations = 0\n', "max_associations", ()),
    (MINI_ANCHOR + 'control = false\n', "control", ("boolean",)),
])
def test_anchor_errors(tmp_path: Path, text: str, key: str, words: tuple[str, ...]) -> None:
    anchor_err(tmp_path, text + PEER, key, *words)


def test_keys_are_parsed_to_raw_bytes(tmp_path: Path) -> None:
    phone = f'[[peer]]\nname = "phone"\npublic_key = "{PHONE_PUB}"\n'
    a = anchor(tmp_path, MINI_ANCHOR + PEER + phone)
    assert a.private_key == raw(AN_PRIV) and len(a.private_key) == 32
    assert [(p.name, p.public_key) for p in a.peers] == [("mh", raw(MH_PUB)),
                                                          ("phone", raw(PHONE_PUB))]
    assert a.plaintext_data is False
    m = agent(tmp_path, MINI_AGENT)
    assert m.private_key == raw(MH_PRIV)
    assert [(x.name, x.public_key) for x in m.anchors] == [("an1", raw(AN_PUB))]
    # the public key in a config is what `pubkey` prints for the private key
    assert keys.public_of(base64.b64encode(a.private_key)) == AN_PUB


# -- keys: there is no unauthenticated mode ------------------------------------------------------


def _without_key(text: str, key_line: str) -> str:
    assert key_line in text
    return text.replace(key_line, "", 1)


def test_missing_private_key_agent(tmp_path: Path) -> None:
    e = agent_err(tmp_path, _without_key(MINI_AGENT, MH_KEY), "private_key", "missing",
                  "genkey", "unauthenticated")
    assert e.key == "private_key"


def test_missing_private_key_anchor(tmp_path: Path) -> None:
    e = anchor_err(tmp_path, _without_key(MINI_ANCHOR, AN_KEY) + PEER, "private_key",
                   "missing", "unauthenticated")
    assert e.key == "private_key"


def test_spec_examples_without_keys_are_refused(tmp_path: Path) -> None:
    agent_err(tmp_path, _without_key(SPEC_AGENT, f'private_key = "{MH_PRIV}"'), "private_key")
    anchor_err(tmp_path, _without_key(SPEC_ANCHOR, f'private_key = "{AN_PRIV}"'), "private_key")


@pytest.mark.parametrize("loader", ["agent", "anchor"])
def test_private_key_file_is_relative_to_the_config(tmp_path: Path, loader: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    priv = MH_PRIV if loader == "agent" else AN_PRIV
    cfg_dir = tmp_path / "etc"
    (cfg_dir / "keys").mkdir(parents=True)
    (cfg_dir / "keys" / "private.key").write_text(priv + "\n")     # as `genkey > file` leaves it
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    (elsewhere / "keys").mkdir()
    (elsewhere / "keys" / "private.key").write_text(PHONE_PRIV + "\n")   # a decoy in the cwd
    monkeypatch.chdir(elsewhere)
    line = 'private_key_file = "keys/private.key"\n'
    if loader == "agent":
        path = _write(cfg_dir, _without_key(MINI_AGENT, MH_KEY).replace(
            'name = "mh"\n', 'name = "mh"\n' + line), "agent.toml")
        cfg: AgentConfig | AnchorConfig = load_agent_config(path)
    else:
        path = _write(cfg_dir, _without_key(MINI_ANCHOR, AN_KEY) + line + PEER, "anchor.toml")
        cfg = load_anchor_config(path)
    assert cfg.private_key == raw(priv)


def test_private_key_file_absolute(tmp_path: Path) -> None:
    kf = tmp_path / "abs.key"
    kf.write_text(MH_PRIV)
    cfg = agent(tmp_path, _without_key(MINI_AGENT, MH_KEY).replace(
        'name = "mh"\n', f'name = "mh"\nprivate_key_file = "{kf}"\n'))
    assert cfg.private_key == raw(MH_PRIV)


def _anchor_with_key_file(name: str) -> str:
    return _without_key(MINI_ANCHOR, AN_KEY) + f'private_key_file = "{name}"\n' + PEER


def test_private_key_file_missing(tmp_path: Path) -> None:
    anchor_err(tmp_path, _anchor_with_key_file("nope.key"), "private_key_file", "nope.key")


def test_private_key_file_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "keydir").mkdir()
    anchor_err(tmp_path, _anchor_with_key_file("keydir"), "private_key_file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads mode-000 files")
def test_private_key_file_unreadable(tmp_path: Path) -> None:
    kf = tmp_path / "secret.key"
    kf.write_text(AN_PRIV)
    kf.chmod(0)
    try:
        anchor_err(tmp_path, _anchor_with_key_file("secret.key"), "private_key_file")
    finally:
        kf.chmod(0o600)


BINARY_KEY_FILE = pytest.param(b"\xff\xfe\x00\n", id="binary")


@pytest.mark.parametrize("content", [b"", b"not a key\n", BINARY_KEY_FILE,
                                     base64.b64encode(b"k" * 31), base64.b64encode(b"k" * 33)])
def test_private_key_file_with_garbage(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "bad.key").write_bytes(content)
    e = anchor_err(tmp_path, _anchor_with_key_file("bad.key"), "private_key_file", "base64")
    assert AN_PRIV not in str(e)


def test_private_key_and_file_both_given(tmp_path: Path) -> None:
    (tmp_path / "k").write_text(AN_PRIV)
    anchor_err(tmp_path, MINI_ANCHOR + 'private_key_file = "k"\n' + PEER, "private_key",
               "both")
    (tmp_path / "m").write_text(MH_PRIV)
    agent_err(tmp_path, 'private_key_file = "m"\n' + MINI_AGENT, "private_key", "both")


BAD_KEYS = ["x", "!!!!", "", " ", base64.b64encode(b"k" * 31).decode(),
            base64.b64encode(b"k" * 33).decode(), base64.b64encode(b"k" * 64).decode(),
            (base64.b64encode(b"k" * 32).decode())[:-2] + "%%", "a" * 44,
            "AAAA AAAA" + "A" * 35, base64.b16encode(b"k" * 32).decode()]


@pytest.mark.parametrize("bad", BAD_KEYS)
def test_bad_private_key_text_names_the_key(tmp_path: Path, bad: str) -> None:
    agent_err(tmp_path, MINI_AGENT.replace(MH_KEY, f'private_key = "{bad}"\n'), "private_key",
              "base64")
    anchor_err(tmp_path, MINI_ANCHOR.replace(AN_KEY, f'private_key = "{bad}"\n') + PEER,
               "private_key", "base64")


@pytest.mark.parametrize("bad", BAD_KEYS)
def test_bad_public_keys_name_the_key(tmp_path: Path, bad: str) -> None:
    agent_err(tmp_path, MINI_AGENT.replace(ANCHOR_PUB, f'public_key = "{bad}"\n'),
              "anchor[0].public_key", "base64")
    anchor_err(tmp_path, MINI_ANCHOR + PEER.replace(MH_PUB, bad), "peer[0].public_key", "base64")


@pytest.mark.parametrize("value", ["5", "true", '["x"]', "{ a = 1 }"])
def test_key_of_the_wrong_type(tmp_path: Path, value: str) -> None:
    agent_err(tmp_path, MINI_AGENT.replace(MH_KEY, f"private_key = {value}\n"), "private_key")
    anchor_err(tmp_path, MINI_ANCHOR.replace(AN_KEY, f"private_key_file = {value}\n") + PEER,
               "private_key_file")


def test_key_errors_never_echo_the_secret(tmp_path: Path) -> None:
    # a private key missing its last character: the error must not print the rest of it
    e = anchor_err(tmp_path, MINI_ANCHOR.replace(AN_PRIV, AN_PRIV[:-2]) + PEER, "private_key")
    assert AN_PRIV[:-2] not in str(e)


def test_agent_anchor_without_public_key(tmp_path: Path) -> None:
    agent_err(tmp_path, MINI_AGENT.replace(ANCHOR_PUB, ""), "anchor[0].public_key", "missing")


def test_anchor_without_peer(tmp_path: Path) -> None:
    e = anchor_err(tmp_path, MINI_ANCHOR, "peer", "peer")
    assert e.key == "peer"
    anchor_err(tmp_path, MINI_ANCHOR + "peer = []\n", "peer")


@pytest.mark.parametrize(("peers", "key", "words"), [
    (f'[[peer]]\npublic_key = "{MH_PUB}"\n', "peer[0].name", ("missing",)),
    ('[[peer]]\nname = "mh"\n', "peer[0].public_key", ("missing",)),
    (f'[[peer]]\nname = "has space"\npublic_key = "{MH_PUB}"\n', "peer[0].name", ()),
    (f'[[peer]]\nname = 7\npublic_key = "{MH_PUB}"\n', "peer[0].name", ("string",)),
    (PEER + f'[[peer]]\nname = "mh"\npublic_key = "{PHONE_PUB}"\n', "peer[1].name",
     ("twice",)),
    (PEER + f'[[peer]]\nname = "phone"\npublic_key = "{MH_PUB}"\n', "peer[1].public_key",
     ("another peer",)),
    (PEER + f'[[peer]]\nname = "phone"\npublic_key = "{MH_PUB}  "\n', "peer[1].public_key",
     ("another peer",)),
    (f'[[peer]]\nname = "mh"\npublic_key = "{MH_PUB}"\ncolour = 1\n', "peer[0].colour",
     ("unknown",)),
    ('peer = [1]\n', "peer[0]", ()),
    ('[peer]\nname = "mh"\n', "peer", ()),
])
def test_peer_errors(tmp_path: Path, peers: str, key: str, words: tuple[str, ...]) -> None:
    anchor_err(tmp_path, MINI_ANCHOR + peers, key, *words)


@pytest.mark.parametrize("value", ["1", '"yes"', '"true"', "0", "[true]"])
def test_insecure_plaintext_must_be_a_boolean(tmp_path: Path, value: str) -> None:
    line = f"insecure_plaintext_for_benchmarks = {value}\n"
    agent_err(tmp_path, line + MINI_AGENT, "insecure_plaintext_for_benchmarks", "boolean")
    anchor_err(tmp_path, MINI_ANCHOR + line + PEER, "insecure_plaintext_for_benchmarks",
               "boolean")


def test_insecure_plaintext_true_and_false(tmp_path: Path) -> None:
    for v in (True, False):
        line = f"insecure_plaintext_for_benchmarks = {str(v).lower()}\n"
        assert agent(tmp_path, line + MINI_AGENT).plaintext_data is v
        assert anchor(tmp_path, MINI_ANCHOR + line + PEER).plaintext_data is v


def test_direct_defaults_to_true_and_must_be_a_boolean(tmp_path: Path) -> None:
    assert agent(tmp_path, MINI_AGENT).direct is True
    assert agent(tmp_path, "direct = false\n" + MINI_AGENT).direct is False
    agent_err(tmp_path, 'direct = "no"\n' + MINI_AGENT, "direct", "boolean")


# -- egress filter (anchor) ------------------------------------------------------------------


def _nets(*cidrs: str) -> tuple[ipaddress.IPv4Network, ...]:
    return tuple(ipaddress.IPv4Network(c) for c in cidrs)


def test_egress_defaults(tmp_path: Path) -> None:
    cfg = anchor(tmp_path, MINI_ANCHOR + PEER)
    assert cfg.allow_egress == ()
    deny = set(cfg.deny_egress)
    for must in ("169.254.0.0/16", "127.0.0.0/8", "0.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12",
                 "192.168.0.0/16", "100.64.0.0/10", "224.0.0.0/4", "240.0.0.0/4"):
        assert ipaddress.IPv4Network(must) in deny, must
    # the cloud metadata address and loopback are covered
    for addr in ("169.254.169.254", "127.0.0.1", "10.9.8.7"):
        assert any(ipaddress.IPv4Address(addr) in n for n in cfg.deny_egress)
    assert not any(ipaddress.IPv4Address("198.51.100.7") in n for n in cfg.deny_egress)


def test_egress_lists_are_normalised(tmp_path: Path) -> None:
    cfg = anchor(tmp_path, MINI_ANCHOR
                 + 'allow_egress = ["169.254.169.254", "10.1.2.3/8", " 192.168.1.0/24 "]\n'
                 + 'deny_egress = ["198.51.100.7", "203.0.113.77/24"]\n' + PEER)
    assert cfg.allow_egress == _nets("169.254.169.254/32", "10.0.0.0/8", "192.168.1.0/24")
    assert cfg.deny_egress == _nets("198.51.100.7/32", "203.0.113.0/24")
    assert all(isinstance(n, ipaddress.IPv4Network) for n in cfg.allow_egress + cfg.deny_egress)


def test_empty_deny_egress_replaces_the_default(tmp_path: Path) -> None:
    cfg = anchor(tmp_path, MINI_ANCHOR + "deny_egress = []\nallow_egress = []\n" + PEER)
    assert cfg.deny_egress == () and cfg.allow_egress == ()


@pytest.mark.parametrize("key", ["allow_egress", "deny_egress"])
@pytest.mark.parametrize(("value", "words"), [
    ('"10.0.0.0/8"', ("list",)),
    ("[10]", ()),
    ('["10.0.0.0/33"]', ("10.0.0.0/33",)),
    ('["banana"]', ("banana",)),
    ('["2001:db8::/129"]', ()),
    ('["10.0.0.0/8", true]', ()),
    ("true", ("boolean",)),
])
def test_egress_errors(tmp_path: Path, key: str, value: str, words: tuple[str, ...]) -> None:
    anchor_err(tmp_path, MINI_ANCHOR + f"{key} = {value}\n" + PEER, key, *words)


def test_agent_has_no_egress_or_peer_keys(tmp_path: Path) -> None:
    agent_err(tmp_path, 'deny_egress = ["10.0.0.0/8"]\n' + MINI_AGENT, "deny_egress", "unknown")
    agent_err(tmp_path, MINI_AGENT + PEER, "peer", "unknown")


# -- Rule.matches -----------------------------------------------------------------------------

IP_IN = ipaddress.IPv4Address("198.51.100.7").packed
IP_OUT = ipaddress.IPv4Address("192.0.2.1").packed


def test_rule_matches() -> None:
    web = Rule(0, "web", "tcp", ipaddress.IPv4Network("198.51.100.0/24"), (8080, 8080))
    assert web.matches(6, IP_IN, 40000, 8080)
    assert not web.matches(17, IP_IN, 40000, 8080)     # wrong protocol
    assert not web.matches(6, IP_OUT, 40000, 8080)     # outside dst
    assert not web.matches(6, IP_IN, 40000, 8081)      # wrong port
    rng = Rule(1, "rng", "udp", None, (1000, 2000), (5000, 5001))
    assert rng.matches(17, IP_OUT, 5000, 1000) and rng.matches(17, IP_OUT, 5001, 2000)
    assert not rng.matches(17, IP_OUT, 4999, 1500)
    assert not rng.matches(17, IP_OUT, 5000, 999) and not rng.matches(17, IP_OUT, 5000, 2001)
    anyr = Rule(2, "any")
    for proto in (1, 6, 17, 47):
        assert anyr.matches(proto, IP_OUT, 0, 0)
    icmp = Rule(3, "ping", "icmp", ipaddress.IPv4Network("192.0.2.0/24"))
    assert icmp.matches(1, IP_OUT, 7, 7) and not icmp.matches(6, IP_OUT, 7, 7)
    assert (web.proto_number, anyr.proto_number, icmp.proto_number) == (6, None, 1)


def test_rule_matches_from_loaded_config(tmp_path: Path) -> None:
    cfg = agent(tmp_path, SPEC_AGENT)
    (r,) = cfg.rules
    assert r.matches(6, IP_IN, 1234, 8080)
    assert not r.matches(6, IP_OUT, 1234, 8080)


@pytest.mark.parametrize("table", [250, 252])
def test_interface_tables_avoid_reserved_tables(tmp_path: Path, table: int) -> None:
    ifaces = "".join(f'[[interface]]\nname = "wan{i}"\n' for i in range(1, 5))
    agent_err(tmp_path, f"table = {table}\n{MH_KEY}{ifaces}"
                        '[[anchor]]\nname = "a"\naddress = "1.2.3.4"\n' + ANCHOR_PUB, "table")
