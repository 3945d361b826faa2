"""The daemon's only backoff schedule: pure functions of (attempt, policy, rng).

Why not ``backoff.expo`` + ``backoff.full_jitter`` directly: ``expo`` is a stateful generator
(the n-th delay costs n steps and the state must live somewhere), and ``full_jitter`` draws from
the global :mod:`random`, so delays could not be reproduced in tests or per account. The
formula here is the same as ``full_jitter(min(cap, next(expo(factor=base))))`` (the tests check
it against ``backoff.expo``), but takes the attempt number and an injected ``random.Random``.
"""

from __future__ import annotations

import random

JITTERS = ("full", "none")

# 2.0**1024 raises OverflowError; base * 2.0**1023 at worst becomes inf, which min() caps.
_MAX_EXPONENT = 1023


def backoff_delay(
    attempt: int, *, base: float, cap: float, jitter: str, rng: random.Random
) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based: 0 is the first retry).

    Exponential and capped: ``min(cap, base * 2**attempt)``; with ``jitter="full"`` the result is
    uniform in ``[0, that]`` so that thousands of accounts dropped by one network blip do not
    reconnect in lock-step.
    """
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    if base < 0 or cap < 0:
        raise ValueError("base and cap must be >= 0")
    if jitter not in JITTERS:
        raise ValueError(f"jitter must be one of {', '.join(JITTERS)}")
    ceiling = min(cap, base * 2.0 ** min(attempt, _MAX_EXPONENT))
    if jitter == "none":
        return ceiling
    return rng.uniform(0.0, ceiling)


def flood_wait_delay(seconds: int, rng: random.Random, *, jitter_max: float = 1.0) -> float:
    """Seconds to sleep for a FLOOD_WAIT of ``seconds``: never less than the server asked.

    A small positive jitter spreads accounts that hit the same limit at the same moment. A zero
    wait (seen on test servers) is treated as one second, as Telethon does, to avoid a hot loop.
    """
    if seconds < 0:
        raise ValueError("seconds must be >= 0")
    if jitter_max < 0:
        raise ValueError("jitter_max must be >= 0")
    return float(max(seconds, 1)) + rng.uniform(0.0, jitter_max)

