"""An account's user plugins: ``pkg.module:function`` called with ``(client, account)`` after
every (re)connect. A plugin's failure is logged and counted, never fatal to the account."""

from __future__ import annotations

import asyncio
import importlib
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tgdaemon.config import AccountConfig
    from tgdaemon.reporter import AccountReporter


class Plugins:
    def __init__(self, account: AccountConfig, reporter: AccountReporter) -> None:
        self._account = account
        self._report = reporter
        self._loaded: list[tuple[str, Callable[..., Any]]] | None = None

    def _load(self) -> list[tuple[str, Callable[..., Any]]]:
        loaded = []
        for spec in self._account.plugins:
            module_name, _, attr = spec.partition(":")
            try:
                loaded.append((spec, getattr(importlib.import_module(module_name), attr)))
            except Exception as exc:
                self._report.log.error("plugin %s cannot be loaded: %s", spec,
                                       type(exc).__name__)
                self._report.plugin_error()
        return loaded

    async def run(self, client: Any, timeout: float) -> None:
        """Call every plugin (imported on the first call); an awaitable result is awaited up
        to ``timeout``."""
        if self._loaded is None:
            self._loaded = self._load()
        for spec, setup in self._loaded:
            try:
                result = setup(client, self._account)
                if inspect.isawaitable(result):
                    await asyncio.wait_for(result, timeout)
            except asyncio.CancelledError:
                raise
            except Exception:
                self._report.log.exception("plugin %s failed", spec)
                self._report.plugin_error()
