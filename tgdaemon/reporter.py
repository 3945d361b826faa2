"""One reporter per account: the only writer of what the outside sees of it.

Every transition reaches five sinks — the status board (``/status``, the WebSocket), the
metrics, the store's ``status`` column, the transition log line and the ``connected`` event
that library callers wait on. Written in one place, they cannot disagree; the worker does
connection I/O and tells the reporter what happened.

The reporter also keeps the record true: the DC is taken from the session after every connect
and heartbeat (Telethon follows a USER_MIGRATE by itself in the middle of a request), and an
account that ends (parked, stopped, disabled) drops its live values, so it does not look alive
but ageing on a dashboard.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tgdaemon.flag import Flag
from tgdaemon.lifecycle import (
    ATTEMPT_STATES,
    ENDED_STATES,
    Action,
    Category,
    Classified,
    Recovery,
    State,
)
from tgdaemon.logs import account_logger
from tgdaemon.logvolume import Waves
from tgdaemon.redact import redact
from tgdaemon.status import NewLogin
from tgdaemon.updates import CatchUp, first_sighting

if TYPE_CHECKING:
    from tgdaemon.metrics import Metrics
    from tgdaemon.status import StatusBoard, UserInfo
    from tgdaemon.store import DeviceInfo, Store
    from tgdaemon.watch import LookResult

#: How often heartbeats refresh last_used/last_checked in the store (the status board always
#: has the live value): 10,000 accounts writing every heartbeat would be 300 writes a second.
STORE_TOUCH_INTERVAL = 600.0
#: The wave kind of each state's transition line (built once: the key of every line).
_STATE_KINDS = {state: f"state -> {state.value}" for state in State}


class AccountReporter:
    """Publishes one account's state (see module docstring). No I/O of its own: store writes
    are queued to the store's batching writer."""

    def __init__(
        self,
        name: str,
        *,
        board: StatusBoard,
        metrics: Metrics,
        store: Store,
        clock: Callable[[], float],
        waves: Waves | None = None,
    ) -> None:
        self.name = name
        #: The fleet's budget of per-account INFO lines (tgdaemon.logvolume); None: every
        #: line is written.
        self._waves = waves
        self.log = account_logger(name)
        self._board = board
        self._metrics = metrics
        self._store = store
        self._clock = clock
        self.state = State.STARTING
        #: Set while the account is connected: what ``Daemon.client()`` waits for.
        self.connected = Flag()
        #: Whether the store has a row for this account (metadata writes need one).
        self.known_to_store = False
        self._dc_id: int | None = None
        self._errors = 0
        self._last_store_touch = 0.0
        metrics.add_account(name)

    # -- transitions -----------------------------------------------------------------------

    def transition(
        self,
        state: State,
        reason: str,
        *,
        error: Classified | None = None,
        flood_wait_until: float | None = None,
        shown: dict[str, Any] | None = None,
        **stored: Any,
    ) -> None:
        """Move to ``state``; ``error`` and ``shown`` (extra status fields) travel with it (one
        status message, not two) and ``stored`` are extra store columns written in the same
        queued update."""
        changes: dict[str, Any] = {"state": state, "reason": redact(reason),
                                   "flood_wait_until": flood_wait_until}
        if shown:
            changes.update(shown)
        if error is not None:
            self._errors += 1
            changes["errors"] = self._errors
            changes["last_error_category"] = error.category.value
            changes["last_error_message"] = error.message
            stored.setdefault("last_error_category", error.category.value)
        if state in ENDED_STATES:
            changes["latency"] = None
            self._metrics.clear_live(self.name)
        if state is State.CONNECTED:
            self.connected.set()
        else:
            self.connected.clear()
        previous, self.state = self.state, state
        self._board.update(self.name, **changes)
        if state is not previous:
            level = logging.DEBUG if state in ATTEMPT_STATES else self._level(_STATE_KINDS[state])
            self.log.log(level, "state %s -> %s (%s)", previous.value, state.value, reason)
            stored["status"] = state.value  # the CLI reads it to refuse touching an active account
        if stored:
            self._submit(**stored)

    def failure(self, c: Classified, rec: Recovery, attempt: int) -> None:
        """A classified failure and the recovery chosen for it (``attempt`` 0-based)."""
        self._metrics.error(self.name, c.category)
        # The first failure of a streak at INFO, the rest at DEBUG: during an outage 10,000
        # accounts retrying must not write thousands of lines a second. A failure that ends
        # the worker (parked, failed) is told by its state line, with its code: one line.
        level = logging.DEBUG
        if attempt == 0 and rec.next_state not in ENDED_STATES:
            level = self._level(f"{c.category.value} error ({c.code})")
        self.log.log(level, "%s error (%s), recovery: %s (attempt %d)", c.category.value,
                     c.code, rec.action.value, attempt + 1)
        if c.category is Category.FLOOD_WAIT:
            self._metrics.flood_wait(self.name, c.wait_seconds or 0)
        if rec.action is Action.RETRY:
            self._metrics.reconnect(self.name)
        until = self._clock() + rec.delay if rec.next_state is State.FLOOD_WAIT else None
        self.transition(rec.next_state, rec.reason, error=c, flood_wait_until=until)

    def _level(self, kind: str, level: int = logging.INFO) -> int:
        """The level a per-account line of ``kind`` is written at now: ``level``, or DEBUG
        past the fleet's budget for a wave of them (see :class:`Waves`)."""
        if self._waves is None or self._waves.admit(kind, level):
            return level
        return logging.DEBUG

    def connected_as(self, user: UserInfo, dc_id: int, device: DeviceInfo) -> None:
        """The session is proven logged in as ``user`` on ``dc_id``."""
        now = self._clock()
        self._last_store_touch = now
        self._dc_id = dc_id
        shown = {"user": user, "dc_id": dc_id, "last_checked": now,
                 "last_error_category": None, "last_error_message": None}
        self.transition(State.CONNECTED, "validated", shown=shown, user_id=user.id,
                        username=user.username, first_name=user.first_name, dc_id=dc_id,
                        last_checked=now, last_used=now, last_error_category=None,
                        device=device)

    def heartbeat(self, latency: float, dc_id: int) -> None:
        """An answered heartbeat that took ``latency`` seconds, the session now on ``dc_id``."""
        now = self._clock()
        self._metrics.observe_latency(self.name, latency)
        self._metrics.heartbeat(self.name, now)
        self._board.update(self.name, latency=latency, last_checked=now)
        self.dc(dc_id)
        if now - self._last_store_touch >= STORE_TOUCH_INTERVAL:
            self._last_store_touch = now
            self._submit(last_checked=now, last_used=now)

    def dc(self, dc_id: int, *, persist: bool = True) -> None:
        """The session's DC as read from the session; recorded when it changed."""
        if dc_id == self._dc_id:
            return
        self._dc_id = dc_id
        self._board.update(self.name, dc_id=dc_id)
        if persist:
            self._submit(dc_id=dc_id)

    def stopped(self) -> None:
        """The supervisor stopped the worker (shutdown, reload, watchdog)."""
        if self.state not in ENDED_STATES:
            self.transition(State.STOPPED, "stopped")

    def disabled(self) -> None:
        self.transition(State.DISABLED, "disabled in config")

    def remove(self) -> None:
        """The account left the config: its status and series go."""
        self._board.remove(self.name)
        self._metrics.remove_account(self.name)

    # -- counters without a transition -----------------------------------------------------

    def failover(self, dc_id: int, failures: int) -> None:
        self.log.log(self._level("failing over", logging.WARNING),
                     "failing over DC %d to its next address after %d network failures",
                     dc_id, failures)
        self._metrics.failover(self.name)

    def update_gap(self, server_pts: int, local_pts: int | None) -> None:
        self._metrics.update_gap(self.name)
        self.log.log(self._level("update stream gap", logging.WARNING),
                     "update stream gap: server pts %d, client pts %s", server_pts, local_pts)

    def sessions(self, result: LookResult) -> None:
        """A look at the account's sessions (``tgdaemon.watch``): the count, and the newest
        foreign session when there is one (pushed to /status/ws as a status change)."""
        found = result.assessment
        self._metrics.sessions(self.name, found.count, len(found.new))
        changes: dict[str, Any] = {"authorizations": found.count}
        if found.new:
            newest = max(found.new, key=lambda s: s.created)
            changes["last_new_authorization"] = NewLogin(
                newest.device, newest.app, newest.country, newest.created, self._clock(),
                terminated=newest in result.terminated)
        self._board.update(self.name, **changes)

    def plugin_error(self) -> None:
        self._metrics.plugin_error(self.name)

    def caught_up(self, report: CatchUp) -> None:
        """A finished catch-up: INFO with the count when it recovered anything (never the
        content; an empty one, as on every connect, is DEBUG); a "too long" answer is a
        WARNING, since those updates can only be re-read from history."""
        where = "account" if report.channel is None else f"channel {report.channel}"
        self._metrics.updates_recovered(self.name, report.recovered)
        if report.skipped:
            self.log.warning("%s difference too long: %d updates skipped (the server keeps no "
                             "more); %d recovered", where, report.skipped, report.recovered)
        else:  # after an outage every account may have something: a wave
            kind = "caught up (account)" if report.channel is None else "caught up (channel)"
            self.log.log(self._level(kind) if report.recovered else logging.DEBUG,
                         "caught up (%s): %d updates recovered", where, report.recovered)

    def unknown_object(self, constructor_id: int) -> None:
        """A server object this Telethon cannot parse was skipped: one WARNING per constructor
        id and process (a new layer reaches every account at once), then DEBUG."""
        self._metrics.unknown_object(self.name)
        self.log.log(logging.WARNING if first_sighting(constructor_id) else logging.DEBUG,
                     "skipped a server object of unknown constructor %08x (newer layer than "
                     "this Telethon); the connection stays up", constructor_id)

    def worker_restart(self) -> None:
        self._metrics.worker_restart(self.name)

    # -- store -----------------------------------------------------------------------------

    def _submit(self, **fields: Any) -> None:
        """Queue a metadata update for the store's writer, which batches it with every other
        account's. Metadata is best effort (sessions are not): the writer logs a failure, the
        worker does not wait for the disk."""
        if not self.known_to_store:
            return
        try:
            self._store.submit_account(self.name, **fields)
        except Exception as exc:  # the store is closing: the daemon is stopping anyway
            self.log.debug("account metadata not recorded: %s", type(exc).__name__)
