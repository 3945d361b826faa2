"""Pure parts of the bench: /proc readers, spreads, ratios, target verdicts, RESULTS.md."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.procfs import CpuMark, cpu_percent, cpu_seconds, rss_kb
from bench.report import (
    outage_rows,
    phase_table_rows,
    prometheus_lines,
    ratio,
    spread,
    target_lines,
    with_prometheus_section,
    write_results,
)


def test_proc_readers_see_this_process() -> None:
    assert rss_kb(os.getpid()) > 1000
    assert cpu_seconds(os.getpid()) > 0


def test_proc_readers_of_a_gone_process_are_zero() -> None:
    assert rss_kb(2**22 + 12345) == 0
    assert cpu_seconds(2**22 + 12345) == 0.0


def test_cpu_percent_is_of_one_core() -> None:
    assert cpu_percent(CpuMark(1, 10.0, 100.0), CpuMark(1, 10.5, 110.0)) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="different"):
        cpu_percent(CpuMark(1, 0, 0), CpuMark(2, 1, 1))


def test_spread_and_ratio() -> None:
    assert spread([3.0, 1.0, 2.0]) == "2.00 (1.00-3.00)"
    assert spread([1.5]) == "1.50"
    assert spread([None]) == "-"
    assert ratio(3.0, 2.0) == "1.50x"
    assert ratio(1.0, 0.0) == "-"


def _run(rss: float, cpu: float, **extra: object) -> dict:
    return {"rss_per_account_kb": rss, "rss_kb": 100_000, "rss_base_kb": 50_000,
            "cpu_pct": cpu, "connect_s": 30.0, "dc_cpu_pct": [1.0, 2.0], **extra}


def _results(n: int, daemon: dict, baseline: dict) -> dict:
    return {
        "machine": {"nproc": 2, "cpu": "x", "ram_gb": 1.0, "python": "3.11", "telethon": "1.45.0",
                    "tgdaemon": "0.1.0", "kernel": "k", "date": "d"},
        "args": {"dc_procs": 2, "heartbeat": 30.0, "log_level": "info", "window": 30.0,
                 "settle": 5.0, "outage": 30.0},
        "sizes": [{"n": n, "repeats": 1, "daemon": [daemon], "baseline": [baseline],
                   "daemon_default_rate": []}],
        "not_run": [], "wall_seconds": 60.0,
    }


def test_targets_met_and_missed_at_10000() -> None:
    scrape = {"seconds": 0.5, "seconds_gzip": 0.6, "bytes": 1, "bytes_gzip": 1, "series": 1,
              "account_series": 1}
    good = target_lines(_results(10000, _run(40, 8, scrape=scrape), _run(45, 9)))[0]
    assert "MISSED" not in good
    bad = target_lines(_results(10000, _run(80, 30, scrape=scrape), _run(45, 9)))[0]
    assert "≤ 64 KB/account **MISSED**" in bad
    assert "idle CPU ≤ 25 % **MISSED**" in bad


def test_outage_verdicts() -> None:
    outage = {"seconds": 30, "recovered_s": None, "connected_at_end": 10,
              "attempts_peak_fraction": 0.5, "attempts_peak_per_s": 500, "attempts_total": 9}
    results = _results(1000, _run(50, 1, outage=outage), _run(45, 1))
    line = target_lines(results)[0]
    assert "outage recovery ≤ 60 s (never) **MISSED**" in line
    # connect_rate = 0: the herd defence is off, so the peak is shown, not judged.
    assert "(50.0 %): limiter off, not a target" in line
    results["sizes"][0]["fast_rate"] = 250.0
    limited = target_lines(results)[0]
    assert "(50.0 %) **MISSED**" in limited


def test_write_results(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    write_results(_results(100, _run(50, 1), _run(40, 1)), out, None)
    text = out.read_text()
    assert "## N = 100 accounts (1 repeat(s))" in text
    assert "| RSS per account, KB (incremental) | 50.0 | 40.0 | 1.25x |" in text


def test_flood_storm_verdict() -> None:
    flood = {"accounts": 100, "seconds": 30, "errors_served": 100, "requests_during_wait": 0,
             "resumed": 100, "all_hit_s": 31.0, "all_resumed_s": 70.0}
    line = target_lines(_results(1000, _run(50, 1, flood=flood), _run(45, 1)))[0]
    assert "flood storm, no request before a deadline (0 from 100 flooded accounts), " \
        "all resumed (100/100) **met**" in line
    early = {**flood, "requests_during_wait": 3}
    line = target_lines(_results(1000, _run(50, 1, flood=early), _run(45, 1)))[0]
    assert "(3 from 100 flooded accounts)" in line
    assert line.rstrip().endswith("**MISSED**")


def test_issue_17_targets() -> None:
    scrape = {"seconds": 0.5, "seconds_gzip": 0.6, "bytes": 2_500_000, "bytes_gzip": 1,
              "series": 80_000, "account_series": 70_000}
    outage = {"seconds": 12, "recovered_s": 1.5, "connected_at_end": 10000,
              "attempts_peak_fraction": 0.05, "attempts_peak_per_s": 500, "attempts_total": 9,
              "loop_lag_max_s": 0.25}
    daemon = _run(40, 8, scrape=scrape, outage=outage, connect_s=20.0,
                  loop_lag_idle_max_s=0.02, loop_lag_connect_max_s=0.09)
    results = _results(10000, daemon, _run(45, 9, connect_s=15.0))
    results["sizes"][0]["fast_rate"] = 5000.0
    line = target_lines(results)[0]
    assert "connect 20.0 s vs 15.0 s, 1.33x baseline **MISSED**" in line
    assert "event-loop lag, idle window: max 20 ms ≤ 100 ms **met**" in line
    assert "event-loop lag, connecting all: max 90 ms ≤ 100 ms **met**" in line
    assert "event-loop lag, outage end until all back: max 250 ms ≤ 100 ms **MISSED**" in line
    assert "7.0 series per account ≤ 8 **met**" in line
    assert "/metrics 2.38 MB ≤ 3 MB **met**" in line
    assert "back ≤ max(2 s, N/connect_rate) = 2.0 s after the server returned (1.5 s) " \
        "**met**" in line
    slow = {**outage, "recovered_s": 9.6}
    results["sizes"][0]["daemon"][0]["outage"] = slow
    assert "(9.6 s) **MISSED**" in target_lines(results)[0]


def test_lag_and_gc_pauses_shown_beside_the_baseline(tmp_path: Path) -> None:
    daemon = _run(40, 8, loop_lag_idle_max_s=0.02, gc_full_total=0, gc_pause_max_s=0.004)
    baseline = _run(45, 9, loop_lag_idle_max_s=0.31, gc_full_total=7, gc_pause_max_s=1.2)
    results = _results(1000, daemon, baseline)
    line = target_lines(results)[0]
    assert "event-loop lag, idle window: max 20 ms (baseline 310 ms) ≤ 100 ms **met**" in line
    out = tmp_path / "RESULTS.md"
    write_results(results, out, None)
    text = out.read_text()
    assert "| full GCs from start to stop (count) | 0 | 7 | 0.00x |" in text
    assert "| longest GC pause from start to stop, s | 0.004 | 1.200 | 0.00x |" in text


def test_short_outage_table_judges_each_tgdaemon_run_and_shows_the_baseline() -> None:
    """N = 100: the default rate (20/s, burst 50) is back within N / rate = 5 s but its
    reconnect wave is far above 10 % of N per second; a 10 %-of-N rate meets both; the
    baseline has no limiter and is shown, not judged."""
    def outage(back: float, peak: int) -> dict:
        return {"seconds": 12, "recovered_s": back, "connected_at_end": 100,
                "attempts_peak_per_s": peak, "attempts_peak_fraction": peak / 100,
                "attempts_total": 120}

    results = _results(100, _run(50, 1, outage=outage(18.0, 9)), _run(45, 1,
                                                                     outage=outage(0.8, 100)))
    size = results["sizes"][0]
    size.update(fast_rate=5.0, fast_burst=4,
                daemon_default_rate=[{"outage": outage(3.1, 68)}])
    rows = {r[1]: r for r in outage_rows(size)}
    fast = rows["tgdaemon, connect_rate 5/s, burst 4"]
    assert fast[4:] == ["20.0", "9 (9.0 %)", "120", "time met; peak met"]
    default = rows["tgdaemon, default rate (20/s, burst 50)"]
    assert default[3:] == ["3.1", "5.0", "68 (68.0 %)", "120", "time met; peak MISSED"]
    assert rows["baseline"][4] == "-"
    assert rows["baseline"][-1] == "no limiter (contrast)"
    size["fast_rate"] = 0.0  # the limiter off: 2 s to meet, the peak not judged
    assert outage_rows(size)[0][-1] == "time MISSED; peak: limiter off, not a target"


def test_a_merged_variant_does_not_repeat_the_default_rate_outage_row(tmp_path: Path) -> None:
    """``run.py --merge`` of a variant run (the main run at another connect_rate) next to the
    plain run of the same N: both entries measured the default rate, the same configuration,
    shown once; the variant's own run and a variant-only N keep their rows."""
    def outage(back: float) -> dict:
        return {"seconds": 12, "recovered_s": back, "connected_at_end": 100,
                "attempts_peak_per_s": 51, "attempts_peak_fraction": 0.51,
                "attempts_total": 168}

    def size(n: int, variant: str | None, fast_rate: float, back: float) -> dict:
        return {"n": n, "repeats": 1, "variant": variant, "fast_rate": fast_rate,
                "fast_burst": 6, "daemon": [_run(40, 1, outage=outage(back))],
                "baseline": [_run(45, 1, outage=outage(1.4))] if variant is None else [],
                "daemon_default_rate": [{"outage": outage(2.1)}]}

    results = _results(100, _run(40, 1), _run(45, 1))
    results["sizes"] = [size(100, None, 0.0, 1.0), size(100, "connect_rate 3/s, burst 6", 3.0,
                                                         33.0),
                        size(300, "connect_rate 3/s, burst 6", 3.0, 99.0)]
    default = "tgdaemon, default rate (20/s, burst 50)"
    rows = [(r[0], r[1]) for r in phase_table_rows(results["sizes"], "outage")]
    assert rows == [("100", "tgdaemon, unlimited rate"), ("100", default), ("100", "baseline"),
                    ("100", "tgdaemon, connect_rate 3/s, burst 6"),
                    ("300", "tgdaemon, connect_rate 3/s, burst 6"), ("300", default)]
    out = tmp_path / "RESULTS.md"
    write_results(results, out, None)
    table = out.read_text().split("## Total outage recovery")[1].split("##")[0]
    assert table.count(f"| 100 | {default} |") == 1
    assert table.count(f"| 300 | {default} |") == 1


def _prom(body: float, samples: float) -> dict:
    return {"scrapes": 20.0, "failed_scrapes": 0.0, "duration_median_s": 0.12,
            "duration_max_s": 0.31, "samples_per_scrape": samples, "body_bytes": body,
            "head_series": int(samples) + 300, "rss_start_kb": 150 * 1024, "rss_end_kb": 200 * 1024,
            "rss_max_kb": 210 * 1024, "cpu_pct": 3.25, "sessions_gauges": 10000,
            "connected": 10000, "connected_end": 9990, "loadavg_median": 1.54, "loadavg_max": 2.0}


def test_prometheus_scrape_section(tmp_path: Path) -> None:
    """bench/metrics_scrape.py --prometheus: one row per histogram setting, the issue-17
    target judged on the default one, and a validation run said to be one."""
    measured = {"accounts": 10000, "duration_s": 300.0, "interval_s": 15.0, "date": "d",
                "settings": {"fleet": _prom(2_900_000, 50_040),
                             "account": _prom(12_000_000, 180_040)}}
    results = _results(100, _run(50, 1), _run(40, 1))
    results["prometheus_scrape"] = measured
    out = tmp_path / "RESULTS.md"
    write_results(results, out, None)
    text = out.read_text()
    assert "## A real Prometheus scraping /metrics, N = 10,000 accounts" in text
    assert "| `fleet` (default) | 20 (0 failed) | 0.120 / 0.310 | 50,040 | 5.0 | 2.77 | " \
        "50,340 | 150 → 200 / 210 | 3.2 | 10,000 → 9,990 | 10,000 | 1.5 / 2.0 |" in text
    assert "Scrapes longer than the interval" not in text
    assert "| `account` | 20 (0 failed) |" in text
    assert "2.77 MB ≤ 3 MB and 5.0 samples per account ≤ 8 **met**" in text
    measured["settings"]["fleet"] = _prom(3_300_000, 50_040)
    assert "3.15 MB ≤ 3 MB and 5.0 samples per account ≤ 8 **MISSED**" in "\n".join(
        prometheus_lines(measured))
    measured["settings"]["fleet"] = {**_prom(2_900_000, 90_000), "connected": 4_000}
    measured["settings"]["account"] = {**_prom(12_000_000, 180_040), "duration_max_s": 16.5,
                                       "failed_scrapes": 3.0}
    text = "\n".join(prometheus_lines(measured))
    assert "9.0 samples per account ≤ 8 (with 4,000 of 10,000 connected: the others' " \
        "series are those of accounts connecting or in trouble) **MISSED**" in text
    assert "Scrapes longer than the interval: `account` 16.5 s; failed scrapes " \
        "(Prometheus' `scrape_timeout` is 10 s): `account` 3 of 20." in text
    small = {**measured, "accounts": 1000, "duration_s": 60.0,
             "settings": {"fleet": _prom(250_000, 4_050)}}
    text = "\n".join(prometheus_lines(small))
    assert "0.24 MB, scaled to 10,000 accounts 2.38 MB ≤ 3 MB and 4.0 samples per account " \
        "≤ 8 (not the issue's 10,000 accounts for 5 minutes: a validation run) **met**" in text


def test_prometheus_section_replaces_only_itself() -> None:
    md = "# B\n\n## N = 100 accounts\n\nkept\n\n## Targets (x)\n\n- t\n"
    first = with_prometheus_section(md, ["## A real Prometheus scraping /metrics, N = 1", "",
                                         "one", ""])
    assert first == ("# B\n\n## N = 100 accounts\n\nkept\n\n## A real Prometheus scraping "
                     "/metrics, N = 1\n\none\n\n## Targets (x)\n\n- t\n")
    second = with_prometheus_section(first, ["## A real Prometheus scraping /metrics, N = 2",
                                             "", "two", ""])
    assert second == first.replace("N = 1\n\none", "N = 2\n\ntwo")
    assert with_prometheus_section("# B\n", ["## A real Prometheus scraping /metrics", "",
                                             "x", ""]) == (
        "# B\n\n## A real Prometheus scraping /metrics\n\nx\n")
