"""systemd/tgdaemon@.service: tgdaemon.service with exactly the differences an instance of a
fleet needs, and valid for systemd itself (``systemd-analyze verify`` on an instance)."""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path

from tests.systemd.test_unit import UNIT, analyze, parse_unit, verify_problems

TEMPLATE = UNIT.with_name("tgdaemon@.service")
__all__ = ["analyze"]  # the fixture, re-used


def changed_lines() -> list[str]:
    diff = difflib.unified_diff(UNIT.read_text().splitlines(), TEMPLATE.read_text().splitlines(),
                                lineterm="", n=0)
    return [line for line in diff
            if line[:1] in "+-" and not line.startswith(("+++", "---", "+#", "-#"))]


def test_template_is_the_unit_plus_the_instance_id() -> None:
    assert sorted(changed_lines()) == sorted([
        "-Description=tgdaemon - supervised Telegram user-account connections",
        "-ExecStart=/usr/bin/tgdaemon run --config /etc/tgdaemon/tgdaemon.toml",
        "+Description=tgdaemon instance %i - supervised Telegram user-account connections "
        "(fleet)",
        "+ExecStart=/usr/bin/tgdaemon run --config /etc/tgdaemon/instances/%i.toml",
        "+Environment=TGDAEMON_INSTANCE=%i",
    ])
    service = parse_unit(TEMPLATE.read_text())["Service"]
    # the id the daemon reads (tgdaemon/config.py INSTANCE_ENV), from the instance name
    assert "TGDAEMON_INSTANCE=%i" in service["Environment"]


def test_an_instance_verifies(analyze: str, tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "tgdaemon"
    text = re.sub(r"^ExecStart=/usr/bin/tgdaemon ", f"ExecStart={script} ",
                  TEMPLATE.read_text(), flags=re.M)
    path = tmp_path / "tgdaemon@7.service"
    path.write_text(text)
    assert verify_problems(analyze, path) == []
