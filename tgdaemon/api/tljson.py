"""JSON <-> Telethon TL objects, for ``POST /v1/accounts/{name}/invoke``.

A method or type is named the way Telegram's schema does (``messages.getHistory``,
``inputPeerUser``) or the way Telethon's ``to_dict()`` does (``GetHistoryRequest``,
``messages.GetHistoryRequest``, ``InputPeerUser``). Nested objects are ``{"_": name, ...}``
dicts; ``bytes`` parameters are base64 strings; dates are Unix seconds or ISO 8601 strings.
Peers and users may also be given the way Telethon's high-level API accepts them (an id,
``"@username"``, ``"+phone"``, ``"me"``): Telethon resolves them before the call.

Results are ``to_dict()`` JSON with bytes as base64 and dates as ISO 8601.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import functools
from collections.abc import Mapping
from typing import Any

from telethon.tl import alltlobjects
from telethon.tl.tlobject import TLObject, TLRequest

#: Namespaces no API client may call: they hand out or replace the session itself
#: (auth.exportAuthorization returns a login for another DC), or wrap other calls.
FORBIDDEN_NAMESPACES = frozenset({"auth"})
FORBIDDEN_METHODS = frozenset({
    "invokeAfterMsg", "invokeAfterMsgs", "initConnection", "invokeWithLayer",
    "invokeWithoutUpdates", "invokeWithMessagesRange", "invokeWithTakeout",
    "invokeWithBusinessConnection", "invokeWithGooglePlayIntegrity",
    "invokeWithApnsSecret", "invokeWithReCaptcha", "account.deleteAccount",
    "account.resetAuthorization", "account.getTmpPassword", "account.getPassword",
})
#: Nesting bound for the JSON parameters (an outsider's input).
MAX_DEPTH = 16


class TlJsonError(ValueError):
    """The JSON does not describe a valid TL call (becomes a 400 with this message)."""


def _ns_of(cls: type) -> str:
    parts = cls.__module__.split(".")
    # telethon.tl.functions[.ns] / telethon.tl.types[.ns]
    return parts[3] if len(parts) > 3 else ""


def _tl_name(cls: type) -> str:
    base = cls.__name__.removesuffix("Request") if issubclass(cls, TLRequest) else cls.__name__
    ns = _ns_of(cls)
    name = base[:1].lower() + base[1:]
    return f"{ns}.{name}" if ns else name


@functools.cache
def _index() -> dict[str, type[TLObject]]:
    """Every spelling of every TL class (built once, ~2,500 classes)."""
    out: dict[str, type[TLObject]] = {}
    for cls in alltlobjects.tlobjects.values():
        ns = _ns_of(cls)
        is_function = cls.__module__.startswith("telethon.tl.functions")
        kind = "f" if is_function else "t"
        for name in {_tl_name(cls), cls.__name__, f"{ns}.{cls.__name__}" if ns else ""}:
            if name:
                out.setdefault(f"{kind}:{name}", cls)
    return out


def method_class(name: str) -> type[TLRequest]:
    """The request class for a method name; refuses unknown and forbidden methods."""
    cls = _index().get(f"f:{name}")
    if cls is None or not issubclass(cls, TLRequest):
        raise TlJsonError(f"unknown TL method {name[:80]!r}")
    tl = _tl_name(cls)
    if tl.split(".")[0] in FORBIDDEN_NAMESPACES or tl in FORBIDDEN_METHODS:
        raise TlJsonError(f"method {tl} is not available through the API")
    return cls


def type_class(name: str) -> type[TLObject]:
    cls = _index().get(f"t:{name}")
    if cls is None:
        raise TlJsonError(f"unknown TL type {name[:80]!r}")
    return cls


def build_request(data: Mapping[str, Any]) -> TLRequest:
    """``{"_": "messages.getHistory", "peer": ..., ...}`` -> a Telethon request object."""
    name = data.get("_")
    if not isinstance(name, str):
        raise TlJsonError('the body needs "_": the TL method name')
    obj = _build(method_class(name), data, 0)
    assert isinstance(obj, TLRequest)
    return obj


def _build(cls: type[TLObject], data: Mapping[str, Any], depth: int) -> TLObject:
    if depth > MAX_DEPTH:
        raise TlJsonError("parameters nested too deeply")
    hints: dict[str, Any] = getattr(cls.__init__, "__annotations__", {})
    params = {k: v for k, v in hints.items() if k != "return"}
    unknown = set(data) - set(params) - {"_"}
    if unknown:
        raise TlJsonError(f"{_tl_name(cls)} has no parameter {sorted(unknown)[0][:60]!r}")
    kwargs = {k: _value(v, repr(params[k]), depth + 1) for k, v in data.items() if k != "_"}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise TlJsonError(f"{_tl_name(cls)}: {exc}") from None


def _value(value: Any, hint: str, depth: int) -> Any:
    if isinstance(value, Mapping):
        name = value.get("_")
        if not isinstance(name, str):
            raise TlJsonError('a nested object needs "_": its TL type name')
        return _build(type_class(name), value, depth)
    if isinstance(value, list):
        if depth > MAX_DEPTH:
            raise TlJsonError("parameters nested too deeply")
        return [_value(v, hint, depth + 1) for v in value]
    if isinstance(value, str) and "bytes" in hint:
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise TlJsonError("bytes parameters must be base64") from None
    if isinstance(value, str) and "datetime" in hint:
        try:
            return dt.datetime.fromisoformat(value)
        except ValueError:
            raise TlJsonError("dates must be Unix seconds or ISO 8601") from None
    return value


def to_json(value: Any) -> Any:
    """A TL result as JSON-ready data: ``to_dict()`` with bytes base64 and dates ISO 8601."""
    if isinstance(value, TLObject):
        value = value.to_dict()
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return value


def method_label(request: TLRequest) -> str:
    return _tl_name(type(request))
