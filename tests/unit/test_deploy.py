"""deploy/ examples only use flags that mesh-proxy really has."""
from __future__ import annotations

import configparser
import re
from pathlib import Path

from proxy.main import build_parser

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def known_flags() -> set[str]:
    return {opt for action in build_parser()._actions for opt in action.option_strings}


def test_systemd_units_use_known_flags():
    units = list(DEPLOY.glob("systemd/*.service"))
    assert units
    for unit in units:
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.read(unit)
        command = parser["Service"]["ExecStart"]
        assert command.split()[0].endswith("mesh-proxy")
        used = set(re.findall(r"(--[a-z-]+)", command))
        assert used <= known_flags(), used - known_flags()
        assert {"--listen", "--backend"} <= used
