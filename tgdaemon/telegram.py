"""Building Telethon clients the daemon can supervise.

Telethon's defaults suit a script, not a supervisor: it sleeps through flood waits silently,
reconnects a few times and then gives up for good, and swaps RPC errors for
``ValueError('Request was unsuccessful')``. The settings here hand every one of those decisions
to the worker, which owns reconnection, backoff and flood waits (see ``tgdaemon.worker``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from telethon import TelegramClient, functions, types
from telethon.crypto import rsa
from telethon.errors import TypeNotFoundError

from tgdaemon.connection import connection_for
from tgdaemon.errors import Category, classify
from tgdaemon.handshake import PaddedKeySender
from tgdaemon.leanqueue import LeanQueue
from tgdaemon.updates import (
    DIFFERENCE_REQUESTS,
    CatchUpBox,
    UpdateGate,
    step_past_unknown,
)

if TYPE_CHECKING:
    from telethon.sessions.abstract import Session

    from tgdaemon.config import AccountConfig, Config, Proxy

log = logging.getLogger("tgdaemon.telegram")

#: One shared logger tree for Telethon's own messages: a logger per account and Telethon
#: module would cost 10,000 x ~10 logger objects.
TELETHON_LOGGER = "tgdaemon.telethon"


class MigrationFailedError(ConnectionError):
    """A DC switch failed and was rolled back; the session is back on its old DC."""


class ManagedClient(TelegramClient):  # type: ignore[misc]  # Telethon is untyped (Any)
    """A stock Telethon client with two changes.

    A DC switch keeps the login: Telethon's ``_switch_dc`` (telegrambaseclient.py:770) drops
    the auth key and connects to the new DC unauthorised, which turns a USER_MIGRATE of a
    logged-in account into a lost login. Here an authorised client exports its authorisation
    before the switch and imports it on the new DC, as Telegram's own apps do.

    New auth keys are always 256 bytes (:mod:`tgdaemon.handshake`): Telethon's own exchange
    keeps 1 key in 256 one byte short, which no longer matches the server's once stored.

    Catch-ups are reported and can wait for handlers (``tgdaemon.updates``): the MessageBox is
    a :class:`CatchUpBox`, and with ``hold_updates=True`` every connect holds update processing
    until :meth:`release_updates`.
    """

    _sender: Any  # Telethon's MTProtoSender until __init__ replaces it
    #: Telethon's 60 s keep-alive ping; the daemon's class turns it off (its heartbeats prove
    #: each connection: see :class:`~tgdaemon.handshake.PaddedKeySender`).
    keepalive_ping = True

    def __init__(self, *args: Any, hold_updates: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # What Telethon's constructor just built per client and this replaces (the originals
        # are freed right away): its logger mapping, a class of its own per client, by one
        # shared mapping; its update queue by a lean one (tgdaemon.leanqueue); its sender.
        self._log = shared_loggers(kwargs.get("base_logger"))
        self._updates_queue: LeanQueue[Any] = LeanQueue()
        self._sender = PaddedKeySender.replacing(self._sender, loggers=self._log,
                                                 updates_queue=self._updates_queue,
                                                 keepalive_ping=self.keepalive_ping)
        self._message_box = CatchUpBox(self._log["messagebox"])
        self._hold_updates = hold_updates
        self.update_gate = UpdateGate(held=hold_updates)
        #: Told the constructor id of every server object skipped as unparseable.
        self.on_unknown_object: Callable[[int], None] = _ignore_unknown

    @property
    def catch_up_box(self) -> CatchUpBox:
        box: CatchUpBox = self._message_box
        return box

    async def connect(self, *, validate: bool = False) -> None:
        """Telethon's connect; ``validate``: the initConnection that opens the connection
        carries users.getUsers([self]) instead of help.getConfig (Telethon discards that
        answer), so the first round trip also proves the login (:meth:`validated`): one round
        trip and one Config parse less per connect, in the daemon and in the server. An RPC
        error answered to it is raised by :meth:`validated`, not here: Telethon's connect
        would stop half-way (no update loop)."""
        if self._hold_updates and not self.is_connected():
            self.update_gate.close()
        sender = self._sender
        sender.init_result = None
        if validate:
            sender.init_query = functions.users.GetUsersRequest([types.InputUserSelf()])
        try:
            await super().connect()
        finally:
            sender.init_query = None

    def validated(self) -> list[Any] | None:
        """The users.getUsers([self]) answer of the last ``connect(validate=True)``, taken
        once, or the RPC error the server answered instead raised (an auth error, a
        USER_MIGRATE for the worker to follow); None when that connect sent none (the client
        was connected already)."""
        fut, self._sender.init_result = self._sender.init_result, None
        if fut is None or not fut.done() or fut.cancelled():
            return None
        users: list[Any] = fut.result()
        self.session.process_entities(users)  # as Telethon does after every call
        return users

    async def _call(self, sender: Any, request: Any, ordered: bool = False,
                    flood_sleep_threshold: int | None = None) -> Any:
        try:
            return await super()._call(sender, request, ordered, flood_sleep_threshold)
        except TypeNotFoundError:
            if not isinstance(request, DIFFERENCE_REQUESTS):
                raise

            async def call(req: Any) -> Any:
                return await super(ManagedClient, self)._call(sender, req, ordered,
                                                              flood_sleep_threshold)

            return await step_past_unknown(call, request, self._message_box.seq,
                                           self.on_unknown_object)

    def _session_has_user(self) -> bool:
        try:
            self.session.get_input_entity(0)  # Telethon's own-user marker (see StoreSession)
        except ValueError:
            return False
        return True

    async def _keepalive_loop(self) -> None:
        if self.keepalive_ping:
            await super()._keepalive_loop()
        # Otherwise no task-long loop per client (a coroutine, a task, a timer and two shield
        # futures a minute for every account): its ping is what the heartbeat replaces, and
        # its bookkeeping is :meth:`keep_house`, which the worker runs between heartbeats.

    async def keep_house(self) -> None:
        """What Telethon's keep-alive loop does each minute besides its ping: close idle
        exported senders and copy the update state into the session (saved through it; the
        session decides when that reaches the disk)."""
        await self._clean_exported_senders()
        await self._save_states_and_entities()
        self.session.save()

    def release_updates(self) -> None:
        """Let this connection's update loop start (the catch-up first)."""
        self.update_gate.release()

    async def _update_loop(self) -> None:
        await self.update_gate.wait()
        await super()._update_loop()

    async def _dispatch_update(self, update: Any) -> None:
        await super()._dispatch_update(update)
        self.catch_up_box.dispatched()  # not reached when a disconnect cancels the handlers

    async def _get_dc(self, dc_id: int, cdn: bool = False) -> Any:
        """The address a DC switch connects to. Telethon takes the first help.getConfig option
        with the DC's id and IP version, which in a real config may be a media-only or an
        obfuscated-only (tcpo_only) one, refused to this transport: here an option for API
        calls is preferred whenever the config lists one."""
        chosen = await super()._get_dc(dc_id, cdn)  # fetches the config once per class
        if cdn:
            return chosen
        for option in type(self)._config.dc_options:
            if (option.id == dc_id and bool(option.ipv6) == self._use_ipv6
                    and not (option.media_only or option.tcpo_only or option.cdn)):
                return option
        return chosen

    async def _switch_dc(self, new_dc: int) -> Any:
        # A session resumed with catch_up never calls get_me(), so ``_authorized`` may still be
        # unknown: the own user id stored in the session says it is logged in.
        if self._authorized is False or not (self._authorized or self._session_has_user()):
            return await super()._switch_dc(new_dc)
        # Raises before anything changes when the old DC cannot export: no switch then.
        exported = await self(functions.auth.ExportAuthorizationRequest(dc_id=new_dc))
        session = self.session
        old_dc = (session.dc_id, session.server_address, session.port)
        old_key = self._sender.auth_key.key
        # Telethon stores the new DC with *no* key before the import: that state must never
        # be the durable one, or a crash or a failed import loses the login.
        hold = getattr(session, "holding_writes", contextlib.nullcontext)
        # The switch reconnects (which holds updates); handlers already in place stay so.
        released = self.update_gate.released
        with hold():
            try:
                result = await super()._switch_dc(new_dc)
                await self(functions.auth.ImportAuthorizationRequest(
                    id=exported.id, bytes=exported.bytes))
            except BaseException as exc:
                # Back to the old DC and its working key (the sender shares the AuthKey
                # object with the session); the worker reconnects there.
                self._sender.auth_key.key = old_key
                session.set_dc(*old_dc)
                session.auth_key = self._sender.auth_key
                if not isinstance(exc, Exception):
                    raise
                # The connection may be on the new DC, now with the old key: never kept,
                # whatever the recovery (a short flood wait keeps the connection it has).
                await self._disconnect()
                failure = switch_failure(exc, new_dc)
                if failure is exc:
                    raise
                raise failure from exc
        if released:
            self.release_updates()
        return result


def switch_failure(exc: Exception, new_dc: int) -> Exception:
    """What a DC switch that failed and was rolled back raises for ``exc``, its cause.

    A flood wait is itself: the server said when the switch may be tried again, and the
    worker waits exactly that (an earlier try only earns another flood wait). Anything else
    leaves the account intact on its old DC: a connection-level failure, retried with backoff.
    """
    if classify(exc).category is Category.FLOOD_WAIT:
        return exc
    return MigrationFailedError(
        f"could not carry the login to DC {new_dc}: {type(exc).__name__}")


def _ignore_unknown(_constructor_id: int) -> None:
    return None


class _Loggers(dict[str, logging.Logger]):
    """Telethon's per-client logger mapping (telegrambaseclient.py:285: module name -> child of
    the base logger), one per base logger and process. Telethon defines a new dict subclass
    in every client's constructor: a class object, its descriptors and its MRO, ~3 KB per
    account for the same loggers every client gets."""

    def __init__(self, base: logging.Logger) -> None:
        super().__init__()
        self._base = base

    def __missing__(self, key: str) -> logging.Logger:
        name = key.split(".", maxsplit=1)[1] if key.startswith("telethon.") else key
        logger = self[key] = self._base.getChild(name)
        return logger


_LOGGERS: dict[str, _Loggers] = {}


def shared_loggers(base: str | logging.Logger | None) -> _Loggers:
    """The process's logger mapping for Telethon clients logging under ``base`` (a name or a
    logger, as Telethon's ``base_logger``; None: Telethon's default, ``telethon``)."""
    logger = base if isinstance(base, logging.Logger) else logging.getLogger(base or "telethon")
    loggers = _LOGGERS.get(logger.name)
    if loggers is None:
        loggers = _LOGGERS[logger.name] = _Loggers(logger)
    return loggers


def client_class(*, keepalive_ping: bool = True) -> type[ManagedClient]:
    """A fresh subclass per daemon: ``TelegramClient._config`` is a class-level cache of
    help.getConfig, and two daemons (or tests) in one process must not share it.
    ``keepalive_ping=False`` for clients whose connection a heartbeat proves."""
    return cast(type[ManagedClient], type("ManagedClient", (ManagedClient,),
                                          {"_config": None, "keepalive_ping": keepalive_ping}))


def trust_server_keys(config: Config) -> None:
    """Add the configured server RSA keys (process-wide in Telethon; adding twice is harmless)."""
    for path in config.telegram.rsa_keys:
        rsa.add_key(path.read_text(), old=False)


def telethon_proxy(proxy: Proxy | None) -> Any:
    if proxy is None:
        return None
    return proxy.telethon_proxy()


def build_client(
    cls: type[ManagedClient],
    session: Session,
    config: Config,
    account: AccountConfig,
) -> ManagedClient:
    """A client whose failures all surface to the worker (see module docstring)."""
    policy = config.policy
    return cls(
        session,
        config.telegram.api_id,
        config.telegram.api_hash,
        connection=connection_for(account.proxy),  # follows the proxy type; frames capped
        use_ipv6=config.telegram.use_ipv6,
        proxy=telethon_proxy(account.proxy),
        timeout=int(max(1, policy.connect_timeout)),
        request_retries=1,  # two tries: enough for Telethon to follow a *_MIGRATE
        connection_retries=0,  # one attempt per connect(); the worker backs off
        retry_delay=0,
        auto_reconnect=False,  # the worker reconnects, forever, with jittered backoff
        flood_sleep_threshold=0,  # every flood wait reaches the worker to be counted
        raise_last_call_error=True,
        device_model=account.device_model,
        system_version=account.system_version,
        app_version=account.app_version,
        lang_code=account.lang_code,
        system_lang_code=account.system_lang_code,
        base_logger=TELETHON_LOGGER,
        receive_updates=True,
        # Handlers see updates one at a time, in the server's order (a catch-up of many
        # updates would otherwise interleave); a plugin with slow work runs its own task.
        sequential_updates=True,
        # Resume from the session's stored update state on every connect (tgdaemon.updates).
        catch_up=True,
        hold_updates=True,
        entity_cache_limit=256,
    )


def local_update_pts(client: TelegramClient) -> int | None:
    """The account pts the client has processed, or None before the update state is known
    or while a difference is being fetched.

    Reads Telethon's private MessageBox (1.45: _updates/messagebox.py:237, ``map``): there is
    no public accessor, and comparing it with updates.getState is the only way to see a silent
    stall. (``session_state()`` would build a dict of every channel on each heartbeat.)
    """
    box = getattr(client, "_message_box", None)
    if isinstance(box, CatchUpBox):
        return box.account_pts()
    return None
