"""The CLI's one-shot Telegram calls: a deadline on every call and a few retries.

Why: the daemon's workers have their own pure retry schedule, but ``tgdaemon login``/``logout``
are run once by an operator. A stalled server must not hang them forever (every call gets the
daemon's ``connect_timeout``/``request_timeout``), a blip must not need a rerun (transient
failures, as :func:`tgdaemon.errors.classify` sees them, are retried with ``backoff``'s
decorator, capped exponential delays from the policy), and what finally fails is one clear
line with its own exit code instead of a traceback.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import backoff

from tgdaemon.errors import Category, classify
from tgdaemon.exceptions import TelegramRefusedError, TelegramUnavailableError

if TYPE_CHECKING:
    from tgdaemon.config import PolicyConfig

T = TypeVar("T")

#: Tries per call (the first and two retries): enough for a blip, short for an operator.
ATTEMPTS = 3
#: Worth retrying: the same call may well succeed a moment later.
TRANSIENT = frozenset({Category.NETWORK, Category.SERVER})


def _permanent(exc: Exception) -> bool:
    return classify(exc).category not in TRANSIENT


def _announce(details: Any) -> None:
    exc = details.get("exception")
    code = classify(exc).code if isinstance(exc, Exception) else "failure"
    print(f"tgdaemon: {code}; retrying in {details['wait']:.1f} s "
          f"(attempt {details['tries'] + 1} of {ATTEMPTS})", file=sys.stderr)


async def call(what: str, func: Callable[[], Awaitable[T]], *, policy: PolicyConfig,
               timeout: float | None = None, retry: bool = True,
               cleanup: Callable[[], Awaitable[object]] | None = None,
               expected: tuple[type[Exception], ...] = ()) -> T:
    """``await func()`` with a deadline (default ``policy.request_timeout``), retried on
    transient failures; ``cleanup`` runs after each failed attempt (e.g. drop a half-open
    connection before connecting again). ``expected`` errors (a wrong login code) reach the
    caller as they are; other failures become one-line errors naming ``what``."""
    deadline = policy.request_timeout if timeout is None else timeout

    @backoff.on_exception(backoff.expo, Exception, max_tries=ATTEMPTS if retry else 1,
                          giveup=_permanent, on_backoff=_announce, logger=None,
                          jitter=backoff.full_jitter, factor=policy.backoff_base,
                          max_value=policy.backoff_cap)
    async def attempt() -> T:
        try:
            return await asyncio.wait_for(func(), deadline)
        except Exception:
            if cleanup is not None:
                await cleanup()
            raise

    try:
        return await attempt()
    except expected:
        raise
    except Exception as exc:
        raise _failure(what, exc, deadline) from None


def _failure(what: str, exc: Exception, deadline: float) -> Exception:
    c = classify(exc)
    if isinstance(exc, TimeoutError):
        return TelegramUnavailableError(f"Telegram did not answer {what} within {deadline:g} s")
    if c.category is Category.NETWORK:
        return TelegramUnavailableError(f"cannot reach Telegram for {what}: {c.message}")
    if c.category is Category.SERVER:
        return TelegramUnavailableError(f"Telegram failed {what}: {c.message}")
    if c.category is Category.UNKNOWN and not _is_rpc(exc):
        return exc  # a bug, not Telegram: keep the traceback
    return TelegramRefusedError(f"Telegram refused {what}: {c.message}")


def _is_rpc(exc: Exception) -> bool:
    from telethon.errors import RPCError

    return isinstance(exc, RPCError)
