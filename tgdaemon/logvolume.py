"""Log volume: a fleet-wide event is one summary line, not one line per account.

Telethon logs every lost connection (``Automatic reconnection failed 0 time(s)`` at ERROR, as
its own retries are off), every failed connect attempt and every server close at WARNING;
aiohttp logs a malformed request as an ERROR with a traceback; asyncio reports an exception
nobody retrieved. Each is harmless and already handled (the worker reconnects, the client got a
400), but with 10,000 accounts one server drop would write 10,000 ERROR lines, and running out
of file descriptors hundreds of thousands.

:class:`NoiseFilter` sits on the one handler: a record it recognises (:data:`NOISE`, a table)
is demoted to DEBUG (shown only when its logger is at debug) and counted; the first of a burst
schedules one summary line ``window`` seconds later with the count. Counts are exported as
``tgdaemon_log_events_summarised_total{kind}`` and, for EMFILE/ENFILE,
``tgdaemon_fd_exhausted_total``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import weakref
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Generic, TypeVar

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("tgdaemon.logvolume")

#: Errors that mean "out of file descriptors" (per process, system-wide).
FD_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE})
_FD_TEXT = ("Too many open files", "Errno 24]", "Errno 23]", "out of system resource")


class Noise(StrEnum):
    CONNECTION_LOST = "connection_lost"
    CONNECTION_CLOSED = "connection_closed"  # the reason a lost connection was lost
    CONNECT_FAILED = "connect_failed"
    MALFORMED_HTTP = "malformed_http"
    UNRETRIEVED = "unretrieved_exception"
    FD_EXHAUSTED = "fd_exhausted"
    CLOSE_TIMEOUT = "close_timeout"  # a worker replaced a client that did not close in time


@dataclass(frozen=True, slots=True)
class Rule:
    kind: Noise
    logger: str  # a logger name or a parent of it
    prefix: str  # the message starts with this
    summary: str  # "{n} <summary> in the last {w} s"; "" = counted, no line of its own
    level: int = logging.WARNING  # of the summary line


#: A kind of line (a :class:`Noise`, a wave's key).
K = TypeVar("K")

_TELETHON = ("telethon.network", "tgdaemon.telethon.network")

#: What is recognised; the first matching rule wins. An fd-exhaustion record of any logger
#: becomes FD_EXHAUSTED whatever rule it also matches.
NOISE: tuple[Rule, ...] = (
    *(Rule(Noise.CONNECTION_LOST, name, "Automatic reconnection failed",
           "Telethon connections ended (the workers reconnect them)")
      for name in _TELETHON),
    # Logged just before the line above for the same connection: counted, not summarised.
    *(Rule(Noise.CONNECTION_CLOSED, name, prefix, "")
      for name in _TELETHON
      for prefix in ("Server closed the connection", "Connection closed while receiving data",
                     "Unhandled error while receiving", "Server response had invalid buffer")),
    # An update handler (Telethon's get_me while dispatching) cut by that lost connection;
    # Telethon calls it a bug of its own, with a traceback (only for connection errors).
    *(Rule(Noise.CONNECTION_CLOSED, name, "Fatal error handling updates", "")
      for name in ("telethon.client.updates", "tgdaemon.telethon.client.updates")),
    *(Rule(Noise.CONNECT_FAILED, name, "Attempt ",
           "Telethon connect attempts failed (the workers retry with backoff)")
      for name in _TELETHON),
    Rule(Noise.CLOSE_TIMEOUT, "tgdaemon.worker.close", "client did not close cleanly",
         "clients did not close in time and were replaced (a fleet-wide drop or a starved "
         "event loop)"),
    Rule(Noise.MALFORMED_HTTP, "aiohttp.server", "Error handling request",
         "malformed HTTP requests answered with 400", logging.INFO),
    Rule(Noise.UNRETRIEVED, "asyncio", "Future exception was never retrieved",
         "exceptions of finished background futures nobody awaited"),
    Rule(Noise.UNRETRIEVED, "asyncio", "Task exception was never retrieved",
         "exceptions of finished background tasks nobody awaited"),
)
_FD_RULE = Rule(Noise.FD_EXHAUSTED, "", "",
                "operations failed because the process is out of file descriptors "
                "(EMFILE: raise LimitNOFILE=)", logging.ERROR)

#: Process-wide counts, read by :class:`NoiseCollector` (the daemon's registry).
COUNTS: Counter[Noise] = Counter()


def classify(record: logging.LogRecord) -> Rule | None:
    """The rule a record falls under, or None for an ordinary line. Pure."""
    message = str(record.msg)
    if _is_fd_exhaustion(record, message):
        return _FD_RULE
    for rule in NOISE:
        if _under(record.name, rule.logger) and message.startswith(rule.prefix):
            if rule.kind is Noise.MALFORMED_HTTP and not _is_http_error(record):
                return None  # a bug in a handler: that traceback must stay an ERROR
            if rule.prefix.startswith("Fatal") and not _is_connection_lost(record):
                return None  # a real failure of an update handler stays an ERROR
            return rule
    return None


def _is_connection_lost(record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return isinstance(exc, (ConnectionError, asyncio.IncompleteReadError))


def _under(name: str, parent: str) -> bool:
    return name == parent or name.startswith(parent + ".")


def _is_fd_exhaustion(record: logging.LogRecord, message: str) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in FD_EXHAUSTED:
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    if record.levelno < logging.WARNING:
        return False
    text = message if not record.args else record.getMessage()
    return any(t in text for t in _FD_TEXT)


def _is_http_error(record: logging.LogRecord) -> bool:
    from aiohttp.http_exceptions import HttpProcessingError

    exc = record.exc_info[1] if record.exc_info else None
    return isinstance(exc, HttpProcessingError)


class _Windows(Generic[K]):
    """Summary windows, one per kind of line: a window opens with the kind's first line and
    when it ends (or at a stop: :func:`flush_summaries`) :meth:`flush` writes the kind's
    summary. What :class:`NoiseFilter` and :class:`Waves` share."""

    def __init__(self, window: float) -> None:
        self.window = window
        #: The summary timer of each kind with a window open.
        self._timers: dict[K, asyncio.TimerHandle] = {}
        _FILTERS.add(self)

    def _open(self, kind: K) -> bool:
        """Make sure ``kind`` has a window open; False when none can be (no event loop in
        this thread to end it)."""
        if kind not in self._timers:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return False
            self._timers[kind] = loop.call_later(self.window, self.flush, kind)
        return True

    def _close(self, kind: K) -> None:
        if (timer := self._timers.pop(kind, None)) is not None:
            timer.cancel()  # flushed early (a stop): the next burst gets a window of its own

    def flush(self, kind: K) -> None:
        raise NotImplementedError

    def flush_all(self) -> None:
        for kind in list(self._timers):
            self.flush(kind)


class NoiseFilter(_Windows[Noise], logging.Filter):
    """Demotes recognised records to DEBUG and summarises each burst in one line."""

    def __init__(self, window: float = 10.0) -> None:
        logging.Filter.__init__(self)
        _Windows.__init__(self, window)
        self._pending: Counter[Noise] = Counter()
        self._rules: dict[Noise, Rule] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == log.name:
            return True  # our own summaries
        rule = classify(record)
        if rule is None:
            return True
        COUNTS[rule.kind] += 1
        self._pending[rule.kind] += 1
        self._rules[rule.kind] = rule
        if rule.summary and not self._open(rule.kind):  # no loop in this thread: at once
            self.flush(rule.kind)
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)

    def flush(self, kind: Noise) -> None:
        self._close(kind)
        n = self._pending.pop(kind, 0)
        if n:
            rule = self._rules[kind]
            log.log(rule.level, "%d %s in the last %g s (per-account detail at debug level)",
                    n, rule.summary, self.window)


#: Per-account INFO lines of one kind written as they are in a window of :class:`Waves`.
WAVE_BURST = 20


class Waves(_Windows[str]):
    """Our own per-account INFO lines of one kind (an account connected, lost its
    connection, stopped): the first ``burst`` of a ``window`` are written as they are, the rest
    are not even built (the caller logs them at DEBUG, dropped before any record exists at
    info level) and one summary line tells how many there were when the window ends.

    :class:`NoiseFilter` demotes records that were already made; these are ours, so the check
    comes before the record: a fleet-wide wave (10,000 accounts connecting at start or after
    an outage, or stopping) cost one formatted, redacted, written line per account and event,
    ~50 us each (bench/connectcpu.py), in the event loop's busiest seconds. A kind is a short
    key from a closed vocabulary (a state, an error category and code); at most
    :data:`MAX_KINDS` are tracked at once, beyond that lines pass as they are."""

    MAX_KINDS = 64

    def __init__(self, burst: int = WAVE_BURST, window: float = 10.0) -> None:
        if burst < 0 or window <= 0:
            raise ValueError("burst must be >= 0 and window > 0")
        super().__init__(window)
        self.burst = burst
        #: Lines of each kind in its current window (written ones included).
        self._seen: Counter[str] = Counter()
        #: The level of each kind's lines (its summary's).
        self._levels: dict[str, int] = {}

    def admit(self, kind: str, level: int = logging.INFO) -> bool:
        """Whether a line of ``kind`` is written at its own ``level`` now; False: counted for
        the summary, written at that level (the caller logs the line at DEBUG). Every line is
        admitted outside an event loop (no timer for the summary) and past
        :data:`MAX_KINDS`."""
        seen = self._seen[kind] = self._seen[kind] + 1
        if seen == 1:
            if len(self._timers) >= self.MAX_KINDS or not self._open(kind):
                del self._seen[kind]
                return True
            self._levels[kind] = level
        return seen <= self.burst

    def flush(self, kind: str) -> None:
        self._close(kind)
        more = self._seen.pop(kind, 0) - self.burst
        level = self._levels.pop(kind, logging.INFO)
        if more > 0:
            log.log(level, '%d more accounts logged "%s" in the last %g s (those lines at '
                    'debug level)', more, kind, self.window)


#: Every live :class:`NoiseFilter` (the one on the handler of ``logs.setup_logging``) and
#: :class:`Waves` (the supervisor's).
_FILTERS: weakref.WeakSet[_Windows[Any]] = weakref.WeakSet()


def flush_summaries() -> None:
    """Write every pending summary now. The daemon's stop calls it last: a summary is due a
    window after its burst, and a stop often is that burst (every connection closing), so the
    timer would otherwise die with the event loop and the lines it stands for go unreported."""
    for noise in list(_FILTERS):
        noise.flush_all()


class NoiseCollector(Collector):
    """Exports :data:`COUNTS` (one series per kind, all present from the start)."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "tgdaemon_log_events_summarised",
            "Log records of a known fleet-wide kind demoted to debug and summarised",
            labels=["kind"])
        for kind in Noise:
            family.add_metric([kind.value], COUNTS[kind])
        yield family
        yield CounterMetricFamily(
            "tgdaemon_fd_exhausted",
            "Operations that failed because the process ran out of file descriptors",
            value=COUNTS[Noise.FD_EXHAUSTED])
