"""pytest-timeout's alarm held off while pytest builds and sends a test's reports.

pytest-timeout (signal method) arms one SIGALRM over a test's setup, call and teardown; its
handler raises ``Failed`` wherever the main thread is. Inside a phase that is the test's
failure, as meant. Between phases, while a report is built (``pytest_runtest_makereport``) or
handed on (``pytest_runtest_logreport``, which xdist sends to the controller), the exception
passes through plugins' hook wrappers (pluggy warns ``PluggyTeardownRaisedWarning``, an error
under ``filterwarnings = error``): an INTERNALERROR that ended the whole session, or the xdist
worker, and the test's own failure was lost. Seen on a loaded machine, where a slow test's
timeout lands there more often.

Here an alarm that comes during those hooks is noted and re-armed for :data:`DEFERRED`
seconds later: it fails the phase that follows, or is cancelled by pytest-timeout with the
rest of the timer when the test is over.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Generator, Iterator
from types import FrameType
from typing import Any

import pytest

#: Delay of an alarm that came while a report was handled: long enough that pytest-timeout
#: cancels it first when that report was the test's last.
DEFERRED = 1.0


@contextlib.contextmanager
def alarm_held() -> Iterator[None]:
    fired = False

    def note(_signum: int, _frame: FrameType | None) -> None:
        nonlocal fired
        fired = True

    previous = signal.signal(signal.SIGALRM, note)
    try:
        yield
    finally:
        signal.signal(signal.SIGALRM, previous)
        if fired and callable(previous):
            signal.setitimer(signal.ITIMER_REAL, DEFERRED)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport() -> Generator[None, Any, Any]:
    with alarm_held():
        return (yield)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_logreport() -> Generator[None, Any, Any]:
    with alarm_held():
        return (yield)
