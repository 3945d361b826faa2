"""localdc counts, per auth key, connections overlapping in time from different processes."""

from __future__ import annotations

import asyncio
import json
import sys

import aiohttp
from telethon.sessions import StringSession
from telethon.tl import functions, types

from tgdaemon.localdc.testing import login

GET_SELF = functions.users.GetUsersRequest([types.InputUserSelf()])

# Another client process on the same session: connects, proves it with a call, says so,
# then holds the connection until its stdin closes.
_HOLDER = r"""
import asyncio, json, sys
from telethon.tl import functions, types
from tgdaemon.localdc.testing import client_for_info
async def main():
    info = json.loads(sys.argv[1])
    client = client_for_info(info, session=sys.argv[2])
    await client.connect()
    await client(functions.users.GetUsersRequest([types.InputUserSelf()]))
    print("connected", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await client.disconnect()
asyncio.run(main())
"""


async def _holder(info: dict, session: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _HOLDER, json.dumps(info), session,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    assert line.strip() == b"connected"
    return proc


async def _end(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    await asyncio.wait_for(proc.wait(), 30)


async def test_overlaps_count_other_processes_not_reconnects(tmp_path, isolated_telethon,
                                                             clients, phone, wait_until):
    from tgdaemon.localdc import LocalDC

    async with LocalDC(tmp_path / "dc", control_port=0) as dc:
        client = clients(dc, session=StringSession())
        await login(client, dc, phone)
        session = client.session.save()
        # the same process reconnecting, and a second client in this process: not counted
        await client.disconnect()
        await client.connect()
        await client(GET_SELF)
        twin = clients(dc, session=session)
        await twin.connect()
        await twin(GET_SELF)
        assert dc.overlaps.snapshot() == {}

        # another process on the same key while ours is open: one overlap
        other = await _holder(dc.info(), session)
        try:
            snap = dc.overlaps.snapshot()
            assert sum(snap.values()) == 1, snap
        finally:
            await _end(other)
        # after it is gone, another one later still overlaps with our open connections
        await client.disconnect()
        await twin.disconnect()
        await wait_until(lambda: dc.connection_count() == 0, 10, "connections closed")
        alone = await _holder(dc.info(), session)
        await _end(alone)
        async with aiohttp.ClientSession() as http, \
                http.get(f"{dc.control_url}/overlaps") as resp:
            body = await resp.json()
        assert body["total"] == 1
        assert list(body["by_auth_key"].values()) == [1]
