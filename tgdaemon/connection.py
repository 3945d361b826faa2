"""The Telethon connection classes the daemon uses: a cap on incoming frames, and the class
that matches an account's proxy.

Telethon reads a frame by its length prefix with ``readexactly(length)`` and no upper bound,
so a hostile or broken peer that sends a 2 GB prefix and streams bytes makes the daemon
buffer all of them (5.5 GB RSS was measured). Every class here reads through
:class:`_CappedReader`, which refuses a frame longer than :data:`MAX_FRAME_BYTES` before
reading it; the refusal is a :class:`FrameTooLargeError`, a ``ConnectionError``, so Telethon
drops the connection and the worker backs off and reconnects (a NETWORK fault).

Proxies: SOCKS5/SOCKS4/HTTP CONNECT go through ``python-socks`` with the ordinary (full)
transport; MTProxy needs Telethon's obfuscated MTProxy transport, padded intermediate for a
``dd`` secret, intermediate for a plain 16-byte one, here with OpenSSL's AES-CTR instead of
Telethon's pure-Python one. Fake-TLS (``ee``) secrets have no Telethon transport: the config
refuses them.
"""

from __future__ import annotations

import asyncio
import os
import weakref
from hashlib import sha256
from typing import TYPE_CHECKING, Any, Protocol

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from telethon.network import (
    ConnectionTcpFull,
    ConnectionTcpMTProxyIntermediate,
    ConnectionTcpMTProxyRandomizedIntermediate,
)
from telethon.network.connection.connection import Connection, ObfuscatedConnection

if TYPE_CHECKING:
    from tgdaemon.config import Proxy

#: Largest incoming MTProto frame accepted (16 MiB). Telegram's largest payloads are file
#: parts of at most 1 MiB (upload.getFile's limit) plus MTProto framing; 16 MiB leaves wide
#: room for any container while bounding what one connection can make the daemon buffer.
MAX_FRAME_BYTES = 16 * 1024 * 1024
#: An MTProxy key is 16 bytes; a ``dd`` secret is one prefix byte plus the key.
MTPROXY_SECRET_BYTES = 16


class FrameTooLargeError(ConnectionError):
    """The peer announced a frame beyond :data:`MAX_FRAME_BYTES` (or a negative one)."""


class _ByteSource(Protocol):
    async def readexactly(self, n: int) -> bytes: ...


class _CappedReader:
    """What a Telethon codec reads from: refuses an oversized frame before buffering it.

    Every codec reads the frame body with one ``readexactly(length)`` of the announced length
    (the headers are 1-8 bytes), so checking ``n`` here covers full, intermediate, padded
    intermediate and abridged frames, obfuscated or not."""

    __slots__ = ("_source",)

    def __init__(self, source: _ByteSource) -> None:
        self._source = source

    async def readexactly(self, n: int) -> bytes:
        if not 0 <= n <= MAX_FRAME_BYTES:
            raise FrameTooLargeError(
                f"incoming frame of {n} bytes is beyond the {MAX_FRAME_BYTES} byte cap")
        return await self._source.readexactly(n)


class _CappedRecv:
    """Mixin for a Telethon ``Connection``: every frame is read through :class:`_CappedReader`.
    (``_recv`` is the one method Telethon's receive loop calls per frame.)"""

    _codec: Any
    _reader: Any
    _writer: Any
    _obfuscation: Any
    #: The refusal that ended this connection: Telethon's receive loop disconnects before the
    #: sender reads the error, which then only sees "Not connected"; ``send``/``recv`` restore
    #: it so the worker's status names the cause.
    _refused: FrameTooLargeError | None = None

    async def _connect(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super()._connect(*args, **kwargs)  # type: ignore[misc]  # Telethon's
        except BaseException:
            # Cut short after the TCP connect (the first write's drain failed: the peer reset
            # it, as in an outage; or a cancellation): Telethon leaves the stream open and not
            # marked connected, so its disconnect skips it, and its next attempt overwrites
            # it. Dropped now, its transport's cycle cut (measured: one per 200 accounts and
            # outage, bench/gcleak.py).
            if self._writer is not None:
                _abort(self._writer.transport)
                self._reader = self._writer = None
            raise
        finally:
            # The packet codec points back at its connection (connection.py:425): a cycle
            # only the collector frees, and a connection frozen by tgdaemon.gcpolicy never
            # is (one connection per account and outage, measured). A weak proxy keeps
            # ``codec._conn`` working (only Telethon's HTTP codec reads it).
            if self._codec is not None:
                self._codec._conn = weakref.proxy(self)

    async def disconnect(self) -> None:
        writer = self._writer
        try:
            await super().disconnect()  # type: ignore[misc]  # Telethon's, untyped
        except BaseException:
            # Cut short (the worker's close bound, a stop): the graceful close would go on
            # unowned, its transport open while it had unsent bytes. Dropped at once instead.
            if writer is not None:
                _abort(writer.transport)
            raise
        if writer is not None:
            _release_transport(writer.transport)

    async def _recv(self) -> bytes:
        source = self._obfuscation if self._obfuscation is not None else self._reader
        try:
            data: bytes = await self._codec.read_packet(_CappedReader(source))
        except FrameTooLargeError as exc:
            self._refused = exc
            raise
        return data

    def send(self, data: bytes) -> Any:
        if self._refused is not None:
            raise self._refused
        return super().send(data)  # type: ignore[misc]  # Telethon's, untyped

    async def recv(self) -> bytes:
        try:
            data: bytes = await super().recv()  # type: ignore[misc]  # Telethon's, untyped
        except ConnectionError:
            if self._refused is not None:
                raise self._refused from None
            raise
        return data


def abort_connection(connection: Any) -> None:
    """Drop ``connection`` at once, unsent bytes and all (an abandoned client's: nothing will
    read them); Telethon's ``disconnect`` would wait for a graceful close."""
    connection._connected = False
    if connection._writer is not None:
        _abort(connection._writer.transport)


def _abort(transport: Any) -> None:
    transport.abort()
    # After the connection_lost that abort() schedules: only then is the socket gone.
    asyncio.get_running_loop().call_soon(_release_transport, transport)


def _release_transport(transport: Any) -> None:
    """Break a closed asyncio socket transport's cycle with its own bound read callback
    (CPython 3.11 selector_events.py:947, kept after ``_call_connection_lost``), so that
    reference counting frees it with its socket: a transport frozen by tgdaemon.gcpolicy
    while its connection was up is otherwise never freed (one per account and outage)."""
    if getattr(transport, "_sock", True) is None and hasattr(transport, "_read_ready_cb"):
        transport._read_ready_cb = None



class _DirectIO:
    """Mixin for a Telethon ``Connection``: the sender's loops write and read the stream
    themselves.

    Telethon's ``Connection.connect`` starts two tasks per connection, a send loop and a
    receive loop (here they return at once), each passing packets through a one-item queue
    to or from the sender's own send and receive loops: every packet each way is one more
    task wake-up and queue hand-off (at 2,000 idle accounts on the local DC, two of the eight
    callbacks a heartbeat costs). Here ``send`` writes and drains (the same back-pressure as
    the queue of one) and ``recv`` reads the next frame; errors reach the sender's loops as
    they did through the queues (an I/O error or a short read: the sender reconnects or
    disconnects)."""

    _connected: bool
    _writer: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Telethon's two Queue(1)s between those tasks and the sender (~6 KB of empty deques
        # per connection) have no user here: dropped, not replaced.
        self._send_queue = self._recv_queue = None

    async def _send_loop(self) -> None:
        """Telethon's ``connect`` still starts it: it ends at once (a connect, not a packet)."""

    async def _recv_loop(self) -> None:
        """As :meth:`_send_loop`."""

    def send(self, data: bytes) -> Any:
        if not self._connected:
            raise ConnectionError("Not connected")
        return self._send_now(data)

    async def _send_now(self, data: bytes) -> None:
        self._send(data)  # type: ignore[attr-defined]  # Telethon's: codec + write
        await self._writer.drain()

    async def recv(self) -> bytes:
        if not self._connected:
            raise ConnectionError("Not connected")
        data: bytes = await self._recv()  # type: ignore[attr-defined]
        return data


class CappedTcpFull(_CappedRecv, _DirectIO, ConnectionTcpFull):  # type: ignore[misc]
    """Telegram's full TCP transport, frames capped; also used through SOCKS/HTTP proxies."""


class _Ctr(Protocol):
    def update(self, data: bytes) -> bytes: ...


def _ctr(key: bytes, iv: bytes) -> _Ctr:
    return Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()


#: First words an obfuscated2 header must not start with (they look like other protocols).
_RESERVED_STARTS = (b"PVrG", b"GET ", b"POST", b"HEAD", b"OPTI", b"\xee\xee\xee\xee",
                    b"\xdd\xdd\xdd\xdd", b"\x16\x03\x01\x02")


class _MTProxyIO:
    """Telethon's ``MTProxyIO`` (obfuscated2 with the proxy secret) on OpenSSL's AES-CTR.

    Telethon's uses ``pyaes``, pure Python: about 26 KB/s on this machine type, so a fleet's
    heartbeats alone would take several cores, and one 1 MB file part 40 s of CPU."""

    header: bytes

    def __init__(self, connection: Any) -> None:
        self._reader = connection._reader
        self._writer = connection._writer
        while True:
            head = bytearray(os.urandom(64))
            if (head[0] != 0xEF and bytes(head[:4]) not in _RESERVED_STARTS
                    and head[4:8] != b"\0\0\0\0"):
                break
        rev = bytes(head[8:56])[::-1]
        secret = connection._secret
        self._encrypt = _ctr(sha256(bytes(head[8:40]) + secret).digest(), bytes(head[40:56]))
        self._decrypt = _ctr(sha256(rev[:32] + secret).digest(), rev[32:48])
        head[56:60] = connection.packet_codec.obfuscate_tag
        head[60:62] = int(connection._dc_id).to_bytes(2, "little", signed=True)
        # The whole header goes through the key stream; only its last 8 bytes are sent
        # encrypted (tag and DC), the rest in clear for the server to derive the keys.
        head[56:64] = self._encrypt.update(bytes(head))[56:64]
        self.header = bytes(head)

    async def readexactly(self, n: int) -> bytes:
        return self._decrypt.update(await self._reader.readexactly(n))

    def write(self, data: bytes) -> None:
        self._writer.write(self._encrypt.update(data))


class _MTProxyBase(ObfuscatedConnection):  # type: ignore[misc]  # untyped base
    """Corrections to Telethon's ``TcpMTProxy`` (placed before it in the MRO).

    Its ``_connect`` sleeps up to 2 s after every TCP connect to see whether the proxy hangs
    up at once; the worker already treats a hang-up as a network fault, so that wait only
    delays each connect: this goes straight to the plain obfuscated connect. The
    obfuscation uses OpenSSL (:class:`_MTProxyIO`)."""

    obfuscated_io = _MTProxyIO

    async def _connect(self, timeout: float | None = None, ssl: Any = None) -> None:
        await ObfuscatedConnection._connect(self, timeout=timeout, ssl=ssl)


    @staticmethod
    def normalize_secret(secret: str) -> bytes:
        """The 16-byte key of a config secret (hex: 16 bytes, or ``dd`` + 16 bytes). Telethon's
        own version strips a leading ``dd``/``ee`` even from a plain secret that merely starts
        with those digits."""
        raw = bytes.fromhex(secret)
        return raw[1:] if len(raw) == MTPROXY_SECRET_BYTES + 1 else raw


class CappedMTProxyPadded(
    _CappedRecv, _DirectIO, _MTProxyBase,
    ConnectionTcpMTProxyRandomizedIntermediate,  # type: ignore[misc]
):
    """MTProxy with a ``dd`` secret: obfuscated padded intermediate (tag ``dddddddd``)."""


class CappedMTProxyIntermediate(
    _CappedRecv, _DirectIO, _MTProxyBase, ConnectionTcpMTProxyIntermediate,  # type: ignore[misc]
):
    """MTProxy with a plain 16-byte secret: obfuscated intermediate (tag ``eeeeeeee``)."""


def connection_for(proxy: Proxy | None) -> type[Connection]:
    """The connection class for an account: it follows the proxy type."""
    if proxy is None or proxy.scheme != "mtproxy":
        return CappedTcpFull
    assert proxy.secret is not None  # config guarantees a secret for mtproxy://
    if len(proxy.secret) == 2 * (MTPROXY_SECRET_BYTES + 1):  # "dd" + key (config checked)
        return CappedMTProxyPadded
    return CappedMTProxyIntermediate


__all__ = [
    "MAX_FRAME_BYTES",
    "CappedMTProxyIntermediate",
    "CappedMTProxyPadded",
    "CappedTcpFull",
    "FrameTooLargeError",
    "abort_connection",
    "connection_for",
]
