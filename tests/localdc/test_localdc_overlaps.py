"""localdc counts, per auth key, connections overlapping in time from different processes
(tgdaemon/localdc/keyuse.py), the measure of "never two owners" for fleets of daemons."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import aiohttp
from telethon.sessions import StringSession
from telethon.tl import functions, types

from tgdaemon.localdc.keyuse import KeyUse
from tgdaemon.localdc.overlaps import peer_pid
from tgdaemon.localdc.testing import login

GET_SELF = functions.users.GetUsersRequest([types.InputUserSelf()])


def test_overlap_rules() -> None:
    process = {"a1": 1, "a2": 1, "b": 2, "gone": None}
    use = KeyUse(process_of=process.__getitem__)
    use.attach("a1", 7)
    use.attach("a1", 7)  # the same connection again: nothing new
    use.attach("a2", 7)  # the same process reconnecting before the old one closed
    assert use.overlaps == {}
    use.attach("b", 7)  # another process while process 1 is connected
    assert use.overlaps == {7: 1}
    use.detach("a1", 7)
    use.detach("a2", 7)
    use.attach("a1", 8)  # another key: separate
    use.detach("b", 7)
    use.attach("a1", 7)  # alone again: no overlap
    assert use.overlaps == {7: 1}
    use.attach("gone", 7)  # a process that cannot be found is not the same one
    assert use.overlaps == {7: 2}
    assert use.live_counts() == {7: 2, 8: 1}
    assert use.overlap_snapshot() == {f"{7:016x}": 2}
    assert use.live_snapshot() == {f"{7:016x}": 2, f"{8:016x}": 1}
    assert KeyUse().overlaps == {}  # without a process lookup nothing is counted


# Another client process on the same session: connects, sends one request (which may well
# be answered AUTH_KEY_DUPLICATED), says so, then holds the connection until stdin closes.
_HOLDER = r"""
import asyncio, json, sys
from telethon.tl import functions, types
from tgdaemon.localdc.testing import client_for_info
async def main():
    info = json.loads(sys.argv[1])
    client = client_for_info(info, session=sys.argv[2])
    try:
        await client.connect()
        await client(functions.users.GetUsersRequest([types.InputUserSelf()]))
    except Exception as exc:
        print(type(exc).__name__, file=sys.stderr)
    print("sent", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await client.disconnect()
asyncio.run(main())
"""


async def test_a_second_process_on_a_connected_key_is_counted(
        tmp_path, isolated_telethon, clients, phone, wait_until):
    from tgdaemon.localdc import LocalDC

    async with LocalDC(tmp_path / "dc", control_port=0) as dc:
        client = clients(dc, session=StringSession())
        await login(client, dc, phone)
        await client(GET_SELF)
        # the lookup finds this very process at the other end of its connection
        conns = [c for c in dc._conns if c.key_id is not None]
        assert conns
        assert peer_pid(conns[0].writer) == os.getpid()
        assert dc.key_use.overlaps == {}

        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _HOLDER, json.dumps(dc.info()), client.session.save(),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        assert proc.stdin is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line.strip() == b"sent"
            async with aiohttp.ClientSession() as http, \
                    http.get(f"{dc.control_url}/overlaps") as resp:
                body = await resp.json()
            async with aiohttp.ClientSession() as http, \
                    http.get(f"{dc.control_url}/keys") as resp:
                live = (await resp.json())["live"]
        finally:
            proc.stdin.close()
            await asyncio.wait_for(proc.wait(), 30)
        assert body["total"] == 1
        assert list(body["by_auth_key"].values()) == [1]
        assert live == {k: 2 for k in body["by_auth_key"]}  # both connections open
