"""tgdaemon.metrics: values, labels, sparse counters, removal, both histogram modes, both
counter modes, the series budget per account (also after a fleet-wide outage), fast
renderer."""

from __future__ import annotations

import math
import random
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bench.seed import account_name
from tgdaemon.config import PolicyConfig
from tgdaemon.lifecycle import Action, Category, Classified, recovery_for
from tgdaemon.metrics import LATENCY_BUCKETS, Metrics, render
from tgdaemon.reporter import AccountReporter
from tgdaemon.security import Assessment, SessionInfo
from tgdaemon.status import State, StatusBoard, UserInfo
from tgdaemon.store import DeviceInfo
from tgdaemon.watch import LookResult

ACCOUNT_FAMILIES = {
    "tgdaemon_account_up",
    "tgdaemon_account_state",
    "tgdaemon_errors",
    "tgdaemon_reconnects",
    "tgdaemon_flood_wait_seconds",
    "tgdaemon_dc_failovers",
    "tgdaemon_worker_restarts",
    "tgdaemon_update_gaps",
    "tgdaemon_plugin_errors",
}


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def scrape(registry: CollectorRegistry, *, fast: bool = False) -> dict[str, object]:
    text = (render(registry) if fast else generate_latest(registry)).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(registry: CollectorRegistry, sample_name: str, **labels: str) -> list[float]:
    """Values of every sample named ``sample_name`` whose labels include ``labels``."""
    out = []
    for family in scrape(registry).values():
        for s in family.samples:
            if s.name == sample_name and labels.items() <= s.labels.items():
                out.append(s.value)
    return out


def value(registry: CollectorRegistry, sample_name: str, **labels: str) -> float:
    found = samples(registry, sample_name, **labels)
    assert len(found) == 1, (sample_name, labels, found)
    return found[0]


@pytest.fixture
def board() -> StatusBoard:
    return StatusBoard(clock=FakeClock())


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["fleet", "account"], ids=["defaults", "opt-in"])
def metrics(request, registry, board, clock) -> Metrics:
    """The defaults (fleet-wide latency and event counters) and both opt-ins together."""
    return Metrics(registry, board, histograms=request.param, counters=request.param,
                   version="9.9.9", clock=clock)


#: The counters a fleet-wide event increments for every account: fleet-wide by default.
FLEET_EVENT_COUNTERS = ("errors", "reconnects", "dc_failovers", "update_gaps", "plugin_errors",
                        "updates_recovered", "unknown_objects")
SPARSE_COUNTERS = ("reconnects", "flood_wait_seconds", "dc_failovers", "worker_restarts",
                   "update_gaps", "plugin_errors")


def counted(metrics: Metrics, registry: CollectorRegistry, family: str, account: str,
            **labels: str) -> float:
    """``account``'s count of ``tgdaemon_<family>_total``: its own series, or for a fleet-event
    counter with ``counters="fleet"`` the fleet's (no ``account`` label, every account
    together: the tests count for one account only)."""
    name = f"tgdaemon_{family}_total"
    if family in FLEET_EVENT_COUNTERS and metrics.counters == "fleet":
        found = [s.value for f in scrape(registry).values() for s in f.samples
                 if s.name == name and s.labels == labels]
        assert len(found) == 1, (name, labels, found)
        return found[0]
    return value(registry, name, account=account, **labels)


def test_new_account_declares_every_counter_and_exports_none_at_zero(metrics, registry):
    """Issue 17: a per-account counter is a series from its first increment (declared
    before), except new_authorizations whose alert must see 0 -> 1; the fleet-wide ones
    start at 0 like any daemon-wide counter."""
    metrics.add_account("alice")
    for text in (generate_latest(registry).decode(), render(registry).decode()):
        for family in ACCOUNT_FAMILIES - {"tgdaemon_account_state"}:
            assert f"# TYPE {family}" in text, family
    # No state published yet: no state series (see test_state_and_up_...).
    assert scrape(registry).keys() >= ACCOUNT_FAMILIES - {"tgdaemon_account_state"}
    assert samples(registry, "tgdaemon_errors_total", account="alice") == []
    for name in SPARSE_COUNTERS:
        assert samples(registry, f"tgdaemon_{name}_total", account="alice") == [], name
    assert value(registry, "tgdaemon_new_authorizations_total", account="alice") == 0
    if metrics.counters == "fleet":
        for category in Category:
            assert counted(metrics, registry, "errors", "alice", category=category) == 0
        for family in FLEET_EVENT_COUNTERS[1:]:
            assert counted(metrics, registry, family, "alice") == 0
    # Nothing measured yet: no heartbeat timestamp rather than "stale since 1970".
    assert samples(registry, "tgdaemon_heartbeat_timestamp_seconds", account="alice") == []


def test_counters_count(metrics, registry):
    metrics.add_account("alice")
    metrics.add_account("bob")
    metrics.error("alice", "auth")
    metrics.error("alice", "auth")
    metrics.error("alice", "flood_wait")
    metrics.reconnect("alice")
    metrics.flood_wait("alice", 30)
    metrics.flood_wait("alice", 2.5)
    metrics.failover("alice")
    metrics.worker_restart("alice")
    metrics.worker_restart("alice")
    metrics.update_gap("alice")
    metrics.plugin_error("alice")
    metrics.heartbeat("alice", 1_700_000_123.5)

    metrics.updates_recovered("alice", 3)
    metrics.unknown_object("alice")

    assert counted(metrics, registry, "errors", "alice", category="auth") == 2
    assert counted(metrics, registry, "errors", "alice", category="flood_wait") == 1
    if metrics.counters == "fleet":
        assert counted(metrics, registry, "errors", "alice", category="network") == 0
    else:
        assert samples(registry, "tgdaemon_errors_total", account="alice",
                       category="network") == []
    assert counted(metrics, registry, "reconnects", "alice") == 1
    assert value(registry, "tgdaemon_flood_wait_seconds_total", account="alice") == 32.5
    assert counted(metrics, registry, "dc_failovers", "alice") == 1
    assert value(registry, "tgdaemon_worker_restarts_total", account="alice") == 2
    assert counted(metrics, registry, "update_gaps", "alice") == 1
    assert counted(metrics, registry, "plugin_errors", "alice") == 1
    assert counted(metrics, registry, "updates_recovered", "alice") == 3
    assert counted(metrics, registry, "unknown_objects", "alice") == 1
    # Whole seconds (issue 17: bytes per scrape; alerts look minutes back).
    assert value(registry, "tgdaemon_heartbeat_timestamp_seconds", account="alice") == (
        1_700_000_123
    )
    # bob is untouched: none of his counters is a series
    assert samples(registry, "tgdaemon_errors_total", account="bob") == []
    assert samples(registry, "tgdaemon_reconnects_total", account="bob") == []


def test_unknown_category_counts_as_unknown(metrics, registry):
    metrics.add_account("alice")
    metrics.error("alice", "martian")
    assert counted(metrics, registry, "errors", "alice", category="unknown") == 1
    categories = {
        s.labels["category"] for s in scrape(registry)["tgdaemon_errors"].samples if s.value
    }
    assert categories == {Category.UNKNOWN}
    for category in Category:
        metrics.error("alice", category)
    categories = {
        s.labels["category"] for s in scrape(registry)["tgdaemon_errors"].samples if s.value
    }
    assert categories == set(Category)


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, 0.0])
def test_flood_wait_never_decreases_or_poisons(metrics, registry, bad):
    metrics.add_account("alice")
    metrics.flood_wait("alice", 5)
    metrics.flood_wait("alice", bad)
    assert value(registry, "tgdaemon_flood_wait_seconds_total", account="alice") == 5


@pytest.mark.parametrize("bad", [-0.5, math.nan, math.inf])
def test_bad_latency_and_heartbeat_are_dropped(metrics, registry, bad):
    metrics.add_account("alice")
    metrics.observe_latency("alice", bad)
    assert sum(samples(registry, "tgdaemon_rpc_latency_seconds_count")) == 0
    assert samples(registry, "tgdaemon_rpc_last_latency_seconds") == []
    if not math.isfinite(bad):
        metrics.heartbeat("alice", bad)
        assert samples(registry, "tgdaemon_heartbeat_timestamp_seconds") == []


def test_state_and_up_are_read_from_the_board_at_scrape_time(metrics, registry, board):
    metrics.add_account("alice")
    assert value(registry, "tgdaemon_account_up", account="alice") == 0
    assert samples(registry, "tgdaemon_account_state", account="alice") == []  # no status yet
    assert value(registry, "tgdaemon_accounts", state="connected") == 0

    board.update("alice", state=State.CONNECTED)
    assert value(registry, "tgdaemon_account_up", account="alice") == 1
    assert value(registry, "tgdaemon_account_state", account="alice", state="connected") == 1
    assert value(registry, "tgdaemon_accounts", state="connected") == 1

    board.update("alice", state=State.FLOOD_WAIT, dc_id=4)
    assert value(registry, "tgdaemon_account_up", account="alice") == 0
    # ONE series per account, labelled with the current state and the session's DC.
    assert value(registry, "tgdaemon_account_state", account="alice", state="flood_wait",
                 dc="4") == 1
    assert samples(registry, "tgdaemon_account_state", account="alice") == [1]
    for text in (render(registry).decode(), generate_latest(registry).decode()):
        assert 'tgdaemon_account_state{account="alice",dc="4",state="flood_wait"} 1' in text \
            or 'tgdaemon_account_state{account="alice",state="flood_wait",dc="4"} 1' in text
    counts = {st: value(registry, "tgdaemon_accounts", state=st) for st in State}
    assert counts == {st: int(st is State.FLOOD_WAIT) for st in State}


def test_board_accounts_without_add_account_are_not_exported(metrics, registry, board):
    board.update("ghost", state=State.CONNECTED)
    assert samples(registry, "tgdaemon_account_up", account="ghost") == []


def test_remove_account_drops_every_series_and_ignores_late_reports(metrics, registry, board):
    metrics.add_account("alice")
    metrics.add_account("bob")
    board.update("alice", state=State.CONNECTED)
    metrics.observe_latency("alice", 0.1)
    metrics.heartbeat("alice", 1.0)
    metrics.remove_account("alice")
    for method in (metrics.reconnect, metrics.failover, metrics.worker_restart,
                   metrics.update_gap, metrics.plugin_error):  # fmt: skip
        method("alice")
    metrics.error("alice", "auth")
    metrics.observe_latency("alice", 0.2)
    metrics.flood_wait("alice", 3)
    metrics.heartbeat("alice", 2.0)

    for family in scrape(registry).values():
        for s in family.samples:
            assert s.labels.get("account") != "alice", s
            # Nor do the late reports reach the fleet's counters.
            if s.name.removeprefix("tgdaemon_").removesuffix("_total") in FLEET_EVENT_COUNTERS:
                assert s.value == 0, s
    assert metrics.accounts() == ["bob"]
    # Re-adding starts again from zero.
    metrics.add_account("alice")
    assert samples(registry, "tgdaemon_reconnects_total", account="alice") == []
    metrics.reconnect("alice")
    assert counted(metrics, registry, "reconnects", "alice") == 1


def test_a_stall_of_the_process_is_counted_once_for_the_fleet(metrics, registry):
    """The watchdog restarting many workers at once (a paused process) is a fleet-wide event:
    one daemon-wide counter, in every setting; a lone restart is the account's."""
    for name in ("alice", "bob"):
        metrics.add_account(name)
    assert value(registry, "tgdaemon_watchdog_stall_restarts_total") == 0
    metrics.stall_restarts(2)
    metrics.stall_restarts(0)
    assert value(registry, "tgdaemon_watchdog_stall_restarts_total") == 2
    assert samples(registry, "tgdaemon_worker_restarts_total") == []
    metrics.worker_restart("bob")
    assert samples(registry, "tgdaemon_worker_restarts_total") == [1]


def test_fleet_counters_keep_the_counts_of_accounts_that_left(registry, board):
    """A counter never decreases: the fleet's reconnects include those of a removed account."""
    metrics = Metrics(registry, board)
    for name in ("alice", "bob"):
        metrics.add_account(name)
        metrics.reconnect(name)
        metrics.error(name, Category.NETWORK)
    metrics.remove_account("alice")
    assert value(registry, "tgdaemon_reconnects_total") == 2
    assert value(registry, "tgdaemon_errors_total", category="network") == 2


def test_add_account_is_idempotent(metrics, registry):
    metrics.add_account("alice")
    metrics.reconnect("alice")
    metrics.add_account("alice")
    assert counted(metrics, registry, "reconnects", "alice") == 1


@pytest.mark.parametrize("name", ["+15551234567", "15551234567", "+44 20 7946 0958", ""])
def test_phone_numbers_are_refused_as_labels_without_echoing_them(metrics, name):
    with pytest.raises(ValueError, match="phone number") as info:
        metrics.add_account(name)
    if name:
        assert name not in str(info.value)
    assert metrics.accounts() == []


def test_only_allowed_labels_and_no_user_data(metrics, registry, board):
    metrics.add_account("alice")
    board.update(
        "alice",
        state=State.CONNECTED,
        user=UserInfo(id=777000123, username="secret_handle", first_name="Alice Realname"),
        last_error_category="auth",
        last_error_message="AUTH_KEY_UNREGISTERED",
    )
    metrics.observe_latency("alice", 0.1)
    text = generate_latest(registry).decode() + render(registry).decode()
    for needle in ("secret_handle", "Alice Realname", "777000123", "AUTH_KEY"):
        assert needle not in text
    allowed = {"account", "state", "dc", "category", "le", "version", "python", "telethon"}
    for family in scrape(registry).values():
        for s in family.samples:
            assert set(s.labels) <= allowed, s


def test_families_follow_prometheus_naming(metrics, registry):
    metrics.add_account("alice")
    metrics.observe_latency("alice", 0.1)
    metrics.heartbeat("alice", 1.0)
    text = render(registry).decode()
    helps = {line.split()[2] for line in text.splitlines() if line.startswith("# HELP")}
    types = dict(
        line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE")
    )
    assert helps == set(types)
    for name, typ in types.items():
        assert name.startswith("tgdaemon_")
        if typ == "counter":
            assert name.endswith("_total"), name
        else:
            assert not name.endswith("_total"), name
    assert types["tgdaemon_rpc_latency_seconds"] == "histogram"
    assert types["tgdaemon_heartbeat_timestamp_seconds"] == "gauge"


def test_fleet_histogram_mode(registry, board):
    m = Metrics(registry, board, histograms="fleet")
    assert m.histograms == "fleet"
    m.add_account("alice")
    m.add_account("bob")
    m.observe_latency("alice", 0.1)  # le is inclusive: counts in the 0.1 bucket
    m.observe_latency("bob", 0.7)
    m.observe_latency("bob", 60.0)
    assert value(registry, "tgdaemon_rpc_latency_seconds_bucket", le="0.05") == 0
    assert value(registry, "tgdaemon_rpc_latency_seconds_bucket", le="0.1") == 1
    assert value(registry, "tgdaemon_rpc_latency_seconds_bucket", le="1.0") == 2
    assert value(registry, "tgdaemon_rpc_latency_seconds_bucket", le="+Inf") == 3
    assert value(registry, "tgdaemon_rpc_latency_seconds_count") == 3
    assert value(registry, "tgdaemon_rpc_latency_seconds_sum") == pytest.approx(60.8)
    for s in scrape(registry)["tgdaemon_rpc_latency_seconds"].samples:
        assert "account" not in s.labels
    # Per-account latency is the opt-in mode's (the status page shows the last one).
    assert "tgdaemon_rpc_last_latency_seconds" not in render(registry).decode()


def test_account_histogram_mode(registry, board):
    m = Metrics(registry, board, histograms="account")
    m.add_account("alice")
    m.add_account("bob")
    m.observe_latency("alice", 0.1)
    m.observe_latency("alice", 0.3)
    buckets = samples(registry, "tgdaemon_rpc_latency_seconds_bucket", account="alice")
    assert len(buckets) == len(LATENCY_BUCKETS) + 1
    assert buckets == sorted(buckets)  # cumulative
    assert value(registry, "tgdaemon_rpc_latency_seconds_bucket", account="alice", le="0.2") == 1
    assert value(registry, "tgdaemon_rpc_latency_seconds_count", account="alice") == 2
    assert value(registry, "tgdaemon_rpc_latency_seconds_sum", account="alice") == (
        pytest.approx(0.4)
    )
    assert value(registry, "tgdaemon_rpc_latency_seconds_count", account="bob") == 0
    # The last-latency gauge comes with the per-account histograms.
    assert value(registry, "tgdaemon_rpc_last_latency_seconds", account="alice") == 0.3
    assert samples(registry, "tgdaemon_rpc_last_latency_seconds", account="bob") == []


def test_fleet_histogram_and_counters_are_the_default(registry, board):
    defaults = Metrics(registry, board)
    assert (defaults.histograms, defaults.counters) == ("fleet", "fleet")


@pytest.mark.parametrize(("histograms", "counters", "healthy", "outage"), [
    ("fleet", "fleet", 5, 0), ("fleet", "account", 5, 2), ("account", "account", 5 + 13, 2)])
def test_series_per_account_within_budget(registry, board, histograms, counters, healthy,
                                          outage):
    """Issue 17: at most 8 series per account with the defaults: a healthy account is 5 (up,
    state, heartbeat, sessions, new sessions: the state one series, not one per state; the DC
    a label of it; no counter at 0 but new_authorizations), and an outage adds none (its
    errors and reconnects are the fleet's). Opt-in: per-account latency adds a histogram and
    the last-value gauge; per-account counters add one series per kind of trouble."""
    m = Metrics(registry, board, histograms=histograms, counters=counters)
    names = [f"acc{i}" for i in range(20)]
    for i, name in enumerate(names):
        m.add_account(name)
        board.update(name, state=State.CONNECTED if i % 4 else State.RECONNECTING, dc_id=2)
        m.observe_latency(name, 0.05 * (i + 1))
        m.heartbeat(name, 1_700_000_000.0 + i)
        m.sessions(name, 2, 0)
    m.error("acc0", Category.NETWORK)  # an account with a reconnect behind it
    m.reconnect("acc0")

    def per_account() -> dict[str, int]:
        count = dict.fromkeys(names, 0)
        for text in (render(registry).decode(),):
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    if "account" in s.labels:
                        count[s.labels["account"]] += 1
        return count

    count = per_account()
    assert {count[n] for n in names[1:]} == {healthy}
    assert count["acc0"] == healthy + outage  # errors{category="network"}, reconnects
    if histograms == "fleet":
        assert healthy + outage <= 8
    # The fleet-wide families do not grow with the fleet.
    fleet_wide = [s for f in scrape(registry, fast=True).values() for s in f.samples
                  if "account" not in s.labels]
    expected = (len(State) + 5 + (len(LATENCY_BUCKETS) + 3 if histograms == "fleet" else 0)
                + (len(Category) + len(FLEET_EVENT_COUNTERS) - 1 if counters == "fleet" else 0))
    assert len(fleet_wide) == expected


#: Issue 17: /metrics at 10,000 accounts with the defaults <= 3 MB (decimal, the stricter
#: reading) and <= 8 series per account, checked here at a tenth of that, scaled.
BUDGET_BYTES_PER_ACCOUNT = 3_000_000 / 10_000
BUDGET_SERIES_PER_ACCOUNT = 8


def _fleet_after_an_outage(n: int, **options: str) -> tuple[CollectorRegistry, bytes]:
    """``n`` accounts filled the way the daemon fills them (each account's reporter: connect,
    heartbeat, a look at its sessions), named as the bench names them; then a fleet-wide
    outage: every account fails with a network error and reconnects (the reporter counts the
    error and the reconnect), fails over to its DC's next address, finds a gap in its updates
    and catches up, and connects again. Returns the registry and the /metrics body."""
    now = 1_800_000_000.123456
    board = StatusBoard(clock=lambda: now)
    registry = CollectorRegistry()
    metrics = Metrics(registry, board, clock=lambda: now, **options)
    device = DeviceInfo("tgdaemon", "Linux", "0.1")
    ours = SessionInfo(1, True, "tgdaemon", "Linux", "tgdaemon", "NL", now - 86400)
    phone = SessionInfo(2, False, "Pixel 8", "Android", "Telegram Android", "NL", now - 9e5)
    look = LookResult(Assessment((ours, phone), (), (), frozenset({1, 2})), (), refused=False)
    lost = Classified(Category.NETWORK, "ConnectionError", "connection lost")
    retry = recovery_for(lost, 0, PolicyConfig(), random.Random(0))
    assert retry.action is Action.RETRY
    reporters = []
    for i in range(n):
        # The store is only written for accounts it knows (known_to_store stays False).
        reporter = AccountReporter(account_name(i), board=board, metrics=metrics,
                                   store=None, clock=lambda: now)  # type: ignore[arg-type]
        reporter.transition(State.CONNECTING, "connecting")
        reporter.connected_as(UserInfo(100_000 + i, None, "A"), 1 + i % 5, device)
        reporter.heartbeat(0.05 + (i % 97) / 1000 + 1e-9 * i, 1 + i % 5)
        reporter.sessions(look)
        reporters.append(reporter)
    for i, reporter in enumerate(reporters):  # the outage, then everyone back
        reporter.failure(lost, retry, 0)
        metrics.failover(reporter.name)
        metrics.update_gap(reporter.name)
        metrics.updates_recovered(reporter.name, 3)
        reporter.connected_as(UserInfo(100_000 + i, None, "A"), 1 + i % 5, device)
        reporter.heartbeat(0.05, 1 + i % 5)
    return registry, render(registry)


def _series_per_account(body: bytes) -> dict[str, int]:
    per_account: dict[str, int] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if "account" in s.labels:
                per_account[s.labels["account"]] = per_account.get(s.labels["account"], 0) + 1
    return per_account


def test_default_exposition_fits_the_per_account_budget_after_a_fleet_wide_outage() -> None:
    """1,000 accounts after an outage of the whole fleet (``_fleet_after_an_outage``): the
    whole /metrics body stays within the 10,000-account budget scaled to 1,000, and no
    account has more series than a healthy one. A new per-account series by default, a
    longer line, or a fleet-wide event that adds series per account fails here."""
    n = 1000
    registry, body = _fleet_after_an_outage(n)
    per_account = _series_per_account(body)
    assert len(per_account) == n
    assert set(per_account.values()) == {5}, "a fleet-wide event added series per account"
    assert max(per_account.values()) <= BUDGET_SERIES_PER_ACCOUNT
    assert len(body) <= n * BUDGET_BYTES_PER_ACCOUNT, (
        f"{len(body)} bytes for {n} accounts: {len(body) / n:.0f} per account, budget "
        f"{BUDGET_BYTES_PER_ACCOUNT:.0f}")
    # The outage is counted, once for the fleet.
    assert value(registry, "tgdaemon_errors_total", category="network") == n
    assert value(registry, "tgdaemon_reconnects_total") == n
    assert value(registry, "tgdaemon_dc_failovers_total") == n
    assert value(registry, "tgdaemon_updates_recovered_total") == 3 * n


def test_per_account_counters_opt_in_exports_the_outage_per_account() -> None:
    """``counters="account"`` (daemon.metrics_counters): the same outage is counted per
    account, each kind of trouble one more series (here 5 + 5)."""
    n = 50
    registry, body = _fleet_after_an_outage(n, counters="account")
    assert set(_series_per_account(body).values()) == {5 + 5}
    for i in (0, n - 1):
        name = account_name(i)
        assert value(registry, "tgdaemon_errors_total", account=name, category="network") == 1
        assert value(registry, "tgdaemon_reconnects_total", account=name) == 1
        assert value(registry, "tgdaemon_dc_failovers_total", account=name) == 1
        assert value(registry, "tgdaemon_update_gaps_total", account=name) == 1
        assert value(registry, "tgdaemon_updates_recovered_total", account=name) == 3
    assert samples(registry, "tgdaemon_reconnects_total") == [1] * n  # no fleet-wide series


def test_invalid_options_are_refused(registry, board):
    with pytest.raises(ValueError, match="histograms"):
        Metrics(registry, board, histograms="per-dc")
    with pytest.raises(ValueError, match="counters"):
        Metrics(registry, board, counters="per-dc")
    with pytest.raises(ValueError, match="buckets"):
        Metrics(CollectorRegistry(), board, buckets=(1.0, 0.5))
    with pytest.raises(ValueError, match="buckets"):
        Metrics(CollectorRegistry(), board, buckets=(1.0, math.inf))


def test_registering_twice_in_one_registry_is_refused(registry, board):
    Metrics(registry, board)
    with pytest.raises(ValueError, match="Duplicated"):
        Metrics(registry, board)


def test_config_reload_gauges(metrics, registry, clock):
    started = clock.now
    assert value(registry, "tgdaemon_config_reload_success") == 1
    assert value(registry, "tgdaemon_config_last_reload_success_timestamp_seconds") == started
    clock.now += 60
    metrics.config_reload(False)
    assert value(registry, "tgdaemon_config_reload_success") == 0
    assert value(registry, "tgdaemon_config_last_reload_success_timestamp_seconds") == started
    clock.now += 60
    metrics.config_reload(True)
    assert value(registry, "tgdaemon_config_reload_success") == 1
    assert value(registry, "tgdaemon_config_last_reload_success_timestamp_seconds") == (
        started + 120
    )


def test_build_info(metrics, registry):
    (build,) = scrape(registry)["tgdaemon_build_info"].samples
    assert build.value == 1
    assert build.labels["version"] == "9.9.9"
    assert build.labels["telethon"].startswith("1.")
    assert build.labels["python"].count(".") == 2


def test_no_accounts_still_renders(metrics, registry):
    fams = scrape(registry, fast=True)
    assert "tgdaemon_build_info" in fams
    assert "tgdaemon_account_up" not in fams
    assert render(registry).decode().count("# HELP") == len(fams)


def _populate(metrics: Metrics, board: StatusBoard, names: list[str]) -> None:
    for i, name in enumerate(names):
        metrics.add_account(name)
        board.update(name, state=list(State)[i % len(State)])
        metrics.error(name, list(Category)[i % len(Category)])
        metrics.observe_latency(name, 0.01 * (i + 1))
        metrics.flood_wait(name, i + 0.25)
        if i % 2:
            metrics.heartbeat(name, 1_700_000_000.0 + i)


def test_render_matches_generate_latest_with_other_collectors(metrics, registry, board):
    other = Counter("other_things", "Something else in the registry.", registry=registry)
    other.inc(3)
    _populate(metrics, board, [f"acct-{i}" for i in range(25)])
    fast = list(text_string_to_metric_families(render(registry).decode()))
    slow = list(text_string_to_metric_families(generate_latest(registry).decode()))
    assert fast == slow
    assert "other_things" in {f.name for f in fast}


# Any text with a letter in it (so never phone-like): quotes, backslashes, newlines, UTF-8.
_label_text = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12
).filter(lambda s: any(c.isalpha() for c in s))


@settings(max_examples=30, deadline=None)
@given(names=st.lists(_label_text, min_size=1, max_size=5, unique=True))
def test_render_escapes_like_generate_latest(names):
    board = StatusBoard(clock=FakeClock())
    registry = CollectorRegistry()
    metrics = Metrics(registry, board, histograms="account")
    _populate(metrics, board, names)
    fast = list(text_string_to_metric_families(render(registry).decode()))
    slow = list(text_string_to_metric_families(generate_latest(registry).decode()))
    assert fast == slow


def test_scrape_in_a_thread_while_the_loop_mutates(registry, board):
    """The HTTP layer renders off-loop: concurrent add/remove must not break a scrape."""
    metrics = Metrics(registry, board)
    for i in range(3000):  # long enough iterations for the GIL to switch mid-copy
        metrics.add_account(f"base-{i}")
    errors: list[BaseException] = []
    scrapes = 0
    stop = threading.Event()

    def scraper() -> None:
        nonlocal scrapes
        try:
            while not stop.is_set():
                list(registry.collect())
                scrapes += 1
        except BaseException as exc:  # the failure being tested for
            errors.append(exc)

    thread = threading.Thread(target=scraper)
    thread.start()
    try:
        for round_ in range(400):
            names = [f"a{round_}-{i}" for i in range(50)]
            for name in names:
                metrics.add_account(name)
                board.update(name, state=State.CONNECTED)
            for name in names:
                metrics.remove_account(name)
                board.remove(name)
            if errors:
                break
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert errors == []
    assert scrapes > 0
    render(registry)  # and the fast path still works on what is left
