"""The call gateway: every API call reaches Telegram through the account's own worker, or not
at all, and never hangs.

Admission is a pure decision on the account's status (:func:`admission`, tested as a table):
a connected account is called; one in a flood wait answers 429 with the seconds left; a
parked, disabled or stopped one 409; one (re)connecting 503 — at once, with the reason. Then
the :class:`~tgdaemon.api.admission.Scheduler` gives the call its turn: per account
(``account_concurrency`` running, ``account_queue`` waiting) and daemon-wide
(``max_in_flight``, ``max_queued``, ``max_rate``), fairly between clients, refusing at once
what does not fit; ``request_timeout`` bounds the whole call, queueing included.

A FLOOD_WAIT answer to an API call is the account's business, not the caller's: the gateway
refuses further calls until the deadline itself (the worker learns of it asynchronously) and
hands the wait to the worker (:meth:`AccountHandle.hold_for_flood_wait`), which then shows it
in /status and sends nothing — heartbeats included — before the deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol, TypeVar

from telethon import errors as te

from tgdaemon.api.admission import Admitted, Refusal, Scheduler, Ticket, TicketState
from tgdaemon.errors import classify
from tgdaemon.exceptions import AccountError
from tgdaemon.lifecycle import ENDED_STATES, Category, State
from tgdaemon.status import AccountStatus

if TYPE_CHECKING:
    from tgdaemon.apiconfig import ApiConfig
    from tgdaemon.telegram import ManagedClient

T = TypeVar("T")

#: The scheduler's lane for work over every account (``GET /v1/accounts``); not a valid
#: account name, so it never shares a lane with one.
FLEET_LANE = "*"


class Outcome(StrEnum):
    """How a call ended; the ``outcome`` metric label and the ``error`` code of the reply."""

    OK = "ok"
    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    FLOOD_WAIT = "flood_wait"
    BUSY = "busy"  # the account's queue is full, or the client holds more than its share
    OVERLOADED = "overloaded"  # the daemon-wide bound on API calls is reached
    PARKED = "parked"  # needs_login, banned, duplicated, disabled, stopped
    UNAVAILABLE = "unavailable"  # starting, connecting, reconnecting, network trouble
    TIMEOUT = "timeout"
    UPSTREAM = "upstream_error"  # Telegram answered with a server error
    ERROR = "error"  # a bug


HTTP_STATUS: dict[Outcome, int] = {
    Outcome.OK: 200, Outcome.BAD_REQUEST: 400, Outcome.UNAUTHORIZED: 401,
    Outcome.FORBIDDEN: 403, Outcome.NOT_FOUND: 404, Outcome.PARKED: 409,
    Outcome.FLOOD_WAIT: 429, Outcome.BUSY: 429, Outcome.ERROR: 500, Outcome.UPSTREAM: 502,
    Outcome.UNAVAILABLE: 503, Outcome.OVERLOADED: 503, Outcome.TIMEOUT: 504,
}


class ApiError(Exception):
    """A refused or failed call: becomes the HTTP answer (``retry_after`` -> Retry-After).
    ``message`` is safe to show (redacted); ``rpc_error`` is Telegram's error name; ``close``:
    the connection is closed after the answer (what the client still sends is not read)."""

    def __init__(self, outcome: Outcome, message: str, retry_after: int | None = None,
                 rpc_error: str | None = None, *, close: bool = False) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.message = message
        self.retry_after = retry_after
        self.rpc_error = rpc_error
        self.close = close

    @property
    def status(self) -> int:
        return HTTP_STATUS[self.outcome]

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {"error": self.outcome.value, "message": self.message}
        if self.retry_after is not None:
            body["retryAfter"] = self.retry_after
        if self.rpc_error is not None:
            body["rpcError"] = self.rpc_error
        return body


def _refused(why: Refusal, retry_after: int) -> ApiError:
    if why is Refusal.ACCOUNT_FULL:
        return ApiError(Outcome.BUSY, "too many calls queued for this account",
                        retry_after=retry_after)
    if why is Refusal.OVER_SHARE:
        return ApiError(Outcome.BUSY, "the daemon is at its API limit and this client holds "
                        "the most calls", retry_after=retry_after)
    return ApiError(Outcome.OVERLOADED, "the daemon is at its API limit (api.max_in_flight "
                    "+ api.max_queued)", retry_after=retry_after)


def admission(status: AccountStatus | None, now: float) -> ApiError | None:
    """Whether an account in ``status`` takes a call now (None) or why not. Pure."""
    if status is None:
        return ApiError(Outcome.NOT_FOUND, "no such account")
    state = status.state
    if state is State.CONNECTED:
        return None
    reason = f"account is {state.value}: {status.reason}" if status.reason else \
        f"account is {state.value}"
    if state is State.FLOOD_WAIT:
        left = (status.flood_wait_until or now) - now
        return ApiError(Outcome.FLOOD_WAIT, reason, retry_after=max(1, math.ceil(left)))
    if state in ENDED_STATES:  # the operator must act: not a matter of retrying
        return ApiError(Outcome.PARKED, reason)
    return ApiError(Outcome.UNAVAILABLE, reason, retry_after=1)


class AccountHandle(Protocol):
    """What the gateway needs of an account's worker (``tgdaemon.worker.AccountWorker``)."""

    @property
    def client(self) -> ManagedClient | None: ...

    def hold_for_flood_wait(self, exc: BaseException) -> None: ...


_NOT_FOUND_TEXT = re.compile(r"Cannot find any entity|Could not find the input entity|"
                             r"No user has .* as username|Cannot get entity|Invalid object ID")


class Gateway:
    """Admission, lanes and error mapping for every API call (see module docstring)."""

    def __init__(
        self,
        config: Callable[[], ApiConfig],
        status: Callable[[str], AccountStatus | None],
        handle: Callable[[str], AccountHandle],
        *,
        clock: Callable[[], float],
        monotonic: Callable[[], float],
    ) -> None:
        self._config = config
        self._status = status
        self._handle = handle
        self._clock = clock
        self._monotonic = monotonic
        self._scheduler = Scheduler()
        #: The waiting calls' wake-ups, and the one pending scheduling pass (if any).
        self._waiters: dict[Ticket, asyncio.Future[None]] = {}
        self._pass: asyncio.Handle | None = None
        #: Account -> monotonic deadline of a flood wait an API call ran into.
        self._flood_until: dict[str, float] = {}

    def check(self, account: str) -> None:
        """Raise :class:`ApiError` unless ``account`` takes a call right now."""
        deadline = self._flood_until.get(account)
        if deadline is not None:
            left = deadline - self._monotonic()
            if left > 0:
                raise ApiError(Outcome.FLOOD_WAIT, "account is in a flood wait",
                               retry_after=max(1, math.ceil(left)))
            del self._flood_until[account]
        refusal = admission(self._status(account), self._clock())
        if refusal is not None:
            raise refusal

    @property
    def running(self) -> int:
        """API calls running through the workers now (daemon-wide)."""
        return self._scheduler.running

    @property
    def waiting(self) -> int:
        """API calls waiting for their turn now (daemon-wide)."""
        return self._scheduler.waiting

    async def call(self, account: str, fn: Callable[[ManagedClient], Awaitable[T]], *,
                   client: str = "-") -> T:
        """Run ``fn(client)`` for ``account`` when the scheduler gives ``client`` (the API
        client's name) a turn, within ``request_timeout``."""
        self.check(account)
        async with self.turn(client, account):
            self.check(account)  # the account may have changed while queued
            handle = self._handle_of(account)
            tc = handle.client
            if tc is None or not tc.is_connected():
                raise ApiError(Outcome.UNAVAILABLE, "account is not connected",
                               retry_after=1)
            try:
                return await fn(tc)
            except (ApiError, asyncio.CancelledError, TimeoutError):
                raise
            except Exception as exc:
                raise self._failed(account, handle, exc) from None

    @contextlib.asynccontextmanager
    async def turn(self, client: str, lane: str) -> AsyncIterator[None]:
        """Wait for a turn and hold it, all within ``request_timeout`` (then 504): ``lane``
        is the account, or :data:`FLEET_LANE` for work over every account. Refused at once
        with :class:`ApiError` when there is no place."""
        timeout = self._config().request_timeout
        try:
            async with asyncio.timeout(timeout), self._place(client, lane):
                yield
        except TimeoutError:
            raise ApiError(Outcome.TIMEOUT, "the call took longer than request_timeout "
                           f"({timeout:g} s)") from None

    @contextlib.asynccontextmanager
    async def _place(self, client: str, lane: str) -> AsyncIterator[None]:
        ticket = Ticket(client, lane)
        admitted = self._scheduler.submit(ticket, self._config())
        if not isinstance(admitted, Admitted):
            raise _refused(admitted.why, admitted.retry_after)
        if admitted.evicted is not None:
            self._wake(admitted.evicted, _refused(Refusal.OVER_SHARE, 1))
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[ticket] = turn
        self._schedule()
        try:
            await turn
            yield
        finally:
            self._waiters.pop(ticket, None)
            if ticket.state is not TicketState.DONE:
                self._scheduler.finish(ticket, self._config())
                self._schedule()

    def _wake(self, ticket: Ticket, error: ApiError | None = None) -> None:
        turn = self._waiters.pop(ticket, None)
        if turn is not None and not turn.done():
            if error is None:
                turn.set_result(None)
            else:
                turn.set_exception(error)

    def _schedule(self) -> None:
        """Run a scheduling pass soon, unless one is pending: either on the next loop
        iteration (a pass starts a bounded number of calls) or when the rate limit's next
        token is due — nothing can start before that anyway."""
        if self._pass is None:
            self._pass = asyncio.get_running_loop().call_soon(self._run_pass)

    def _run_pass(self) -> None:
        self._pass = None
        loop = asyncio.get_running_loop()
        result = self._scheduler.schedule(self._config(), self._monotonic())
        for ticket in result.granted:
            self._wake(ticket)
        if result.again_at is not None:
            delay = max(0.0, result.again_at - self._monotonic())
            self._pass = loop.call_later(delay, self._run_pass) if delay else \
                loop.call_soon(self._run_pass)

    def _handle_of(self, account: str) -> AccountHandle:
        try:
            return self._handle(account)
        except AccountError:
            raise ApiError(Outcome.UNAVAILABLE, "account is not running", retry_after=1) \
                from None

    def _failed(self, account: str, handle: AccountHandle, exc: Exception) -> ApiError:
        """Map a failed call; a flood wait is also handed to the worker."""
        if isinstance(exc, ValueError) and not isinstance(exc, te.RPCError) \
                and _NOT_FOUND_TEXT.search(str(exc)):
            return ApiError(Outcome.NOT_FOUND, "peer not found")
        c = classify(exc)
        rpc = c.code if isinstance(exc, te.RPCError) else None
        if c.category is Category.FLOOD_WAIT and c.wait_seconds is not None:
            seconds = max(1, c.wait_seconds)
            self._flood_until[account] = self._monotonic() + seconds
            handle.hold_for_flood_wait(exc)
            return ApiError(Outcome.FLOOD_WAIT, c.message, retry_after=seconds, rpc_error=rpc)
        if c.category is Category.CLIENT:
            return ApiError(Outcome.BAD_REQUEST, c.message, rpc_error=rpc)
        if c.category is Category.AUTH:
            return ApiError(Outcome.PARKED, c.message, rpc_error=rpc)
        if c.category is Category.SERVER:
            return ApiError(Outcome.UPSTREAM, c.message, rpc_error=rpc)
        if c.category in (Category.NETWORK, Category.MIGRATE):
            return ApiError(Outcome.UNAVAILABLE, c.message, retry_after=1, rpc_error=rpc)
        return ApiError(Outcome.ERROR, c.message, rpc_error=rpc)
