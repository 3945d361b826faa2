"""The daemon: wires store, status, metrics, HTTP and the supervisor together, and runs them.

``Daemon`` is also the library entry point (the seed document's ``getClient``)::

    async with Daemon(config) as d:
        client = await d.client("alice", timeout=30)

Start-up follows aiohttp's contract: each part that started registers its own cleanup, and
stop runs exactly those cleanups in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import resource
import signal
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from tgdaemon.config import Config, ConfigHolder, allowed_hosts, config_warnings, load_config
from tgdaemon.crypto import KeyRing, load_keyring, remove_stale_temp_files
from tgdaemon.dcs import DcDirectory
from tgdaemon.exceptions import ConfigError, TgdaemonError
from tgdaemon.fdlimit import HTTP_SPARE_FDS, FdReserve, fd_shortfall
from tgdaemon.fleet import Fleet, fleet_lock_name
from tgdaemon.gcpolicy import GcPolicy
from tgdaemon.keyrotation import FleetKeys, KeyRotation
from tgdaemon.leasestore import open_lease_store
from tgdaemon.lifecycle import State
from tgdaemon.logvolume import NoiseCollector, flush_summaries
from tgdaemon.looplag import LoopLag
from tgdaemon.metrics import Metrics
from tgdaemon.notify import Notifier
from tgdaemon.ratelimit import ConnectRateLimiter
from tgdaemon.records import RecordsCollector, check_records
from tgdaemon.status import StatusBoard
from tgdaemon.store import LOCK_NAME, Store
from tgdaemon.supervisor import Supervisor
from tgdaemon.telegram import client_class, trust_server_keys
from tgdaemon.worker import WorkerDeps

if TYPE_CHECKING:
    from tgdaemon.exceptions import DecryptionError
    from tgdaemon.store import SessionData
    from tgdaemon.telegram import ManagedClient

log = logging.getLogger("tgdaemon.daemon")


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        registry: CollectorRegistry | None = None,
        keyring: KeyRing | None = None,
        env: Mapping[str, str] = os.environ,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        #: The running configuration; a reload replaces ``settings.current``.
        self.settings = ConfigHolder(config)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.registry.register(NoiseCollector())
        self._keyring = keyring
        self._env = env
        self._clock = clock
        self._monotonic = monotonic
        self._rng = rng or random.Random()
        self._stack = contextlib.AsyncExitStack()
        self.board = StatusBoard(clock=clock)
        self.metrics = Metrics(
            self.registry, self.board, histograms=config.daemon.metrics_histograms,
            counters=config.daemon.metrics_counters,
            heartbeat_interval=lambda: self.settings.current.policy.heartbeat_interval)
        self.store: Store | None = None
        self.supervisor: Supervisor | None = None
        self.fleet: Fleet | None = None
        self.http: Any = None  # tgdaemon.http.HttpServer when listening
        self.api: Any = None  # tgdaemon.api.AccountApi when [api] has clients
        self.records = RecordsCollector(self.registry)
        self.loop_lag = LoopLag(self.registry, monotonic=monotonic)
        self.rotation: KeyRotation | None = None
        #: Freezes the long-lived heap during connect waves (``tgdaemon.gcpolicy``).
        self.gc = GcPolicy(self._connecting, registry=self.registry)
        #: A fleet instance's side of a key rotation (agreement on the write key).
        self.fleet_keys: FleetKeys | None = None
        self._ready = False

    @property
    def config(self) -> Config:
        return self.settings.current

    async def __aenter__(self) -> Daemon:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise

    async def _start(self) -> None:
        config = self.config
        # The last step of a stop: the summary lines of what the stop itself logged.
        self._stack.callback(flush_summaries)
        spare_fds = FdReserve(HTTP_SPARE_FDS)
        if config.daemon.http_listen is not None:
            # First of all, so the spares get the lowest numbers: below the limit even if it
            # is lowered under what the process holds (README: out of file descriptors).
            spare_fds.fill()
            self._stack.callback(spare_fds.close)
        self.loop_lag.start()
        self._stack.push_async_callback(self.loop_lag.stop)
        self._stack.push_async_callback(self.gc.stop)
        # Imports and the parsed configuration (10,000 accounts' worth) are long-lived: out of
        # the collector's sight before reading the sessions triggers a full collection. Young
        # generations only: a full one here walks the whole heap (62 ms at 10,000 accounts).
        self.gc.freeze(full=False)
        for warning in config_warnings(config):
            log.warning("%s", warning)
        keyring = self._keyring or load_keyring(key_file=config.daemon.master_key_file,
                                                env=self._env)
        if config.daemon.master_key_file is not None:
            remove_stale_temp_files(config.daemon.master_key_file)
        trust_server_keys(config)
        lock_name = fleet_lock_name(config) if config.daemon.clustered else LOCK_NAME
        self.store = await Store.open(config.daemon.state_dir, keyring, clock=self._clock,
                                      lock_name=lock_name)
        self._stack.push_async_callback(self.store.close)
        if config.daemon.clustered:
            self.fleet = await self._join_fleet(config, self.store)
        self.rotation = KeyRotation(self.store, self.board, self.registry)
        self._stack.push_async_callback(self.rotation.stop)  # before the lease store closes
        #: Read once for the record check and the workers (a fleet member's come later).
        sessions: Mapping[str, SessionData | DecryptionError] | None = None
        if self.fleet is not None:
            await self.check_records()  # the fleet's records, now that they are routed
            self.fleet_keys = FleetKeys(
                instance=self.fleet.instance, leases=self.fleet.leases, store=self.store,
                rotation=self.rotation, ring=keyring, ttl=config.daemon.lease_ttl,
                interval=config.daemon.lease_renew_interval)
            await self.fleet_keys.start()  # before the first claim: the fleet sees our ring
            self._stack.push_async_callback(self.fleet_keys.stop)
            # Workers run the accounts whose leases we hold: none until the first claim.
            self.settings.current = self.fleet.worker_config()
        else:
            sessions = await self.store.load_sessions()
            await self.check_records(sessions)
            self._resume_rotation()

        api = None
        if config.api.enabled:
            from tgdaemon.api import AccountApi

            api = AccountApi(self.settings, self.board, keyring, self.registry,
                             clock=self._clock, monotonic=self._monotonic)
            await api.start()
            self._stack.push_async_callback(api.stop)
        self.api = api

        directory = DcDirectory(config.telegram.servers, self.store,
                                use_ipv6=config.telegram.use_ipv6, monotonic=self._monotonic)
        await directory.load()
        deps = WorkerDeps(
            settings=self.settings,
            store=self.store,
            limiter=ConnectRateLimiter(config.daemon.connect_rate, config.daemon.connect_burst,
                                       concurrency=config.daemon.connect_concurrency,
                                       clock=self._monotonic),
            directory=directory,
            # The workers' heartbeats prove each connection: no Telethon ping on top.
            client_cls=client_class(keepalive_ping=False),
            clock=self._clock,
            monotonic=self._monotonic,
            rng=self._rng,
            client_hooks=api.client_hooks if api is not None else (),
            lease=self.fleet,
        )
        self.supervisor = Supervisor(deps, board=self.board, metrics=self.metrics)
        self._stack.push_async_callback(deps.reaper.stop)  # after the workers' stop
        if api is not None:
            api.bind(self.supervisor.worker)
        # The sessions, the store are frozen before any worker allocates; then the workers
        # are spawned and connect (the first wave) with the policy's sweeps running: spawning
        # 10,000 took ~40 s on a loaded machine, with automatic full collections of up to
        # 0.5 million objects meanwhile.
        self.gc.start()
        await self.supervisor.start(sessions)
        self._stack.push_async_callback(self._stop_supervisor)
        if self.fleet is not None:
            self.fleet.start(self.supervisor)
            self._stack.push_async_callback(self.fleet.stop, config.daemon.drain_timeout)

        listen = config.daemon.http_listen
        if listen is not None:
            from tgdaemon.http import HttpServer, build_app

            app = build_app(board=self.board, registry=self.registry, ready=self.ready,
                            token=config.daemon.http_token,
                            allowed_hosts=allowed_hosts(config.daemon))
            if api is not None:
                api.register(app)
            self.http = HttpServer(app, listen.host, listen.port, spare_fds)
            await self.http.start()
            self._stack.push_async_callback(self.http.stop)
            log.info("HTTP listening on %s:%d", listen.host, self.http.port)
        self._ready = True
        log.info("daemon started: %s", self.board.summary())

    def _connecting(self) -> tuple[int, int]:
        """(accounts starting, connecting or reconnecting; all accounts) for the GC policy."""
        counts = self.board.counts()
        return (counts[State.STARTING] + counts[State.CONNECTING]
                + counts[State.RECONNECTING], sum(counts.values()))

    async def _join_fleet(self, config: Config, store: Store) -> Fleet:
        """Fleet mode: open the shared lease store and join (README: Scaling out)."""
        leases = await open_lease_store(config.daemon.database_url, store.path,
                                        config.daemon.lease_ttl,
                                        config.daemon.lease_renew_interval, store.lock_stats)
        self._stack.push_async_callback(leases.close)
        fleet = Fleet(config=config, leases=leases, store=store, registry=self.registry,
                      monotonic=self._monotonic, rng=self._rng)
        await fleet.prepare()
        return fleet

    async def _stop_supervisor(self) -> None:
        assert self.supervisor is not None
        self._ready = False
        await self.supervisor.stop(self.config.daemon.drain_timeout)

    async def stop(self) -> None:
        await self._stack.aclose()

    def ready(self) -> bool:
        """Ready once started, unless the store cannot be used: no stored session decrypts
        (wrong master key) or the database refuses writes."""
        report = self.records.report
        if report is not None and report.none_readable:
            return False
        return self._ready and not (self.store is not None and self.store.read_only)

    async def check_records(
        self, sessions: Mapping[str, SessionData | DecryptionError] | None = None,
    ) -> None:
        """Measure the stored records against the key ring: one ERROR line for the fleet
        (not one per account) when some cannot be decrypted."""
        assert self.store is not None
        report = await check_records(self.store, sessions)
        self.records.report = report
        problem = report.problem()
        if problem is not None:
            log.error("%s%s", problem, "; not ready" if report.none_readable else "")

    def _reload_keyring(self, config: Config) -> None:
        """Pick up a ring written by ``tgdaemon rotate-key`` while running: a new active key
        starts the background re-encryption (``tgdaemon.keyrotation``)."""
        if self._keyring is not None or self.store is None:
            return  # a ring handed in by the caller (library use) is the caller's to change
        try:
            ring = load_keyring(key_file=config.daemon.master_key_file, env=self._env)
        except ConfigError as exc:
            log.error("key ring not reloaded, keeping the running one: %s", exc)
            return
        fleet_keys = self.fleet_keys
        running = self.store.keyring if fleet_keys is None else fleet_keys.ring
        if ring.active.key_id == running.active.key_id and ring.key_ids == running.key_ids:
            return
        try:
            if fleet_keys is not None:
                fleet_keys.set_ring(ring)
            else:
                self.store.set_keyring(ring)
        except TgdaemonError as exc:
            log.error("%s", exc)
            return
        if fleet_keys is not None:
            log.info("new master key ring (active key %s): used for writing and re-encryption "
                     "once every live instance of the fleet holds the key", ring.active.key_id)
            return
        log.info("new master key %s: re-encrypting stored sessions in the background",
                 ring.active.key_id)
        self._resume_rotation()

    def _resume_rotation(self) -> None:
        """Re-encrypt what is not under the active key yet (a rotation the last run did not
        finish, or one just begun); cheap when there is nothing to do."""
        report = self.records.report
        active = self.store.keyring.active.key_id if self.store is not None else None
        if self.rotation is None or report is None or self.fleet_keys is not None:
            return  # a fleet instance: tgdaemon.keyrotation.FleetKeys decides when
        if any(key != active for key in report.key_use) or self.rotation.running:
            self.rotation.start()

    def summary(self) -> str:
        return self.board.summary()

    async def client(self, name: str, timeout: float = 30.0) -> ManagedClient:
        """The account's managed, connected client (waits for it to connect)."""
        assert self.supervisor is not None, "daemon not started"
        return await self.supervisor.client(name, timeout)

    async def check(self) -> int:
        """The supervisor's health check: restarts stuck workers."""
        assert self.supervisor is not None
        return await self.supervisor.check()

    async def reload(self) -> bool:
        """Re-read the config file; an invalid one is reported and the old one keeps running."""
        assert self.supervisor is not None
        try:
            new = load_config(self.config.path, env=self._env)
        except ConfigError as exc:
            log.error("reload rejected, keeping the running configuration:\n%s", exc)
            self.metrics.config_reload(False)
            return False
        if new.daemon.state_dir != self.config.daemon.state_dir:
            log.error("reload rejected: daemon.state_dir cannot change while running")
            self.metrics.config_reload(False)
            return False
        if dataclasses.replace(new.daemon, log_level=self.config.daemon.log_level) \
                != self.config.daemon:
            log.warning("[daemon] settings other than log_level changed: they take effect at "
                        "the next restart")
        for warning in config_warnings(new):
            log.warning("%s", warning)
        if (short := fd_shortfall(new)) is not None:
            log.warning("%s", short)
        trust_server_keys(new)
        self._reload_keyring(new)
        await self.check_records()  # e.g. after `tgdaemon login --force` replaced records
        if self.fleet is not None:
            await self.fleet.reload(new)  # ``new`` with the accounts we hold
        else:
            await self.supervisor.apply(new)  # makes ``new`` the running configuration
        logging.getLogger().setLevel(new.daemon.log_level.upper())
        self.metrics.config_reload(True)
        return True


def raise_open_file_limit() -> tuple[int, int]:
    """10,000 sockets do not fit in the usual soft limit of 1,024: take the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft, hard


def _tick(notifier: Notifier, config: Config) -> float:
    """How often the supervisor checks its workers: often enough for systemd's watchdog and
    to catch a stale worker within a quarter of ``stale_after``."""
    return min(notifier.watchdog_interval or 5.0, 5.0, max(0.5, config.policy.stale_after / 4))


async def serve(config: Config, *, env: Mapping[str, str] = os.environ) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads. Returns the process exit code."""
    notifier = Notifier(env)
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    flags = {"stop": False, "reload": False}

    def on_signal(flag: str) -> None:
        flags[flag] = True
        wake.set()

    for sig, flag in ((signal.SIGTERM, "stop"), (signal.SIGINT, "stop"), (signal.SIGHUP, "reload")):
        loop.add_signal_handler(sig, on_signal, flag)
    try:
        async with Daemon(config, env=env) as daemon:
            notifier.ready(daemon.summary())
            tick = _tick(notifier, config)
            last_status = ""
            while not flags["stop"]:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), tick)
                wake.clear()
                if flags["stop"]:
                    break
                if flags["reload"]:
                    flags["reload"] = False
                    notifier.reloading()
                    try:
                        await daemon.reload()
                    except Exception:  # the running fleet must survive a failed reload
                        log.exception("reload failed; the running configuration stays")
                        daemon.metrics.config_reload(False)
                    notifier.ready(daemon.summary())
                    tick = _tick(notifier, daemon.config)
                try:
                    await daemon.check()
                except Exception:  # no WATCHDOG=1 this tick: systemd notices if it persists
                    log.exception("health check failed")
                    continue
                # Only after the health check ran: a blocked loop never gets here.
                notifier.watchdog()
                status = daemon.summary()
                if status != last_status:
                    notifier.status(status)
                    last_status = status
            log.info("stopping: draining workers")
            notifier.stopping()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    log.info("stopped")
    return 0
