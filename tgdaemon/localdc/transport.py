"""MTProto TCP transports (full, intermediate, abridged), server side.

The transport is detected from the first bytes the client sends, as Telegram does:
``0xef`` → abridged, ``0xeeeeeeee`` → intermediate, anything else → full (a length).
"""

from __future__ import annotations

import asyncio
import struct
from zlib import crc32


class TransportError(Exception):
    """The byte stream is not a valid MTProto transport stream (bad length or CRC)."""


MAX_PACKET = 4 * 1024 * 1024


class Codec:
    name = "base"

    async def read(self, reader: asyncio.StreamReader) -> bytes:
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

    async def read(self, reader: asyncio.StreamReader) -> bytes:
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

    async def read(self, reader: asyncio.StreamReader) -> bytes:
        (length,) = struct.unpack("<i", await reader.readexactly(4))
        if not 0 < length <= MAX_PACKET:
            raise TransportError(f"bad intermediate length {length}")
        return await reader.readexactly(length)

    def encode(self, payload: bytes) -> bytes:
        return struct.pack("<i", len(payload)) + payload


class AbridgedCodec(Codec):
    name = "abridged"

    async def read(self, reader: asyncio.StreamReader) -> bytes:
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
        raise TransportError("padded intermediate transport is not supported")
    return FullCodec(head)
