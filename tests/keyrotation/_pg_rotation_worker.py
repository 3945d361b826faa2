"""Child process of test_pg_rotation_crash: a fleet instance's re-encryption over PostgreSQL
(the store routed to the shared records, as in a daemon of the fleet), in small batches until
nothing is left or it is SIGKILLed.

    _pg_rotation_worker.py URL STATE_DIR KEY_FILE BATCH
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from tgdaemon.cluster_cli import FleetRecords
from tgdaemon.crypto import load_keyring
from tgdaemon.leasestore import PgLeaseStore
from tgdaemon.store import Store


async def main(url: str, state_dir: Path, key_file: Path, batch: int) -> None:
    leases = await PgLeaseStore.open(url)
    store = await Store.open(state_dir, load_keyring(key_file=key_file, env={}), lock=False)
    store.route_sessions(FleetRecords(leases))
    while True:
        _done, left = await store.reencrypt_some(batch)
        print(f"batch {left}", flush=True)
        if left == 0:
            break
    print("done", flush=True)
    await store.close()
    await leases.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])))
