"""systemd notifications (sd_notify) for a Type=notify service with a watchdog.

``sdnotify`` swallows socket errors and encodes latin-1, so everything sent here is ASCII and
``enabled`` tells whether a socket exists at all (no NOTIFY_SOCKET: outside systemd).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

import sdnotify


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii").replace("\n", " ")


class Notifier:
    def __init__(self, env: Mapping[str, str] = os.environ) -> None:
        self.enabled = bool(env.get("NOTIFY_SOCKET"))
        self._notifier = sdnotify.SystemdNotifier() if self.enabled else None
        self.watchdog_interval = _watchdog_interval(env)

    def _send(self, message: str) -> None:
        if self._notifier is not None:
            self._notifier.notify(message.encode("ascii", "replace").decode("ascii"))

    def ready(self, status: str | None = None) -> None:
        self._send("READY=1" + (f"\nSTATUS={_ascii(status)}" if status else ""))

    def status(self, text: str) -> None:
        self._send(f"STATUS={_ascii(text)}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Half of WATCHDOG_USEC, as systemd recommends; None when the watchdog is off or meant for
    another process (WATCHDOG_PID)."""
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None
