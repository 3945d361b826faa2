"""retry.py: the backoff schedule (property tests)."""

from __future__ import annotations

import random

import backoff
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tgdaemon.retry import backoff_delay, flood_wait_delay

bases = st.floats(min_value=0.0, max_value=100.0)
caps = st.floats(min_value=0.0, max_value=3600.0)
attempts = st.integers(min_value=0, max_value=10_000)
seeds = st.integers(min_value=0, max_value=2**32)


@given(attempt=attempts, base=bases, cap=caps, seed=seeds)
def test_full_jitter_stays_within_zero_and_the_capped_exponential(
    attempt: int, base: float, cap: float, seed: int
) -> None:
    d = backoff_delay(attempt, base=base, cap=cap, jitter="full", rng=random.Random(seed))
    ceiling = backoff_delay(attempt, base=base, cap=cap, jitter="none", rng=random.Random(seed))
    assert 0.0 <= d <= ceiling <= cap


@given(attempt=st.integers(min_value=0, max_value=200), base=bases, cap=caps)
def test_no_jitter_is_monotonic_and_capped(attempt: int, base: float, cap: float) -> None:
    rng = random.Random(0)
    a = backoff_delay(attempt, base=base, cap=cap, jitter="none", rng=rng)
    b = backoff_delay(attempt + 1, base=base, cap=cap, jitter="none", rng=rng)
    assert a <= b <= cap


@given(attempt=attempts, cap=caps)
def test_zero_base_never_waits(attempt: int, cap: float) -> None:
    assert backoff_delay(attempt, base=0.0, cap=cap, jitter="none", rng=random.Random()) == 0.0


def test_matches_backoff_expo_sequence() -> None:
    gen = backoff.expo(base=2, factor=1.5, max_value=60.0)
    next(gen)  # prime, as backoff does
    expected = [next(gen) for _ in range(12)]
    got = [backoff_delay(n, base=1.5, cap=60.0, jitter="none", rng=random.Random())
           for n in range(12)]
    assert got == expected


def test_full_jitter_is_spread_and_seeded() -> None:
    values = [backoff_delay(5, base=1, cap=60, jitter="full", rng=random.Random(s))
              for s in range(200)]
    assert min(values) < 5 < 27 < max(values)  # uniform over [0, 32]: not clumped
    assert backoff_delay(5, base=1, cap=60, jitter="full", rng=random.Random(3)) == values[3]


@pytest.mark.parametrize(
    "kwargs",
    [{"attempt": -1}, {"base": -1.0}, {"cap": -1.0}, {"jitter": "equal"}],
)
def test_invalid_arguments(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"attempt": 0, "base": 1.0, "cap": 60.0, "jitter": "full",
                               "rng": random.Random(0), **kwargs}
    with pytest.raises(ValueError):  # noqa: PT011 - any of several messages
        backoff_delay(**args)  # type: ignore[arg-type]


@given(seconds=st.integers(min_value=0, max_value=10**6), seed=seeds,
       jitter=st.floats(min_value=0.0, max_value=5.0))
def test_flood_wait_never_shorter_than_asked(seconds: int, seed: int, jitter: float) -> None:
    d = flood_wait_delay(seconds, random.Random(seed), jitter_max=jitter)
    assert max(seconds, 1) <= d <= max(seconds, 1) + jitter


def test_flood_wait_rejects_negative() -> None:
    with pytest.raises(ValueError, match="seconds"):
        flood_wait_delay(-1, random.Random(0))
    with pytest.raises(ValueError, match="jitter_max"):
        flood_wait_delay(1, random.Random(0), jitter_max=-0.1)

