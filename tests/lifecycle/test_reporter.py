"""The reporter is the one writer of an account's public record: every sink agrees."""

from __future__ import annotations

import logging
import random

import pytest
from prometheus_client import CollectorRegistry

from tests.conftest import wait_for_condition
from tgdaemon.config import PolicyConfig
from tgdaemon.lifecycle import Category, Classified, State, recovery_for
from tgdaemon.logvolume import Waves
from tgdaemon.metrics import Metrics
from tgdaemon.reporter import AccountReporter
from tgdaemon.status import StatusBoard, UserInfo
from tgdaemon.store import DeviceInfo, Store

NOW = 1_800_000_000.0


@pytest.fixture
async def setup(store: Store) -> tuple[AccountReporter, StatusBoard, CollectorRegistry, Store]:
    board = StatusBoard(clock=lambda: NOW)
    registry = CollectorRegistry()
    metrics = Metrics(registry, board, clock=lambda: NOW)
    await store.ensure_account("alice")
    reporter = AccountReporter("alice", board=board, metrics=metrics, store=store,
                               clock=lambda: NOW)
    reporter.known_to_store = True
    return reporter, board, registry, store


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, {"account": "alice", **labels})


async def test_connected_then_parked_every_sink_agrees(setup, caplog) -> None:
    reporter, board, registry, store = setup
    caplog.set_level(logging.INFO, logger="tgdaemon.account")
    reporter.transition(State.CONNECTING, "connecting")
    reporter.connected_as(UserInfo(42, "al", "Al"), 2, DeviceInfo("rack", "Linux", "1"))
    reporter.heartbeat(0.25, 2)
    assert reporter.connected.is_set()
    assert sample(registry, "tgdaemon_account_up") == 1
    assert sample(registry, "tgdaemon_heartbeat_timestamp_seconds") == NOW
    await store.flush()
    record = await store.get_account("alice")
    assert record is not None
    assert (record.status, record.dc_id, record.user_id) == ("connected", 2, 42)
    assert record.device == DeviceInfo("rack", "Linux", "1")

    revoked = Classified(Category.AUTH, "SESSION_REVOKED", "SESSION_REVOKED: gone",
                         park_state=State.NEEDS_LOGIN)
    reporter.failure(revoked, recovery_for(revoked, 0, PolicyConfig(), random.Random()), 0)
    status = board.get("alice")
    assert status is not None
    assert (status.state, status.last_error_category) == (State.NEEDS_LOGIN, "auth")
    assert status.latency is None  # no live values once parked
    assert not reporter.connected.is_set()
    assert sample(registry, "tgdaemon_heartbeat_timestamp_seconds") is None
    # Counted once for the fleet (metrics_counters = "fleet"), which is alice alone here.
    assert registry.get_sample_value("tgdaemon_errors_total", {"category": "auth"}) == 1
    assert sample(registry, "tgdaemon_account_state", state="needs_login", dc="2") == 1
    await store.flush()
    record = await store.get_account("alice")
    assert record is not None
    assert (record.status, record.last_error_category) == ("needs_login", "auth")
    # One log line per change of state, none for a repeat.
    reporter.stopped()  # a parked account stays parked when the daemon stops
    assert reporter.state is State.NEEDS_LOGIN
    # A connect attempt is DEBUG (at 10,000 accounts, 10,000 lines per start); its outcome
    # INFO.
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if "state " in r.getMessage()]
    assert lines == [(logging.INFO, "[alice] state connecting -> connected (validated)"),
                     (logging.INFO, "[alice] state connected -> needs_login (SESSION_REVOKED)")]


async def test_long_flood_wait_shows_its_deadline_and_counts(setup) -> None:
    reporter, board, registry, _store = setup
    flood = Classified(Category.FLOOD_WAIT, "FLOOD_WAIT", "m", wait_seconds=120)
    rec = recovery_for(flood, 0, PolicyConfig(flood_sleep_max=60), random.Random(1))
    reporter.failure(flood, rec, 0)
    status = board.get("alice")
    assert status is not None
    assert status.state is State.FLOOD_WAIT
    assert status.flood_wait_until == NOW + rec.delay
    assert sample(registry, "tgdaemon_flood_wait_seconds_total") == 120
    # The connection was closed: a reconnect (the fleet's, which is alice alone here).
    assert registry.get_sample_value("tgdaemon_reconnects_total") == 1
    reporter.transition(State.RECONNECTING, "connecting")
    status = board.get("alice")
    assert status is not None
    assert status.flood_wait_until is None


async def test_a_dc_read_from_the_session_is_recorded_once(setup) -> None:
    reporter, board, registry, store = setup
    reporter.dc(1, persist=False)
    reporter.heartbeat(0.1, 1)
    await store.flush()
    record = await store.get_account("alice")
    assert record is not None
    assert record.dc_id is None  # the session's own DC is not re-written at start
    reporter.heartbeat(0.1, 4)  # Telethon followed a USER_MIGRATE inside the call
    status = board.get("alice")
    assert status is not None
    assert status.dc_id == 4
    # The DC is a label of the account's one state series.
    assert sample(registry, "tgdaemon_account_state", state="starting", dc="4") == 1
    await store.flush()
    record = await store.get_account("alice")
    assert record is not None
    assert record.dc_id == 4


async def test_status_counts_failures_past_recovery(setup) -> None:
    """lastError is the current trouble (cleared once validated again); errors keeps how
    often the account failed, the per-account answer the fleet-wide error counter of
    /metrics no longer gives by default."""
    reporter, board, _registry, _store = setup
    network = Classified(Category.NETWORK, "ConnectionError", "ConnectionError: reset")
    for attempt in range(3):
        reporter.failure(network, recovery_for(network, attempt, PolicyConfig(),
                                               random.Random(attempt)), attempt)
    reporter.connected_as(UserInfo(42, "al", "Al"), 2, DeviceInfo("rack", "Linux", "1"))
    status = board.get("alice")
    assert status is not None
    assert status.last_error_category is None
    assert status.to_json()["errors"] == 3
    reporter.failure(network, recovery_for(network, 0, PolicyConfig(), random.Random()), 0)
    status = board.get("alice")
    assert status is not None
    assert status.to_json()["lastError"]["category"] == "network"
    assert status.to_json()["errors"] == 4


async def test_a_fleet_wide_wave_is_a_few_lines_and_one_summary(store, caplog) -> None:
    """200 accounts connecting, then losing their connection and failing over, in one window:
    per kind the first ``burst`` lines at their level, the others never built (not even as
    DEBUG records at info level), then one summary line each with the count, at that level."""
    caplog.set_level(logging.INFO, logger="tgdaemon")
    board = StatusBoard(clock=lambda: NOW)
    metrics = Metrics(CollectorRegistry(), board, clock=lambda: NOW)
    waves = Waves(burst=5, window=0.2)
    reporters = [AccountReporter(f"a{i}", board=board, metrics=metrics, store=store,
                                 clock=lambda: NOW, waves=waves) for i in range(200)]
    network = Classified(Category.NETWORK, "IncompleteReadError", "IncompleteReadError: 0")
    for reporter in reporters:
        reporter.transition(State.CONNECTING, "connecting")
        reporter.connected_as(UserInfo(42, "al", "Al"), 2, DeviceInfo("rack", "Linux", "1"))
        reporter.failure(network, recovery_for(network, 0, PolicyConfig(), random.Random()), 0)
        reporter.failover(2, 3)  # a WARNING line: its summary is a WARNING too
    per_account = [r for r in caplog.records if r.name == "tgdaemon.account"]
    assert [r.getMessage() for r in per_account[:2]] == [
        "[a0] state connecting -> connected (validated)",
        "[a0] network error (IncompleteReadError), recovery: retry (attempt 1)"]
    assert len(per_account) == 15  # 5 + 5 + 5 of 600, not one DEBUG record among them
    assert [r.levelno for r in per_account].count(logging.WARNING) == 5
    assert all(r.state is State.RECONNECTING for r in reporters)  # the rest is unchanged

    def summaries() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "tgdaemon.logvolume"]

    await wait_for_condition(lambda: len(summaries()) == 3, message="three summary lines")
    assert sorted(summaries()) == [
        '195 more accounts logged "failing over" in the last 0.2 s (those lines at debug '
        "level)",
        '195 more accounts logged "network error (IncompleteReadError)" in the last 0.2 s '
        "(those lines at debug level)",
        '195 more accounts logged "state -> connected" in the last 0.2 s (those lines at '
        "debug level)"]
    levels = {r.getMessage().split('"')[1]: r.levelno for r in caplog.records
              if r.name == "tgdaemon.logvolume"}
    assert levels["failing over"] == logging.WARNING
    assert levels["state -> connected"] == logging.INFO
    # A new window: the next line is written again.
    reporters[0].transition(State.CONNECTED, "validated")
    assert caplog.records[-1].getMessage() == "[a0] state reconnecting -> connected (validated)"
    waves.flush_all()
