"""Loopback HTTP/JSON control API of the local DC, for other processes (daemon under test,
``make demo-chaos``, benchmarks). Phone numbers only travel in POST bodies, never in URLs,
and the access log is off, so they never reach a log line.

Routes (all JSON):
  GET    /info                     addresses, RSA key, code (the CLI info file)
  GET    /counters?dc_id=&user_id= counters (requests keyed by TL name)
  GET    /faults                   {"faults": {id: fault}}
  POST   /faults    {Fault fields} {"id": n}
  DELETE /faults[/{id}]            {"cleared": n}
  POST   /drop      {dc_id?, user_id?, auth_key_id?}      {"dropped": n}
  POST   /forget    {auth_key_id?, user_id?, dc_id?}      {"forgotten": n}
  POST   /push      {user_id, text?}                      {"message_id": n}
  POST   /channel   {title, members: [user_id]}            {"channel_id": n}
  POST   /channel/post {channel_id, text}                  {"message_id": n}
  POST   /code      {phone}                               {"code": str|null}
  POST   /user      {phone}                               {"user_id": int|null}
  POST   /password  {phone, password|null}                {}
  GET    /auth_keys?user_id=&dc_id=                       {"auth_key_ids": [...]}
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

from tgdaemon.localdc.faults import Fault

if TYPE_CHECKING:
    from tgdaemon.localdc.server import LocalDC

log = logging.getLogger("tgdaemon.localdc.control")


def _opt_int(request: web.Request, name: str) -> int | None:
    value = request.query.get(name)
    return int(value) if value not in (None, "") else None


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except ValueError as exc:
        raise web.HTTPBadRequest(text="body must be JSON") from exc
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(text="body must be a JSON object")
    return data


def make_app(dc: LocalDC) -> web.Application:
    routes = web.RouteTableDef()

    @routes.get("/info")
    async def info(request: web.Request) -> web.Response:
        return web.json_response(dc.info())

    @routes.get("/counters")
    async def counters(request: web.Request) -> web.Response:
        return web.json_response(dc.counters(_opt_int(request, "dc_id"),
                                             _opt_int(request, "user_id")))

    @routes.get("/overlaps")
    async def overlaps(request: web.Request) -> web.Response:
        counts = dc.key_use.overlap_snapshot()
        live = dc.key_use.live_counts()
        # live_keys: auth keys with a connection open now (a fleet bench's "connected");
        # open_twice: keys with more than one at this instant.
        return web.json_response({"total": sum(counts.values()), "by_auth_key": counts,
                                  "live_keys": len(live),
                                  "open_twice": sum(1 for n in live.values() if n > 1)})

    @routes.get("/keys")
    async def keys(request: web.Request) -> web.Response:
        return web.json_response({"live": dc.key_use.live_snapshot()})

    @routes.get("/faults")
    async def faults(request: web.Request) -> web.Response:
        return web.json_response(
            {"faults": {str(i): f.to_json() for i, f in dc.faults.active().items()}})

    @routes.post("/faults")
    async def add_fault(request: web.Request) -> web.Response:
        try:
            fault = Fault.from_json(await _body(request))
        except (TypeError, ValueError) as exc:
            raise web.HTTPBadRequest(text=f"bad fault: {exc}") from exc
        return web.json_response({"id": dc.inject(fault)})

    @routes.delete("/faults")
    async def clear_all(request: web.Request) -> web.Response:
        return web.json_response({"cleared": dc.clear()})

    @routes.delete("/faults/{fault_id}")
    async def clear_one(request: web.Request) -> web.Response:
        return web.json_response({"cleared": dc.clear(int(request.match_info["fault_id"]))})

    @routes.post("/drop")
    async def drop(request: web.Request) -> web.Response:
        b = await _body(request)
        n = dc.drop_connections(b.get("dc_id"), b.get("user_id"), b.get("auth_key_id"))
        return web.json_response({"dropped": n})

    @routes.post("/forget")
    async def forget(request: web.Request) -> web.Response:
        b = await _body(request)
        try:
            n = dc.forget_auth_key(b.get("auth_key_id"), user_id=b.get("user_id"),
                                   dc_id=b.get("dc_id"))
        except ValueError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from exc
        return web.json_response({"forgotten": n})

    @routes.post("/push")
    async def push(request: web.Request) -> web.Response:
        b = await _body(request)
        try:
            mid = dc.push_update(int(b["user_id"]), str(b.get("text", "ping from localdc")))
        except KeyError as exc:
            raise web.HTTPNotFound(text="unknown user") from exc
        return web.json_response({"message_id": mid})

    @routes.post("/channel")
    async def channel(request: web.Request) -> web.Response:
        b = await _body(request)
        try:
            cid = dc.create_channel(str(b.get("title", "channel")),
                                    [int(u) for u in b.get("members", [])])
        except KeyError as exc:
            raise web.HTTPNotFound(text="unknown user") from exc
        return web.json_response({"channel_id": cid})

    @routes.post("/channel/post")
    async def channel_post(request: web.Request) -> web.Response:
        b = await _body(request)
        try:
            mid = dc.post_to_channel(int(b["channel_id"]), str(b.get("text", "post")))
        except KeyError as exc:
            raise web.HTTPNotFound(text="unknown channel") from exc
        return web.json_response({"message_id": mid})

    @routes.post("/code")
    async def code(request: web.Request) -> web.Response:
        return web.json_response({"code": dc.last_code(str((await _body(request))["phone"]))})

    @routes.post("/user")
    async def user(request: web.Request) -> web.Response:
        return web.json_response({"user_id": dc.user_id(str((await _body(request))["phone"]))})

    @routes.post("/password")
    async def password(request: web.Request) -> web.Response:
        b = await _body(request)
        dc.set_password(str(b["phone"]), b.get("password"))
        return web.json_response({})

    @routes.get("/auth_keys")
    async def auth_keys(request: web.Request) -> web.Response:
        return web.json_response({"auth_key_ids": dc.auth_key_ids(
            _opt_int(request, "user_id"), _opt_int(request, "dc_id"))})

    app = web.Application()
    app.add_routes(routes)
    return app


async def start_control(dc: LocalDC, host: str, port: int) -> tuple[web.AppRunner, str]:
    """Serve the control API; returns the runner (``cleanup()`` stops it) and its URL."""
    runner = web.AppRunner(make_app(dc), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0]
    url = f"http://{bound[0]}:{bound[1]}"
    log.info("localdc control API on %s", url)
    return runner, url
