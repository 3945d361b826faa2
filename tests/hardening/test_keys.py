"""Issue 11 item 13 (interrupted rotate-key, prune-keys, temporary key files) and item 10's
key-file cases, through the real CLI."""

from __future__ import annotations

import sqlite3

from tests.cli.test_cli import arun_cli, run_cli
from tests.conftest import phone_for
from tests.hardening.tables import table_column
from tgdaemon.crypto import KeyRing, record_key_id, write_key_file
from tgdaemon.store import DB_NAME


def _ring(path) -> KeyRing:
    return KeyRing.loads(path.read_text())


def _record_keys(state_dir) -> set[str | None]:
    with sqlite3.connect(state_dir / DB_NAME) as db:
        return {record_key_id(bytes(r)) for (r,) in db.execute("SELECT record FROM sessions")}


async def test_interrupted_rotations_do_not_pile_up_and_prune_keys(
        make_config, login_account, localdc, key_file, state_dir) -> None:
    config = make_config([{"name": "ann", "phone": phone_for("ann")}])
    await login_account(config, "ann")
    first = _ring(key_file)
    # What an interrupted rotate-key leaves: its new ring written (new active key, old one
    # kept), the records not yet re-encrypted, and a temporary copy of the ring beside it.
    write_key_file(key_file, first.with_new_active(), overwrite=True)
    stale = key_file.parent / f".{key_file.name}.0123456789ab.tmp"
    stale.write_text(first.dumps())
    assert _record_keys(state_dir) == {first.active.key_id}

    code, out, err = await arun_cli("rotate-key", "--config", str(config.path))
    assert code == 0, err
    assert "finished the interrupted rotation" in out
    ring = _ring(key_file)
    assert len(ring) == 2  # no third key for the interrupted run
    assert _record_keys(state_dir) == {ring.active.key_id}
    assert not stale.exists()

    code, out, err = await arun_cli("rotate-key", "--config", str(config.path))
    assert code == 0, err
    assert "finished" not in out
    ring = _ring(key_file)
    assert len(ring) == 3  # a completed rotation adds exactly one
    assert _record_keys(state_dir) == {ring.active.key_id}

    code, out, err = await arun_cli("prune-keys", "--config", str(config.path))
    assert code == 0, err
    pruned = _ring(key_file)
    assert pruned.key_ids == (ring.active.key_id,)
    assert "removed key(s)" in out
    code, out, err = await arun_cli("accounts", "--config", str(config.path))
    assert code == 0, err
    assert table_column(out, "SESSION") == "ok"
    code, out, _err = await arun_cli("prune-keys", "--config", str(config.path))
    assert code == 0
    assert "nothing pruned" in out


async def test_prune_keys_refuses_when_a_record_does_not_decrypt(
        make_config, login_account, localdc, key_file, state_dir) -> None:
    config = make_config([{"name": "bea", "phone": phone_for("bea")}])
    await login_account(config, "bea")
    before = key_file.read_bytes()
    with sqlite3.connect(state_dir / DB_NAME) as db:  # a damaged record
        db.execute("UPDATE sessions SET record = zeroblob(80)")
    write_key_file(key_file, _ring(key_file).with_new_active(), overwrite=True)
    before = key_file.read_bytes()
    code, _out, err = await arun_cli("prune-keys", "--config", str(config.path))
    assert code == 65, err
    assert "not pruning" in err
    assert "Traceback" not in err
    assert key_file.read_bytes() == before


def test_key_files_into_a_missing_directory_are_one_line(make_config, tmp_path) -> None:
    result = run_cli("keygen", str(tmp_path / "nope" / "k.key"))
    assert result.returncode == 78, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"tgdaemon: error: cannot write key file {tmp_path / 'nope' / 'k.key'}: directory "
        f"{tmp_path / 'nope'} does not exist"]
    config = make_config([{"name": "cid"}])
    result = run_cli("rotate-key", "--config", str(config.path),
                     "--out", str(tmp_path / "nope" / "new.key"))
    assert result.returncode == 78, result.stderr
    assert "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
