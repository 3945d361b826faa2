"""The connection class follows the proxy type (a table), and the frame cap is a hard bound."""

from __future__ import annotations

import asyncio

import pytest

from tgdaemon.config import Proxy
from tgdaemon.connection import (
    MAX_FRAME_BYTES,
    CappedMTProxyIntermediate,
    CappedMTProxyPadded,
    CappedTcpFull,
    FrameTooLargeError,
    _CappedReader,
    connection_for,
)

KEY = "0123456789abcdef" * 2


@pytest.mark.parametrize(("proxy", "expected"), [
    (None, CappedTcpFull),
    (Proxy("socks5", "h", 1, "u", "p"), CappedTcpFull),
    (Proxy("socks4", "h", 1), CappedTcpFull),
    (Proxy("http", "h", 1), CappedTcpFull),
    (Proxy("mtproxy", "h", 1, secret="dd" + KEY), CappedMTProxyPadded),
    (Proxy("mtproxy", "h", 1, secret=KEY), CappedMTProxyIntermediate),
    # a plain secret that merely starts with "dd" is still a plain 16-byte secret
    (Proxy("mtproxy", "h", 1, secret="dd" + KEY[2:]), CappedMTProxyIntermediate),
])
def test_connection_class_follows_the_proxy(proxy: Proxy | None, expected: type) -> None:
    assert connection_for(proxy) is expected


@pytest.mark.parametrize("secret", ["dd" + KEY, KEY, "dd" + KEY[2:]])
def test_mtproxy_key_is_the_16_bytes_after_an_optional_dd(secret: str) -> None:
    key = connection_for(Proxy("mtproxy", "h", 1, secret=secret)).normalize_secret(secret)
    assert key == bytes.fromhex(secret[-32:])


async def test_capped_reader_refuses_before_reading() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"x" * 8)
    capped = _CappedReader(reader)
    assert await capped.readexactly(8) == b"x" * 8
    for n in (MAX_FRAME_BYTES + 1, -1):
        with pytest.raises(FrameTooLargeError):
            await capped.readexactly(n)
    assert isinstance(FrameTooLargeError("x"), ConnectionError)  # a NETWORK fault
