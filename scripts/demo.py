#!/usr/bin/env python3
"""``make demo``: tgdaemon with three demo accounts on the LOCAL STAND-IN DC, scraped by a
real Prometheus that has the shipped alert rules loaded.

Starts, each as a child process in its own process group: the local DC (2 DCs, fixed login
code), the daemon (``python -m tgdaemon run``) and Prometheus (scraping every 2 s). The
accounts are logged in beforehand through the CLI's own login flow, answering its prompts
with the local DC's code. Ctrl-C / SIGTERM (or ``--duration``) stops everything in reverse
order: SIGTERM to each group, a bounded wait, SIGKILL only as the last resort.

``--chaos`` injects a fault through the local DC's control API every ``--chaos-interval``
seconds (dropped connections, FLOOD_WAIT_15, a revoked key, a stall, then the repair) and
prints what it did, so recovery can be watched on the status page and in Prometheus.

Running it twice is safe: a lock file refuses a second concurrent run on the same state
directory, a new run first kills what a crashed run left behind (pids.json) and starts from
a clean state, and busy default ports fall back to free ones. Children also get SIGTERM from
the kernel if this script dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import fcntl
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parents[1]
ALERT_RULES = ROOT / "config" / "prometheus-alerts.yml"
ACCOUNTS = ("alice", "bob", "carol")
LOGIN_CODE = "24680"  # the local DC's fixed code: no real SMS is ever involved
BANNER = (
    "=" * 78 + "\n"
    "  The Telegram data centres in this demo are a LOCAL STAND-IN (tgdaemon.localdc)\n"
    "  on 127.0.0.1. It is NOT Telegram: no real account or server is ever contacted.\n"
    + "=" * 78
)
STOP_TIMEOUT = 15.0  # per child: the daemon drains for up to 5 s (drain_timeout)


def _phone(index: int) -> str:
    """A fake test number (99966 is Telegram's test prefix); never printed."""
    return f"+9996650{index:04d}"


class DemoError(Exception):
    """A step failed; the message says which and where the logs are."""


# -- child processes --------------------------------------------------------------------------


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM the process group, wait, SIGKILL as a last resort; returns the exit code."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"  {self.name} did not stop within {timeout:.0f}s: killing it", flush=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.wait()


def spawn(name: str, argv: list[str], log: Path, env: dict[str, str] | None = None,
          *, append: bool = False) -> Child:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab" if append else "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True, preexec_fn=_die_with_parent,
                                env=env, cwd=ROOT)
    return Child(name, proc, log)


# -- small utilities ----------------------------------------------------------------------------


def pick_port(preferred: int) -> int:
    """``preferred`` if it can be bound on loopback, else (or for 0) a free port."""
    for port in (preferred, 0) if preferred else (0,):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise DemoError("no free port")  # pragma: no cover - bind to 0 does not fail


def http_json(url: str, method: str = "GET", body: Any = None, timeout: float = 5.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (OSError, ValueError):
        return False


# -- the demo -----------------------------------------------------------------------------------


@dataclass
class Demo:
    state_dir: Path
    http_port: int
    prometheus_port: int
    stop: threading.Event = field(default_factory=threading.Event)
    children: list[Child] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    user_ids: dict[str, int] = field(default_factory=dict)
    accounts: tuple[str, ...] = ACCOUNTS
    #: DC 1's port (DC k on +k-1); fixed so a restarted local DC comes back at the same place.
    localdc_port: int = 0
    _lock: TextIO | None = None

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    @property
    def daemon_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    # -- state directory ----------------------------------------------------------------

    def claim_state_dir(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        lock = (self.state_dir / ".lock").open("a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise DemoError(f"another demo is running with {self.state_dir}; stop it first "
                            "or pass --state-dir") from None
        self._lock = lock
        self._kill_leftovers()
        for name in ("localdc", "daemon", "prometheus", "logs"):
            shutil.rmtree(self.state_dir / name, ignore_errors=True)
        for name in ("localdc.json", "localdc_rsa.pem", "master.key", "tgdaemon.toml",
                     "prometheus.yml"):
            (self.state_dir / name).unlink(missing_ok=True)

    def _kill_leftovers(self) -> None:
        """Process groups a previous run recorded and did not stop (it was SIGKILLed)."""
        pids_file = self.state_dir / "pids.json"
        try:
            recorded = json.loads(pids_file.read_text())
        except (OSError, ValueError):
            return
        for name, pid in recorded.items():
            try:
                cmdline = Path(f"/proc/{int(pid)}/cmdline").read_bytes()
            except (OSError, ValueError):
                continue
            if str(self.state_dir).encode() in cmdline:  # ours, not a recycled pid
                print(f"killing {name} (pid {pid}) left over from a previous run", flush=True)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(int(pid), signal.SIGKILL)
        pids_file.unlink(missing_ok=True)

    def _record_pids(self) -> None:
        pids = {c.name: c.pid for c in self.children}
        (self.state_dir / "pids.json").write_text(json.dumps(pids) + "\n")

    # -- steps --------------------------------------------------------------------------

    def wait_for(self, what: str, ready: Callable[[], bool], timeout: float,
                 child: Child | None = None) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.stop.is_set():
                raise DemoError(f"interrupted while waiting for {what}")
            if child is not None and not child.alive():
                raise DemoError(f"{child.name} exited (code {child.proc.returncode}) before "
                                f"{what}; see {child.log}")
            if time.monotonic() > deadline:
                raise DemoError(f"{what} not ready within {timeout:.0f}s" +
                                (f"; see {child.log}" if child else ""))
            self.stop.wait(0.1)

    def start_localdc(self, *, append_log: bool = False) -> None:
        info_file = self.state_dir / "localdc.json"
        info_file.unlink(missing_ok=True)
        child = spawn("localdc", [
            sys.executable, "-m", "tgdaemon.localdc", "--host", "127.0.0.1",
            "--port", str(self.localdc_port),
            "--dcs", "2", "--state-dir", str(self.state_dir / "localdc"),
            "--info-file", str(info_file), "--control-port", "0", "--code", LOGIN_CODE,
        ], self.logs / "localdc.log", append=append_log)
        self.children.append(child)
        self._record_pids()
        self.wait_for("the local DC", info_file.exists, 30, child)
        self.info = json.loads(info_file.read_text())

    def write_config(self) -> Path:
        from tgdaemon.cli import main as tgdaemon_cli

        rsa_file = self.state_dir / "localdc_rsa.pem"
        rsa_file.write_text(self.info["rsa_public_key"])
        key_file = self.state_dir / "master.key"
        with contextlib.redirect_stdout(io.StringIO()) as said:
            if tgdaemon_cli(["keygen", str(key_file)]) != 0:
                raise DemoError("tgdaemon keygen failed")
        print(f"  {said.getvalue().strip()}", flush=True)
        daemon = {
            "state_dir": self.state_dir / "daemon",
            "master_key_file": key_file,
            "http_listen": f"127.0.0.1:{self.http_port}",
            "log_level": "info",
            "connect_rate": 0.0,
            "drain_timeout": 5.0,
            "metrics_histograms": "account",
        }
        policy = {"heartbeat_interval": 2.0, "stale_after": 10.0, "connect_timeout": 5.0,
                  "request_timeout": 4.0, "backoff_base": 0.5, "backoff_cap": 5.0}
        from tgdaemon.localdc.testing import daemon_config_toml

        servers = {dc["id"]: [f"{dc['host']}:{dc['port']}"] for dc in self.info["dcs"]}
        accounts = [{"name": name, "phone": _phone(i)} for i, name in enumerate(self.accounts)]
        text = daemon_config_toml(servers=servers, rsa_files=[rsa_file], accounts=accounts,
                                  daemon=daemon, policy=policy,
                                  header="Written by scripts/demo.py for the local stand-in DC.")
        path = self.state_dir / "tgdaemon.toml"
        path.write_text(text)
        return path

    def login_accounts(self, config_path: Path) -> None:
        """The CLI's own interactive login, with the prompts answered from the local DC."""
        from tgdaemon.cli import login
        from tgdaemon.config import load_config

        config = load_config(config_path)

        def secret(prompt: str) -> str:
            if "password" in prompt.lower():
                raise DemoError("a demo account unexpectedly asks for a 2FA password")
            return str(self.info.get("code") or LOGIN_CODE)

        async def run() -> None:
            for name in self.accounts:
                self.user_ids[name] = await login(config, name, prompt=lambda _p: "",
                                                  secret=secret)
                print(f"  logged in {name} (user {self.user_ids[name]})", flush=True)

        asyncio.run(run())

    def start_daemon(self, config_path: Path, *, append_log: bool = False) -> None:
        child = spawn("daemon", [sys.executable, "-m", "tgdaemon", "run", "--config",
                                 str(config_path)], self.logs / "daemon.log", append=append_log)
        self.children.append(child)
        self._record_pids()
        self.wait_for("the daemon's /readyz", lambda: http_ok(f"{self.daemon_url}/readyz"),
                      30, child)

    def start_prometheus(self) -> None:
        prometheus = shutil.which("prometheus")
        if prometheus is None:
            raise DemoError("prometheus is not installed: run scripts/install-system-deps.sh")
        config = self.state_dir / "prometheus.yml"
        config.write_text(
            "# Written by scripts/demo.py: scrape the demo daemon every 2 s.\n"
            "global:\n  scrape_interval: 2s\n  scrape_timeout: 2s\n  evaluation_interval: 2s\n"
            f"rule_files:\n  - {json.dumps(str(ALERT_RULES))}\n"
            "scrape_configs:\n  - job_name: tgdaemon\n    static_configs:\n"
            f'      - targets: ["127.0.0.1:{self.http_port}"]\n')
        child = spawn("prometheus", [
            prometheus, f"--config.file={config}",
            f"--storage.tsdb.path={self.state_dir / 'prometheus'}",
            f"--web.listen-address=127.0.0.1:{self.prometheus_port}", "--log.level=warn",
        ], self.logs / "prometheus.log")
        self.children.append(child)
        self._record_pids()
        self.wait_for("Prometheus", lambda: http_ok(f"{self.prometheus_url}/-/ready"), 30, child)

    def start(self) -> None:
        self.claim_state_dir()
        print(BANNER, flush=True)
        print("starting the local stand-in DC ...", flush=True)
        self.start_localdc()
        config_path = self.write_config()
        print(f"logging in {len(self.accounts)} demo accounts through the local DC ...", flush=True)
        self.login_accounts(config_path)
        print("starting the daemon ...", flush=True)
        self.start_daemon(config_path)
        print("starting Prometheus ...", flush=True)
        self.start_prometheus()
        d, p = self.daemon_url, self.prometheus_url
        print(f"""
{BANNER}
  status page     {d}/
  status (JSON)   {d}/status
  metrics         {d}/metrics
  Prometheus      {p}/   (alerts: {p}/alerts, targets: {p}/targets)
  config          {config_path}
  logs            {self.logs}/
  pids            {" ".join(f"{c.name}={c.pid}" for c in self.children)}
  Grafana: import config/grafana-dashboard.json with {p} as the data source.
Press Ctrl-C to stop everything.""", flush=True)

    # -- running ------------------------------------------------------------------------

    def dead_child(self) -> Child | None:
        return next((c for c in self.children if not c.alive()), None)

    def run(self, duration: float | None, chaos: Chaos | None) -> int:
        deadline = None if duration is None else time.monotonic() + duration
        while not self.stop.is_set():
            if (dead := self.dead_child()) is not None:
                print(f"{dead.name} exited unexpectedly (code {dead.proc.returncode}); "
                      f"see {dead.log}", file=sys.stderr, flush=True)
                return 1
            if deadline is not None and time.monotonic() >= deadline:
                print(f"--duration {duration:g}s reached", flush=True)
                break
            if chaos is not None:
                chaos.maybe_step()
            self.stop.wait(0.25)
        return 0

    def shutdown(self) -> None:
        """Reverse start order; each child gets SIGTERM, a bounded wait, then SIGKILL."""
        for child in reversed(self.children):
            if child.alive():
                print(f"stopping {child.name} (pid {child.pid}) ...", flush=True)
            code = child.stop()
            if code not in (0, -signal.SIGTERM):
                print(f"  {child.name} exited with code {code}; see {child.log}", flush=True)
        self.children.clear()
        if self._lock is not None:  # only the owner of the state directory cleans it
            (self.state_dir / "pids.json").unlink(missing_ok=True)
            self._lock.close()
            self._lock = None


@dataclass
class Chaos:
    """One fault every ``interval`` seconds, in a fixed cycle that ends with a repair."""

    demo: Demo
    interval: float
    step: int = 0
    next_at: float = 0.0
    faults: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.next_at = time.monotonic() + self.interval

    @property
    def control(self) -> str:
        return str(self.demo.info["control_url"])

    def maybe_step(self) -> None:
        if time.monotonic() < self.next_at:
            return
        self.next_at = time.monotonic() + self.interval
        actions = (self.drop, self.flood, self.revoke, self.stall, self.repair)
        action = actions[self.step % len(actions)]
        self.step += 1
        try:
            message = action()
        except (OSError, ValueError) as exc:
            message = f"{action.__name__} failed: {exc}"
        print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", flush=True)

    def _inject(self, fault: dict[str, Any]) -> int:
        return int(http_json(f"{self.control}/faults", "POST", fault)["id"])

    def drop(self) -> str:
        n = http_json(f"{self.control}/drop", "POST", {})["dropped"]
        return f"dropped all {n} connections: every account reconnects"

    def flood(self) -> str:
        self._inject({"kind": "rpc_error", "user_id": self.demo.user_ids["bob"],
                      "method": "updates.getState", "error": "FLOOD_WAIT_15", "times": 1})
        return "bob gets FLOOD_WAIT_15 on its next heartbeat: state flood_wait for 15 s"

    def revoke(self) -> str:
        self.faults["revoke"] = self._inject({
            "kind": "rpc_error", "user_id": self.demo.user_ids["carol"], "method": "*",
            "error": "SESSION_REVOKED"})
        return ("carol's key is revoked (SESSION_REVOKED): parked in needs_login; "
                "alert TgdaemonAccountNeedsLogin goes pending in Prometheus")

    def stall(self) -> str:
        self.faults["stall"] = self._inject({"kind": "stall", "method": None,
                                             "user_id": self.demo.user_ids["alice"]})
        return "alice's DC stops answering (stall): missed heartbeats, then a reconnect"

    def repair(self) -> str:
        for fault_id in self.faults.values():
            urllib.request.urlopen(urllib.request.Request(
                f"{self.control}/faults/{fault_id}", method="DELETE"), timeout=5).close()
        self.faults.clear()
        daemon = next(c for c in self.demo.children if c.name == "daemon")
        os.kill(daemon.pid, signal.SIGHUP)
        return ("cleared the stall and the revocation, reloaded the daemon (SIGHUP): carol "
                "gets a fresh try, as after `tgdaemon login carol`")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--state-dir", type=Path, default=ROOT / "demo-state",
                   help="where everything lives (wiped at start; default ./demo-state)")
    p.add_argument("--http-port", type=int, default=9464,
                   help="daemon status/metrics port (0 = any free; busy = any free)")
    p.add_argument("--prometheus-port", type=int, default=9090,
                   help="Prometheus port (0 = any free; busy = any free)")
    p.add_argument("--chaos", action="store_true", help="inject faults every few seconds")
    p.add_argument("--chaos-interval", type=float, default=10.0, help="seconds between faults")
    p.add_argument("--duration", type=float, default=None, help="stop by itself after N s")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    demo = Demo(args.state_dir.resolve(), pick_port(args.http_port),
                pick_port(args.prometheus_port))
    for requested, got, what in ((args.http_port, demo.http_port, "daemon HTTP"),
                                 (args.prometheus_port, demo.prometheus_port, "Prometheus")):
        if requested and requested != got:
            print(f"port {requested} is busy: {what} uses {got}", flush=True)

    def on_signal(signum: int, _frame: object) -> None:
        if not demo.stop.is_set():
            print(f"\n{signal.Signals(signum).name}: stopping ...", flush=True)
        demo.stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    try:
        demo.start()
        chaos = Chaos(demo, args.chaos_interval) if args.chaos else None
        code = demo.run(args.duration, chaos)
    except DemoError as exc:
        if demo.stop.is_set() and "interrupted" in str(exc):
            code = 0
        else:
            print(f"demo: {exc}", file=sys.stderr, flush=True)
            code = 1
    finally:
        demo.shutdown()
    print("demo stopped: nothing left running", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
