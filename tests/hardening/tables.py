"""Reading the CLI's tables in tests."""

from __future__ import annotations

import re


def table_column(out: str, column: str, row: int = 0) -> str:
    """A cell of a CLI table (``tgdaemon accounts``) by column name: cells may hold spaces
    (USER is "id @username"), so they are cut at the header's column offsets."""
    lines = out.splitlines()
    header = lines[0]
    start = header.index(column)
    later = [m.start() + 2 for m in re.finditer(r"  \S", header) if m.start() + 2 > start]
    return lines[1 + row][start:later[0] if later else None].strip()
