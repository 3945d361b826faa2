"""The OpenAPI 3.1 document served at ``/v1/openapi.json`` (kept beside the handlers it
describes; a test checks every route is in it)."""

from __future__ import annotations

from typing import Any

_ERROR = {"$ref": "#/components/schemas/Error"}


def _resp(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description}
    if schema is not None:
        out["content"] = {"application/json": {"schema": schema}}
    return out


_ERRORS = {
    "400": _resp("bad request (bad parameters, or Telegram refused the call)", _ERROR),
    "401": _resp("missing or unknown bearer token", _ERROR),
    "403": _resp("this client may not use the account or method; or cross-origin", _ERROR),
    "404": _resp("no such account, or the peer was not found", _ERROR),
    "409": _resp("the account is parked, disabled or stopped (the reason says which)", _ERROR),
    "429": _resp("flood wait (Retry-After: the seconds left), the account's queue is full, or "
                 "the daemon is at its API limit and this client holds the most calls "
                 "(Retry-After)", _ERROR),
    "502": _resp("Telegram answered with a server error", _ERROR),
    "503": _resp("the account is starting, connecting or reconnecting, or the daemon is at its "
                 "API limit (error \"overloaded\"); Retry-After", _ERROR),
    "504": _resp("the call took longer than api.request_timeout", _ERROR),
}
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
_PEER = {"description": "a user/chat id, \"@username\", \"+phone\" or \"me\"",
         "oneOf": [{"type": "integer"}, {"type": "string"}]}


def _op(summary: str, ok: dict[str, Any], *, params: list[dict[str, Any]] | None = None,
        body: dict[str, Any] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "parameters": params or [],
                          "responses": {"200": _resp("ok", ok), **_ERRORS}}
    if body is not None:
        op["requestBody"] = {"required": True,
                             "content": {"application/json": {"schema": body}}}
    return op


_MESSAGE = {"$ref": "#/components/schemas/Message"}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "tgdaemon account API", "version": "1",
             "description": "Act through the daemon's Telegram accounts and receive their "
                            "updates. Authenticate with Authorization: Bearer <token>."},
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {"type": "object", "required": ["error", "message"], "properties": {
                "error": {"type": "string"}, "message": {"type": "string"},
                "retryAfter": {"type": "integer"}, "rpcError": {"type": "string"}}},
            "Peer": {"type": ["object", "null"], "properties": {
                "type": {"enum": ["user", "chat", "channel"]}, "id": {"type": "integer"}}},
            "Message": {"type": "object", "properties": {
                "id": {"type": "integer"}, "peer": {"$ref": "#/components/schemas/Peer"},
                "from": {"$ref": "#/components/schemas/Peer"}, "date": {"type": "integer"},
                "out": {"type": "boolean"}, "text": {"type": ["string", "null"]},
                "replyTo": {"type": ["integer", "null"]},
                "editDate": {"type": ["integer", "null"]}, "service": {"type": "boolean"}}},
        },
    },
    "security": [{"bearer": []}],
    "paths": {
        "/v1/accounts": {"get": _op("the status of every account this client may use",
                                    {"type": "object"})},
        "/v1/accounts/{name}": {"get": _op("one account's status", {"type": "object"},
                                           params=[_NAME])},
        "/v1/accounts/{name}/messages": {
            "post": _op("send a text message", {"type": "object", "properties": {
                "id": {"type": "integer"}, "date": {"type": "integer"},
                "peer": {"$ref": "#/components/schemas/Peer"}}}, params=[_NAME],
                body={"type": "object", "required": ["peer", "text"], "properties": {
                    "peer": _PEER, "text": {"type": "string", "maxLength": 4096},
                    "replyTo": {"type": "integer"}}}),
            "get": _op("history with a peer, newest first",
                       {"type": "object", "properties": {
                           "messages": {"type": "array", "items": _MESSAGE}}},
                       params=[_NAME,
                               {"name": "peer", "in": "query", "required": True,
                                "schema": {"type": "string"}},
                               {"name": "limit", "in": "query",
                                "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
                               {"name": "offset_id", "in": "query",
                                "schema": {"type": "integer"}}]),
        },
        "/v1/accounts/{name}/dialogs": {"get": _op(
            "the account's chats, most recent first", {"type": "object"},
            params=[_NAME, {"name": "limit", "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 100}}])},
        "/v1/accounts/{name}/read": {"post": _op(
            "mark a chat read up to maxId (0: everything)", {"type": "object"},
            params=[_NAME], body={"type": "object", "required": ["peer"], "properties": {
                "peer": _PEER, "maxId": {"type": "integer"}}})},
        "/v1/accounts/{name}/invoke": {"post": _op(
            "call any Telegram method by name (auth.* and invoke wrappers excepted)",
            {"type": "object", "properties": {"result": {}}}, params=[_NAME],
            body={"type": "object", "required": ["_"], "properties": {
                "_": {"type": "string", "examples": ["messages.getHistory"]}},
                "additionalProperties": True})},
        "/v1/accounts/{name}/sessions": {"get": _op(
            "the account's sessions (authorizations), the daemon's own marked current",
            {"type": "object", "properties": {"sessions": {"type": "array", "items": {
                "type": "object", "properties": {
                    "hash": {"type": "string"}, "current": {"type": "boolean"},
                    "device": {"type": "string"}, "platform": {"type": "string"},
                    "app": {"type": "string"}, "country": {"type": "string"},
                    "created": {"type": "integer"},
                    "ip": {"type": "string", "description": "only with security.log_ip"}}}}}},
            params=[_NAME])},
        "/v1/accounts/{name}/sessions/terminate": {"post": _op(
            "log one session (hash) or every session but the daemon's (allOthers) out; 403 "
            "with rpcError FRESH_RESET_AUTHORISATION_FORBIDDEN while the daemon's session is "
            "younger than Telegram allows", {"type": "object"}, params=[_NAME],
            body={"type": "object", "properties": {
                "hash": {"type": "string"}, "allOthers": {"type": "boolean"}}})},
        "/v1/updates": {"get": {
            "summary": "WebSocket: new messages, edits, deletions and read receipts as JSON "
                       "events, each with a cursor; reconnect with ?cursor= to resume",
            "parameters": [
                {"name": "accounts", "in": "query", "schema": {"type": "string"},
                 "description": "comma-separated account names (default: all allowed)"},
                {"name": "cursor", "in": "query", "schema": {"type": "string"},
                 "description": "the last cursor received (omit to start from now)"}],
            "responses": {"101": {"description": "switching to WebSocket"}, **_ERRORS}}},
        "/v1/openapi.json": {"get": {"summary": "this document", "security": [],
                                     "responses": {"200": _resp("the document")}}},
    },
}
