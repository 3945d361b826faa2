"""Child processes of the bench: localdc servers and fleet processes, started and stopped by pid.

Synchronous on purpose: the orchestrator does one thing at a time (start, wait for an event,
hold a measurement window, stop), and a blocking wait with a deadline says that plainly.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

from bench.seed import DcProc

ROOT = Path(__file__).resolve().parent.parent


class ChildError(RuntimeError):
    """A bench child process failed or missed a deadline (the message names its log file)."""


class LocalDcProcess:
    """``python -m tgdaemon.localdc`` for one :class:`DcProc`, restartable on the same ports."""

    def __init__(self, spec: DcProc, log_dir: Path) -> None:
        self.spec = spec
        self.log_path = log_dir / f"localdc{spec.dc_id}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}
        #: User ids seeded into this process's store (the flood storm picks from them).
        self.users: list[int] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> None:
        spec = self.spec
        with contextlib.suppress(FileNotFoundError):
            spec.info_file.unlink()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tgdaemon.localdc", "--state-dir", str(spec.state_dir),
                 "--info-file", str(spec.info_file), "--port", str(spec.base_port),
                 "--dcs", str(spec.dc_id), "--log-level", "WARNING", "--control-port", "0"],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while not spec.info_file.exists():
            if self.proc.poll() is not None:
                raise ChildError(f"localdc {spec.dc_id} exited; see {self.log_path}")
            if time.monotonic() > deadline:
                raise ChildError(f"localdc {spec.dc_id} not up in {timeout}s; see {self.log_path}")
            time.sleep(0.05)
        self.info = json.loads(spec.info_file.read_text())

    def counters(self) -> dict[str, Any]:
        """The control API's counters (requests by TL method under ``"requests"``)."""
        return self._get("counters")

    def overlaps(self) -> dict[str, Any]:
        """Connections of one auth key open at once from different client processes
        (``total``), keys with a connection open now (``live_keys``) and with more than one
        (``open_twice``)."""
        return self._get("overlaps")

    def _get(self, what: str) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.info['control_url']}/{what}", timeout=30) as r:
            return dict(json.loads(r.read()))

    def requests(self) -> dict[str, int]:
        """Requests served so far, by TL method name."""
        return dict(self.counters()["requests"])

    def inject(self, fault: dict[str, Any]) -> int:
        return int(self._post("faults", fault)["id"])

    def drop(self) -> int:
        """Reset every client connection now (the server stays up); how many."""
        return int(self._post("drop", {})["dropped"])

    def _post(self, what: str, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(f"{self.info['control_url']}/{what}",
                                     data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return dict(json.loads(r.read()))

    def kill(self) -> None:
        """The outage: SIGKILL, so the kernel resets every connection at once."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class FleetProcess:
    """``python -m bench.fleet``: its JSON-line events are read by a thread into a queue."""

    def __init__(self, args: list[str], log_path: Path, timeline: Path,
                 env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self.timeline = timeline
        self.events: dict[str, dict[str, Any]] = {}
        self.last_count: dict[str, Any] = {"n": 0, "at": 0.0}
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.fleet", *args, "--timeline", str(timeline)],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                env=None if env is None else {**os.environ, **env},
            )
        assert self.proc.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self, stream: IO[bytes]) -> None:
        for line in stream:
            with contextlib.suppress(ValueError):
                self._queue.put(json.loads(line))
        self._queue.put(None)

    def _pump(self, timeout: float) -> bool:
        """Take one event (waiting up to ``timeout``); False when the stream has ended."""
        try:
            event = self._queue.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return True
        if event is None:
            return False
        if event["event"] == "count":
            self.last_count = event
        self.events.setdefault(event["event"], event)
        return True

    def wait_event(self, name: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while name not in self.events:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ChildError(f"fleet: no {name!r} within {timeout:.0f}s; see {self.log_path}")
            if not self._pump(min(remaining, 0.5)) and name not in self.events:
                raise ChildError(f"fleet exited before {name!r}; see {self.log_path}")
        return self.events[name]

    def wait_count(self, n: int, since: float, timeout: float) -> float | None:
        """Wall time at which the connected count first reached ``n`` after ``since``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            last = self.last_count
            if last["n"] >= n and last["at"] >= since:
                return float(last["at"])
            if not self._pump(min(0.5, deadline - time.monotonic())):
                return None
        return None

    def drain(self) -> None:
        """Consume pending events without waiting (keeps ``last_count`` current)."""
        while not self._queue.empty():
            self._pump(0)

    def stop(self, timeout: float = 90.0) -> dict[str, Any]:
        """SIGTERM, wait, and return the timeline the process wrote."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise ChildError(f"fleet did not stop in {timeout}s; see {self.log_path}") from None
        if self.proc.returncode != 0 or not self.timeline.exists():
            raise ChildError(f"fleet exited with {self.proc.returncode}; see {self.log_path}")
        return json.loads(self.timeline.read_text())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
