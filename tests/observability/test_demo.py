"""``make demo`` end to end: scripts/demo.py in a subprocess, as a user would run it.

It must bring up the local DC, three connected accounts and a Prometheus scraping the daemon,
stop everything on SIGINT with exit status 0, leave no process or port behind, refuse a
second concurrent run on the same state directory, and run again cleanly afterwards.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.observability.promhelpers import PROMETHEUS, ROOT, port_open

pytestmark = [
    pytest.mark.skipif(not os.access(PROMETHEUS, os.X_OK),
                       reason=f"Prometheus not installed at {PROMETHEUS} "
                              "(scripts/install-system-deps.sh installs it)"),
    pytest.mark.timeout(120),
]

DEMO = ROOT / "scripts" / "demo.py"


class DemoRun:
    """scripts/demo.py in its own session, its stdout collected by a thread."""

    def __init__(self, state_dir: Path, *extra: str) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, str(DEMO), "--state-dir", str(state_dir), "--http-port", "0",
             "--prometheus-port", "0", *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True, cwd=ROOT)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def find(self, pattern: str) -> re.Match[str] | None:
        return re.search(pattern, self.output, flags=re.MULTILINE)

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.wait(10)


def poll(predicate: Callable[[], Any], timeout: float, what: str, run: DemoRun) -> Any:
    """Wait for a condition with a deadline (and fail early if the demo died)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if run.proc.poll() is not None:
            raise AssertionError(f"demo exited ({run.proc.returncode}) before {what}:\n"
                                 f"{run.output}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout}s:\n{run.output}")
        time.sleep(0.1)


def get_json(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return json.load(r)
    except OSError:
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes only if its parent is not us; check /proc state.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_demo_starts_everything_and_stops_cleanly(tmp_path):
    state = tmp_path / "demo-state"
    run = DemoRun(state, "--duration", "90")
    try:
        poll(lambda: run.find(r"^\s+pids\s+"), 60, "the demo's summary", run)
        status_url = run.find(r"status \(JSON\)\s+(http://\S+/status)$").group(1)
        prometheus = run.find(r"Prometheus\s+(http://127\.0\.0\.1:\d+)/").group(1)
        pids = {name: int(pid) for name, pid in
                re.findall(r"(\w+)=(\d+)", run.find(r"^\s+pids\s+(.*)$").group(1))}
        assert set(pids) == {"localdc", "daemon", "prometheus"}
        assert "LOCAL STAND-IN" in run.output
        assert re.search(r"http://127\.0\.0\.1:\d+/\n", run.output), "status page URL"

        def three_connected() -> bool:
            body = get_json(status_url)
            return body is not None and [a["state"] for a in body["accounts"]] == [
                "connected"] * 3

        poll(three_connected, 20, "3 connected accounts in /status", run)

        def target_up() -> bool:
            body = get_json(f"{prometheus}/api/v1/targets")
            return body is not None and any(
                t["health"] == "up" for t in body["data"]["activeTargets"])

        poll(target_up, 20, "a Prometheus target up", run)
        rules = get_json(f"{prometheus}/api/v1/rules")
        assert rules["data"]["groups"], "the alert rules are loaded"

        # A second demo on the same state directory is refused, and does not disturb this one.
        second = DemoRun(state, "--duration", "1")
        assert second.wait(30) == 1
        assert "another demo is running" in second.output
        assert all(pid_alive(p) for p in pids.values())
        assert json.loads((state / "pids.json").read_text()) == pids

        info = json.loads((state / "localdc.json").read_text())
        ports = [int(m) for m in re.findall(r":(\d+)", f"{status_url} {prometheus} "
                                            f"{info['control_url']}")]
        ports += [int(dc["port"]) for dc in info["dcs"]]
        assert all(port_open(p) for p in ports)

        run.proc.send_signal(signal.SIGINT)
        assert run.wait(40) == 0, run.output
    finally:
        run.kill()
    assert "SIGINT: stopping" in run.output
    assert "demo stopped" in run.output
    stopped = [line for line in run.lines if line.startswith("stopping ")]
    assert [line.split()[1] for line in stopped] == ["prometheus", "daemon", "localdc"]
    assert [name for name, pid in pids.items() if pid_alive(pid)] == []
    assert [p for p in ports if port_open(p)] == []
    assert not (state / "pids.json").exists()

    # Run twice: the same state directory starts from scratch and logs in again.
    again = DemoRun(state, "--duration", "0")
    try:
        assert again.wait(60) == 0, again.output
    finally:
        again.kill()
    assert again.output.count("logged in ") == 3
    assert "demo stopped" in again.output
    assert [p for p in re.findall(r"=(\d+)", again.find(r"^\s+pids\s+(.*)$").group(1))
            if pid_alive(int(p))] == []
