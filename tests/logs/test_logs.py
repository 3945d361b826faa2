"""The last line of defence in logging: redaction of what a third-party message might carry."""

from __future__ import annotations

import io
import logging

import pytest

from tgdaemon.logs import setup_logging
from tgdaemon.redact import redact

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


@pytest.mark.parametrize(("raw", "leak"), [
    ("SendCodeRequest(phone_number='4915551234567', api_id=1)", "4915551234567"),
    (f"session {SECRET_KEY}", SECRET_KEY),
])
def test_repeated_texts_are_redacted_every_time_and_never_cached_with_a_secret(
        raw: str, leak: str) -> None:
    from tgdaemon import redact as module

    clean = "connection closed by the server"
    for _ in range(3):  # the second and third come from the cache of unchanged texts
        assert redact(clean) == clean
        assert leak not in redact(raw)
        assert redact(clean, limit=12) == "connectio..."
    assert clean in module._CLEAN
    assert not any(leak in text for text in module._CLEAN)


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


def test_records_gather_nothing_the_formats_do_not_show() -> None:
    """No walk up the stack for the caller's line, no thread or process name per record."""
    kept: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            kept.append(record)

    setup_logging("info", "text", stream=io.StringIO())
    log = logging.getLogger("tgdaemon.test")
    handler = Keep()
    log.addHandler(handler)
    try:
        log.info("x")
    finally:
        log.removeHandler(handler)
        logging.getLogger().handlers.clear()
    assert (kept[0].lineno, kept[0].threadName, kept[0].process) == (0, None, None)


PHONE = "4915551234567"


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize("logger", ["tgdaemon.telethon.extensions.binaryreader", "telethon",
                                    "aiohttp.access", "aiohttp.server", "tgdaemon.account"])
def test_phone_numbers_with_or_without_plus_never_reach_a_log_line(logger: str,
                                                                    fmt: str) -> None:
    """What Telethon logs for a record it cannot parse (the phone as a TL string, no '+'),
    a repr, a formatted number: redacted whichever library logs it."""
    stream = io.StringIO()
    setup_logging("debug", fmt, stream=stream)
    try:
        log = logging.getLogger(logger)
        log.warning("cannot parse %r", b"\x15\xc4\xb5\x1c\x0d" + PHONE.encode() + b"\x00\x00")
        log.warning("User(id=5000001, phone='%s', username=None)", PHONE)
        log.warning("plain %s and formatted +49 155 5123 4567 and 49 155 5123 4567", PHONE)
    finally:
        logging.getLogger().handlers.clear()
    out = stream.getvalue()
    assert out.count("\n") == 3, out
    for leak in (PHONE, "5123 4567", "5551234567"):
        assert leak not in out, out


@pytest.mark.parametrize(("raw", "kept"), [
    ("HTTP listening on 127.0.0.1:9464", "127.0.0.1:9464"),
    ("daemon started: 10000 accounts: 9999 connected, 1 needs_login", "10000 accounts"),
    ('127.0.0.1 "GET /metrics HTTP/1.1" 200 1234 "-" "Prometheus/2.45"', "200 1234"),
])
def test_redaction_keeps_ports_counts_and_sizes(raw: str, kept: str) -> None:
    assert kept in redact(raw)
