"""Pre-created fleets: N users and N auth keys on the local DC(s), matching tgdaemon sessions.

Logging 10,000 accounts in through sendCode/signIn would spend ~90 ms of client CPU per key
exchange and test nothing the benchmark is about. Instead, before a localdc process starts,
its persistent store (``tgdaemon.localdc.store.Store``) gets the users and the auth keys
bound to them, and the same keys go encrypted into a tgdaemon ``Store``: every account then
starts "from a stored session", with no key exchange.

Localdc process k (1-based) serves DC k (``--dcs k``; its lower DCs are unused), so a key
lives on exactly one process and a session can only ever reach the process holding its key.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tgdaemon.crypto import KeyRing, generate_keyring, write_key_file
from tgdaemon.localdc.crypto import key_id_of
from tgdaemon.localdc.store import AuthKeyRecord
from tgdaemon.localdc.store import Store as DcStore
from tgdaemon.localdc.testing import daemon_config_toml
from tgdaemon.store import SessionData, Store

HOST = "127.0.0.1"


@dataclass(frozen=True)
class DcProc:
    """One localdc process of the bench: it serves DC ``dc_id`` on ``port + dc_id - 1``."""

    dc_id: int
    base_port: int
    state_dir: Path
    info_file: Path

    @property
    def port(self) -> int:
        return self.base_port + self.dc_id - 1


def account_name(i: int) -> str:
    return f"acct-{i:05d}"


def fake_phone(i: int) -> str:
    """A number in Telegram's test prefix; only ever stored, never logged."""
    return f"+99966{i:07d}"


def free_port_block(count: int, *, avoid: Sequence[int] = ()) -> int:
    """A base port with ``count`` consecutive free ports (kept by value, not held open:
    the localdc binds them a moment later, and a restart after an outage reuses them)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((HOST, 0))
            base = s.getsockname()[1]
        ports = range(base, base + count)
        if base + count > 65535 or any(p in avoid for p in ports):
            continue
        if all(_is_free(p) for p in ports):
            return base
    raise RuntimeError(f"no block of {count} free ports")


def _is_free(port: int) -> bool:
    with socket.socket() as s, contextlib.suppress(OSError):
        s.bind((HOST, port))
        return True
    return False


def plan_dc_procs(workdir: Path, count: int) -> list[DcProc]:
    procs: list[DcProc] = []
    used: list[int] = []
    for k in range(1, count + 1):
        base = free_port_block(k, avoid=used)
        used.extend(range(base, base + k))
        procs.append(DcProc(k, base, workdir / f"localdc{k}", workdir / f"localdc{k}.json"))
    return procs


def seed_localdc(
    proc: DcProc, indices: Sequence[int]
) -> tuple[str, list[tuple[int, int, bytes, int]]]:
    """Create users and bound auth keys in ``proc``'s store (the process must not run yet).

    Returns the server's public RSA key (PEM) and ``(index, user_id, auth_key, pts)`` per
    account."""
    store = DcStore(proc.state_dir)
    out = []
    try:
        pem = store.rsa_key.public_pem
        for i in indices:
            user = store.get_or_create_user(fake_phone(i), proc.dc_id)
            key = os.urandom(256)
            store.put_auth_key(AuthKeyRecord(key_id_of(key), proc.dc_id, key, user.id))
            out.append((i, user.id, key, user.pts))
    finally:
        store.close()
    return pem, out


async def seed_sessions(
    state_dir: Path, ring: KeyRing, sessions: Sequence[tuple[str, SessionData]]
) -> None:
    """Write the sessions into a tgdaemon store (batched by its single writer)."""
    store = await Store.open(state_dir, ring)
    try:
        await store.ensure_accounts({name: None for name, _ in sessions})
        for name, data in sessions:
            store.submit_session(name, data)
        await store.flush()
    finally:
        await store.close()


async def seed_fleet(
    n: int, procs: Sequence[DcProc], state_dir: Path, ring: KeyRing
) -> tuple[list[str], list[Path], list[list[int]]]:
    """Users, keys and sessions for ``n`` accounts spread round-robin over ``procs``.

    Returns the account names, one RSA public key file per localdc process and the user ids
    each localdc process holds."""
    sessions: list[tuple[str, SessionData]] = []
    rsa_files: list[Path] = []
    users: list[list[int]] = []
    now = int(time.time())
    for k, proc in enumerate(procs):
        pem, seeded = seed_localdc(proc, range(k, n, len(procs)))
        rsa_file = proc.state_dir.with_name(proc.state_dir.name + "_rsa.pem")
        rsa_file.write_text(pem)
        rsa_files.append(rsa_file)
        users.append([user_id for _i, user_id, _key, _pts in seeded])
        for i, user_id, key, pts in seeded:
            # The update state a login leaves in a session (Telethon's _on_login): without
            # it both fleets' clients would fetch it on connect and tgdaemon would then write
            # every session once, inside the idle window.
            sessions.append((account_name(i), SessionData(
                proc.dc_id, HOST, proc.port, auth_key=key, user_id=user_id,
                pts=pts, qts=0, date=now, seq=0)))
    sessions.sort()
    await seed_sessions(state_dir, ring, sessions)
    return [name for name, _ in sessions], rsa_files, users


@dataclass(frozen=True)
class SeededDir:
    """What :func:`seed_dir` left in a work directory."""

    key_file: Path
    specs: list[DcProc]
    state: Path
    names: list[str]
    rsa_files: list[Path]
    users: list[list[int]]


def seed_dir(n: int, work: Path, dc_procs: int) -> SeededDir:
    """A fresh master key, ``dc_procs`` planned localdc processes and ``n`` seeded accounts
    (:func:`seed_fleet`) under ``work``."""
    ring = generate_keyring()
    key_file = work / "master.key"
    write_key_file(key_file, ring)
    specs = plan_dc_procs(work, dc_procs)
    state = work / "state"
    names, rsa_files, users = asyncio.run(seed_fleet(n, specs, state, ring))
    return SeededDir(key_file, specs, state, names, rsa_files, users)


def render_config(
    *,
    state_dir: Path,
    key_file: Path,
    rsa_files: Sequence[Path],
    procs: Sequence[DcProc],
    names: Sequence[str],
    daemon: dict[str, object],
    policy: dict[str, object],
    security: dict[str, object] | None = None,
) -> str:
    """A tgdaemon config for the bench fleet (no phone numbers: sessions already exist)."""
    daemon_cfg: dict[str, object] = {
        "state_dir": state_dir, "master_key_file": key_file, "http_listen": f"{HOST}:0",
        **daemon,
    }
    return daemon_config_toml(
        servers={p.dc_id: [f"{HOST}:{p.port}"] for p in procs}, rsa_files=rsa_files,
        accounts=[{"name": name} for name in names], daemon=daemon_cfg, policy=policy,
        security=security)
