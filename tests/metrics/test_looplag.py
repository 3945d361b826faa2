"""tgdaemon.looplag: the one loop-level lag probe (issue 17: lag <= 100 ms, exported)."""

from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tgdaemon.looplag import LAG_BUCKETS, LoopLag


def _samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    text = generate_latest(registry).decode()
    return {(s.name, s.labels.get("le", "")): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


@pytest.mark.parametrize(
    ("observations", "now", "expected_max"),
    [
        ([], 100.0, 0.0),
        ([(10.0, 0.02), (20.0, 0.3), (30.0, 0.01)], 30.0, 0.3),
        # the 0.3 s pause left the 60 s window: only later ones count
        ([(10.0, 0.02), (20.0, 0.3), (75.0, 0.01)], 81.0, 0.01),
        ([(10.0, -0.001)], 10.0, 0.0),  # a probe woken early is not negative lag
    ],
)
def test_max_over_the_window(observations, now, expected_max):
    lag = LoopLag(window=60.0)
    for t, value in observations:
        lag.observe(value, t)
    assert lag.max_recent(now) == expected_max


def test_histogram_buckets_count_and_sum():
    registry = CollectorRegistry()
    lag = LoopLag(registry, monotonic=lambda: 50.0)
    for value in (0.001, 0.04, 0.04, 0.7):
        lag.observe(value, 50.0)
    s = _samples(registry)
    assert s[("tgdaemon_event_loop_lag_seconds_bucket", "0.005")] == 1
    assert s[("tgdaemon_event_loop_lag_seconds_bucket", "0.05")] == 3
    assert s[("tgdaemon_event_loop_lag_seconds_bucket", "0.5")] == 3
    assert s[("tgdaemon_event_loop_lag_seconds_bucket", "+Inf")] == 4
    assert s[("tgdaemon_event_loop_lag_seconds_count", "")] == 4
    assert s[("tgdaemon_event_loop_lag_seconds_sum", "")] == pytest.approx(0.781)
    assert s[("tgdaemon_event_loop_lag_max_seconds", "")] == 0.7
    assert len([k for k in s if k[0].endswith("_bucket")]) == len(LAG_BUCKETS) + 1


async def test_the_probe_sees_a_blocked_loop(wait_until):
    registry = CollectorRegistry()
    lag = LoopLag(registry, interval=0.02)
    lag.start()
    try:
        await wait_until(lambda: _samples(registry)[
            ("tgdaemon_event_loop_lag_seconds_count", "")] >= 3, 10, "probes")
        time.sleep(0.3)  # noqa: ASYNC251 - deliberately hold the loop: the lag to measure
        await wait_until(lambda: lag.max_recent() >= 0.25, 10, "the pause measured")
        assert _samples(registry)[("tgdaemon_event_loop_lag_max_seconds", "")] >= 0.25
        assert _samples(registry)[("tgdaemon_event_loop_lag_seconds_bucket", "0.25")] < (
            _samples(registry)[("tgdaemon_event_loop_lag_seconds_count", "")])
    finally:
        await lag.stop()
    assert lag._task is None
