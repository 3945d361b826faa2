"""MTProto TCP transports (full, intermediate, padded intermediate, abridged, obfuscated2),
server side.

On a DC port the transport is detected from the first bytes the client sends, as Telegram
does: ``0xef`` → abridged, ``0xeeeeeeee`` → intermediate, ``0xdddddddd`` → padded
intermediate, anything else → full (a length). The MTProxy port speaks obfuscated2 only
(:func:`accept_obfuscated`): a 64-byte header from which both AES-256-CTR keys are derived
together with the proxy secret, carrying the inner transport's tag and the target DC.
"""

from __future__ import annotations

import asyncio
import os
import struct
from hashlib import sha256
from typing import Protocol
from zlib import crc32

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


class TransportError(Exception):
    """The byte stream is not a valid MTProto transport stream (bad length or CRC)."""


MAX_PACKET = 4 * 1024 * 1024


class ByteSource(Protocol):
    """What a codec reads from: a stream reader, or the obfuscation layer over one."""

    async def readexactly(self, n: int) -> bytes: ...


class Codec:
    name = "base"

    async def read(self, reader: ByteSource) -> bytes:
        raise NotImplementedError

    def encode(self, payload: bytes) -> bytes:
        raise NotImplementedError


class FullCodec(Codec):
    """``<len:i><seq:i><payload><crc32:I>``; the first packet's length was already read."""

    name = "full"

    def __init__(self, first_len: bytes) -> None:
        self._pending_len: bytes | None = first_len
        self._out_seq = 0
        self._in_seq = 0

    async def read(self, reader: ByteSource) -> bytes:
        head = self._pending_len if self._pending_len is not None else await reader.readexactly(4)
        self._pending_len = None
        (length,) = struct.unpack("<i", head)
        if not 12 <= length <= MAX_PACKET:
            raise TransportError(f"bad full-transport length {length}")
        rest = await reader.readexactly(length - 4)
        (crc,) = struct.unpack("<I", rest[-4:])
        if crc32(head + rest[:-4]) != crc:
            raise TransportError("bad CRC32")
        self._in_seq += 1
        return rest[4:-4]

    def encode(self, payload: bytes) -> bytes:
        data = struct.pack("<ii", len(payload) + 12, self._out_seq) + payload
        self._out_seq += 1
        return data + struct.pack("<I", crc32(data))


class IntermediateCodec(Codec):
    name = "intermediate"

    async def read(self, reader: ByteSource) -> bytes:
        (length,) = struct.unpack("<i", await reader.readexactly(4))
        if not 0 < length <= MAX_PACKET:
            raise TransportError(f"bad intermediate length {length}")
        return await reader.readexactly(length)

    def encode(self, payload: bytes) -> bytes:
        return struct.pack("<i", len(payload)) + payload


class PaddedIntermediateCodec(IntermediateCodec):
    """Intermediate with 0-3 random bytes after each payload (what ``dd`` MTProxy secrets
    require): the payload is the length rounded down to a multiple of 4."""

    name = "padded_intermediate"

    async def read(self, reader: ByteSource) -> bytes:
        data = await super().read(reader)
        return data[: len(data) - len(data) % 4]

    def encode(self, payload: bytes) -> bytes:
        return super().encode(payload + os.urandom(os.urandom(1)[0] % 4))


class AbridgedCodec(Codec):
    name = "abridged"

    async def read(self, reader: ByteSource) -> bytes:
        n = (await reader.readexactly(1))[0]
        if n >= 0x7F:
            n = int.from_bytes(await reader.readexactly(3), "little")
        if not 0 < n * 4 <= MAX_PACKET:
            raise TransportError("bad abridged length")
        return await reader.readexactly(n * 4)

    def encode(self, payload: bytes) -> bytes:
        n = len(payload) // 4
        if n < 0x7F:
            return bytes((n,)) + payload
        return b"\x7f" + n.to_bytes(3, "little") + payload


async def detect(reader: asyncio.StreamReader) -> Codec:
    """Read the transport tag (or the first length) and return the matching codec."""
    first = await reader.readexactly(1)
    if first == b"\xef":
        return AbridgedCodec()
    head = first + await reader.readexactly(3)
    if head == b"\xee\xee\xee\xee":
        return IntermediateCodec()
    if head == b"\xdd\xdd\xdd\xdd":
        return PaddedIntermediateCodec()
    return FullCodec(head)


# -- obfuscated2 (MTProxy) -------------------------------------------------------------------

_INNER_BY_TAG: dict[bytes, type[Codec]] = {
    b"\xef\xef\xef\xef": AbridgedCodec,
    b"\xee\xee\xee\xee": IntermediateCodec,
    b"\xdd\xdd\xdd\xdd": PaddedIntermediateCodec,
}
OBFUSCATED_HEADER = 64


class _Decrypting:
    __slots__ = ("_cipher", "_reader")

    def __init__(self, reader: ByteSource, cipher: _Ctr) -> None:
        self._reader = reader
        self._cipher = cipher

    async def readexactly(self, n: int) -> bytes:
        return self._cipher.update(await self._reader.readexactly(n))


class _Ctr(Protocol):
    def update(self, data: bytes) -> bytes: ...


class ObfuscatedCodec(Codec):
    """An inner codec under AES-256-CTR, one continuous key stream per direction."""

    name = "obfuscated2"

    def __init__(self, inner: Codec, decrypt: _Ctr, encrypt: _Ctr) -> None:
        self.inner = inner
        self._decrypt = decrypt
        self._encrypt = encrypt

    async def read(self, reader: ByteSource) -> bytes:
        return await self.inner.read(_Decrypting(reader, self._decrypt))

    def encode(self, payload: bytes) -> bytes:
        return self._encrypt.update(self.inner.encode(payload))


def _ctr(key: bytes, iv: bytes) -> _Ctr:
    return Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()


async def accept_obfuscated(reader: ByteSource, secret: bytes) -> tuple[int, ObfuscatedCodec]:
    """Read an obfuscated2 header; returns the DC it asks for and the codec for the rest.

    Client to server: key = sha256(header[8:40] + secret), iv = header[40:56]; server to
    client: the same over header[8:56] reversed. The client encrypted the whole header with
    its key stream and sent bytes 56-64 encrypted (tag, then the DC as a signed 16-bit
    number), so the server decrypts all 64 bytes to read them and to stay in step. A wrong
    secret decrypts the tag to noise: the connection is refused.
    """
    header = await reader.readexactly(OBFUSCATED_HEADER)
    rev = header[8:56][::-1]
    decrypt = _ctr(sha256(header[8:40] + secret).digest(), header[40:56])
    encrypt = _ctr(sha256(rev[:32] + secret).digest(), rev[32:48])
    plain = decrypt.update(header)
    inner = _INNER_BY_TAG.get(plain[56:60])
    if inner is None:
        raise TransportError("obfuscated2 header with an unknown tag (wrong secret?)")
    dc_id = abs(struct.unpack("<h", plain[60:62])[0])  # negative: the DC's media endpoint
    return dc_id, ObfuscatedCodec(inner(), decrypt, encrypt)
