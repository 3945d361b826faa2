"""Pure pieces of localdc: fault matching, method names, transports, isolation helpers."""

from __future__ import annotations

import pytest
from telethon import TelegramClient
from telethon.crypto import rsa
from telethon.network import ConnectionTcpAbridged, ConnectionTcpIntermediate
from telethon.tl import functions

from tgdaemon.localdc import Fault
from tgdaemon.localdc.crypto import ServerRsaKey, SrpVerifier
from tgdaemon.localdc.faults import FaultBook, Scope, error_code_for, flood_wait_seconds
from tgdaemon.localdc.rpc import names_for_class
from tgdaemon.localdc.store import AuthKeyRecord, UserRecord
from tgdaemon.localdc.testing import login, telethon_isolation, trust_localdc

GET_USERS = names_for_class(functions.users.GetUsersRequest)
PING = names_for_class(functions.PingRequest)


def test_method_names():
    assert (GET_USERS.tl, GET_USERS.cls, GET_USERS.qualified) == (
        "users.getUsers", "GetUsersRequest", "users.GetUsersRequest")
    assert names_for_class(functions.PingDelayDisconnectRequest).tl == "ping_delay_disconnect"
    assert names_for_class(functions.ReqDHParamsRequest).tl == "req_DH_params"
    assert PING.tl == "ping"


@pytest.mark.parametrize(
    ("pattern", "users", "ping"),
    [("*", True, False), (None, True, True), ("users.getUsers", True, False),
     ("GetUsersRequest", True, False), ("users.GetUsersRequest", True, False),
     ("PingRequest", False, True), ("users.getFullUser", False, False)],
)
def test_method_matching(pattern, users, ping):
    assert GET_USERS.matches(pattern) is users
    assert PING.matches(pattern) is ping


def test_fault_book_times_scope_and_clear():
    book = FaultBook()
    once = book.add(Fault("rpc_error", error="FLOOD_WAIT_3", times=2, user_id=7))
    assert book.match("rpc_error", Scope(1, user_id=8), GET_USERS) is None
    assert book.match("rpc_error", Scope(1, user_id=7), GET_USERS) is not None
    assert book.match("rpc_error", Scope(1, user_id=7), GET_USERS, consume=False) is not None
    assert book.match("rpc_error", Scope(1, user_id=7), GET_USERS) is not None
    assert book.match("rpc_error", Scope(1, user_id=7), GET_USERS) is None  # used up
    assert once not in book.active()
    forever = book.add(Fault("stall", dc_id=2, method=None))
    for _ in range(5):
        assert book.match("stall", Scope(2), PING) is not None
    assert book.match("stall", Scope(1), PING) is None
    assert book.clear(forever) == 1
    assert book.clear() == 0


def test_fault_validation_and_json_round_trip():
    with pytest.raises(ValueError, match="kind"):
        Fault("explode")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="error"):
        Fault("rpc_error")
    with pytest.raises(ValueError, match="times"):
        Fault("stall", times=0)
    f = Fault("rpc_error", error="USER_MIGRATE_2", dc_id=1, times=1)
    assert Fault.from_json(f.to_json()) == f
    assert f.error_code == 303
    with pytest.raises(ValueError, match="unknown"):
        Fault.from_json({"kind": "stall", "bogus": 1})


@pytest.mark.parametrize(
    ("message", "code"),
    [("FLOOD_WAIT_5", 420), ("USER_MIGRATE_3", 303), ("AUTH_KEY_UNREGISTERED", 401),
     ("SESSION_REVOKED", 401), ("USER_DEACTIVATED_BAN", 401), ("AUTH_KEY_DUPLICATED", 406),
     ("RPC_CALL_FAIL", 500), ("INTERNAL", 500), ("PEER_ID_INVALID", 400)],
)
def test_error_codes(message, code):
    assert error_code_for(message) == code


def test_reprs_hold_no_secrets():
    rec = AuthKeyRecord(key_id=1, dc_id=1, key=b"\xaa" * 256, user_id=5)
    assert "\\xaa" not in repr(rec)
    assert "key=" not in repr(rec)
    user = UserRecord(5, "99966123456", "x", 1, 1, 1)
    assert "99966123456" not in repr(user)
    assert "<redacted>" in repr(SrpVerifier(b"s", b"t", b"v"))


def test_telethon_isolation_restores_rsa_keys_and_config():
    key = ServerRsaKey.generate()
    before = dict(rsa._server_keys)
    with telethon_isolation():
        TelegramClient._config = object()  # type: ignore[assignment]
        fp = trust_localdc(key.public_pem)
        assert trust_localdc(key.public_pem) == fp == key.fingerprint  # idempotent
        assert fp in rsa._server_keys
    assert rsa._server_keys == before
    assert TelegramClient._config is None


@pytest.mark.parametrize("connection", [ConnectionTcpAbridged, ConnectionTcpIntermediate])
async def test_other_transports(localdc, clients, phone, connection):
    client = clients(localdc, connection=connection)
    user = await login(client, localdc, phone)
    assert (await client.get_me()).id == user.id


@pytest.mark.parametrize(
    ("message", "seconds"),
    [("FLOOD_WAIT_30", 30), ("FLOOD_PREMIUM_WAIT_5", 5), ("SLOWMODE_WAIT_9", 0),
     ("FLOOD_WAIT_X", 0), ("USER_MIGRATE_3", 0)],
)
def test_flood_wait_seconds(message, seconds):
    assert flood_wait_seconds(message) == seconds
