"""The local MTProto data centre: TCP listeners, connections and the in-process API.

One asyncio stream handler per TCP connection (no threads, no polling); all protocol work is
synchronous inside it, so a connection costs one task plus its buffers. This is a stand-in
for tests and demos, never Telegram.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from types import TracebackType
from typing import Any

from telethon.errors import TypeNotFoundError
from telethon.extensions import BinaryReader
from telethon.tl import functions as fn
from telethon.tl import types as tl
from telethon.tl.core import GzipPacked
from telethon.tl.tlobject import TLRequest

from tgdaemon.localdc import account as _account  # noqa: F401  (registers its handlers)
from tgdaemon.localdc import messaging as _messaging  # noqa: F401  (registers its handlers)
from tgdaemon.localdc import transport
from tgdaemon.localdc.crypto import (
    DH_PRIME,
    SHORT_KEY_MODULUS,
    Handshake,
    HandshakeError,
    decrypt_client_message,
    encrypt_server_message,
    key_id_of,
)
from tgdaemon.localdc.faults import Fault, FaultBook, MethodNames, Scope, flood_wait_seconds
from tgdaemon.localdc.keyuse import KeyUse
from tgdaemon.localdc.overlaps import peer_pid
from tgdaemon.localdc.rpc import (
    SERVICE_USER_ID,
    Ctx,
    RpcFail,
    World,
    method_names,
    normalize_phone,
)
from tgdaemon.localdc.store import AuthKeyRecord, Store
from tgdaemon.localdc.updates import (
    HISTORY_LIMIT,
    SLICE_LIMIT,
    UpdateHistory,
    new_channel_post,
    new_unknown_update,
)

log = logging.getLogger("tgdaemon.localdc")

BANNER = "localdc is a LOCAL STAND-IN for Telegram's data centres; it is NOT Telegram"

RPC_RESULT = 0xF35C6D01
MSG_CONTAINER = 0x73F1F8DC
GZIP_PACKED = 0x3072CFA1
MSGS_ACK = 0x62D6B459
SERVICE = MethodNames(tl="msg_service", cls="", qualified="")
_WRAPPERS = (
    fn.InvokeWithLayerRequest,
    fn.InitConnectionRequest,
    fn.InvokeWithoutUpdatesRequest,
    fn.InvokeAfterMsgRequest,
    fn.InvokeAfterMsgsRequest,
    fn.InvokeWithTakeoutRequest,
)
_HANDSHAKE = (fn.ReqPqMultiRequest, fn.ReqPqRequest, fn.ReqDHParamsRequest,
              fn.SetClientDHParamsRequest)
_WRITE_BUFFER_LIMIT = 8 * 1024 * 1024
#: Content-related messages a connection remembers as sent and not yet acknowledged (oldest
#: forgotten first): enough to see a client that loses acknowledgements.
UNACKED_LIMIT = 256


def _importing_user(req: Any) -> int | None:
    """The user an auth.importAuthorization logs in, else None."""
    return req.id if isinstance(req, fn.auth.ImportAuthorizationRequest) else None


def _salt_for(key: bytes) -> int:
    """Server salt of a key: stable across restarts, so a restart costs no extra round trip."""
    salt: int = struct.unpack("<q", sha256(b"localdc-salt" + key[:32]).digest()[:8])[0]
    return salt


@dataclass(frozen=True)
class ConnectionInfo:
    """One live client connection as localdc sees it (for tests: who connected, and how)."""

    dc_id: int
    user_id: int | None
    peer: tuple[str, int]  # the TCP peer: the client, or the proxy that relays it
    transport: str  # codec name: "full", "intermediate", "obfuscated2/padded_intermediate"...
    via: str  # "dc" (a DC port) or "mtproxy" (the MTProxy port)


class _Conn:
    """One client TCP connection and its MTProto session state."""

    __slots__ = ("codec", "dc_id", "handshake", "key_id", "last_msg_id", "peer", "ping_timer",
                 "salt", "seq", "session_id", "task", "unacked", "via", "writer")

    def __init__(self, dc_id: int, writer: asyncio.StreamWriter, via: str = "dc") -> None:
        self.dc_id = dc_id
        self.writer = writer
        self.via = via
        peer = writer.get_extra_info("peername")
        self.peer: tuple[str, int] = (str(peer[0]), int(peer[1])) if peer else ("", 0)
        self.codec: transport.Codec | None = None
        self.handshake: Handshake | None = None
        self.key_id: int | None = None
        self.salt = 0
        self.session_id: int | None = None
        self.seq = 0
        self.last_msg_id = 0
        self.ping_timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        #: msg_ids of content-related messages sent in this session, not yet acknowledged.
        self.unacked: dict[int, None] = {}

    def __repr__(self) -> str:
        return f"<localdc conn dc={self.dc_id} key={self.key_id}>"

    def next_msg_id(self, response: bool, skew: float) -> int:
        t = time.time() + skew
        mid = (int(t * 2**32) & ~3) | (1 if response else 3)
        if 0 <= self.last_msg_id - mid < 2**32:  # same instant: stay unique and increasing
            mid = (self.last_msg_id & ~3) + 4 | (1 if response else 3)
        self.last_msg_id = mid
        return mid

    def sent(self, msg_id: int) -> None:
        self.unacked[msg_id] = None
        if len(self.unacked) > UNACKED_LIMIT:
            del self.unacked[next(iter(self.unacked))]

    def next_seq(self, content_related: bool) -> int:
        if content_related:
            self.seq += 1
            return self.seq * 2 - 1
        return self.seq * 2

    def write(self, payload: bytes, delay: float = 0.0) -> None:
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, self._write_now, payload)
        else:
            self._write_now(payload)

    def _write_now(self, payload: bytes) -> None:
        if self.codec is None or self.writer.is_closing():
            return
        self.writer.write(self.codec.encode(payload))
        if self.writer.transport.get_write_buffer_size() > _WRITE_BUFFER_LIMIT:
            log.warning("localdc: client not reading, dropping %r", self)
            self.abort()

    def reset(self) -> None:
        """Abort with a TCP RST (SO_LINGER 0): the client sees ECONNRESET, an I/O error it
        retries, like a refused or crashed server, rather than a clean EOF."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.abort()

    def abort(self) -> None:
        if self.ping_timer is not None:
            self.ping_timer.cancel()
            self.ping_timer = None
        if not self.writer.is_closing():
            self.writer.transport.abort()


def _client_process(conn: Any) -> int | None:
    return peer_pid(conn.writer)


class LocalDC:
    """A local MTProto server with ``dcs`` data centres sharing one user registry.

    ``port``: DC k listens on ``port + k - 1``; ``0`` picks free ports. ``code``: the login
    code every ``auth.sendCode`` "sends" (``None`` = a random code per request, readable with
    :meth:`last_code`). ``control_port``: also serve the HTTP/JSON control API (0 = free port).
    ``mtproxy_secret``: also listen as an MTProxy with this hex secret (32 hex digits, or
    ``dd`` + 32 to accept only padded intermediate, as such proxies do) on ``mtproxy_port``
    (0 = a free port): obfuscated2 connections whose header names the DC to serve.
    ``short_auth_keys``: test option, every new auth key is a value below 2^2040 (see
    :data:`~tgdaemon.localdc.crypto.SHORT_KEY_MODULUS`), still stored and hashed as 256 bytes.
    """

    def __init__(
        self,
        state_dir: Path | None,
        dcs: int = 1,
        host: str = "127.0.0.1",
        port: int = 0,
        code: str | None = "12345",
        control_port: int | None = None,
        mtproxy_secret: str | None = None,
        mtproxy_port: int = 0,
        short_auth_keys: bool = False,
        history_limit: int = HISTORY_LIMIT,
        slice_limit: int = SLICE_LIMIT,
    ) -> None:
        if dcs < 1:
            raise ValueError("dcs must be >= 1")
        self.state_dir = state_dir
        self.dcs = dcs
        self.host = host
        self.port = port
        self.code = code
        self.control_port = control_port
        self._mtproxy_key: bytes | None = None
        self._mtproxy_padded_only = False
        if mtproxy_secret is not None:
            raw = bytes.fromhex(mtproxy_secret)
            self._mtproxy_padded_only = len(raw) == 17 and raw[0] == 0xDD
            self._mtproxy_key = raw[1:] if self._mtproxy_padded_only else raw
            if len(self._mtproxy_key) != 16:
                raise ValueError("mtproxy_secret must be 16 bytes of hex, or dd + 16 bytes")
        self.mtproxy_port = mtproxy_port
        self._dh_prime = SHORT_KEY_MODULUS if short_auth_keys else DH_PRIME
        self.mtproxy_address: tuple[str, int] | None = None
        self._mtproxy_server: asyncio.base_events.Server | None = None
        #: Updates kept per user/channel log, and per difference answer (tgdaemon.localdc.updates).
        self.history_limit = history_limit
        self.slice_limit = slice_limit
        self.faults = FaultBook()
        #: Live connections and session ids per auth key (AUTH_KEY_DUPLICATED), and the
        #: connections of one key open at once from different client processes (overlaps).
        self.key_use = KeyUse(process_of=_client_process)
        self._store: Store | None = None
        self._world: World | None = None
        self._servers: dict[int, asyncio.base_events.Server] = {}
        self._addresses: dict[int, tuple[str, int]] = {}
        self._conns: set[_Conn] = set()
        self._counts: dict[tuple[int, int | None], Counter[str]] = {}
        #: (dc, user) -> (monotonic deadline, method) of the flood wait last answered.
        self._flood_until: dict[tuple[int, int], tuple[float, str]] = {}
        self._duplicate_logged: set[int] = set()
        self._control: Any = None
        self.control_url: str | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._servers:
            raise RuntimeError("LocalDC already started")
        log.warning(BANNER)
        self._store = Store(self.state_dir)
        self._world = World(
            store=self._store,
            addresses=lambda: self.addresses,
            bind_key=self._bind_key,
            push=self._push,
            push_key=self._push_key,
            history=UpdateHistory(self._store, history_limit=self.history_limit,
                                  slice_limit=self.slice_limit),
            fixed_code=self.code,
        )
        advertised = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        try:
            for dc_id in range(1, self.dcs + 1):
                port = 0 if self.port == 0 else self.port + dc_id - 1
                server = await asyncio.start_server(
                    functools.partial(self._serve, dc_id), self.host, port,
                    limit=2**16, backlog=1024,
                )
                self._servers[dc_id] = server
                self._addresses[dc_id] = (advertised, server.sockets[0].getsockname()[1])
            if self._mtproxy_key is not None:
                self._mtproxy_server = await asyncio.start_server(
                    lambda r, w: self._serve(None, r, w), self.host, self.mtproxy_port,
                    limit=2**16, backlog=1024,
                )
                self.mtproxy_address = (
                    advertised, self._mtproxy_server.sockets[0].getsockname()[1])
            if self.control_port is not None:
                from tgdaemon.localdc.control import start_control

                self._control, self.control_url = await start_control(
                    self, self.host if advertised == self.host else "127.0.0.1",
                    self.control_port,
                )
        except BaseException:
            await self.stop()
            raise
        log.info("localdc listening: %s", self._addresses)

    async def stop(self) -> None:
        if self._control is not None:
            await self._control.cleanup()
            self._control = None
            self.control_url = None
        servers = list(self._servers.values())
        if self._mtproxy_server is not None:
            servers.append(self._mtproxy_server)
        for server in servers:
            server.close()
        tasks = [c.task for c in self._conns if c.task is not None]
        for conn in list(self._conns):
            conn.abort()
        for server in servers:
            await server.wait_closed()
        self._servers.clear()
        self._mtproxy_server = None
        self.mtproxy_address = None
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        if self._store is not None:
            self._store.close()
            self._store = None

    async def __aenter__(self) -> LocalDC:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    # -- public API --------------------------------------------------------------------------

    @property
    def addresses(self) -> dict[int, tuple[str, int]]:
        return dict(self._addresses)

    @property
    def store(self) -> Store:
        if self._store is None:
            raise RuntimeError("LocalDC is not started")
        return self._store

    @property
    def world(self) -> World:
        if self._world is None:
            raise RuntimeError("LocalDC is not started")
        return self._world

    @property
    def rsa_public_pem(self) -> str:
        return self.store.rsa_key.public_pem

    @property
    def rsa_fingerprint(self) -> int:
        return self.store.rsa_key.fingerprint

    def info(self) -> dict[str, Any]:
        """The CLI info-file content."""
        return {
            "dcs": [{"id": i, "host": h, "port": p}
                    for i, (h, p) in sorted(self.addresses.items())],
            "rsa_public_key": self.rsa_public_pem,
            "control_url": self.control_url,
            "code": self.code,
            # The MTProxy port, if any (its secret is the operator's: never written here).
            "mtproxy": None if self.mtproxy_address is None else {
                "host": self.mtproxy_address[0], "port": self.mtproxy_address[1]},
        }

    def set_password(self, phone: str, password: str | None) -> None:
        """Set (or remove, with None) the 2FA password of a phone, user or not yet."""
        from tgdaemon.localdc.crypto import SrpVerifier

        verifier = SrpVerifier.create(password) if password is not None else None
        self.store.set_password(normalize_phone(phone), verifier)

    def last_code(self, phone: str) -> str | None:
        return self.world.last_codes.get(normalize_phone(phone))

    def user_id(self, phone: str) -> int | None:
        return self.store.users_by_phone.get(normalize_phone(phone))

    def inject(self, fault: Fault) -> int:
        fault_id = self.faults.add(fault)
        log.info("localdc fault %d injected: %s", fault_id, fault)
        return fault_id

    def clear(self, fault_id: int | None = None) -> int:
        return self.faults.clear(fault_id)

    def drop_connections(self, dc_id: int | None = None, user_id: int | None = None,
                         auth_key_id: int | None = None) -> int:
        """Abort matching TCP connections now (clients see a reset); returns how many."""
        n = 0
        for conn in list(self._conns):
            if dc_id is not None and conn.dc_id != dc_id:
                continue
            if auth_key_id is not None and conn.key_id != auth_key_id:
                continue
            if user_id is not None and self._conn_user(conn) != user_id:
                continue
            conn.abort()
            n += 1
        log.info("localdc dropped %d connection(s)", n)
        return n

    def forget_auth_key(self, auth_key_id: int | None = None, *, user_id: int | None = None,
                        dc_id: int | None = None) -> int:
        """Delete matching auth keys: their next message is answered with transport -404."""
        if auth_key_id is None and user_id is None and dc_id is None:
            raise ValueError("forget_auth_key needs auth_key_id, user_id or dc_id")
        doomed = [
            rec.key_id for rec in self.store.auth_keys.values()
            if (auth_key_id is None or rec.key_id == auth_key_id)
            and (user_id is None or rec.user_id == user_id)
            and (dc_id is None or rec.dc_id == dc_id)
        ]
        for key_id in doomed:
            self.store.delete_auth_key(key_id)
        log.info("localdc forgot %d auth key(s)", len(doomed))
        return len(doomed)

    def auth_key_ids(self, user_id: int | None = None, dc_id: int | None = None) -> list[int]:
        return [r.key_id for r in self.store.auth_keys.values()
                if (user_id is None or r.user_id == user_id)
                and (dc_id is None or r.dc_id == dc_id)]

    def push_update(self, user_id: int, text: str = "ping from localdc", *,
                    updates: tl.TypeUpdates | None = None) -> int | None:
        """Deliver a new incoming message (from service user 777000) to the user's sessions.

        Returns the message id; with ``updates`` given, pushes that object as is (no pts).
        """
        if updates is not None:
            self._push(user_id, updates, None)
            return None
        if user_id not in self.store.users:
            raise KeyError(f"unknown user {user_id}")
        msg = self.world.new_message(user_id, text, out=False, peer=SERVICE_USER_ID,
                                     exclude_key=None)
        return int(msg.id)

    def push_raw(self, user_id: int, body: bytes) -> None:
        """Push arbitrary bytes as a server message to the user's sessions (e.g. an object
        whose constructor the client's layer does not know)."""
        self._push(user_id, body, None)

    def push_unknown_update(self, user_id: int, constructor_id: int, body: bytes) -> None:
        """Record and push an update of a layer newer than the client's (``constructor_id``
        unknown to it, followed by ``body``): it also comes back in getDifference."""
        if user_id not in self.store.users:
            raise KeyError(f"unknown user {user_id}")
        new_unknown_update(self.world, user_id, constructor_id, body)

    def create_channel(self, title: str, members: list[int]) -> int:
        """A broadcast channel with these users as members; returns its id."""
        unknown = [u for u in members if u not in self.store.users]
        if unknown:
            raise KeyError(f"unknown users {unknown}")
        access_hash = struct.unpack("<q", os.urandom(8))[0]
        return self.world.history.create_channel(title, members, access_hash).id

    def post_to_channel(self, channel_id: int, text: str) -> int:
        """Post in a channel (pushed to every member); returns the message id."""
        return int(new_channel_post(self.world, channel_id, text).id)

    def counters(self, dc_id: int | None = None, user_id: int | None = None) -> dict[str, Any]:
        """Summed counters; method counts are under ``"requests"`` keyed by TL name
        (``"users.getUsers"``, ``"ping"``, ``"req_pq_multi"``); ``"packets"`` counts the
        encrypted packets received (a container of several messages is one); ``"emulated"``
        how often each real-server fault kind (``"salt_change"``, ``"gzip"``...) acted."""
        total: Counter[str] = Counter()
        for (d, u), c in self._counts.items():
            if (dc_id is None or d == dc_id) and (user_id is None or u == user_id):
                total.update(c)
        out: dict[str, Any] = {k: 0 for k in (
            "connections_accepted", "connections_refused", "connections", "key_exchanges",
            "auth_key_not_found", "stalled", "rpc_errors_injected", "updates_pushed",
            "requests_during_flood_wait", "flood_waits_resumed",
            "updates_muted", "auth_key_duplicated", "packets", "deadline_closes")}
        requests: dict[str, int] = {}
        emulated: dict[str, int] = {}
        for k, v in total.items():
            if k.startswith("req:"):
                requests[k[4:]] = v
            elif k.startswith("emulated:"):
                emulated[k[9:]] = v
            else:
                out[k] = v
        out["requests"] = requests
        out["emulated"] = emulated
        return out

    def _emulated(self, conn: _Conn, kind: str) -> None:
        self._count(conn.dc_id, self._conn_user(conn), "emulated:" + kind)

    def unacked(self, user_id: int) -> int:
        """Content-related messages sent to ``user_id``'s live sessions and not acknowledged
        (MTProto asks a client to acknowledge every one; a lost ack leaves one here)."""
        return sum(len(c.unacked) for c in list(self._conns) if self._conn_user(c) == user_id)

    def connection_count(self, dc_id: int | None = None) -> int:
        return sum(1 for c in self._conns if dc_id is None or c.dc_id == dc_id)

    def connections(self, user_id: int | None = None) -> list[ConnectionInfo]:
        """The live connections (of ``user_id``'s keys), with the TCP peer each came from."""
        out = []
        for c in list(self._conns):
            if c.codec is None:
                continue
            user = self._conn_user(c)
            if user_id is not None and user != user_id:
                continue
            name = c.codec.name
            if isinstance(c.codec, transport.ObfuscatedCodec):
                name = f"{name}/{c.codec.inner.name}"
            out.append(ConnectionInfo(c.dc_id, user, c.peer, name, c.via))
        return out

    # -- internals ---------------------------------------------------------------------------

    def _count(self, dc_id: int, user_id: int | None, what: str, n: int = 1) -> None:
        key = (dc_id, user_id)
        c = self._counts.get(key)
        if c is None:
            c = self._counts[key] = Counter()
        c[what] += n

    def _conn_user(self, conn: _Conn) -> int | None:
        if conn.key_id is None or self._store is None:
            return None
        rec = self._store.auth_keys.get(conn.key_id)
        return rec.user_id if rec else None

    def _scope(self, conn: _Conn) -> Scope:
        return Scope(conn.dc_id, self._conn_user(conn), conn.key_id)

    def _bind_key(self, key_id: int, user_id: int | None) -> None:
        self.store.update_auth_key(key_id, user_id=user_id)

    def _push(self, user_id: int, updates: tl.TypeUpdates | bytes,
              exclude_key: int | None) -> None:
        body = updates if isinstance(updates, bytes) else bytes(updates)
        for conn in list(self._conns):
            if conn.session_id is None or conn.key_id == exclude_key:
                continue
            if self._conn_user(conn) != user_id:
                continue
            scope = self._scope(conn)
            if self.faults.match("mute_updates", scope):
                self._count(conn.dc_id, user_id, "updates_muted")
                continue
            assert conn.key_id is not None  # a connection with a session has a key
            rec = self.store.auth_keys[conn.key_id]
            self._count(conn.dc_id, user_id, "updates_pushed")
            packed = body
            if self.faults.match("gzip", scope, SERVICE):
                self._emulated(conn, "gzip_update")
                packed = bytes(GzipPacked(body))
            self._send_encrypted(conn, rec, packed, content_related=True, response=False)

    def _push_key(self, key_id: int, updates: tl.TypeUpdates) -> None:
        body = bytes(updates)
        for conn in list(self._conns):
            if conn.session_id is not None and conn.key_id == key_id:
                rec = self.store.auth_keys[key_id]
                self._send_encrypted(conn, rec, body, content_related=True, response=False)

    async def _serve(self, dc_id: int | None, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        """One connection; ``dc_id`` None: the MTProxy port, whose header names the DC."""
        conn = _Conn(dc_id or 0, writer, "dc" if dc_id is not None else "mtproxy")
        conn.task = asyncio.current_task()
        self._conns.add(conn)
        try:
            if dc_id is None:
                dc_id, conn.codec = await self._accept_mtproxy(reader)
                conn.dc_id = dc_id
            self._count(dc_id, None, "connections_accepted")
            if self.faults.match("refuse", Scope(dc_id)):
                self._count(dc_id, None, "connections_refused")
                conn.reset()
                return
            if conn.codec is None:
                conn.codec = await transport.detect(reader)
            while True:
                payload = await conn.codec.read(reader)
                if conn.writer.is_closing():  # aborted: what it had sent is not served
                    break
                self._on_packet(conn, payload)
        except (asyncio.IncompleteReadError, ConnectionError, transport.TransportError,
                HandshakeError) as exc:
            log.debug("localdc connection %r ended: %s", conn, type(exc).__name__)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("localdc: unexpected error on %r", conn)
        finally:
            self._conns.discard(conn)
            self.key_use.detach(conn, conn.key_id)
            conn.abort()
            writer.close()

    async def _accept_mtproxy(self, reader: asyncio.StreamReader
                              ) -> tuple[int, transport.ObfuscatedCodec]:
        assert self._mtproxy_key is not None
        dc_id, codec = await transport.accept_obfuscated(reader, self._mtproxy_key)
        if dc_id not in self._addresses:
            raise transport.TransportError(f"MTProxy client asked for unknown DC {dc_id}")
        if self._mtproxy_padded_only and not isinstance(
                codec.inner, transport.PaddedIntermediateCodec):
            raise transport.TransportError("dd secret: only padded intermediate is accepted")
        return dc_id, codec

    def _on_packet(self, conn: _Conn, payload: bytes) -> None:
        if len(payload) < 8:
            raise transport.TransportError("packet too short")
        (key_id,) = struct.unpack("<Q", payload[:8])
        if key_id == 0:
            self._on_plain(conn, payload)
            return
        rec = self.store.auth_keys.get(key_id)
        if rec is None or rec.dc_id != conn.dc_id:
            self._count(conn.dc_id, None, "auth_key_not_found")
            conn.write(struct.pack("<i", -404))
            return
        if conn.key_id != key_id:
            self.key_use.detach(conn, conn.key_id)
            self.key_use.attach(conn, key_id)
            conn.key_id = key_id
            conn.salt = _salt_for(rec.key)
            conn.session_id = None
            scope = self._scope(conn)
            self._count(conn.dc_id, scope.user_id, "connections")
            if self.faults.match("refuse", scope):
                self._count(conn.dc_id, scope.user_id, "connections_refused")
                conn.reset()
                return
        error = self.faults.match("transport_error", self._scope(conn))
        if error is not None:
            assert error.code is not None  # Fault requires one for transport_error
            self._emulated(conn, "transport_error")
            conn.write(struct.pack("<i", -error.code))
            conn.writer.close()  # graceful: the error frame goes out first
            return
        try:
            plain = decrypt_client_message(rec.key, payload)
        except ValueError:
            log.warning("localdc: undecryptable message on %r, closing", conn)
            conn.abort()
            return
        # Encrypted transport packets (frames) received: what a client's
        # batching of requests and acknowledgements saves the server.
        self._count(conn.dc_id, self._conn_user(conn), "packets")
        salt, session_id, msg_id, seqno, length = struct.unpack("<qqqii", plain[:32])
        body = plain[32:32 + length]
        # A stall on everything (method=None) also silences service messages; the requests
        # themselves are then stalled (and the fault's shots used up) in _on_request.
        scope = self._scope(conn)
        silent = self.faults.match("stall", scope, SERVICE, consume=False)
        if self.faults.match("new_session", scope) is not None:
            self._emulated(conn, "new_session")
            conn.session_id = None  # as if the server had restarted: a new session follows
        if self.faults.match("salt_change", scope) is not None:
            self._emulated(conn, "salt_change")
            conn.salt = struct.unpack("<q", os.urandom(8))[0]  # this packet's salt is now stale
        if conn.session_id != session_id:
            conn.session_id = session_id
            conn.seq = 0
            conn.unacked.clear()
            if self.key_use.session(conn, key_id, session_id) and \
                    key_id not in self._duplicate_logged:
                self._duplicate_logged.add(key_id)
                log.warning("localdc: auth key %d used by two connections with different "
                            "session ids at once: AUTH_KEY_DUPLICATED from now on", key_id)
            if not silent:
                self._send_encrypted(conn, rec, bytes(tl.NewSessionCreated(
                    first_msg_id=msg_id, unique_id=struct.unpack("<q", os.urandom(8))[0],
                    server_salt=conn.salt)), content_related=False, response=False)
        if salt != conn.salt and not silent:
            self._send_encrypted(conn, rec, bytes(tl.BadServerSalt(
                bad_msg_id=msg_id, bad_msg_seqno=seqno, error_code=48,
                new_server_salt=conn.salt)), content_related=False, response=True)
            return
        self._on_message(conn, rec, msg_id, body)

    def _on_message(self, conn: _Conn, rec: AuthKeyRecord, msg_id: int, body: bytes) -> None:
        (cid,) = struct.unpack("<I", body[:4])
        if cid == MSG_CONTAINER:
            reader = BinaryReader(body[4:])
            for _ in range(reader.read_int()):
                inner_id = reader.read_long()
                reader.read_int()  # seqno
                inner = reader.read(reader.read_int())
                self._on_message(conn, rec, inner_id, inner)
            return
        if cid == GZIP_PACKED:
            data = GzipPacked.from_reader(BinaryReader(body[4:])).data
            self._on_message(conn, rec, msg_id, data)
            return
        if cid == MSGS_ACK:
            for acked in BinaryReader(body).tgread_object().msg_ids:
                conn.unacked.pop(acked, None)
            return
        try:
            obj = BinaryReader(body).tgread_object()
        except TypeNotFoundError:
            self._reply(conn, rec, msg_id, bytes(tl.RpcError(400, "INPUT_CONSTRUCTOR_INVALID")))
            return
        if isinstance(obj, (fn.PingRequest, fn.PingDelayDisconnectRequest)):
            self._on_ping(conn, rec, msg_id, obj)
        elif isinstance(obj, TLRequest):
            self._on_request(conn, rec, msg_id, obj)

    def _on_ping(self, conn: _Conn, rec: AuthKeyRecord, msg_id: int, ping: Any) -> None:
        names = method_names(ping)
        scope = self._admit(conn, names)
        if scope is None:
            return
        if isinstance(ping, fn.PingDelayDisconnectRequest):
            if conn.ping_timer is not None:
                conn.ping_timer.cancel()
            conn.ping_timer = asyncio.get_running_loop().call_later(
                ping.disconnect_delay, self._ping_deadline, conn)
        pong = bytes(tl.Pong(msg_id=msg_id, ping_id=ping.ping_id))
        self._send_encrypted(conn, rec, pong, content_related=True, response=True,
                             delay=self._latency(scope, names))

    def _ping_deadline(self, conn: _Conn) -> None:
        """No newer ``ping_delay_disconnect`` in time: the connection is closed, and its auth
        key is no longer in use by it from this moment (not when its task has wound down).
        Counted (``deadline_closes``): a fleet's heartbeats that come too late show here."""
        self._count(conn.dc_id, self._conn_user(conn), "deadline_closes")
        self.key_use.detach(conn, conn.key_id)
        conn.abort()

    def _admit(self, conn: _Conn, names: MethodNames) -> Scope | None:
        """Count a request by method; None when a stall fault swallows it."""
        scope = self._scope(conn)
        self._count(conn.dc_id, scope.user_id, "req:" + names.tl)
        if self.faults.match("stall", scope, names):
            self._count(conn.dc_id, scope.user_id, "stalled")
            return None
        return scope

    def _on_request(self, conn: _Conn, rec: AuthKeyRecord, msg_id: int, req: Any) -> None:
        layer = None
        while isinstance(req, _WRAPPERS):
            if isinstance(req, fn.InvokeWithLayerRequest):
                layer = req.layer
            elif isinstance(req, fn.InitConnectionRequest):
                self.world.note_client(rec.key_id, req)
            req = req.query
        if layer is not None and rec.layer != layer:
            rec = self.store.update_auth_key(rec.key_id, layer=layer) or rec
        names = method_names(req)
        scope = self._admit(conn, names)
        if scope is None:
            return
        bad = self.faults.match("bad_msg", scope, names)
        if bad is not None:
            assert bad.code is not None  # Fault requires one for bad_msg
            self._emulated(conn, "bad_msg")
            self._send_encrypted(conn, rec, bytes(tl.BadMsgNotification(
                bad_msg_id=msg_id, bad_msg_seqno=0, error_code=bad.code)),
                content_related=False, response=True)
            return
        delay = self._latency(scope, names)
        if rec.key_id in self.key_use.duplicated:
            # Like Telegram: the key was used concurrently and is invalidated for good.
            self._count(conn.dc_id, scope.user_id, "auth_key_duplicated")
            self._reply(conn, rec, msg_id, bytes(tl.RpcError(406, "AUTH_KEY_DUPLICATED")), delay,
                        names)
            return
        # Whose flood wait it is: the connection's user, or the user an import of an exported
        # login logs in (the key on the new DC is unauthorised and new at every try: Telegram
        # limits the account, not the key).
        flooder = scope.user_id if scope.user_id is not None else _importing_user(req)
        left = 0 if flooder is None else self._flooded(conn.dc_id, flooder, names)
        if left:
            # Like Telegram: the method stays refused until the deadline, with the time left.
            self._reply(conn, rec, msg_id, bytes(tl.RpcError(420, f"FLOOD_WAIT_{left}")), delay,
                        names)
            return
        fault = self.faults.match("rpc_error", scope, names)
        if fault is not None:
            self._count(conn.dc_id, scope.user_id, "rpc_errors_injected")
            result = bytes(tl.RpcError(fault.error_code, fault.error))
            assert fault.error is not None  # Fault requires one for rpc_error
            wait = flood_wait_seconds(fault.error)
            if wait and flooder is not None:
                self._flood_until[(conn.dc_id, flooder)] = (
                    time.monotonic() + wait, names.tl)
        else:
            ctx = Ctx(dc_id=conn.dc_id, key_id=rec.key_id, user_id=scope.user_id)
            try:
                answer = self.world.handle(ctx, req)
                result = answer if isinstance(answer, bytes) else bytes(answer)
            except RpcFail as exc:
                result = bytes(tl.RpcError(exc.code, exc.message))
            except Exception:
                log.exception("localdc: handler for %s failed", names.tl)
                result = bytes(tl.RpcError(500, "INTERNAL"))
        self._reply(conn, rec, msg_id, result, delay, names)

    def _flooded(self, dc_id: int, user_id: int, names: MethodNames) -> int:
        """Seconds left of this user's flood wait if ``names`` is the refused method, else 0.

        Any request inside a flood wait is counted (``requests_during_flood_wait``): a
        client that honours the wait sends nothing, of any method, before the deadline."""
        entry = self._flood_until.get((dc_id, user_id))
        if entry is None:
            return 0
        until, method = entry
        left = until - time.monotonic()
        if left <= 0:
            del self._flood_until[(dc_id, user_id)]
            self._count(dc_id, user_id, "flood_waits_resumed")  # first request after it
            return 0
        self._count(dc_id, user_id, "requests_during_flood_wait")
        return math.ceil(left) if method == names.tl else 0

    def _reply(self, conn: _Conn, rec: AuthKeyRecord, msg_id: int, result: bytes,
               delay: float = 0.0, names: MethodNames | None = None) -> None:
        scope = self._scope(conn)
        if names is not None and self.faults.match("gzip", scope, names):
            self._emulated(conn, "gzip")
            result = bytes(GzipPacked(result))
        body = struct.pack("<Iq", RPC_RESULT, msg_id) + result
        if names is not None and self.faults.match("bundle", scope, names):
            self._emulated(conn, "bundle")
            self._send_container(conn, rec, [(bytes(tl.MsgsAck([msg_id])), False, False),
                                             (body, True, True)], delay)
            return
        self._send_encrypted(conn, rec, body, content_related=True, response=True, delay=delay)

    def _send_container(self, conn: _Conn, rec: AuthKeyRecord,
                        parts: list[tuple[bytes, bool, bool]], delay: float = 0.0) -> None:
        """``parts`` (body, content related, response) in one ``msg_container``, each with
        its own msg_id and seqno, lower than the container's."""
        skew = self._skew(self._scope(conn))
        inner = b""
        for part, related, response in parts:
            inner_id = conn.next_msg_id(response, skew)
            if related:
                conn.sent(inner_id)
            inner += struct.pack("<qii", inner_id, conn.next_seq(related), len(part)) + part
        body = struct.pack("<Ii", MSG_CONTAINER, len(parts)) + inner
        self._send_encrypted(conn, rec, body, content_related=False, response=False,
                             delay=delay)

    def _latency(self, scope: Scope, names: MethodNames) -> float:
        fault = self.faults.match("latency", scope, names)
        return fault.seconds if fault else 0.0

    def _skew(self, scope: Scope) -> float:
        fault = self.faults.match("clock_skew", scope, consume=False)
        return fault.seconds if fault else 0.0

    def _send_encrypted(self, conn: _Conn, rec: AuthKeyRecord, body: bytes, *,
                        content_related: bool, response: bool, delay: float = 0.0) -> None:
        msg_id = conn.next_msg_id(response, self._skew(self._scope(conn)))
        if content_related:
            conn.sent(msg_id)
        plain = struct.pack("<qqqii", conn.salt, conn.session_id or 0, msg_id,
                            conn.next_seq(content_related), len(body)) + body
        conn.write(encrypt_server_message(rec.key, rec.key_id, plain), delay)

    def _on_plain(self, conn: _Conn, payload: bytes) -> None:
        if len(payload) < 20:
            raise transport.TransportError("plain message too short")
        _, length = struct.unpack("<qi", payload[8:20])
        req = BinaryReader(payload[20:20 + length]).tgread_object()
        if not isinstance(req, _HANDSHAKE):
            raise HandshakeError(f"unexpected plain message {type(req).__name__}")
        names = method_names(req)
        scope = Scope(conn.dc_id)
        self._count(conn.dc_id, None, "req:" + names.tl)
        if self.faults.match("stall", scope, names):
            self._count(conn.dc_id, None, "stalled")
            return
        delay = self._latency(scope, names)
        skew = self._skew(scope)
        if isinstance(req, (fn.ReqPqMultiRequest, fn.ReqPqRequest)):
            conn.handshake = Handshake(prime=self._dh_prime)
            answer: Any = conn.handshake.res_pq(req, self.store.rsa_key.fingerprint)
        elif conn.handshake is None:
            raise HandshakeError("key exchange step out of order")
        elif isinstance(req, fn.ReqDHParamsRequest):
            answer = conn.handshake.server_dh_params(req, self.store.rsa_key, skew)
        else:
            answer, key = conn.handshake.dh_gen(req)
            conn.handshake = None
            key_id = key_id_of(key)
            self.store.put_auth_key(AuthKeyRecord(key_id, conn.dc_id, key))
            self._count(conn.dc_id, None, "key_exchanges")
            log.info("localdc: new auth key %d on DC %d", key_id, conn.dc_id)
        data = bytes(answer)
        msg_id = conn.next_msg_id(True, skew)
        conn.write(struct.pack("<qqi", 0, msg_id, len(data)) + data, delay)


__all__ = ["BANNER", "ConnectionInfo", "LocalDC"]
