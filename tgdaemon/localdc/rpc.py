"""RPC method handlers of the local DC: what each Telegram method answers.

Handlers are synchronous and pure apart from the :class:`World` they read and change (the
user registry, login codes, SRP challenges, update history). They return a TL object, or
raw bytes where the result type has no serializer (``Vector``/``Bool``), or raise
:class:`RpcFail`.
"""

from __future__ import annotations

import functools
import os
import re
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from telethon.tl import functions as fn
from telethon.tl import types as tl
from telethon.tl.types import account as tl_account
from telethon.tl.types import auth as tl_auth
from telethon.tl.types import updates as tl_updates
from telethon.tl.types import users as tl_users

from tgdaemon.localdc.crypto import SrpChallenge, SrpVerifier, srp_challenge, srp_check
from tgdaemon.localdc.faults import MethodNames
from tgdaemon.localdc.store import ClientRecord

if TYPE_CHECKING:
    from tgdaemon.localdc.store import Store, UserRecord
    from tgdaemon.localdc.updates import UpdateHistory

VECTOR = 0x1CB5C415
BOOL_TRUE = 0x997275B5
BOOL_FALSE = 0xBC799737
SERVICE_USER_ID = 777000

_SPECIAL_NAMES = {
    "ReqPqRequest": "req_pq",
    "ReqPqMultiRequest": "req_pq_multi",
    "ReqDHParamsRequest": "req_DH_params",
    "SetClientDHParamsRequest": "set_client_DH_params",
    "PingDelayDisconnectRequest": "ping_delay_disconnect",
    "DestroySessionRequest": "destroy_session",
    "DestroyAuthKeyRequest": "destroy_auth_key",
    "GetFutureSaltsRequest": "get_future_salts",
    "RpcDropAnswerRequest": "rpc_drop_answer",
}


class RpcFail(Exception):
    """An RPC error answer (code + Telegram's upper-case message)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code} {message}")
        self.code = code
        self.message = message


@functools.cache
def names_for_class(cls: type) -> MethodNames:
    """TL name, class name and namespaced class name of a Telethon request class."""
    mod = cls.__module__
    ns = "" if mod == "telethon.tl.functions" else mod.rsplit(".", 1)[1]
    name = cls.__name__
    base = name.removesuffix("Request")
    tl_name = _SPECIAL_NAMES.get(name) or (
        (f"{ns}." if ns else "") + base[:1].lower() + base[1:]
    )
    return MethodNames(tl=tl_name, cls=name, qualified=f"{ns}.{name}" if ns else name)


def method_names(obj: Any) -> MethodNames:
    """Names of a TL request object (Telethon's objects are untyped)."""
    # mypy does not see a class as Hashable through functools.cache's signature.
    return names_for_class(type(obj))  # type: ignore[arg-type]


def vector(items: list[Any]) -> bytes:
    return struct.pack("<Ii", VECTOR, len(items)) + b"".join(bytes(x) for x in items)


def boolean(value: bool) -> bytes:
    return struct.pack("<I", BOOL_TRUE if value else BOOL_FALSE)


def username_of(user_id: int) -> str:
    """localdc's users have no chosen usernames: each is ``local<id>`` (resolvable)."""
    return f"local{user_id}"


def normalize_phone(phone: str) -> str:
    return re.sub(r"\D", "", phone or "")


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _random_hash() -> int:
    """A non-zero signed 64-bit authorization hash (0 means "this session" in Telegram)."""
    return struct.unpack("<q", os.urandom(8))[0] or 1


@dataclass
class Ctx:
    """Where a request came from."""

    dc_id: int
    key_id: int
    user_id: int | None


@dataclass
class LoginTokenState:
    """A login token exported by a new key, until it expires or is used."""

    key_id: int
    dc_id: int
    expires: float  # unix time
    user_id: int | None = None  # set by auth.acceptLoginToken


@dataclass
class World:
    """Shared, DC-independent server state that handlers read and change."""

    store: Store
    addresses: Callable[[], dict[int, tuple[str, int]]]
    bind_key: Callable[[int, int | None], None]
    push: Callable[[int, tl.TypeUpdates, int | None], None]
    history: UpdateHistory
    fixed_code: str | None = "12345"
    codes: dict[str, tuple[str, str]] = field(default_factory=dict)  # phone -> (hash, code)
    last_codes: dict[str, str] = field(default_factory=dict)
    pending_2fa: dict[int, str] = field(default_factory=dict)  # key_id -> phone
    srp: dict[int, tuple[str, SrpChallenge, SrpVerifier]] = field(default_factory=dict)
    # token -> (uid, dc, authorization hash of the exporting key)
    exports: dict[bytes, tuple[int, int, int | None]] = field(default_factory=dict)
    #: Seconds a login must be old before it may terminate other sessions (Telegram: about
    #: a day, FRESH_RESET_AUTHORISATION_FORBIDDEN before that). 0 = no such limit.
    fresh_reset_after: int = 0
    #: Pushes an update to the connections of one auth key (a key not yet logged in, which
    #: ``push`` by user cannot reach): updateLoginToken.
    push_key: Callable[[int, tl.TypeUpdates], None] | None = None
    #: auth.exportLoginToken tokens: token -> the pending login (see localdc.account).
    login_tokens: dict[bytes, LoginTokenState] = field(default_factory=dict)
    #: help.getConfig lists, ahead of each DC's address, the kinds of option a real config
    #: also holds and a client must not connect to for its API calls: media-only, CDN,
    #: obfuscated-only (tcpo_only) and IPv6 options, all pointing at a closed port.
    config_decoys: bool = False

    # -- helpers -----------------------------------------------------------------------------

    def user(self, ctx: Ctx) -> UserRecord:
        if ctx.user_id is None or ctx.user_id not in self.store.users:
            raise RpcFail(401, "AUTH_KEY_UNREGISTERED")
        return self.store.users[ctx.user_id]

    def tl_user(self, rec: UserRecord, viewer: int | None) -> tl.User:
        is_self = rec.id == viewer
        return tl.User(
            id=rec.id,
            is_self=is_self,
            access_hash=rec.access_hash,
            first_name=rec.first_name,
            username=username_of(rec.id),
            phone=rec.phone if is_self else None,
            status=tl.UserStatusRecently(),
        )

    @staticmethod
    def service_user() -> tl.User:
        return tl.User(id=SERVICE_USER_ID, access_hash=1, first_name="Telegram (localdc)",
                       verified=True, support=True)

    def state(self, rec: UserRecord) -> tl_updates.State:
        return tl_updates.State(pts=rec.pts, qts=0, date=_now(), seq=0, unread_count=0)

    def authorize(self, ctx: Ctx, rec: UserRecord,
                  carried: int | None = None) -> tl_auth.Authorization:
        """Bind the key to the user. A sign-in is a new authorization, announced to the
        user's other sessions (updateNewAuthorization); ``carried`` is the hash of a login
        carried over from another DC (importAuthorization), which is not a new one."""
        self.bind_key(ctx.key_id, rec.id)
        ctx.user_id = rec.id
        self.pending_2fa.pop(ctx.key_id, None)
        client = self.store.clients.get(ctx.key_id) or ClientRecord(ctx.key_id, 0, "", "", "")
        auth_hash = carried if carried is not None else _random_hash()
        now = int(_now().timestamp())
        self.store.put_client(replace(client, auth_hash=auth_hash, authorized_at=now))
        if carried is None:
            update = tl.UpdateNewAuthorization(
                hash=auth_hash, unconfirmed=True, date=_now(),
                device=f"{client.device_model}, {client.app_version}".strip(", "),
                location="Localdc, ZZ")
            self.push(rec.id, tl.UpdateShort(update=update, date=_now()), ctx.key_id)
        return tl_auth.Authorization(user=self.tl_user(rec, rec.id))

    def note_client(self, key_id: int, init: Any) -> None:
        """Remember what an initConnection says about the app behind ``key_id``."""
        old = self.store.clients.get(key_id)
        self.store.put_client(ClientRecord(
            key_id, init.api_id, init.device_model, init.system_version, init.app_version,
            old.auth_hash if old else None, old.authorized_at if old else None))

    def end_authorization(self, key_id: int) -> None:
        """Log the key out: its next request is answered AUTH_KEY_UNREGISTERED."""
        self.bind_key(key_id, None)
        client = self.store.clients.get(key_id)
        if client is not None:
            self.store.put_client(replace(client, auth_hash=None, authorized_at=None))

    def auth_hash(self, key_id: int) -> int | None:
        client = self.store.clients.get(key_id)
        return None if client is None else client.auth_hash

    def new_message(self, user_id: int, text: str, *, out: bool, peer: int,
                    exclude_key: int | None, reply_to: int | None = None) -> tl.Message:
        """Store a message for ``user_id`` (its pts moves on) and push it to its sessions."""
        msg = tl.Message(
            id=self.history.next_message_id(user_id), peer_id=tl.PeerUser(peer), date=_now(),
            message=text, out=out, from_id=tl.PeerUser(user_id if out else peer),
            reply_to=tl.MessageReplyHeader(reply_to_msg_id=reply_to) if reply_to else None,
        )
        upd = self.history.record(
            user_id, lambda pts: tl.UpdateNewMessage(message=msg, pts=pts, pts_count=1))
        self.deliver(user_id, [upd], exclude_key, peers=(peer,))
        return msg

    def deliver(self, user_id: int, updates: list[tl.TypeUpdate],
                exclude_key: int | None = None, peers: tuple[int, ...] = ()) -> None:
        """Push recorded updates to the user's sessions (all but ``exclude_key``'s); the users
        in ``peers`` go along so clients know who a message is from."""
        users = [self.tl_user(self.store.users[user_id], user_id), self.service_user()]
        users += [self.tl_user(self.store.users[p], user_id) for p in peers
                  if p != user_id and p in self.store.users]
        self.push(user_id, tl.Updates(updates=updates, users=users, chats=[], date=_now(),
                                      seq=0), exclude_key)

    # -- dispatch ----------------------------------------------------------------------------

    def handle(self, ctx: Ctx, req: Any) -> Any:
        handler = _HANDLERS.get(type(req))
        if handler is None:
            raise RpcFail(400, "LOCALDC_METHOD_NOT_IMPLEMENTED")
        return handler(self, ctx, req)


_HANDLERS: dict[type, Callable[[World, Ctx, Any], Any]] = {}


def _handles(cls: type) -> Callable[[Callable[[World, Ctx, Any], Any]],
                                    Callable[[World, Ctx, Any], Any]]:
    def deco(f: Callable[[World, Ctx, Any], Any]) -> Callable[[World, Ctx, Any], Any]:
        _HANDLERS[cls] = f
        return f
    return deco


# -- help --------------------------------------------------------------------------------------


#: A port nothing listens on (TCP port 1, tcpmux): a connection to a decoy option is refused.
DECOY_PORT = 1


def _dc_options(dc_id: int, host: str, port: int, *, decoys: bool) -> list[tl.DcOption]:
    real = tl.DcOption(id=dc_id, ip_address=host, port=port)
    if not decoys:
        return [real]
    return [tl.DcOption(id=dc_id, ip_address=host, port=DECOY_PORT, media_only=True),
            tl.DcOption(id=dc_id, ip_address=host, port=DECOY_PORT, cdn=True),
            tl.DcOption(id=dc_id, ip_address=host, port=DECOY_PORT, tcpo_only=True),
            tl.DcOption(id=dc_id, ip_address="::1", port=DECOY_PORT, ipv6=True),
            real]


@_handles(fn.help.GetConfigRequest)
def _get_config(w: World, ctx: Ctx, req: Any) -> tl.Config:
    now = _now()
    return tl.Config(
        date=now, expires=now + timedelta(hours=1), test_mode=False, this_dc=ctx.dc_id,
        dc_options=[option for i, (h, p) in sorted(w.addresses().items())
                    for option in _dc_options(i, h, p, decoys=w.config_decoys)],
        dc_txt_domain_name="localdc.invalid", chat_size_max=200, megagroup_size_max=200000,
        forwarded_count_max=100, online_update_period_ms=210000, offline_blur_timeout_ms=5000,
        offline_idle_timeout_ms=30000, online_cloud_timeout_ms=300000,
        notify_cloud_delay_ms=30000, notify_default_delay_ms=1500, push_chat_period_ms=60000,
        push_chat_limit=2, edit_time_limit=172800, revoke_time_limit=172800,
        revoke_pm_time_limit=172800, rating_e_decay=2419200, stickers_recent_limit=200,
        channels_read_media_period=604800, call_receive_timeout_ms=20000,
        call_ring_timeout_ms=90000, call_connect_timeout_ms=30000,
        call_packet_timeout_ms=10000, me_url_prefix="https://localdc.invalid/",
        caption_length_max=1024, message_length_max=4096, webfile_dc_id=1,
    )


@_handles(fn.help.GetNearestDcRequest)
def _nearest_dc(w: World, ctx: Ctx, req: Any) -> tl.NearestDc:
    return tl.NearestDc(country="ZZ", this_dc=ctx.dc_id, nearest_dc=ctx.dc_id)


# -- users / updates ---------------------------------------------------------------------------


def _resolve_user(w: World, me: UserRecord, inp: Any) -> UserRecord | None:
    if isinstance(inp, (tl.InputUserSelf, tl.InputPeerSelf)):
        return me
    uid = getattr(inp, "user_id", None)
    return w.store.users.get(uid) if isinstance(uid, int) else None


@_handles(fn.users.GetUsersRequest)
def _get_users(w: World, ctx: Ctx, req: Any) -> bytes:
    me = w.user(ctx)
    found = [_resolve_user(w, me, i) for i in req.id]
    return vector([w.tl_user(u, me.id) for u in found if u is not None])


@_handles(fn.users.GetFullUserRequest)
def _get_full_user(w: World, ctx: Ctx, req: Any) -> tl_users.UserFull:
    me = w.user(ctx)
    target = _resolve_user(w, me, req.id)
    if target is None:
        raise RpcFail(400, "USER_ID_INVALID")
    full = tl.UserFull(id=target.id, settings=tl.PeerSettings(),
                       notify_settings=tl.PeerNotifySettings(), common_chats_count=0)
    return tl_users.UserFull(full_user=full, chats=[], users=[w.tl_user(target, me.id)])


@_handles(fn.updates.GetStateRequest)
def _get_state(w: World, ctx: Ctx, req: Any) -> tl_updates.State:
    return w.state(w.user(ctx))


# -- login -------------------------------------------------------------------------------------


def _sent_code(code_hash: str, code: str) -> tl_auth.SentCode:
    return tl_auth.SentCode(type=tl_auth.SentCodeTypeApp(length=len(code)),
                            phone_code_hash=code_hash)


@_handles(fn.auth.SendCodeRequest)
def _send_code(w: World, ctx: Ctx, req: Any) -> tl_auth.SentCode:
    phone = normalize_phone(req.phone_number)
    if len(phone) < 5:
        raise RpcFail(400, "PHONE_NUMBER_INVALID")
    code = w.fixed_code or f"{secrets.randbelow(100000):05d}"
    code_hash = secrets.token_hex(8)
    w.codes[phone] = (code_hash, code)
    w.last_codes[phone] = code
    return _sent_code(code_hash, code)


def _pending_code(w: World, req: Any) -> tuple[str, tuple[str, str]]:
    """The phone and its (code hash, code) sent by auth.sendCode, or PHONE_CODE_EXPIRED."""
    phone = normalize_phone(req.phone_number)
    entry = w.codes.get(phone)
    if entry is None or entry[0] != req.phone_code_hash:
        raise RpcFail(400, "PHONE_CODE_EXPIRED")
    return phone, entry


@_handles(fn.auth.ResendCodeRequest)
def _resend_code(w: World, ctx: Ctx, req: Any) -> tl_auth.SentCode:
    _phone, entry = _pending_code(w, req)
    return _sent_code(*entry)


@_handles(fn.auth.SignInRequest)
def _sign_in(w: World, ctx: Ctx, req: Any) -> tl_auth.Authorization:
    phone, entry = _pending_code(w, req)
    if not req.phone_code:
        raise RpcFail(400, "PHONE_CODE_EMPTY")
    if not secrets.compare_digest(req.phone_code, entry[1]):
        raise RpcFail(400, "PHONE_CODE_INVALID")
    del w.codes[phone]
    if phone in w.store.passwords:
        w.pending_2fa[ctx.key_id] = phone
        raise RpcFail(401, "SESSION_PASSWORD_NEEDED")
    return w.authorize(ctx, w.store.get_or_create_user(phone, ctx.dc_id))


@_handles(fn.account.GetPasswordRequest)
def _get_password(w: World, ctx: Ctx, req: Any) -> tl_account.Password:
    phone = w.pending_2fa.get(ctx.key_id)
    if phone is None and ctx.user_id in w.store.users:
        phone = w.store.users[ctx.user_id].phone
    if phone is None:
        raise RpcFail(401, "AUTH_KEY_UNREGISTERED")
    verifier = w.store.passwords.get(phone)
    new_algo = SrpVerifier(os.urandom(32), os.urandom(16), b"").algo
    new_secure = tl.SecurePasswordKdfAlgoSHA512(salt=os.urandom(8))
    if verifier is None:
        return tl_account.Password(new_algo=new_algo, new_secure_algo=new_secure,
                                   secure_random=os.urandom(32), has_password=False)
    challenge = srp_challenge(verifier)
    w.srp[ctx.key_id] = (phone, challenge, verifier)
    return tl_account.Password(
        new_algo=new_algo, new_secure_algo=new_secure, secure_random=os.urandom(32),
        has_password=True, current_algo=verifier.algo, srp_B=challenge.srp_b,
        srp_id=challenge.srp_id,
    )


@_handles(fn.auth.CheckPasswordRequest)
def _check_password(w: World, ctx: Ctx, req: Any) -> tl_auth.Authorization:
    entry = w.srp.pop(ctx.key_id, None)
    pw = req.password
    if entry is None or not isinstance(pw, tl.InputCheckPasswordSRP):
        raise RpcFail(400, "SRP_ID_INVALID")
    phone, challenge, verifier = entry
    if pw.srp_id != challenge.srp_id:
        raise RpcFail(400, "SRP_ID_INVALID")
    if not srp_check(verifier, challenge, pw.A, pw.M1):
        raise RpcFail(400, "PASSWORD_HASH_INVALID")
    return w.authorize(ctx, w.store.get_or_create_user(phone, ctx.dc_id))


@_handles(fn.auth.LogOutRequest)
def _log_out(w: World, ctx: Ctx, req: Any) -> tl_auth.LoggedOut:
    w.user(ctx)
    w.end_authorization(ctx.key_id)
    ctx.user_id = None
    return tl_auth.LoggedOut()


@_handles(fn.auth.ExportAuthorizationRequest)
def _export_authorization(w: World, ctx: Ctx, req: Any) -> tl_auth.ExportedAuthorization:
    me = w.user(ctx)
    if req.dc_id not in w.addresses():
        raise RpcFail(400, "DC_ID_INVALID")
    token = os.urandom(32)
    w.exports[token] = (me.id, req.dc_id, w.auth_hash(ctx.key_id))
    return tl_auth.ExportedAuthorization(id=me.id, bytes=token)


@_handles(fn.auth.ImportAuthorizationRequest)
def _import_authorization(w: World, ctx: Ctx, req: Any) -> tl_auth.Authorization:
    entry = w.exports.pop(req.bytes, None)
    if entry is None or entry[:2] != (req.id, ctx.dc_id) or req.id not in w.store.users:
        raise RpcFail(400, "AUTH_BYTES_INVALID")
    return w.authorize(ctx, w.store.users[req.id], carried=entry[2])


# -- messages ----------------------------------------------------------------------------------


@_handles(fn.account.UpdateStatusRequest)
def _update_status(w: World, ctx: Ctx, req: Any) -> bytes:
    w.user(ctx)
    return boolean(True)
