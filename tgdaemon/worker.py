"""One account's worker: connect, validate, heartbeat, and recover from every failure itself.

A worker never lets an exception escape to its siblings: it classifies each failure
(``tgdaemon.errors``) and applies that category's recovery — backoff and reconnect, an exact
flood wait, parking the account, following a DC migration. Parked accounts end their task and
hold no connection: a revoked account costs nothing and sends nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from telethon import functions, types

from tgdaemon.config import HEARTBEAT_JITTER
from tgdaemon.errors import Category, Classified, classify, recovery_for
from tgdaemon.exceptions import DecryptionError
from tgdaemon.leases import LeaseGate, LeaseLostError
from tgdaemon.logs import account_logger
from tgdaemon.session import StoreSession
from tgdaemon.status import State, UserInfo
from tgdaemon.telegram import ManagedClient, build_client, local_update_pts

if TYPE_CHECKING:
    from tgdaemon.config import AccountConfig, Config
    from tgdaemon.dcs import DcDirectory
    from tgdaemon.metrics import Metrics
    from tgdaemon.ratelimit import ConnectRateLimiter
    from tgdaemon.status import StatusBoard
    from tgdaemon.store import SessionData, Store

#: How often heartbeats refresh last_used/last_checked in the store (the status board always
#: has the live value): 10,000 accounts writing every heartbeat would be 300 writes a second.
STORE_TOUCH_INTERVAL = 600.0
#: Bound on tearing down a client: a wedged one is abandoned and replaced.
CLOSE_TIMEOUT = 5.0


class UpdateStallError(ConnectionError):
    """Updates stopped arriving although the connection answers: reconnect (a NETWORK fault)."""


class NotAuthorizedError(Exception):
    """The server answered but the session is not logged in (getUsers returned no user)."""


@dataclass(frozen=True)
class WorkerDeps:
    """What every worker shares; passed in so tests can supply their own clock or store."""

    config: Config
    store: Store
    board: StatusBoard
    metrics: Metrics
    limiter: ConnectRateLimiter
    directory: DcDirectory
    client_cls: type[ManagedClient]
    clock: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)
    #: Fleet mode: the leases this daemon holds (None: a single daemon owns its accounts).
    lease: LeaseGate | None = None


class AccountWorker:
    """Owns one account's client for the lifetime of its task (see module docstring)."""

    def __init__(
        self,
        account: AccountConfig,
        deps: WorkerDeps,
        session_data: SessionData | DecryptionError | None,
    ) -> None:
        self.account = account
        self.name = account.name
        self.deps = deps
        self.log = account_logger(account.name)
        self.client: ManagedClient | None = None
        self.session: StoreSession | None = None
        self.state = State.STARTING
        #: Monotonic time of the last proof of progress (a heartbeat, a finished connect).
        self.last_progress = deps.monotonic()
        #: Monotonic deadline of a deliberate wait (backoff, flood wait); the watchdog ignores
        #: a worker that is waiting on purpose.
        self.waiting_until: float | None = None
        self.connected = asyncio.Event()
        self._initial = session_data
        #: Whether the store has a row for this account (metadata writes need one).
        self._known_to_store = session_data is not None
        self._network_failures = 0
        #: Consecutive failures per category; cleared by the first heartbeat of a connection,
        #: not by connecting: a server that accepts and then drops must still see backoff grow.
        self._attempts: dict[Category, int] = {}
        self._catch_ups = 0
        self._last_store_touch = 0.0
        #: ``client.disconnected`` of the current connection (see _wait_unless_disconnected).
        self._disconnected: asyncio.Future[None] | None = None
        #: The heartbeat sleep in progress, woken early by a disconnect.
        self._sleeper: asyncio.Future[None] | None = None
        self._plugins = list(self._load_plugins())

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        """The task body. Returns when the account is parked or stopped; never raises except
        CancelledError (the supervisor's stop)."""
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not take the fleet down
            self.log.exception("worker failed unexpectedly: %s", type(exc).__name__)
            self._set_state(State.STOPPED, f"internal error: {type(exc).__name__}")
        finally:
            await self._close_client()
            self.client = None  # an ended worker (parked, stopped) holds no Telethon state

    async def _run(self) -> None:
        initial = self._initial
        if isinstance(initial, DecryptionError):
            # Never overwrite a record we cannot read: no session object is created for it.
            self._set_state(State.NEEDS_LOGIN, "stored session cannot be decrypted",
                            last_error_category="auth", last_error_message=str(initial))
            return
        if initial is None or initial.auth_key is None:
            self._set_state(State.NEEDS_LOGIN, f"no session: run `tgdaemon login {self.name}`")
            await self._persist(status=State.NEEDS_LOGIN.value)
            return
        self.session = StoreSession(self.deps.store, self.name, initial)
        self.deps.board.update(self.name, dc_id=initial.dc_id)
        attempts = self._attempts
        while True:
            self._set_state(State.RECONNECTING if attempts else State.CONNECTING, "connecting")
            try:
                async with self._connect_slot():
                    await self._connect()
                    await self._validate()
                self._catch_ups = 0
                self._arm_server_disconnect()
                self._set_state(State.CONNECTED, "validated")
                await self._run_plugins()
                await self._serve()
            except asyncio.CancelledError:
                raise
            except LeaseLostError:
                await self._close_client()
                self._set_state(State.STOPPED, "lease lost: another instance may own it")
                return
            except Exception as exc:
                if not await self._recover(exc, attempts):
                    return

    # -- failure handling ------------------------------------------------------------------

    async def _recover(self, exc: BaseException, attempts: dict[Category, int]) -> bool:
        """Apply the recovery for ``exc``; False when the worker must end (parked/stopped)."""
        c = _classify(exc)
        attempt = attempts.get(c.category, 0)
        attempts[c.category] = attempt + 1
        policy = self.deps.config.policy
        rec = recovery_for(c, attempt, policy, self.deps.rng)
        self.deps.metrics.error(self.name, c.category.value)
        # The error travels with the state change: one status message, not two.
        error = {"last_error_category": c.category.value, "last_error_message": c.message}
        # The first failure of a streak at INFO, the rest at DEBUG: during an outage 10,000
        # accounts retrying must not write thousands of lines a second.
        self.log.log(logging.INFO if attempt == 0 else logging.DEBUG,
                     "%s error (%s), recovery: %s (attempt %d)", c.category.value, c.code,
                     rec.action, attempt + 1)

        if rec.action == "park":
            state = State(c.park_state or State.NEEDS_LOGIN.value)
            self._set_state(state, c.code, **error)
            await self._close_client()
            await self._persist(status=state.value, last_error_category=c.category.value)
            return False
        if rec.action == "fail":
            self._set_state(State.STOPPED, f"{c.code}: retries exhausted", **error)
            await self._close_client()
            await self._persist(status=State.STOPPED.value, last_error_category=c.category.value)
            return False
        if rec.action == "wait":
            await self._flood_wait(c, rec.delay or 0.0, error)
            return True
        if rec.action == "migrate" and c.new_dc is not None:
            self.deps.board.update(self.name, **error)
            try:
                await self._migrate(c.new_dc)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # e.g. the new DC is down: back off and retry as usual
                return await self._recover(exc, attempts)
            return True
        # retry: reconnect after a jittered, capped delay
        if c.category is Category.NETWORK:
            self._note_network_failure()
        self._set_state(State.RECONNECTING, c.code, **error)
        self.deps.metrics.reconnect(self.name)
        await self._close_client()
        await self._deliberate_wait(rec.delay or 0.0)
        return True

    async def _flood_wait(self, c: Classified, delay: float, error: dict[str, Any]) -> None:
        seconds = c.wait_seconds or 0
        deadline = self.deps.clock() + delay
        self.deps.metrics.flood_wait(self.name, seconds)
        self._set_state(State.FLOOD_WAIT, f"{c.code} {seconds}s", flood_wait_until=deadline,
                        **error)
        await self._deliberate_wait(delay)
        self.deps.board.update(self.name, flood_wait_until=None)

    async def _migrate(self, new_dc: int) -> None:
        """Follow a *_MIGRATE that Telethon raised instead of following itself (it does so for
        PHONE/NETWORK_MIGRATE of a logged-in account): the same switch, login carried over."""
        assert self.client is not None
        assert self.session is not None
        policy = self.deps.config.policy
        await asyncio.wait_for(self.client._switch_dc(new_dc),
                               policy.connect_timeout + policy.request_timeout)
        await self.session.flush()
        self._watch_connection(self.client)
        self.deps.board.update(self.name, dc_id=new_dc)
        await self._persist(dc_id=new_dc)

    def _note_network_failure(self) -> None:
        """Move to the DC's next address after ``failover_after`` consecutive failures."""
        self._network_failures += 1
        if self.session is None or self._network_failures < self.deps.config.policy.failover_after:
            return
        dc_id = self.session.dc_id
        addresses = self.deps.directory.addresses(dc_id)
        if len(addresses) < 2:
            return
        current = (self.session.server_address, self.session.port)
        index = addresses.index(current) if current in addresses else -1
        host, port = addresses[(index + 1) % len(addresses)]
        self.log.warning("failing over DC %d to its next address after %d network failures",
                         dc_id, self._network_failures)
        self.session.set_dc(dc_id, host, port)
        self._network_failures = 0
        self.deps.metrics.failover(self.name)

    async def _deliberate_wait(self, delay: float) -> None:
        if delay <= 0:
            return
        self.waiting_until = self.deps.monotonic() + delay
        try:
            await asyncio.sleep(delay)
        finally:
            self.waiting_until = None
            self.last_progress = self.deps.monotonic()

    # -- connection ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _connect_slot(self) -> AsyncIterator[None]:
        """Hold one of the daemon's connects-in-flight slots; queueing for it is a deliberate
        wait (the watchdog leaves a worker alone while thousands connect before it)."""
        slots = self.deps.limiter.in_flight
        if slots is None:
            yield
            return
        self.waiting_until = math.inf
        try:
            await slots.acquire()
        finally:
            self.waiting_until = None
            self.last_progress = self.deps.monotonic()
        try:
            yield
        finally:
            slots.release()

    async def _connect(self) -> None:
        assert self.session is not None
        policy = self.deps.config.policy
        if self.client is not None and self.client.is_connected():
            if self._disconnected is None or self._disconnected.done():
                self._watch_connection(self.client)  # e.g. after a DC switch
            return
        # Waiting for a connect slot is a deliberate wait, not a stuck worker.
        delay = self.deps.limiter.reserve()
        await self._deliberate_wait(delay)
        if self.deps.lease is not None and not self.deps.lease.holds(self.name):
            raise LeaseLostError(self.name)
        if self.client is None:
            self.client = build_client(self.deps.client_cls, self.session, self.deps.config,
                                       self.account)
        client = self.client
        try:
            await asyncio.wait_for(client.connect(), policy.connect_timeout)
        except BaseException as exc:
            await self._close_client()
            if isinstance(exc, TimeoutError):
                # A connect that hung (a stall mid key exchange) leaves Telethon's sender in
                # an unknown state: abandon this client object, build a fresh one next time.
                self.client = None
            raise
        # A fresh auth key must be durable before anything binds it to a user.
        await self.session.flush()
        self._watch_connection(client)
        self.last_progress = self.deps.monotonic()

    async def _validate(self) -> None:
        """A real call (users.getUsers([self])) proves the session is logged in."""
        assert self.client is not None
        assert self.session is not None
        users = await self._rpc(functions.users.GetUsersRequest([types.InputUserSelf()]))
        me = users[0] if users else None
        if not isinstance(me, types.User):
            raise NotAuthorizedError("server returned no user for this session")
        now = self.deps.clock()
        dc_id = self.session.dc_id
        self.deps.board.update(
            self.name,
            user=UserInfo(me.id, me.username, me.first_name),
            dc_id=dc_id,
            last_checked=now,
            last_error_category=None,
            last_error_message=None,
        )
        self._last_store_touch = now
        await self._persist(user_id=me.id, username=me.username, first_name=me.first_name,
                            status=State.CONNECTED.value, dc_id=dc_id, last_checked=now,
                            last_used=now, last_error_category=None)
        await self._refresh_directory()

    async def _refresh_directory(self) -> None:
        """Learn every DC's addresses from help.getConfig once per daemon (shared cache)."""
        assert self.client is not None
        directory = self.deps.directory
        if not directory.needs_refresh():
            return
        async with directory.refreshing() as should_fetch:
            if not should_fetch:
                return
            try:
                cfg = await self._rpc(functions.help.GetConfigRequest())
                await directory.update_from_config(cfg)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # optional: configured addresses still work
                directory.postpone()
                self.log.warning("could not refresh DC addresses: %s", type(exc).__name__)

    async def _serve(self) -> None:
        """Heartbeat until the connection fails; every exit is an exception to recover from."""
        assert self.client is not None
        gap_streak = 0
        while True:
            policy = self.deps.config.policy  # a reload's new values apply at the next beat
            jitter = self.deps.rng.uniform(2 - HEARTBEAT_JITTER, HEARTBEAT_JITTER)
            interval = policy.heartbeat_interval * jitter
            await self._wait_unless_disconnected(interval)
            started = self.deps.monotonic()
            # updates.getState is the heartbeat: a real encrypted round trip that proves the
            # connection works *and* tells the server's update state, in one RPC per account.
            server = await self._rpc(functions.updates.GetStateRequest())
            latency = self.deps.monotonic() - started
            now = self.deps.clock()
            self.last_progress = self.deps.monotonic()
            if self._attempts:
                self._attempts.clear()
                self._network_failures = 0
            self.deps.metrics.observe_latency(self.name, latency)
            self.deps.metrics.heartbeat(self.name, now)
            self.deps.board.update(self.name, latency=latency, last_checked=now)
            if now - self._last_store_touch >= STORE_TOUCH_INTERVAL:
                self._last_store_touch = now
                await self._persist(last_checked=now, last_used=now)
            local = local_update_pts(self.client)
            gap_streak = gap_streak + 1 if local is not None and server.pts > local else 0
            if gap_streak >= policy.update_gap_heartbeats:
                gap_streak = 0
                await self._on_update_gap(server.pts, local)
            self._arm_server_disconnect()

    def _arm_server_disconnect(self) -> None:
        """Fleet mode: ask the server to close this connection when the lease's local deadline
        passes without a newer ping (``ping_delay_disconnect``), so a paused or cut-off
        process cannot keep using the session next to its new owner."""
        lease = self.deps.lease
        if lease is None:
            return
        if not lease.holds(self.name):
            raise LeaseLostError(self.name)
        assert self.client is not None
        # Sent the way Telethon sends its own keepalive ping: queued on the sender, pong not
        # awaited (the heartbeat proves the connection).  Awaiting it through client() would
        # let a cancelled worker cancel the future the pong then resolves (an error logged
        # by Telethon's _handle_pong).
        pong = self.client._sender.send(functions.PingDelayDisconnectRequest(
            ping_id=self.deps.rng.getrandbits(63),
            disconnect_delay=lease.disconnect_delay(self.name)))
        pong.add_done_callback(_retrieve)

    async def _on_update_gap(self, server_pts: int, local_pts: int | None) -> None:
        assert self.client is not None
        self.deps.metrics.update_gap(self.name)
        self.log.warning("update stream gap: server pts %d, client pts %s", server_pts, local_pts)
        if self._catch_ups == 0:
            self._catch_ups += 1
            await self.client.catch_up()  # getDifference fetches what was missed
            return
        # A second gap on the same connection: updates are not flowing; start over.
        raise UpdateStallError("updates stopped arriving on this connection")

    async def _wait_unless_disconnected(self, seconds: float) -> None:
        """Sleep ``seconds`` unless the connection drops first.

        ``client.disconnected`` builds a new pair of ``asyncio.shield`` futures on every call,
        and a timed-out wait on one leaves a callback on Telethon's underlying future forever
        (one leaked callback per heartbeat per account). So the future is taken once per
        connection with one callback that wakes this sleep; the sleep itself is one future
        and one timer, like ``asyncio.sleep`` (``asyncio.wait`` cost 13 % of the idle CPU at
        10,000 accounts in allocations and the garbage collection they trigger)."""
        watched = self._disconnected
        if watched is None:
            return await asyncio.sleep(seconds)
        if not watched.done():
            loop = asyncio.get_running_loop()
            sleeper: asyncio.Future[None] = loop.create_future()
            timer = loop.call_later(seconds, _wake, sleeper)
            self._sleeper = sleeper
            try:
                await sleeper
            finally:
                timer.cancel()
                self._sleeper = None
            if not watched.done():
                return
        if self.client is not None and self.client.is_connected():
            # Telethon reconnected under us (a DC switch): watch the new connection.
            self._watch_connection(self.client)
            return
        raise ConnectionError("connection closed")

    def _watch_connection(self, client: ManagedClient) -> None:
        self._forget_disconnected()
        watched = client.disconnected
        watched.add_done_callback(self._on_disconnected)
        self._disconnected = watched

    def _on_disconnected(self, _watched: asyncio.Future[None]) -> None:
        if self._sleeper is not None:
            _wake(self._sleeper)

    def _forget_disconnected(self) -> None:
        fut, self._disconnected = self._disconnected, None
        if fut is None:
            return
        fut.remove_done_callback(self._on_disconnected)
        if not fut.done():
            fut.cancel()  # the shield's cancel detaches it from Telethon's future
        elif not fut.cancelled():
            fut.exception()  # retrieved: no "exception was never retrieved" warning

    async def _rpc(self, request: Any) -> Any:
        """One RPC bounded by ``request_timeout`` (Telethon has no request timeout of its own).
        ``asyncio.timeout`` rather than ``wait_for``: no extra Task per heartbeat."""
        assert self.client is not None
        async with asyncio.timeout(self.deps.config.policy.request_timeout):
            return await self.client(request)

    async def _close_client(self) -> None:
        self.connected.clear()
        self._forget_disconnected()
        client = self.client
        if client is None:
            return
        try:
            await asyncio.wait_for(client.disconnect(), CLOSE_TIMEOUT)
        except Exception as exc:  # a wedged client is dropped, not awaited forever
            self.log.warning("client did not close cleanly (%s); replacing it",
                             type(exc).__name__)
            self.client = None

    # -- plugins ---------------------------------------------------------------------------

    def _load_plugins(self) -> list[tuple[str, Callable[..., Any]]]:
        loaded = []
        for spec in self.account.plugins:
            module_name, _, attr = spec.partition(":")
            try:
                loaded.append((spec, getattr(importlib.import_module(module_name), attr)))
            except Exception as exc:
                self.log.error("plugin %s cannot be loaded: %s", spec, type(exc).__name__)
                self.deps.metrics.plugin_error(self.name)
        return loaded

    async def _run_plugins(self) -> None:
        """Called after each (re)connect; a plugin's failure is logged and counted, never fatal."""
        for spec, setup in self._plugins:
            try:
                result = setup(self.client, self.account)
                if inspect.isawaitable(result):
                    await asyncio.wait_for(result, self.deps.config.policy.request_timeout)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.exception("plugin %s failed", spec)
                self.deps.metrics.plugin_error(self.name)

    # -- reporting -------------------------------------------------------------------------

    def _set_state(self, state: State, reason: str, **fields: Any) -> None:
        if state is State.CONNECTED:
            self.connected.set()
        else:
            self.connected.clear()
        if state is not State.FLOOD_WAIT:
            fields.setdefault("flood_wait_until", None)
        previous = self.state
        self.state = state
        self.deps.board.update(self.name, state=state, reason=reason, **fields)
        if state is not previous:
            self.log.info("state %s -> %s (%s)", previous.value, state.value, reason)
            # Batched by the store; the CLI reads it to refuse touching an active account.
            self._submit_status(state)

    def _submit_status(self, state: State) -> None:
        if self._known_to_store:
            try:
                self.deps.store.submit_account(self.name, status=state.value)
            except Exception as exc:  # the store is closing: the daemon is stopping anyway
                self.log.debug("status not recorded: %s", type(exc).__name__)

    async def _persist(self, **fields: Any) -> None:
        """Queue a metadata update for the store's writer, which batches it with every other
        account's. Metadata is best effort (sessions are not): the writer logs a failure, the
        worker does not wait for the disk."""
        if not self._known_to_store:
            return
        try:
            self.deps.store.submit_account(self.name, **fields)
        except Exception as exc:  # the store is closing: the daemon is stopping anyway
            self.log.warning("could not record account metadata: %s", type(exc).__name__)


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a fire-and-forget future's outcome as seen (no "never retrieved" warning)."""
    if not fut.cancelled():
        fut.exception()


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _classify(exc: BaseException) -> Classified:
    if isinstance(exc, NotAuthorizedError):
        return Classified(Category.AUTH, "NOT_AUTHORIZED", str(exc), park_state="needs_login")
    return classify(exc)
