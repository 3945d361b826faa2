"""Crash safety: SIGKILL a writer (or a key rotation) at random points, then audit the state.

TGDAEMON_CRASH_KILLS raises the number of kills for a soak run (default 50);
TGDAEMON_CRASH_SEED replays a run.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from storehelpers import SessionBackend

from tests.conftest import Spawn
from tgdaemon.crypto import KeyRing, generate_keyring, record_key_id, write_key_file
from tgdaemon.store import DB_NAME, SESSION_PURPOSE, SessionData, Store

WORKER = Path(__file__).with_name("_store_crash_worker.py")
KILLS = int(os.environ.get("TGDAEMON_CRASH_KILLS", "50"))
SEED = int(os.environ.get("TGDAEMON_CRASH_SEED", str(random.randrange(1 << 30))))
#: A worker process per kill (~0.4 s of CPU each to start): pytest's 60 s is too short for
#: the loops on a loaded machine (they ran out at load 15); scales with the kills of a soak.
SLOW = pytest.mark.timeout(120 + 4 * KILLS)


def spawn(children: Spawn, *args: str) -> subprocess.Popen[str]:
    """A worker, killed and reaped at the end of the test whatever happens to it here."""
    return children([sys.executable, str(WORKER), *args])


def kill(proc: subprocess.Popen[str]) -> tuple[str, str]:
    proc.kill()
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == -9, f"worker ended by itself ({proc.returncode}): {err[-2000:]}"
    return out, err


def audit(state_dir: Path, ring: KeyRing) -> dict[str, SessionData]:
    """Integrity check plus decryption of every record, straight from SQLite."""
    db = sqlite3.connect(state_dir / DB_NAME)
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = db.execute("SELECT account, record FROM sessions").fetchall()
    finally:
        db.close()
    return decrypt_all(dict(rows), ring)


def decrypt_all(records: dict[str, bytes], ring: KeyRing) -> dict[str, SessionData]:
    return {
        name: SessionData.from_bytes(ring.decrypt(rec, account=name, purpose=SESSION_PURPOSE))
        for name, rec in records.items()
    }


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> SessionBackend:
    """Session records in the state database, or (a fleet) in a real PostgreSQL."""
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else ""
    return SessionBackend(tmp_path / "state", url)


@SLOW
def test_sigkill_while_writing_sessions(tmp_path: Path, backend: SessionBackend,
                                        children: Spawn) -> None:
    rng = random.Random(SEED)
    state, key_file = backend.state_dir, tmp_path / "tgdaemon.key"
    ring = generate_keyring()
    write_key_file(key_file, ring)
    committed: dict[str, int] = {}
    acked_total = 0
    # A PostgreSQL worker starts slower (a connection pool, the lease claims): fewer kills.
    kills = KILLS if backend.kind == "sqlite" else max(5, KILLS // 5)
    for i in range(kills):
        proc = spawn(children, "write", str(state), str(key_file), "20", backend.url)
        assert proc.stdout is not None
        if i == 0 or rng.random() < 0.7:
            # kill in the middle of the write stream
            first = proc.stdout.readline()
            assert first.startswith("ok "), f"seed {SEED}: worker failed: {first!r}"
            time.sleep(rng.uniform(0, 0.05))
            out, _ = kill(proc)
            out = first + out
        else:
            # kill anywhere, start-up and migration included
            time.sleep(rng.uniform(0, 0.3))
            out, _ = kill(proc)
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "ok":  # a torn last line is not an ack
                committed[parts[1]] = max(committed.get(parts[1], 0), int(parts[2]))
                acked_total += 1
        if not (state / DB_NAME).exists():
            continue
        if backend.kind == "sqlite":
            stored = audit(state, ring)
        else:  # every record readable; the local database is intact and holds none
            assert not audit(state, ring)
            stored = decrypt_all(asyncio.run(backend.raw()), ring)
        for name, seq in committed.items():
            assert name in stored, f"seed {SEED}, kill {i}: acknowledged session of {name} lost"
            assert stored[name].pts is not None
            assert stored[name].pts >= seq, f"seed {SEED}, kill {i}: {name} went back in time"
    assert acked_total > kills  # the kills really interrupted a stream of writes
    # the daemon starts cleanly on the final state
    async def reopen() -> dict:
        async with backend.open(ring) as s:
            return await s.load_sessions()

    final = asyncio.run(reopen())
    assert set(committed) <= set(final)
    assert all(isinstance(v, SessionData) for v in final.values())


def populate(state: Path, ring: KeyRing, n: int) -> None:
    async def create() -> None:
        async with await Store.open(state, ring):
            pass

    asyncio.run(create())
    db = sqlite3.connect(state / DB_NAME)
    with db:
        db.executemany("INSERT INTO accounts (name, created_at) VALUES (?, 0)",
                       [(f"a{i:05d}",) for i in range(n)])
        db.executemany(
            "INSERT INTO sessions VALUES (?, ?, 0)",
            [(f"a{i:05d}", ring.encrypt(
                SessionData(2, "1.2.3.4", 443, os.urandom(256), pts=i).to_bytes(),
                account=f"a{i:05d}", purpose=SESSION_PURPOSE)) for i in range(n)],
        )
    db.close()


def rotate_once(children: Spawn, work: Path, old: KeyRing, pristine: Path,
                delay: float | None) -> tuple[set[str | None], KeyRing, float, bool]:
    """Run one rotation on a fresh copy; kill it ``delay`` s after it started (None: never)."""
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(pristine, work / "state")
    new = old.with_new_active()
    write_key_file(work / "new.key", new)  # the key file first, as rotate-key must do
    proc = spawn(children, "rotate", str(work / "state"), str(work / "new.key"))
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    t0 = time.monotonic()
    if delay is None:
        assert proc.stdout.readline() == "done 4000\n"
        elapsed = time.monotonic() - t0
        proc.communicate(timeout=20)
        finished = True
    else:
        time.sleep(delay)
        proc.kill()
        out, _ = proc.communicate(timeout=20)
        elapsed = time.monotonic() - t0
        finished = "done" in out
    stored = audit(work / "state", new)
    assert len(stored) == 4000
    assert stored["a00042"].pts == 42
    db = sqlite3.connect(work / "state" / DB_NAME)
    try:
        ids = {record_key_id(r) for (r,) in db.execute("SELECT record FROM sessions")}
    finally:
        db.close()
    return ids, new, elapsed, finished


@SLOW
def test_sigkill_during_rotation(tmp_path: Path, children: Spawn) -> None:
    """Either every record is under the old key or every record under the new one."""
    rng = random.Random(SEED)
    old = generate_keyring()
    pristine = tmp_path / "pristine"
    populate(pristine, old, 4000)
    # control run: measures how long a rotation takes, and must end all-new
    ids, new, duration, _ = rotate_once(children, tmp_path / "work", old, pristine, None)
    assert ids == {new.active.key_id}
    outcomes = []
    for _ in range(8):
        ids, new, _, finished = rotate_once(
            children, tmp_path / "work", old, pristine, rng.uniform(0, duration * 1.2)
        )
        assert ids in ({old.active.key_id}, {new.active.key_id}), f"seed {SEED}: mixed {ids}"
        if not finished:
            outcomes.append(ids == {new.active.key_id})
    assert outcomes, f"seed {SEED}: no kill landed inside a rotation"


@SLOW
def test_sigkill_loop_during_online_rotation(tmp_path: Path, children: Spawn) -> None:
    """The daemon's background re-encryption (small durable batches), SIGKILLed again and
    again: after every kill each record decrypts with the ring on disk and is under the old
    or the new key, progress never goes back, and a last run finishes the job."""
    rng = random.Random(SEED)
    old = generate_keyring()
    state = tmp_path / "state"
    populate(state, old, 1500)
    new = old.with_new_active()
    write_key_file(tmp_path / "new.key", new)  # rotate-key writes the ring first
    under_new = 0
    kills = 0
    partial = False  # some kill left the rotation half done
    while kills < 20:
        proc = spawn(children, "online", str(state), str(tmp_path / "new.key"), "25")
        assert proc.stdout is not None
        for _ in range(rng.randint(1, 3)):  # kill after a few batches, mid-transaction or not
            line = proc.stdout.readline()
            assert line.startswith(("batch ", "done")), line
            if line.startswith(("batch 0", "done")):  # these kills' batches finished the job
                break
        time.sleep(rng.uniform(0, 0.02))  # somewhere inside the next batch
        proc.kill()
        proc.communicate(timeout=20)
        kills += 1
        stored = audit(state, new)  # raises if a record is unreadable or torn
        assert len(stored) == 1500
        db = sqlite3.connect(state / DB_NAME)
        try:
            ids = [record_key_id(r) for (r,) in db.execute("SELECT record FROM sessions")]
        finally:
            db.close()
        assert set(ids) <= {old.active.key_id, new.active.key_id}, f"seed {SEED}"
        count = ids.count(new.active.key_id)
        assert count >= under_new, f"seed {SEED}: progress lost"
        under_new = count
        partial = partial or 0 < count < 1500
        if count == 1500:  # the kills' batches finished the job (a seed with long runs)
            break
    assert partial, f"seed {SEED}: kills did not land mid-rotation"
    proc = spawn(children, "online", str(state), str(tmp_path / "new.key"), "500")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert out.endswith("done\n")
    stored = audit(state, new)
    assert stored["a00042"].pts == 42
    db = sqlite3.connect(state / DB_NAME)
    try:
        assert {record_key_id(r) for (r,) in db.execute("SELECT record FROM sessions")} == {
            new.active.key_id}
    finally:
        db.close()
