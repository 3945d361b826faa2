"""classify(): table tests over real Telethon 1.45 exception objects."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest
from telethon import errors as te
from telethon.tl.functions.auth import ImportAuthorizationRequest
from telethon.tl.functions.users import GetUsersRequest
from telethon.tl.types import RpcError

from tgdaemon.errors import Category, Classified, classify
from tgdaemon.redact import redact
from tgdaemon.telegram import switch_failure

REQUEST = GetUsersRequest([])


def rpc(code: int, message: str) -> te.RPCError:
    """Exactly what Telethon's sender raises for an rpc_error from the server."""
    return te.rpc_message_to_error(RpcError(error_code=code, error_message=message), REQUEST)


# (error_code, error_message) -> (expected Telethon type, category, code, extra fields)
RPC_TABLE = [
    (400, "CONNECTION_NOT_INITED", te.ConnectionNotInitedError, Category.SERVER,
     "CONNECTION_NOT_INITED", {}),
    (400, "CONNECTION_LAYER_INVALID", te.ConnectionLayerInvalidError, Category.CLIENT,
     "CONNECTION_LAYER_INVALID", {}),
    (420, "FLOOD_WAIT_30", te.FloodWaitError, Category.FLOOD_WAIT, "FLOOD_WAIT",
     {"wait_seconds": 30}),
    (420, "FLOOD_PREMIUM_WAIT_7", te.FloodPremiumWaitError, Category.FLOOD_WAIT,
     "FLOOD_PREMIUM_WAIT", {"wait_seconds": 7}),
    (420, "SLOWMODE_WAIT_120", te.SlowModeWaitError, Category.FLOOD_WAIT, "SLOWMODE_WAIT",
     {"wait_seconds": 120}),
    (420, "FLOOD_WAIT_0", te.FloodWaitError, Category.FLOOD_WAIT, "FLOOD_WAIT",
     {"wait_seconds": 0}),
    (401, "AUTH_KEY_UNREGISTERED", te.AuthKeyUnregisteredError, Category.AUTH,
     "AUTH_KEY_UNREGISTERED", {"park_state": "needs_login"}),
    (401, "SESSION_REVOKED", te.SessionRevokedError, Category.AUTH, "SESSION_REVOKED",
     {"park_state": "needs_login"}),
    (401, "SESSION_EXPIRED", te.SessionExpiredError, Category.AUTH, "SESSION_EXPIRED",
     {"park_state": "needs_login"}),
    (401, "USER_DEACTIVATED", te.UserDeactivatedError, Category.AUTH, "USER_DEACTIVATED",
     {"park_state": "banned"}),
    (401, "USER_DEACTIVATED_BAN", te.UserDeactivatedBanError, Category.AUTH,
     "USER_DEACTIVATED_BAN", {"park_state": "banned"}),
    (400, "PHONE_NUMBER_BANNED", te.PhoneNumberBannedError, Category.AUTH,
     "PHONE_NUMBER_BANNED", {"park_state": "banned"}),
    (406, "AUTH_KEY_DUPLICATED", te.AuthKeyDuplicatedError, Category.AUTH,
     "AUTH_KEY_DUPLICATED", {"park_state": "duplicated"}),
    (401, "SOME_NEW_401", te.UnauthorizedError, Category.AUTH, "SOME_NEW_X",
     {"park_state": "needs_login"}),
    (500, "RPC_CALL_FAIL", te.RpcCallFailError, Category.SERVER, "RPC_CALL_FAIL", {}),
    (500, "INTERNAL_SERVER_ERROR", te.ServerError, Category.SERVER, "INTERNAL_SERVER_ERROR", {}),
    (-500, "No workers running", te.ServerError, Category.SERVER, "NO_WORKERS_RUNNING", {}),
    (-503, "Timeout", te.TimeoutError, Category.SERVER, "TIMEOUT", {}),
    (-503, "WORKER_SLOW", te.TimedOutError, Category.SERVER, "WORKER_SLOW", {}),
    (303, "USER_MIGRATE_2", te.UserMigrateError, Category.MIGRATE, "USER_MIGRATE",
     {"new_dc": 2}),
    (303, "PHONE_MIGRATE_4", te.PhoneMigrateError, Category.MIGRATE, "PHONE_MIGRATE",
     {"new_dc": 4}),
    (303, "NETWORK_MIGRATE_5", te.NetworkMigrateError, Category.MIGRATE, "NETWORK_MIGRATE",
     {"new_dc": 5}),
    (303, "FILE_MIGRATE_3", te.FileMigrateError, Category.MIGRATE, "FILE_MIGRATE",
     {"new_dc": 3}),
    (303, "SEE_OTHER", te.InvalidDCError, Category.UNKNOWN, "SEE_OTHER", {}),
    (400, "PEER_ID_INVALID", te.PeerIdInvalidError, Category.CLIENT, "PEER_ID_INVALID", {}),
    (400, "BRAND_NEW_ERROR", te.BadRequestError, Category.CLIENT, "BRAND_NEW_ERROR", {}),
    (403, "CHAT_WRITE_FORBIDDEN", te.ChatWriteForbiddenError, Category.CLIENT,
     "CHAT_WRITE_FORBIDDEN", {}),
    (400, "PEER_FLOOD", te.PeerFloodError, Category.CLIENT, "PEER_FLOOD", {}),
    (999, "ODD", te.RPCError, Category.UNKNOWN, "ODD", {}),
]


@pytest.mark.parametrize(
    ("code", "message", "telethon_type", "category", "reason", "extra"),
    RPC_TABLE,
    ids=[row[1] for row in RPC_TABLE],
)
def test_rpc_errors(code: int, message: str, telethon_type: type, category: Category,
                    reason: str, extra: dict[str, object]) -> None:
    exc = rpc(code, message)
    assert type(exc) is telethon_type  # the table really exercises Telethon's own mapping
    c = classify(exc)
    assert (c.category, c.code) == (category, reason)
    expected = {"wait_seconds": None, "new_dc": None, "park_state": None, **extra}
    assert {k: getattr(c, k) for k in expected} == expected
    assert c.message.startswith(reason)


def test_flood_message_keeps_seconds_and_request_name() -> None:
    c = classify(rpc(420, "FLOOD_WAIT_86400"))
    assert c.wait_seconds == 86400
    assert c.message == "FLOOD_WAIT: wait of 86400 s required (caused by GetUsersRequest)"


IMPORT = ImportAuthorizationRequest(id=1, bytes=b"x")
# What a DC switch that failed on the import raises (telegram.switch_failure), classified:
# a flood wait stays one (waited exactly), anything else is retried on the network backoff.
SWITCH_TABLE: list[tuple[Exception, Category, str, int | None]] = [
    (te.rpc_message_to_error(RpcError(420, "FLOOD_WAIT_7"), IMPORT), Category.FLOOD_WAIT,
     "FLOOD_WAIT", 7),
    (te.rpc_message_to_error(RpcError(420, "FLOOD_PREMIUM_WAIT_3"), IMPORT),
     Category.FLOOD_WAIT, "FLOOD_PREMIUM_WAIT", 3),
    (te.rpc_message_to_error(RpcError(400, "AUTH_BYTES_INVALID"), IMPORT), Category.NETWORK,
     "MigrationFailedError", None),
    (te.rpc_message_to_error(RpcError(500, "INTERNAL"), IMPORT), Category.NETWORK,
     "MigrationFailedError", None),
    (ConnectionResetError(104, "reset"), Category.NETWORK, "MigrationFailedError", None),
    (TimeoutError(), Category.NETWORK, "MigrationFailedError", None),
]


@pytest.mark.parametrize(("cause", "category", "reason", "wait"), SWITCH_TABLE,
                         ids=[f"{type(r[0]).__name__}-{r[2]}" for r in SWITCH_TABLE])
def test_failed_dc_switch(cause: Exception, category: Category, reason: str,
                          wait: int | None) -> None:
    raised = switch_failure(cause, 2)
    assert (raised is cause) == (category is Category.FLOOD_WAIT)
    c = classify(raised)
    assert (c.category, c.code, c.wait_seconds) == (category, reason, wait)


def test_hand_built_base_error_resolves_by_message() -> None:
    c = classify(te.UnauthorizedError(request=None, message="AUTH_KEY_UNREGISTERED"))
    assert (c.category, c.code, c.park_state) == (
        Category.AUTH, "AUTH_KEY_UNREGISTERED", "needs_login")
    assert "NoneType" not in c.message


def _buffer(code: int) -> te.InvalidBufferError:
    return te.InvalidBufferError(struct.pack("<i", -code))


LOCAL_TABLE: list[tuple[BaseException, Category, str, str | None]] = [
    (te.AuthKeyNotFound(), Category.AUTH, "AUTH_KEY_NOT_FOUND", "needs_login"),
    (_buffer(404), Category.AUTH, "AUTH_KEY_NOT_FOUND", "needs_login"),
    (_buffer(429), Category.NETWORK, "TRANSPORT_FLOOD", None),
    (_buffer(444), Category.NETWORK, "INVALID_BUFFER", None),
    (te.InvalidBufferError(b"\x00" * 9), Category.NETWORK, "INVALID_BUFFER", None),
    (ConnectionError("Cannot send requests while disconnected"), Category.NETWORK,
     "ConnectionError", None),
    (ConnectionError("Connection to Telegram failed 5 time(s)"), Category.NETWORK,
     "ConnectionError", None),
    (ConnectionResetError(104, "Connection reset by peer"), Category.NETWORK,
     "ConnectionResetError", None),
    (ConnectionRefusedError(111, "refused"), Category.NETWORK, "ConnectionRefusedError", None),
    (OSError(101, "Network is unreachable"), Category.NETWORK, "OSError", None),
    (socket.gaierror(-2, "Name or service not known"), Category.NETWORK, "gaierror", None),
    (asyncio.IncompleteReadError(b"ab", 8), Category.NETWORK, "IncompleteReadError", None),
    (TimeoutError(), Category.NETWORK, "TimeoutError", None),
    (te.InvalidChecksumError(1, 2), Category.NETWORK, "InvalidChecksumError", None),
    (ValueError("Request was unsuccessful 5 time(s)"), Category.SERVER,
     "REQUEST_UNSUCCESSFUL", None),
    (ValueError("something else"), Category.UNKNOWN, "ValueError", None),
    (PermissionError(13, "Permission denied"), Category.UNKNOWN, "PermissionError", None),
    (RuntimeError("boom"), Category.UNKNOWN, "RuntimeError", None),
    (te.SecurityError(), Category.UNKNOWN, "SecurityError", None),
]


@pytest.mark.parametrize(
    ("exc", "category", "reason", "park_state"), LOCAL_TABLE,
    ids=[f"{type(row[0]).__name__}-{row[2]}" for row in LOCAL_TABLE],
)
def test_local_errors(exc: BaseException, category: Category, reason: str,
                      park_state: str | None) -> None:
    c = classify(exc)
    assert (c.category, c.code, c.park_state) == (category, reason, park_state)
    assert c.message.startswith(reason)


def test_empty_message_is_just_the_code() -> None:
    assert classify(TimeoutError()).message == "TimeoutError"


@pytest.mark.parametrize(
    "exc", [asyncio.CancelledError(), KeyboardInterrupt(), SystemExit(1), GeneratorExit()]
)
def test_cancellation_is_never_classified(exc: BaseException) -> None:
    with pytest.raises(TypeError, match="must propagate"):
        classify(exc)


def test_multi_error_reports_most_consequential_member() -> None:
    multi = te.MultiError(
        [rpc(400, "PEER_ID_INVALID"), None, rpc(401, "SESSION_REVOKED")],
        [None, object(), None],
        [REQUEST, REQUEST, REQUEST],
    )
    assert isinstance(multi, te.MultiError)
    c = classify(multi)
    assert (c.category, c.code) == (Category.AUTH, "SESSION_REVOKED")


def test_classified_is_frozen() -> None:
    c = classify(TimeoutError())
    assert isinstance(c, Classified)
    with pytest.raises(AttributeError):
        c.code = "x"  # type: ignore[misc]


# --------------------------------------------------------------------------- redaction


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("sign in as +1 555 010 0123 failed", "555 010 0123"),
        ("phone 15550100123 is banned", "15550100123"),
        ("phone (555) 010-0123", "010-0123"),
        ("login code 12345 rejected", "12345"),
        ("auth key 0123456789abcdef0123456789abcdef", "0123456789abcdef"),
        ("session 1BVtsOJ8Bu2kdL7Zq9aXy+/w== leaked", "1BVtsOJ8Bu2kdL7Zq9aX"),
        ("user 777000123 blocked", "777000123"),
    ],
)
def test_redact_strips_secrets(text: str, secret: str) -> None:
    assert secret not in redact(text)


@pytest.mark.parametrize(
    "text",
    [
        "AUTH_KEY_UNREGISTERED: The key is not registered (caused by InvokeWithLayerRequest)",
        "Connection to 127.0.0.1:9464 refused",
        "A wait of 30 seconds is required",
        "[Errno 2] No such file or directory: '/var/lib/tgdaemon/state.db'",
    ],
)
def test_redact_keeps_useful_text(text: str) -> None:
    assert redact(text) == text


def test_redact_caps_length_when_asked() -> None:
    assert len(redact("x " * 500, 200)) == 200
    assert redact("x " * 500) == "x " * 500


def test_classified_messages_are_capped() -> None:
    assert len(classify(RuntimeError("x " * 500)).message) <= 200


def test_messages_from_exceptions_are_redacted() -> None:
    exc = RuntimeError("cannot log in +15550100123 with code 24680, key " + "ab" * 20)
    c = classify(exc)
    assert "15550100123" not in c.message
    assert "24680" not in c.message
    assert "abab" not in c.message
