"""A fleet's re-encryption over PostgreSQL, SIGKILLed again and again: after every kill each
record decrypts with the ring on disk and is under the old or the new key (a batch is one
transaction: the server rolls back the one a kill cut), progress never goes back, and the
next run finishes the job."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
from pathlib import Path

from tests.conftest import Spawn
from tgdaemon.crypto import KeyRing, record_key_id, write_key_file
from tgdaemon.leasestore import PgLeaseStore
from tgdaemon.store import SESSION_PURPOSE, SessionData

#: The store crash tests' worker: its ``online`` mode with a URL re-encrypts the fleet's records.
WORKER = Path(__file__).parents[1] / "store" / "_store_crash_worker.py"
N = 1500
KILLS = 8
SEED = int(os.environ.get("TGDAEMON_CRASH_SEED", str(random.randrange(1 << 30))))


def spawn(children: Spawn, url: str, state_dir: str, key_file: str,
          batch: str) -> subprocess.Popen[str]:
    """A worker, killed and reaped at the end of the test whatever happens to it here."""
    root = Path(__file__).resolve().parents[2]
    return children([sys.executable, str(WORKER), "online", state_dir, key_file, batch, url],
                    env={**os.environ, "PYTHONPATH": str(root)})


async def audit(url: str, ring: KeyRing) -> dict[str, str | None]:
    """Every record decrypts with ``ring``; returns each one's key id."""
    leases = await PgLeaseStore.open(url)
    try:
        records = await leases.read_sessions()
    finally:
        await leases.close()
    for name, record in records.items():
        data = SessionData.from_bytes(ring.decrypt(record, account=name,
                                                   purpose=SESSION_PURPOSE))
        assert data.pts == int(name[1:]), f"seed {SEED}: {name} changed"
    return {name: record_key_id(r) for name, r in records.items()}


async def test_sigkill_loop_during_fleet_rotation(pg_url: str, tmp_path: Path,
                                                  keyring: KeyRing, children: Spawn) -> None:
    rng = random.Random(SEED)
    old = keyring
    names = [f"a{i:04d}" for i in range(N)]
    leases = await PgLeaseStore.open(pg_url)
    try:
        await leases.sync_accounts(dict.fromkeys(names, False))
        await leases.seed_sessions({n: old.encrypt(
            SessionData(2, "1.2.3.4", 443, os.urandom(256), pts=int(n[1:])).to_bytes(),
            account=n, purpose=SESSION_PURPOSE) for n in names})
    finally:
        await leases.close()
    new = old.with_new_active()
    key_file = tmp_path / "new.key"
    write_key_file(key_file, new)  # rotate-key writes the ring first
    args = (pg_url, str(tmp_path / "state"), str(key_file))
    under_new = 0
    for _ in range(KILLS):
        proc = spawn(children, *args, "20")
        assert proc.stdout is not None
        for _ in range(rng.randint(1, 3)):  # kill after a few batches, mid-batch or not
            line = proc.stdout.readline()
            assert line.startswith("batch "), (line, proc.stderr.read() if proc.stderr else "")
        await asyncio.sleep(rng.uniform(0, 0.02))  # somewhere inside the next batch
        proc.kill()
        _out, err = proc.communicate(timeout=20)
        assert proc.returncode == -9, f"worker ended by itself: {err[-2000:]}"
        ids = await audit(pg_url, new)
        assert len(ids) == N
        assert set(ids.values()) <= {old.active.key_id, new.active.key_id}, f"seed {SEED}"
        count = list(ids.values()).count(new.active.key_id)
        assert count >= under_new, f"seed {SEED}: progress lost"
        under_new = count
    assert 0 < under_new < N, f"seed {SEED}: kills did not land mid-rotation"
    proc = spawn(children, *args, "500")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert out.endswith("done\n")
    assert set((await audit(pg_url, new)).values()) == {new.active.key_id}
