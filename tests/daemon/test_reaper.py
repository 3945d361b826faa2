"""Clients the workers let go of are finished and freed (tgdaemon.reaper): none is left alive
by its tasks or transport, nor as cyclic garbage that a gc.freeze() would keep for ever."""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref
from collections import Counter
from typing import Any

import tgdaemon.accountclient
from tests.conftest import phone_for
from tgdaemon.daemon import Daemon
from tgdaemon.status import State
from tgdaemon.telegram import TELETHON_LOGGER

NAMES = [f"reap{i}" for i in range(4)]


def _tasks() -> Counter[str]:
    """The running tasks by coroutine, the local DC's own left out (its connection handlers
    end on their own schedule; the asyncio queue waits are its, the daemon uses none)."""
    coros = (task.get_coro() for task in asyncio.all_tasks())
    return Counter(c.__qualname__ for c in coros
                   if not any(part in c.cr_code.co_filename for part in ("localdc", "asyncio")))


def _holders(refs: list[weakref.ref[Any]]) -> list[str]:
    """For each object still alive, its type and the types of what refers to it."""
    out = []
    for ref in refs:
        obj = ref()
        if obj is not None:
            holders = sorted({type(r).__qualname__ for r in gc.get_referrers(obj)})
            out.append(f"{type(obj).__qualname__} <- {', '.join(holders)}")
    return out


def _parts(client: Any) -> list[weakref.ref[Any]]:
    """Weak references to a connected client and what it is made of."""
    connection = client._sender._connection
    return [weakref.ref(o) for o in (client, client._sender, connection,
                                     connection._writer.transport, client._updates_handle)]


async def test_abandoned_clients_are_torn_down_and_freed_without_the_collector(
        make_config, login_account, localdc, wait_until, monkeypatch) -> None:
    config = make_config([{"name": n, "phone": phone_for(n)} for n in NAMES],
                         daemon={"http_listen": ""},
                         policy={"backoff_base": 0.05})
    for name in NAMES:
        await login_account(config, name)
    async with Daemon(config) as daemon:
        supervisor = daemon.supervisor
        assert supervisor is not None

        def connected() -> bool:
            return daemon.board.counts()[State.CONNECTED] == len(NAMES)

        await wait_until(connected, 30, "all connected")
        await wait_until(lambda: _tasks()["ManagedClient._update_loop"] == len(NAMES), 10,
                         "every client's update loop running")
        baseline = _tasks()
        workers = [supervisor.worker(n) for n in NAMES]
        first = [_parts(w.client) for w in workers]
        reaper = supervisor.deps.reaper
        # Every close is cut short at its first wait, as a loop lagging past the close
        # timeout does to all of them after an outage: each worker abandons its client.
        monkeypatch.setattr(tgdaemon.accountclient, "CLOSE_TIMEOUT", 0)
        # pytest's log capture keeps every record, and a record's exc_info holds the frames
        # of the failing call (the client among their locals): Telethon's stay out of it.
        telethon = logging.getLogger(TELETHON_LOGGER)
        monkeypatch.setattr(telethon, "propagate", False)
        monkeypatch.setattr(telethon, "handlers", [logging.NullHandler()])
        gc.collect()
        gc.disable()  # from here on only reference counting frees, as for frozen objects
        try:
            assert localdc.drop_connections() == len(NAMES)

            def replaced() -> bool:
                return connected() and all(
                    w.client is not None and w.client is not refs[0]()
                    for w, refs in zip(workers, first, strict=True))

            await wait_until(replaced, 30, "every account on a fresh client")
            await wait_until(lambda: reaper.pending == 0 and reaper.reaped >= len(NAMES), 30,
                             "the abandoned clients reaped")
            alive = lambda: [r for refs in first for r in refs if r() is not None]  # noqa: E731
            try:
                await wait_until(lambda: not alive(), 30, "the abandoned clients freed")
            except AssertionError as exc:  # say what holds them (a path the reaper misses)
                raise AssertionError(f"{exc}; held: {_holders(alive())}") from None
            # One set of tasks per account again: the abandoned clients' all ended.
            await wait_until(lambda: _tasks() == baseline, 10, "tasks back to the baseline")
        finally:
            gc.enable()
