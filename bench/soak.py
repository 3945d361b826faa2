"""Fault soak: the daemon under random faults from the local DC and random SIGKILLs.

``make soak`` (``SOAK_SECONDS`` sets the duration, default 600). Runs the same processes as
``make demo`` (local DC, the daemon; no Prometheus) with more accounts, then for the whole
duration injects, at random: dropped connections, stalls, flood waits, USER_MIGRATE, a revoked
session, a restart of the local DC, and SIGKILL + restart of the daemon. At the end it checks:

- every account that was not revoked is connected again;
- no session is lost or unreadable (the store passes ``integrity_check``, every record decrypts);
- the daemon's resident memory grew less than 10 % after warm-up (measured over the life of the
  last daemon process: SIGKILLs happen only in the first 60 % of the run);
- no secret (phone numbers, login code, master key, auth keys, api_hash) in any log.

Writes ``bench/SOAK.md`` and exits non-zero if a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sqlite3
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import demo  # noqa: E402  (scripts/demo.py: the same process management as make demo)

from tests.leakscan import secrets_found  # noqa: E402
from tgdaemon.crypto import load_keyring  # noqa: E402
from tgdaemon.store import DB_NAME, Store  # noqa: E402


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def consecutive_free_ports(n: int) -> int:
    for _ in range(100):
        base = demo.pick_port(0)
        if all(demo.pick_port(base + i) == base + i for i in range(n)):
            return base
    raise RuntimeError("no consecutive free ports")


class Soak:
    def __init__(self, state_dir: Path, accounts: int, seed: int) -> None:
        names = tuple(f"soak{i:03d}" for i in range(accounts))
        self.demo = demo.Demo(state_dir, demo.pick_port(0), 0, accounts=names,
                              localdc_port=consecutive_free_ports(2))
        self.rng = random.Random(seed)
        self.revoked: set[str] = set()
        self.events: list[tuple[str, str]] = []  # (kind, what happened)
        self.config_path: Path | None = None
        self.rss: list[tuple[float, int, int]] = []  # (t, pid, KiB)

    @property
    def control(self) -> str:
        return str(self.demo.info["control_url"])

    def child(self, name: str) -> demo.Child:
        return next(c for c in self.demo.children if c.name == name)

    def start(self) -> None:
        d = self.demo
        d.claim_state_dir()
        d.start_localdc()
        self.config_path = d.write_config()
        d.login_accounts(self.config_path)
        d.start_daemon(self.config_path)

    def status(self) -> dict[str, str]:
        body = demo.http_json(f"{self.demo.daemon_url}/status")
        return {a["account"]: a["state"] for a in body["accounts"]}

    # -- faults -------------------------------------------------------------------------

    def inject(self, fault: dict[str, Any]) -> int:
        return int(demo.http_json(f"{self.control}/faults", "POST", fault)["id"])

    def clear(self, fault_id: int | None = None) -> None:
        url = f"{self.control}/faults" + ("" if fault_id is None else f"/{fault_id}")
        demo.http_json(url, "DELETE")

    def healthy_user(self) -> tuple[str, int]:
        name = self.rng.choice([n for n in self.demo.accounts if n not in self.revoked])
        return name, self.demo.user_ids[name]

    def step(self, elapsed: float, duration: float) -> tuple[str, str]:
        """Inject one random fault; returns (kind, what happened)."""
        actions = ["drop", "stall", "flood", "migrate", "restart_dc"]
        if elapsed < 0.6 * duration:
            actions += ["kill_daemon", "kill_daemon"]
        if not self.revoked:
            actions.append("revoke")
        action = self.rng.choice(actions)
        return action, self._apply(action)

    def _apply(self, action: str) -> str:
        if action == "drop":
            n = demo.http_json(f"{self.control}/drop", "POST", {})["dropped"]
            return f"dropped {n} connections"
        if action == "stall":
            fault = self.inject({"kind": "stall", "dc_id": 1, "method": None})
            time.sleep(self.rng.uniform(2, 6))  # the outage itself, not a wait for a result
            self.clear(fault)
            return "DC 1 stalled for a few seconds"
        if action == "flood":
            name, uid = self.healthy_user()
            seconds = self.rng.randint(2, 8)
            self.inject({"kind": "rpc_error", "user_id": uid, "method": "updates.getState",
                         "error": f"FLOOD_WAIT_{seconds}", "times": 1})
            return f"{name}: FLOOD_WAIT_{seconds}"
        if action == "migrate":
            name, uid = self.healthy_user()
            target = self.rng.choice((1, 2))
            self.inject({"kind": "rpc_error", "user_id": uid, "method": "users.getUsers",
                         "error": f"USER_MIGRATE_{target}", "times": 1})
            demo.http_json(f"{self.control}/drop", "POST", {"user_id": uid})
            return f"{name}: USER_MIGRATE_{target} on reconnect"
        if action == "revoke":
            name, uid = self.healthy_user()
            self.revoked.add(name)
            self.inject({"kind": "rpc_error", "user_id": uid, "method": "*",
                         "error": "SESSION_REVOKED"})
            return f"{name}: SESSION_REVOKED (stays parked)"
        if action == "restart_dc":
            self.restart("localdc")
            return "local DC restarted"
        self.restart("daemon", kill=True)
        return "daemon SIGKILLed and restarted"

    def restart(self, name: str, *, kill: bool = False) -> None:
        d = self.demo
        child = self.child(name)
        if kill:
            os.killpg(child.pid, signal.SIGKILL)
            child.proc.wait()
        else:
            child.stop()
        d.children.remove(child)
        if name == "localdc":
            d.start_localdc(append_log=True)
            # Faults live in the local DC's memory: re-apply the revocations.
            for account in self.revoked:
                self.inject({"kind": "rpc_error", "user_id": d.user_ids[account],
                             "method": "*", "error": "SESSION_REVOKED"})
        else:
            assert self.config_path is not None
            d.start_daemon(self.config_path, append_log=True)

    # -- run and verify -----------------------------------------------------------------

    def run(self, duration: float, interval: float) -> None:
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < duration:
            if self.demo.stop.wait(self.rng.uniform(0.5, 1.5) * interval):
                break
            kind, message = self.step(elapsed, duration)
            self.events.append((kind, message))
            print(f"[soak {elapsed:6.1f}s] {message}", flush=True)
            daemon = self.child("daemon")
            self.rss.append((time.monotonic() - started, daemon.pid, rss_kib(daemon.pid)))

    def settle(self, timeout: float) -> tuple[bool, dict[str, str]]:
        self.clear()
        for account in self.revoked:  # keep revoked accounts revoked
            self.inject({"kind": "rpc_error", "user_id": self.demo.user_ids[account],
                         "method": "*", "error": "SESSION_REVOKED"})
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            try:
                states = self.status()
            except OSError:
                states = {}
            healthy = [n for n in self.demo.accounts if n not in self.revoked]
            if states and all(states.get(n) == "connected" for n in healthy):
                return True, states
            time.sleep(0.5)
        return False, states

    def memory_growth(self) -> tuple[float | None, str]:
        last_pid = self.rss[-1][1] if self.rss else None
        samples = [(t, kib) for t, pid, kib in self.rss if pid == last_pid]
        if len(samples) < 4:
            return None, "too few samples of the last daemon process"
        warm = samples[len(samples) // 4][1]  # after the first quarter of its life
        end = samples[-1][1]
        return (end - warm) / warm, f"{warm} KiB after warm-up -> {end} KiB"

    def verify_store(self) -> tuple[list[str], list[bytes]]:
        """Problems found in the store, and the stored auth keys (for the leak scan)."""
        problems = []
        config_dir = self.demo.state_dir
        state = config_dir / "daemon"
        db = sqlite3.connect(state / DB_NAME)
        if db.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
            problems.append("integrity_check failed")
        db.close()

        async def load() -> dict[str, Any]:
            ring = load_keyring(key_file=config_dir / "master.key")
            async with await Store.open(state, ring) as store:
                return await store.load_sessions()

        sessions = asyncio.run(load())
        keys = []
        for name in self.demo.accounts:
            data = sessions.get(name)
            if data is None or isinstance(data, Exception) or data.auth_key is None:
                problems.append(f"{name}: session lost or unreadable")
            else:
                keys.append(data.auth_key)
        return problems, keys

    def leaks(self, auth_keys: list[bytes]) -> list[str]:
        text = "\n".join(p.read_text(errors="replace") for p in self.demo.logs.glob("*.log"))
        ring = load_keyring(key_file=self.demo.state_dir / "master.key")
        phones = [demo._phone(i) for i in range(len(self.demo.accounts))]
        return secrets_found(text, phones=phones, codes=[demo.LOGIN_CODE], keyring=ring,
                             auth_keys=auth_keys)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float,
                   default=float(os.environ.get("SOAK_SECONDS", "600")))
    p.add_argument("--accounts", type=int, default=12)
    p.add_argument("--interval", type=float, default=5.0, help="mean seconds between faults")
    p.add_argument("--seed", type=int, default=int(time.time()))
    p.add_argument("--state-dir", type=Path, default=ROOT / "soak-state")
    p.add_argument("--report", type=Path, default=ROOT / "bench" / "SOAK.md")
    args = p.parse_args(argv)
    soak = Soak(args.state_dir.resolve(), args.accounts, args.seed)
    signal.signal(signal.SIGINT, lambda *_: soak.demo.stop.set())
    checks: list[tuple[str, bool, str]] = []
    try:
        soak.start()
        print(f"soak: {args.accounts} accounts, {args.duration:g}s, seed {args.seed}", flush=True)
        soak.run(args.duration, args.interval)
        ok, states = soak.settle(90)
        healthy = len([n for n in soak.demo.accounts if n not in soak.revoked])
        connected = sum(1 for n, s in states.items() if s == "connected")
        checks.append(("all non-revoked accounts connected within 90 s", ok,
                       f"{connected}/{healthy} connected; revoked: {len(soak.revoked)}"))
        growth, detail = soak.memory_growth()
        checks.append(("RSS growth after warm-up < 10 %", growth is not None and growth < 0.10,
                       detail if growth is None else f"{growth:+.1%} ({detail})"))
    finally:
        soak.demo.shutdown()
    problems, auth_keys = soak.verify_store()
    checks.append(("every session intact and decryptable", not problems,
                   "; ".join(problems) or f"{args.accounts} sessions ok"))
    leaks = soak.leaks(auth_keys)
    checks.append(("no secret in any log", not leaks, ", ".join(leaks) or "none found"))
    kinds = Counter(kind for kind, _message in soak.events)
    lines = [
        "# Fault soak", "",
        f"`make soak` on {time.strftime('%Y-%m-%d')}: {args.accounts} accounts, "
        f"{args.duration:g} s, seed {args.seed}, {len(soak.events)} faults.", "",
        "| check | result | detail |", "|---|---|---|",
        *[f"| {name} | {'PASS' if ok else 'FAIL'} | {detail} |" for name, ok, detail in checks],
        "", "Faults injected:", "",
        *[f"- {kind}: {n}" for kind, n in sorted(kinds.items())], "",
    ]
    args.report.write_text("\n".join(lines))
    print("\n".join(lines), flush=True)
    return 0 if all(ok for _n, ok, _d in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
