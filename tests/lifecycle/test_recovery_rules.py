"""recovery_for(): the strategy table, retry limits, flood waits, migrations."""

from __future__ import annotations

import random

import pytest

from tgdaemon.config import PolicyConfig, RetryLimits
from tgdaemon.lifecycle import (
    MAX_MIGRATIONS,
    Action,
    Category,
    Classified,
    Recovery,
    State,
    recovery_for,
)

POLICY = PolicyConfig()
NONE_JITTER = PolicyConfig(backoff_jitter="none", backoff_base=1.0, backoff_cap=60.0)


def c(category: Category, code: str = "X", **kw: object) -> Classified:
    return Classified(category, code, code, **kw)  # type: ignore[arg-type]


def rec(cl: Classified, attempt: int = 0, policy: PolicyConfig = POLICY) -> Recovery:
    return recovery_for(cl, attempt, policy, random.Random(7))


@pytest.mark.parametrize("park_state", [State.NEEDS_LOGIN, State.BANNED, State.DUPLICATED])
def test_auth_parks_and_never_retries(park_state: State) -> None:
    cl = c(Category.AUTH, "SESSION_REVOKED", park_state=park_state)
    for attempt in (0, 1, 50):
        r = rec(cl, attempt)
        assert r.action is Action.PARK
        assert r.next_state is park_state
        assert r.delay == 0


def test_auth_without_park_state_defaults_to_needs_login() -> None:
    assert rec(c(Category.AUTH)).next_state is State.NEEDS_LOGIN


@pytest.mark.parametrize("category", [Category.NETWORK, Category.SERVER])
def test_network_and_server_back_off_without_limit(category: Category) -> None:
    delays = [rec(c(category), n, NONE_JITTER).delay for n in range(10)]
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]
    assert rec(c(category), 10_000).action is Action.RETRY


def test_full_jitter_is_reproducible_from_the_rng() -> None:
    a = recovery_for(c(Category.NETWORK), 3, POLICY, random.Random(1))
    b = recovery_for(c(Category.NETWORK), 3, POLICY, random.Random(1))
    assert a == b
    assert a.delay is not None
    assert 0 <= a.delay <= 8


def test_flood_wait_waits_at_least_the_server_seconds() -> None:
    r = rec(c(Category.FLOOD_WAIT, "FLOOD_WAIT", wait_seconds=42))
    assert (r.action, r.next_state) == (Action.WAIT, State.FLOOD_WAIT)
    assert 42 <= r.delay <= 43


def test_flood_wait_beyond_sleep_max_closes_the_connection_until_the_deadline() -> None:
    policy = PolicyConfig(flood_sleep_max=60)
    assert rec(c(Category.FLOOD_WAIT, wait_seconds=60), policy=policy).action is Action.WAIT
    r = rec(c(Category.FLOOD_WAIT, wait_seconds=61), policy=policy)
    assert (r.action, r.next_state) == (Action.RETRY, State.FLOOD_WAIT)
    assert 61 <= r.delay <= 62


def test_home_migration_and_loop_guard() -> None:
    cl = c(Category.MIGRATE, "USER_MIGRATE", new_dc=4)
    r = rec(cl)
    assert (r.action, r.new_dc) == (Action.MIGRATE, 4)
    assert rec(cl, MAX_MIGRATIONS - 1).action is Action.MIGRATE
    assert rec(cl, MAX_MIGRATIONS).action is Action.FAIL


@pytest.mark.parametrize(("code", "new_dc"), [("FILE_MIGRATE", 3), ("USER_MIGRATE", None)])
def test_non_home_migration_fails(code: str, new_dc: int | None) -> None:
    assert rec(c(Category.MIGRATE, code, new_dc=new_dc)).action is Action.FAIL


def test_client_errors_are_not_retried_by_default() -> None:
    r = rec(c(Category.CLIENT, "PEER_ID_INVALID"))
    assert (r.action, r.next_state) == (Action.FAIL, State.STOPPED)
    assert "client" in r.reason


def test_unknown_gets_ten_attempts_by_default() -> None:
    actions = [rec(c(Category.UNKNOWN), n).action for n in range(11)]
    assert actions == [Action.RETRY] * 9 + [Action.FAIL, Action.FAIL]


@pytest.mark.parametrize(
    ("category", "field"),
    [(Category.NETWORK, "network"), (Category.SERVER, "server"),
     (Category.FLOOD_WAIT, "flood_wait"), (Category.UNKNOWN, "unknown"),
     (Category.CLIENT, "client")],
)
def test_each_limit_is_configurable(category: Category, field: str) -> None:
    limits = RetryLimits(**{**RetryLimits().__dict__, field: 3})
    policy = PolicyConfig(retry_limits=limits)
    cl = c(category, wait_seconds=1)
    assert rec(cl, 1, policy).action in (Action.RETRY, Action.WAIT)
    assert rec(cl, 2, policy).action is Action.FAIL
    unlimited = PolicyConfig(retry_limits=RetryLimits(**{**RetryLimits().__dict__, field: 0}))
    assert rec(cl, 500, unlimited).action in (Action.RETRY, Action.WAIT)


def test_negative_attempt_is_a_bug() -> None:
    with pytest.raises(ValueError, match="attempt"):
        rec(c(Category.NETWORK), -1)
