"""Liveness of a state database shared by the daemons of a fleet (issue 15, 4 x 10,000).

One daemon writes session records and account metadata for many accounts while its event loop
lags (as 10,000 connecting accounts make it); two other daemons renew their leases meanwhile.
Real processes on one real SQLite file.  A renewal must never fail nor wait long: a write
transaction that holds SQLite's write lock across event-loop turns (each statement awaited)
held it for seconds, the others' renewals timed out ("database is locked") and their leases
lapsed.  Every write transaction is now one call into the database thread; the writer's
recorded lock hold times are bounded too."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tgdaemon.crypto import generate_keyring, write_key_file
from tgdaemon.store import Store

WORKER = Path(__file__).with_name("_write_lock_worker.py")
#: Each turn of the writer's event loop is blocked this long (a daemon at 10,000 lags more).
LAG = 0.5
#: A renewal must answer within one lag: it may wait for the writer's transactions, but only
#: for their SQL (holds of ~0.1 s), never for the writer's event loop (renewals that waited
#: for it, at least 10 of them, would reach a whole lag). Not half a lag: a loaded 2-core
#: machine's scheduling alone reached 0.16 s (0.29 s once, beside a fleet of processes).
RENEWAL_BOUND = 0.8 * LAG
WRITER_ACCOUNTS, RENEWER_ACCOUNTS, CYCLES = 400, 300, 2


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(WORKER), *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def expect_line(proc: subprocess.Popen[str], what: str) -> str:
    assert proc.stdout is not None
    got = proc.stdout.readline().strip()  # blocks until the child says it (or ends)
    if not got.startswith(what):
        proc.kill()
        _out, err = proc.communicate(timeout=30)
        raise AssertionError(f"expected {what!r}, got {got!r}: {err[-3000:]}")
    return got


def send(proc: subprocess.Popen[str], text: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(text + "\n")
    proc.stdin.flush()


async def test_renewals_do_not_wait_for_a_lagging_writer(tmp_path: Path) -> None:
    state = tmp_path / "state"
    key_file = tmp_path / "tgdaemon.key"
    ring = generate_keyring()
    write_key_file(key_file, ring)
    async with await Store.open(state, ring, lock=False):
        pass  # the schema, before anybody shares it
    procs: list[subprocess.Popen[str]] = []
    try:
        writer = spawn("writer", str(state), str(key_file), str(WRITER_ACCOUNTS), str(CYCLES),
                       str(LAG))
        procs.append(writer)
        expect_line(writer, "ready")
        renewers = [spawn("renewer", str(state), f"r{i}", str(RENEWER_ACCOUNTS), "0.1")
                    for i in range(2)]
        procs += renewers
        for proc in renewers:
            expect_line(proc, "ready")
        for proc in procs:
            send(proc, "go")
        wrote = json.loads(expect_line(writer, "{"))
        for proc in renewers:
            send(proc, "stop")
        renewed = [json.loads(expect_line(proc, "{")) for proc in renewers]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=30)
    print(f"\nrenewal max {[r['max'] for r in renewed]} s, lock hold max "
          f"{max(t['hold_max'] for t in wrote['lock'].values()):.3f} s, bound {RENEWAL_BOUND} s")
    assert wrote["failures"] == 0
    # The lagging loop took whole seconds per batch: renewals ran throughout the writes.
    assert wrote["seconds"] > 2 * LAG
    for r in renewed:
        assert r["renewals"] >= 5, r
        assert r["failed"] == 0, r
        assert r["short"] == 0, r
        assert r["max"] < RENEWAL_BOUND, (r, wrote)
    lock = wrote["lock"]
    assert lock["metadata"]["count"] >= CYCLES, lock
    assert lock["sessions"]["count"] >= CYCLES, lock
    assert max(t["hold_max"] for t in lock.values()) < RENEWAL_BOUND, lock
