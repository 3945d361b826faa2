"""The account API's pure parts and bounds: [api] config keys, admission table, lanes,
timeouts, cursors, TL JSON, the persisted update buffer."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from telethon.tl import types as tl

from tgdaemon.api.events import (
    BACKLOG_PAGE,
    CursorError,
    EventKind,
    UpdateBuffer,
    decode_cursor,
    encode_cursor,
    event_from_update,
)
from tgdaemon.api.gateway import ApiError, Gateway, Outcome, admission
from tgdaemon.api.peers import PeerRef, parse_peer
from tgdaemon.api.tljson import TlJsonError, build_request, to_json
from tgdaemon.apiconfig import READ_ONLY, ApiConfig, ApiMethod, authenticate
from tgdaemon.config import ConfigValidationError, load_config
from tgdaemon.crypto import generate_keyring
from tgdaemon.lifecycle import State
from tgdaemon.status import AccountStatus

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "tgdaemon.example.toml"
HASH = "0123456789abcdef0123456789abcdef"


def _token(tmp_path: Path, name: str = "t", value: str = "s3cret-token-0123456789",
           mode: int = 0o600) -> Path:
    path = tmp_path / f"{name}.token"
    path.write_text(value + "\n")
    os.chmod(path, mode)
    return path


def _load(tmp_path: Path, api: str) -> Any:
    p = tmp_path / "t.toml"
    p.write_text(f'[telegram]\napi_id = 1\napi_hash = "{HASH}"\n'
                 f'[[accounts]]\nname = "alice"\n{api}')
    return load_config(p, env={})


def test_example_documents_every_api_key_with_its_default(tmp_path: Path) -> None:
    cfg = load_config(EXAMPLE, env={})
    assert cfg.api == ApiConfig()
    assert not cfg.api.enabled
    text = EXAMPLE.read_text()
    for f in dataclasses.fields(ApiConfig):
        if f.name != "clients":
            assert f"\n{f.name} = " in text, f.name
    # The commented client block is valid once uncommented (with a real token file).
    block = text[text.index("# [[api.clients]]"):].split("\n\n")[0]
    uncommented = "\n".join(line[2:] for line in block.splitlines())
    token = _token(tmp_path)
    uncommented = uncommented.replace("/etc/tgdaemon/webapp.token", str(token))
    cfg = _load(tmp_path, "[api]\n" + uncommented + "\n")
    (client,) = cfg.api.clients
    assert client.name == "webapp"
    assert client.accounts == ("alice", "shop-*")
    assert client.token == "s3cret-token-0123456789"
    assert "s3cret" not in repr(cfg)


def test_client_keys(tmp_path: Path) -> None:
    a, b = _token(tmp_path, "a"), _token(tmp_path, "b", "another-token-abcdefgh")
    cfg = _load(tmp_path, f"""[api]
updates_buffer = 7
account_concurrency = 2
account_queue = 0
max_in_flight = 3
max_queued = 0
max_rate = 12
request_timeout = 1.5
unix_socket = "api.sock"
[[api.clients]]
name = "one"
token_file = "{a}"
accounts = ["alice", "shop-*"]
methods = "read-only"
[[api.clients]]
name = "two"
token_file = "{b}"
accounts = ["*"]
methods = ["send_message", "invoke"]
""")
    api = cfg.api
    assert (api.updates_buffer, api.account_concurrency, api.account_queue,
            api.max_in_flight, api.max_queued, api.max_rate,
            api.request_timeout) == (7, 2, 0, 3, 0, 12.0, 1.5)
    assert api.unix_socket == tmp_path / "api.sock"  # relative to the config file
    one, two = api.clients
    assert one.methods == READ_ONLY
    assert two.methods == {ApiMethod.SEND_MESSAGE, ApiMethod.INVOKE}
    assert one.may_use("alice")
    assert one.may_use("shop-1")
    assert not one.may_use("bob")
    assert two.may_use("bob")
    assert not one.may_call(ApiMethod.SEND_MESSAGE)
    assert authenticate(api.clients, "another-token-abcdefgh") is two
    assert authenticate(api.clients, "another-token-abcdefgX") is None
    assert authenticate(api.clients, "") is None


@pytest.mark.parametrize(("snippet", "problem"), [
    ('updates_buffer = 0', "api.updates_buffer: must be >= 1"),
    ('account_concurrency = 0', "api.account_concurrency: must be >= 1"),
    ('account_queue = -1', "api.account_queue: must be >= 0"),
    ('request_timeout = 0', "api.request_timeout: must be > 0"),
    ('max_in_flight = 0', "api.max_in_flight: must be >= 1"),
    ('max_queued = -1', "api.max_queued: must be >= 0"),
    ('max_rate = -1', "api.max_rate: must be >= 0"),
    ('max_rate = "fast"', "api.max_rate"),
    ('nope = 1', "api.nope: unknown key"),
    ('unix_socket = "/' + 'x' * 120 + '"', "api.unix_socket: path longer than 107 bytes"),
    ('[[api.clients]]\nname = "x"\naccounts = ["*"]', "api.clients[0].token_file: required"),
    ('[[api.clients]]\nname = "Bad Name"\ntoken_file = "{tok}"\naccounts = ["*"]',
     "api.clients[0].name: must match"),
    ('[[api.clients]]\nname = "x"\ntoken_file = "{tok}"', "api.clients[0].accounts: required"),
    ('[[api.clients]]\nname = "x"\ntoken_file = "{tok}"\naccounts = []',
     "api.clients[0].accounts: must be a non-empty array"),
    ('[[api.clients]]\nname = "x"\ntoken_file = "{tok}"\naccounts = ["*"]\nmethods = ["fly"]',
     "api.clients[0].methods[0]: must be one of"),
    ('[[api.clients]]\nname = "x"\ntoken_file = "{tok}"\naccounts = ["*"]\nmethods = "some"',
     "api.clients[0].methods: must be"),
    ('[[api.clients]]\nname = "x"\ntoken_file = "{short}"\naccounts = ["*"]',
     "api.clients[0].token_file: must hold one token of at least 16"),
    ('[[api.clients]]\nname = "x"\ntoken_file = "{open}"\naccounts = ["*"]',
     "must not be readable by group or others"),
    ('[[api.clients]]\nname = "x"\ntoken_file = "{tok}"\naccounts = ["*"]\n'
     '[[api.clients]]\nname = "x"\ntoken_file = "{tok2}"\naccounts = ["*"]',
     "api.clients[1].name: duplicate client name"),
    ('[[api.clients]]\nname = "x"\ntoken_file = "{tok}"\naccounts = ["*"]\n'
     '[[api.clients]]\nname = "y"\ntoken_file = "{tok}"\naccounts = ["*"]',
     "api.clients[1].token_file: the same token as another client"),
])
def test_bad_api_config(tmp_path: Path, snippet: str, problem: str) -> None:
    paths = {"tok": _token(tmp_path, "tok"), "tok2": _token(tmp_path, "tok2", "x" * 20),
             "short": _token(tmp_path, "short", "abc"),
             "open": _token(tmp_path, "open", "y" * 20, 0o644)}
    text = "[api]\n" + snippet.format(**{k: str(v) for k, v in paths.items()}) + "\n"
    with pytest.raises(ConfigValidationError) as info:
        _load(tmp_path, text)
    assert any(problem in p for p in info.value.problems), info.value.problems
    assert "abc" not in str(info.value)
    assert "y" * 20 not in str(info.value)


NOW = 1_000_000.0


@pytest.mark.parametrize(("state", "until", "outcome", "retry_after"), [
    (State.CONNECTED, None, None, None),
    (State.FLOOD_WAIT, NOW + 7.2, Outcome.FLOOD_WAIT, 8),
    (State.FLOOD_WAIT, NOW - 1, Outcome.FLOOD_WAIT, 1),
    (State.NEEDS_LOGIN, None, Outcome.PARKED, None),
    (State.BANNED, None, Outcome.PARKED, None),
    (State.DUPLICATED, None, Outcome.PARKED, None),
    (State.DISABLED, None, Outcome.PARKED, None),
    (State.STOPPED, None, Outcome.PARKED, None),
    (State.STARTING, None, Outcome.UNAVAILABLE, 1),
    (State.CONNECTING, None, Outcome.UNAVAILABLE, 1),
    (State.RECONNECTING, None, Outcome.UNAVAILABLE, 1),
])
def test_admission_table(state: State, until: float | None, outcome: Outcome | None,
                         retry_after: int | None) -> None:
    got = admission(AccountStatus("a", state=state, reason="why", flood_wait_until=until), NOW)
    assert (got.outcome if got else None) is outcome
    if got is not None:
        assert got.retry_after == retry_after
        assert state.value in got.message
    assert admission(None, NOW).outcome is Outcome.NOT_FOUND  # type: ignore[union-attr]


class _Client:
    def is_connected(self) -> bool:
        return True


class _Handle:
    """An account whose client is a plain object: the gateway only hands it to ``fn``."""

    def __init__(self) -> None:
        self.client: Any = _Client()
        self.held: list[BaseException] = []

    def hold_for_flood_wait(self, exc: BaseException) -> None:
        self.held.append(exc)


def _gateway(handle: _Handle, **api: Any) -> Gateway:
    return Gateway(lambda: ApiConfig(**api), lambda n: AccountStatus(n, state=State.CONNECTED),
                   lambda n: handle, clock=lambda: NOW, monotonic=asyncio.get_running_loop().time)


async def _until(predicate: Callable[[], bool]) -> None:
    """Let the loop run (no wall-clock wait) until ``predicate`` holds."""
    for _ in range(100):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached within 100 loop iterations")


async def test_lane_bounds_concurrency_and_queue() -> None:
    handle = _Handle()
    gw = _gateway(handle, account_concurrency=2, account_queue=1, request_timeout=5)
    release = asyncio.Event()
    running = 0
    peak = 0

    async def work(_client: Any) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await release.wait()
        running -= 1
        return 1

    calls = [asyncio.create_task(gw.call("a", work)) for _ in range(3)]
    await _until(lambda: running == 2)
    assert (gw.running, gw.waiting) == (2, 1)
    with pytest.raises(ApiError) as busy:
        await gw.call("a", work)
    assert busy.value.outcome is Outcome.BUSY
    release.set()
    assert await asyncio.gather(*calls) == [1, 1, 1]
    assert peak == 2
    assert await gw.call("b", work) == 1  # another account has its own lane


async def test_request_timeout_and_flood_wait_handover() -> None:
    from telethon.errors import FloodWaitError

    handle = _Handle()
    gw = _gateway(handle, request_timeout=0.05)

    async def forever(_client: Any) -> None:
        await asyncio.Event().wait()

    with pytest.raises(ApiError) as slow:
        await gw.call("a", forever)
    assert slow.value.outcome is Outcome.TIMEOUT

    async def flooded(_client: Any) -> None:
        raise FloodWaitError(request=None, capture=9)

    with pytest.raises(ApiError) as flood:
        await gw.call("a", flooded)
    assert (flood.value.status, flood.value.retry_after) == (429, 9)
    assert len(handle.held) == 1
    calls = 0

    async def counted(_client: Any) -> None:
        nonlocal calls
        calls += 1

    with pytest.raises(ApiError) as again:
        await gw.call("a", counted)
    assert again.value.outcome is Outcome.FLOOD_WAIT
    assert calls == 0  # refused before anything reached the client


def test_cursor_round_trip_and_foreign_cursors() -> None:
    c = encode_cursor("abc", 42)
    assert decode_cursor("abc", c) == 42
    for bad in (encode_cursor("other", 42), "!!!", encode_cursor("abc", -1)[:-1] + "x"):
        with pytest.raises(CursorError):
            decode_cursor("abc", bad)


def test_peer_parsing() -> None:
    assert parse_peer(5) == PeerRef(id=5)
    assert parse_peer("-100123") == PeerRef(id=-100123)
    assert parse_peer("@someone") == PeerRef(username="someone")
    assert parse_peer("+1 555 0100").phone == "15550100"
    assert "15550100" not in repr(parse_peer("+15550100"))
    assert parse_peer("me").me
    for bad in ("", "@x", True, None, 1.5, "+1"):
        with pytest.raises(ValueError, match="peer must be"):
            parse_peer(bad)


def test_tl_json_builds_nested_objects_and_encodes_results() -> None:
    req = build_request({"_": "messages.sendMessage", "peer": {"_": "inputPeerSelf"},
                         "message": "x", "random_id": 1,
                         "entities": [{"_": "messageEntityBold", "offset": 0, "length": 1}]})
    assert isinstance(req.entities[0], tl.MessageEntityBold)
    assert to_json(tl.PeerUser(3)) == {"_": "PeerUser", "user_id": 3}
    assert to_json({"b": b"\x00\x01"}) == {"b": "AAE="}
    for bad in ({}, {"_": "nope.nope"}, {"_": "auth.signIn"},
                {"_": "invokeWithLayer", "layer": 1, "query": {}},
                {"_": "messages.getHistory", "peer": {"x": 1}}):
        with pytest.raises(TlJsonError):
            build_request(bad)


def test_updates_become_events() -> None:
    msg = tl.Message(id=3, peer_id=tl.PeerUser(9), date=None, message="hi")
    kind, body = event_from_update(tl.UpdateNewMessage(msg, 1, 1))  # type: ignore[misc]
    assert kind is EventKind.MESSAGE
    assert body["message"]["text"] == "hi"
    assert event_from_update(tl.UpdateDeleteMessages([3], 2, 1)) == (
        EventKind.DELETE, {"peer": None, "messageIds": [3]})
    assert event_from_update(tl.UpdateUserTyping(1, tl.SendMessageTypingAction())) is None


async def test_buffer_keeps_the_newest_per_account_across_restarts(tmp_path: Path) -> None:
    ring = generate_keyring()
    buf = UpdateBuffer(tmp_path, ring, size=3)
    await buf.open()
    try:
        for i in range(5):
            buf.append("a", EventKind.MESSAGE, {"n": i})
        buf.append("b", EventKind.MESSAGE, {"n": 100})
        await buf.flush()
    finally:
        await buf.close()
    raw = (tmp_path / "api-updates.sqlite3").read_bytes()
    assert b'"n": 4' not in raw  # bodies are encrypted at rest
    assert oct((tmp_path / "api-updates.sqlite3").stat().st_mode & 0o777) == "0o600"
    again = UpdateBuffer(tmp_path, ring, size=3)
    await again.open()
    try:
        held = [e async for e in again.backlog(None, 0, again.last_seq)]
        assert [(e.kind, e.account, e.body.get("n")) for e in held] == [
            (EventKind.GAP, "a", None), (EventKind.MESSAGE, "a", 2),
            (EventKind.MESSAGE, "a", 3), (EventKind.MESSAGE, "a", 4),
            (EventKind.MESSAGE, "b", 100)]
        after = [e async for e in again.backlog(frozenset({"a"}), held[1].seq, again.last_seq)]
        assert [e.body["n"] for e in after] == [3, 4]
        assert again.append("a", EventKind.EDIT, {}).seq == 7  # numbering continues
    finally:
        await again.close()


async def test_a_backlog_is_read_a_page_at_a_time(tmp_path: Path) -> None:
    """2.5 pages of two accounts' events, read page by page: all of them, in order, once,
    filtered."""
    buf = UpdateBuffer(tmp_path, generate_keyring(), size=1000)
    await buf.open()
    try:
        for i in range(BACKLOG_PAGE * 5 // 2):
            buf.append("a" if i % 3 else "b", EventKind.MESSAGE, {"n": i})
        await buf.flush()
        every = [e.body["n"] async for e in buf.backlog(None, 0, buf.last_seq)]
        assert every == list(range(BACKLOG_PAGE * 5 // 2))
        b_only = [e.body["n"] async for e in buf.backlog(frozenset({"b"}), 10, buf.last_seq)]
        assert b_only == [n for n in range(10, BACKLOG_PAGE * 5 // 2) if n % 3 == 0]
    finally:
        await buf.close()


async def test_a_subscriber_that_falls_behind_is_closed_and_marked() -> None:
    from tgdaemon.api.events import Event, Subscriber

    sub = Subscriber(frozenset({"a"}), maxsize=3)
    assert sub.wants("a")
    assert not sub.wants("b")
    for i in range(5):
        sub.offer(Event(i, "a", EventKind.MESSAGE, {}))
    assert sub.overflowed
    assert sub.closed
    got = [e.seq async for e in sub]
    assert got == [0, 1, 2]  # a prefix: resuming from the cursor of 2 misses nothing


# -- the scheduler: who runs next (pure; a script of steps and what each gives) --------------

#: Steps: ("+", client, account) submits a call (tickets are numbered from 0 in that order);
#: ("run", now) is a scheduling pass; ("end", n) ends call n. Expected per step: for "+",
#: "ok", "ok, evicts n" or the refusal; for "run", the tickets granted (and "again@t").
SCRIPTS: dict[str, tuple[dict[str, Any], list[tuple[tuple[Any, ...], str]]]] = {
    "max_in_flight bounds what runs": (dict(max_in_flight=2, max_queued=10, max_rate=0), [
        (("+", "A", "a"), "ok"), (("+", "A", "a"), "ok"), (("+", "A", "a"), "ok"),
        (("run", 0), "0 1"), (("run", 0), ""), (("end", 0), ""), (("run", 0), "2")]),
    "turns go round-robin over clients": (dict(max_in_flight=1, max_rate=0), [
        *[(("+", "A", "a"), "ok")] * 4, (("+", "B", "b"), "ok"), (("+", "B", "b"), "ok"),
        (("run", 0), "0"), (("end", 0), ""), (("run", 0), "4"), (("end", 4), ""),
        (("run", 0), "1"), (("end", 1), ""), (("run", 0), "5"), (("end", 5), ""),
        (("run", 0), "2")]),
    "then over a client's accounts": (dict(max_in_flight=1, max_rate=0), [
        (("+", "A", "a"), "ok"), (("+", "A", "a"), "ok"), (("+", "A", "b"), "ok"),
        (("run", 0), "0"), (("end", 0), ""), (("run", 0), "2"), (("end", 2), ""),
        (("run", 0), "1")]),
    "account_concurrency holds an account back, not the others": (
        dict(account_concurrency=1, max_rate=0), [
            (("+", "A", "a"), "ok"), (("+", "A", "a"), "ok"), (("+", "A", "b"), "ok"),
            (("run", 0), "0 2"), (("end", 2), ""), (("run", 0), ""), (("end", 0), ""),
            (("run", 0), "1")]),
    "account_queue bounds an account's waiting calls": (
        dict(account_concurrency=1, account_queue=1, max_rate=0), [
            (("+", "A", "a"), "ok"), (("+", "B", "a"), "ok"), (("+", "A", "a"), "account_full"),
            (("+", "A", "b"), "ok")]),
    "a full daemon: a newcomer pushes out the biggest holder's newest waiting call": (
        dict(max_in_flight=1, max_queued=2, max_rate=0), [
            (("+", "A", "a"), "ok"), (("+", "A", "b"), "ok"), (("+", "A", "a"), "ok"),
            (("run", 0), "0"),
            (("+", "B", "c"), "ok, evicts 2"),  # A held 3, B 0
            (("+", "B", "c"), "daemon_full"),  # A 2, B 1: even enough
            (("+", "A", "a"), "over_share"),  # A holds the most
            # B joined the rotation behind A (as in deficit round-robin): A, then B.
            (("end", 0), ""), (("run", 0), "1"), (("end", 1), ""), (("run", 0), "3")]),
    "a call that gave up waiting leaves no trace": (dict(max_in_flight=1, max_rate=0), [
        (("+", "A", "a"), "ok"), (("+", "A", "a"), "ok"), (("+", "A", "a"), "ok"),
        (("run", 0), "0"), (("end", 1), ""), (("end", 0), ""), (("run", 0), "2")]),
    "max_rate: a second's worth at once, then one per 1/rate s": (dict(max_rate=2), [
        *[(("+", "A", "a"), "ok")] * 4,
        (("run", 10.0), "0 1 again@10.5"), (("run", 10.25), "again@10.5"),
        (("run", 10.5), "2 again@11.0"), (("run", 11.0), "3")]),
    "a rate below one a second still starts calls": (dict(max_rate=0.5), [
        (("+", "A", "a"), "ok"), (("+", "A", "a"), "ok"),
        (("run", 0.0), "0 again@2.0"), (("run", 2.0), "1")]),
    "a pass starts a bounded number of calls": (dict(max_rate=0, account_concurrency=10), [
        *[(("+", "A", "a"), "ok")] * 6, (("run", 0), "0 1 2 3 again@0.0"), (("run", 0), "4 5")]),
}


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_scheduler(name: str) -> None:
    from tgdaemon.api.admission import Admitted, Scheduler, Ticket

    overrides, steps = SCRIPTS[name]
    limits = dataclasses.replace(ApiConfig(), **overrides)
    scheduler = Scheduler()
    tickets: list[Ticket] = []
    for step, expected in steps:
        if step[0] == "+":
            ticket = Ticket(step[1], step[2])
            tickets.append(ticket)
            result = scheduler.submit(ticket, limits)
            if isinstance(result, Admitted):
                got = "ok" if result.evicted is None else \
                    f"ok, evicts {tickets.index(result.evicted)}"
            else:
                got = result.why.value
                assert result.retry_after >= 1
        elif step[0] == "run":
            done = scheduler.schedule(limits, step[1])
            got = " ".join([*(str(tickets.index(t)) for t in done.granted),
                            *([f"again@{done.again_at}"] if done.again_at is not None else [])])
        else:
            scheduler.finish(tickets[step[1]], limits)
            got = ""
        assert got == expected, (step, scheduler.running, scheduler.waiting)
    assert scheduler.running + scheduler.waiting == sum(
        t.state.value != "done" for t in tickets)


async def test_a_full_daemon_refuses_at_once_with_retry_after() -> None:
    """Through the gateway: calls beyond max_in_flight + max_queued get 429/503 with
    Retry-After at once; a call pushed out of the queue is answered 429 at once too."""
    handle = _Handle()
    limits = dict(max_in_flight=1, max_queued=1, max_rate=0, request_timeout=5)
    gw = _gateway(handle, **limits)
    release = asyncio.Event()

    async def work(_client: Any) -> int:
        await release.wait()
        return 1

    first = asyncio.create_task(gw.call("a", work, client="A"))
    queued = asyncio.create_task(gw.call("a", work, client="A"))
    await _until(lambda: (gw.running, gw.waiting) == (1, 1))
    with pytest.raises(ApiError) as over:
        await gw.call("b", work, client="A")
    assert (over.value.status, over.value.retry_after) == (429, 1)
    # Another client: A's waiting call makes room and is answered at once.
    fair = asyncio.create_task(gw.call("b", work, client="B"))
    with pytest.raises(ApiError) as pushed:
        await queued
    assert pushed.value.outcome is Outcome.BUSY
    with pytest.raises(ApiError) as full:  # A 1 running, B 1 waiting: nobody is over
        await gw.call("c", work, client="C")
    assert (full.value.status, full.value.outcome, full.value.retry_after) == (
        503, Outcome.OVERLOADED, 1)
    release.set()
    assert await asyncio.gather(first, fair) == [1, 1]
    assert (gw.running, gw.waiting) == (0, 0)
