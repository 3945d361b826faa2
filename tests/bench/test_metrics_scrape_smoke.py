"""``bench/metrics_scrape.py --prometheus`` end to end at N=20 for seconds, so it does not rot:
the daemon (as ``make bench`` runs it) scraped by the real Prometheus, once per histogram
setting. Asserts on what Prometheus recorded, never on timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.metrics_scrape import PROMETHEUS

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 240  # seconds of CPU are ~10; a loaded 2-core machine stretches the wall time
pytestmark = [
    pytest.mark.timeout(TIMEOUT + 60),
    pytest.mark.skipif(not os.access(PROMETHEUS, os.X_OK),
                       reason=f"Prometheus not installed at {PROMETHEUS} "
                              "(scripts/install-system-deps.sh installs it)"),
]


def test_prometheus_scrapes_the_daemon_in_both_histogram_settings(tmp_path: Path) -> None:
    n = 20
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "metrics_scrape.py"), "--prometheus",
         "--accounts", str(n), "--duration", "3", "--interval", "1", "--heartbeat", "1",
         "--dc-procs", "1", "--sessions-look", "0", "--json", str(tmp_path / "results.json"),
         "--out", str(tmp_path / "RESULTS.md"), "--workdir", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads((tmp_path / "results.json").read_text())["prometheus_scrape"]
    assert measured["accounts"] == n
    fleet, account = measured["settings"]["fleet"], measured["settings"]["account"]
    for r in (fleet, account):
        assert r["scrapes"] >= 2
        assert r["failed_scrapes"] == 0
        assert r["duration_median_s"] > 0
        assert r["rss_end_kb"] > 0
        assert r["head_series"] >= r["samples_per_scrape"]
    # Per account: up, state, heartbeat, new sessions (sessions after the first look) by
    # default; the per-account histogram (12) and last latency on top when opted in.
    assert 4 * n <= fleet["samples_per_scrape"] < 8 * n + 100
    assert account["samples_per_scrape"] >= fleet["samples_per_scrape"] + 13 * n - 13
    assert account["body_bytes"] > fleet["body_bytes"] > 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## A real Prometheus scraping /metrics, N = 20 accounts" in text
    assert "a validation run" in text
