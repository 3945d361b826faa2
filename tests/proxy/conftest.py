"""Real proxy programs for the proxy tests: microsocks (SOCKS5 with user/password) and
tinyproxy (HTTP CONNECT), each started on a free loopback port in a temp dir, and localdc
listening as an MTProxy. A program that is not installed skips its tests with the reason."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tgdaemon.localdc import LocalDC

#: The MTProxy key localdc serves (16 bytes of hex); accounts use it plain or as "dd" + key.
MTPROXY_KEY = "0123456789abcdef0123456789abcdef"
SOCKS_USER = "tgd"
#: Distinctive, so the leak scan cannot miss it (and cannot match anything by chance).
SOCKS_PASSWORD = "Pr0xyPa55-zq81"
HTTP_USER = "tgdh"
HTTP_PASSWORD = "Http9Pa55-vw27"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _accepts(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


@dataclass
class ProxyProcess:
    """A proxy program on 127.0.0.1:port; ``stop``/``start`` again on the same port."""

    argv: list[str]
    port: int
    proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
        for _ in range(500):  # up to 10 s
            if await _accepts(self.port):
                return
            if self.proc.returncode is not None:
                break
            await asyncio.sleep(0.02)
        await self.stop()
        pytest.fail(f"{self.argv[0]} did not start listening on port {self.port}")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()


def _binary(name: str) -> str:
    found = shutil.which(name) or next(
        (p for p in (f"/usr/bin/{name}", f"/usr/sbin/{name}") if os.access(p, os.X_OK)), None)
    if found is None:
        pytest.skip(f"{name} is not installed (scripts/install-system-deps.sh installs it)")
    return found


@pytest.fixture
async def microsocks() -> AsyncIterator[ProxyProcess]:
    """SOCKS5 with user/password authentication (Debian's microsocks)."""
    port = free_port()
    proxy = ProxyProcess([_binary("microsocks"), "-i", "127.0.0.1", "-p", str(port),
                          "-u", SOCKS_USER, "-P", SOCKS_PASSWORD], port)
    await proxy.start()
    yield proxy
    await proxy.stop()


TinyproxyFactory = Callable[[list[int]], Awaitable[ProxyProcess]]


@pytest.fixture
async def tinyproxy(tmp_path: Path) -> AsyncIterator[TinyproxyFactory]:
    """HTTP CONNECT proxy (Debian's tinyproxy) with basic auth (HTTP_USER/HTTP_PASSWORD),
    allowing CONNECT only to the given ports."""
    started: list[ProxyProcess] = []

    async def start(connect_ports: list[int]) -> ProxyProcess:
        binary = _binary("tinyproxy")
        port = free_port()
        conf = tmp_path / f"tinyproxy-{port}.conf"
        lines = [f"Port {port}", "Listen 127.0.0.1", "Timeout 600", "MaxClients 100",
                 "Allow 127.0.0.1", "LogLevel Warning", f"LogFile \"{tmp_path}/tinyproxy.log\"",
                 f"PidFile \"{tmp_path}/tinyproxy-{port}.pid\"", "DisableViaHeader Yes",
                 f"BasicAuth {HTTP_USER} {HTTP_PASSWORD}"]
        lines += [f"ConnectPort {p}" for p in connect_ports]
        if os.getuid() == 0:  # tinyproxy drops root; the temp dir must stay writable for it
            lines += ["User root", "Group root"]
        conf.write_text("\n".join(lines) + "\n")
        proxy = ProxyProcess([binary, "-d", "-c", str(conf)], port)
        await proxy.start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        await proxy.stop()


@pytest.fixture
async def localdc(tmp_path: Path, isolated_telethon: None) -> AsyncIterator[LocalDC]:
    """Overrides the shared fixture: also an MTProxy port in front of the DCs."""
    async with LocalDC(tmp_path / "localdc", dcs=2, mtproxy_secret=MTPROXY_KEY) as dc:
        yield dc


def socket_owner_pid(local_port: int, remote_port: int) -> int | None:
    """The pid owning the loopback TCP socket from ``local_port`` to ``remote_port`` (via
    /proc/net/tcp and each process's fd table); None when not found. Both ports count: Linux
    reuses an ephemeral port for connections to different destinations."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local = int(fields[1].rsplit(":", 1)[1], 16)
            remote = int(fields[2].rsplit(":", 1)[1], 16)
            if (local, remote) == (local_port, remote_port) and fields[9] != "0":
                inodes.add(f"socket:[{fields[9]}]")
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            fds = list((pid_dir / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) in inodes:
                    return int(pid_dir.name)
            except OSError:
                continue
    return None
