"""Lease decisions for a fleet shared by several daemons: pure functions, no I/O.

Every account has at most one owner (an instance id), a lease epoch and an expiry in the
store.  An instance renews all its leases in one statement per ``renew_interval``; what it
claims, releases and when it must close its connections are decided here from numbers the
lease store reports, so the rules are tested as tables (tests/leases/test_leases.py) apart
from the databases that carry them out (tgdaemon/leasestore.py).

Safety first: a lease is treated as *ours* only until ``renewal start + ttl - close_margin``
on our own monotonic clock.  The renewal's start, not its answer, is the reference: the store
set the expiry at or after that instant, so our deadline is never later than the store's.  By
that deadline every connection of the lease is closed, whether or not the store answered.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Protocol


class LeaseGate(Protocol):
    """What a worker asks before it connects and after each heartbeat (tgdaemon/fleet.py)."""

    def holds(self, account: str) -> bool:
        """Whether this daemon may use the account's session now."""

    def disconnect_delay(self, account: str) -> int:
        """Seconds until the lease's local deadline (for ``ping_delay_disconnect``)."""

    @property
    def lag_allowance(self) -> float:
        """Seconds before the server's deadline at which a worker re-arms it
        (:func:`lag_allowance`)."""


class LeaseLostError(Exception):
    """The account's lease is no longer ours: the worker must not connect (it ends)."""


class RenewalResult(enum.Enum):
    """Outcome of one renewal round (the ``result`` label of ``tgdaemon_lease_renewals_total``)."""

    OK = "ok"  # every lease we held was renewed
    LOST = "lost"  # the store answered, but some leases were no longer ours
    ERROR = "error"  # the store did not answer in time (unreachable, locked, paused)


@dataclass(frozen=True)
class LeaseTiming:
    """How long a lease lives, how often it is renewed, and how early a worker closes."""

    ttl: float = 60.0
    renew_interval: float = 10.0
    #: Seconds before the local deadline at which connections are closed (closing takes time).
    close_margin: float = 10.0

    def __post_init__(self) -> None:
        problems = timing_problems(self.ttl, self.renew_interval, self.close_margin)
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def transit_allowance(self) -> float:
        return transit_allowance(self.close_margin)

    @property
    def lag_allowance(self) -> float:
        return lag_allowance(self.ttl, self.renew_interval)

    def valid_until(self, renewal_started: float) -> float:
        """Local monotonic time until which a lease renewed at ``renewal_started`` may be used."""
        return renewal_started + self.ttl - self.close_margin


def timing_problems(ttl: float, renew_interval: float, close_margin: float) -> list[str]:
    """Why a lease timing is unsafe (empty when it is fine): a renewal must have two chances
    to succeed before connections close, or one slow statement drops the whole fleet."""
    out = []
    if not ttl > 0 or not renew_interval > 0 or not close_margin > 0:
        out.append("lease_ttl, lease_renew_interval and the close margin must be positive")
    elif ttl - close_margin < 2 * renew_interval:
        out.append(
            f"lease_ttl ({ttl:g}) must be at least 2 x lease_renew_interval + close margin "
            f"({2 * renew_interval:g} + {close_margin:g}): a single late renewal would close "
            "every connection")
    return out


def default_close_margin(ttl: float) -> float:
    """Connections close this long before the lease's local deadline: a sixth of the TTL,
    between 1 and 10 seconds (closing 10,000 clients takes a few seconds)."""
    return min(10.0, max(1.0, ttl / 6))


def transit_allowance(close_margin: float) -> float:
    """How much earlier than the lease's local deadline the server is asked to close: the
    server starts its ``ping_delay_disconnect`` timer when the ping *arrives*, and the ping
    waits in our send queue and on the wire after its delay is computed.  Half the close
    margin, at most 2 s (so the default timings keep their heartbeat room)."""
    return min(2.0, close_margin / 2)


def heartbeat_room(ttl: float, renew_interval: float) -> float:
    """About the shortest ``ping_delay_disconnect`` a connected worker sends (just before a
    renewal): a heartbeat must re-arm the server's timer within it, or the server drops
    connections between heartbeats (``check-config`` warns)."""
    margin = default_close_margin(ttl)
    return ttl - margin - renew_interval - transit_allowance(margin)


def lag_allowance(ttl: float, renew_interval: float) -> float:
    """How late this process may run (event-loop lag, a short pause) without the server
    closing a healthy connection: a worker re-arms the server's deadline this long before it
    passes.  A third of :func:`heartbeat_room` (about 12.7 s at the defaults): a takeover at
    13,000 accounts per process lagged 9-10 s, and a larger allowance pulls in more heartbeats
    (this one: about 5 % more of them at the defaults)."""
    return heartbeat_room(ttl, renew_interval) / 3


def heartbeat_due(began: float, due: float, armed_until: float, allowance: float,
                  interval: float) -> float:
    """When a fleet worker's next heartbeat is due: the usual (jittered) ``due``, or sooner,
    so that it re-arms the server's deadline (``armed_until``, local clock) ``allowance``
    before it passes.  Never sooner than half an ``interval`` after the wait ``began``: when
    renewals fail the lease's deadline stops moving, re-arming gains nothing, and the guard
    closes the connection; it must not turn every worker into a heartbeat loop."""
    return min(due, max(armed_until - allowance, began + interval / 2))


def next_renewal_in(started: float, now: float, renew_interval: float) -> float:
    """Seconds until the next renewal: ``renew_interval`` after this one *started*, so a slow
    statement does not stretch the period (each second it adds is a second less between a
    heartbeat's deadline and the next; under load, renewals of 13,000 leases took seconds),
    but at least a quarter interval, so a database that answers slowly is not asked again
    at once."""
    return max(renew_interval / 4, started + renew_interval - now)


def must_close(now: float, valid_until: float) -> bool:
    """Whether connections of a lease valid until ``valid_until`` must be closed now."""
    return now >= valid_until


def disconnect_delay(now: float, valid_until: float, allowance: float = 0.0) -> int:
    """Seconds to ask the server for in ``ping_delay_disconnect``: if this process stops
    talking (paused, partitioned), the server closes the connection by the lease deadline
    even though we cannot.  ``allowance`` (:func:`transit_allowance`) is for the time
    between now and the ping's arrival.  Whole seconds, rounded down, at least 1."""
    return max(1, math.floor(valid_until - allowance - now))


@dataclass(frozen=True)
class ClusterView:
    """What one instance knows of the fleet after a renewal (all counts of enabled accounts)."""

    accounts: int  # enabled accounts in the fleet
    live_instances: int  # instances with a renewal younger than the TTL, us included
    owned: int  # leases we hold now
    claimable: int  # enabled accounts without a valid lease


@dataclass(frozen=True)
class Balance:
    """What to do this round: release first (closed before released), then claim."""

    claim: int = 0
    release: int = 0


def fair_share(accounts: int, live_instances: int) -> int:
    """Accounts one instance should hold: the total divided by the live instances, rounded up
    (rounding up lets the shares cover the whole fleet)."""
    return math.ceil(accounts / max(1, live_instances))


def balance(view: ClusterView, capacity: int, moves: int) -> Balance:
    """Claim towards our share (never beyond ``capacity``), or give back what exceeds it.

    Releases are bounded by ``moves`` (what :class:`MoveBudget` allows now): a joining
    instance takes its share gradually, and each moved account is closed here before anybody
    can claim it.  Claims of unowned accounts are not bounded by moves: an orphaned account
    (its owner died) should be back as soon as the connect rate allows."""
    target = min(capacity, fair_share(view.accounts, view.live_instances))
    if view.owned > target:
        return Balance(release=max(0, min(view.owned - target, moves)))
    return Balance(claim=max(0, min(target - view.owned, view.claimable)))


class MoveBudget:
    """A token bucket of releases per minute (``per_minute`` = 0: no rebalancing moves).

    Mutable but pure: the caller passes the monotonic time."""

    def __init__(self, per_minute: int, now: float) -> None:
        self.per_minute = per_minute
        self._tokens = float(per_minute)
        self._at = now

    def available(self, now: float) -> int:
        elapsed = max(0.0, now - self._at)
        self._tokens = min(float(self.per_minute), self._tokens + elapsed * self.per_minute / 60)
        self._at = now
        return int(self._tokens)

    def spend(self, n: int) -> None:
        self._tokens = max(0.0, self._tokens - n)


def renewal_result(held: set[str] | frozenset[str], renewed: set[str] | frozenset[str]) -> (
        RenewalResult):
    """OK when every lease we held came back renewed, LOST when some did not."""
    return RenewalResult.OK if held <= renewed else RenewalResult.LOST
