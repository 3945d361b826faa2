"""Raw-socket helpers for tests of what misbehaving clients can make a server hold."""

from __future__ import annotations

import asyncio
import socket


async def closed_by_server(sock: socket.socket, timeout: float = 10.0, *,
                           sending: bool = False) -> bytes:
    """Read until the server closes the connection; returns what it sent. ``sending``: the
    client is still sending, so a close can be a reset (the kernel answers bytes the server
    had not read when it closed with RST instead of FIN; nothing else resets on loopback)."""
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(timeout):
        try:
            while chunk := await loop.sock_recv(sock, 65536):
                data += chunk
        except ConnectionResetError:
            if not sending:
                raise
    return data


async def trickled_until_closed(sock: socket.socket, head: bytes) -> bytes:
    """Send ``head``, then one more header byte every 50 ms (pacing the attacker, not waiting
    for the server) until the server closes; returns what it sent."""
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, head)
    reader = asyncio.ensure_future(closed_by_server(sock, sending=True))
    while not reader.done():
        try:
            await loop.sock_sendall(sock, b"X")
        except OSError:
            break
        await asyncio.sleep(0.05)
    return await reader
