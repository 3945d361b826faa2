"""Helpers shared by the store tests (a plain module: conftest is not importable safely)."""

from __future__ import annotations

import os

from tgdaemon.store import SessionData


def make_session(seq: int = 0, *, dc_id: int = 2, user_id: int | None = None) -> SessionData:
    return SessionData(
        dc_id=dc_id, server_address="149.154.167.51", port=443, auth_key=os.urandom(256),
        user_id=user_id, pts=seq, qts=0, date=1_700_000_000, seq=seq,
    )
