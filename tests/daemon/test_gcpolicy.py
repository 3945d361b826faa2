"""The start phase's gc.freeze() (tgdaemon.gcpolicy): frozen while accounts connect, the
phase ends once none is connecting, and stop hands everything back to the collector."""

from __future__ import annotations

import gc
import weakref

from tests.conftest import phone_for
from tgdaemon.daemon import Daemon
from tgdaemon.gcpolicy import GcPolicy
from tgdaemon.status import State


class _Node:
    """Garbage only the cycle collector can free (it refers to itself)."""

    def __init__(self) -> None:
        self.me = self


async def test_freezes_while_connecting_until_none_is(wait_until):
    connecting = True
    policy = GcPolicy(lambda: connecting, interval=0.01)
    assert gc.get_freeze_count() == 0
    policy.start()
    try:
        assert gc.get_freeze_count() > 0  # at once: what exists now is long-lived
        await wait_until(lambda: policy.freezes >= 3, 5, "freezes while connecting")
        assert not policy.settled
        node = _Node()  # born after the last freeze: the collector still sees it
        assert gc.is_tracked(node)
        assert any(o is node for o in gc.get_objects())
        before = policy.freezes
        connecting = False
        await wait_until(lambda: policy.settled, 5, "start phase over")
        assert policy.freezes == before + 1  # one last freeze as the phase ends
        assert not any(o is node for o in gc.get_objects())  # frozen now
    finally:
        await policy.stop()
    assert gc.get_freeze_count() == 0


async def test_young_garbage_is_collected_rather_than_frozen():
    policy = GcPolicy(lambda: False)
    node = _Node()
    ref = weakref.ref(node)
    del node
    try:
        policy.freeze()
        assert ref() is None
    finally:
        await policy.stop()


async def test_frozen_garbage_is_reclaimed_after_stop():
    """The documented price: what was frozen alive and dies in a cycle waits for stop."""
    policy = GcPolicy(lambda: False)
    node = _Node()
    ref = weakref.ref(node)
    policy.freeze()
    del node
    gc.collect()
    assert ref() is not None
    await policy.stop()
    gc.collect()
    assert ref() is None


async def test_daemon_freezes_its_heap_until_it_stops(make_config, login_account, wait_until):
    config = make_config([{"name": "alice", "phone": phone_for("alice")},
                          {"name": "bob", "phone": phone_for("bob")}],  # bob: never logged in
                         daemon={"http_listen": ""})
    await login_account(config, "alice")
    async with Daemon(config) as daemon:
        assert gc.get_freeze_count() > 0
        await daemon.client("alice", timeout=30)
        await wait_until(lambda: daemon.gc.settled, 10, "start phase over")
        assert daemon.board.counts()[State.CONNECTED] == 1
        assert daemon.board.counts()[State.NEEDS_LOGIN] == 1
    assert gc.get_freeze_count() == 0
