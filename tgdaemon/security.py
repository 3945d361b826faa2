"""Security watch: who else is logged into an account, and what to do about it.

Telegram tells a logged-in session about every new login on its account
(``updateNewAuthorization``) and lists them all on request (``account.getAuthorizations``).
This module holds the pure decisions — which sessions are new since the last look, which of
them to terminate, when to look again — so they are tested as tables; the worker does the I/O
(``tgdaemon.watch``).
"""

from __future__ import annotations

import fnmatch
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "EVENT_CHECK_GAP",
    "FRESH_RETRY",
    "Assessment",
    "OnNewAuthorization",
    "SessionInfo",
    "assess",
    "first_check_delay",
    "is_allowed",
    "session_from_tl",
]


class OnNewAuthorization(StrEnum):
    """What a worker does when its account has a session that is not the daemon's."""

    ALERT = "alert"  # log, count, show in /status; touch nothing
    TERMINATE = "terminate"  # also log out every session not ours and not allow-listed


#: An updateNewAuthorization triggers a look at the list, but not more often than this: a
#: burst of logins (or of announcements) costs at most one account.getAuthorizations per
#: account every few seconds, and a second login right after a first is still seen quickly.
EVENT_CHECK_GAP = 5.0
#: Telegram refuses resets from a young session (FRESH_RESET_AUTHORISATION_FORBIDDEN); retry
#: after this long rather than at the next (hours away) periodic check.
FRESH_RETRY = 3600.0


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One authorization of an account, as much as an operator needs to judge it.

    The IP address is kept out of ``repr`` (and so out of logs) unless the operator opts in.
    """

    hash: int
    current: bool
    device: str
    platform: str
    app: str
    country: str
    created: float  # unix time
    ip: str = field(default="", repr=False)

    def describe(self, *, with_ip: bool = False) -> str:
        """One line for a log or a table: device, app, country (never the phone)."""
        where = f"{self.country}, {self.ip}" if with_ip and self.ip else self.country
        return f"{self.device or '?'} / {self.app or '?'} ({where or '?'})"


def session_from_tl(auth: Any) -> SessionInfo:
    """A Telethon ``types.Authorization`` as a :class:`SessionInfo`."""
    created = auth.date_created.timestamp() if auth.date_created else 0.0
    app = " ".join(p for p in (auth.app_name, auth.app_version) if p)
    device = " ".join(p for p in (auth.device_model, auth.system_version) if p)
    return SessionInfo(hash=int(auth.hash), current=bool(auth.current), device=device,
                       platform=auth.platform or "", app=app, country=auth.country or "",
                       created=created, ip=auth.ip or "")


def is_allowed(session: SessionInfo, patterns: Iterable[str]) -> bool:
    """True when a pattern (shell glob, case-insensitive) matches the session's device or app."""
    device, app = session.device.lower(), session.app.lower()
    return any(fnmatch.fnmatchcase(device, p.lower()) or fnmatch.fnmatchcase(app, p.lower())
               for p in patterns)


@dataclass(frozen=True, slots=True)
class Assessment:
    """What one look at an account's sessions found."""

    sessions: tuple[SessionInfo, ...]
    new: tuple[SessionInfo, ...]  # not ours, not seen at the previous look
    terminate: tuple[SessionInfo, ...]  # what the policy says to log out now
    known: frozenset[int]  # hashes to compare the next look against

    @property
    def count(self) -> int:
        return len(self.sessions)


def assess(
    sessions: Iterable[SessionInfo],
    *,
    known: frozenset[int] | None,
    since: float,
    action: OnNewAuthorization,
    allow: Iterable[str],
) -> Assessment:
    """Compare a fresh list of sessions with the previous look.

    ``known`` is the set of hashes seen at the previous look, or None for the first look
    since the daemon started: then a session counts as new when it was created at or after
    ``since`` (the account's last proof of life before this run), so a login that happened
    while the daemon was stopped is still reported. With TERMINATE, every session that is not
    ours and not allow-listed is to be logged out, new or not: an operator who asks for it
    wants the daemon to be the account's only user.
    """
    allow = tuple(allow)
    listed = tuple(sessions)
    others = [s for s in listed if not s.current]
    if known is None:
        # >=: Telegram's dates are whole seconds; a login in the same second as our last
        # proof of life is reported (a false alarm beats a missed takeover).
        new = tuple(s for s in others if s.created >= since)
    else:
        new = tuple(s for s in others if s.hash not in known)
    terminate: tuple[SessionInfo, ...] = ()
    if action is OnNewAuthorization.TERMINATE:
        terminate = tuple(s for s in others if not is_allowed(s, allow))
    return Assessment(sessions=listed, new=new, terminate=terminate,
                      known=frozenset(s.hash for s in others))


def first_check_delay(interval: float, rng: random.Random) -> float:
    """Spread the fleet's first looks over one interval (10,000 accounts must not all call
    account.getAuthorizations in the same second after a start); later looks follow every
    ``interval``, so no account is asked more than once per interval by the schedule."""
    return rng.uniform(0, interval)
