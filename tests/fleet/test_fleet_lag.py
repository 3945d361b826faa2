"""A busy fleet daemon is not a paused one (issue 15, bench/CLUSTER.md): an event-loop lag
shorter than the lag allowance must not let the server close healthy connections, while a
process paused past its leases still has every connection closed by the server before the
lease's local deadline.

One daemon process (fleet mode, SQLite) and localdc, which counts the connections it closes
on a passed ``ping_delay_disconnect`` deadline. The heartbeat interval is as close to the
heartbeat room as the defaults' (30 s against 38 s): before the lag allowance, a lag of a
second or two had the server close some of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from bench.procs import LocalDcProcess
from bench.seed import plan_dc_procs, render_config, seed_fleet
from tests.conftest import WaitUntil
from tests.fleet.test_fleet_processes import POLL, DaemonProc, DcControl
from tgdaemon.crypto import KeyRing, write_key_file
from tgdaemon.leases import LeaseTiming, default_close_margin, heartbeat_room, lag_allowance

N = 120
TTL = 12.0
RENEW = 1.0
#: 7 s against a room of 8 s (the defaults: 30 s against 38 s).
HEARTBEAT = 7.0
TIMING = LeaseTiming(TTL, RENEW, default_close_margin(TTL))
#: The stand-in for a busy loop: well under the lag allowance (2.7 s here, 12.7 s at the
#: defaults), longer than what a heartbeat at the usual interval left (0.3 s at worst here).
LAG = 1.5
#: The latest a server deadline armed before the lag can pass: a lease renewed just then.
LONGEST_DEADLINE = heartbeat_room(TTL, RENEW) + RENEW


@pytest.mark.timeout(120)
async def test_a_lag_keeps_connections_and_a_pause_past_the_lease_closes_them(
        tmp_path: Path, keyring: KeyRing, isolated_telethon: None,
        wait_until: WaitUntil) -> None:
    assert lag_allowance(TTL, RENEW) - 1 > LAG
    procs = plan_dc_procs(tmp_path, 1)
    state = tmp_path / "state"
    names, rsa_files, _users = await seed_fleet(N, procs, state, keyring)
    key_file = tmp_path / "master.key"
    write_key_file(key_file, keyring)
    config = tmp_path / "tgdaemon.toml"
    config.write_text(render_config(
        state_dir=state, key_file=key_file, rsa_files=rsa_files, procs=procs, names=names,
        daemon={"lease_ttl": TTL, "lease_renew_interval": RENEW, "connect_rate": 0.0},
        policy={"heartbeat_interval": HEARTBEAT, "stale_after": 60.0,
                "connect_timeout": 10.0, "request_timeout": 10.0}))
    dc = LocalDcProcess(procs[0], tmp_path)
    await asyncio.to_thread(dc.start)
    with contextlib.suppress(PermissionError):  # Telegram is not slowed down by our load
        os.setpriority(os.PRIO_PROCESS, dc.pid, -10)
    control = DcControl(str(dc.info["control_url"]))
    log = tmp_path / "d1.log"
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tgdaemon", "run", "-c", str(config),
            env={**os.environ, "TGDAEMON_INSTANCE": "d1"}, stdout=out, stderr=out)
    daemon = DaemonProc("d1", proc, log)
    try:
        await daemon.http_port()

        async def all_open() -> bool:
            return len(await control.live()) == N

        await wait_until(all_open, 60, "every account connected", POLL)
        closes = await control.deadline_closes()

        # A lag: the loop stands still for LAG seconds, then catches up.
        proc.send_signal(signal.SIGSTOP)
        await asyncio.sleep(LAG)  # the lag itself
        proc.send_signal(signal.SIGCONT)
        # By then every server deadline armed before the lag has passed or been re-armed.
        await asyncio.sleep(LONGEST_DEADLINE)
        assert await control.deadline_closes() == closes, (
            "the server closed connections of a daemon that was only late")
        assert len(await control.live()) == N

        # A pause past the leases: the server closes every connection by itself, before the
        # lease's local deadline (at most TTL - close margin after the last renewal).
        proc.send_signal(signal.SIGSTOP)
        paused = time.monotonic()

        async def none_open() -> bool:
            return not await control.live()

        await wait_until(none_open, TTL, "the paused daemon's connections closed", POLL / 5)
        assert time.monotonic() - paused <= TTL - TIMING.close_margin
        assert await control.deadline_closes() >= closes + N
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        await asyncio.to_thread(dc.stop)
