"""How ``make test`` spreads the suite over pytest-xdist workers (``-n 2 --dist loadgroup``).

The suite mostly waits (timers, lease windows, process start-ups), so two workers on two
cores about halve it. The tests in :data:`GROUPS` are kept together on ONE worker, one after
another: "heavy" ones saturate the machine by themselves (hundreds of accounts, several
daemon processes, bench smoke runs, a booted systemd) or measure lag and pacing, so no two of
them ever overlap; a module with module-scoped fixtures is one group, so its fixture is built
once. Every other test is scheduled on its own, wherever a worker is free.

xdist's own ``loadgroup`` reads ``xdist_group`` marks through a node id suffix that pytest 9
no longer honours; the groups are therefore named here, by node id prefix, and read by
:class:`GroupScheduling` in the controller.
"""

from __future__ import annotations

from typing import Any

#: Group name -> node id prefixes (paths from the repository root, optionally ``::test``).
GROUPS: dict[str, tuple[str, ...]] = {
    "heavy": (
        "tests/fleet/test_fleet_processes.py",
        "tests/fleet/test_fleet_lag.py",
        "tests/bench/test_bench_smoke.py",
        "tests/bench/test_cluster_smoke.py",
        "tests/bench/test_metrics_scrape_smoke.py",
        "tests/api/test_api_process.py::test_burst_of_1000_calls",
        # bounds on lag and pacing, measured in real processes
        "tests/store/test_shared_write_lock.py",
        "tests/daemon/test_failover.py::test_short_outage_every_account_back_within",
    ),
    "systemd-container": ("tests/systemd/test_systemd_container.py",),
    "systemd-unit": ("tests/systemd/test_unit.py",),
}


def group_of(nodeid: str) -> str | None:
    for group, prefixes in GROUPS.items():
        if nodeid.startswith(prefixes):
            return group
    return None


def make_scheduler(config: Any, log: Any) -> Any:
    """xdist's load-scope scheduler with :data:`GROUPS` as the scopes (every other test is a
    scope of its own). Scopes go out largest first, so the heavy group starts at once."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid) or nodeid

    return GroupScheduling(config, log)
