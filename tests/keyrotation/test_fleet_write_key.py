"""Which key a fleet instance writes under: the newest of its ring that every live instance
holds (tgdaemon.keyrotation.fleet_write_key), as a table."""

from __future__ import annotations

import pytest

from tgdaemon.keyrotation import fleet_write_key

RING = ("k3", "k2", "k1")  # active first, then newest to oldest


@pytest.mark.parametrize(("others", "expected"), [
    ([], "k3"),  # alone in the fleet
    ([("k3", "k2", "k1")], "k3"),  # everybody has the new ring
    ([("k2", "k1")], "k2"),  # one instance still on the previous ring
    ([("k3", "k2", "k1"), ("k1",)], "k1"),  # one far behind: the oldest shared key
    ([("k4", "k3", "k2")], "k3"),  # another is ahead: our active key is shared
    ([("k9",)], "k3"),  # nothing shared (misconfigured): our own active key
])
def test_write_key(others: list[tuple[str, ...]], expected: str) -> None:
    assert fleet_write_key(RING, others) == expected
