"""lifecycle.py as tables: every (category, attempt, policy) -> (action, delay, next state),
the state groupings, heartbeat timing and the watchdog's decision."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tgdaemon.config import PolicyConfig, RetryLimits
from tgdaemon.lifecycle import (
    ENDED_STATES,
    HEARTBEAT_JITTER,
    MAX_MIGRATIONS,
    OWNED_STATES,
    PARKED_STATES,
    WATCHED_STATES,
    Action,
    Category,
    Classified,
    State,
    heartbeat_delay,
    longest_heartbeat_gap,
    recovery_for,
    watchdog_restarts,
)

DEFAULT = PolicyConfig()
FIXED = PolicyConfig(backoff_jitter="none", backoff_base=1.0, backoff_cap=30.0)
SHORT_FLOOD = PolicyConfig(flood_sleep_max=10)
NO_LIMITS = PolicyConfig(retry_limits=RetryLimits(unknown=0, client=0))

A, S = Action, State
# (classified, attempt, policy) -> (action, min delay, max delay, next state)
TABLE = [
    (Classified(Category.NETWORK, "ConnectionError", "m"), 0, FIXED, A.RETRY, 1, 1,
     S.RECONNECTING),
    (Classified(Category.NETWORK, "ConnectionError", "m"), 3, FIXED, A.RETRY, 8, 8,
     S.RECONNECTING),
    (Classified(Category.NETWORK, "ConnectionError", "m"), 50, FIXED, A.RETRY, 30, 30,
     S.RECONNECTING),
    (Classified(Category.NETWORK, "ConnectionError", "m"), 4, DEFAULT, A.RETRY, 0, 16,
     S.RECONNECTING),
    (Classified(Category.SERVER, "RPC_CALL_FAIL", "m"), 2, FIXED, A.RETRY, 4, 4,
     S.RECONNECTING),
    (Classified(Category.FLOOD_WAIT, "FLOOD_WAIT", "m", wait_seconds=10), 0, SHORT_FLOOD,
     A.WAIT, 10, 11, S.FLOOD_WAIT),
    (Classified(Category.FLOOD_WAIT, "FLOOD_WAIT", "m", wait_seconds=11), 0, SHORT_FLOOD,
     A.RETRY, 11, 12, S.FLOOD_WAIT),
    (Classified(Category.FLOOD_WAIT, "FLOOD_WAIT", "m", wait_seconds=0), 7, DEFAULT,
     A.WAIT, 1, 2, S.FLOOD_WAIT),
    (Classified(Category.AUTH, "SESSION_REVOKED", "m", park_state=S.NEEDS_LOGIN), 0, DEFAULT,
     A.PARK, 0, 0, S.NEEDS_LOGIN),
    (Classified(Category.AUTH, "USER_DEACTIVATED_BAN", "m", park_state=S.BANNED), 9, DEFAULT,
     A.PARK, 0, 0, S.BANNED),
    (Classified(Category.AUTH, "AUTH_KEY_DUPLICATED", "m", park_state=S.DUPLICATED), 0,
     DEFAULT, A.PARK, 0, 0, S.DUPLICATED),
    (Classified(Category.AUTH, "NOT_AUTHORIZED", "m"), 0, DEFAULT, A.PARK, 0, 0,
     S.NEEDS_LOGIN),
    (Classified(Category.MIGRATE, "USER_MIGRATE", "m", new_dc=2), 0, DEFAULT, A.MIGRATE, 0, 0,
     S.RECONNECTING),
    (Classified(Category.MIGRATE, "USER_MIGRATE", "m", new_dc=2), MAX_MIGRATIONS, DEFAULT,
     A.FAIL, 0, 0, S.STOPPED),
    (Classified(Category.MIGRATE, "FILE_MIGRATE", "m", new_dc=2), 0, DEFAULT, A.FAIL, 0, 0,
     S.STOPPED),
    (Classified(Category.CLIENT, "PEER_ID_INVALID", "m"), 0, DEFAULT, A.FAIL, 0, 0, S.STOPPED),
    (Classified(Category.CLIENT, "PEER_ID_INVALID", "m"), 0, NO_LIMITS, A.RETRY, 0, 1,
     S.RECONNECTING),
    (Classified(Category.UNKNOWN, "RuntimeError", "m"), 8, FIXED, A.RETRY, 30, 30,
     S.RECONNECTING),
    (Classified(Category.UNKNOWN, "RuntimeError", "m"), 9, FIXED, A.FAIL, 0, 0, S.STOPPED),
]


@pytest.mark.parametrize(("c", "attempt", "policy", "action", "low", "high", "state"), TABLE)
def test_recovery_table(c: Classified, attempt: int, policy: PolicyConfig, action: Action,
                        low: float, high: float, state: State) -> None:
    r = recovery_for(c, attempt, policy, random.Random(attempt))
    assert (r.action, r.next_state) == (action, state)
    assert low <= r.delay <= high
    assert r.reason.startswith(c.code)
    assert (r.new_dc is not None) == (action is Action.MIGRATE)


# (category, attempt, seconds the failure has persisted) -> delay, backoff_cap 30, no jitter:
# a young network failure is retried within backoff_base whatever its attempt number; one that
# has persisted backoff_cap seconds, and every other category, back off exponentially.
NET, SRV = Category.NETWORK, Category.SERVER
YOUNG_FAILURES = [
    (NET, 0, 0.0, 1),
    (NET, 5, 0.0, 1),
    (NET, 40, 12.0, 1),  # a 12 s outage: still retried every second
    (NET, 5, 29.9, 1),
    (NET, 5, 30.0, 30),  # persisted backoff_cap: the exponential schedule, capped
    (NET, 3, 31.0, 8),
    (NET, 3, math.inf, 8),  # age unknown: treated as persisting
    (SRV, 3, 0.0, 8),  # a server error backs off at once (the server asks for it)
    (Category.UNKNOWN, 3, 0.0, 8),
]


@pytest.mark.parametrize(("category", "attempt", "persisted", "delay"), YOUNG_FAILURES)
def test_young_network_failures_retry_fast(category: Category, attempt: int,
                                           persisted: float, delay: float) -> None:
    r = recovery_for(Classified(category, "X", "m"), attempt, FIXED, random.Random(),
                     persisted=persisted)
    assert (r.action, r.delay, r.next_state) == (Action.RETRY, delay, S.RECONNECTING)


def test_young_network_failures_keep_full_jitter() -> None:
    delays = [recovery_for(Classified(Category.NETWORK, "X", "m"), 9, DEFAULT,
                           random.Random(s), persisted=5.0).delay for s in range(200)]
    assert 0 <= min(delays) < 0.1 < 0.9 < max(delays) <= DEFAULT.backoff_base


def test_young_network_failures_keep_the_retry_limit() -> None:
    limited = dataclasses.replace(DEFAULT, retry_limits=RetryLimits(network=3))
    c = Classified(Category.NETWORK, "X", "m")
    assert recovery_for(c, 1, limited, random.Random(), persisted=1.0).action is Action.RETRY
    assert recovery_for(c, 2, limited, random.Random(), persisted=1.0).action is Action.FAIL


@given(category=st.sampled_from(Category), attempt=st.integers(0, 10_000),
       seconds=st.integers(0, 10**6), sleep_max=st.integers(0, 10**6),
       seed=st.integers(0, 2**32), new_dc=st.one_of(st.none(), st.integers(1, 5)),
       park=st.sampled_from([None, *State]))
def test_every_recovery_is_coherent(category: Category, attempt: int, seconds: int,
                                    sleep_max: int, seed: int, new_dc: int | None,
                                    park: State | None) -> None:
    """Whatever comes in, the action and the state shown agree, and nothing waits forever."""
    c = Classified(category, "USER_MIGRATE", "m", wait_seconds=seconds, new_dc=new_dc,
                   park_state=park)
    r = recovery_for(c, attempt, PolicyConfig(flood_sleep_max=sleep_max), random.Random(seed))
    assert 0 <= r.delay < math.inf
    expected = {
        Action.PARK: PARKED_STATES,
        Action.FAIL: {State.STOPPED},
        Action.MIGRATE: {State.RECONNECTING},
        Action.WAIT: {State.FLOOD_WAIT},
        Action.RETRY: {State.RECONNECTING, State.FLOOD_WAIT},
    }[r.action]
    assert r.next_state in expected
    if r.next_state is State.FLOOD_WAIT:
        assert r.delay >= max(seconds, 1)
        assert (r.action is Action.WAIT) == (seconds <= sleep_max)


def test_negative_attempt_is_a_bug() -> None:
    with pytest.raises(ValueError, match="attempt"):
        recovery_for(Classified(Category.NETWORK, "X", "m"), -1, DEFAULT, random.Random())
    with pytest.raises(ValueError, match="persisted"):
        recovery_for(Classified(Category.NETWORK, "X", "m"), 0, DEFAULT, random.Random(),
                     persisted=-1.0)


def test_retry_limits_name_categories() -> None:
    names = [f.name for f in dataclasses.fields(RetryLimits)]
    assert set(names) <= {c.value for c in Category}
    assert RetryLimits(network=4).for_category(Category.NETWORK) == 4
    assert RetryLimits().for_category(Category.AUTH) == 0  # never retried: no limit


def test_state_groupings() -> None:
    assert set(State) == OWNED_STATES | ENDED_STATES
    assert not OWNED_STATES & ENDED_STATES
    assert PARKED_STATES <= ENDED_STATES
    assert WATCHED_STATES <= OWNED_STATES
    assert State.FLOOD_WAIT in OWNED_STATES - WATCHED_STATES


def test_heartbeat_timing() -> None:
    delays = [heartbeat_delay(30.0, random.Random(s)) for s in range(500)]
    assert 30 * (2 - HEARTBEAT_JITTER) <= min(delays) < 28 < 32 < max(delays)
    assert max(delays) <= 30 * HEARTBEAT_JITTER
    policy = PolicyConfig(heartbeat_interval=30.0, request_timeout=15.0)
    assert longest_heartbeat_gap(policy) == pytest.approx(30 * HEARTBEAT_JITTER + 15)


# (state, now, last progress, waiting until) with stale_after 10 -> restart?
WATCHDOG = [
    (S.CONNECTED, 100.0, 95.0, None, False),  # recent progress
    (S.CONNECTED, 100.0, 89.0, None, True),  # silent for 11 s
    (S.STARTING, 100.0, 89.0, None, True),
    (S.CONNECTING, 100.0, 89.0, None, True),
    (S.RECONNECTING, 100.0, 89.0, None, True),
    (S.RECONNECTING, 100.0, 50.0, 95.0, False),  # in a backoff that ended 5 s ago
    (S.RECONNECTING, 100.0, 50.0, 89.0, True),  # its backoff ended 11 s ago
    (S.CONNECTING, 100.0, 0.0, math.inf, False),  # queued for a connect slot
    (S.FLOOD_WAIT, 10_000.0, 0.0, None, False),  # waits for the server's deadline
    (S.NEEDS_LOGIN, 10_000.0, 0.0, None, False),  # parked on purpose
    (S.BANNED, 10_000.0, 0.0, None, False),
    (S.DUPLICATED, 10_000.0, 0.0, None, False),
    (S.STOPPED, 10_000.0, 0.0, None, False),
    (S.DISABLED, 10_000.0, 0.0, None, False),
]


@pytest.mark.parametrize(("state", "now", "progress", "waiting", "restart"), WATCHDOG)
def test_watchdog_table(state: State, now: float, progress: float, waiting: float | None,
                        restart: bool) -> None:
    assert watchdog_restarts(state, now=now, last_progress=progress, waiting_until=waiting,
                             stale_after=10.0) is restart
