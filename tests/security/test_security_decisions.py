"""The security watch's pure decisions, as tables."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest
from telethon.tl import types

from tgdaemon.security import (
    OnNewAuthorization,
    SessionInfo,
    assess,
    first_check_delay,
    is_allowed,
    session_from_tl,
)

OURS = SessionInfo(0, True, "tgdaemon Linux", "", "tgdaemon 0.1", "ZZ", 100.0)
PHONE = SessionInfo(11, False, "iPhone 15 iOS 18", "ios", "Telegram iOS 11.2", "DE", 50.0)
EVIL = SessionInfo(22, False, "Evil Box", "", "OddGram 6.6", "XX", 500.0, ip="203.0.113.9")

ALERT, TERMINATE = OnNewAuthorization.ALERT, OnNewAuthorization.TERMINATE


@pytest.mark.parametrize(
    ("sessions", "known", "since", "action", "allow", "new", "terminate"),
    [
        # first look after start: new = created after the last proof of life
        ((OURS, PHONE, EVIL), None, 200.0, ALERT, (), (EVIL,), ()),
        ((OURS, PHONE, EVIL), None, 10.0, ALERT, (), (PHONE, EVIL), ()),
        ((OURS,), None, 0.0, ALERT, (), (), ()),
        ((OURS, PHONE, EVIL), None, 500.0, ALERT, (), (EVIL,), ()),  # same second: new
        ((OURS, PHONE, EVIL), None, 501.0, ALERT, (), (), ()),
        # later looks: new = hash not seen before, whatever its date
        ((OURS, PHONE, EVIL), frozenset({11}), 1e12, ALERT, (), (EVIL,), ()),
        ((OURS, PHONE, EVIL), frozenset({11, 22}), 0.0, ALERT, (), (), ()),
        # terminate: every other session not allow-listed, new or not
        ((OURS, PHONE, EVIL), frozenset({11}), 0.0, TERMINATE, (), (EVIL,), (PHONE, EVIL)),
        ((OURS, PHONE, EVIL), frozenset({11}), 0.0, TERMINATE, ("iphone*",), (EVIL,), (EVIL,)),
        ((OURS, PHONE, EVIL), None, 0.0, TERMINATE, ("*telegram ios*", "evil*"),
         (PHONE, EVIL), ()),
        # the current session is never new and never terminated
        ((OURS,), frozenset(), 0.0, TERMINATE, (), (), ()),
    ],
)
def test_assess(sessions, known, since, action, allow, new, terminate):
    a = assess(sessions, known=known, since=since, action=action, allow=allow)
    assert a.new == new
    assert a.terminate == terminate
    assert a.count == len(sessions)
    assert a.known == frozenset(s.hash for s in sessions if not s.current)


@pytest.mark.parametrize(
    ("patterns", "expected"),
    [((), False), (("evil*",), True), (("EVIL BOX",), True), (("oddgram*",), True),
     (("*phone*",), False), (("Evil",), False)],
)
def test_allow_list_matches_device_or_app(patterns, expected):
    assert is_allowed(EVIL, patterns) is expected


def test_ip_stays_out_of_repr_and_default_description():
    assert "203.0.113.9" not in repr(EVIL)
    assert "203.0.113.9" not in EVIL.describe()
    assert "203.0.113.9" in EVIL.describe(with_ip=True)
    assert EVIL.describe() == "Evil Box / OddGram 6.6 (XX)"


def test_first_checks_spread_over_one_interval():
    rng = random.Random(7)
    delays = [first_check_delay(3600, rng) for _ in range(2000)]
    assert 0 <= min(delays) < 60
    assert 3540 < max(delays) <= 3600
    # roughly uniform: each quarter of the interval holds about a quarter of the fleet
    quarters = [sum(q * 900 <= d < (q + 1) * 900 for d in delays) for q in range(4)]
    assert all(400 < n < 600 for n in quarters), quarters


def test_session_from_telethon_authorization():
    when = datetime(2026, 1, 2, tzinfo=UTC)
    auth = types.Authorization(
        hash=5, device_model="Pixel", platform="android", system_version="14", api_id=1,
        app_name="Telegram Android", app_version="11.0", date_created=when, date_active=when,
        ip="198.51.100.1", country="FR", region="", current=False)
    s = session_from_tl(auth)
    assert s == SessionInfo(5, False, "Pixel 14", "android", "Telegram Android 11.0", "FR",
                            when.timestamp(), ip="198.51.100.1")
