"""One account's worker: the connection I/O of one account, for the lifetime of its task.

Connect, validate, heartbeat; on every failure ask :mod:`tgdaemon.lifecycle` what to do
(backoff and reconnect, a flood wait, parking, a DC migration) and do it. What the outside sees
(status, metrics, the store's status, the transition log) is written by the account's
:class:`~tgdaemon.reporter.AccountReporter`, never here. Parked accounts end their task and
hold no connection: a revoked account costs nothing and sends nothing. Its client object (build,
bounded connect and close), its route (and failover), its deliberate waits and its lease are
their own modules: accountclient, route, progress, serverdeadline; so is its watch over the
connection's update stream (updategap).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from telethon import functions, types

from tgdaemon.accountclient import AccountClient
from tgdaemon.connwatch import ConnectionWatch
from tgdaemon.cycles import drop_frames
from tgdaemon.errors import NotAuthorizedError, classify
from tgdaemon.exceptions import DecryptionError
from tgdaemon.leases import LeaseGate, LeaseLostError
from tgdaemon.lifecycle import (
    Action,
    Category,
    Classified,
    State,
    heartbeat_delay,
    heartbeat_tick,
    recovery_for,
)
from tgdaemon.plugins import Plugins
from tgdaemon.progress import Progress
from tgdaemon.reachability import Reachability
from tgdaemon.reaper import Reaper
from tgdaemon.route import AccountRoute
from tgdaemon.serverdeadline import ConnectionLease
from tgdaemon.session import StoreSession
from tgdaemon.status import UserInfo
from tgdaemon.store import DeviceInfo
from tgdaemon.tasks import raise_if_cancelled
from tgdaemon.telegram import ManagedClient
from tgdaemon.updategap import UpdateGaps
from tgdaemon.watch import AuthorizationWatch
from tgdaemon.wheel import TimerWheel

if TYPE_CHECKING:
    from tgdaemon.config import AccountConfig, ConfigHolder, PolicyConfig
    from tgdaemon.dcs import DcDirectory
    from tgdaemon.ratelimit import ConnectRateLimiter
    from tgdaemon.reporter import AccountReporter
    from tgdaemon.store import SessionData, Store

#: Seconds between two runs of the client's housekeeping (``ManagedClient.keep_house``), the
#: period of the Telethon keep-alive loop it replaces.
HOUSEKEEPING_INTERVAL = 60.0


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
    #: The heartbeat waits' shared timers: accounts due in one tick beat together.
    wheel: TimerWheel = field(default_factory=TimerWheel)
    #: Where clients the workers let go of are finished and freed (tgdaemon.reaper).
    reaper: Reaper = field(default_factory=Reaper)


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
        #: The client object (built at the first connect, replaced when given up).
        self._client = AccountClient(account, deps, reporter)
        self.session: StoreSession | None = None
        #: What the watchdog sees: the last progress, a deliberate wait in progress.
        self.progress = Progress(deps.monotonic, deps.reachability)
        self._initial = session_data
        #: Consecutive failures per category; cleared by the first heartbeat of a connection,
        #: not by connecting: a server that accepts and then drops must still see backoff grow.
        self._attempts: dict[Category, int] = {}
        #: Monotonic time of the first failure of that streak (how long it has persisted).
        self._failing_since = 0.0
        self._lease = ConnectionLease.of(deps.lease, self.name, deps.monotonic)  # fleet mode
        #: The way to the server (created with the session: it moves the session's address).
        self._route: AccountRoute | None = None
        self._gaps = UpdateGaps()
        self._watch = ConnectionWatch(deps.wheel)
        self._plugins = Plugins(account, reporter)
        #: A failure another caller (the account API) ran into on this account's client,
        #: raised at the heartbeat wait so the usual recovery applies to it.
        self._reported: BaseException | None = None
        #: The security watch (created with the session: it needs the stored update date).
        self._sessions: AuthorizationWatch | None = None

    @property
    def client(self) -> ManagedClient | None:
        return self._client.current

    @property
    def policy(self) -> PolicyConfig:
        """The running policy: read at each step, so a reload applies without a restart."""
        return self.deps.settings.current.policy

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        """The task body. Returns when the account is parked or stopped; never raises except
        CancelledError (the supervisor's stop)."""
        try:
            if self._open_session():
                await self._connected_loop()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not take the fleet down
            self.log.exception("worker failed unexpectedly: %s", type(exc).__name__)
            self.report.transition(State.STOPPED, f"internal error: {type(exc).__name__}")
        finally:
            with contextlib.suppress(TimeoutError):  # no slot in time: dropped (accountclient)
                async with self._client.paced():
                    await self._close_client()
            self._watch.forget()
            self._client.drop()  # an ended worker (parked, stopped) holds no Telethon state

    def _open_session(self) -> bool:
        """The session from the stored record; False (and why, reported) when there is none.
        The record is dropped here: the session holds what of it lives on."""
        initial, self._initial = self._initial, None
        self.report.known_to_store = initial is not None
        if isinstance(initial, DecryptionError):
            # Never overwrite a record we cannot read: no session object is created for it.
            self.report.transition(
                State.NEEDS_LOGIN, "stored session cannot be decrypted",
                error=Classified(Category.AUTH, "UNDECRYPTABLE", str(initial)))
            return False
        if initial is None or initial.auth_key is None:
            self.report.transition(State.NEEDS_LOGIN,
                                   f"no session: run `tgdaemon login {self.name}`")
            return False
        self.session = StoreSession(self.deps.store, self.name, initial)
        self.report.dc(initial.dc_id, persist=False)
        self._route = AccountRoute(self.session, self.account.proxy, self.deps.directory,
                                   self.deps.reachability, self.report)
        self._sessions = AuthorizationWatch(
            self.log, since=float(initial.date or self.deps.clock()),
            interval=self.deps.settings.current.security.check_interval,
            clock=self.deps.clock, rng=self.deps.rng)
        return True

    async def _connected_loop(self) -> None:
        """Connect, validate, serve; recover from each failure until parked or stopped."""
        assert self.session is not None
        while True:
            self.report.transition(State.RECONNECTING if self._attempts else State.CONNECTING,
                                   "connecting")
            try:
                await self._take_turn()
                async with self.progress.slot(self.deps.limiter.in_flight):
                    await self._connect()
                    me = await self._validate()
                    # help.getConfig, once per daemon: every DC's addresses for failover.
                    await self.deps.directory.refresh(
                        lambda: self._rpc(functions.help.GetConfigRequest()))
                raise_if_cancelled()  # a stop that Telethon's connect swallowed (tasks.py)
                self._gaps.connected()
                if self._lease is not None:  # again: validating may have taken a while
                    self._lease.arm(self.client)
                a = self.account
                self.report.connected_as(
                    me, self.session.dc_id,
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

    def stopping(self, began: float) -> None:
        """The supervisor is about to cancel this worker, in a stop that began at loop time
        ``began`` (workers are cancelled in batches: the last close is paced from then)."""
        self._client.stop_began = began

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
        raise_if_cancelled()  # checked at every wait: a stop is never slept through
        exc, self._reported = self._reported, None
        if exc is not None:
            raise exc

    # -- failure handling ------------------------------------------------------------------

    async def _recover(self, exc: Exception) -> bool:
        """Apply the recovery for ``exc``; False when the worker must end (parked/stopped)."""
        c = classify(exc)
        # Classified: its traceback is of no more use, and its frames (the heartbeat wait's
        # holds the connection's ended future, which holds ``exc``) make a cycle that a freeze
        # would keep for good (tgdaemon.cycles).
        drop_frames(exc)
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
                await self.progress.wait(rec.delay)
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
                assert self._route is not None
                route = None
                if c.category is Category.NETWORK:
                    route = self._route.failed(rec.delay, self.policy)
                async with self.progress.slot(self.deps.limiter.in_flight):  # see ratelimit
                    await self._close_client()
                await self.progress.wait(rec.delay, route)  # or until the route is reached
                self._route.retry = route
                return True

    async def _migrate(self, new_dc: int) -> None:
        """Follow a *_MIGRATE that Telethon raised instead of following itself (it does so for
        PHONE/NETWORK_MIGRATE of a logged-in account): the same switch, login carried over."""
        assert self.client is not None
        assert self.session is not None
        policy = self.policy
        async with asyncio.timeout(policy.connect_timeout + policy.request_timeout):
            await self.client._switch_dc(new_dc)  # not wait_for: see AccountClient.connect
        await self.session.flush()
        self._watch.watch(self.client)
        self.report.dc(self.session.dc_id)

    # -- connection ------------------------------------------------------------------------

    async def _take_turn(self) -> None:
        """The turn on a route that is down, then the rate slot (tgdaemon.ratelimit)."""
        if self._route is not None and not (self.client and self.client.is_connected()):
            await self._route.await_turn(self.policy, self.deps.rng, self.progress.wait)
            await self.progress.wait(self.deps.limiter.reserve())

    async def _connect(self) -> None:
        assert self.session is not None
        if self.client is not None and self.client.is_connected():
            if self._watch.lost:
                self._watch.watch(self.client)  # e.g. after a DC switch
            return
        assert self._route is not None
        if self._lease is not None:
            self._lease.check()
        client = self._client.get(self.session, self._sessions)
        if self._lease is not None:  # the server's deadline before any use of the key
            self._lease.install(client)
        await self._client.connect(client, self.policy.connect_timeout)
        self._route.reached()
        # Fleet mode: the server's deadline went first on the connection; the lease may
        # have lapsed while connecting.
        if self._lease is not None:
            self._lease.check()
        # A fresh auth key must be durable before anything binds it to a user.
        await self.session.flush()
        self._watch.watch(client)
        self.progress.made()

    async def _validate(self) -> UserInfo:
        """A real call (users.getUsers([self])) proves the session is logged in: the one the
        connection's initConnection carried, or one of its own. Only what the status shows is
        kept (the TL User, ~1.5 KB, would live in this task's frame)."""
        assert self.client is not None
        users = self.client.validated()
        if users is None:
            users = await self._rpc(functions.users.GetUsersRequest([types.InputUserSelf()]))
        me = users[0] if users else None
        if not isinstance(me, types.User):
            raise NotAuthorizedError("server returned no user for this session")
        return UserInfo(me.id, me.username, me.first_name)

    async def _serve(self) -> None:
        """Heartbeat until the connection fails; every exit is an exception to recover from."""
        assert self.client is not None
        assert self.session is not None
        housekept = self.deps.monotonic()
        while True:
            await self._until_next_beat()
            if self._lease is not None:  # re-armed first: not after a slow round trip
                self._lease.arm(self.client)
            started = self.deps.monotonic()
            # updates.getState is the heartbeat: a real encrypted round trip that proves the
            # connection works *and* tells the server's update state, in one RPC per account.
            server = await self._rpc(functions.updates.GetStateRequest())
            beat = self.progress.made()
            if self._attempts:
                self._attempts.clear()
                assert self._route is not None
                self._route.network_failures = 0
            # Telethon follows a USER_MIGRATE inside the call: the DC is read, not assumed.
            self.report.heartbeat(beat - started, self.session.dc_id)
            if self._sessions is not None:
                await self._sessions.step(self._rpc, self.deps.settings.current, self.account,
                                          self.report)
            await self._gaps.check(self.client, server.pts, self.policy.update_gap_heartbeats,
                                   self.report)
            if beat - housekept >= HOUSEKEEPING_INTERVAL:
                housekept = beat
                await self.client.keep_house()

    async def _until_next_beat(self) -> None:
        """Sleep until the next heartbeat is due; :meth:`reschedule` re-arms the wait with
        the current ``heartbeat_interval`` (counted from when this wait began)."""
        began = self.deps.monotonic()
        while True:
            self._raise_reported()
            interval = self.policy.heartbeat_interval
            due = began + heartbeat_delay(interval, self.deps.rng)
            if self._lease is not None:  # soon enough to re-arm the server's deadline
                due = self._lease.heartbeat_due(began, due, interval)
            remaining = due - self.deps.monotonic()
            if remaining <= 0 or await self._watch.sleep(remaining, self.client,
                                                         heartbeat_tick(interval)):
                self._raise_reported()
                return

    async def _rpc(self, request: Any) -> Any:
        """One RPC bounded by ``request_timeout`` (Telethon has no request timeout of its own).
        ``asyncio.timeout`` rather than ``wait_for``: no extra Task per heartbeat."""
        assert self.client is not None
        async with asyncio.timeout(self.policy.request_timeout):
            return await self.client(request)

    async def _close_client(self) -> None:
        self._watch.forget()
        await self._client.close()

