"""What a real Telegram server (or an independently written one) may do that localdc does
not by default, against the daemon's own client: Telethon's sender and connection as the
daemon bends them (acks in the request's container, the connection read by the sender's
loops, initConnection carrying users.getUsers, the server's deadline sent first).

Each behaviour is a localdc fault kind (tgdaemon.localdc.faults): answers in containers with
acks and gzip-packed (core.telegram.org/mtproto/service_messages#packed-object,
#simple-container), bad_server_salt and new_session_created mid-session
(/mtproto/service_messages_about_messages, #new-session-creation-notification),
bad_msg_notification (#notice-of-ignored-error-message), transport errors
(/mtproto/mtproto-transports#transport-errors), updates while a request is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from telethon import errors as te
from telethon import functions, types
from telethon.tl.functions.updates import GetStateRequest

from tests.conftest import phone_for
from tgdaemon.connection import CappedMTProxyIntermediate, CappedMTProxyPadded, CappedTcpFull
from tgdaemon.crypto import load_keyring
from tgdaemon.daemon import Daemon
from tgdaemon.errors import classify
from tgdaemon.lifecycle import Category
from tgdaemon.localdc import transport
from tgdaemon.localdc.faults import Fault
from tgdaemon.session import StoreSession
from tgdaemon.status import State
from tgdaemon.store import Store
from tgdaemon.telegram import (
    ManagedClient,
    build_client,
    client_class,
    local_update_pts,
    shared_loggers,
    trust_server_keys,
)
from tgdaemon.updates import guard_unknown_objects

#: What Telethon raises for a transport error frame (-404: the key is unknown).
TRANSPORT_ERRORS = (te.AuthKeyNotFound, te.InvalidBufferError)
#: Generous: a loaded 2-core CI machine; a request the client failed to resend never ends.
ANSWER = 15.0


@contextlib.asynccontextmanager
async def _daemon_client(make_config, login_account) -> AsyncIterator[tuple[ManagedClient, int]]:
    """A logged-in account's client built as the worker builds it: the daemon's client
    class (no keep-alive ping) on the account's stored session (its update state loaded, so
    connect() makes no extra round trip)."""
    config = make_config([{"name": "alice", "phone": phone_for("alice")}])
    uid = await login_account(config, "alice")
    ring = load_keyring(key_file=config.daemon.master_key_file)
    async with await Store.open(config.daemon.state_dir, ring) as store:
        data = await store.load_session("alice")
        assert data is not None
        trust_server_keys(config)
        client = build_client(client_class(keepalive_ping=False),
                              StoreSession(store, "alice", data), config,
                              config.account("alice"))
        try:
            yield client, uid
        finally:
            await client.disconnect()


async def _call(client: ManagedClient, request: Any) -> Any:
    async with asyncio.timeout(ANSWER):
        return await client(request)


async def _connect(client: ManagedClient, uid: int) -> None:
    async with asyncio.timeout(ANSWER):
        await client.connect(validate=True)
    users = client.validated()
    assert users is not None
    assert users[0].id == uid


def _requests(localdc, uid: int, method: str) -> int:
    return int(localdc.counters(user_id=uid)["requests"].get(method, 0))


@pytest.fixture
async def alice(make_config, login_account):
    async with _daemon_client(make_config, login_account) as pair:
        yield pair


async def test_answers_in_containers_with_acks_and_gzip(alice, localdc, wait_until):
    """Telegram acknowledges a request in the container of its answer and gzips results
    and updates: the validating initConnection, heartbeats and pushed updates all work."""
    client, uid = alice
    for kind in ("bundle", "gzip"):
        localdc.inject(Fault(kind, user_id=uid))  # every request's answer, until cleared
    localdc.inject(Fault("gzip", user_id=uid, method=None))  # pushed updates too
    await _connect(client, uid)
    client.release_updates()
    for _ in range(3):
        state = await _call(client, GetStateRequest())
        assert isinstance(state, types.updates.State)
    before = local_update_pts(client) or 0
    localdc.push_update(uid, "gzip-packed update")
    await wait_until(lambda: (local_update_pts(client) or 0) > before, ANSWER, "update seen")
    assert client.is_connected()
    emulated = localdc.counters(user_id=uid)["emulated"]
    assert emulated["bundle"] >= 4, emulated  # the init and 3 heartbeats
    assert emulated["gzip"] >= 4, emulated
    assert emulated["gzip_update"] == 1, emulated


@pytest.mark.parametrize("kind", ["salt_change", "new_session"])
async def test_salt_change_or_new_session_mid_session(alice, localdc, wait_until, kind):
    """bad_server_salt rejects the container carrying a request and the previous answer's
    ack: the request is sent again with the new salt. new_session_created (a server that
    restarted) is taken in stride. Updates keep flowing after either."""
    client, uid = alice
    await _connect(client, uid)
    client.release_updates()
    await _call(client, GetStateRequest())  # its ack is pending: it rides with the next
    before = _requests(localdc, uid, "updates.getState")
    localdc.inject(Fault(kind, user_id=uid, times=1))
    assert isinstance(await _call(client, GetStateRequest()), types.updates.State)
    assert localdc.counters(user_id=uid)["emulated"] == {kind: 1}
    assert _requests(localdc, uid, "updates.getState") >= before + 1
    pts = local_update_pts(client) or 0
    localdc.push_update(uid, "after the " + kind)
    await wait_until(lambda: (local_update_pts(client) or 0) > pts, ANSWER, "update seen")


async def test_acks_in_a_rejected_container_are_sent_again(alice, localdc):
    """The daemon's acknowledgements always ride in a request's container, so a
    bad_server_salt (salts expire: every salt change) rejects them with the request. MTProto
    asks the client to acknowledge every content-related message: the acks go out again
    with the request, and the server is left holding only the latest answer."""
    client, uid = alice
    await _connect(client, uid)
    for _ in range(2):
        await _call(client, GetStateRequest())
    assert localdc.unacked(uid) == 1  # the last answer: its ack waits for the next request
    localdc.inject(Fault("salt_change", user_id=uid, times=1))
    for _ in range(2):
        await _call(client, GetStateRequest())
    assert localdc.counters(user_id=uid)["emulated"] == {"salt_change": 1}
    assert localdc.unacked(uid) == 1


async def test_new_session_mid_connection_fetches_what_the_lost_session_missed(
        alice, localdc, wait_until):
    """new_session_created in the middle of a connection means the server lost the session
    and with it the updates it was to push ("a gap in the stream of long poll notifications",
    core.telegram.org/mtproto/service_messages): the client fetches the difference then,
    not only when a later update or heartbeat happens to reveal the gap."""
    client, uid = alice
    await _connect(client, uid)
    first = _requests(localdc, uid, "updates.getDifference")
    client.release_updates()
    await wait_until(lambda: _requests(localdc, uid, "updates.getDifference") > first
                     and local_update_pts(client) is not None, ANSWER, "first catch-up")
    pts = local_update_pts(client) or 0
    muted = localdc.inject(Fault("mute_updates", user_id=uid))  # lost with the old session
    for i in range(2):
        localdc.push_update(uid, f"lost {i}")
    localdc.clear(muted)
    localdc.inject(Fault("new_session", user_id=uid, times=1))
    await _call(client, GetStateRequest())
    await wait_until(lambda: (local_update_pts(client) or 0) >= pts + 2, ANSWER, "caught up")


async def test_salt_change_on_the_first_packet_in_fleet_mode(alice, localdc):
    """Fleet mode sends ping_delay_disconnect first, in the same container as the validating
    initConnection: a stale salt rejects both, both are resent, the connect validates."""
    client, uid = alice
    client._sender.first_request = lambda: functions.PingDelayDisconnectRequest(
        ping_id=int(time.time() * 1e6), disconnect_delay=60)
    localdc.inject(Fault("salt_change", user_id=uid, times=1))
    await _connect(client, uid)
    assert localdc.counters(user_id=uid)["emulated"] == {"salt_change": 1}
    assert _requests(localdc, uid, "ping_delay_disconnect") >= 1


@pytest.mark.parametrize("code", [16, 17, 32, 33])
async def test_bad_msg_notification_the_request_is_resent(alice, localdc, code):
    """msg_id too low/high (16/17: the clock is corrected) or seqno too low/high (32/33):
    the client corrects itself and sends the request again."""
    client, uid = alice
    await _connect(client, uid)
    before = _requests(localdc, uid, "updates.getState")
    localdc.inject(Fault("bad_msg", user_id=uid, method="updates.getState", code=code,
                         times=1))
    assert isinstance(await _call(client, GetStateRequest()), types.updates.State)
    assert _requests(localdc, uid, "updates.getState") == before + 2
    assert localdc.counters(user_id=uid)["emulated"] == {"bad_msg": 1}


async def test_unrecoverable_bad_msg_notification_is_a_network_failure(alice, localdc):
    """Other codes (64: invalid container) fail the request: the worker reconnects."""
    client, uid = alice
    await _connect(client, uid)
    localdc.inject(Fault("bad_msg", user_id=uid, method="updates.getState", code=64,
                         times=1))
    with pytest.raises(te.BadMessageError) as info:
        await _call(client, GetStateRequest())
    assert classify(info.value).category is Category.NETWORK


async def test_update_while_a_request_is_in_flight(alice, localdc, wait_until):
    """Updates arrive between a request and its answer: both are delivered."""
    client, uid = alice
    await _connect(client, uid)
    client.release_updates()
    pts = local_update_pts(client) or 0
    localdc.inject(Fault("latency", user_id=uid, method="updates.getState", seconds=1.0,
                         times=1))
    call = asyncio.ensure_future(_call(client, GetStateRequest()))
    await wait_until(lambda: localdc.faults.active() == {}, ANSWER, "request at the server")
    localdc.push_update(uid, "while the request waits")
    await wait_until(lambda: (local_update_pts(client) or 0) > pts, ANSWER, "update seen")
    assert not call.done()  # the update came first
    assert isinstance(await call, types.updates.State)


@pytest.mark.parametrize(("error", "code", "category"), [
    ("RPC_CALL_FAIL", 500, Category.SERVER),
    ("Timeout", -503, Category.SERVER),
    ("FLOOD_WAIT_5", 420, Category.FLOOD_WAIT),
])
async def test_rpc_error_answering_the_validating_init(alice, localdc, error, code, category):
    """The initConnection that opens a connection carries users.getUsers([self]); an
    rpc_error answered to it leaves the connection up and initialised (Telethon's connect
    completes, its update loop runs) and reaches the worker from ``validated()``."""
    client, uid = alice
    localdc.inject(Fault("rpc_error", user_id=uid, method="users.getUsers", error=error,
                         code=code, times=1))
    before = _requests(localdc, uid, "users.getUsers")
    async with asyncio.timeout(ANSWER):
        await client.connect(validate=True)
    assert _requests(localdc, uid, "users.getUsers") == before + 1  # no second try inside
    with pytest.raises(te.RPCError) as info:
        client.validated()
    assert classify(info.value).category is category
    assert client.is_connected()
    assert client._updates_handle is not None  # connect() ran to its end
    # The connection serves requests (another method: a flood wait is per method).
    assert isinstance(await _call(client, GetStateRequest()), types.updates.State)


@pytest.mark.parametrize(("code", "category", "expected"), [
    (404, Category.AUTH, "AUTH_KEY_NOT_FOUND"),
    (429, Category.NETWORK, "TRANSPORT_FLOOD"),
    (444, Category.NETWORK, "INVALID_BUFFER"),
])
async def test_transport_error_mid_session(alice, localdc, code, category, expected):
    """A transport error frame (a 4-byte negative payload), then the server hangs up: the
    request in flight fails with it, classified by the error, not as a bare disconnect."""
    client, uid = alice
    await _connect(client, uid)
    localdc.inject(Fault("transport_error", user_id=uid, code=code, times=1))
    with pytest.raises(TRANSPORT_ERRORS) as info:
        await _call(client, GetStateRequest())
    c = classify(info.value)
    assert (c.category, c.code) == (category, expected), c


@pytest.mark.parametrize(("code", "category", "expected"), [
    (404, Category.AUTH, "AUTH_KEY_NOT_FOUND"),
    (429, Category.NETWORK, "TRANSPORT_FLOOD"),
])
async def test_transport_error_answering_the_connect(alice, localdc, code, category,
                                                     expected):
    """The first packet of a connection (the validating initConnection) is answered with a
    transport error: connect() fails with it (not a cancellation, not a hang), and the next
    connect works."""
    client, uid = alice
    localdc.inject(Fault("transport_error", user_id=uid, code=code, times=1))
    with pytest.raises(TRANSPORT_ERRORS) as info:
        async with asyncio.timeout(ANSWER):
            await client.connect(validate=True)
    c = classify(info.value)
    assert (c.category, c.code) == (category, expected), c
    await client.disconnect()
    await _connect(client, uid)


# --------------------------------------------------------------------------- split reads

_SECRET = bytes(range(16))


def _connection(cls: type, proxy: Any = None) -> Any:
    """A daemon connection class reading from a stream this test feeds (no socket: the
    bytes arrive exactly as fed)."""
    conn = cls("127.0.0.1", 443, 2, loggers=shared_loggers(None), proxy=proxy)
    conn._reader = asyncio.StreamReader()
    conn._codec = conn.packet_codec(conn)
    conn._connected = True
    return conn


async def _server_codec(conn: Any) -> Any:
    """The server's side of the connection's transport (localdc's, written separately)."""
    if conn._obfuscation is None:
        return transport.FullCodec(b"")
    head = asyncio.StreamReader()
    head.feed_data(conn._obfuscation.header)
    _dc, codec = await transport.accept_obfuscated(head, _SECRET)
    return codec


@pytest.mark.parametrize("kind", ["full", "mtproxy-padded", "mtproxy-intermediate"])
async def test_frames_split_at_every_byte_boundary(kind):
    """TCP may deliver a frame in any pieces: the connection (read by the sender's own loop,
    :class:`tgdaemon.connection._DirectIO`) returns each whole frame only once its last byte
    is in, and the next frame intact, when the bytes come one at a time."""
    if kind == "full":
        conn = _connection(CappedTcpFull)
    else:
        cls = CappedMTProxyPadded if kind == "mtproxy-padded" else CappedMTProxyIntermediate
        conn = _connection(cls, ("127.0.0.1", 443, "dd" + _SECRET.hex()))
        conn._obfuscation = conn.obfuscated_io(conn)
    server = await _server_codec(conn)
    payloads = [bytes(range(256)) * 3 + b"\x01" * 4, b"\x02" * 16]
    for payload in payloads:
        frame = server.encode(payload)
        recv = asyncio.ensure_future(conn.recv())
        for i, byte in enumerate(frame):
            conn._reader.feed_data(bytes([byte]))
            await asyncio.sleep(0)  # the reading task runs before this one resumes
            if i < len(frame) - 1:
                assert not recv.done(), f"{kind}: a frame returned after {i + 1} bytes"
        async with asyncio.timeout(ANSWER):
            assert await recv == payload


# --------------------------------------------------------------------------- the daemon


async def test_connection_not_inited_reconnects_with_a_fresh_init(make_config, login_account,
                                                                   localdc, wait_until):
    """A server that lost the connection's initConnection (a session it restarted; an
    independent server that keeps it per session) answers 400 CONNECTION_NOT_INITED. That is
    no bug of the request: a new connection, which sends initConnection first, cures it. The
    account must come back, not be stopped as a client error."""
    config = make_config([{"name": "alice", "phone": phone_for("alice")}],
                         daemon={"http_listen": ""})
    uid = await login_account(config, "alice")

    def state() -> State | None:
        status = daemon.board.get("alice")
        return None if status is None else status.state

    async with Daemon(config) as daemon:
        await wait_until(lambda: state() is State.CONNECTED, ANSWER, "connected")
        connections = localdc.counters(user_id=uid)["connections"]
        localdc.inject(Fault("rpc_error", user_id=uid, method="updates.getState",
                             error="CONNECTION_NOT_INITED", code=400, times=1))
        await wait_until(lambda: localdc.counters(user_id=uid)["connections"] > connections,
                         ANSWER, "a new connection")
        await wait_until(lambda: state() is State.CONNECTED, ANSWER, "connected again")
        # alice is the fleet: errors are counted once for it (metrics_counters = "fleet").
        errors = daemon.registry.get_sample_value("tgdaemon_errors_total", {"category": "server"})
        assert errors == 1  # retried as a server-side condition, not stopped as a client bug


@pytest.mark.parametrize("skew", [60, -400])
async def test_host_clock_behind_or_ahead_of_the_server(alice, localdc, skew):
    """The host's clock is off from the server's beyond Telethon's window for server msg_ids
    (30 s ahead, 300 s behind), and a stored key means no key exchange to learn the server's
    time from. A new client starts with salt 0, so the server's first answer is a
    bad_server_salt, exempt from the window: Telethon takes the server's time from it, and
    the connection works."""
    client, uid = alice
    localdc.inject(Fault("clock_skew", seconds=skew))
    await _connect(client, uid)
    assert abs(client._sender._state.time_offset - skew) <= 2
    assert isinstance(await _call(client, GetStateRequest()), types.updates.State)


async def test_updates_too_long_fetches_the_difference(alice, localdc, wait_until):
    """Telegram sends updatesTooLong when there are too many updates to push: the client
    must fetch them with getDifference (nothing else tells it they exist)."""
    client, uid = alice
    await _connect(client, uid)
    first = _requests(localdc, uid, "updates.getDifference")
    client.release_updates()  # the update loop starts with a catch-up: let it finish
    await wait_until(lambda: _requests(localdc, uid, "updates.getDifference") > first
                     and local_update_pts(client) is not None, ANSWER, "first catch-up")
    pts = local_update_pts(client) or 0
    muted = localdc.inject(Fault("mute_updates", user_id=uid))
    for i in range(3):
        localdc.push_update(uid, f"not pushed {i}")
    localdc.clear(muted)
    diffs = _requests(localdc, uid, "updates.getDifference")
    localdc.push_raw(uid, bytes(types.UpdatesTooLong()))
    await wait_until(lambda: (local_update_pts(client) or 0) >= pts + 3, ANSWER, "caught up")
    assert _requests(localdc, uid, "updates.getDifference") > diffs


async def test_user_migrate_skips_options_not_for_api_calls(make_config, login_account,
                                                            localdc, wait_until):
    """A real help.getConfig also lists media-only, CDN, obfuscated-only and IPv6 options
    for a DC. Following a USER_MIGRATE, the account must land on an option for API calls
    (Telethon's own choice is the first option with the DC's id)."""
    localdc.world.config_decoys = True
    config = make_config([{"name": "alice", "phone": phone_for("alice")}],
                         daemon={"http_listen": ""})
    uid = await login_account(config, "alice")
    async with Daemon(config) as daemon:
        await wait_until(lambda: (s := daemon.board.get("alice")) is not None
                         and s.state is State.CONNECTED, ANSWER, "connected")
        localdc.inject(Fault("rpc_error", user_id=uid, method="users.getUsers",
                             error="USER_MIGRATE_2", times=1))
        localdc.drop_connections(user_id=uid)
        await wait_until(lambda: (s := daemon.board.get("alice")) is not None
                         and s.dc_id == 2 and s.state is State.CONNECTED, ANSWER, "on DC 2")
        assert daemon.store is not None
        stored = await daemon.store.load_session("alice")
        assert stored is not None
        assert (stored.dc_id, stored.port) == (2, localdc.addresses[2][1])


async def test_difference_too_long_settles_and_keeps_heartbeating(make_config, login_account,
                                                                  localdc, wait_until, caplog):
    """More updates were missed than the server keeps: getDifference answers
    differenceTooLong with only the new pts. The account takes that state (reporting what
    was skipped), its heartbeats find no gap any more, and it stays on its connection
    instead of reconnecting over an "update stall"."""
    localdc.world.history.account._limit = 3  # the server keeps the last 3 account updates
    config = make_config([{"name": "alice", "phone": phone_for("alice")}],
                         daemon={"http_listen": ""}, policy={"heartbeat_interval": 0.3})
    uid = await login_account(config, "alice")
    async with Daemon(config) as daemon:
        await wait_until(lambda: (s := daemon.board.get("alice")) is not None
                         and s.state is State.CONNECTED, ANSWER, "connected")
        worker = daemon.supervisor.worker("alice") if daemon.supervisor else None
        assert worker is not None
        assert worker.client is not None
        client = worker.client
        await wait_until(lambda: local_update_pts(client) is not None, ANSWER, "state known")
        muted = localdc.inject(Fault("mute_updates", user_id=uid))
        for i in range(8):
            localdc.push_update(uid, f"missed {i}")
        localdc.clear(muted)
        server_pts = localdc.store.users[uid].pts
        await wait_until(lambda: local_update_pts(client) == server_pts, ANSWER, "settled")
        assert "difference too long" in caplog.text
        beats = _requests(localdc, uid, "updates.getState")
        await wait_until(lambda: _requests(localdc, uid, "updates.getState") >= beats + 4,
                         ANSWER, "four more heartbeats")
        assert worker.client is client
        assert client.is_connected()
        # alice is the fleet: reconnects are counted once for it (metrics_counters = "fleet").
        assert daemon.registry.get_sample_value("tgdaemon_reconnects_total") == 0


# --------------------------------------------------------------------------- unknown objects

SECRET_DIGITS = "99966123454321"


def _unknown_updates() -> bytes:
    """An ``updates`` whose one update has a constructor no layer knows, followed by digits
    standing for what must never reach a log (a phone number, message text)."""
    return (struct.pack("<IIi", 0x74AE4240, 0x1CB5C415, 1)
            + struct.pack("<I", 0x0DDBA11) + SECRET_DIGITS.encode() + b"\x00" * 16)


async def test_unknown_object_in_a_gzip_packed_message_is_skipped_quietly(
        alice, localdc, wait_until, caplog):
    """Telegram gzips larger messages. An object this Telethon cannot parse inside a
    gzip_packed one is skipped and reported by constructor id only, as at the top level:
    Telethon would log an ERROR with a traceback and the raw remainder (secrets)."""
    client, uid = alice
    seen: list[int] = []
    guard_unknown_objects(client, seen.append)
    await _connect(client, uid)
    localdc.inject(Fault("gzip", user_id=uid, method=None))
    localdc.push_raw(uid, _unknown_updates())
    await wait_until(lambda: seen == [0x0DDBA11], ANSWER, "skipped and reported")
    assert isinstance(await _call(client, GetStateRequest()), types.updates.State)
    assert localdc.counters(user_id=uid)["emulated"]["gzip_update"] == 1
    assert SECRET_DIGITS not in caplog.text
    assert "Traceback" not in caplog.text


async def test_unknown_object_in_a_container_costs_only_itself(alice, localdc, wait_until,
                                                               caplog):
    """Telegram packs several messages in one container (an answer, updates). One object
    this Telethon cannot parse made it drop the whole container: the answer with it (the
    request then hangs until its timeout) and the updates (fetched again only once a gap
    shows). Only the unknown message is skipped; the others are handled at once."""
    client, uid = alice
    seen: list[int] = []
    guard_unknown_objects(client, seen.append)
    await _connect(client, uid)
    first = _requests(localdc, uid, "updates.getDifference")
    client.release_updates()
    await wait_until(lambda: _requests(localdc, uid, "updates.getDifference") > first
                     and local_update_pts(client) is not None, ANSWER, "first catch-up")
    diffs = _requests(localdc, uid, "updates.getDifference")
    muted = localdc.inject(Fault("mute_updates", user_id=uid))
    localdc.push_update(uid, "travels with an unknown object")  # recorded, not delivered
    localdc.clear(muted)
    update = localdc.world.history.account.entries(uid)[-1]
    known = bytes(types.Updates(updates=[update], users=[], chats=[], date=update.message.date,
                                seq=0))
    now = int(time.time()) << 32
    container = struct.pack("<Ii", 0x73F1F8DC, 2) + b"".join(
        struct.pack("<qii", now + 4 * i + 1, 2 * i + 1, len(body)) + body
        for i, body in enumerate((_unknown_updates(), known)))
    localdc.push_raw(uid, container)
    await wait_until(lambda: local_update_pts(client) == update.pts, ANSWER, "update handled")
    assert seen == [0x0DDBA11]
    assert _requests(localdc, uid, "updates.getDifference") == diffs  # not fetched again
    assert SECRET_DIGITS not in caplog.text
