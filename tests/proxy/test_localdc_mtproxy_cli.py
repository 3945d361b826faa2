"""``tgdaemon localdc --mtproxy-secret``: the MTProxy port from the command line (for demos),
used by a stock Telethon client with the daemon's MTProxy connection class; a wrong secret is
refused; the secret is never printed or written to the info file. (Telethon's own
``ConnectionTcpMTProxy*`` leaks its socket when a proxy hangs up during its 2 s wait.)"""

from __future__ import annotations

import asyncio
import signal
import sys

from tests.localdc.test_localdc_control import _wait_file
from tests.proxy.conftest import MTPROXY_KEY
from tgdaemon.connection import CappedMTProxyPadded
from tgdaemon.localdc.testing import client_for_info

SECRET = "dd" + MTPROXY_KEY


async def test_cli_mtproxy_port_serves_stock_telethon(tmp_path, isolated_telethon):
    info_file = tmp_path / "info.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tgdaemon.localdc", "--state-dir", str(tmp_path / "state"),
        "--info-file", str(info_file), "--mtproxy-secret", SECRET,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        info = await _wait_file(info_file)
        mtproxy = info["mtproxy"]
        assert mtproxy["host"] == "127.0.0.1"
        for secret, works in ((SECRET, True), ("dd" + "e" * 32, False)):
            client = client_for_info(
                info, 1, connection=CappedMTProxyPadded,
                proxy=(mtproxy["host"], mtproxy["port"], secret),
                connection_retries=0, retry_delay=0)
            try:
                if works:
                    await client.connect()  # key exchange + initConnection(help.getConfig)
                    assert client.is_connected()
                else:
                    await asyncio.wait_for(client.connect(), 10)
                    raise AssertionError("a wrong secret connected")
            except (ConnectionError, asyncio.IncompleteReadError):  # localdc hung up
                assert not works
            finally:
                await client.disconnect()
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0
        text = err.decode() + info_file.read_text()
        assert MTPROXY_KEY not in text
        assert "MTProxy on" in err.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
