"""Config keys for living beside Tailscale and wg-quick: `mark_mask`, `rule_priority`."""

from __future__ import annotations

from pathlib import Path

import pytest

from upmt_tun.config import ConfigError

from .test_config import ANCHOR_PUB, MH_KEY, agent

BASE = MH_KEY + '[[anchor]]\nname = "an1"\naddress = "198.51.100.1"\n' + ANCHOR_PUB


def test_defaults_avoid_tailscale_and_wg_quick(tmp_path: Path) -> None:
    cfg = agent(tmp_path, BASE)
    assert cfg.mark_mask == 0xFFFF
    assert cfg.mark_mask & 0xFF0000 == 0               # Tailscale's mark bits
    assert cfg.rule_priority + 1 < 5210                # before Tailscale's first rule
    assert not cfg.fwmark <= 0xCA6C <= cfg.fwmark + 17     # never wg-quick's 51820


def test_configured_mask_and_priority(tmp_path: Path) -> None:
    cfg = agent(tmp_path, "fwmark = 0x100\nmark_mask = 0x3ff\nrule_priority = 100\n" + BASE)
    assert (cfg.fwmark, cfg.mark_mask, cfg.rule_priority) == (0x100, 0x3FF, 100)


@pytest.mark.parametrize("line,key", [
    ("mark_mask = 0x1ffff", "mark_mask"),            # above the low 16 bits
    ("mark_mask = 0xff00", "mark_mask"),             # does not hold 0x5550..0x5561
    ("mark_mask = 0", "mark_mask"),
    ("rule_priority = 0", "rule_priority"),
    ("rule_priority = 32765", "rule_priority"),
    ('rule_priority = "5200"', "rule_priority"),
])
def test_bad_values_name_the_key(tmp_path: Path, line: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        agent(tmp_path, line + "\n" + BASE)
    assert e.value.key == key
    assert "\n" not in str(e.value)
