"""One account's look at its sessions, driven by its worker's heartbeat loop.

No task or timer of its own (10,000 accounts): the worker asks :meth:`AuthorizationWatch.due`
after each heartbeat and awaits :meth:`look` when it is; an ``updateNewAuthorization`` only
moves the next look forward (:meth:`poke`), so a new login is reported within one heartbeat
period. The decisions are pure and live in ``tgdaemon.security``.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from telethon import errors, events, functions, types

from tgdaemon.security import (
    EVENT_CHECK_GAP,
    FRESH_RETRY,
    Assessment,
    OnNewAuthorization,
    SessionInfo,
    assess,
    first_check_delay,
    session_from_tl,
)

if TYPE_CHECKING:
    from tgdaemon.config import AccountConfig, Config
    from tgdaemon.reporter import AccountReporter

__all__ = ["AuthorizationWatch", "LookResult"]

Rpc = Callable[[Any], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class LookResult:
    assessment: Assessment
    terminated: tuple[SessionInfo, ...]
    refused: bool  # Telegram refused a reset (our session is too young): retried later


class AuthorizationWatch:
    """When to look at an account's sessions next, and what was there last time."""

    __slots__ = ("_clock", "_known", "_last_look", "_log", "_next_at", "_since")

    def __init__(self, log: logging.LoggerAdapter[logging.Logger] | logging.Logger, *,
                 since: float, interval: float, clock: Callable[[], float],
                 rng: random.Random) -> None:
        self._log = log
        self._clock = clock
        #: The account's last proof of life before this run: a session created after it and
        #: present at the first look counts as new (it may have logged in while we were down).
        self._since = since
        self._known: frozenset[int] | None = None
        self._last_look = -math.inf
        self._next_at = clock() + first_check_delay(interval, rng)

    @property
    def next_at(self) -> float:
        return self._next_at

    def due(self, now: float) -> bool:
        return now >= self._next_at

    def poke(self) -> None:
        """A new login was announced: look at the next heartbeat, unless a look happened in
        the last EVENT_CHECK_GAP seconds (then right after that gap)."""
        self._next_at = min(self._next_at, max(self._clock(), self._last_look + EVENT_CHECK_GAP))

    async def look(self, rpc: Rpc, *, action: OnNewAuthorization, allow: tuple[str, ...],
                   interval: float, log_ip: bool) -> LookResult:
        """List the sessions, report new ones, terminate what ``action`` says.

        RPC errors of the listing propagate (the worker decides: a flood wait postpones the
        next look, a dead connection is the heartbeat's business)."""
        now = self._clock()
        self._last_look = now
        self._next_at = now + interval
        listed = await rpc(functions.account.GetAuthorizationsRequest())
        sessions = [session_from_tl(a) for a in listed.authorizations]
        found = assess(sessions, known=self._known, since=self._since, action=action,
                       allow=allow)
        self._known = found.known
        for s in found.new:
            self._log.warning("new login on this account: %s", s.describe(with_ip=log_ip))
        terminated: list[SessionInfo] = []
        refused = False
        for s in found.terminate:
            try:
                await rpc(functions.account.ResetAuthorizationRequest(hash=s.hash))
            except errors.FreshResetAuthorisationForbiddenError:
                # Telegram lets a session terminate others only once it is old enough.
                refused = True
                self._next_at = min(self._next_at, now + FRESH_RETRY)
                self._log.warning("Telegram refuses to terminate other sessions from this "
                                  "one yet (it is too new); retrying in %d s", FRESH_RETRY)
                break
            terminated.append(s)
            self._log.warning("terminated session: %s", s.describe(with_ip=log_ip))
        if terminated:
            self._known = self._known - {s.hash for s in terminated}
        return LookResult(found, tuple(terminated), refused)

    def attach(self, client: Any) -> None:
        """Listen on ``client`` for Telegram's announcement of a new login."""
        client.add_event_handler(self._on_new_login, events.Raw(types.UpdateNewAuthorization))

    async def _on_new_login(self, _update: types.UpdateNewAuthorization) -> None:
        self.poke()

    async def step(self, rpc: Rpc, config: Config, account: AccountConfig,
                   report: AccountReporter) -> None:
        """After a heartbeat: the look, when due. Its failures end nothing: a dead connection
        is the next heartbeat's to find, a flood wait on the listing only delays the next look,
        and Telegram's 406 for a young session must not park the account as an auth error."""
        if not self.due(self._clock()):
            return
        security = config.security
        try:
            result = await self.look(
                rpc, action=config.on_new_authorization(account), allow=security.allow,
                interval=security.check_interval, log_ip=security.log_ip)
        except errors.FloodWaitError as exc:
            self.postpone(exc.seconds)
            return
        except (errors.RPCError, TimeoutError, ConnectionError) as exc:
            self._log.debug("could not list the account's sessions: %s", type(exc).__name__)
            return
        report.sessions(result)

    def postpone(self, seconds: float) -> None:
        """The listing failed (e.g. a flood wait on it): try again after ``seconds``."""
        self._next_at = max(self._next_at, self._clock() + seconds)
