"""Issue 11 item 8: a peer announcing a huge frame cannot make the daemon buffer it.

A hostile server (a plain asyncio server, not localdc) answers every connection with a full-
transport header announcing a ~2 GB frame and streams zeros. Telethon alone reads with
``readexactly(length)`` and would buffer all of it; the daemon's capped connection refuses the
frame after its 8-byte header, drops the connection as a NETWORK fault and backs off.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import struct
from pathlib import Path

from tests.conftest import phone_for
from tgdaemon.connection import MAX_FRAME_BYTES
from tgdaemon.crypto import load_keyring
from tgdaemon.daemon import Daemon
from tgdaemon.status import State
from tgdaemon.store import Store

#: What the hostile server streams per connection at most (keeps an uncapped client's damage,
#: should the cap regress, to a size the machine survives while the test fails clearly).
STREAM_LIMIT = 96 * 1024 * 1024
CHUNK = b"\0" * (1024 * 1024)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    """Writing 5 to clear_refs resets VmHWM (peak RSS) to the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


class HostileServer:
    """Announces a 2 GB frame on every connection and streams until the peer hangs up."""

    def __init__(self) -> None:
        self.connections = 0
        self.sent: list[int] = []
        self.server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        index = len(self.sent)
        self.sent.append(0)
        try:
            writer.write(struct.pack("<ii", 0x7FFFFFF0, 0))
            while self.sent[index] < STREAM_LIMIT:
                writer.write(CHUNK)
                await writer.drain()
                self.sent[index] += len(CHUNK)
            await reader.read()  # hold the connection open until the client gives up
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        """Close the listener and reset every connection (a client mid-connect must not wait
        for a graceful close of a socket the server floods)."""
        if self.server is not None:
            self.server.close()
        for writer in self._writers:
            writer.transport.abort()
        if self.server is not None:
            await self.server.wait_closed()


async def test_huge_frame_is_refused_memory_stays_bounded_and_account_reconnects(
        make_config, login_account, localdc, wait_until, caplog):
    config = make_config([{"name": "alice", "phone": phone_for("alice")}],
                         daemon={"http_listen": ""})
    await login_account(config, "alice")
    hostile = HostileServer()
    port = await hostile.start()
    # Point the stored session at the hostile server (the account's home DC goes rogue).
    async with await Store.open(config.daemon.state_dir,
                                load_keyring(key_file=config.daemon.master_key_file)) as store:
        data = await store.load_session("alice")
        assert data is not None
        await store.save_session("alice", dataclasses.replace(data, port=port))

    _reset_peak_rss()
    rss_before = _status_kib("VmRSS")
    try:
        async with Daemon(config) as daemon:
            # Two connections: the first was dropped as a network fault and the worker
            # reconnected after its backoff instead of stopping the account.
            await wait_until(lambda: hostile.connections >= 2, 30,
                             "the account reconnected after the dropped connection")
            entry = daemon.board.get("alice")
            assert entry is not None
            await wait_until(lambda: daemon.board.get("alice").state  # type: ignore[union-attr]
                             in (State.RECONNECTING, State.CONNECTING), 10, "reconnecting")
            await wait_until(lambda: daemon.board.get("alice").last_error_category  # type: ignore[union-attr]
                             == "network", 10, "a network fault recorded")
            entry = daemon.board.get("alice")
            assert entry is not None
            assert entry.state not in (State.STOPPED, State.NEEDS_LOGIN)
            assert "FrameTooLarge" in (entry.last_error_message or "")
            peak_growth_mib = (_status_kib("VmHWM") - rss_before) / 1024
            await hostile.stop()
    finally:
        await hostile.stop()
    # Per connection, only what fits in socket buffers got out before the client hung up;
    # an uncapped client reads all STREAM_LIMIT bytes.
    assert max(hostile.sent) < STREAM_LIMIT // 2, hostile.sent
    assert peak_growth_mib < (MAX_FRAME_BYTES / 2**20) + 32, peak_growth_mib
    # The dropped connections' errors were seen: freeing their senders reports nothing
    # (asyncio's "exception was never retrieved" ERROR, a traceback per dropped connection).
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        gc.collect()
    unretrieved = [r.getMessage() for r in caplog.records
                   if r.name == "asyncio" and "never retrieved" in r.getMessage()]
    assert not unretrieved, unretrieved
