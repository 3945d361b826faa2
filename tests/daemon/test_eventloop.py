"""The daemon's event loop spreads a storm of ready sockets over passes (tgdaemon.eventloop).

A pass is counted with public asyncio only: a marker callback that re-schedules itself with
``call_soon`` runs once per pass, so what happens between two of its runs is one pass."""

from __future__ import annotations

import asyncio
import selectors
import socket
from typing import Any

import pytest

from tgdaemon import eventloop

pytestmark = pytest.mark.skipif(not hasattr(selectors, "EpollSelector"), reason="needs epoll")

PEERS = 600


class _Counting(asyncio.Protocol):
    def __init__(self, passes: list[int], current: list[int], peers: int,
                 all_lost: asyncio.Event) -> None:
        self._passes = passes
        self._current = current
        self._peers = peers
        self._all_lost = all_lost

    def connection_lost(self, exc: Exception | None) -> None:
        self._passes.append(self._current[0])
        if len(self._passes) == self._peers:
            self._all_lost.set()


async def _drop_storm(peers: int) -> tuple[int, int]:
    """``peers`` connections whose peers all close at once: (most connection losses in one
    loop pass, connections lost)."""
    loop = asyncio.get_running_loop()
    lost: list[int] = []
    current = [0]
    remotes: list[socket.socket] = []
    all_lost = asyncio.Event()
    for _ in range(peers):
        ours, theirs = socket.socketpair()
        remotes.append(theirs)
        await loop.connect_accepted_socket(
            lambda: _Counting(lost, current, peers, all_lost), ours)
    stop = False

    def mark() -> None:
        current[0] += 1
        if not stop:
            loop.call_soon(mark)

    loop.call_soon(mark)
    await asyncio.sleep(0)
    for theirs in remotes:  # all ready before the loop looks again
        theirs.close()
    await asyncio.wait_for(all_lost.wait(), 60)
    stop = True
    per_pass: dict[int, int] = {}
    for p in lost:
        per_pass[p] = per_pass.get(p, 0) + 1
    return max(per_pass.values(), default=0), len(lost)


def test_a_storm_of_closed_connections_is_spread_over_passes() -> None:
    most, lost = eventloop.run(_drop_storm(PEERS))
    assert lost == PEERS  # every socket is served: none starves behind the bound
    assert most <= eventloop.IO_EVENTS_PER_PASS


def test_the_stock_loop_takes_the_whole_storm_in_one_pass() -> None:
    """The contrast that makes the test above mean something."""
    most, lost = asyncio.run(_drop_storm(PEERS))
    assert lost == PEERS
    assert most > eventloop.IO_EVENTS_PER_PASS


def test_select_returns_at_most_max_events_and_serves_every_socket_in_turn() -> None:
    sel = eventloop.BoundedEpollSelector(max_events=3)
    pairs = [socket.socketpair() for _ in range(10)]
    try:
        for i, (ours, theirs) in enumerate(pairs):
            sel.register(ours, selectors.EVENT_READ, i)
            theirs.send(b"x")  # level-triggered: stays ready until read
        seen: list[Any] = []
        for _ in range(4):
            ready = sel.select(0)
            assert len(ready) <= 3
            seen.extend(key.data for key, events in ready if events & selectors.EVENT_READ)
        # Nothing was read, yet four selects of three reached all ten: the kernel rotates its
        # ready list, so no socket waits behind another for ever.
        assert sorted(set(seen)) == list(range(10))
    finally:
        sel.close()
        for ours, theirs in pairs:
            ours.close()
            theirs.close()


@pytest.mark.parametrize("bad", [0, -1])
def test_max_events_must_be_positive(bad: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        eventloop.BoundedEpollSelector(max_events=bad)


def test_the_run_command_serves_on_the_bounded_loop(tmp_path: Any, monkeypatch: Any) -> None:
    """``tgdaemon run`` uses :func:`tgdaemon.eventloop.run`: the daemon's loop is bounded."""
    from tgdaemon import cli, daemon

    selector_types: list[type] = []

    async def fake_serve(config: object) -> int:
        loop = asyncio.get_running_loop()
        selector_types.append(type(loop._selector))  # type: ignore[attr-defined]
        return 0

    config = tmp_path / "tgdaemon.toml"
    config.write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[telegram]\napi_id = 1\napi_hash = "0123456789abcdef0123456789abcdef"\n'
    )
    monkeypatch.setattr(daemon, "serve", fake_serve)
    monkeypatch.setattr("tgdaemon.logs.setup_logging", lambda *a, **k: None)
    assert cli.main(["run", "--config", str(config)]) == 0
    assert selector_types == [eventloop.BoundedEpollSelector]
