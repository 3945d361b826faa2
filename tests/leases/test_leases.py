"""The lease decisions as tables (tgdaemon/leases.py)."""

from __future__ import annotations

import pytest

from tgdaemon.leases import (
    Balance,
    ClusterView,
    LeaseTiming,
    MoveBudget,
    RenewalResult,
    balance,
    default_close_margin,
    disconnect_delay,
    fair_share,
    heartbeat_due,
    heartbeat_room,
    lag_allowance,
    must_close,
    next_renewal_in,
    renewal_result,
    timing_problems,
    transit_allowance,
)


@pytest.mark.parametrize(("accounts", "live", "share"), [
    (300, 3, 100),
    (301, 3, 101),
    (300, 4, 75),
    (0, 3, 0),
    (10, 0, 10),  # nobody live yet (we are about to register): all of it
    (1, 5, 1),
])
def test_fair_share(accounts: int, live: int, share: int) -> None:
    assert fair_share(accounts, live) == share


@pytest.mark.parametrize(("view", "capacity", "moves", "expected"), [
    # alone in an empty fleet: claim everything there is
    (ClusterView(300, 1, 0, 300), 10_000, 0, Balance(claim=300)),
    # three instances: a third each, even with no moves left (claims are not moves)
    (ClusterView(300, 3, 0, 300), 10_000, 0, Balance(claim=100)),
    # capacity caps the claim
    (ClusterView(300, 1, 0, 300), 50, 0, Balance(claim=50)),
    # only what is claimable
    (ClusterView(300, 3, 90, 4), 10_000, 0, Balance(claim=4)),
    # at the share: nothing
    (ClusterView(300, 3, 100, 0), 10_000, 60, Balance()),
    # a fourth joined: give back 25, bounded by the moves allowed now
    (ClusterView(300, 4, 100, 0), 10_000, 60, Balance(release=25)),
    (ClusterView(300, 4, 100, 0), 10_000, 10, Balance(release=10)),
    (ClusterView(300, 4, 100, 0), 10_000, 0, Balance()),
    # a survivor after a death: claim up to the new share
    (ClusterView(300, 2, 100, 100), 10_000, 0, Balance(claim=50)),
    # capacity below what we hold (lowered by a restart with a new config): shed it
    (ClusterView(300, 1, 300, 0), 200, 1000, Balance(release=100)),
    # accounts disabled: share shrinks
    (ClusterView(0, 2, 5, 0), 10_000, 3, Balance(release=3)),
])
def test_balance(view: ClusterView, capacity: int, moves: int, expected: Balance) -> None:
    assert balance(view, capacity, moves) == expected


def test_move_budget_refills_per_minute_and_caps() -> None:
    b = MoveBudget(60, now=0.0)
    assert b.available(0.0) == 60
    b.spend(60)
    assert b.available(0.0) == 0
    assert b.available(10.0) == 10  # one a second
    b.spend(10)
    assert b.available(1000.0) == 60  # capped at a minute's worth
    assert MoveBudget(0, now=0.0).available(100.0) == 0


@pytest.mark.parametrize(("ttl", "renew", "margin", "ok"), [
    (60, 10, 10, True),
    (60, 25, 10, True),
    (60, 26, 10, False),  # one late renewal would close everything
    (6, 1, 1, True),
    (0, 1, 1, False),
    (10, 0, 1, False),
])
def test_timing_problems(ttl: float, renew: float, margin: float, ok: bool) -> None:
    assert (timing_problems(ttl, renew, margin) == []) is ok
    if not ok:
        with pytest.raises(ValueError, match="lease"):
            LeaseTiming(ttl, renew, margin)


def test_deadline_counts_from_the_renewal_start() -> None:
    t = LeaseTiming(ttl=60, renew_interval=10, close_margin=10)
    until = t.valid_until(100.0)
    assert until == 150.0
    assert not must_close(149.9, until)
    assert must_close(150.0, until)


@pytest.mark.parametrize(("now", "until", "allowance", "delay"), [
    (100.0, 150.0, 0, 50), (100.0, 100.5, 0, 1), (100.0, 90.0, 0, 1), (100.0, 130.9, 0, 30),
    (100.0, 150.0, 2, 48), (100.0, 112.5, 1.25, 11), (100.0, 101.0, 2, 1)])
def test_disconnect_delay(now: float, until: float, allowance: float, delay: int) -> None:
    assert disconnect_delay(now, until, allowance) == delay


@pytest.mark.parametrize(("margin", "allowance"), [(10, 2), (4, 2), (2.5, 1.25), (1, 0.5)])
def test_transit_allowance(margin: float, allowance: float) -> None:
    assert transit_allowance(margin) == allowance
    assert LeaseTiming(60, 10, margin).transit_allowance == allowance


@pytest.mark.parametrize(("ttl", "renew", "room"), [(60, 10, 38), (15, 1, 10.25), (6, 1, 3.5)])
def test_heartbeat_room(ttl: float, renew: float, room: float) -> None:
    """ttl - close margin - renew interval - transit allowance."""
    assert heartbeat_room(ttl, renew) == room


@pytest.mark.parametrize(("ttl", "renew", "allowance"), [
    (60, 10, 38 / 3), (15, 1, 10.25 / 3), (12, 1, 8 / 3), (120, 10, 98 / 3)])
def test_lag_allowance(ttl: float, renew: float, allowance: float) -> None:
    """A third of the heartbeat room: at the defaults ~12.7 s of lag tolerated."""
    assert lag_allowance(ttl, renew) == pytest.approx(allowance)
    assert LeaseTiming(ttl, renew, default_close_margin(ttl)).lag_allowance == pytest.approx(
        allowance)


@pytest.mark.parametrize(("began", "due", "armed_until", "allowance", "interval", "at"), [
    # the defaults, a heartbeat armed just before a renewal (38 s of room): pulled in to 25.3 s
    (0.0, 33.0, 38.0, 38 / 3, 30.0, 38 - 38 / 3),
    # armed just after a renewal (48 s): the usual jittered time is soon enough
    (0.0, 33.0, 48.0, 38 / 3, 30.0, 33.0),
    (0.0, 27.0, 42.0, 38 / 3, 30.0, 27.0),
    # renewals failing, the lease's deadline stuck: never sooner than half an interval
    (100.0, 130.0, 105.0, 12.0, 30.0, 115.0),
    (100.0, 130.0, float("inf"), 12.0, 30.0, 130.0),  # nothing armed yet
    # test timings (TTL 12, renew 1, heartbeat 6.3): room 8 s
    (0.0, 6.9, 8.0, 8 / 3, 6.3, 8 - 8 / 3),
])
def test_heartbeat_due(began: float, due: float, armed_until: float, allowance: float,
                       interval: float, at: float) -> None:
    assert heartbeat_due(began, due, armed_until, allowance, interval) == pytest.approx(at)


@pytest.mark.parametrize(("started", "now", "interval", "delay"), [
    (100.0, 100.3, 10.0, 9.7),  # a 0.3 s statement: the period stays 10 s
    (100.0, 105.0, 10.0, 5.0),
    (100.0, 109.0, 10.0, 2.5),  # slow: a quarter interval at least
    (100.0, 130.0, 10.0, 2.5),  # slower than the interval: not at once either
    (100.0, 100.0, 1.0, 1.0)])
def test_next_renewal_in(started: float, now: float, interval: float, delay: float) -> None:
    assert next_renewal_in(started, now, interval) == pytest.approx(delay)


@pytest.mark.parametrize(("ttl", "margin"), [(60, 10), (6, 1), (3, 1), (30, 5)])
def test_default_close_margin(ttl: float, margin: float) -> None:
    assert default_close_margin(ttl) == margin


@pytest.mark.parametrize(("held", "renewed", "result"), [
    (set(), set(), RenewalResult.OK),
    ({"a", "b"}, {"a", "b"}, RenewalResult.OK),
    ({"a", "b"}, {"a"}, RenewalResult.LOST),
])
def test_renewal_result(held: set[str], renewed: set[str], result: RenewalResult) -> None:
    assert renewal_result(held, renewed) is result
