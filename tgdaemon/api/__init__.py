"""The account API: act through the daemon's accounts and receive their updates over HTTP
and WebSocket (``/v1/``), as Telegram's Bot API server does for bots (see README)."""

from tgdaemon.api.service import AccountApi

__all__ = ["AccountApi"]
