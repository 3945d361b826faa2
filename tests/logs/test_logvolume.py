"""Issue 11 items 7 and 9, the pure parts: which records are fleet noise (a table), how a burst
becomes one summary line, and the file-descriptor budget checked at start."""

from __future__ import annotations

import asyncio
import errno
import io
import logging
import re
import resource
from pathlib import Path

import pytest
from aiohttp.http_exceptions import BadHttpMessage
from prometheus_client import CollectorRegistry

from tests.conftest import phone_for
from tgdaemon.config import parse_config
from tgdaemon.daemon import Daemon
from tgdaemon.exceptions import ConfigError
from tgdaemon.fdlimit import FIXED_FDS, FdBudget, FdReserve, budget, ensure_open_file_limit
from tgdaemon.logvolume import COUNTS, Noise, NoiseCollector, NoiseFilter, classify
from tgdaemon.status import State


def record(name: str, msg: str, level: int = logging.WARNING,
           exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, None) if exc is not None else None
    return logging.LogRecord(name, level, __file__, 1, msg, None, exc_info)


@pytest.mark.parametrize(("name", "msg", "level", "exc", "kind"), [
    ("tgdaemon.telethon.network.mtprotosender", "Automatic reconnection failed 0 time(s)",
     logging.ERROR, None, Noise.CONNECTION_LOST),
    ("telethon.network.mtprotosender", "Automatic reconnection failed 0 time(s)",
     logging.ERROR, None, Noise.CONNECTION_LOST),
    ("tgdaemon.telethon.network.connection.connection",
     "Server closed the connection: 0 bytes read", logging.WARNING, None,
     Noise.CONNECTION_CLOSED),
    # What a server sending garbage causes (measured with a random-bytes server).
    ("tgdaemon.telethon.network.connection.connection",
     "Server response had invalid buffer: Invalid response buffer (too short b'x')",
     logging.WARNING, None, Noise.CONNECTION_CLOSED),
    ("tgdaemon.telethon.network.mtprotosender",
     "Attempt 1 at connecting failed: ConnectionRefusedError: [Errno 111]", logging.WARNING,
     None, Noise.CONNECT_FAILED),
    ("tgdaemon.telethon.network.mtprotosender",
     "Attempt 1 at connecting failed: OSError: [Errno 24] Too many open files",
     logging.WARNING, None, Noise.FD_EXHAUSTED),
    ("asyncio", "socket.accept() out of system resource", logging.ERROR,
     OSError(errno.EMFILE, "Too many open files"), Noise.FD_EXHAUSTED),
    ("tgdaemon.account", "[a] connect failed", logging.ERROR,
     ConnectionError("x").with_traceback(None), None),
    ("aiohttp.server", "Error handling request from 127.0.0.1", logging.ERROR,
     BadHttpMessage("bad"), Noise.MALFORMED_HTTP),
    # A handler bug is not noise: its traceback stays an ERROR.
    ("aiohttp.server", "Error handling request from 127.0.0.1", logging.ERROR,
     KeyError("x"), None),
    ("asyncio", "Future exception was never retrieved", logging.ERROR, None,
     Noise.UNRETRIEVED),
    # get_me in an update handler when the server closes the connection (fleet takeovers)
    ("tgdaemon.telethon.client.updates",
     "Fatal error handling updates (this is a bug in Telethon v%s, please report it)",
     logging.ERROR, asyncio.IncompleteReadError(b"", 8), Noise.CONNECTION_CLOSED),
    ("tgdaemon.telethon.client.updates",
     "Fatal error handling updates (this is a bug in Telethon v%s, please report it)",
     logging.ERROR, ValueError("a real bug"), None),
    ("tgdaemon.worker", "Automatic reconnection failed", logging.ERROR, None, None),
    # 10,101 of these in one 10,000-account outage (closes queue behind each other)
    ("tgdaemon.worker.close", "client did not close cleanly (%s); replacing it: %s",
     logging.WARNING, None, Noise.CLOSE_TIMEOUT),
    ("tgdaemon.account", "[a] client did not close cleanly (TimeoutError)", logging.WARNING,
     None, None),
    ("tgdaemon.telethon.network.mtprotosender", "Something else", logging.ERROR, None, None),
])
def test_classify(name: str, msg: str, level: int, exc: BaseException | None,
                  kind: Noise | None):
    rule = classify(record(name, msg, level, exc))
    assert (rule.kind if rule else None) == kind


def test_fd_exhaustion_is_found_in_the_cause_chain():
    try:
        try:
            raise OSError(errno.EMFILE, "Too many open files")
        except OSError as inner:
            raise ConnectionError("connect failed") from inner
    except ConnectionError as outer:
        rule = classify(record("tgdaemon.account", "[a] failed", logging.ERROR, outer))
    assert rule is not None
    assert rule.kind is Noise.FD_EXHAUSTED


async def test_a_burst_is_demoted_and_summarised_in_one_line():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    noise = NoiseFilter(window=0.2)
    handler.addFilter(noise)
    telethon = logging.getLogger("tgdaemon.telethon.network.mtprotosender")
    summaries = logging.getLogger("tgdaemon.logvolume")
    for logger in (telethon, summaries):
        logger.addHandler(handler)
        logger.propagate = False
    telethon.setLevel(logging.WARNING)
    before = COUNTS[Noise.CONNECTION_LOST]
    try:
        for _ in range(500):
            telethon.error("Automatic reconnection failed %d time(s)", 0)
        logging.getLogger("tgdaemon.telethon.network.mtprotosender").warning("other")
        assert stream.getvalue() == "WARNING tgdaemon.telethon.network.mtprotosender: other\n"
        deadline = asyncio.get_running_loop().time() + 5
        while "logvolume" not in stream.getvalue():
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        lines = stream.getvalue().splitlines()
        assert lines[1] == ("WARNING tgdaemon.logvolume: 500 Telethon connections ended (the "
                            "workers reconnect them) in the last 0.2 s (per-account detail at "
                            "debug level)")
        assert COUNTS[Noise.CONNECTION_LOST] - before == 500
        # At debug level the detail is shown, as DEBUG.
        telethon.setLevel(logging.DEBUG)
        telethon.error("Automatic reconnection failed %d time(s)", 0)
        assert stream.getvalue().splitlines()[-1].startswith("DEBUG tgdaemon.telethon")
    finally:
        for logger in (telethon, summaries):
            logger.removeHandler(handler)
            logger.propagate = True
        telethon.setLevel(logging.NOTSET)


async def test_a_pending_summary_is_written_when_the_daemon_stops(
        make_config, login_account, localdc, wait_until):
    """A burst's summary is due a window (here 600 s) after it: the daemon's stop writes it
    rather than losing it with the event loop."""
    config = make_config([{"name": "alice", "phone": phone_for("alice")}],
                         daemon={"http_listen": ""})
    await login_account(config, "alice")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(NoiseFilter(window=600))
    loggers = [logging.getLogger(n) for n in ("tgdaemon.telethon", "tgdaemon.logvolume")]
    for logger in loggers:
        logger.addHandler(handler)
    before = COUNTS[Noise.CONNECTION_LOST]
    ours = "in the last 600 s"
    try:
        async with Daemon(config) as daemon:
            await wait_until(lambda: daemon.board.counts()[State.CONNECTED] == 1, 10,
                             "connected")
            localdc.drop_connections()  # Telethon: "Automatic reconnection failed" (ERROR)
            await wait_until(lambda: COUNTS[Noise.CONNECTION_LOST] > before, 10, "noise")
            assert ours not in stream.getvalue()  # due in 600 s
        # Only this filter's lines: another test's handler may still hold a filter of its own.
        lines = [line for line in stream.getvalue().splitlines() if ours in line]
        assert len(lines) == 1, lines
        assert re.fullmatch(r"WARNING tgdaemon\.logvolume: [1-9]\d* Telethon connections ended "
                            r"\(the workers reconnect them\) in the last 600 s \(per-account "
                            r"detail at debug level\)", lines[0]), lines[0]
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def test_counts_are_exported_for_every_kind():
    registry = CollectorRegistry()
    registry.register(NoiseCollector())
    kinds = {s.labels["kind"] for f in registry.collect() for s in f.samples
             if f.name == "tgdaemon_log_events_summarised"}
    assert kinds == {k.value for k in Noise}
    assert registry.get_sample_value("tgdaemon_fd_exhausted_total") is not None


# -- the file-descriptor budget ------------------------------------------------------------


def config(accounts: int, **daemon: object):
    data = {"daemon": daemon, "telegram": {"api_id": 1, "api_hash": "0" * 32},
            "accounts": [{"name": f"a{i}"} for i in range(accounts)]}
    return parse_config(data, path=Path("/etc/t.toml"), env={})


def test_budget_counts_accounts_connects_http_and_the_process():
    need = budget(config(10_000), http_connections=256)
    assert need == FdBudget(accounts=10_000, connects=100, http=256)
    assert need.total == 10_000 + 100 + 256 + FIXED_FDS
    assert budget(config(3, http_listen=""), 256) == FdBudget(3, 3, 0)
    # a fleet instance: at most its capacity of the listed accounts
    fleet = config(40_000, instance_id="d1", capacity=10_000)
    assert budget(fleet, 256) == FdBudget(accounts=10_000, connects=100, http=256)
    assert budget(config(50, instance_id="d1", capacity=10_000), 256).accounts == 50


def test_budget_counts_the_api_unix_socket_as_a_listener(tmp_path: Path) -> None:
    token = tmp_path / "t.token"
    token.write_text("budget-token-0123456789\n")
    token.chmod(0o600)
    data = {"telegram": {"api_id": 1, "api_hash": "0" * 32}, "accounts": [{"name": "a"}],
            "api": {"unix_socket": str(tmp_path / "api.sock"),
                    "clients": [{"name": "c", "token_file": str(token), "accounts": ["*"]}]}}
    assert budget(parse_config(data, path=tmp_path / "t.toml", env={}), 256).http == 512
    data["daemon"] = {"http_listen": ""}
    assert budget(parse_config(data, path=tmp_path / "t.toml", env={}), 256).http == 256


class Limits:
    def __init__(self, soft: int, hard: int, settable: bool = True) -> None:
        self.soft, self.hard, self.settable = soft, hard, settable

    def get(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.soft, self.hard

    def set(self, which: int, limits: tuple[int, int]) -> None:
        if not self.settable or limits[0] == resource.RLIM_INFINITY:
            raise ValueError("not allowed")
        self.soft, self.hard = limits


@pytest.mark.parametrize(("soft", "hard", "settable", "need", "result"), [
    (1024, 524288, True, 10_420, 524288),  # systemd's defaults: raised to the hard limit
    (1024, 524288, True, 500, 524288),  # raised even when not needed now (reloads add)
    (4096, 4096, True, 4000, 4096),
    (1024, 8192, True, 10_420, ConfigError),  # even the hard limit is too low
    (1024, 524288, False, 10_420, ConfigError),  # cannot raise
    (1024, 524288, False, 900, 1024),
    (1024, resource.RLIM_INFINITY, True, 10_420, 10_420),  # unlimited: take what is needed
])
def test_ensure_open_file_limit(soft: int, hard: int, settable: bool, need: int,
                                result: int | type):
    limits = Limits(soft, hard, settable)
    demand = FdBudget(accounts=need - FIXED_FDS, connects=0, http=0)
    if result is ConfigError:
        with pytest.raises(ConfigError, match=rf"needs {need} file descriptors .* "
                                              "raise LimitNOFILE="):
            ensure_open_file_limit(demand, getrlimit=limits.get, setrlimit=limits.set)
    else:
        assert ensure_open_file_limit(demand, getrlimit=limits.get,
                                      setrlimit=limits.set) == result
        assert limits.soft == result


def test_the_reserve_releases_only_spares_it_could_take_back():
    reserve = FdReserve(3)
    reserve.fill()
    try:
        assert reserve.held == 3
        spares = sorted(reserve._fds)
        # A soft limit lowered below the spares: closing one would lose it for nothing.
        assert not reserve.release(getrlimit=lambda _: (spares[0], 1 << 20))
        assert reserve.held == 3
        assert reserve.release(getrlimit=lambda _: (spares[0] + 1, 1 << 20))
        assert sorted(reserve._fds) == spares[1:]  # the lowest went
        reserve.fill()
        assert sorted(reserve._fds) == spares  # and came back under its number
    finally:
        reserve.close()
    assert reserve.held == 0
    assert not reserve.release()
