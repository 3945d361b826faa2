"""Issue 11 against the real daemon process (``python -m tgdaemon run``): an empty or missing
token file and an unbindable listen address end the process with one line and exit 78
(items 1 and 10); the Host allow-list guards every route (item 2); the access log never
carries a query string (item 14); non-reading WebSocket clients cost bounded memory (item 6),
and so do clients that ask for ``/metrics`` or ``/status`` and never read the answer.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import socket
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import wait_for_condition
from tests.daemon import test_process
from tests.daemon.test_process import DaemonProcess, NotifyListener, free_port, start_daemon
from tgdaemon.http import HttpLimits
from tgdaemon.localdc.testing import API_HASH

# The daemon-process fixtures of test_process (sd_notify listener, started processes).
notify = test_process.notify
notify_dir = test_process.notify_dir
processes = test_process.processes

TOKEN = "Tok3n-for-the-http-hardening-test"
ROUTES = ("/", "/metrics", "/healthz", "/readyz", "/status")


def plain_config(tmp_path: Path, key_file: Path, **daemon: Any) -> Path:
    """A config without accounts or servers: enough for the HTTP side, no DC needed."""
    daemon = {"log_level": "info", **daemon}
    lines = ["[daemon]", f'state_dir = "{tmp_path / "state"}"',
             f'master_key_file = "{key_file}"',
             *(f"{k} = {v!r}".replace("'", '"') for k, v in daemon.items()),
             "[telegram]", "api_id = 1", f'api_hash = "{API_HASH}"']
    path = tmp_path / "tgdaemon.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def expect_one_line_exit_78(processes: list[DaemonProcess], notify: NotifyListener,
                                  config: Path, needle: str) -> str:
    daemon = await start_daemon(processes, config, notify)
    code = await daemon.wait_exit(20)
    assert code == 78, f"exit {code}\n{daemon.log}"
    errors = [line for line in daemon.lines if line.startswith("tgdaemon: error:")]
    assert len(errors) == 1, daemon.log
    assert needle in errors[0], errors[0]
    assert "Traceback" not in daemon.log
    assert not [line for line in daemon.lines if line.startswith(("ERROR", "CRITICAL"))], \
        daemon.log
    return errors[0]


async def test_token_file_problems_end_the_daemon_with_exit_78(
        tmp_path, key_file, notify, processes):
    token = tmp_path / "token"
    for content in ("", "  \n\n"):
        token.write_text(content)
        token.chmod(0o600)
        config = plain_config(tmp_path, key_file, http_token_file=str(token))
        await expect_one_line_exit_78(processes, notify, config,
                                      f"daemon.http_token_file: {token} is empty")
    token.unlink()
    await expect_one_line_exit_78(processes, notify, config,
                                  f"daemon.http_token_file: cannot read {token}")
    assert notify.find("READY") is None


async def test_unbindable_listen_address_ends_the_daemon_with_exit_78(
        tmp_path, key_file, notify, processes):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = plain_config(tmp_path, key_file, http_listen=f"127.0.0.1:{port}")
        await expect_one_line_exit_78(processes, notify, config,
                                      f"cannot listen on 127.0.0.1:{port}: the port is in use")
    # 192.0.2.1 (TEST-NET-1) is on no interface of this machine.
    config = plain_config(tmp_path, key_file, http_listen="192.0.2.1:9464")
    await expect_one_line_exit_78(processes, notify, config,
                                  "cannot listen on 192.0.2.1:9464: no network interface")
    assert notify.find("READY") is None


async def get(port: int, path: str, host: str, **headers: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{port}{path}", headers={"Host": host, **headers},
            timeout=aiohttp.ClientTimeout(total=10)) as r:
        return r.status


async def ws_status(port: int, host: str, **headers: str) -> int:
    async with aiohttp.ClientSession() as http:
        try:
            async with http.ws_connect(f"http://127.0.0.1:{port}/status/ws",
                                       headers={"Host": host, **headers}) as ws:
                await ws.receive(timeout=10)
                return 101
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status


async def test_host_allow_list_guards_every_route_by_default(
        tmp_path, key_file, notify, processes):
    port = free_port()
    daemon = await start_daemon(
        processes, plain_config(tmp_path, key_file, http_listen=f"127.0.0.1:{port}"), notify)
    await notify.wait("READY", "1")
    for path in ROUTES:
        # The DNS-rebinding request: the attacker's name, resolved to 127.0.0.1.
        assert await get(port, path, f"evil.example:{port}") == 421, path
        assert await get(port, path, f"127.0.0.1:{port}") == 200, path
        assert await get(port, path, f"localhost:{port}") == 200, path
        assert await get(port, path, f"[::1]:{port}") == 200, path
    evil = f"http://evil.example:{port}"
    assert await ws_status(port, f"evil.example:{port}", Origin=evil) == 421
    assert await ws_status(port, f"127.0.0.1:{port}") == 101
    # Item 14: a query string (here a token pasted into a URL) never reaches the log.
    assert await get(port, "/status?token=QueryS3cret&x=1", f"127.0.0.1:{port}") == 200
    await daemon.wait_log(r'"GET /status\?\[redacted\]" status=200 ')
    assert "QueryS3cret" not in daemon.log
    assert "<phone>" not in daemon.log  # the numbers of an access line are not a phone number
    assert "evil.example" not in daemon.log


async def test_configured_hosts_replace_the_default_and_the_token_is_required(
        tmp_path, key_file, notify, processes):
    port = free_port()
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    config = plain_config(tmp_path, key_file, http_listen=f"127.0.0.1:{port}",
                          http_token_file=str(token))
    text = config.read_text().replace(
        "[telegram]", 'http_allowed_hosts = ["Status.Example", "127.0.0.1"]\n[telegram]')
    config.write_text(text)
    daemon = await start_daemon(processes, config, notify)
    await notify.wait("READY", "1")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert await get(port, "/metrics", f"status.example:{port}") == 200
    assert await get(port, "/status", f"status.example:{port}", **auth) == 200
    assert await get(port, "/status", f"status.example:{port}") == 401
    assert await get(port, "/status", f"127.0.0.1:{port}", **auth) == 200
    for path in ROUTES:
        assert await get(port, path, f"localhost:{port}", **auth) == 421, path
    assert await get(port, f"/status?access_token={TOKEN}", f"127.0.0.1:{port}") == 401
    await daemon.wait_log(r'"GET /status\?\[redacted\]" status=401 ')
    assert TOKEN not in daemon.log


# -- item 6: memory of non-reading WebSocket clients ----------------------------------------


def rss_kib(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
    assert match is not None
    return int(match.group(1))


async def non_reading(port: int, path: str, headers: str = "") -> socket.socket:
    """A request on a raw socket that then never reads a byte (and asks the kernel for the
    smallest receive buffer, so the server's data piles up on its side)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}\r\n").encode())
    return sock


async def non_reading_ws(port: int) -> socket.socket:
    """A WebSocket handshake that then never reads a byte."""
    key = base64.b64encode(os.urandom(16)).decode()
    return await non_reading(port, "/status/ws", (
        f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n"))


class NonReaders:
    """Raw clients that never read, and what the daemon holds for them: its peak RSS, the
    largest kernel send queue on its port, and each client's answer status (peeked)."""

    def __init__(self, pid: int, port: int) -> None:
        self.pid = pid
        self.port = port
        self.socks: list[socket.socket] = []
        self.before = self.peak = rss_kib(pid)
        self.kernel = 0
        self.statuses: list[int | None] = []

    def sample(self) -> bool:
        """Take a sample; True once every client has its answer's status line."""
        self.peak = max(self.peak, rss_kib(self.pid))
        self.kernel = max(self.kernel, max(tcp_send_queues(self.port), default=0))
        self.statuses = [response_status(s) for s in self.socks]
        return None not in self.statuses

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.before) / 1024

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


def config_with_accounts(tmp_path: Path, key_file: Path, port: int, accounts: int) -> Path:
    """Accounts that were never logged in: their statuses and series, no DC needed."""
    config = plain_config(tmp_path, key_file, http_listen=f"127.0.0.1:{port}")
    with config.open("a") as f:
        f.write("".join(f'\n[[accounts]]\nname = "acc{i:05d}"\n' for i in range(accounts)))
    return config


def response_status(sock: socket.socket) -> int | None:
    """The status code of the handshake's answer, peeked (the client still reads nothing),
    or None when none arrived yet."""
    try:
        head = sock.recv(12, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None
    match = re.match(rb"HTTP/1\.1 (\d{3})", head)
    return int(match.group(1)) if match else None


def tcp_send_queues(port: int) -> list[int]:
    """Bytes the kernel holds unsent or unacknowledged in each socket of the local ``port``
    (the daemon's side of every connection): tx_queue of /proc/net/tcp."""
    queues = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":  # ESTABLISHED
            queues.append(int(fields[4].split(":")[0], 16))
    return queues


async def test_non_reading_websocket_clients_do_not_grow_memory(
        tmp_path, key_file, notify, processes):
    """Measured on the code before the limits: +333 MB RSS with 200 such clients and a
    0.9 MB snapshot (each blocked sender kept its snapshot text and bytes alive). With the
    first limits (64 subscribers, 10 s send deadline) it still depended on the machine: the
    kernel took up to 4 MiB per socket when it could, and 64 unsent snapshots stayed in the
    process when it could not (+61 MB with 70 clients); and a burst of 200 connections was
    refused at "256 open" (accepted connections counted twice), so the 503s came from the
    connection cap instead of the subscriber limit."""
    clients = 200
    limits = HttpLimits()
    port = free_port()
    # 3,000 accounts: a snapshot of about 1 MB.
    config = config_with_accounts(tmp_path, key_file, port, 3000)
    daemon = await start_daemon(processes, config, notify)
    await notify.wait("READY", "1", timeout=30)

    async def snapshot_size() -> int:
        async with aiohttp.ClientSession() as http, http.ws_connect(
                f"http://127.0.0.1:{port}/status/ws") as ws:
            return len((await ws.receive(timeout=20)).data)

    size = await snapshot_size()
    assert size > 500_000
    held = NonReaders(daemon.proc.pid, port)
    try:
        held.socks = [await non_reading_ws(port) for _ in range(clients)]
        await wait_for_condition(held.sample, 30, "every WebSocket handshake answered")
        admitted = held.statuses.count(101)
        # Each admitted one stops reading: cut off at the send deadline, which frees its data.
        await wait_for_condition(
            lambda: (held.sample(), daemon.log.count("subscriber stopped reading; disconnected"))
            [1] >= admitted, limits.send_timeout + 20, "non-reading subscribers cut off")
        held.sample()
    finally:
        held.close()
    growth_mb, kernel = held.growth_mb, held.kernel
    print(f"snapshot {size / 1e6:.2f} MB, RSS before {held.before / 1024:.0f} MB, peak growth "
          f"with {clients} non-reading clients {growth_mb:.0f} MB; {admitted} admitted, "
          f"{held.statuses.count(503)} refused; largest kernel send queue "
          f"{kernel / 1024:.0f} KiB")
    assert held.statuses.count(503) == clients - admitted
    assert 1 <= admitted <= limits.max_subscribers
    # Their unsent data is bounded by the backlog limit, not by how many connect: ~2 MB each
    # (the snapshot and the transport's copy of its unsent part) until 16 MiB are held.
    assert admitted <= 2 + limits.subscriber_backlog // size, admitted
    assert "status WebSocket subscriber refused: subscribers that do not read hold" \
        in daemon.log
    # 200 connections are below the connection cap: none was refused for that.
    assert "HTTP connection refused" not in daemon.log
    assert growth_mb < 50, growth_mb
    # The kernel keeps at most the capped send buffer per socket (it doubles the setting).
    assert kernel <= 2 * limits.send_buffer, kernel
    # Their slots and backlog are free again once they are gone.
    await wait_for_condition(snapshot_size_is(port, size), 20, "a reading client served")
    assert "Traceback" not in daemon.log


def snapshot_size_is(port: int, size: int) -> Any:
    async def check() -> bool:
        try:
            async with aiohttp.ClientSession() as http, http.ws_connect(
                    f"http://127.0.0.1:{port}/status/ws") as ws:
                return len((await ws.receive(timeout=20)).data) == size
        except aiohttp.ClientError:
            return False
    return check


async def test_non_reading_metrics_and_status_clients_do_not_grow_memory(
        tmp_path, key_file, notify, processes):
    """100 raw clients ask for ``/metrics`` (plain text) or ``/status`` and never read. Before
    the bound each held its own body twice (the answer and the transport's unsent copy of
    it) for as long as it stayed connected: RSS +76 MB here (0.5 MB /metrics, 1 MB /status,
    1 MB more per socket in the kernel), connections never closed. Now concurrent answers
    share one body, the transport holds a slice or two per client, the kernel a capped
    buffer (+9 MB), and each client is cut off at the send deadline; a client that reads is
    served meanwhile."""
    clients = 100
    limits = HttpLimits()
    port = free_port()
    daemon = await start_daemon(processes, config_with_accounts(tmp_path, key_file, port, 3000),
                                notify)
    await notify.wait("READY", "1", timeout=30)
    url = f"http://127.0.0.1:{port}"
    plain = {"Accept-Encoding": "identity"}
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/metrics", headers=plain) as resp:
            metrics_size = len(await resp.read())
        async with http.get(url + "/status") as resp:
            status_size = len(await resp.read())
    assert metrics_size > 300_000, metrics_size
    assert status_size > 500_000, status_size
    held = NonReaders(daemon.proc.pid, port)
    try:
        held.socks = [await non_reading(port, "/metrics" if i % 2 else "/status",
                                        "Accept-Encoding: identity\r\n")
                      for i in range(clients)]
        await wait_for_condition(held.sample, 60, "every request answered")
        # A client that reads is served while they hold their answers.
        t0 = asyncio.get_running_loop().time()
        async with aiohttp.ClientSession() as http, http.get(url + "/metrics",
                                                             headers=plain) as resp:
            assert resp.status == 200
            body = await resp.read()
            # The whole exposition (gauge values may change a digit or two meanwhile).
            assert len(body) >= 0.98 * metrics_size, (len(body), metrics_size)
            assert body.endswith(b"\n")
            assert body.count(b"# TYPE ") >= 10
        served_in = asyncio.get_running_loop().time() - t0
        held.sample()
        statuses = held.statuses
        print(f"/metrics {metrics_size / 1e6:.2f} MB, /status {status_size / 1e6:.2f} MB; "
              f"RSS before {held.before / 1024:.0f} MB, peak growth with {clients} non-reading "
              f"clients {held.growth_mb:.0f} MB; answers {statuses.count(200)} x 200, "
              f"{statuses.count(503)} x 503; largest kernel send queue "
              f"{held.kernel / 1024:.0f} KiB; a reading client served in {served_in:.2f} s")
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(200) >= 2
        assert held.growth_mb < 30, held.growth_mb
        assert held.kernel <= 2 * limits.send_buffer, held.kernel
        assert served_in < 10, served_in
        # Each is cut off at the send deadline, which frees what it held.
        await wait_for_condition(lambda: (held.sample(), not tcp_send_queues(port))[1],
                                 limits.send_timeout + 20, "non-reading clients cut off")
    finally:
        held.close()
    assert "HTTP client disconnected: did not take a large answer within 10 s" in daemon.log
    assert "Traceback" not in daemon.log
