"""Which API call runs next: the daemon-wide bound, the per-account lanes and fairness.

Every account's heartbeats and updates share one event loop with the account API, so the API
must not be able to take that loop over: what an API call costs the loop is paid when it
*runs* (HTTP parsing, TL serialisation, encryption, the JSON answer), so the bound is on calls
that run — at most ``api.max_in_flight`` at once and ``api.max_rate`` started per second —
and on the calls waiting for a turn (``api.max_queued``). Beyond that a call is refused at
once (never queued without bound, never hung): 429 when its client holds more than its
share, else 503, both with ``Retry-After``.

Fair by construction: waiting calls are kept per client and, within a client, per account,
and turns go round-robin over clients, then over that client's accounts. One client with
1,000 calls queued on one account gets one turn in N while N clients wait; when the queue is
full, a newcomer holding less than the biggest holder pushes out that holder's newest waiting
call (answered 429 at once) instead of being refused — so no client, however busy, can keep
another out. Per account, ``account_concurrency`` calls run and ``account_queue`` more wait.

:class:`Scheduler` is the pure decision (no clock, no loop: ``now`` is passed in, grants and
evictions are returned); :class:`~tgdaemon.api.gateway.Gateway` wakes the waiting calls.
Heartbeats never pass through here: they use the account's client directly.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tgdaemon.apiconfig import ApiConfig

#: Calls one pass of the scheduler starts; more are started on the next loop iteration, so
#: a release of many slots at once never starts a storm of calls in one callback.
GRANTS_PER_PASS = 4
#: Upper bound of a ``Retry-After`` the scheduler suggests, seconds.
MAX_RETRY_AFTER = 30


class TicketState(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    DONE = "done"


_seq = itertools.count()


@dataclass(eq=False)
class Ticket:
    """One call asking for a turn: its client (config name) and account."""

    client: str
    account: str
    state: TicketState = TicketState.WAITING
    seq: int = field(default_factory=lambda: next(_seq))


class Refusal(Enum):
    """Why a call gets no place; the gateway maps each to an HTTP answer."""

    ACCOUNT_FULL = "account_full"  # the account's lane (running + waiting) is full: 429
    OVER_SHARE = "over_share"  # daemon full and this client holds the most: 429
    DAEMON_FULL = "daemon_full"  # daemon full, the caller within its share: 503


@dataclass(frozen=True)
class Admitted:
    """The result of :meth:`Scheduler.submit`: the caller is queued (perhaps already
    granted), and ``evicted`` (another client's newest waiting call) lost its place."""

    evicted: Ticket | None = None


@dataclass(frozen=True)
class Refused:
    why: Refusal
    retry_after: int


@dataclass(frozen=True)
class Pass:
    """One scheduling pass: who may run now, and when to look again (a monotonic time for
    the rate limit's next token, ``0.0`` for "at once" — more were ready than one pass
    starts — or None when nothing waits for a token)."""

    granted: tuple[Ticket, ...] = ()
    again_at: float | None = None


class Scheduler:
    """See the module docstring. Counts: ``running`` + ``waiting`` daemon-wide, per client
    ("held") and per account; waiting tickets per account and client in arrival order; the
    round-robin of clients and of each client's accounts holds only those that could run
    now (an account at its concurrency leaves the rotation until one of its calls ends)."""

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self._held: dict[str, int] = {}
        self._account_running: dict[str, int] = {}
        self._account_users: dict[str, int] = {}
        #: account -> client -> its waiting tickets, oldest first.
        self._queues: dict[str, dict[str, deque[Ticket]]] = {}
        self._ready_clients: deque[str] = deque()
        self._ready_accounts: dict[str, _Rotation] = {}
        self._tokens = 0.0
        self._stamp: float | None = None

    # -- decisions -------------------------------------------------------------------------

    def submit(self, ticket: Ticket, limits: ApiConfig) -> Admitted | Refused:
        """Place ``ticket`` in its queue, or refuse it; never waits. Call :meth:`schedule`
        after an admission to start what may start."""
        users = self._account_users.get(ticket.account, 0)
        if users >= limits.account_concurrency + limits.account_queue:
            ticket.state = TicketState.DONE
            return Refused(Refusal.ACCOUNT_FULL, 1)
        evicted = None
        if self.running + self.waiting >= limits.max_in_flight + limits.max_queued:
            evicted = self._victim(ticket.client)
            if evicted is None:
                ticket.state = TicketState.DONE
                mine = self._held.get(ticket.client, 0)
                top = max(self._held.values(), default=0)
                why = Refusal.OVER_SHARE if mine and mine >= top else Refusal.DAEMON_FULL
                return Refused(why, self._retry_after(limits))
            self._remove_waiting(evicted)
            users = self._account_users.get(ticket.account, 0)
        self._held[ticket.client] = self._held.get(ticket.client, 0) + 1
        self._account_users[ticket.account] = users + 1
        queue = self._queues.setdefault(ticket.account, {}).setdefault(ticket.client, deque())
        queue.append(ticket)
        self.waiting += 1
        if len(queue) == 1 and self._may_run(ticket.account, limits):
            self._make_ready(ticket.client, ticket.account)
        return Admitted(evicted)

    def schedule(self, limits: ApiConfig, now: float) -> Pass:
        """Start up to :data:`GRANTS_PER_PASS` waiting calls, round-robin, within
        ``max_in_flight`` and the rate limit."""
        granted: list[Ticket] = []
        self._refill(limits, now)
        while self._ready_clients and self.running < limits.max_in_flight:
            if len(granted) == GRANTS_PER_PASS:
                return Pass(tuple(granted), 0.0)
            if limits.max_rate and self._tokens < 1.0:
                return Pass(tuple(granted), now + (1.0 - self._tokens) / limits.max_rate)
            ticket = self._next_ready(limits)
            if ticket is not None:
                if limits.max_rate:
                    self._tokens -= 1.0
                granted.append(ticket)
        return Pass(tuple(granted))

    def finish(self, ticket: Ticket, limits: ApiConfig) -> None:
        """A call ended (ran to the end, timed out, was cancelled while waiting): its place
        is free. Call :meth:`schedule` afterwards."""
        if ticket.state is TicketState.WAITING:
            self._remove_waiting(ticket)
        elif ticket.state is TicketState.RUNNING:
            ticket.state = TicketState.DONE
            self.running -= 1
            _decrement(self._account_running, ticket.account)
            self._release(ticket.client, ticket.account)
            # The account may run one more: its clients' queues go back in rotation.
            if self._may_run(ticket.account, limits):
                for client in self._queues.get(ticket.account, ()):
                    self._make_ready(client, ticket.account)

    # -- internals -------------------------------------------------------------------------

    def _may_run(self, account: str, limits: ApiConfig) -> bool:
        return self._account_running.get(account, 0) < limits.account_concurrency

    def _make_ready(self, client: str, account: str) -> None:
        rotation = self._ready_accounts.get(client)
        if rotation is None:
            rotation = self._ready_accounts[client] = _Rotation()
            self._ready_clients.append(client)
        rotation.add(account)

    def _next_ready(self, limits: ApiConfig) -> Ticket | None:
        """Take the next client in rotation and its next account, and start that queue's
        oldest call; None when that account turned out not to be runnable (it leaves the
        rotation until a call of it ends or a new one arrives)."""
        client = self._ready_clients.popleft()
        rotation = self._ready_accounts[client]
        account = rotation.pop()
        by_client = self._queues.get(account)
        queue = by_client.get(client) if by_client else None
        ticket = None
        if by_client is not None and queue and self._may_run(account, limits):
            ticket = queue.popleft()
            if not queue:
                del by_client[client]
                if not by_client:
                    del self._queues[account]
            ticket.state = TicketState.RUNNING
            self.waiting -= 1
            self.running += 1
            self._account_running[account] = self._account_running.get(account, 0) + 1
            if queue and self._may_run(account, limits):
                rotation.add(account)
        if rotation:
            self._ready_clients.append(client)
        else:
            del self._ready_accounts[client]
        return ticket

    def _victim(self, client: str) -> Ticket | None:
        """The newest waiting call of the client holding the most, if that client holds
        more than ``client`` would with this call (max-min fairness of the places)."""
        mine = self._held.get(client, 0)
        best: tuple[int, str] | None = None
        for other, held in self._held.items():
            if other != client and held > mine + 1 and (best is None or held > best[0]):
                best = (held, other)
        if best is None:
            return None
        newest = None
        for by_client in self._queues.values():
            queue = by_client.get(best[1])
            if queue and (newest is None or queue[-1].seq > newest.seq):
                newest = queue[-1]
        return newest

    def _remove_waiting(self, ticket: Ticket) -> None:
        by_client = self._queues[ticket.account]
        queue = by_client[ticket.client]
        queue.remove(ticket)
        if not queue:  # a stale entry left in the rotation is dropped when reached
            del by_client[ticket.client]
            if not by_client:
                del self._queues[ticket.account]
        ticket.state = TicketState.DONE
        self.waiting -= 1
        self._release(ticket.client, ticket.account)

    def _release(self, client: str, account: str) -> None:
        _decrement(self._held, client)
        _decrement(self._account_users, account)

    def _refill(self, limits: ApiConfig, now: float) -> None:
        """The token bucket of ``max_rate``: one second's worth at most (one call at least,
        or a rate below 1 a second would never start one)."""
        if not limits.max_rate:
            self._stamp = None
            return
        capacity = max(1.0, limits.max_rate)
        if self._stamp is None:
            self._tokens = capacity
        else:
            self._tokens = min(capacity, self._tokens + (now - self._stamp) * limits.max_rate)
        self._stamp = now

    def _retry_after(self, limits: ApiConfig) -> int:
        """Seconds until the calls waiting now have likely started (at ``max_rate``)."""
        if not limits.max_rate:
            return 1
        return max(1, min(MAX_RETRY_AFTER, math.ceil(self.waiting / limits.max_rate)))


class _Rotation:
    """An insertion-ordered set with pop-first: a client's accounts taking turns."""

    __slots__ = ("_members", "_order")

    def __init__(self) -> None:
        self._order: deque[str] = deque()
        self._members: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self._order)

    def add(self, item: str) -> None:
        if item not in self._members:
            self._members.add(item)
            self._order.append(item)

    def pop(self) -> str:
        item = self._order.popleft()
        self._members.discard(item)
        return item


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]


@dataclass(frozen=True)
class StreamPlace:
    """Whether a new update stream of a client opens, and whose newest stream makes room."""

    opens: bool
    evict: str | None = None


def stream_place(held: Mapping[str, int], client: str, limit: int) -> StreamPlace:
    """The streams' share, by the calls' rule: while fewer than ``limit`` are open a new one
    opens; when full, a client holding fewer than the biggest holder minus one pushes out that
    holder's newest stream (closed with 1013: it resumes by cursor, nothing lost) — so one
    client cannot keep the others out by holding every stream — else it is refused. Pure:
    ``held`` is the open streams per client (not counting those already pushed out)."""
    if sum(held.values()) < limit:
        return StreamPlace(True)
    if not held:
        return StreamPlace(False)
    biggest = max(held, key=lambda name: (held[name], name))
    if held.get(client, 0) + 1 < held[biggest]:
        return StreamPlace(True, evict=biggest)
    return StreamPlace(False)
