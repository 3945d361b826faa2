"""The MTProto key exchange with a fixed-width auth key.

An auth key is g^ab mod p, a 2048-bit number, and Telegram uses it as 256 big-endian bytes:
the key id, the aux hash in ``dh_gen_ok`` and every message key are hashes of those 256
bytes. Telethon 1.45 keeps the number as *minimal* bytes (``rsa.get_byte_array``), so about
1 exchange in 256 (a value below 2^2040) gives a 255-byte key: against Telegram the exchange
then fails its own nonce-hash check, and against a server that agrees on minimal bytes the
key works until a ``StringSession`` right-pads it to 256 bytes, changing its id, and the
account is lost.

Here the key is the 256-byte value (left-padded) from the start: the nonce-hash check,
Telethon's sender and the stored session all see the same bytes the server hashes.
:func:`do_authentication` is Telethon 1.45's ``network/authenticator.py`` (MIT licence) with
that one change; Telethon offers no hook between computing g^ab and using it. It is pinned to
1.45 with the ``telethon`` dependency (``>=1.45,<1.46``).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Callable
from hashlib import sha1
from typing import Any

from telethon import helpers
from telethon.crypto import AES, AuthKey, Factorization, rsa
from telethon.errors import RPCError, SecurityError, TypeNotFoundError
from telethon.extensions import BinaryReader
from telethon.network import MTProtoSender
from telethon.network.mtprotoplainsender import MTProtoPlainSender
from telethon.network.requeststate import RequestState
from telethon.tl.functions import (
    InitConnectionRequest,
    InvokeWithLayerRequest,
    ReqDHParamsRequest,
    ReqPqMultiRequest,
    SetClientDHParamsRequest,
)
from telethon.tl.types import (
    ClientDHInnerData,
    DhGenFail,
    DhGenOk,
    DhGenRetry,
    MsgsAck,
    PQInnerData,
    ResPQ,
    ServerDHInnerData,
    ServerDHParamsFail,
    ServerDHParamsOk,
    UpdatesTooLong,
)

from tgdaemon.flag import Flag

#: An MTProto auth key is a 2048-bit number, always used as this many big-endian bytes.
AUTH_KEY_BYTES = 256
#: Sent acks a sender keeps to resend (Telethon: 10; see :class:`PaddedKeySender`).
KEPT_ACKS = 2


def padded_auth_key(key: bytes) -> bytes:
    """The 256-byte big-endian form of an auth key given as minimal (shorter) bytes."""
    if not 0 < len(key) <= AUTH_KEY_BYTES:
        raise ValueError(f"an auth key is at most {AUTH_KEY_BYTES} bytes, not {len(key)}")
    return key.rjust(AUTH_KEY_BYTES, b"\0")


def _int(data: bytes, signed: bool = False) -> int:
    return int.from_bytes(data, "big", signed=signed)


async def do_authentication(sender: Any) -> tuple[AuthKey, int]:
    """Create an auth key over a connected plain sender; returns (key, server time offset)."""
    nonce = int.from_bytes(os.urandom(16), "big", signed=True)
    res_pq = await sender.send(ReqPqMultiRequest(nonce))
    if not isinstance(res_pq, ResPQ):
        raise AssertionError(f"Step 1 answer was {type(res_pq).__name__}")
    if res_pq.nonce != nonce:
        raise SecurityError("Step 1 invalid nonce from server")
    pq = _int(res_pq.pq, signed=True)

    p_num, q_num = Factorization.factorize(pq)
    p, q = rsa.get_byte_array(p_num), rsa.get_byte_array(q_num)
    new_nonce = int.from_bytes(os.urandom(32), "little", signed=True)
    pq_inner_data = bytes(PQInnerData(
        pq=rsa.get_byte_array(pq), p=p, q=q, nonce=res_pq.nonce,
        server_nonce=res_pq.server_nonce, new_nonce=new_nonce,
    ))
    cipher_text, target_fingerprint = None, None
    for use_old in (False, True):  # current keys first, then old ones
        for fingerprint in res_pq.server_public_key_fingerprints:
            cipher_text = rsa.encrypt(fingerprint, pq_inner_data, use_old=use_old)
            if cipher_text is not None:
                target_fingerprint = fingerprint
                break
        if cipher_text is not None:
            break
    if cipher_text is None:
        raise SecurityError("Step 2 could not find a valid key for the server's fingerprints")

    server_dh_params = await sender.send(ReqDHParamsRequest(
        nonce=res_pq.nonce, server_nonce=res_pq.server_nonce, p=p, q=q,
        public_key_fingerprint=target_fingerprint, encrypted_data=cipher_text,
    ))
    if not isinstance(server_dh_params, ServerDHParamsOk | ServerDHParamsFail):
        raise AssertionError(f"Step 2.1 answer was {type(server_dh_params).__name__}")
    if server_dh_params.nonce != res_pq.nonce:
        raise SecurityError("Step 2 invalid nonce from server")
    if server_dh_params.server_nonce != res_pq.server_nonce:
        raise SecurityError("Step 2 invalid server nonce from server")
    if isinstance(server_dh_params, ServerDHParamsFail):
        nnh = int.from_bytes(
            sha1(new_nonce.to_bytes(32, "little", signed=True)).digest()[4:20],
            "little", signed=True)
        if server_dh_params.new_nonce_hash != nnh:
            raise SecurityError("Step 2 invalid DH fail nonce from server")
        raise AssertionError("Step 2.2 answer was ServerDHParamsFail")

    key, iv = helpers.generate_key_data_from_nonce(res_pq.server_nonce, new_nonce)
    if len(server_dh_params.encrypted_answer) % 16 != 0:
        raise SecurityError("Step 3 AES block size mismatch")
    plain_text_answer = AES.decrypt_ige(server_dh_params.encrypted_answer, key, iv)
    with BinaryReader(plain_text_answer) as reader:
        reader.read(20)  # hash sum
        server_dh_inner = reader.tgread_object()
    if not isinstance(server_dh_inner, ServerDHInnerData):
        raise AssertionError(f"Step 3 answer was {type(server_dh_inner).__name__}")
    if server_dh_inner.nonce != res_pq.nonce:
        raise SecurityError("Step 3 Invalid nonce in encrypted answer")
    if server_dh_inner.server_nonce != res_pq.server_nonce:
        raise SecurityError("Step 3 Invalid server nonce in encrypted answer")

    dh_prime = _int(server_dh_inner.dh_prime)
    g = server_dh_inner.g
    g_a = _int(server_dh_inner.g_a)
    time_offset = server_dh_inner.server_time - int(time.time())
    b = _int(os.urandom(256))
    g_b = pow(g, b, dh_prime)
    gab = pow(g_a, b, dh_prime)
    # https://core.telegram.org/mtproto/auth_key#dh-key-exchange-complete
    safety_range = 2 ** (2048 - 64)
    if not 1 < g < dh_prime - 1:
        raise SecurityError("g is not within (1, dh_prime - 1)")
    for name, value in (("g_a", g_a), ("g_b", g_b)):
        if not 1 < value < dh_prime - 1:
            raise SecurityError(f"{name} is not within (1, dh_prime - 1)")
        if not safety_range <= value <= dh_prime - safety_range:
            raise SecurityError(f"{name} is not within (2^{{2048-64}}, dh_prime - 2^{{2048-64}})")

    client_dh_inner = bytes(ClientDHInnerData(
        nonce=res_pq.nonce, server_nonce=res_pq.server_nonce, retry_id=0,
        g_b=rsa.get_byte_array(g_b),
    ))
    client_dh_encrypted = AES.encrypt_ige(sha1(client_dh_inner).digest() + client_dh_inner,
                                          key, iv)
    dh_gen = await sender.send(SetClientDHParamsRequest(
        nonce=res_pq.nonce, server_nonce=res_pq.server_nonce,
        encrypted_data=client_dh_encrypted,
    ))
    nonce_types = (DhGenOk, DhGenRetry, DhGenFail)
    if not isinstance(dh_gen, nonce_types):
        raise AssertionError(f"Step 3.1 answer was {type(dh_gen).__name__}")
    name = type(dh_gen).__name__
    if dh_gen.nonce != res_pq.nonce:
        raise SecurityError(f"Step 3 invalid {name} nonce from server")
    if dh_gen.server_nonce != res_pq.server_nonce:
        raise SecurityError(f"Step 3 invalid {name} server nonce from server")

    # The one change from Telethon: the key is the 256-byte value, never minimal bytes.
    auth_key = AuthKey(gab.to_bytes(AUTH_KEY_BYTES, "big"))
    nonce_number = 1 + nonce_types.index(type(dh_gen))
    new_nonce_hash = auth_key.calc_new_nonce_hash(new_nonce, nonce_number)
    if getattr(dh_gen, f"new_nonce_hash{nonce_number}") != new_nonce_hash:
        raise SecurityError("Step 3 invalid new nonce hash")
    if not isinstance(dh_gen, DhGenOk):
        raise AssertionError(f"Step 3.2 answer was {name}")
    return auth_key, time_offset


class PaddedKeySender(MTProtoSender):  # type: ignore[misc]  # Telethon is untyped
    """Telethon's sender, creating its auth keys with :func:`do_authentication`.

    With ``keepalive_ping=False`` it ignores the client's keep-alive loop, which otherwise
    sends a ``ping`` every 60 s (updates.py ``_keepalive_loop``) and reconnects when the
    previous one is unanswered: in the daemon every connected account's heartbeat already
    proves the connection every ``heartbeat_interval`` and reconnects on a missed one, so the
    ping is a third request a minute that detects nothing sooner (issue 17). The loop's other
    chores (exported senders, saving entities) still run.
    """

    keepalive_ping = True
    #: Called when a connection is up, before any request goes out on it; its request is sent
    #: first (fleet mode: ``ping_delay_disconnect``, so the server's deadline is armed before
    #: the auth key is used for anything else: a process paused mid-connect cannot leave a
    #: connection open past its lease).
    first_request: Callable[[], Any] | None = None
    #: Set by the client for one connect: the query the connection's initConnection carries
    #: instead of Telethon's help.getConfig (whose answer Telethon's connect() discards);
    #: ``init_result`` is then the future of that request.
    init_query: Any = None
    init_result: asyncio.Future[Any] | None = None
    #: new_session_created notices on the current connection (the first one is expected).
    _new_sessions = 0
    #: Told the constructor id of an object inside a gzip_packed message that this Telethon
    #: cannot parse (set by tgdaemon.updates.guard_unknown_objects).
    on_unknown_object: Callable[[int], None] | None = None

    async def connect(self, connection: Any) -> bool:
        self._new_sessions = 0
        if not await super().connect(connection):
            return False
        if self.first_request is not None:  # queued ahead of the client's initConnection
            self.send_unawaited(self.first_request())
        return True

    async def _disconnect(self, error: BaseException | None = None) -> None:
        # A connection that dies on its own (the receive loop's error, a refused frame) ends
        # with that error set on the future behind ``client.disconnected``, which only a
        # ConnectionWatch awaits while one is watching. Unretrieved, asyncio reports it with
        # a traceback whenever the cyclic collector frees the sender: an ERROR per dropped
        # connection, and in a test session a CPython 3.11 SystemError (the report's
        # traceback formatting re-enters ast.parse inside the parse the collection
        # interrupted: "AST constructor recursion depth mismatch").
        await super()._disconnect(error)
        if (fut := self._disconnected).done():  # pending after an earlier, cancelled disconnect
            _retrieve(fut)

    def send(self, request: Any, ordered: bool = False) -> Any:
        # Acknowledgements travel with the request, in one container: Telethon queues them
        # only when its send loop comes round, i.e. *after* the next request, so every
        # heartbeat went out as two TCP packets (request, then the ack of the previous
        # answer), each one a write here and a read, a decryption and a wake-up at the
        # server (issue 17: 4 packets a minute per account where 2 carry the same).
        if self._user_connected and self._pending_ack:
            ack = RequestState(MsgsAck(list(self._pending_ack)))
            self._send_queue.append(ack)
            self._last_acks.append(ack)  # Telethon resends it on a bad_msg_notification
            self._pending_ack.clear()
        query = self.init_query
        if (query is not None and isinstance(request, InvokeWithLayerRequest)
                and isinstance(request.query, InitConnectionRequest)):
            self.init_query = None
            request.query.query = query  # instead of help.getConfig (see init_query)
            self.init_result = super().send(request, ordered)
            return _unless_rpc_error(self.init_result)
        return super().send(request, ordered)

    def _pop_states(self, msg_id: int) -> list[Any]:
        """The messages a bad_server_salt / bad_msg_notification about ``msg_id`` rejected,
        to send again: Telethon's (the request, or every request of that container), plus
        the acks that travelled in that container. Telethon finds an ack only by its own
        msg_id; here every ack rides in a request's container, and a salt change would
        otherwise lose it (MTProto: every content-related message is acknowledged)."""
        states: list[Any] = super()._pop_states(msg_id)
        for ack in self._last_acks:
            if ack.container_id == msg_id and ack.msg_id != msg_id:
                # Nobody awaits an ack: an unrecoverable notification's error is dropped.
                ack.future.add_done_callback(_retrieve)
                states.append(ack)
        return states

    async def _handle_gzip_packed(self, message: Any) -> None:
        """Telegram gzips larger messages; Telethon parses the inside here, and an object it
        does not know escapes to its receive loop, which logs an ERROR with the raw remainder
        (message text, phone numbers). Skipped and reported by constructor id instead, as
        the guard does for the same object unpacked (tgdaemon.updates)."""
        try:
            await super()._handle_gzip_packed(message)
        except TypeNotFoundError as exc:
            if self.on_unknown_object is None:
                raise
            self.on_unknown_object(int(exc.invalid_constructor_id))

    async def _handle_new_session_created(self, message: Any) -> None:
        """Every connection opens a new session (Telethon picks a new session id) and the
        connect catches up anyway. A second notice on the same connection means the server
        lost the session, and the updates it held for it ("a gap in the stream of long poll
        notifications", core.telegram.org/mtproto/service_messages): fetch the difference now,
        as TDLib does, rather than when a later update or heartbeat reveals the gap."""
        await super()._handle_new_session_created(message)
        self._new_sessions += 1
        if self._new_sessions > 1 and self._updates_queue is not None:
            self._updates_queue.put_nowait(UpdatesTooLong())

    def send_unawaited(self, request: Any) -> None:
        """Queue ``request`` the way Telethon queues its own keep-alive ping: its answer is
        not awaited (awaiting it through the client would let a cancelled caller cancel the
        future the answer then resolves, an error Telethon logs)."""
        self.send(request).add_done_callback(_retrieve)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Telethon keeps its last 10 acks (each a RequestState, a future, a message) only to
        # resend one the server refers to by msg_id; the last two are what that ever needs.
        self._last_acks: deque[Any] = deque(maxlen=KEPT_ACKS)
        # Its packer's "something to send" Event holds a ~760-byte waiter deque.
        self._send_queue._ready = Flag()

    @classmethod
    def replacing(cls, old: MTProtoSender, *, loggers: Any = None, updates_queue: Any = None,
                  keepalive_ping: bool = True) -> PaddedKeySender:
        """A sender configured like ``old`` (the client's, before it ever connected), with
        ``loggers`` and ``updates_queue`` instead of its own when given."""
        sender = cls(
            old.auth_key, loggers=old._loggers if loggers is None else loggers,
            retries=old._retries, delay=old._delay,
            auto_reconnect=old._auto_reconnect, connect_timeout=old._connect_timeout,
            auth_key_callback=old._auth_key_callback,
            updates_queue=old._updates_queue if updates_queue is None else updates_queue,
            auto_reconnect_callback=old._auto_reconnect_callback,
        )
        sender.keepalive_ping = keepalive_ping
        return sender

    def _keepalive_ping(self, rnd_id: int) -> None:
        if self.keepalive_ping:
            super()._keepalive_ping(rnd_id)

    async def _try_gen_auth_key(self, attempt: int) -> bool:
        # Telethon's method (mtprotosender.py:310) with this module's key exchange.
        plain = MTProtoPlainSender(self._connection, loggers=self._loggers)
        try:
            self._log.debug("New auth_key attempt %d...", attempt)
            self.auth_key.key, self._state.time_offset = await do_authentication(plain)
            if self._auth_key_callback:
                await self._auth_key_callback(self.auth_key)
            self._log.debug("auth_key generation success!")
            return True
        except (SecurityError, AssertionError) as e:
            self._log.warning("Attempt %d at new auth_key failed: %s", attempt, e)
            await asyncio.sleep(self._delay)
            return False


def _unless_rpc_error(fut: asyncio.Future[Any]) -> asyncio.Future[Any]:
    """What Telethon's connect() awaits for an init that carries a query of the caller's: its
    answer, or None when the server answered it with an RPC error (the caller reads that from
    ``fut``: raised inside connect(), it would stop Telethon's connect half-way). A failed
    connection still fails the connect."""
    out: asyncio.Future[Any] = fut.get_loop().create_future()

    def done(f: asyncio.Future[Any]) -> None:
        exc = None if f.cancelled() else f.exception()  # retrieved, whatever happens to out
        if out.done():
            return
        if f.cancelled():
            out.cancel()
        elif isinstance(exc, RPCError):
            out.set_result(None)
        elif exc is not None:
            out.set_exception(exc)
        else:
            out.set_result(f.result())

    fut.add_done_callback(done)
    return out


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a fire-and-forget future's outcome as seen (no "never retrieved" warning)."""
    if not fut.cancelled():
        fut.exception()


__all__ = ["AUTH_KEY_BYTES", "PaddedKeySender", "do_authentication", "padded_auth_key"]
