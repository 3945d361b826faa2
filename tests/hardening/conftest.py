"""The daemon-process fixtures of tests/daemon/test_process.py, shared with these tests."""

from tests.daemon.test_process import localdc, notify, notify_dir, processes

__all__ = ["localdc", "notify", "notify_dir", "processes"]
