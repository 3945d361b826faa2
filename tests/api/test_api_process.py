"""The account API end to end: the daemon as a real process, stock Telethon inside it, localdc
as the server, HTTP and WebSocket from the outside (aiohttp as the consumer)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import stat
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.api.conftest import ApiDaemon, open_api_daemon, start_api_daemon
from tests.conftest import ConfigFactory, LoginFn, wait_for_condition
from tgdaemon.apiconfig import ApiConfig
from tgdaemon.httpsend import SEND_BUFFER
from tgdaemon.localdc import LocalDC
from tgdaemon.localdc.faults import Fault


async def _next_event(ws: aiohttp.ClientWebSocketResponse, kind: str,
                      timeout: float = 15) -> dict[str, Any]:
    while True:
        msg = await asyncio.wait_for(ws.receive(), timeout)
        assert msg.type is aiohttp.WSMsgType.TEXT, msg
        event = json.loads(msg.data)
        if event["type"] == kind:
            return event  # type: ignore[no-any-return]


async def test_send_reaches_the_other_accounts_stream_and_history(api_daemon: ApiDaemon) -> None:
    d = api_daemon
    bob_id = d.user_ids["bob"]
    async with aiohttp.ClientSession() as http, http.ws_connect(
            f"{d.url}/v1/updates?accounts=bob", headers=d.headers("reader")) as ws:
        ready = await _next_event(ws, "ready")
        assert ready["cursor"]
        status, _h, sent = await d.request("POST", "/v1/accounts/alice/messages",
                                           json={"peer": f"@local{bob_id}", "text": "hi bob"})
        assert status == 200, sent
        assert isinstance(sent["id"], int)
        assert sent["peer"] == {"type": "user", "id": bob_id}
        event = await _next_event(ws, "message")
    assert event["account"] == "bob"
    assert event["cursor"]
    msg = event["message"]
    assert msg["text"] == "hi bob"
    assert not msg["out"]
    assert msg["from"] == {"type": "user", "id": d.user_ids["alice"]}
    # A reply by user id (the entity is now known) and by phone, then bob's history.
    status, _h, reply = await d.request("POST", "/v1/accounts/alice/messages",
                                        json={"peer": bob_id, "text": "again",
                                              "replyTo": sent["id"]})
    assert status == 200, reply
    status, _h, history = await d.request(
        "GET", f"/v1/accounts/bob/messages?peer={d.user_ids['alice']}&limit=10")
    assert status == 200, history
    assert [m["text"] for m in history["messages"]] == ["again", "hi bob"]
    assert history["messages"][0]["replyTo"] == msg["id"]
    status, _h, page = await d.request(
        "GET", f"/v1/accounts/bob/messages?peer={d.user_ids['alice']}&limit=10"
               f"&offset_id={history['messages'][0]['id']}")
    assert [m["text"] for m in page["messages"]] == ["hi bob"]
    status, _h, dialogs = await d.request("GET", "/v1/accounts/bob/dialogs")
    assert status == 200, dialogs
    chat = next(x for x in dialogs["dialogs"] if x["peer"]["id"] == d.user_ids["alice"])
    assert chat["unreadCount"] == 2
    assert chat["username"] == f"local{d.user_ids['alice']}"
    status, _h, ok = await d.request("POST", "/v1/accounts/bob/read",
                                     json={"peer": d.user_ids["alice"]})
    assert status == 200
    assert ok == {"ok": True}
    status, _h, dialogs = await d.request("GET", "/v1/accounts/bob/dialogs")
    assert next(x for x in dialogs["dialogs"]
                if x["peer"]["id"] == d.user_ids["alice"])["unreadCount"] == 0


async def test_invoke_returns_tl_json(api_daemon: ApiDaemon) -> None:
    d = api_daemon
    bob_id = d.user_ids["bob"]
    status, _h, sent = await d.request("POST", "/v1/accounts/alice/messages",
                                       json={"peer": f"@local{bob_id}", "text": "for history"})
    assert status == 200, sent
    status, _h, full = await d.request("POST", "/v1/accounts/alice/invoke",
                                       json={"_": "users.getFullUser", "id": bob_id})
    assert status == 200, full
    assert full["result"]["_"] == "UserFull"
    assert full["result"]["full_user"]["id"] == bob_id
    assert full["result"]["users"][0]["username"] == f"local{bob_id}"
    status, _h, hist = await d.request("POST", "/v1/accounts/alice/invoke", json={
        "_": "messages.getHistory", "peer": {"_": "inputPeerUser", "user_id": bob_id,
                                             "access_hash": full["result"]["users"][0]
                                             ["access_hash"]},
        "offset_id": 0, "offset_date": None, "add_offset": 0, "limit": 5, "max_id": 0,
        "min_id": 0, "hash": 0})
    assert status == 200, hist
    assert hist["result"]["_"] == "Messages"
    assert hist["result"]["messages"][0]["message"] == "for history"
    assert hist["result"]["messages"][0]["date"].startswith("20")  # ISO 8601
    for body, why in (({"_": "auth.exportAuthorization", "dc_id": 2}, "not available"),
                      ({"_": "messages.noSuchMethod"}, "unknown TL method"),
                      ({"_": "users.getFullUser", "nope": 1}, "no parameter")):
        status, _h, err = await d.request("POST", "/v1/accounts/alice/invoke", json=body)
        assert status == 400, err
        assert why in err["message"], err
    status, _h, err = await d.request("POST", "/v1/accounts/alice/invoke", client="reader",
                                      json={"_": "users.getFullUser", "id": bob_id})
    assert status == 403, err


async def test_flood_wait_is_429_and_nothing_reaches_the_server_before_the_deadline(
        api_daemon: ApiDaemon, localdc: LocalDC) -> None:
    d = api_daemon
    alice = d.user_ids["alice"]
    bob = d.user_ids["bob"]
    localdc.inject(Fault("rpc_error", user_id=alice, method="messages.getHistory",
                         error="FLOOD_WAIT_4", times=1))
    started = time.monotonic()
    status, headers, err = await d.request("GET", f"/v1/accounts/alice/messages?peer={bob}")
    assert status == 429, err
    assert headers["Retry-After"] == "4", err
    assert err["error"] == "flood_wait"
    assert err["rpcError"] == "FLOOD_WAIT"
    # Every further call is refused at once, whatever the method, until the deadline.
    t0 = time.monotonic()
    status, headers, err = await d.request("POST", "/v1/accounts/alice/messages",
                                           json={"peer": bob, "text": "too early"})
    assert status == 429, err
    assert 1 <= int(headers["Retry-After"]) <= 4, err
    assert time.monotonic() - t0 < 1.0
    status, _h, info = await d.request("GET", "/v1/accounts/alice")
    assert info["state"] == "flood_wait", info
    assert info["floodWaitUntil"], info
    # Bob is not affected.
    status, _h, _b = await d.request("GET", f"/v1/accounts/bob/messages?peer={alice}")
    assert status == 200

    async def resumed() -> bool:
        return (await d.states()).get("alice") == "connected"

    await wait_for_condition(resumed, 20, "alice connected after the flood wait")
    assert time.monotonic() - started >= 4.0
    counters = localdc.counters(user_id=alice)
    assert counters["requests_during_flood_wait"] == 0, counters
    assert counters["flood_waits_resumed"] >= 1, counters
    status, _h, _b = await d.request("GET", f"/v1/accounts/alice/messages?peer={bob}")
    assert status == 200


async def test_parked_account_answers_at_once(api_daemon: ApiDaemon) -> None:
    d = api_daemon
    for method, path, body in (("GET", "/v1/accounts/carol/dialogs", None),
                               ("POST", "/v1/accounts/carol/messages",
                                {"peer": "me", "text": "x"})):
        t0 = time.monotonic()
        status, _h, err = await d.request(method, path, json=body)
        assert time.monotonic() - t0 < 1.0
        assert status == 409, err
        assert err["error"] == "parked", err
        assert "needs_login" in err["message"]
    status, _h, err = await d.request("GET", "/v1/accounts/nobody/dialogs")
    assert status == 404, err
    # The OpenAPI document needs no token (it names no account).
    status, _h, spec = await d.request("GET", "/v1/openapi.json", client=None)
    assert status == 200, spec
    assert "/v1/accounts/{name}" in spec["paths"], spec["paths"].keys()


async def test_who_may_do_what(api_daemon: ApiDaemon) -> None:
    d = api_daemon
    bob = d.user_ids["bob"]
    status, headers, err = await d.request("GET", "/v1/accounts/alice/dialogs", client=None)
    assert status == 401, err
    assert headers["WWW-Authenticate"].startswith("Bearer"), err
    status, _h, err = await d.request("GET", "/v1/accounts/alice/dialogs", client=None,
                                      headers={"Authorization": "Bearer " + "x" * 32})
    assert status == 401, err
    # alice's token acts on alice, never on bob, and sees only alice.
    status, _h, _b = await d.request("GET", "/v1/accounts/alice/dialogs", client="alice-app")
    assert status == 200
    for method, path, body in (("GET", "/v1/accounts/bob/dialogs", None),
                               ("GET", "/v1/accounts/bob", None),
                               ("POST", "/v1/accounts/bob/messages", {"peer": "me", "text": "x"}),
                               ("POST", "/v1/accounts/bob/invoke", {"_": "updates.getState"})):
        status, _h, err = await d.request(method, path, client="alice-app", json=body)
        assert status == 403, (path, err)
    status, _h, listed = await d.request("GET", "/v1/accounts", client="alice-app")
    assert [a["account"] for a in listed["accounts"]] == ["alice"]
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"{d.url}/v1/updates?accounts=bob",
                                  headers=d.headers("alice-app"))
        assert refused.value.status == 403
    # read-only may read, not send.
    status, _h, err = await d.request("POST", "/v1/accounts/alice/messages", client="reader",
                                      json={"peer": bob, "text": "x"})
    assert status == 403, err
    # A browser page from another origin is refused, even with a valid token.
    status, _h, err = await d.request("POST", "/v1/accounts/alice/messages",
                                      headers={"Origin": "http://evil.example"},
                                      json={"peer": bob, "text": "x"})
    assert status == 403, err
    assert "cross-origin" in err["message"], err
    metrics = await _metrics(d)
    assert 'tgdaemon_api_requests_total{account="bob",client="alice-app",method="dialogs",' \
           'outcome="forbidden"} 1.0' in metrics
    assert 'client="-"' in metrics
    assert 'outcome="unauthorized"' in metrics
    # A peer named by phone number, in a query string: the access log must not keep it.
    from tests.conftest import phone_for

    phone = phone_for("bob")
    status, _h, found = await d.request(
        "GET", f"/v1/accounts/alice/messages?peer=%2B{phone.lstrip('+')}&limit=1")
    assert status == 200, found
    await wait_for_condition(lambda: "/v1/accounts/alice/messages" in d.process.log, 10,
                             "the access log line")
    assert phone.lstrip("+") not in d.process.log
    for token in d.tokens.values():
        assert token not in metrics
        assert token not in d.process.log


def _send_buffers(port: int, peer: int) -> list[int]:
    """The kernel send buffer (``ss``'s skmem tb) of the daemon's sockets on ``port`` whose
    peer is the local port ``peer``."""
    out = subprocess.run(["ss", "-tmnH", "state", "established", f"( sport = :{port} and "
                          f"dport = :{peer} )"], capture_output=True, text=True, check=True)
    return [int(m) for m in re.findall(r"\btb(\d+)", out.stdout)]


async def _metrics(d: ApiDaemon) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"{d.url}/metrics") as r:
        return await r.text()


async def test_consumer_resumes_by_cursor_and_misses_nothing(api_daemon: ApiDaemon) -> None:
    d = api_daemon
    alice, bob = d.user_ids["alice"], d.user_ids["bob"]
    url = f"{d.url}/v1/updates?accounts=bob"

    async def send(text: str) -> int:
        status, _h, sent = await d.request("POST", "/v1/accounts/alice/messages",
                                           json={"peer": bob, "text": text})
        assert status == 200, sent
        return int(sent["id"])

    await d.request("GET", f"/v1/accounts/alice/messages?peer=@local{bob}")  # learn bob
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url, headers=d.headers("reader")) as ws:
            await _next_event(ws, "ready")
            # A consumer may stop reading: the kernel keeps a fixed 128 KiB for it.
            assert _send_buffers(d.port, ws.get_extra_info("sockname")[1]) == [2 * SEND_BUFFER]
            await send("before the gap")
            first = await _next_event(ws, "message")
            cursor = first["cursor"]
        # Disconnected: messages, an edit of one, a deletion and a read receipt happen.
        texts = [f"during the gap {i}" for i in range(5)]
        ids = [await send(t) for t in texts]
        status, _h, _b = await d.request("POST", "/v1/accounts/alice/invoke", json={
            "_": "messages.editMessage", "peer": bob, "id": ids[0], "message": "edited"})
        assert status == 200, _b
        status, _h, _b = await d.request("POST", "/v1/accounts/alice/invoke", json={
            "_": "messages.deleteMessages", "id": [ids[1]], "revoke": True})
        assert status == 200, _b

        async def bob_has_all() -> bool:
            _s, _h, h = await d.request("GET", f"/v1/accounts/bob/messages?peer={alice}")
            return len(h["messages"]) == 5  # 6 sent, 1 deleted
        await wait_for_condition(bob_has_all, 15, "bob's history has the gap's messages")
        async with http.ws_connect(f"{url}&cursor={cursor}", headers=d.headers("reader")) as ws:
            got = []
            while True:
                msg = await asyncio.wait_for(ws.receive(), 15)
                event = json.loads(msg.data)
                if event["type"] == "ready":
                    break
                got.append(event)
            assert [e["type"] for e in got] == ["message"] * 5 + ["edit", "delete"]
            assert [e["message"]["text"] for e in got[:5]] == texts
            assert got[5]["message"]["text"] == "edited"
            assert got[6]["messageIds"] == [got[1]["message"]["id"]]
            cursors = [e["cursor"] for e in got]
            assert len(set(cursors)) == len(cursors)
            assert cursor not in cursors
            # Live again after the backlog, with nothing repeated.
            await send("after the gap")
            live = await _next_event(ws, "message")
            assert live["message"]["text"] == "after the gap"
    status, _h, err = await d.request("GET", "/v1/updates?cursor=bm9wZTox")
    assert status == 400, err


#: The burst's caller, in its own process so that this one (which hosts localdc, whose answers
#: are part of every heartbeat's round trip) does not share its loop with it. Plain sockets
#: rather than an HTTP client library, at the lowest CPU priority: it stands for the other
#: programs, and on a 2-core machine its own CPU would otherwise be taken from the daemon.
#: Prints one [status, Retry-After or null, seconds] per call. With a duration, each connection
#: calls until it is over instead of ``per`` times.
LOAD_SCRIPT = """
import asyncio, json, os, sys, time
from urllib.parse import urlsplit

async def main(url, token, conns, per, duration):
    end = time.monotonic() + duration
    u = urlsplit(url)
    req = (f"GET {u.path}?{u.query} HTTP/1.1\\r\\nHost: {u.netloc}\\r\\n"
           f"Authorization: Bearer {token}\\r\\n\\r\\n").encode()
    out = []
    async def caller():
        reader, writer = await asyncio.open_connection(u.hostname, u.port)
        n = 0
        while n < per if not duration else time.monotonic() < end:
            n += 1
            t0 = time.monotonic()
            writer.write(req)
            head = (await reader.readuntil(b"\\r\\n\\r\\n")).decode().split("\\r\\n")
            headers = dict(h.lower().split(": ", 1) for h in head[1:] if h)
            await reader.readexactly(int(headers["content-length"]))
            out.append([int(head[0].split()[1]), headers.get("retry-after"),
                        time.monotonic() - t0])
        writer.close()
    await asyncio.gather(*(caller() for _ in range(conns)))
    print(json.dumps(out))

os.nice(19)
asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),
                 float(sys.argv[5])))
"""


async def _load(d: ApiDaemon, path: str, conns: int, per: int, duration: float = 0.0
                ) -> tuple[asyncio.subprocess.Process, asyncio.Task[tuple[bytes, bytes]]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LOAD_SCRIPT, d.url + path, d.tokens["ops"], str(conns), str(per),
        str(duration),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    return proc, asyncio.create_task(proc.communicate())


async def _outcomes(proc: asyncio.subprocess.Process, task: asyncio.Task[tuple[bytes, bytes]]
                    ) -> list[tuple[int, str | None, float]]:
    out, err = await task
    assert proc.returncode == 0, err.decode()
    return [(int(s), r, float(t)) for s, r, t in json.loads(out)]


class Beats:
    """Heartbeat round trips as the daemon reports them: each account's status carries its
    last heartbeat's latency and time, so a poll that sees a new (time, latency) pair has
    one more sample. A heartbeat comes every 0.225-0.275 s (0.25 s with jitter) and a poll
    every 0.1 s: none is missed, and the polls cost the daemon little."""

    def __init__(self, d: ApiDaemon, http: aiohttp.ClientSession, accounts: tuple[str, ...]
                 ) -> None:
        self.d = d
        self.http = http
        self._seen: dict[str, tuple[Any, Any]] = {}
        self.samples: dict[str, list[float]] = {a: [] for a in accounts}

    async def poll(self) -> None:
        async with self.http.get(f"{self.d.url}/v1/accounts",
                                 headers=self.d.headers("reader")) as r:
            assert r.status == 200
            body = await r.json()
        for status in body["accounts"]:
            name = status["account"]
            if name in self.samples:
                key = (status["lastChecked"], status["latency"])
                if self._seen.get(name, key) != key and status["latency"] is not None:
                    self.samples[name].append(float(status["latency"]))
                self._seen[name] = key

    async def window(self, until: Callable[[], bool], timeout: float) -> dict[str, list[float]]:
        """The samples taken from now until ``until()`` holds."""
        await self.poll()
        for samples in self.samples.values():
            samples.clear()

        async def done() -> bool:
            await self.poll()
            return until()

        await wait_for_condition(done, timeout, "the measurement window", interval=0.1)
        return {a: list(s) for a, s in self.samples.items()}


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _ms(samples: list[float]) -> str:
    return (f"n={len(samples)} median {statistics.median(samples) * 1e3:.1f} "
            f"p90 {_pct(samples, 0.9) * 1e3:.1f} max {max(samples) * 1e3:.1f} ms")


#: How much later than in the quiet baseline a heartbeat may come back during the burst and
#: still be "on time", seconds: the median by less than the first bound of the latency
#: histogram (50 ms, below any real Telegram round trip: no panel or alert can tell), the
#: 90th percentile by less than 150 ms (the heartbeat's own deadline is 3 s here, 30 s by
#: default). What a regression costs is far more: a heartbeat queued behind the burst's
#: calls waits for ~40 of them (1000 calls over 10 s: ~400 ms), a loop held by one
#: serialisation waits for all of it (invoke's JSON of a long history: 50-100 ms per call).
#: Measured here (2 cores shared with other work, load 5-18): quiet medians 1-6 ms, burst
#: medians 2-47 ms, p90 4-83 ms — what rises is the daemon waiting for a CPU (runnable but
#: not running: 1-3 % of the time when quiet, 50-80 % in the burst at load 10-13), not for
#: API calls; with a 20 ms blocking step added to each call, bob's median went to 69 ms and
#: this test failed.
MEDIAN_SLACK = 0.05
P90_SLACK = 0.15


@pytest.fixture
async def burst_daemon(tmp_path: Path, make_config: ConfigFactory, login_account: LoginFn,
                       localdc: LocalDC) -> AsyncIterator[ApiDaemon]:
    """As in production: INFO logging (at DEBUG Telethon's per-message lines are a quarter of
    the daemon's CPU in a burst), and heartbeats every 0.25 s for enough samples."""
    async with open_api_daemon(tmp_path, make_config, login_account,
                               daemon={"log_level": "info"},
                               policy={"heartbeat_interval": 0.25}) as d:
        yield d


async def test_burst_of_1000_calls_leaves_other_heartbeats_alone(
        burst_daemon: ApiDaemon) -> None:
    """1,000 history calls through alice from 40 connections at once, with the default
    limits: all are served (alice's lane holds 40; 100 calls/s make it ~10 s), and bob's
    heartbeats come back as fast as in a quiet baseline taken just before, within the
    slack above. Alice's own heartbeats are measured too: they do not queue behind her
    calls either (at most account_concurrency of them are ahead on her connection).
    Then 5 s of reads of alice's status (``GET /v1/accounts/alice``) as fast as 40
    connections go: they take turns like calls (at most max_rate a second, none refused),
    and the heartbeats stay within the same slack (without turns: hundreds a second, bob's
    p90 177 ms late)."""
    d = burst_daemon
    bob = d.user_ids["bob"]
    async with aiohttp.ClientSession() as http:
        beats = Beats(d, http, ("alice", "bob"))
        quiet = await beats.window(lambda: min(map(len, beats.samples.values())) >= 20, 30)
        t0 = time.monotonic()
        waited0 = _cpu_wait(d)
        proc, task = await _load(d, f"/v1/accounts/alice/messages?peer={bob}", 40, 25)
        busy = await beats.window(task.done, 120)
        outcomes = await _outcomes(proc, task)
        elapsed = time.monotonic() - t0
        # How much of the burst the daemon spent runnable but without a CPU: the host's
        # share of any rise (the loop cannot run a heartbeat's callbacks then).
        host = (_cpu_wait(d) - waited0) / elapsed
        t1 = time.monotonic()
        proc, task = await _load(d, "/v1/accounts/alice", 40, 0, duration=5.0)
        reading = await beats.window(task.done, 120)
        reads = await _outcomes(proc, task)
        read_elapsed = time.monotonic() - t1
    assert len(outcomes) == 1000
    counts = {s: sum(1 for o in outcomes if o[0] == s) for s in {o[0] for o in outcomes}}
    print(f"\nburst: 1000 calls in {elapsed:.1f}s, outcomes {counts}; the daemon waited for a "
          f"CPU {host:.0%} of it")
    for name in ("bob", "alice"):
        print(f"{name} heartbeats: quiet {_ms(quiet[name])}; burst {_ms(busy[name])}")
    assert counts == {200: 1000}, counts
    rate = ApiConfig().max_rate  # a second's worth at once, then max_rate a second
    assert elapsed >= (1000 - rate) / rate, "max_rate was not applied"
    read_counts = Counter(o[0] for o in reads)
    print(f"status reads: {len(reads)} in {read_elapsed:.1f}s, outcomes {dict(read_counts)}")
    for name in ("bob", "alice"):
        print(f"{name} heartbeats during the reads: {_ms(reading[name])}")
    assert set(read_counts) == {200}, read_counts
    assert len(reads) <= rate * (read_elapsed + 1), "the reads took no turn"
    for name in ("bob", "alice"):
        q = quiet[name]
        for b in (busy[name], reading[name]):
            assert len(b) >= 10, (name, b)
            assert statistics.median(b) <= statistics.median(q) + MEDIAN_SLACK, \
                (name, host, q, b)
            assert _pct(b, 0.9) <= _pct(q, 0.9) + P90_SLACK, (name, host, q, b)


async def test_beyond_the_daemon_wide_bound_calls_are_refused_at_once(
        burst_daemon: ApiDaemon) -> None:
    """A reload lowers max_in_flight + max_queued to 2 + 6; 40 callers at once: 8 places,
    every other call answered 429 with Retry-After at once (never a hang), and the calls
    given a place served."""
    d = burst_daemon
    text = d.config.read_text()
    d.config.write_text(text.replace("updates_buffer = 50\n", "updates_buffer = 50\n"
                                     "max_in_flight = 2\nmax_queued = 6\nmax_rate = 0\n", 1))
    before = await _reloads(d)
    d.process.send(signal.SIGHUP)
    await wait_for_condition(lambda: _reloaded(d, before), 15, "the reload")
    bob = d.user_ids["bob"]
    proc, task = await _load(d, f"/v1/accounts/alice/messages?peer={bob}", 40, 5)
    outcomes = await asyncio.wait_for(_outcomes(proc, task), 60)
    counts = {s: sum(1 for o in outcomes if o[0] == s) for s in {o[0] for o in outcomes}}
    assert set(counts) == {200, 429}, counts
    refused = [o for o in outcomes if o[0] == 429]
    assert all(o[1] is not None and int(o[1]) >= 1 for o in refused), refused[:3]
    slowest = max(o[2] for o in refused)
    print(f"\nat 2 + 6 places, 200 calls: {counts}; slowest refusal {slowest * 1e3:.0f} ms")
    assert slowest < 2.0, "a refusal waited"  # served calls took ~10-70 ms each here
    metrics = await _metrics(d)
    assert 'outcome="busy"' in metrics
    # Nothing left holding a place: every refused and served call released it.
    assert "tgdaemon_api_calls_running 0.0" in metrics
    assert "tgdaemon_api_calls_waiting 0.0" in metrics


def _cpu_wait(d: ApiDaemon) -> float:
    """Seconds the daemon's main thread has spent runnable, waiting for a CPU (Linux
    schedstat: on-CPU ns, run-queue wait ns, time slices)."""
    return int(Path(f"/proc/{d.process.proc.pid}/schedstat").read_text().split()[1]) / 1e9


async def _reloads(d: ApiDaemon) -> float:
    for line in (await _metrics(d)).splitlines():
        if line.startswith("tgdaemon_config_last_reload_success_timestamp_seconds "):
            return float(line.split()[1])
    return 0.0


async def _reloaded(d: ApiDaemon, before: float) -> bool:
    return await _reloads(d) > before


async def test_cli_send_and_tail(api_daemon: ApiDaemon) -> None:
    import sys

    from tests.daemon.test_process import daemon_env

    d = api_daemon
    tail = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tgdaemon", "tail", "bob", "-c", str(d.config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=daemon_env())
    try:
        async def subscribed() -> bool:  # the stream is live once the daemon counted it
            return 'method="updates",outcome="ok"' in await _metrics(d)

        await wait_for_condition(subscribed, 15, "tail subscribed")
        send = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tgdaemon", "send", "alice", str(d.user_ids["bob"]),
            "from the cli", "-c", str(d.config), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=daemon_env())
        out, err = await asyncio.wait_for(send.communicate(), 30)
        assert send.returncode == 0, err
        assert int(out.decode()) > 0
        assert tail.stdout is not None
        line = await asyncio.wait_for(tail.stdout.readline(), 15)
        event = json.loads(line)
        assert event["type"] == "message"
        assert event["message"]["text"] == "from the cli"
        refused = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tgdaemon", "send", "carol", "me", "x", "-c", str(d.config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=daemon_env())
        _out, err = await asyncio.wait_for(refused.communicate(), 30)
        assert refused.returncode == 76
        assert err.decode().startswith("tgdaemon: error: API answered 409")
        assert "Traceback" not in err.decode()
    finally:
        tail.kill()
        await tail.wait()


async def test_cursor_survives_a_daemon_restart_and_a_reload_adds_a_client(
        api_daemon: ApiDaemon, tmp_path: Path) -> None:
    """The buffer is persisted: a consumer resumes after the *daemon* restarted; and a
    reload (SIGHUP) applies a new [[api.clients]] entry without a restart."""
    d = api_daemon
    bob = d.user_ids["bob"]
    url = f"{d.url}/v1/updates?accounts=bob"
    async with aiohttp.ClientSession() as http, http.ws_connect(
            url, headers=d.headers("reader")) as ws:
        await _next_event(ws, "ready")
        for text in ("one", "two", "three"):
            status, _h, sent = await d.request("POST", "/v1/accounts/alice/messages",
                                               json={"peer": bob, "text": text})
            assert status == 200, sent
        events = [await _next_event(ws, "message") for _ in range(3)]
    cursor = events[0]["cursor"]
    d.process.send(signal.SIGTERM)
    assert await d.process.wait_exit(30) == 0
    d.process = await start_api_daemon(d.config)
    await wait_for_condition(lambda: _connected(d, "bob"), 30, "bob connected again")
    async with aiohttp.ClientSession() as http, http.ws_connect(
            f"{url}&cursor={cursor}", headers=d.headers("reader")) as ws:
        got = []
        while (event := json.loads((await asyncio.wait_for(ws.receive(), 15)).data))[
                "type"] != "ready":
            got.append(event)
    assert [e["message"]["text"] for e in got] == ["two", "three"]
    assert [e["cursor"] for e in got] == [e["cursor"] for e in events[1:]]
    # Reload: a new client's token works without a restart.
    token = "late-client-token-0123456789"
    token_file = tmp_path / "late.token"
    token_file.write_text(token)
    os.chmod(token_file, 0o600)
    with d.config.open("a") as f:
        f.write(f'[[api.clients]]\nname = "late"\ntoken_file = "{token_file}"\n'
                'accounts = ["bob"]\nmethods = "read-only"\n')
    status, _h, _b = await d.request("GET", "/v1/accounts/bob", client=None,
                                     headers={"Authorization": f"Bearer {token}"})
    assert status == 401
    d.process.send(signal.SIGHUP)

    async def accepted() -> bool:
        status, _h, _b = await d.request("GET", "/v1/accounts/bob", client=None,
                                         headers={"Authorization": f"Bearer {token}"})
        return status == 200

    await wait_for_condition(accepted, 15, "the reloaded client is accepted")
    status, _h, _b = await d.request("GET", "/v1/accounts/alice", client=None,
                                     headers={"Authorization": f"Bearer {token}"})
    assert status == 403


async def _connected(d: ApiDaemon, name: str) -> bool:
    try:
        return (await d.states()).get(name) == "connected"
    except (aiohttp.ClientError, AssertionError):
        return False


async def test_unix_socket_serves_the_api_with_file_permissions(api_daemon: ApiDaemon) -> None:
    d = api_daemon
    mode = d.unix_socket.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o660
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(str(d.unix_socket))) as http:
        async with http.get("http://localhost/v1/accounts/alice",
                            headers=d.headers("alice-app")) as r:
            assert r.status == 200
            assert (await r.json())["account"] == "alice"
        async with http.get("http://localhost/v1/accounts/bob",
                            headers=d.headers("alice-app")) as r:
            assert r.status == 403
        async with http.get("http://localhost/v1/accounts/alice") as r:
            assert r.status == 401
        async with http.get("http://localhost/status") as r:
            assert r.status == 404  # only the account API is on the socket
