"""The real-process fixtures of test_process.py (sd_notify listener, daemon processes), shared
with the other daemon tests that run ``python -m tgdaemon run``."""

from tests.daemon.test_process import notify, notify_dir, processes

__all__ = ["notify", "notify_dir", "processes"]
