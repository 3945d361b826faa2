"""A real Prometheus scrapes a live daemon attached to the local DC.

Every PromQL expression of the Grafana dashboard and of the alert rules is evaluated by that
Prometheus and must succeed and return data; then faults injected through the local DC (a
revoked key, a long FLOOD_WAIT), a rejected config reload and a dead scrape target make the
matching alerts fire in Prometheus' own ``/api/v1/alerts``.

The rules are loaded from a copy of config/prometheus-alerts.yml whose ``for:`` durations are
rewritten to 1s (Prometheus cannot override ``for:``); expressions, labels and annotations
are the shipped ones.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import phone_for
from tests.observability.promhelpers import (
    ALERTS,
    PROMETHEUS,
    Prometheus,
    alert_names,
    dashboard_queries,
    finite_values,
    free_port,
    load_dashboard,
    prometheus_config,
    running_prometheus,
    selectors,
    substitute,
    with_short_for,
)
from tgdaemon.config import Config
from tgdaemon.daemon import Daemon
from tgdaemon.localdc import Fault, LocalDC
from tgdaemon.localdc.testing import login, make_client
from tgdaemon.status import State

pytestmark = pytest.mark.skipif(not os.access(PROMETHEUS, os.X_OK),
                                reason=f"Prometheus not installed at {PROMETHEUS} "
                                       "(scripts/install-system-deps.sh installs it)")

NAMES = ("alice", "bob", "carol")


@dataclass(frozen=True)
class Live:
    config: Config
    daemon: Daemon
    prom: Prometheus
    ids: dict[str, int]
    instance: str
    dead_instance: str


#: Alerts on series only a fleet of daemons exports (daemon.instance_id set): their inputs
#: are checked live by tests/fleet/test_fleet_daemons.py.
FLEET_ONLY = frozenset({"TgdaemonAccountsUnowned", "TgdaemonInstanceLost"})
FLEET_SERIES = ("tgdaemon_leases_owned", "tgdaemon_accounts_unowned", "tgdaemon_instances_lost",
                "tgdaemon_lease_renewals_total", "tgdaemon_lease_fenced_writes_total")


@contextlib.asynccontextmanager
async def live_stack(tmp_path: Path, make_config: Any, login_account: Any,
                     wait_until: Any) -> AsyncIterator[Live]:
    """Three logged-in accounts in a running daemon, scraped every second by Prometheus
    together with a second target of the same job that nothing listens on."""
    config = make_config([{"name": n, "phone": phone_for(n)} for n in NAMES])
    ids = {n: await login_account(config, n) for n in NAMES}
    async with Daemon(config) as daemon:
        await wait_until(lambda: daemon.board.counts()[State.CONNECTED] == len(NAMES), 15,
                         "all accounts connected")
        instance = f"127.0.0.1:{daemon.http.port}"
        dead = f"127.0.0.1:{free_port()}"
        rules = tmp_path / "alerts-short-for.yml"
        rules.write_text(with_short_for(ALERTS.read_text(), "1s"))
        prom_config = tmp_path / "prometheus.yml"
        prom_config.write_text(prometheus_config([instance, dead], rules))
        async with running_prometheus(prom_config, tmp_path / "tsdb",
                                      tmp_path / "prometheus.log") as prom:

            async def target_up() -> bool:
                return any(t["labels"]["instance"] == instance and t["health"] == "up"
                           for t in await prom.targets())

            await wait_until(target_up, 15, "Prometheus scraped the daemon")
            yield Live(config, daemon, prom, ids, instance, dead)


async def test_every_dashboard_and_alert_expression_returns_data(
        tmp_path, make_config, login_account, localdc, wait_until):
    async with live_stack(tmp_path, make_config, login_account, wait_until) as live, \
            foreign_login(localdc, "carol"):  # a look at carol's sessions: their gauge
        prom = live.prom
        variables = {"instance": live.instance, "account": "|".join(NAMES),
                     "__rate_interval": "10s"}
        dashboard = load_dashboard()
        # Template variables: label_values(<selector>, <label>) must list our values.
        for var in dashboard["templating"]["list"]:
            if var["type"] != "query":
                continue
            m = re.fullmatch(r"label_values\((.+), (\w+)\)", var["definition"])
            assert m is not None, var["definition"]
            selector, label = substitute(m.group(1), variables), m.group(2)
            data = await prom.query(f"count by ({label}) ({selector})")
            values = {s["metric"].get(label) for s in data["result"]}
            expected = {"instance": {live.instance}, "account": set(NAMES)}[var["name"]]
            assert values == expected, (var["name"], values)
        declared, idle = await _metric_names(live.instance)
        queries = dashboard_queries(dashboard)
        assert len(queries) >= 15
        waited_for = 0
        for q in queries:
            if any(series in q.expr for series in FLEET_SERIES):
                continue  # a fleet's panels: checked live by tests/fleet/test_fleet_daemons.py
            expr = substitute(q.expr, variables)
            names = _names(expr)
            if 'account!=""' in q.expr:
                # The per-account breakdown of a counter that is the fleet's by default
                # (metrics_counters = "fleet"): no series has an account label; it must
                # evaluate.
                await prom.query(expr)
                continue
            if names & idle:
                assert names <= declared, (q.panel, names - declared)
                # A per-account counter that is still 0 is not a series (issue 17): the
                # query must evaluate; its name is checked against the daemon's # TYPE lines.
                await prom.query(expr)
                continue

            async def has_data(expr: str = expr) -> bool:
                return bool(finite_values(await prom.query(expr)))  # raises on a bad query

            await wait_until(has_data, 20, f"data for panel {q.panel!r} {q.ref}: {expr}")
            waited_for += 1
        # Everything but the panels on not-yet-incremented counters shows data.
        assert waited_for >= 10, waited_for

        # Prometheus' own evaluation of the loaded rules: all healthy, none missing.
        async def evaluated() -> bool:
            return all(r["health"] != "unknown" for r in await prom.alerting_rules())

        await wait_until(evaluated, 10, "every rule evaluated once")
        rules = await prom.alerting_rules()
        assert sorted(r["name"] for r in rules) == sorted(alert_names(ALERTS.read_text()))
        for rule in rules:
            assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
            await prom.query(rule["query"])  # evaluates without error
            # An alert is quiet when healthy; "returns data" means its inputs exist: every
            # selector it reads has series in this Prometheus.
            found = selectors(rule["query"])
            assert found, rule["query"]
            if rule["name"] in FLEET_ONLY:
                continue
            for selector in found:
                name = selector.split("{")[0]
                if name in idle:
                    continue  # a counter still at 0 (see above)
                if name == "tgdaemon_account_state":
                    # One series per account, labelled with its current state: a rule on a
                    # state nobody is in reads no series; the family must exist.
                    assert set(re.findall(r'state=~?"([^"]+)"', selector)[0].split("|")) <= {
                        s.value for s in State}, selector
                    selector = name
                data = await prom.query(selector)
                assert data["result"], f"{rule['name']}: no series for {selector}"


def _names(expr: str) -> set[str]:
    """Our metric names in an expression, as the daemon declares them (histogram suffixes
    stripped)."""
    names = {s.split("{")[0] for s in selectors(expr)} - {"up"}
    return {re.sub(r"_(bucket|count|sum)$", "", n) if "latency_seconds" in n else n
            for n in names}


async def _metric_names(instance: str) -> tuple[set[str], set[str]]:
    """(declared by a # TYPE line, counters declared without a sample) in the daemon's
    /metrics."""
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://{instance}/metrics") as r:
        text = await r.text()
    types = dict(re.findall(r"^# TYPE (\w+) (\w+)", text, flags=re.MULTILINE))
    sampled = set(re.findall(r"^(\w+)[{ ]", text, flags=re.MULTILINE))
    idle = {n for n, t in types.items() if t == "counter" and n not in sampled}
    # The first looks at the accounts' sessions are spread over security.check_interval
    # (hours): the gauge exists after a look, not within this test.
    idle.add("tgdaemon_authorizations")
    return set(types) | {"tgdaemon_authorizations"}, idle


@contextlib.asynccontextmanager
async def foreign_login(localdc: LocalDC, name: str) -> AsyncIterator[None]:
    """A stock Telethon client signs into ``name``'s user, as an intruder would: the daemon's
    security watch looks at the account's sessions at its next heartbeat."""
    client = make_client(localdc, device_model="Intruder")
    try:
        await login(client, localdc, phone_for(name))
        yield
    finally:
        await client.disconnect()


def _firing(alerts: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(a["labels"]["alertname"],
             a["labels"].get("account") or a["labels"].get("instance", ""))
            for a in alerts if a["state"] == "firing"}


async def test_alerts_fire_in_prometheus(tmp_path, make_config, login_account, localdc,
                                         wait_until):
    async with live_stack(tmp_path, make_config, login_account, wait_until) as live:
        prom = live.prom

        async def quiet_for_healthy_accounts() -> bool:
            rules = await prom.alerting_rules()
            return bool(rules) and all(r["health"] == "ok" for r in rules)

        await wait_until(quiet_for_healthy_accounts, 10, "rules evaluated")
        before = await prom.alerts()
        assert not [a for a in before if "account" in a["labels"]], before

        localdc.inject(Fault("rpc_error", user_id=live.ids["alice"], method="*",
                             error="SESSION_REVOKED"))
        localdc.inject(Fault("rpc_error", user_id=live.ids["bob"], method="updates.getState",
                             error="FLOOD_WAIT_600", times=1))
        live.config.path.write_text("this is [not valid toml\n")
        assert await live.daemon.reload() is False

        expected = {
            ("TgdaemonAccountNeedsLogin", "alice"),
            ("TgdaemonFloodWaitHigh", "bob"),
            ("TgdaemonAccountDown", "bob"),
            ("TgdaemonScrapeFailing", live.dead_instance),
            ("TgdaemonConfigReloadFailed", live.instance),
            ("TgdaemonNewAuthorization", "carol"),
        }

        async def all_firing() -> bool:
            return expected <= _firing(await prom.alerts())

        async with foreign_login(localdc, "carol"):
            try:
                await wait_until(all_firing, 25, "alerts firing")
            except AssertionError:
                raise AssertionError(f"alerts: {await prom.alerts()}") from None

        assert live.daemon.board.get("alice").state is State.NEEDS_LOGIN
        alerts = await prom.alerts()
        firing = _firing(alerts)
        # alice's own alert, not the generic "down" one; carol, connected, has only the
        # security alert.
        assert ("TgdaemonAccountDown", "alice") not in firing
        assert {a["labels"]["alertname"] for a in alerts
                if a["labels"].get("account") == "carol"} == {"TgdaemonNewAuthorization"}
        needs_login = next(a for a in alerts
                           if a["labels"]["alertname"] == "TgdaemonAccountNeedsLogin")
        assert "tgdaemon login alice" in needs_login["annotations"]["description"]
        assert needs_login["labels"]["severity"] == "warning"
