"""Issue 11 items 5 (single-instance lock), 10 (state files as one line + exit code) and 12
(truncated or read-only database), against the real daemon process and CLI."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys

import pytest

from tests.cli.test_cli import arun_cli
from tests.conftest import wait_for_condition
from tests.daemon.test_process import (
    DaemonProcess,
    accounts,
    daemon_env,
    free_port,
    start_daemon,
    states_are,
)
from tgdaemon.store import DB_NAME, LOCK_NAME

from .test_store_records import _get


async def test_deleting_the_lock_file_does_not_let_a_second_daemon_in(
        make_config, login_account, localdc, notify, processes, state_dir):
    port = free_port()
    config = make_config(accounts("alice"), daemon={"http_listen": f"127.0.0.1:{port}"})
    await login_account(config, "alice")
    first = await start_daemon(processes, config.path, notify)
    await notify.wait("READY", "1")
    await wait_for_condition(lambda: states_are(port, {"alice": "connected"}), 15, "connected")

    (state_dir / LOCK_NAME).unlink()  # a clean-up script, an operator's rm
    second = await start_daemon(processes, config.path, notify)
    assert await second.wait_exit(15) == 75, second.log
    lines = [line for line in second.lines if "error" in line.lower()]
    assert len(lines) == 1, second.log
    assert "already in use by another tgdaemon" in lines[0]
    assert "Traceback" not in second.log
    assert first.running()
    assert await states_are(port, {"alice": "connected"})
    assert localdc.counters()["auth_key_duplicated"] == 0


async def test_zero_byte_database_is_refused_not_a_new_store(
        make_config, login_account, localdc, notify, processes, state_dir):
    config = make_config(accounts("alice"))
    await login_account(config, "alice")
    (state_dir / DB_NAME).write_bytes(b"")  # truncated (a full disk, a bad restore)
    for wal in state_dir.glob(f"{DB_NAME}-*"):
        wal.unlink()
    daemon = await start_daemon(processes, config.path, notify)
    assert await daemon.wait_exit(15) == 78, daemon.log
    lines = [line for line in daemon.lines if "error" in line.lower()]
    assert len(lines) == 1, daemon.log
    assert "Traceback" not in daemon.log
    assert "is empty (0 bytes) but this state directory held a tgdaemon store" in lines[0]
    code, _out, err = await arun_cli("accounts", "--config", str(config.path))
    assert code == 78
    assert "restore the database from a backup" in err
    assert (state_dir / DB_NAME).stat().st_size == 0  # nothing was created over it


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"],
                           capture_output=True, check=False)
    return probe.returncode == 0


needs_mount_ns = pytest.mark.skipif(not _can_unshare(),
                                    reason="needs root to make a read-only bind mount")


async def _run_read_only(target: str, *args: str, env: dict[str, str]) -> DaemonProcess:
    """``python -m tgdaemon ARGS`` in a private mount namespace where ``target`` is a
    read-only bind mount of itself (a read-only file system as the process sees it)."""
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    proc = await asyncio.create_subprocess_exec(
        "unshare", "-m", "--propagation", "private", "sh", "-c", script, target,
        sys.executable, "-m", "tgdaemon", *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env)
    return DaemonProcess(proc)


@needs_mount_ns
async def test_read_only_state(make_config, login_account, localdc, notify, processes,
                               state_dir):
    port = free_port()
    config = make_config(accounts("alice"), daemon={"http_listen": f"127.0.0.1:{port}"})
    await login_account(config, "alice")
    env = daemon_env(NOTIFY_SOCKET=str(notify.path))

    # The whole state directory on a read-only mount: one line, exit 78 (systemd stops).
    cli = await _run_read_only(str(state_dir), "accounts", "--config", str(config.path),
                               env=env)
    processes.append(cli)
    assert await cli.wait_exit(30) == 78, cli.log
    assert [line for line in cli.lines if "error" in line.lower()] == [
        f"tgdaemon: error: cannot open the lock file {state_dir / LOCK_NAME} "
        f"(owned by uid 0, mode 0600): Read-only file system; the state directory must be "
        f"writable by the user tgdaemon runs as (uid 0)"]

    # Only the database read-only: the daemon runs, says so once, and is not ready.
    daemon = await _run_read_only(str(state_dir / DB_NAME), "run", "--config",
                                  str(config.path), env=env)
    processes.append(daemon)
    await notify.wait("READY", "1")
    await daemon.wait_log(r"ERROR.*refuses writes")
    status, _ = await _get(port, "/readyz")
    assert status == 503
    await wait_for_condition(lambda: states_are(port, {"alice": "connected"}), 15, "connected")
    await daemon.wait_log(r"session writer|write of \d+ account", timeout=15)  # writes tried
    errors = [line for line in daemon.lines if " ERROR " in line or line.startswith("ERROR")]
    assert len(errors) == 1, "\n".join(errors)


def _can_drop_caps() -> bool:
    if shutil.which("setpriv") is None:
        return False
    probe = subprocess.run(["setpriv", "--bounding-set=-all", "--inh-caps=-all", "true"],
                           capture_output=True, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_drop_caps(), reason="needs setpriv to drop capabilities")
async def test_lock_file_owned_by_another_user_is_one_line(
        make_config, login_account, localdc, notify, processes, state_dir):
    import os

    config = make_config(accounts("alice"))
    await login_account(config, "alice")  # creates the lock file
    os.chown(state_dir / LOCK_NAME, 65534, 65534)  # e.g. left by another user's CLI run
    # Without CAP_DAC_OVERRIDE, root is an ordinary user that does not own the lock file.
    proc = await asyncio.create_subprocess_exec(
        "setpriv", "--bounding-set=-all", "--inh-caps=-all", sys.executable, "-m", "tgdaemon",
        "run", "--config", str(config.path), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=daemon_env())
    daemon = DaemonProcess(proc)
    processes.append(daemon)
    assert await daemon.wait_exit(20) == 78, daemon.log
    errors = [line for line in daemon.lines if "error" in line.lower()]
    assert errors == [
        f"tgdaemon: error: cannot open the lock file {state_dir / LOCK_NAME} (owned by uid "
        "65534, mode 0600): Permission denied; the state directory must be writable by the "
        "user tgdaemon runs as (uid 0)"], daemon.log
    assert "Traceback" not in daemon.log
