"""File descriptors: the fleet's needs checked against ``RLIMIT_NOFILE`` before anything
starts.

systemd starts services with a soft limit of 1,024 and a hard limit of 524,288: 10,000
accounts need the soft limit raised, which any process may do up to the hard limit. When even
the hard limit is too low the daemon refuses to start (exit 78, one line) instead of running
into EMFILE later, when every reconnect of every account fails at once. (EMFILE that happens
anyway is summarised by :mod:`tgdaemon.logvolume`.)

EMFILE can still happen (a plugin or a leak holds descriptors, or the limit was lowered while
running). Then the HTTP server must stay reachable, because its ``/metrics`` and ``/healthz``
are how an operator sees it: :class:`FdReserve` holds a few descriptors on ``/dev/null`` that
the server releases to accept a connection when ``accept()`` fails with EMFILE.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable
from dataclasses import dataclass

from tgdaemon.config import Config
from tgdaemon.exceptions import ConfigError
from tgdaemon.logvolume import FD_EXHAUSTED

#: Spare descriptors the HTTP server keeps for when the process runs out (:class:`FdReserve`).
HTTP_SPARE_FDS = 4
#: Descriptors the process holds whatever the fleet: stdio, epoll, the signal wake-up pipe,
#: the database with its WAL, shared memory and lock file, the metrics thread, the HTTP
#: server's listening sockets and :class:`FdReserve`, and margin for plugins and the CLI
#: tools a plugin may start.
FIXED_FDS = 64

GetLimit = Callable[[int], tuple[int, int]]
SetLimit = Callable[[int, tuple[int, int]], None]


@dataclass(frozen=True, slots=True)
class FdBudget:
    """What the fleet may hold open at once; ``total`` is compared with the soft limit."""

    accounts: int  # one MTProto connection each
    connects: int  # connects in flight (a reconnect may overlap the socket it replaces)
    http: int  # the connection caps of the HTTP listener and the API's Unix socket (if on)
    fixed: int = FIXED_FDS

    @property
    def total(self) -> int:
        return self.accounts + self.connects + self.http + self.fixed

    def describe(self) -> str:
        return (f"{self.accounts} accounts + {self.connects} connects in flight + "
                f"{self.http} HTTP connections + {self.fixed} for the store and the process")


def budget(config: Config, http_connections: int) -> FdBudget:
    """A fleet instance holds at most ``capacity`` of the fleet's accounts, however many the
    config lists (a fleet of 40,000 over 4 instances needs ~10,000 sockets each)."""
    enabled = len(config.enabled_accounts)
    if config.daemon.clustered:
        enabled = min(enabled, config.daemon.capacity)
    return FdBudget(
        accounts=enabled,
        connects=min(enabled, config.daemon.connect_concurrency),
        # Each listener has its own connection cap: the HTTP one and the API's Unix socket.
        http=http_connections * ((config.daemon.http_listen is not None)
                                 + (config.api.enabled and config.api.unix_socket is not None)),
    )


def fd_shortfall(config: Config, *, getrlimit: GetLimit = resource.getrlimit) -> str | None:
    """For a reload: the new fleet's needs against the running soft limit (which cannot be
    raised further: it was raised to the hard limit at start). None when it fits."""
    from tgdaemon.httpsite import HttpLimits  # imports aiohttp: only when asked

    need = budget(config, HttpLimits().max_connections)
    soft = getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY or soft >= need.total:
        return None
    return (f"the reloaded fleet needs {need.total} file descriptors ({need.describe()}) but "
            f"RLIMIT_NOFILE allows {soft}: connects will fail with EMFILE; raise LimitNOFILE= "
            "and restart, or enable fewer accounts")


def ensure_open_file_limit(need: FdBudget, *, getrlimit: GetLimit = resource.getrlimit,
                           setrlimit: SetLimit = resource.setrlimit) -> int:
    """Raise the soft limit to the hard one (reloads may add accounts later); raise
    :class:`ConfigError` when the result is still below ``need``. Returns the soft limit."""
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        # An unlimited hard limit still stops at the kernel's nr_open: then ask for the need.
        for target in (hard, max(need.total, soft)):
            try:
                setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            except (ValueError, OSError):
                continue
            soft = target
            break
    if soft != resource.RLIM_INFINITY and soft < need.total:
        raise ConfigError(
            f"the fleet needs {need.total} file descriptors ({need.describe()}) but "
            f"RLIMIT_NOFILE allows {soft} (hard limit {_limit(hard)}): raise LimitNOFILE= in "
            "the systemd unit (or ulimit -n), or enable fewer accounts")
    return soft


def _limit(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


class FdReserve:
    """Spare descriptors, held open on ``/dev/null`` while nobody needs them.

    When the process runs out, :meth:`release` closes one so that the very next descriptor
    the process creates (the kernel hands out the lowest free number, and the event loop runs
    nothing in between) is the one it is needed for; :meth:`fill` takes them back as soon as
    descriptors are free again (it stops quietly at EMFILE). Constructing one opens nothing.

    A spare helps only while its number is below the soft limit, which someone may lower
    below what the process already holds (``prlimit``): the daemon fills its reserve first
    thing, so the spares have the lowest numbers, and :meth:`release` never closes one it
    could not reopen.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._fds: list[int] = []

    @property
    def held(self) -> int:
        return len(self._fds)

    def fill(self) -> None:
        while len(self._fds) < self.size:
            try:
                self._fds.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError as exc:
                if exc.errno in FD_EXHAUSTED:
                    return
                raise

    def release(self, *, getrlimit: GetLimit = resource.getrlimit) -> bool:
        """Free the lowest spare; False when none is held below the soft limit."""
        if not self._fds:
            return False
        lowest = min(self._fds)
        soft = getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft != resource.RLIM_INFINITY and lowest >= soft:
            return False
        self._fds.remove(lowest)
        os.close(lowest)
        return True

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.pop())
