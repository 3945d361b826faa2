"""Reachability: one probe at a time while a route is down; a success wakes that route's
waiters only."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from tgdaemon.reachability import Reachability, may_probe, probe_spacing
from tgdaemon.wheel import WAKE_BATCH

# (route down, next probe at, now) -> may this account attempt?
MAY_PROBE = [
    (False, 100.0, 0.0, True),  # not known down: every account retries on its own
    (True, 100.0, 99.9, False),  # a probe runs, or the last one failed just now
    (True, 100.0, 100.0, True),
    (True, 0.0, 5.0, True),
]


@pytest.mark.parametrize(("down", "next_probe", "now", "ok"), MAY_PROBE)
def test_may_probe_table(down: bool, next_probe: float, now: float, ok: bool) -> None:
    assert may_probe(down, next_probe, now) is ok


# (the failed probe's own backoff, probe_every) -> seconds until the next probe
PROBE_SPACING = [
    (0.3, 1.0, 0.3),  # a young failure retries within backoff_base anyway
    (27.0, 1.0, 1.0),  # a backoff grown during the outage does not space the probes
    (5.0, 10.0, 5.0),
    (0.0, 1.0, 0.0),
    (4.0, 0.0, 0.0),
]


@pytest.mark.parametrize(("retry_in", "every", "spacing"), PROBE_SPACING)
def test_probe_spacing_table(retry_in: float, every: float, spacing: float) -> None:
    assert probe_spacing(retry_in, every) == spacing


def test_a_long_backoff_does_not_delay_the_next_probe() -> None:
    """After a long outage the failing probe's own backoff is up to backoff_cap: the route is
    still probed every probe_every, so the fleet is back within that of the server."""
    now = [0.0]
    reach = Reachability(clock=lambda: now[0])
    reach.failed("dc2", retry_in=27.0, probe_every=1.0)
    assert not reach.claim("dc2", hold=15.0)
    now[0] = 1.0
    assert reach.claim("dc2", hold=15.0)
    with pytest.raises(ValueError, match=">= 0"):
        probe_spacing(-1.0, 1.0)


def test_one_probe_at_a_time_while_a_route_is_down() -> None:
    now = [0.0]
    reach = Reachability(clock=lambda: now[0])
    assert reach.claim("dc2", hold=15.0)  # nothing known: go
    reach.failed("dc2", retry_in=0.5)
    assert reach.is_down("dc2")
    assert not reach.claim("dc2", hold=15.0)  # the failed probe's own backoff first
    now[0] = 0.5
    assert reach.claim("dc2", hold=15.0)  # the next probe
    assert not reach.claim("dc2", hold=15.0)  # ... and nobody beside it
    assert reach.claim("dc4", hold=15.0)  # another route is not affected
    now[0] = 15.5
    assert reach.claim("dc2", hold=15.0)  # a probe that never reported is replaced
    reach.failed("dc2", retry_in=2.0)
    assert reach.failures("dc2") == 2  # every account's failures count
    reach.reached("dc2")
    assert not reach.is_down("dc2")
    assert reach.failures("dc2") == 0
    assert reach.claim("dc2", hold=15.0)  # up: everyone
    assert reach.claim("dc2", hold=15.0)


async def test_a_success_wakes_the_sleepers_of_its_route_only(wait_until) -> None:
    reach = Reachability()
    a = [asyncio.create_task(reach.sleep((2, None), 60.0)) for _ in range(3)]
    other = asyncio.create_task(reach.sleep((4, None), 60.0))
    await wait_until(lambda: reach.sleeping((2, None)) == 3 and reach.sleeping((4, None)) == 1,
                     5, "every task asleep")
    assert reach.reached((2, None)) == 3
    assert await asyncio.gather(*a) == [False, False, False]  # woken, not run out
    assert not other.done()
    assert reach.sleeping((2, None)) == 0
    assert reach.reached((2, None)) == 0  # nobody left to wake
    other.cancel()
    await asyncio.gather(other, return_exceptions=True)
    assert reach.sleeping((4, None)) == 0  # a cancelled sleeper leaves nothing behind
    assert not reach._routes  # nothing kept for routes that are up and idle


async def test_a_sleep_runs_out_by_itself() -> None:
    reach = Reachability()
    assert await reach.sleep("r", 0.01) is True
    assert await reach.sleep("r", 0) is True
    assert reach.sleeping("r") == 0


async def test_routes_back_at_once_are_woken_a_batch_per_loop_iteration(wait_until) -> None:
    """A success on routes with thousands waiting does not resume them all in one
    event-loop iteration (the loop would stall for every other account), however many
    routes (DCs) come back together: the batch is shared."""
    reach = Reachability()
    n = 2 * WAKE_BATCH + 10
    sleepers = [asyncio.create_task(reach.sleep(dc, 60.0)) for dc in ("dc1", "dc2")
                for _ in range(n)]
    await wait_until(lambda: reach.sleeping("dc1") == reach.sleeping("dc2") == n, 5,
                     "all asleep")
    assert reach.reached("dc1") == n
    assert reach.reached("dc2") == n
    woken = [sum(1 for t in sleepers if t.done())]
    while woken[-1] < 2 * n:
        await asyncio.sleep(0)  # one event-loop iteration
        woken.append(sum(1 for t in sleepers if t.done()))
    assert max(b - a for a, b in itertools.pairwise([0, *woken])) <= WAKE_BATCH
    assert all(t.result() is False for t in sleepers)
