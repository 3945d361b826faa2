"""Logging set-up: a ``tgdaemon.*`` tree, text or JSON lines, and a last line of defence.

Code never logs secrets or phone numbers in the first place; the redacting filter on the one
handler passes every line (ours, Telethon's, aiohttp's) through :func:`tgdaemon.redact.redact`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import MutableMapping
from typing import IO, Any

from tgdaemon.logvolume import NoiseFilter
from tgdaemon.redact import redact

ROOT = "tgdaemon"

class RedactingFilter(logging.Filter):
    """Renders the message once, redacted, so formatters never see raw arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        return True


class TextFormatter(logging.Formatter):
    """Plain lines; tracebacks pass the same redaction as messages (a plugin's exception may
    carry anything)."""

    def formatException(self, ei: Any) -> str:
        return redact(super().formatException(ei))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: what journald-forwarding and log shippers want."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        account = getattr(record, "account", None)
        if account is not None:
            entry["account"] = account
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str = "info", fmt: str = "text", stream: IO[str] | None = None) -> None:
    """Configure the root logger once for the process (CLI and daemon)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        # systemd adds its own timestamp; keep the line short.
        handler.setFormatter(TextFormatter("%(levelname)s %(name)s: %(message)s"))
    # First: a record demoted and dropped is not worth redacting.
    handler.addFilter(NoiseFilter())
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # What neither format shows is not gathered for every record (the logging HOWTO's
    # "Optimization"): the caller's file, line and function (a walk up the stack), the thread,
    # the process. ~10 of ~25 us a record (measured): a lost connection makes one Telethon
    # record per account even when it is only counted (tgdaemon.logvolume).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # Telethon reports every connect at INFO: 10,000 lines per restart of a fleet.
    logging.getLogger("telethon").setLevel(logging.WARNING)
    # aiosqlite logs every statement with its parameters at DEBUG.
    logging.getLogger("aiosqlite").setLevel(logging.INFO)
    logging.getLogger("tgdaemon.telethon").setLevel(
        logging.DEBUG if level == "debug" else logging.WARNING)


def account_logger(name: str) -> logging.LoggerAdapter[logging.Logger]:
    """Per-account log context without a Logger object per account (10,000 of them would
    live forever in logging's manager): one shared logger, the account as a prefix/field."""
    return _AccountAdapter(logging.getLogger(f"{ROOT}.account"), {"account": name})


class _AccountAdapter(logging.LoggerAdapter[logging.Logger]):
    def process(self, msg: Any, kwargs: MutableMapping[str, Any]
                ) -> tuple[Any, MutableMapping[str, Any]]:
        account = self.extra["account"] if self.extra else "?"
        kwargs.setdefault("extra", {})["account"] = account
        return f"[{account}] {msg}", kwargs
