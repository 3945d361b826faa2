"""One account's worker: the connection I/O of one account, for the lifetime of its task.

Connect, validate, heartbeat; on every failure ask :mod:`tgdaemon.lifecycle` what to do
(backoff and reconnect, a flood wait, parking, a DC migration) and do it. What the outside sees
(status, metrics, the store's status, the transition log) is written by the account's
:class:`~tgdaemon.reporter.AccountReporter`, never here. Parked accounts end their task and
hold no connection: a revoked account costs nothing and sends nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from telethon import functions, types

from tgdaemon.connwatch import ConnectionWatch
from tgdaemon.errors import NotAuthorizedError, classify
from tgdaemon.exceptions import DecryptionError
from tgdaemon.leases import LeaseGate, LeaseLostError
from tgdaemon.lifecycle import (
    Action,
    Category,
    Classified,
    State,
    heartbeat_delay,
    recovery_for,
)
from tgdaemon.plugins import Plugins
from tgdaemon.reachability import Reachability
from tgdaemon.retry import backoff_delay
from tgdaemon.session import StoreSession
from tgdaemon.status import UserInfo
from tgdaemon.store import DeviceInfo
from tgdaemon.telegram import ManagedClient, build_client, local_update_pts
from tgdaemon.updates import observe_updates
from tgdaemon.watch import AuthorizationWatch

if TYPE_CHECKING:
    from tgdaemon.config import AccountConfig, ConfigHolder, PolicyConfig
    from tgdaemon.dcs import DcDirectory
    from tgdaemon.ratelimit import ConnectRateLimiter
    from tgdaemon.reporter import AccountReporter
    from tgdaemon.store import SessionData, Store

#: Bound on tearing down a client: a wedged one is abandoned and replaced.
CLOSE_TIMEOUT = 5.0
#: Seconds between two runs of the client's housekeeping (``ManagedClient.keep_house``), the
#: period of the Telethon keep-alive loop it replaces.
HOUSEKEEPING_INTERVAL = 60.0


class UpdateStallError(ConnectionError):
    """Updates stopped arriving although the connection answers: reconnect (a NETWORK fault)."""


@dataclass(frozen=True)
class WorkerDeps:
    """What every worker shares; passed in so tests can supply their own clock or store."""

    settings: ConfigHolder
    store: Store
    limiter: ConnectRateLimiter
    directory: DcDirectory
    client_cls: type[ManagedClient]
    clock: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)
    #: Called with (account name, client) for every client object built, before it connects
    #: (the account API attaches its update listener here).
    client_hooks: tuple[Callable[[str, ManagedClient], None], ...] = ()
    #: Fleet mode: the leases this daemon holds (None: a single daemon owns its accounts).
    lease: LeaseGate | None = None
    #: One account reaching a server wakes the others backing off from it.
    reachability: Reachability = field(default_factory=Reachability)


class AccountWorker:
    """Owns one account's client for the lifetime of its task (see module docstring)."""

    def __init__(
        self,
        account: AccountConfig,
        deps: WorkerDeps,
        reporter: AccountReporter,
        session_data: SessionData | DecryptionError | None,
    ) -> None:
        self.account = account
        self.name = account.name
        self.deps = deps
        self.report = reporter
        self.log = reporter.log
        self.client: ManagedClient | None = None
        self.session: StoreSession | None = None
        #: Monotonic time of the last proof of progress (a heartbeat, a finished connect).
        self.last_progress = deps.monotonic()
        #: Monotonic deadline of a deliberate wait (backoff, flood wait); the watchdog ignores
        #: a worker that is waiting on purpose.
        self.waiting_until: float | None = None
        self._initial = session_data
        self._network_failures = 0
        #: Consecutive failures per category; cleared by the first heartbeat of a connection,
        #: not by connecting: a server that accepts and then drops must still see backoff grow.
        self._attempts: dict[Category, int] = {}
        #: Monotonic time of the first failure of that streak (how long it has persisted).
        self._failing_since = 0.0
        #: The route of the network failure being retried: the next attempt waits its turn.
        self._retry_route: Hashable | None = None
        self._catch_ups = 0
        self._watch = ConnectionWatch()
        self._plugins = Plugins(account, reporter)
        #: A failure another caller (the account API) ran into on this account's client,
        #: raised at the heartbeat wait so the usual recovery applies to it.
        self._reported: BaseException | None = None
        #: The security watch (created with the session: it needs the stored update date).
        self._sessions: AuthorizationWatch | None = None

    @property
    def policy(self) -> PolicyConfig:
        """The running policy: read at each step, so a reload applies without a restart."""
        return self.deps.settings.current.policy

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
            self.report.transition(State.STOPPED, f"internal error: {type(exc).__name__}")
        finally:
            await self._close_client()
            self.client = None  # an ended worker (parked, stopped) holds no Telethon state

    async def _run(self) -> None:
        initial = self._initial
        self.report.known_to_store = initial is not None
        if isinstance(initial, DecryptionError):
            # Never overwrite a record we cannot read: no session object is created for it.
            self.report.transition(
                State.NEEDS_LOGIN, "stored session cannot be decrypted",
                error=Classified(Category.AUTH, "UNDECRYPTABLE", str(initial)))
            return
        if initial is None or initial.auth_key is None:
            self.report.transition(State.NEEDS_LOGIN,
                                   f"no session: run `tgdaemon login {self.name}`")
            return
        self.session = StoreSession(self.deps.store, self.name, initial)
        self.report.dc(initial.dc_id, persist=False)
        self._sessions = AuthorizationWatch(
            self.log, since=float(initial.date or self.deps.clock()),
            interval=self.deps.settings.current.security.check_interval,
            clock=self.deps.clock, rng=self.deps.rng)
        while True:
            self.report.transition(State.RECONNECTING if self._attempts else State.CONNECTING,
                                   "connecting")
            try:
                async with self._connect_slot():
                    await self._connect()
                    me = await self._validate()
                    # help.getConfig, once per daemon: every DC's addresses for failover.
                    await self.deps.directory.refresh(
                        lambda: self._rpc(functions.help.GetConfigRequest()))
                self._catch_ups = 0
                self._arm_server_disconnect()  # again: validating may have taken a while
                a = self.account
                self.report.connected_as(
                    UserInfo(me.id, me.username, me.first_name), self.session.dc_id,
                    DeviceInfo(a.device_model, a.system_version, a.app_version))
                await self._plugins.run(self.client, self.policy.request_timeout)
                if self.client is not None:
                    # Handlers are in place: this connection's catch-up may start.
                    self.client.release_updates()
                await self._serve()
            except asyncio.CancelledError:
                raise
            except LeaseLostError:
                await self._close_client()
                self.report.transition(State.STOPPED, "lease lost: another instance may own it")
                return
            except Exception as exc:
                if not await self._recover(exc):
                    return

    def reschedule(self) -> None:
        """The policy changed: re-arm the heartbeat wait with the new interval now, rather
        than after a wait of the old length."""
        self._watch.wake()

    def hold_for_flood_wait(self, exc: BaseException) -> None:
        """A FLOOD_WAIT answered to a call made through this account's client (the account
        API): recover from it as from our own (state flood_wait, nothing sent until the
        deadline), starting now rather than at the next heartbeat."""
        self._reported = exc
        self._watch.wake()

    def _raise_reported(self) -> None:
        exc, self._reported = self._reported, None
        if exc is not None:
            raise exc

    # -- failure handling ------------------------------------------------------------------

    async def _recover(self, exc: Exception) -> bool:
        """Apply the recovery for ``exc``; False when the worker must end (parked/stopped)."""
        c = classify(exc)
        now = self.deps.monotonic()
        if not self._attempts:
            self._failing_since = now
        attempt = self._attempts.get(c.category, 0)
        self._attempts[c.category] = attempt + 1
        rec = recovery_for(c, attempt, self.policy, self.deps.rng,
                           persisted=now - self._failing_since)
        self.report.failure(c, rec, attempt)
        match rec.action:
            case Action.PARK | Action.FAIL:
                await self._close_client()
                return False
            case Action.WAIT:  # a short flood wait: the connection stays up, nothing is sent
                await self._deliberate_wait(rec.delay)
                return True
            case Action.MIGRATE:
                assert rec.new_dc is not None
                try:
                    await self._migrate(rec.new_dc)
                except asyncio.CancelledError:
                    raise
                except Exception as again:  # e.g. the new DC is down: back off and retry
                    return await self._recover(again)
                return True
            case Action.RETRY:
                route = None
                if c.category is Category.NETWORK:
                    self.deps.reachability.failed(self._route(), rec.delay)
                    self._network_failures += 1
                    if self._network_failures >= self.policy.failover_after:
                        self._fail_over(self._network_failures)
                    route = self._route()  # the next address after a failover
                await self._close_client()
                # Another account reaching the route ends the wait (tgdaemon.reachability).
                await self._deliberate_wait(rec.delay, route)
                self._retry_route = route
                return True

    async def _migrate(self, new_dc: int) -> None:
        """Follow a *_MIGRATE that Telethon raised instead of following itself (it does so for
        PHONE/NETWORK_MIGRATE of a logged-in account): the same switch, login carried over."""
        assert self.client is not None
        assert self.session is not None
        policy = self.policy
        async with asyncio.timeout(policy.connect_timeout + policy.request_timeout):
            await self.client._switch_dc(new_dc)  # not wait_for: see _connect
        await self.session.flush()
        self._watch.watch(self.client)
        self.report.dc(self.session.dc_id)

    def _fail_over(self, failures: int) -> bool:
        """Move to the DC's next address (after ``failures`` consecutive failures on this one,
        ours or, waiting for a probe, the fleet's); False when it has no other address."""
        assert self.session is not None
        dc_id = self.session.dc_id
        addresses = self.deps.directory.addresses(dc_id)
        if len(addresses) < 2:
            return False
        current = (self.session.server_address, self.session.port)
        index = addresses.index(current) if current in addresses else -1
        host, port = addresses[(index + 1) % len(addresses)]
        self.report.failover(dc_id, failures)
        self.session.set_dc(dc_id, host, port)
        self._network_failures = 0
        return True

    async def _deliberate_wait(self, delay: float, route: Hashable | None = None) -> None:
        """Sleep ``delay``; with a ``route``, until another account reaches it if sooner."""
        if delay <= 0:
            return
        self.waiting_until = self.deps.monotonic() + delay
        try:
            if route is None:
                await asyncio.sleep(delay)
            else:
                await self.deps.reachability.sleep(route, delay)
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
        if self.client is not None and self.client.is_connected():
            if self._watch.lost:
                self._watch.watch(self.client)  # e.g. after a DC switch
            return
        route, self._retry_route = self._retry_route, None
        if route is not None:
            await self._await_turn(route)
        # Waiting for a connect slot is a deliberate wait, not a stuck worker.
        await self._deliberate_wait(self.deps.limiter.reserve())
        if self.deps.lease is not None and not self.deps.lease.holds(self.name):
            raise LeaseLostError(self.name)
        if self.client is None:
            self.client = build_client(self.deps.client_cls, self.session,
                                       self.deps.settings.current, self.account)
            observe_updates(self.client, self.report)
            for hook in self.deps.client_hooks:
                hook(self.name, self.client)
            if self._sessions is not None:
                self._sessions.attach(self.client)
        client = self.client
        if self.deps.lease is not None:  # the server's deadline before any use of the key
            client._sender.first_request = self._server_deadline
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for loses a cancellation that
            # arrives as connect() fails, and the stopped worker would reconnect forever.
            async with asyncio.timeout(self.policy.connect_timeout):
                await client.connect()
        except BaseException as exc:
            await self._close_client()
            if isinstance(exc, TimeoutError):
                # A connect that hung (a stall mid key exchange) leaves Telethon's sender in
                # an unknown state: abandon this client object, build a fresh one next time.
                self.client = None
            raise
        self.deps.reachability.reached(self._route())
        # Fleet mode: the server's deadline went first on the connection; the lease may
        # have lapsed while connecting.
        if self.deps.lease is not None and not self.deps.lease.holds(self.name):
            raise LeaseLostError(self.name)
        # A fresh auth key must be durable before anything binds it to a user.
        await self.session.flush()
        self._watch.watch(client)
        self.last_progress = self.deps.monotonic()

    async def _await_turn(self, route: Hashable) -> None:
        """Retrying on a route that is down: attempt as its probe, or wait until an account
        reaches it (or, should no probe ever succeed, for a backoff of our own)."""
        policy = self.policy
        reach = self.deps.reachability
        waits = 0
        moved = False
        while not reach.claim(route, hold=policy.connect_timeout):
            failures = reach.failures(route)
            if not moved and failures >= policy.failover_after and self._fail_over(failures):
                # The fleet's failures on this address count: try the DC's next one now
                # rather than each account failing there on its own first (once per turn).
                moved = True
                route = self._route()
                continue
            fallback = backoff_delay(waits, base=policy.backoff_base, cap=policy.backoff_cap,
                                     jitter=policy.backoff_jitter, rng=self.deps.rng)
            waits += 1
            await self._deliberate_wait(fallback, route)

    def _route(self) -> Hashable:
        """The way this account reaches its server: the DC's address it uses, through its
        proxy if any."""
        assert self.session is not None
        proxy = self.account.proxy
        return (self.session.server_address, self.session.port, None if proxy is None else
                (proxy.scheme, proxy.host, proxy.port))

    async def _validate(self) -> types.User:
        """A real call (users.getUsers([self])) proves the session is logged in."""
        users = await self._rpc(functions.users.GetUsersRequest([types.InputUserSelf()]))
        me = users[0] if users else None
        if not isinstance(me, types.User):
            raise NotAuthorizedError("server returned no user for this session")
        return me

    async def _serve(self) -> None:
        """Heartbeat until the connection fails; every exit is an exception to recover from."""
        assert self.client is not None
        assert self.session is not None
        gap_streak = 0
        housekept = self.deps.monotonic()
        while True:
            await self._until_next_beat()
            started = self.deps.monotonic()
            # updates.getState is the heartbeat: a real encrypted round trip that proves the
            # connection works *and* tells the server's update state, in one RPC per account.
            server = await self._rpc(functions.updates.GetStateRequest())
            self.last_progress = self.deps.monotonic()
            if self._attempts:
                self._attempts.clear()
                self._network_failures = 0
            # Telethon follows a USER_MIGRATE inside the call: the DC is read, not assumed.
            self.report.heartbeat(self.last_progress - started, self.session.dc_id)
            if self._sessions is not None:
                await self._sessions.step(self._rpc, self.deps.settings.current, self.account,
                                          self.report)
            local = local_update_pts(self.client)
            gap_streak = gap_streak + 1 if local is not None and server.pts > local else 0
            if gap_streak >= self.policy.update_gap_heartbeats:
                gap_streak = 0
                await self._on_update_gap(server.pts, local)
            if self.last_progress - housekept >= HOUSEKEEPING_INTERVAL:
                housekept = self.last_progress
                await self.client.keep_house()
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
        self.client._sender.send_unawaited(self._server_deadline())

    def _server_deadline(self) -> Any:
        """The ``ping_delay_disconnect`` for the lease's local deadline as of now."""
        assert self.deps.lease is not None
        return functions.PingDelayDisconnectRequest(
            ping_id=int(time.time() * 1e6),
            disconnect_delay=self.deps.lease.disconnect_delay(self.name))

    async def _until_next_beat(self) -> None:
        """Sleep until the next heartbeat is due; :meth:`reschedule` re-arms the wait with
        the current ``heartbeat_interval`` (counted from when this wait began)."""
        began = self.deps.monotonic()
        while True:
            self._raise_reported()
            due = began + heartbeat_delay(self.policy.heartbeat_interval, self.deps.rng)
            remaining = due - self.deps.monotonic()
            if remaining <= 0 or await self._watch.sleep(remaining, self.client):
                self._raise_reported()
                return

    async def _on_update_gap(self, server_pts: int, local_pts: int | None) -> None:
        assert self.client is not None
        self.report.update_gap(server_pts, local_pts)
        if self._catch_ups == 0:
            self._catch_ups += 1
            await self.client.catch_up()  # getDifference fetches what was missed
            return
        # A second gap on the same connection: updates are not flowing; start over.
        raise UpdateStallError("updates stopped arriving on this connection")

    async def _rpc(self, request: Any) -> Any:
        """One RPC bounded by ``request_timeout`` (Telethon has no request timeout of its own).
        ``asyncio.timeout`` rather than ``wait_for``: no extra Task per heartbeat."""
        assert self.client is not None
        async with asyncio.timeout(self.policy.request_timeout):
            return await self.client(request)

    async def _close_client(self) -> None:
        self._watch.forget()
        client = self.client
        if client is None:
            return
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):  # not wait_for: see _connect
                await client.disconnect()
        except Exception as exc:  # a wedged client is dropped, not awaited forever
            self.log.warning("client did not close cleanly (%s); replacing it",
                             type(exc).__name__)
            self.client = None

