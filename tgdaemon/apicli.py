"""``tgdaemon send`` and ``tgdaemon tail``: people's client for the account API.

They read the same config as the daemon, pick the first ``[[api.clients]]`` entry allowed to
do the call (its token file must be readable by whoever runs the command, e.g. the service's
user) and talk HTTP/WebSocket to ``daemon.http_listen``, like any other API client: flood
waits, parked accounts and permissions are the daemon's answers, printed as one line.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

import aiohttp

from tgdaemon.apiconfig import ApiClient, ApiMethod
from tgdaemon.exceptions import ConfigError, TgdaemonError

if TYPE_CHECKING:
    from tgdaemon.config import Config

class ApiUnavailableError(TgdaemonError):
    """The API could not be reached, or answered 429/5xx: try again later."""

    exit_code = 69  # EX_UNAVAILABLE, as for an unreachable Telegram


class ApiRefusedError(TgdaemonError):
    """The API refused the call (bad token, not allowed, unknown or parked account...)."""

    exit_code = 76  # as for a request Telegram refuses


def _client_for(config: Config, method: ApiMethod, account: str | None) -> ApiClient:
    for client in config.api.clients:
        if client.may_call(method) and (account is None or client.may_use(account)):
            return client
    raise ConfigError(f"{config.path}: no [[api.clients]] entry may call {method.value}"
                      + (f" for account {account!r}" if account else ""))


def _base(config: Config) -> str:
    listen = config.daemon.http_listen
    if listen is None:
        raise ConfigError(f"{config.path}: daemon.http_listen is disabled: no API to call")
    host = "127.0.0.1" if listen.host in ("0.0.0.0", "") else listen.host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{listen.port}/v1"


async def _call(config: Config, method: ApiMethod, account: str, verb: str, path: str,
                json_body: Any = None) -> Any:
    """One API call as the first client allowed to make it; the answer's JSON, or one line."""
    client = _client_for(config, method, account)
    try:
        async with aiohttp.ClientSession() as http, http.request(
                verb, f"{_base(config)}/accounts/{account}/{path}",
                headers={"Authorization": f"Bearer {client.token}"}, json=json_body,
                timeout=aiohttp.ClientTimeout(total=config.api.request_timeout + 5)) as r:
            body = await r.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise ApiUnavailableError(f"cannot reach the daemon's API: {type(exc).__name__}") \
            from None
    if r.status != 200:
        raise _refusal(r.status, r.headers.get("Retry-After"), body)
    return body


async def send(config: Config, account: str, peer: str, text: str) -> int:
    """POST the message; returns the new message id."""
    peer_value: Any = int(peer) if peer.lstrip("-").isdigit() else peer
    body = await _call(config, ApiMethod.SEND_MESSAGE, account, "POST", "messages",
                       {"peer": peer_value, "text": text})
    return int(body["id"])


async def sessions(config: Config, account: str) -> list[dict[str, Any]]:
    """The account's sessions, as the running daemon lists them."""
    body = await _call(config, ApiMethod.SESSIONS, account, "GET", "sessions")
    return list(body["sessions"])


async def terminate(config: Config, account: str, session_hash: str | None) -> None:
    """Log one session out (``session_hash``), or every one but the daemon's (None)."""
    payload = {"allOthers": True} if session_hash is None else {"hash": session_hash}
    await _call(config, ApiMethod.TERMINATE_SESSIONS, account, "POST", "sessions/terminate",
                payload)


def _refusal(status: int, retry_after: str | None, body: Any) -> TgdaemonError:
    message = body.get("message", "") if isinstance(body, dict) else ""
    more = f" (retry after {retry_after} s)" if retry_after else ""
    text = f"API answered {status}: {message}{more}"
    return ApiUnavailableError(text) if status == 429 or status >= 500 \
        else ApiRefusedError(text)


async def tail(config: Config, account: str | None, out: Any = sys.stdout) -> None:
    """Print live events, one JSON object per line, until interrupted or the daemon stops."""
    client = _client_for(config, ApiMethod.UPDATES, account)
    query = f"?accounts={account}" if account else ""
    try:
        async with aiohttp.ClientSession() as http, http.ws_connect(
                f"{_base(config)}/updates{query}",
                headers={"Authorization": f"Bearer {client.token}"}) as ws:
            async for msg in ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    break
                event = json.loads(msg.data)
                if event.get("type") != "ready":
                    print(json.dumps(event, ensure_ascii=False), file=out, flush=True)
    except aiohttp.WSServerHandshakeError as exc:
        raise _refusal(exc.status, None, {"message": "update stream refused"}) from None
    except aiohttp.ClientError as exc:
        raise ApiUnavailableError(f"cannot reach the daemon's API: {type(exc).__name__}") \
            from None


