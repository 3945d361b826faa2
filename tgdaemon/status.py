"""Live per-account status: the one place the supervisor publishes what each account is doing.

The board is plain in-process state (no I/O): each account's reporter
(``tgdaemon.reporter``) is the only writer of its entry, the HTTP layer
reads snapshots and streams changes, the metrics collector reads it at scrape time, so an
account costs one small object, not a set of always-updated metric series.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tgdaemon.lifecycle import State

log = logging.getLogger("tgdaemon.status")


@dataclass(frozen=True, slots=True)
class UserInfo:
    id: int
    username: str | None = None
    first_name: str | None = None


@dataclass(frozen=True, slots=True)
class NewLogin:
    """The last session seen on an account that is not the daemon's (no IP, no phone)."""

    device: str
    app: str
    country: str
    created: float
    seen: float
    terminated: bool = False


@dataclass(frozen=True, slots=True)
class AccountStatus:
    """What one account is doing now. Holds nothing secret: safe to serialise as is."""

    account: str
    state: State = State.STARTING
    reason: str = ""
    user: UserInfo | None = None
    dc_id: int | None = None
    latency: float | None = None
    last_checked: float | None = None
    last_error_category: str | None = None
    last_error_message: str | None = None
    #: Failures since the daemon started (any category; ``last_error_*`` is only the current
    #: trouble): which account keeps failing, without a metric series per account.
    errors: int = 0
    flood_wait_until: float | None = None
    authorizations: int | None = None
    last_new_authorization: NewLogin | None = None
    changed_at: float = 0.0

    @property
    def connected(self) -> bool:
        return self.state is State.CONNECTED

    def to_json(self) -> dict[str, Any]:
        """The seed document's ``StatusUpdate`` shape, extended with account and state."""
        return {
            "type": "status",
            "account": self.account,
            "state": self.state.value,
            "reason": self.reason,
            "connected": self.connected,
            "user": None
            if self.user is None
            else {
                "id": str(self.user.id),
                "username": self.user.username,
                "firstName": self.user.first_name,
            },
            "dc": self.dc_id,
            "latency": self.latency,
            "lastChecked": _iso(self.last_checked),
            "lastError": None
            if self.last_error_category is None
            else {"category": self.last_error_category, "message": self.last_error_message},
            "errors": self.errors,
            "floodWaitUntil": _iso(self.flood_wait_until),
            "authorizations": self.authorizations,
            "lastNewAuthorization": None
            if (login := self.last_new_authorization) is None
            else {
                "device": login.device,
                "app": login.app,
                "country": login.country,
                "created": _iso(login.created),
                "seen": _iso(login.seen),
                "terminated": login.terminated,
            },
            "changedAt": _iso(self.changed_at),
        }


_HEARTBEAT_FIELDS = frozenset({"latency", "last_checked"})


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


class Subscription:
    """A bounded queue of status changes for one listener (a WebSocket, a test).

    A listener that falls more than ``maxsize`` changes behind is cut off (``overflowed``)
    rather than letting the board's memory grow without bound.
    """

    def __init__(self, board: StatusBoard, maxsize: int) -> None:
        self._board = board
        self._queue: asyncio.Queue[AccountStatus | None] = asyncio.Queue(maxsize)
        self.overflowed = False

    def _offer(self, status: AccountStatus) -> None:
        if self.overflowed:
            return
        try:
            self._queue.put_nowait(status)
        except asyncio.QueueFull:
            self.overflowed = True
            self._board._unsubscribe(self)
            # Make room for the end marker so the reader wakes up and stops.
            self._queue.get_nowait()
            self._queue.put_nowait(None)

    def close(self) -> None:
        self._board._unsubscribe(self)
        if self._queue.full():
            self._queue.get_nowait()
        self._queue.put_nowait(None)

    def __aiter__(self) -> AsyncIterator[AccountStatus]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[AccountStatus]:
        while (item := await self._queue.get()) is not None:
            yield item

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class StatusBoard:
    """Holds every account's :class:`AccountStatus` and tells subscribers about changes."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._status: dict[str, AccountStatus] = {}
        #: Accounts per state, kept as statuses change: read 10 times a second (the GC
        #: policy's census) and on every summary, a count over 10,000 statuses each time was
        #: a per-account cost per read.
        self._counts: Counter[State] = Counter()
        self._subscribers: set[Subscription] = set()
        #: A fleet-wide note appended to the summary (e.g. a key rotation's progress).
        self.note: str | None = None

    def update(self, account: str, **changes: Any) -> AccountStatus:
        """Apply ``changes`` to the account's status; publish it when something changed."""
        old = self._status.get(account)
        if old is not None and changes.keys() <= _HEARTBEAT_FIELDS:
            # The hot path (every heartbeat of every account): stored, never pushed.
            self._status[account] = dataclasses.replace(old, **changes)
            return self._status[account]
        if old is None:
            new = AccountStatus(**{"account": account, **changes, "changed_at": self._clock()})
        else:
            # Compared field by field: building and comparing whole copies cost 0.3 ms per
            # update, 3 ms per account and start-up (profiled).
            differs = [k for k, v in changes.items() if getattr(old, k) != v]
            if not differs:
                return old
            if "state" in differs:
                changes["changed_at"] = self._clock()
            new = dataclasses.replace(old, **changes)
            if all(k in _HEARTBEAT_FIELDS for k in differs):
                # Heartbeat-only changes (latency, last_checked) are read from snapshots, not
                # pushed: 10,000 accounts would otherwise stream hundreds of messages a
                # second to every page.
                self._status[account] = new
                return new
        self._status[account] = new
        if old is None or old.state is not new.state:
            if old is not None:
                self._counts[old.state] -= 1
            self._counts[new.state] += 1
        for sub in tuple(self._subscribers):
            sub._offer(new)
        return new

    def remove(self, account: str) -> None:
        old = self._status.pop(account, None)
        if old is not None:
            self._counts[old.state] -= 1

    def get(self, account: str) -> AccountStatus | None:
        return self._status.get(account)

    def snapshot(self) -> list[AccountStatus]:
        return [self._status[name] for name in sorted(self._status)]

    def counts(self) -> Counter[State]:
        return +self._counts  # a copy without the states nobody is in

    def subscribe(self, maxsize: int = 1024) -> Subscription:
        sub = Subscription(self, maxsize)
        self._subscribers.add(sub)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)

    def summary(self) -> str:
        """One ASCII line for systemd's STATUS=: "5 accounts: 4 connected, 1 needs_login"."""
        line = summarise(len(self._status), self.counts().items())
        return line if self.note is None else f"{line}; {self.note}"


def summarise(total: int, counts: Iterable[tuple[State, int]]) -> str:
    parts = [f"{n} {state.value}" for state, n in sorted(counts, key=lambda kv: (-kv[1], kv[0]))]
    noun = "account" if total == 1 else "accounts"
    return f"{total} {noun}: " + (", ".join(parts) if parts else "none")
