"""gc.freeze() on the fleet's schedule (tgdaemon.gcpolicy): after a young collection every
tick while a wave of accounts (re)connects and now and then between waves, after a full one of
the unfrozen as a wave ends; no automatic full collection meanwhile; a reclaim of the frozen
heap once it has grown by a tenth; stop hands everything back to the collector. And a steady
fleet leaves no cyclic garbage of its own in the frozen heap (tgdaemon.cycles)."""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import types
import weakref
from collections import Counter

import pytest
from prometheus_client.registry import CollectorRegistry
from telethon.sessions import MemorySession

from tests.conftest import phone_for
from tgdaemon.daemon import Daemon
from tgdaemon.gcpolicy import (
    NO_AUTOMATIC_FULL,
    YOUNG_THRESHOLD,
    GcPolicy,
    Step,
    next_step,
    reclaim_threshold,
)
from tgdaemon.localdc.faults import Fault
from tgdaemon.status import State
from tgdaemon.telegram import TELETHON_LOGGER, client_class
from tgdaemon.updates import guard_unknown_objects


class _Node:
    """Garbage only the cycle collector can free (it refers to itself)."""

    def __init__(self) -> None:
        self.me = self


@pytest.mark.parametrize(("in_wave", "connecting", "accounts", "since", "expected"), [
    (False, 0, 10_000, 1.0, (Step.NOTHING, False)),  # idle, frozen a second ago
    (False, 0, 10_000, 10.0, (Step.YOUNG_FREEZE, False)),  # idle: every idle interval
    (False, 99, 10_000, 2.0, (Step.NOTHING, False)),  # a few reconnecting: no wave
    (False, 100, 10_000, 1.0, (Step.YOUNG_FREEZE, True)),  # 1 %: a wave (an outage's)
    (True, 5_000, 10_000, 0.5, (Step.YOUNG_FREEZE, True)),  # freezes every tick
    (True, 99, 10_000, 1.0, (Step.SWEEP, False)),  # the tick that finds it over sweeps
    (False, 1, 1, 1.0, (Step.YOUNG_FREEZE, True)),  # one account: a one-account daemon's wave
    (True, 0, 0, 1.0, (Step.SWEEP, False)),  # no accounts at all
])
def test_what_a_tick_does(in_wave, connecting, accounts, since, expected):
    assert next_step(in_wave=in_wave, connecting=connecting, accounts=accounts,
                     since_freeze=since, idle_interval=10.0) == expected


@pytest.mark.parametrize(("in_wave", "connecting", "since_check", "expected"), [
    (False, 0, 600.0, (Step.CHECK, False)),  # between waves, every check interval
    (False, 0, 599.0, (Step.NOTHING, False)),  # the last one too recent
    (False, 0, None, (Step.NOTHING, False)),  # the start is not over
    (False, 99, 600.0, (Step.CHECK, False)),  # a few reconnecting: no wave
    (False, 100, 600.0, (Step.YOUNG_FREEZE, True)),  # never in a wave
    (True, 0, 600.0, (Step.SWEEP, False)),  # its end sweeps; the next tick checks
])
def test_when_a_tick_checks_the_frozen_heap(in_wave, connecting, since_check, expected):
    assert next_step(in_wave=in_wave, connecting=connecting, accounts=10_000,
                     since_freeze=0.5, idle_interval=10.0, since_check=since_check,
                     check_interval=600.0) == expected


def test_a_check_reclaims_once_the_frozen_heap_has_grown_by_a_tenth():
    assert reclaim_threshold(1_000_000) == 1_100_000
    assert reclaim_threshold(7) == 8


async def test_freezes_while_connecting_until_none_is(wait_until):
    connecting = True
    policy = GcPolicy(lambda: (int(connecting), 1), interval=0.01, idle_interval=3600)
    other = GcPolicy(lambda: (0, 1), interval=3600)  # a second daemon in the process
    assert gc.get_freeze_count() == 0
    thresholds = gc.get_threshold()
    policy.start()
    try:
        assert gc.get_freeze_count() > 0  # at once: what exists now is long-lived
        assert gc.get_threshold()[2] == NO_AUTOMATIC_FULL  # the sweeps are the full ones
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD  # the ticks are the young ones
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
        # An outage's reconnect wave: frozen again while it lasts and once as it ends.
        later = _Node()
        await asyncio.sleep(0.05)
        assert policy.freezes == before + 1  # nothing frozen between waves
        connecting = True
        await wait_until(lambda: policy.freezes >= before + 3, 5, "freezes in the next wave")
        connecting = False
        await wait_until(lambda: policy.waves == 2, 5, "second wave over")
        assert not any(o is later for o in gc.get_objects())
        other.start()
        await policy.stop()
        assert gc.get_threshold()[2] == NO_AUTOMATIC_FULL  # still off while one runs
    finally:
        await policy.stop()
        await other.stop()
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == thresholds


async def test_between_waves_a_full_collection_walks_only_recent_survivors(wait_until):
    """What outlives the young collections between waves (at 10,000 accounts: 0.4 s full
    collections in the idle window) is frozen out of the collector's sight too."""
    policy = GcPolicy(lambda: (0, 1_000), interval=0.01, idle_interval=0.05)
    policy.start()
    try:
        await wait_until(lambda: policy.settled, 5, "start phase over")
        kept = [[] for _ in range(100_000)]  # long-lived, born between waves
        frozen = policy.freezes
        await wait_until(lambda: policy.freezes > frozen, 5, "a freeze between waves")
        walked = sum(len(gc.get_objects(generation)) for generation in range(3))
        assert walked < len(kept) // 10, walked
    finally:
        await policy.stop()


def _collections_while_allocating(kept: list[object], count: int) -> int:
    """Collections (any generation) while ``count`` long-lived objects are born."""
    runs: list[int] = []

    def seen(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            runs.append(info["generation"])

    gc.callbacks.append(seen)
    try:
        kept.extend([] for _ in range(count))
    finally:
        gc.callbacks.remove(seen)
    return len(runs)


async def test_survivors_are_walked_on_the_ticks_not_every_700_allocations():
    """A fleet's allocations mostly live on: CPython's collector walked each survivor in a
    young and a middle collection (at 10,000 accounts, 6.3 s of an outage's 32.6 s reconnect
    wave, collecting nothing); under the policy the tick's young freeze walks it once."""
    kept: list[object] = []
    without = _collections_while_allocating(kept, 5_000)
    assert without >= 5  # the contrast: CPython's thresholds (700) walk them on the way
    policy = GcPolicy(lambda: (1, 1), interval=3600)  # a wave; no tick during the test
    policy.start()
    try:
        during = _collections_while_allocating(kept, 5_000)
        assert during == 0
        policy.freeze(full=False)  # what a tick does: one walk, then out of sight
        assert not any(o is kept[-1] for o in gc.get_objects())
    finally:
        await policy.stop()


async def test_garbage_is_collected_rather_than_frozen():
    policy = GcPolicy(lambda: (0, 1))
    old = _Node()
    gc.collect(1)  # survived the young collections: in the old generation now
    young = _Node()
    refs = [weakref.ref(old), weakref.ref(young)]
    del old, young
    try:
        policy.freeze()
        assert [r() for r in refs] == [None, None]
    finally:
        await policy.stop()


async def test_frozen_garbage_is_reclaimed_after_stop():
    """The documented price: what was frozen alive and dies in a cycle waits for stop."""
    policy = GcPolicy(lambda: (0, 1))
    node = _Node()
    ref = weakref.ref(node)
    policy.freeze()
    del node
    gc.collect()
    assert ref() is not None
    await policy.stop()
    gc.collect()
    assert ref() is None


async def test_frozen_cyclic_garbage_is_reclaimed_between_waves(wait_until):
    """The safety net: whatever dies in a cycle after it was frozen (here a deliberate one)
    is freed once it has grown the frozen heap by a tenth, without waiting for a stop."""
    registry = CollectorRegistry()
    policy = GcPolicy(lambda: (0, 1), interval=0.01, idle_interval=0.05, check_interval=0,
                      registry=registry)
    policy.start()
    try:
        await wait_until(lambda: policy.settled, 5, "start phase over")
        assert not policy.check()  # not grown by a tenth: counted, no reclaim
        assert policy.reclaims == 0
        nodes = [_Node() for _ in range(sys.getallocatedblocks() // 5)]  # a fifth more
        refs = [weakref.ref(nodes[0]), weakref.ref(nodes[-1])]
        policy.freeze()  # alive: frozen
        del nodes  # dead in their cycles, out of the collector's sight
        await wait_until(lambda: all(r() is None for r in refs), 10, "frozen garbage freed")
        assert policy.reclaims >= 1
        assert policy.reclaimed >= 2
        assert registry.get_sample_value("tgdaemon_gc_reclaims_total") == policy.reclaims
        assert registry.get_sample_value("tgdaemon_gc_reclaimed_objects_total") \
            == policy.reclaimed
        assert registry.get_sample_value("tgdaemon_gc_heap_blocks") == policy.blocks > 0
    finally:
        await policy.stop()


def _frozen_garbage_of_ours() -> Counter[str]:
    """The cyclic garbage the freezes hid, by code location: the frames of the daemon's code
    and of Telethon's (the in-process local DC's left out) among what an unfreeze and a full
    collection find. Everything found is freed, the rest frozen again; synchronous, so the
    policy's ticks do not interleave."""
    gc.unfreeze()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
    finally:
        gc.set_debug(0)
    garbage, gc.garbage[:] = list(gc.garbage), []
    ours: Counter[str] = Counter()
    for o in garbage:
        if type(o) is types.FrameType:  # not isinstance: a dead weak proxy raises on it
            path = o.f_code.co_filename
            if ("/tgdaemon/" in path and "/localdc/" not in path) or "/telethon/" in path:
                ours[f"{os.path.basename(path)}:{o.f_code.co_name}"] += 1
    del garbage, o
    gc.collect()
    gc.freeze()
    return ours


async def test_a_steady_fleet_leaves_no_cyclic_garbage_in_the_frozen_heap(
        make_config, seed_accounts, localdc, wait_until):
    """Dropped connections, a FLOOD_WAIT and an outage, each recovered from: the failures'
    errors and tracebacks are freed, not left as cycles the freezes keep (before
    tgdaemon.cycles: ~13 objects per event, ~110,000 per outage at 10,000 accounts)."""
    names = ["gc0", "gc1", "gc2"]
    config = make_config([{"name": n, "phone": phone_for(n)} for n in names],
                         daemon={"http_listen": ""}, policy={"heartbeat_interval": 0.3})
    await seed_accounts(config)
    ids = {n: localdc.store.get_or_create_user(phone_for(n), 1).id for n in names}  # seeded

    def connected() -> bool:
        return daemon.board.counts()[State.CONNECTED] == len(names)

    def reconnects() -> float:
        return daemon.registry.get_sample_value("tgdaemon_reconnects_total") or 0.0

    async with Daemon(config) as daemon:
        await wait_until(lambda: connected() and daemon.gc.settled, 20, "all connected")
        _frozen_garbage_of_ours()  # the start's, if any: not what this test is about
        for i in range(3):  # one account's connection dropped: a wave of one
            before = reconnects()
            localdc.drop_connections(user_id=ids["gc0"])
            await wait_until(lambda b=before: reconnects() > b and connected(), 20,
                             f"reconnected after drop {i}")
        fault = localdc.inject(Fault("rpc_error", user_id=ids["gc1"], method="updates.getState",
                                     error="FLOOD_WAIT_1", times=1))
        await wait_until(lambda: daemon.board.get("gc1").state is State.FLOOD_WAIT, 20,
                         "flood wait")
        await wait_until(connected, 20, "back after the flood wait")
        localdc.clear(fault)
        before = reconnects()
        localdc.drop_connections()  # the whole fleet
        await wait_until(lambda: reconnects() >= before + len(names) and connected(), 20,
                         "reconnected after the outage")
        assert _frozen_garbage_of_ours() == Counter()


def test_the_unknown_object_guard_and_its_state_are_no_cycle():
    """The guard wraps the decrypt of the client's MTProtoState: a replaced client's state
    (auth key and all) must be freed by reference counting, not left as a cycle."""
    client = client_class(keepalive_ping=False)(MemorySession(), 1, "0123456789abcdef" * 2,
                                                base_logger=TELETHON_LOGGER)
    guard_unknown_objects(client, lambda _constructor_id: None)
    ref = weakref.ref(client._sender._state)
    gc.disable()
    try:
        client._sender._state = client._sender._send_queue._state = None  # its two holders
        assert ref() is None
    finally:
        gc.enable()


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
