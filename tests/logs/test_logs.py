"""The last line of defence in logging: redaction of what a third-party message might carry."""

from __future__ import annotations

import io
import logging

import pytest

from tgdaemon.logs import redact, setup_logging

SECRET_KEY = "q" * 20 + "Zx9_-" * 6  # a urlsafe-base64-looking blob


@pytest.mark.parametrize(("raw", "leak"), [
    ("SendCodeRequest(phone_number='4915551234567', api_id=1)", "4915551234567"),
    ("SignInRequest(phone_code='24680', phone_code_hash='abc')", "24680"),
    ("checkPassword password=\"hunter2\"", "hunter2"),
    ("dialling +49 155 5123 4567 now", "5123 4567"),
    (f"session {SECRET_KEY}", SECRET_KEY),
])
def test_redact_removes_secrets(raw: str, leak: str) -> None:
    assert leak not in redact(raw)


def test_redact_keeps_ordinary_text() -> None:
    text = "Connecting to 127.0.0.1:12345/TcpFull; state file /var/lib/tgdaemon/x/y/z/long/path.db"
    assert redact(text) == text


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_formatters_redact_messages_and_tracebacks(fmt: str) -> None:
    stream = io.StringIO()
    setup_logging("info", fmt, stream=stream)
    try:
        log = logging.getLogger("tgdaemon.test")
        log.info("sending %s", "phone_number='4915551234567'")
        try:
            raise RuntimeError(f"plugin leaked {SECRET_KEY}")
        except RuntimeError:
            log.exception("plugin failed")
    finally:
        logging.getLogger().handlers.clear()
    out = stream.getvalue()
    assert "plugin failed" in out
    assert "4915551234567" not in out
    assert SECRET_KEY not in out
