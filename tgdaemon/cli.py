"""``tgdaemon`` command line: run the daemon, manage keys, accounts and logins.

Expected failures print one clear line and exit with the error's own code (78 for config and
key problems, see ``tgdaemon.exceptions``); only a bug prints a traceback (exit 70). Codes,
passwords and session strings are read without echo and never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import os
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tgdaemon import __version__
from tgdaemon.exceptions import EXIT_UNEXPECTED, AccountError, StateLockedError, TgdaemonError

if TYPE_CHECKING:
    from tgdaemon.config import Config
    from tgdaemon.store import Store

DEFAULT_CONFIG = "/etc/tgdaemon/tgdaemon.toml"
#: Account states in which the running daemon owns the session: the CLI must not touch it.
_ACTIVE_STATES = {"starting", "connecting", "connected", "reconnecting", "flood_wait"}

Prompt = Callable[[str], str]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["localdc"]:
        from tgdaemon.localdc.cli import main as localdc_main

        return localdc_main(args[1:])
    parser = _parser()
    ns = parser.parse_args(args)
    if not getattr(ns, "func", None):
        parser.print_help()
        return 2
    from tgdaemon.logs import setup_logging

    setup_logging(getattr(ns, "log_level", None) or "warning")
    try:
        return int(ns.func(ns) or 0)
    except TgdaemonError as exc:
        print(f"tgdaemon: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("tgdaemon: interrupted", file=sys.stderr)
        return 130
    except Exception:
        import traceback

        traceback.print_exc()
        return EXIT_UNEXPECTED


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tgdaemon", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"tgdaemon {__version__}")
    sub = p.add_subparsers(metavar="COMMAND")

    def command(name: str, func: Callable[[argparse.Namespace], int], help_: str,
                config: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        if config:
            sp.add_argument("--config", "-c", type=Path,
                            default=Path(os.environ.get("TGDAEMON_CONFIG", DEFAULT_CONFIG)),
                            help=f"config file (default: $TGDAEMON_CONFIG or {DEFAULT_CONFIG})")
        sp.set_defaults(func=func)
        return sp

    command("run", cmd_run, "run the daemon in the foreground (systemd's ExecStart)")
    command("check-config", cmd_check_config, "validate the config file and exit")
    sp = command("keygen", cmd_keygen, "write a new master key file (mode 0600)", config=False)
    sp.add_argument("path", type=Path, help="where to write the key file")
    sp.add_argument("--force", action="store_true", help="overwrite an existing file")
    sp = command("accounts", cmd_accounts,
                 "list accounts: name, user, status, last used, last error; in a fleet also "
                 "add|remove|enable|disable NAME...")
    sp.add_argument("action", nargs="?", choices=("add", "remove", "enable", "disable"),
                    help="edit the fleet's accounts (daemon.instance_id set)")
    sp.add_argument("names", nargs="*", metavar="NAME")
    sp = command("cluster", cmd_cluster, "the fleet: `cluster status` lists its instances")
    sp.add_argument("what", choices=("status",))
    sp = command("import", cmd_import,
                 "import a Telethon session (StringSession on stdin, or --file x.session)")
    sp.add_argument("name")
    sp.add_argument("--file", type=Path, help="a Telethon .session SQLite file")
    sp.add_argument("--force", action="store_true", help="replace an existing session")
    sp = command("login", cmd_login, "log an account in interactively (phone, code, 2FA)")
    sp.add_argument("name")
    sp = command("logout", cmd_logout, "log out on the server, then delete the local session")
    sp.add_argument("name")
    sp = command("rotate-key", cmd_rotate_key,
                 "re-encrypt every record under a new active key (daemon must be stopped)")
    sp.add_argument("--out", type=Path,
                    help="write the new key ring here (required when the key is not a file)")
    command("status", cmd_status, "show the running daemon's account status")
    sub.add_parser("localdc", help="run the local stand-in data centre (see localdc --help)")
    return p


# -- commands -------------------------------------------------------------------------------


def _load(ns: argparse.Namespace) -> Config:
    from tgdaemon.config import load_config

    return load_config(ns.config)


def cmd_run(ns: argparse.Namespace) -> int:
    from tgdaemon.daemon import raise_open_file_limit, serve
    from tgdaemon.logs import setup_logging

    config = _load(ns)
    setup_logging(config.daemon.log_level, config.daemon.log_format)
    raise_open_file_limit()
    return asyncio.run(serve(config))


def cmd_check_config(ns: argparse.Namespace) -> int:
    from tgdaemon.config import config_warnings

    config = _load(ns)
    enabled = sum(a.enabled for a in config.accounts)
    for warning in config_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{config.path}: ok ({len(config.accounts)} accounts, {enabled} enabled)")
    return 0


def cmd_keygen(ns: argparse.Namespace) -> int:
    from tgdaemon.crypto import generate_keyring, write_key_file

    ring = generate_keyring()
    write_key_file(ns.path, ring, overwrite=ns.force)
    print(f"wrote key {ring.active.key_id} to {ns.path} (mode 0600)")
    return 0


def cmd_accounts(ns: argparse.Namespace) -> int:
    config = _load(ns)
    if ns.action or config.daemon.clustered:
        from tgdaemon import cluster_cli

        if ns.action:
            print(asyncio.run(cluster_cli.edit_accounts(config, ns.action, ns.names)))
        else:
            print(_table(["NAME", "ENABLED", "OWNER", "LEASE LEFT", "EPOCH"],
                         asyncio.run(cluster_cli.fleet_accounts(config))))
        return 0

    async def run() -> list[list[str]]:
        store, _running = await _open_store(config)
        async with store:
            records = {r.name: r for r in await store.list_accounts()}
        rows = []
        for account in config.accounts:
            r = records.get(account.name)
            user = "-" if r is None or r.user_id is None else (
                f"{r.user_id}" + (f" @{r.username}" if r.username else ""))
            status = "disabled" if not account.enabled else (r.status if r else "no session")
            rows.append([account.name, user, status, _ago(r.last_used if r else None),
                         (r.last_error_category or "-") if r else "-"])
        return rows

    print(_table(["NAME", "USER", "STATUS", "LAST USED", "LAST ERROR"], asyncio.run(run())))
    return 0


def cmd_cluster(ns: argparse.Namespace) -> int:
    from tgdaemon import cluster_cli

    print(asyncio.run(cluster_cli.cluster_status(_load(ns))))
    return 0


def cmd_import(ns: argparse.Namespace) -> int:
    from tgdaemon.session_import import parse_string_session, read_sqlite_session

    config = _load(ns)
    config.account(ns.name)
    if ns.file is not None:
        data = read_sqlite_session(ns.file)
    else:
        if sys.stdin.isatty():
            text = getpass.getpass("StringSession (input hidden): ")
        else:
            text = sys.stdin.read()
        data = parse_string_session(text.strip())

    async def run() -> None:
        store, running = await _open_store(config)
        async with store:
            await _check_not_active(store, ns.name, running)
            existing = await store.load_session(ns.name)
            if existing is not None and existing.auth_key is not None and not ns.force:
                raise AccountError(f"account {ns.name!r} already has a session; use --force")
            await store.ensure_account(ns.name, _device(config, ns.name))
            await store.save_session(ns.name, data)
            await store.update_account(ns.name, status="imported", dc_id=data.dc_id,
                                       user_id=data.user_id)

    asyncio.run(run())
    print(f"imported session for {ns.name} (DC {data.dc_id}); "
          "reload the daemon to use it: systemctl reload tgdaemon")
    return 0


def cmd_login(ns: argparse.Namespace) -> int:
    config = _load(ns)
    me = asyncio.run(login(config, ns.name, prompt=_prompt, secret=_secret))
    print(f"logged in {ns.name} as user {me}; reload the daemon: systemctl reload tgdaemon")
    return 0


def cmd_logout(ns: argparse.Namespace) -> int:
    config = _load(ns)
    asyncio.run(logout(config, ns.name))
    print(f"logged out {ns.name}; local session deleted")
    return 0


def cmd_rotate_key(ns: argparse.Namespace) -> int:
    from tgdaemon.crypto import load_keyring, write_key_file
    from tgdaemon.store import Store

    config = _load(ns)
    ring = load_keyring(key_file=config.daemon.master_key_file)
    new = ring.with_new_active()
    target = ns.out or config.daemon.master_key_file
    if target is None or (ns.out is None and os.environ.get("CREDENTIALS_DIRECTORY")):
        raise AccountError("the key does not come from a key file: pass --out PATH for the new "
                           "key ring, then install it (e.g. with systemd-creds encrypt)")
    async def run() -> int:
        # Open (and lock) the store first: with a daemon running, fail before touching keys.
        async with await Store.open(config.daemon.state_dir, new) as store:
            # The new ring is durable before any record uses it: a crash leaves every record
            # readable (the new ring keeps the old keys).
            write_key_file(target, new, overwrite=True)
            return await store.rotate(new)

    count = asyncio.run(run())
    old = ", ".join(k for k in new.key_ids if k != new.active.key_id)
    print(f"re-encrypted {count} records under key {new.active.key_id}; wrote {target}; "
          f"older keys kept in the ring: {old}")
    return 0


def cmd_status(ns: argparse.Namespace) -> int:
    config = _load(ns)
    listen = config.daemon.http_listen
    if listen is None:
        raise AccountError("daemon.http_listen is disabled: no status endpoint to ask")
    host = f"[{listen.host}]" if ":" in listen.host else listen.host
    request = urllib.request.Request(f"http://{host}:{listen.port}/status")
    if config.daemon.http_token_file is not None:
        token = config.daemon.http_token_file.read_text().strip()
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body = json.load(response)
    except OSError as exc:
        raise AccountError(f"daemon not reachable at {host}:{listen.port}: {exc}") from None
    accounts = body["accounts"] if isinstance(body, dict) else body
    rows = [[a["account"], a["state"],
             "-" if not a.get("user") else str(a["user"]["id"]),
             str(a.get("dc") or "-"),
             "-" if a.get("latency") is None else f"{a['latency'] * 1000:.0f} ms",
             (a.get("lastError") or {}).get("category") or "-"] for a in accounts]
    print(_table(["NAME", "STATE", "USER", "DC", "LATENCY", "LAST ERROR"], rows))
    return 0


# -- login / logout (importable for tests and tooling) ----------------------------------------


async def login(config: Config, name: str, *, prompt: Prompt, secret: Prompt) -> int:
    """Interactive login through whatever servers the config names; returns the user id."""
    from telethon.errors import (
        PasswordHashInvalidError,
        PhoneCodeExpiredError,
        PhoneCodeInvalidError,
        SessionPasswordNeededError,
    )

    account = config.account(name)
    store, running = await _open_store(config)
    async with store:
        await _check_not_active(store, name, running)
        await store.ensure_account(name, _device(config, name))
        async with _session_client(config, store, name, fresh=True) as (client, session):
            phone = account.phone or prompt("Phone number (international format): ").strip()
            await client.send_code_request(phone)
            for attempt in range(3):
                code = secret("Login code (input hidden): ").strip()
                try:
                    await client.sign_in(phone, code)
                    break
                except SessionPasswordNeededError:
                    for _ in range(3):
                        try:
                            await client.sign_in(password=secret("2FA password (hidden): "))
                            break
                        except PasswordHashInvalidError:
                            print("wrong password, try again", file=sys.stderr)
                    else:
                        raise AccountError("2FA password rejected three times") from None
                    break
                except (PhoneCodeInvalidError, PhoneCodeExpiredError) as exc:
                    print(f"code rejected ({type(exc).__name__}), try again", file=sys.stderr)
                    if attempt == 2:
                        raise AccountError("login code rejected three times") from None
            me = await client.get_me()
            if me is None:
                raise AccountError(f"login of {name!r} did not complete")
            await session.flush()
            await store.update_account(name, user_id=me.id, username=me.username,
                                       first_name=me.first_name, status="logged_in",
                                       dc_id=session.dc_id, last_used=time.time(),
                                       last_error_category=None)
            return int(me.id)


async def logout(config: Config, name: str) -> None:
    config.account(name)
    store, running = await _open_store(config)
    async with store:
        await _check_not_active(store, name, running)
        if await store.load_session(name) is None:
            raise AccountError(f"account {name!r} has no session")
        async with _session_client(config, store, name, fresh=False) as (client, _session):
            await client.log_out()
        await store.delete_session(name)
        await store.update_account(name, status="logged_out")


@contextlib.asynccontextmanager
async def _session_client(
    config: Config, store: Store, name: str, *, fresh: bool
) -> AsyncIterator[tuple[Any, Any]]:
    """A connected client on the account's stored session (or a fresh one for login)."""
    from tgdaemon.session import StoreSession
    from tgdaemon.telegram import build_client, client_class, trust_server_keys

    trust_server_keys(config)
    data = None if fresh else await store.load_session(name)
    session = StoreSession(store, name, data or _initial_session(config))
    client = build_client(client_class(), session, config, config.account(name))
    await asyncio.wait_for(client.connect(), config.policy.connect_timeout)
    try:
        await session.flush()  # a fresh auth key is durable before the login binds it
        yield client, session
    finally:
        await client.disconnect()
        await session.flush()


def _initial_session(config: Config) -> Any:
    """Where a brand-new login starts: the lowest configured DC, else Telethon's default."""
    from tgdaemon.store import SessionData

    servers = config.telegram.servers
    if not servers:
        return None
    dc_id = min(servers)
    first = servers[dc_id][0]
    return SessionData(dc_id=dc_id, server_address=first.host, port=first.port, auth_key=None)


async def _open_store(config: Config) -> tuple[Store, bool]:
    """Open the store; returns it and whether a running daemon holds the single-instance lock
    (the CLI may then work only on accounts that daemon is not using)."""
    from tgdaemon.crypto import load_keyring
    from tgdaemon.store import Store

    ring = load_keyring(key_file=config.daemon.master_key_file)
    if config.daemon.clustered:  # fleet daemons lock their instance id only: assume running
        return await Store.open(config.daemon.state_dir, ring, lock=False), True
    try:
        return await Store.open(config.daemon.state_dir, ring), False
    except StateLockedError:
        return await Store.open(config.daemon.state_dir, ring, lock=False), True


async def _check_not_active(store: Store, name: str, daemon_running: bool) -> None:
    if daemon_running:
        record = await store.get_account(name)
        if record is not None and record.status in _ACTIVE_STATES:
            raise AccountError(
                f"account {name!r} is {record.status} in the running daemon; "
                "disable it in the config and reload first")


def _device(config: Config, name: str) -> Any:
    from tgdaemon.store import DeviceInfo

    a = config.account(name)
    return DeviceInfo(a.device_model, a.system_version, a.app_version)


def _prompt(text: str) -> str:
    return input(text)


def _secret(text: str) -> str:
    if sys.stdin.isatty():
        return getpass.getpass(text)
    print(text, end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().rstrip("\n")


def _ago(ts: float | None) -> str:
    if ts is None:
        return "never"
    seconds = max(0, int(time.time() - ts))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)).rstrip()
             for r in [header, *rows]]
    return "\n".join(lines)
