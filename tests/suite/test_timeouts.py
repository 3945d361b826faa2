"""tests/timeouts.py: a test's timeout that comes while pytest builds the test's report fails
the test's next phase, instead of an INTERNALERROR that ends the session (pluggy's warning
about the hook wrapper it passed through is an error under ``filterwarnings = error``).

Each case is a pytest session of its own, with this suite's settings and a plugin that builds
the call's report slower than the test's timeout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

INNER_TESTS = """
import time
import pytest

@pytest.fixture
def slow_teardown():
    yield
    time.sleep(2)

def test_slow_report(slow_teardown):
    pass

def test_after():
    pass
"""

INNER_CONFTEST = """
import time

def pytest_runtest_makereport(item, call):
    if call.when == "call" and item.name == "test_slow_report":
        time.sleep(2)  # the timeout (1 s from the test's start) comes now
"""

INNER_INI = """[pytest]
timeout = 1
asyncio_default_fixture_loop_scope = function
filterwarnings = error
"""


def start_session(where: Path, *args: str) -> subprocess.Popen[str]:
    where.mkdir()
    (where / "test_inner.py").write_text(INNER_TESTS)
    (where / "conftest.py").write_text(INNER_CONFTEST)
    (where / "pytest.ini").write_text(INNER_INI)
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, "."],
        cwd=where, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)


def test_a_timeout_while_the_report_is_built_fails_the_next_phase(tmp_path: Path) -> None:
    held = start_session(tmp_path / "held", "-p", "tests.timeouts")
    plain = start_session(tmp_path / "plain")
    out_held = held.communicate(timeout=120)[0]
    out_plain = plain.communicate(timeout=120)[0]
    # What it prevents: the session ends in an INTERNALERROR, test_after never runs.
    assert "INTERNALERROR" in out_plain, out_plain[-2000:]
    assert "PluggyTeardownRaisedWarning" in out_plain, out_plain[-2000:]
    assert "passed" not in out_plain.splitlines()[-1], out_plain[-2000:]
    # With it: the timeout is the failure of the test's teardown, and the session goes on.
    assert held.returncode == 1, out_held[-2000:]
    assert "INTERNALERROR" not in out_held, out_held[-2000:]
    assert "ERROR at teardown of test_slow_report" in out_held, out_held[-2000:]
    assert "Failed: Timeout (>1.0s) from pytest-timeout" in out_held, out_held[-2000:]
    assert out_held.splitlines()[-1].startswith("2 passed, 1 error"), out_held[-2000:]
