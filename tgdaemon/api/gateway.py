"""The call gateway: every API call reaches Telegram through the account's own worker, or not
at all, and never hangs.

Admission is a pure decision on the account's status (:func:`admission`, tested as a table):
a connected account is called; one in a flood wait answers 429 with the seconds left; a
parked, disabled or stopped one 409; one (re)connecting 503 — at once, with the reason. Then
a per-account lane bounds the calls in flight (``account_concurrency``) and waiting
(``account_queue``), and ``request_timeout`` bounds the whole call, queueing included.

A FLOOD_WAIT answer to an API call is the account's business, not the caller's: the gateway
refuses further calls until the deadline itself (the worker learns of it asynchronously) and
hands the wait to the worker (:meth:`AccountHandle.hold_for_flood_wait`), which then shows it
in /status and sends nothing — heartbeats included — before the deadline.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol, TypeVar

from telethon import errors as te

from tgdaemon.errors import classify
from tgdaemon.exceptions import AccountError
from tgdaemon.lifecycle import ENDED_STATES, Category, State
from tgdaemon.status import AccountStatus

if TYPE_CHECKING:
    from tgdaemon.apiconfig import ApiConfig
    from tgdaemon.telegram import ManagedClient

T = TypeVar("T")


class Outcome(StrEnum):
    """How a call ended; the ``outcome`` metric label and the ``error`` code of the reply."""

    OK = "ok"
    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    FLOOD_WAIT = "flood_wait"
    BUSY = "busy"  # the account's queue is full
    PARKED = "parked"  # needs_login, banned, duplicated, disabled, stopped
    UNAVAILABLE = "unavailable"  # starting, connecting, reconnecting, network trouble
    TIMEOUT = "timeout"
    UPSTREAM = "upstream_error"  # Telegram answered with a server error
    ERROR = "error"  # a bug


HTTP_STATUS: dict[Outcome, int] = {
    Outcome.OK: 200, Outcome.BAD_REQUEST: 400, Outcome.UNAUTHORIZED: 401,
    Outcome.FORBIDDEN: 403, Outcome.NOT_FOUND: 404, Outcome.PARKED: 409,
    Outcome.FLOOD_WAIT: 429, Outcome.BUSY: 429, Outcome.ERROR: 500, Outcome.UPSTREAM: 502,
    Outcome.UNAVAILABLE: 503, Outcome.TIMEOUT: 504,
}


class ApiError(Exception):
    """A refused or failed call: becomes the HTTP answer (``retry_after`` -> Retry-After).
    ``message`` is safe to show (redacted); ``rpc_error`` is Telegram's error name."""

    def __init__(self, outcome: Outcome, message: str, retry_after: int | None = None,
                 rpc_error: str | None = None) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.message = message
        self.retry_after = retry_after
        self.rpc_error = rpc_error

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


class _Lane:
    """One account's calls: ``running`` bounded by a semaphore, ``waiting`` by the queue."""

    __slots__ = ("semaphore", "users")

    def __init__(self, concurrency: int) -> None:
        self.semaphore = asyncio.Semaphore(concurrency)
        self.users = 0  # running + waiting


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
        self._lanes: dict[str, _Lane] = {}
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

    async def call(self, account: str, fn: Callable[[ManagedClient], Awaitable[T]]) -> T:
        """Run ``fn(client)`` for ``account`` within the lane and the timeout."""
        self.check(account)
        config = self._config()
        lane = self._lanes.get(account)
        if lane is None:
            lane = self._lanes[account] = _Lane(config.account_concurrency)
        if lane.users >= config.account_concurrency + config.account_queue:
            raise ApiError(Outcome.BUSY, "too many calls queued for this account",
                           retry_after=1)
        lane.users += 1
        try:
            async with asyncio.timeout(config.request_timeout):
                async with lane.semaphore:
                    self.check(account)  # the account may have changed while queued
                    handle = self._handle_of(account)
                    client = handle.client
                    if client is None or not client.is_connected():
                        raise ApiError(Outcome.UNAVAILABLE, "account is not connected",
                                       retry_after=1)
                    try:
                        return await fn(client)
                    except (ApiError, asyncio.CancelledError, TimeoutError):
                        raise
                    except Exception as exc:
                        raise self._failed(account, handle, exc) from None
        except TimeoutError:
            raise ApiError(Outcome.TIMEOUT, "the call took longer than request_timeout "
                           f"({config.request_timeout:g} s)") from None
        finally:
            lane.users -= 1
            if lane.users == 0:
                del self._lanes[account]

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
