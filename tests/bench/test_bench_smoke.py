"""The benchmark harness end to end at N=20 (``bench/run.py --smoke``), so it does not rot.

Runs as a subprocess, exactly as ``make bench`` does: localdc, daemon and baseline each in
their own process. Asserts on the shape of the results, never on timings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: The smoke run needs about 10 s of CPU but took 49-60 s of wall time on a loaded machine (three
#: fleets and their local DCs as processes): generous bounds, it is a smoke test, not a bench.
SMOKE_TIMEOUT = 180
pytestmark = pytest.mark.timeout(SMOKE_TIMEOUT + 60)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict, Path]:
    out = tmp_path_factory.mktemp("bench")
    work = out / "work"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--out",
         str(out / "RESULTS.md"), "--json", str(out / "results.json"), "--workdir", str(work)],
        cwd=ROOT, capture_output=True, text=True, timeout=SMOKE_TIMEOUT, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (out / "RESULTS.md").read_text(), json.loads((out / "results.json").read_text()), work


def test_every_fleet_connects_and_is_measured(smoke: tuple[str, dict, Path]) -> None:
    _md, results, _work = smoke
    assert results["failed"] == []
    assert results["not_run"] == []
    (size,) = results["sizes"]
    assert size["n"] == 20
    for run in size["daemon"] + size["baseline"]:
        assert run["connect_s"] > 0
        assert run["connected_after_window"] == 20
        assert run["rss_kb"] > run["rss_base_kb"] > 0
        # 20 connected accounts on at most the machine's cores, measured, not a placeholder.
        assert 0 <= run["cpu_pct"] <= 100 * (os.cpu_count() or 1)
        assert len(run["dc_cpu_pct"]) == 1
    assert size["daemon_default_rate"][0]["connect_s"] > 0


def test_metrics_scrape_counts_account_series(smoke: tuple[str, dict, Path]) -> None:
    _md, results, _work = smoke
    scrape = results["sizes"][0]["daemon"][0]["scrape"]
    assert scrape["bytes"] > scrape["bytes_gzip"] > 0
    assert scrape["account_series"] >= 20  # at least one series per account
    assert scrape["series"] >= scrape["account_series"]


def test_outage_recovers_and_counts_attempts(smoke: tuple[str, dict, Path]) -> None:
    _md, results, _work = smoke
    size = results["sizes"][0]
    for run in (size["daemon"][0], size["baseline"][0]):
        outage = run["outage"]
        assert outage["recovered_s"] is not None
        assert outage["connected_at_end"] == 20
        # every account reconnected at least once after the kill
        assert outage["attempts_total"] >= 20
        assert outage["timeline"]["connected"]


def test_flood_storm_is_honoured_and_counted_server_side(smoke: tuple[str, dict, Path]) -> None:
    md, results, _work = smoke
    size = results["sizes"][0]
    for run in (size["daemon"][0], size["baseline"][0]):
        flood = run["flood"]
        assert flood["accounts"] == 2  # a tenth of 20
        assert flood["errors_served"] == 2
        assert flood["requests_during_wait"] == 0
        assert flood["resumed"] == 2
    assert "## Flood-wait storm" in md


def test_results_markdown_has_table_and_machine(smoke: tuple[str, dict, Path]) -> None:
    md, _results, _work = smoke
    assert "## Machine" in md
    assert "| metric | tgdaemon | baseline | ratio |" in md
    assert "Telethon 1.45" in md
    assert "## Total outage recovery" in md


def test_no_secret_in_bench_artefacts(smoke: tuple[str, dict, Path]) -> None:
    """Logs and results hold no auth key (hex or base64) and no phone number."""
    md, results, work = smoke
    import base64

    from tgdaemon.localdc.store import Store as DcStore

    dc = DcStore(work / "n20" / "localdc1")
    try:
        keys = [r.key for r in dc.auth_keys.values()]
        phones = list(dc.users_by_phone)
    finally:
        dc.close()
    assert len(keys) == 20
    texts = [md, json.dumps(results)] + [p.read_text(errors="replace")
                                         for p in (work / "n20").glob("*.log")]
    needles = [k.hex()[:32] for k in keys] + [base64.b64encode(k).decode()[:32] for k in keys]
    needles += phones + [p.lstrip("+") for p in phones]
    for text in texts:
        for needle in needles:
            assert needle not in text
