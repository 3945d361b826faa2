"""The shipped observability files pass Prometheus' own tooling, and the dashboard is sound.

``promtool check rules`` / ``test rules`` / ``check config`` on the files in config/, and
``promtool check metrics`` on the /metrics text of a live daemon attached to the local DC.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import phone_for
from tests.observability.promhelpers import (
    ALERT_TESTS,
    ALERTS,
    CONFIG_DIR,
    PROMTOOL,
    SCRAPE,
    alert_names,
    dashboard_queries,
    load_dashboard,
    selectors,
    unit_tested_alerts,
)
from tgdaemon.daemon import Daemon
from tgdaemon.status import State

pytestmark = pytest.mark.skipif(not os.access(PROMTOOL, os.X_OK),
                                reason=f"promtool not installed at {PROMTOOL} "
                                       "(scripts/install-system-deps.sh installs it)")

#: Metrics the issue asks the dashboard to show (names as Prometheus stores them).
DASHBOARD_METRICS = (
    "tgdaemon_account_state",
    "tgdaemon_account_up",
    "tgdaemon_rpc_latency_seconds_bucket",
    "tgdaemon_errors_total",
    "tgdaemon_reconnects_total",
    "tgdaemon_flood_wait_seconds_total",
    "tgdaemon_dc_failovers_total",
    "tgdaemon_worker_restarts_total",
    "tgdaemon_heartbeat_timestamp_seconds",
    "tgdaemon_new_authorizations_total",
    "tgdaemon_authorizations",
)


def promtool(*args: str, stdin: str | None = None, cwd: Path = CONFIG_DIR) -> str:
    result = subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True,
                            cwd=cwd, timeout=30, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def test_alert_rules_are_valid() -> None:
    out = promtool("check", "rules", ALERTS.name)
    assert f"SUCCESS: {len(alert_names(ALERTS.read_text()))} rules found" in out


def test_alert_unit_tests_pass() -> None:
    assert "SUCCESS" in promtool("test", "rules", ALERT_TESTS.name)


def test_every_alert_has_a_unit_test() -> None:
    names = alert_names(ALERTS.read_text())
    assert len(names) == len(set(names)) >= 6
    assert set(names) - unit_tested_alerts(ALERT_TESTS.read_text()) == set()


def test_alerts_cover_the_issue() -> None:
    text = ALERTS.read_text()
    for needle in ("tgdaemon_account_up", 'state="needs_login"', "tgdaemon_flood_wait_seconds",
                   "tgdaemon_heartbeat_timestamp_seconds", "tgdaemon_heartbeat_interval_seconds",
                   "tgdaemon_worker_restarts_total",
                   'up{job="tgdaemon"} == 0', "absent(up{job=\"tgdaemon\"})"):
        assert needle in text, needle


def test_production_for_durations_are_kept() -> None:
    """The shipped rules wait minutes, not the seconds the live test uses."""
    durations = re.findall(r"^\s+for: (\S+)$", ALERTS.read_text(), flags=re.MULTILINE)
    assert len(durations) == len(alert_names(ALERTS.read_text()))
    assert all(d == "0m" or d.endswith("m") for d in durations), durations


def test_scrape_example_is_valid_and_loads_the_rules() -> None:
    out = promtool("check", "config", SCRAPE.name)
    assert "1 rule files found" in out
    assert f"SUCCESS: {len(alert_names(ALERTS.read_text()))} rules found" in out


def test_dashboard_is_well_formed() -> None:
    dash = load_dashboard()
    assert dash["uid"] == "tgdaemon"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert set(variables) == {"datasource", "instance", "account"}
    ids = []
    for panel in dash["panels"]:
        ids.append(panel["id"])
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
    assert len(ids) == len(set(ids))
    queries = dashboard_queries(dash)
    used = {s.split("{")[0] for q in queries for s in selectors(q.expr)}
    assert set(DASHBOARD_METRICS) <= used
    for q in queries:
        for var in re.findall(r"\$\{?(\w+)", q.expr):
            assert var in variables or var == "__rate_interval", (q.panel, var)


@pytest.mark.parametrize("histograms", ["fleet", "account"])
async def test_check_metrics_on_live_daemon_output(make_config, login_account, wait_until,
                                                   histograms):
    config = make_config([{"name": n, "phone": phone_for(n)} for n in ("alice", "bob")],
                         daemon={"metrics_histograms": histograms})
    for name in ("alice", "bob"):
        await login_account(config, name)
    async with Daemon(config) as daemon:
        await wait_until(lambda: daemon.board.counts()[State.CONNECTED] == 2, 15, "connected")
        url = f"http://127.0.0.1:{daemon.http.port}/metrics"
        async with aiohttp.ClientSession() as http:

            async def scrape() -> str:
                async with http.get(url) as r:
                    assert r.status == 200
                    return await r.text()

            # Wait for the histogram and the heartbeat gauge, so every family is present.
            histogram = {"fleet": r"tgdaemon_rpc_latency_seconds_count [1-9]",
                         "account": r'tgdaemon_rpc_latency_seconds_count\{account="bob"\} [1-9]'}

            async def complete() -> bool:
                text = await scrape()
                return ("tgdaemon_heartbeat_timestamp_seconds{" in text
                        and re.search(r"tgdaemon_event_loop_lag_seconds_count [1-9]", text)
                        is not None
                        and (histograms == "fleet"
                             or 'tgdaemon_rpc_last_latency_seconds{account="bob"}' in text)
                        and re.search(histogram[histograms], text) is not None)

            await wait_until(complete, 10, "heartbeats in /metrics")
            text = await scrape()
    # promtool check metrics is a linter: it prints the problems it finds and exits non-zero.
    out = promtool("check", "metrics", stdin=text)
    assert out.strip() == "", out
