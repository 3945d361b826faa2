"""What an account does on each event: the daemon's state machine, as pure functions.

No I/O, no clock, no Telethon: the worker (``tgdaemon.worker``) does the connection I/O and asks
this module what to do next; the reporter (``tgdaemon.reporter``) publishes the result. The
vocabulary (``State``, ``Category``, ``Action``) is defined here once; metrics, the status API,
the store's status column and the CLI all use these names.

Recovery rules (``recovery_for``):

* ``attempt`` is 0-based: the number of earlier consecutive failures of the same category. A
  per-category retry limit ``L`` (``[policy.retry_limits]``, 0 = unlimited) is the number of
  consecutive failures tolerated: the ``L``-th one gives ``FAIL``. So ``client = 1`` means a
  400-class error is never retried.
* FLOOD_WAIT waits at least the server's seconds. Up to ``policy.flood_sleep_max`` the
  connection is kept (``WAIT``); a longer wait closes it (``RETRY`` at the deadline), so no
  socket is held for hours. Either way the account shows ``flood_wait`` with its deadline.
* AUTH never retries: ``PARK`` in ``needs_login``, ``banned`` or ``duplicated``; the encrypted
  session is kept for inspection.
* MIGRATE (USER/PHONE/NETWORK_MIGRATE_X) gives ``MIGRATE`` to ``new_dc``. FILE/STATS_MIGRATE
  concern one request, not the account's home DC: ``FAIL``. More than :data:`MAX_MIGRATIONS`
  consecutive migrations is a loop: ``FAIL``.
* NETWORK retries quickly while the failure is young: ``uniform(0, backoff_base)`` until it
  has persisted ``backoff_cap`` seconds (``persisted``), then the capped, jittered exponential
  backoff of its attempt number. A short outage (a restart, a blip) is over before any account
  sleeps long; the daemon-wide connect-rate limiter, not each account's backoff, keeps the
  fleet's retries from being a herd. A failure that persists backs off as before.
* Everything else retries after a capped, jittered exponential backoff.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import TYPE_CHECKING

from tgdaemon.retry import backoff_delay, flood_wait_delay

if TYPE_CHECKING:
    from tgdaemon.config import PolicyConfig

__all__ = [
    "ATTEMPT_STATES",
    "ENDED_STATES",
    "HEARTBEAT_JITTER",
    "HEARTBEAT_TICK",
    "MAX_MIGRATIONS",
    "OWNED_STATES",
    "PARKED_STATES",
    "WATCHED_STATES",
    "Action",
    "Category",
    "Classified",
    "Recovery",
    "Setup",
    "State",
    "heartbeat_delay",
    "heartbeat_tick",
    "longest_heartbeat_gap",
    "recovery_for",
    "watchdog_restarts",
]


class State(StrEnum):
    """What an account is doing; the values are the public names (metrics, JSON, logs, the
    store's ``status`` column)."""

    STARTING = "starting"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    FLOOD_WAIT = "flood_wait"
    NEEDS_LOGIN = "needs_login"
    BANNED = "banned"
    DUPLICATED = "duplicated"
    DISABLED = "disabled"
    STOPPED = "stopped"


#: Parked: the worker waits for an operator (a login, a reload), not for a timer.
PARKED_STATES = frozenset({State.NEEDS_LOGIN, State.BANNED, State.DUPLICATED})
#: The watchdog expects progress (heartbeats, connect attempts) in these states.
WATCHED_STATES = frozenset(
    {State.STARTING, State.CONNECTING, State.CONNECTED, State.RECONNECTING})
#: A running daemon owns the session: the CLI must not touch it.
OWNED_STATES = WATCHED_STATES | {State.FLOOD_WAIT}
#: No worker runs: no connection, no live values (latency, heartbeat time).
ENDED_STATES = PARKED_STATES | {State.DISABLED, State.STOPPED}
#: Entered at every connect attempt. Their log line is DEBUG: the line that says why (the
#: failure) and the one that says it worked (``connected``) are INFO; at 10,000 accounts each
#: INFO line is 10,000 lines per fleet start or outage (about 0.1-0.4 ms of CPU each).
ATTEMPT_STATES = frozenset({State.CONNECTING, State.RECONNECTING})


class Setup(StrEnum):
    """What the CLI last did to an account: the store's ``status`` column holds one of these
    until a daemon runs the account (then its :class:`State`)."""

    NEW = "new"  # the column's default (migrations.py)
    IMPORTED = "imported"
    LOGGED_IN = "logged_in"
    LOGGED_OUT = "logged_out"


class Category(StrEnum):
    """What kind of failure (``tgdaemon.errors.classify``); the ``category`` metric label."""

    NETWORK = "network"
    FLOOD_WAIT = "flood_wait"
    AUTH = "auth"
    SERVER = "server"
    MIGRATE = "migrate"
    CLIENT = "client"
    UNKNOWN = "unknown"


class Action(Enum):
    """What the worker does about a failure."""

    RETRY = "retry"  # close the connection, wait ``delay``, connect again
    WAIT = "wait"  # keep the connection, send nothing for ``delay``, resume
    PARK = "park"  # close the connection and end: an operator must act
    MIGRATE = "migrate"  # move the account to another DC, login carried over
    FAIL = "fail"  # close the connection and end: retrying would not help


@dataclass(frozen=True, slots=True)
class Classified:
    """A failure as the state machine sees it (built by ``tgdaemon.errors.classify``)."""

    category: Category
    code: str  # stable short reason: "FLOOD_WAIT", "AUTH_KEY_UNREGISTERED", "TimeoutError", ...
    message: str  # redacted: safe to log and to show in /status
    wait_seconds: int | None = None  # FLOOD_WAIT
    new_dc: int | None = None  # MIGRATE
    park_state: State | None = None  # AUTH: NEEDS_LOGIN, BANNED or DUPLICATED


@dataclass(frozen=True, slots=True)
class Recovery:
    action: Action
    delay: float  # seconds before the next attempt (RETRY, WAIT); 0 otherwise
    next_state: State  # shown while the action runs (and after, for PARK and FAIL)
    new_dc: int | None = None  # MIGRATE
    reason: str = ""  # short, safe: why this action


MAX_MIGRATIONS = 5
HOME_MIGRATE_CODES = frozenset({"USER_MIGRATE", "PHONE_MIGRATE", "NETWORK_MIGRATE"})


def recovery_for(
    c: Classified, attempt: int, policy: PolicyConfig, rng: random.Random, *,
    persisted: float = math.inf,
) -> Recovery:
    """What to do about ``c``, the failure after ``attempt`` earlier consecutive ones of the
    same category (0-based), ``persisted`` seconds after the first of them (unknown: treated
    as a failure that persists). Pure: the delay comes from ``rng``, never from a clock."""
    if attempt < 0 or persisted < 0:
        raise ValueError("attempt and persisted must be >= 0")
    if c.category is Category.AUTH:
        state = c.park_state if c.park_state in PARKED_STATES else State.NEEDS_LOGIN
        assert state is not None
        return Recovery(Action.PARK, 0.0, state, reason=c.code)
    if c.category is Category.MIGRATE:
        if c.new_dc is None or c.code not in HOME_MIGRATE_CODES:
            return _fail(f"{c.code}: not a home DC migration")
        if attempt >= MAX_MIGRATIONS:
            return _fail(f"{c.code}: {attempt} migrations in a row")
        return Recovery(Action.MIGRATE, 0.0, State.RECONNECTING, new_dc=c.new_dc,
                        reason=f"{c.code} to DC {c.new_dc}")
    limit = policy.retry_limits.for_category(c.category.value)
    if limit and attempt + 1 >= limit:
        return _fail(f"{c.code}: {c.category.value} retry limit {limit} reached")
    if c.category is Category.FLOOD_WAIT:
        seconds = c.wait_seconds or 0
        keep = seconds <= policy.flood_sleep_max
        return Recovery(Action.WAIT if keep else Action.RETRY, flood_wait_delay(seconds, rng),
                        State.FLOOD_WAIT, reason=f"{c.code} {seconds}s")
    if c.category is Category.NETWORK and persisted < policy.backoff_cap:
        attempt = 0  # a young failure: retry within backoff_base (module docstring)
    delay = backoff_delay(attempt, base=policy.backoff_base, cap=policy.backoff_cap,
                          jitter=policy.backoff_jitter, rng=rng)
    return Recovery(Action.RETRY, delay, State.RECONNECTING, reason=c.code)


def _fail(reason: str) -> Recovery:
    return Recovery(Action.FAIL, 0.0, State.STOPPED, reason=reason)


# --------------------------------------------------------------------------- heartbeats

#: The wait between heartbeats is ``heartbeat_interval`` times a factor drawn uniformly from
#: ``[2 - HEARTBEAT_JITTER, HEARTBEAT_JITTER]``, so 10,000 accounts do not beat in lock-step.
HEARTBEAT_JITTER = 1.1
#: Heartbeat waits end on multiples of this fraction of ``heartbeat_interval`` (0.5 s at the
#: default 30 s), shared by every account (:mod:`tgdaemon.wheel`): the accounts due in one
#: tick wake, send and are answered together, in one loop turn rather than one each.
HEARTBEAT_TICK = 1 / 60


def heartbeat_delay(interval: float, rng: random.Random) -> float:
    """Seconds from one heartbeat to the next, before rounding up to a tick: the rounding
    adds less than a tick, so a wait stays within ``HEARTBEAT_JITTER * interval``."""
    return interval * rng.uniform(2 - HEARTBEAT_JITTER, HEARTBEAT_JITTER - HEARTBEAT_TICK)


def heartbeat_tick(interval: float) -> float:
    """The tick heartbeat waits are rounded up to (see :data:`HEARTBEAT_TICK`)."""
    return interval * HEARTBEAT_TICK


def longest_heartbeat_gap(policy: PolicyConfig) -> float:
    """The longest time between two answered heartbeats of a healthy connection: the longest
    wait plus a reply that takes the whole ``request_timeout``."""
    return HEARTBEAT_JITTER * policy.heartbeat_interval + policy.request_timeout


# --------------------------------------------------------------------------- watchdog

#: More workers than this stuck in one watchdog check are a stall of the process (paused,
#: starved of CPU), not of their accounts: one log line for them all, and counted once for the
#: fleet (``tgdaemon_watchdog_stall_restarts_total``), not per account.
STALL_WORKERS = 3


def watchdog_restarts(
    state: State,
    *,
    now: float,
    last_progress: float,
    waiting_until: float | None,
    stale_after: float,
) -> bool:
    """Whether the watchdog restarts a running worker (monotonic times).

    Only states that promise progress are watched: a parked or stopped worker has ended on
    purpose (restarting it would be a retry loop) and a flood wait has its own deadline. A
    worker in a deliberate wait (backoff, flood wait, a queue for a connect slot: ``inf``) is
    left alone until ``stale_after`` past the end of that wait."""
    if state not in WATCHED_STATES:
        return False
    if waiting_until is not None and now < waiting_until + stale_after:
        return False
    return now - last_progress > stale_after
