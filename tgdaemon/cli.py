"""``tgdaemon`` command line: run the daemon, manage keys, accounts and logins.

Expected failures print one clear line and exit with the error's own code (78 for config and
key problems, see ``tgdaemon.exceptions``); only a bug prints a traceback (exit 70). Codes,
passwords and session strings are read without echo and never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
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
from tgdaemon.exceptions import (
    EXIT_UNEXPECTED,
    AccountError,
    BadInputError,
    DecryptionError,
    InputError,
    StateLockedError,
    TgdaemonError,
)
from tgdaemon.lifecycle import OWNED_STATES, Setup

if TYPE_CHECKING:
    from tgdaemon.config import Config
    from tgdaemon.crypto import KeyRing
    from tgdaemon.leasestore import LeaseStore
    from tgdaemon.records import RecordReport
    from tgdaemon.store import Store

DEFAULT_CONFIG = "/etc/tgdaemon/tgdaemon.toml"

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
    sp = command("cluster", cmd_cluster,
                 "the fleet: `cluster status` lists its instances, `cluster forget INSTANCE` "
                 "removes a dead one (its accounts free at once)")
    sp.add_argument("what", choices=("status", "forget"))
    sp.add_argument("instance", nargs="?", help="forget: the instance id")
    sp.add_argument("--force", action="store_true",
                    help="forget: even if it renewed within lease_ttl (you know it is dead)")
    sp = command("import", cmd_import,
                 "import a Telethon session (StringSession on stdin, or --file x.session)")
    sp.add_argument("name")
    sp.add_argument("--file", type=Path, help="a Telethon .session SQLite file")
    sp.add_argument("--force", action="store_true", help="replace an existing session")
    sp = command("login", cmd_login, "log an account in interactively (phone, code, 2FA)")
    sp.add_argument("name")
    sp.add_argument("--force", action="store_true",
                    help="replace a stored session this key ring cannot decrypt")
    sp = command("logout", cmd_logout, "log out on the server, then delete the local session")
    sp.add_argument("name")
    sp.add_argument("--force", action="store_true",
                    help="delete the local session even when the server did not confirm the "
                         "logout (the login may stay active on the server)")
    sp = command("rotate-key", cmd_rotate_key,
                 "re-encrypt every record under a new active key (a running daemon does it "
                 "after a reload)")
    sp.add_argument("--out", type=Path,
                    help="write the new key ring here (required when the key is not a file)")
    sp = command("prune-keys", cmd_prune_keys,
                 "drop keys no stored record uses, after checking every record decrypts")
    sp.add_argument("--out", type=Path,
                    help="write the pruned key ring here (required when the key is not a file)")
    sp = command("rotate-session", cmd_rotate_session,
                 "give an account a new auth key without a login code (the old key is then "
                 "logged out)")
    sp.add_argument("name")
    command("status", cmd_status, "show the running daemon's account status")
    sp = command("send", cmd_send, "send a text message through the daemon's account API")
    sp.add_argument("account")
    sp.add_argument("peer", help="user id, @username, +phone or me")
    sp.add_argument("text")
    sp = command("sessions", cmd_sessions,
                 "list an account's sessions through the running daemon, or terminate them")
    sp.add_argument("account")
    which = sp.add_mutually_exclusive_group()
    which.add_argument("--terminate", metavar="HASH", help="log this session out")
    which.add_argument("--all-others", action="store_true",
                       help="log out every session but the daemon's")
    sp = command("tail", cmd_tail, "print an account's (or every account's) live updates")
    sp.add_argument("account", nargs="?")
    sub.add_parser("localdc", help="run the local stand-in data centre (see localdc --help)")
    return p


# -- commands -------------------------------------------------------------------------------


def cmd_send(ns: argparse.Namespace) -> int:
    from tgdaemon.apicli import send

    print(asyncio.run(send(_load(ns), ns.account, ns.peer, ns.text)))
    return 0


def cmd_sessions(ns: argparse.Namespace) -> int:
    from tgdaemon.apicli import sessions, terminate

    config = _load(ns)
    if ns.terminate or ns.all_others:
        asyncio.run(terminate(config, ns.account, None if ns.all_others else ns.terminate))
        print("terminated" + (" every other session" if ns.all_others else f" {ns.terminate}"))
        return 0
    rows = [["*" if s["current"] else "", s["hash"], s["device"], s["app"], s["country"],
             _ago(s["created"])] + ([s["ip"]] if "ip" in s else [])
            for s in asyncio.run(sessions(config, ns.account))]
    header = ["", "HASH", "DEVICE", "APP", "COUNTRY", "CREATED"]
    if any(len(r) > len(header) for r in rows):
        header.append("IP")
    print(_table(header, rows))
    print("* = the daemon's own session")
    return 0


def cmd_tail(ns: argparse.Namespace) -> int:
    from tgdaemon.apicli import tail

    asyncio.run(tail(_load(ns), ns.account))
    return 0


def _load(ns: argparse.Namespace) -> Config:
    from tgdaemon.config import load_config

    return load_config(ns.config)


def cmd_run(ns: argparse.Namespace) -> int:
    # The config first: a mistake in it is reported before the daemon's imports (Telethon,
    # aiohttp: about a second of CPU), which only a valid config needs.
    config = _load(ns)
    from tgdaemon.daemon import serve
    from tgdaemon.eventloop import run
    from tgdaemon.fdlimit import budget, ensure_open_file_limit
    from tgdaemon.httpsite import HttpLimits
    from tgdaemon.logs import setup_logging

    setup_logging(config.daemon.log_level, config.daemon.log_format)
    ensure_open_file_limit(budget(config, HttpLimits().max_connections))
    return run(serve(config))


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

    async def run() -> tuple[list[list[str]], RecordReport]:
        store, _running, report = await _open_store(config)
        async with store:
            records = {r.name: r for r in await store.list_accounts()}
            stored = set(await store.session_key_ids())
        rows = []
        for account in config.accounts:
            r = records.get(account.name)
            user = "-" if r is None or r.user_id is None else (
                f"{r.user_id}" + (f" @{r.username}" if r.username else ""))
            status = "disabled" if not account.enabled else (r.status if r else "no session")
            session = ("undecryptable" if account.name in report.unreadable
                       else "ok" if account.name in stored else "none")
            rows.append([account.name, user, status, session,
                         _ago(r.last_used if r else None),
                         (r.last_error_category or "-") if r else "-"])
        return rows, report

    rows, report = asyncio.run(run())
    print(_table(["NAME", "USER", "STATUS", "SESSION", "LAST USED", "LAST ERROR"], rows))
    configured = {a.name for a in config.accounts}
    if any(name in configured for name in report.unreadable):
        return DecryptionError.exit_code
    return 0


def cmd_cluster(ns: argparse.Namespace) -> int:
    from tgdaemon import cluster_cli

    config = _load(ns)
    if ns.what == "forget":
        if not ns.instance:
            raise AccountError("cluster forget: name the instance (tgdaemon cluster status "
                               "lists them)")
        print(asyncio.run(cluster_cli.forget_instance(config, ns.instance, force=ns.force)))
        return 0
    if ns.instance or ns.force:
        raise AccountError("cluster status takes no instance and no --force")
    print(asyncio.run(cluster_cli.cluster_status(config)))
    return 0


def cmd_import(ns: argparse.Namespace) -> int:
    from tgdaemon.session_import import import_session, parse_string_session, read_sqlite_session

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
        store, running, _report = await _open_store(config)
        async with store:
            await _check_not_active(store, ns.name, running)
            await import_session(store, ns.name, data, replace=ns.force,
                                 device=_device(config, ns.name))

    asyncio.run(run())
    print(f"imported session for {ns.name} (DC {data.dc_id}); "
          "reload the daemon to use it: systemctl reload tgdaemon")
    return 0


def cmd_login(ns: argparse.Namespace) -> int:
    config = _load(ns)
    me = asyncio.run(login(config, ns.name, prompt=_prompt, secret=_secret, force=ns.force))
    print(f"logged in {ns.name} as user {me}; reload the daemon: systemctl reload tgdaemon")
    return 0


def cmd_logout(ns: argparse.Namespace) -> int:
    config = _load(ns)
    confirmed = asyncio.run(logout(config, ns.name, force=ns.force))
    if confirmed:
        print(f"logged out {ns.name}; local session deleted")
    else:
        print(f"local session of {ns.name} deleted WITHOUT a confirmed server logout (--force): "
              "the login may still be active on Telegram; end it from another device "
              "(Settings > Devices)")
    return 0


def cmd_rotate_session(ns: argparse.Namespace) -> int:
    config = _load(ns)
    user, old_logged_out = asyncio.run(rotate_session(config, ns.name, secret=_secret))
    print(f"{ns.name} (user {user}) has a new auth key; reload the daemon: "
          "systemctl reload tgdaemon")
    if not old_logged_out:
        print("warning: the old key could not be logged out and may still be an active "
              "session: end it from another device (Settings > Devices)", file=sys.stderr)
    return 0


def _key_target(ns: argparse.Namespace, config: Config) -> Path:
    """Where a changed key ring goes: ``--out``, else the configured key file."""
    target: Path | None = ns.out or config.daemon.master_key_file
    if target is None or (ns.out is None and os.environ.get("CREDENTIALS_DIRECTORY")):
        raise AccountError("the key does not come from a key file: pass --out PATH for the new "
                           "key ring, then install it (e.g. with systemd-creds encrypt)")
    return target


@contextlib.asynccontextmanager
async def _key_store(config: Config, ring: KeyRing
                     ) -> AsyncIterator[tuple[Store, bool, RecordReport, LeaseStore | None]]:
    """The store whose records a key command checks, whether a daemon may be running, the
    records' report, and in a fleet the lease store (the records are the fleet's)."""
    if config.daemon.clustered:
        from tgdaemon.cluster_cli import fleet_records

        async with fleet_records(config, ring) as (store, leases, report):
            yield store, True, report, leases
        return
    store, running, report = await _open_store(config)
    async with store:
        yield store, running, report, None


def cmd_rotate_key(ns: argparse.Namespace) -> int:
    from tgdaemon.crypto import write_key_file

    config = _load(ns)
    ring = _keyring(config)
    target = _key_target(ns, config)

    async def run() -> tuple[int | None, KeyRing, bool]:
        # With a daemon running, the store is opened without the lock and the daemon does
        # the re-encryption after its next reload (tgdaemon.keyrotation).
        async with _key_store(config, ring) as (store, running, report, _leases):
            problem = report.problem()
            if problem is not None:
                raise DecryptionError(f"not rotating: {problem}")
            # Records exist but none uses the active key: an earlier run wrote its new ring
            # and stopped before re-encrypting (or, in a fleet, the instances do not all
            # hold it yet). Finish that rotation instead of adding a key per run.
            resume = report.total > 0 and ring.active.key_id not in report.key_use
            new = ring if resume else ring.with_new_active()
            if not resume or ns.out is not None:
                # The new ring is durable before any record uses it: a crash leaves every
                # record readable (the new ring keeps the old keys).
                write_key_file(target, new, overwrite=True)
            if running:
                return None, new, resume
            return await store.rotate(new), new, resume

    count, new, resumed = asyncio.run(run())
    if count is None and config.daemon.clustered:
        print(f"wrote {target} with the new active key {new.active.key_id} (older keys kept); "
              "install this ring on every instance of the fleet and reload each: they write "
              "and re-encrypt under it once every live instance holds it (progress in "
              "`tgdaemon cluster status` and tgdaemon_key_rotation_pending_records)")
        return 0
    if count is None:
        print(f"wrote {target} with the new active key {new.active.key_id}; the running daemon "
              "re-encrypts every session in the background after `systemctl reload tgdaemon` "
              "(progress in `tgdaemon status` and tgdaemon_key_rotation_pending_records). "
              "A key kept as a systemd credential is read at start only: re-encrypt the "
              "credential from this file and restart instead.")
        return 0
    old = ", ".join(k for k in new.key_ids if k != new.active.key_id) or "none"
    what = "finished the interrupted rotation: " if resumed else ""
    print(f"{what}re-encrypted {count} records under key {new.active.key_id}; wrote {target}; "
          f"older keys kept in the ring: {old} (drop unused ones with tgdaemon prune-keys)")
    return 0


def cmd_prune_keys(ns: argparse.Namespace) -> int:
    from tgdaemon.crypto import write_key_file

    config = _load(ns)
    ring = _keyring(config)
    target = _key_target(ns, config)

    async def run() -> tuple[tuple[str, ...], dict[str, str]]:
        async with _key_store(config, ring) as (_store, _running, report, leases):
            problem = report.problem()
            if problem is not None:
                raise DecryptionError(f"not pruning: {problem}")
            in_use: dict[str, str] = {k: f"{n} record(s)" for k, n in report.key_use.items()}
            if leases is not None:
                from tgdaemon.cluster_cli import keys_in_use

                in_use = await keys_in_use(leases, report)
            unused = tuple(k for k in ring.key_ids[1:] if k not in in_use)
            if unused:
                pruned = ring
                for key_id in unused:
                    pruned = pruned.without(key_id)
                write_key_file(target, pruned, overwrite=True)
            return unused, in_use

    unused, in_use = asyncio.run(run())
    kept = "; ".join(f"{k}: {in_use[k]}" for k in ring.key_ids[1:] if k in in_use)
    if not unused:
        print(f"every key in the ring is in use ({', '.join(ring.key_ids)}"
              f"{'; ' + kept if kept else ''}); nothing pruned")
    else:
        print(f"removed key(s) {', '.join(unused)} that no record uses; wrote {target} "
              f"(every one of the {len(ring) - len(unused)} remaining key(s) decrypts its records)")
        if config.daemon.clustered:
            print("install the pruned ring on every instance; a running instance keeps the "
                  "keys it holds until its next restart")
    return 0


def cmd_status(ns: argparse.Namespace) -> int:
    config = _load(ns)
    listen = config.daemon.http_listen
    if listen is None:
        raise AccountError("daemon.http_listen is disabled: no status endpoint to ask")
    host = f"[{listen.host}]" if ":" in listen.host else listen.host
    request = urllib.request.Request(f"http://{host}:{listen.port}/status")
    if config.daemon.http_token is not None:
        request.add_header("Authorization", f"Bearer {config.daemon.http_token}")
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


async def login(config: Config, name: str, *, prompt: Prompt, secret: Prompt,
                force: bool = False) -> int:
    """Interactive login through whatever servers the config names; returns the user id.

    Every request has the policy's timeout and transient failures are retried
    (:mod:`tgdaemon.oneshot`). A stored session this key ring cannot decrypt is never
    replaced without ``force``: it may be the only good copy (a wrong master key)."""
    from telethon import utils
    from telethon.errors import (
        PasswordHashInvalidError,
        PhoneCodeExpiredError,
        PhoneCodeInvalidError,
        SessionPasswordNeededError,
    )

    from tgdaemon.oneshot import call

    account = config.account(name)
    policy = config.policy
    store, running, _report = await _open_store(config)
    async with store:
        await _check_not_active(store, name, running)
        try:
            await store.load_session(name)
        except DecryptionError as exc:
            if not force:
                raise DecryptionError(
                    f"account {name!r} has a stored session this key ring cannot decrypt "
                    f"({exc}); a login would replace it. Check the master key first; pass "
                    "--force to replace it anyway") from None
        await store.ensure_account(name, _device(config, name))
        async with _session_client(config, store, name, fresh=True) as (client, session):
            phone = account.phone or prompt("Phone number (international format): ").strip()
            if not phone:
                raise InputError("no phone number given")
            if utils.parse_phone(phone) is None:
                # The input is not echoed: it may be a phone number with a typo.
                raise BadInputError("that is not a phone number (expected digits in "
                                    "international format, e.g. +44 20 7946 0000)")
            await call("auth.sendCode", lambda: client.send_code_request(phone), policy=policy)
            for attempt in range(3):
                code = secret("Login code (input hidden): ").strip()
                try:
                    await call("auth.signIn", functools.partial(client.sign_in, phone, code),
                               policy=policy, retry=False,
                               expected=(SessionPasswordNeededError, PhoneCodeInvalidError,
                                         PhoneCodeExpiredError))
                    break
                except SessionPasswordNeededError:
                    for _ in range(3):
                        password = secret("2FA password (hidden): ")
                        try:
                            await call("auth.checkPassword",
                                       functools.partial(client.sign_in, password=password),
                                       policy=policy, retry=False,
                                       expected=(PasswordHashInvalidError,))
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
            me = await call("users.getUsers", client.get_me, policy=policy)
            if me is None:
                raise AccountError(f"login of {name!r} did not complete")
            await session.flush()
            await store.update_account(name, user_id=me.id, username=me.username,
                                       first_name=me.first_name, status=Setup.LOGGED_IN.value,
                                       dc_id=session.dc_id, last_used=time.time(),
                                       last_error_category=None)
            return int(me.id)


async def logout(config: Config, name: str, *, force: bool = False) -> bool:
    """Log out on the server, then delete the local session; True when the server confirmed.

    The local session is deleted only after the server confirmed the logout: deleting it
    while the login stays active loses the key to a live login. With ``force`` it is deleted
    anyway (the server could not be reached or refused); returns False then."""
    from telethon import functions

    from tgdaemon.oneshot import call

    config.account(name)
    store, running, _report = await _open_store(config)
    async with store:
        await _check_not_active(store, name, running)
        try:
            data = await store.load_session(name)
        except DecryptionError:
            if not force:
                raise
            data = None  # nothing to log out with: --force deletes the unreadable record
        if data is None and not force:
            raise AccountError(f"account {name!r} has no session")
        confirmed = False
        if data is not None:
            try:
                async with _session_client(config, store, name, fresh=False) as (client, _s):
                    await call("auth.logOut", lambda: client(functions.auth.LogOutRequest()),
                               policy=config.policy)
                    confirmed = True
            except TgdaemonError as exc:
                if not force:
                    raise type(exc)(f"{exc}; the local session was kept (the login is still "
                                    "active); retry later, or pass --force to delete it "
                                    "locally anyway") from None
                print(f"tgdaemon: warning: {exc}", file=sys.stderr)
        await store.delete_session(name)
        await store.update_account(name, status=Setup.LOGGED_OUT.value)
        return confirmed


async def rotate_session(config: Config, name: str, *, secret: Prompt) -> tuple[int, bool]:
    """A new auth key for ``name`` through the login-token flow (:mod:`tgdaemon.rekey`);
    returns the user id and whether the old key was logged out.

    Both clients run on in-memory sessions: the one store write is the new session, made
    durable before the old key is logged out (a crash leaves one working key either way)."""
    from telethon import functions

    from tgdaemon.oneshot import call
    from tgdaemon.rekey import authorize_new_key, memory_session
    from tgdaemon.telegram import build_client, client_class, trust_server_keys

    account = config.account(name)
    policy = config.policy
    store, running, _report = await _open_store(config)
    async with store:
        await _check_not_active(store, name, running)
        data = await store.load_session(name)
        if data is None or data.auth_key is None:
            raise AccountError(f"account {name!r} has no session: run `tgdaemon login {name}`")
        trust_server_keys(config)
        cls = client_class()
        old = build_client(cls, memory_session(data, with_key=True), config, account)
        new = build_client(cls, memory_session(data, with_key=False), config, account)
        bound = functools.partial(call, policy=policy)
        try:
            for client in (old, new):
                await call("connect", client.connect, policy=policy,
                           timeout=policy.connect_timeout, cleanup=client.disconnect)
            user = await authorize_new_key(
                old, new, api_id=config.telegram.api_id, api_hash=config.telegram.api_hash,
                password=lambda: secret("2FA password (hidden): "), call=bound)
            if data.user_id is not None and user.id != data.user_id:
                raise AccountError(f"the new key logged in as another user ({user.id})")
            key = new.session.auth_key.key
            await store.save_session(name, dataclasses.replace(data, auth_key=key,
                                                               user_id=user.id))
            await store.update_account(name, last_used=time.time())
            try:
                await call("auth.logOut", lambda: old(functions.auth.LogOutRequest()),
                           policy=policy)
            except TgdaemonError as exc:
                print(f"tgdaemon: warning: {exc}", file=sys.stderr)
                return int(user.id), False
            return int(user.id), True
        finally:
            for client in (old, new):
                await client.disconnect()


@contextlib.asynccontextmanager
async def _session_client(
    config: Config, store: Store, name: str, *, fresh: bool
) -> AsyncIterator[tuple[Any, Any]]:
    """A connected client on the account's stored session (or a fresh one for login)."""
    from tgdaemon.oneshot import call
    from tgdaemon.session import StoreSession
    from tgdaemon.telegram import build_client, client_class, trust_server_keys

    trust_server_keys(config)
    data = None if fresh else await store.load_session(name)
    session = StoreSession(store, name, data or _initial_session(config))
    client = build_client(client_class(), session, config, config.account(name))

    async def close() -> None:
        await client.disconnect()
        # Telethon keeps the error that ended a connection in a future nobody awaits;
        # retrieve it, or asyncio prints it with a traceback when the process exits.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.disconnected, 1.0)

    try:
        await call("connect", client.connect, policy=config.policy,
                   timeout=config.policy.connect_timeout, cleanup=close)
        await session.flush()  # a fresh auth key is durable before the login binds it
        yield client, session
    finally:
        await close()
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


async def _open_store(config: Config) -> tuple[Store, bool, RecordReport]:
    """Open the store; returns it, whether a running daemon holds the single-instance lock
    (the CLI may then work only on accounts that daemon is not using), and how the stored
    records fare against the key ring (a problem is printed: every command says it)."""
    from tgdaemon.records import check_records
    from tgdaemon.store import Store

    ring = _keyring(config)
    if config.daemon.clustered:  # fleet daemons lock their instance id only: assume running
        store, running = await Store.open(config.daemon.state_dir, ring, lock=False), True
    else:
        try:
            store, running = await Store.open(config.daemon.state_dir, ring), False
        except StateLockedError:
            store, running = await Store.open(config.daemon.state_dir, ring, lock=False), True
    try:
        report = await check_records(store)
    except BaseException:
        await store.close()
        raise
    problem = report.problem()
    if problem is not None:
        print(f"tgdaemon: warning: {problem}", file=sys.stderr)
    return store, running, report


def _keyring(config: Config) -> KeyRing:
    """The master key ring; temporary key files an interrupted write left are removed first
    (each holds a whole ring)."""
    from tgdaemon.crypto import load_keyring, remove_stale_temp_files

    if config.daemon.master_key_file is not None:
        remove_stale_temp_files(config.daemon.master_key_file)
    return load_keyring(key_file=config.daemon.master_key_file)


async def _check_not_active(store: Store, name: str, daemon_running: bool) -> None:
    if daemon_running:
        record = await store.get_account(name)
        # In these states the running daemon owns the session: the CLI must not touch it.
        if record is not None and record.status in OWNED_STATES:
            raise AccountError(
                f"account {name!r} is {record.status} in the running daemon; "
                "disable it in the config and reload first")


def _device(config: Config, name: str) -> Any:
    from tgdaemon.store import DeviceInfo

    a = config.account(name)
    return DeviceInfo(a.device_model, a.system_version, a.app_version)


def _prompt(text: str) -> str:
    try:
        return input(text)
    except EOFError:
        raise InputError(f"end of input at the prompt {text.strip()!r}") from None


def _secret(text: str) -> str:
    if sys.stdin.isatty():
        try:
            return getpass.getpass(text)
        except EOFError:
            raise InputError(f"end of input at the prompt {text.strip()!r}") from None
    print(text, end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    if not line:
        raise InputError(f"end of input at the prompt {text.strip()!r}")
    return line.rstrip("\n")


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
