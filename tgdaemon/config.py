"""Configuration: one TOML file, parsed once into frozen dataclasses.

Validation collects *every* problem and raises them together, one per line, each as
``"<file>: <key path>: <what>"``; operators fix them all in one go. Array items are
**0-based** (``accounts[0]`` is the first ``[[accounts]]`` table). Unknown keys are errors at
every level, so a typo never silently falls back to a default.

Relative paths (``state_dir``, ``master_key_file``, ``http_token_file``, ``api_hash_file``,
``rsa_keys``) are resolved against the directory of the config file. File path values may use
``${CREDENTIALS_DIRECTORY}`` (systemd ``LoadCredential=``). The state directory may be
overridden by ``TGDAEMON_STATE_DIR`` and, above that, by the command line (``load_config``).

Secrets (api_hash, phone numbers, proxy passwords, MTProxy secrets) never appear in reprs or
in error messages.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import ipaddress
import math
import os
import re
import stat
import string
import tomllib
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from tgdaemon.apiconfig import ApiConfig, parse_api
from tgdaemon.exceptions import AccountError, ConfigError
from tgdaemon.leases import (
    default_close_margin,
    heartbeat_room,
    lag_allowance,
    timing_problems,
)
from tgdaemon.lifecycle import HEARTBEAT_JITTER, longest_heartbeat_gap
from tgdaemon.security import OnNewAuthorization

__all__ = [
    "AccountConfig",
    "Address",
    "Config",
    "ConfigDiff",
    "ConfigHolder",
    "ConfigValidationError",
    "DaemonConfig",
    "PolicyConfig",
    "Proxy",
    "RetryLimits",
    "SecurityConfig",
    "TelegramConfig",
    "diff_config",
    "load_config",
    "parse_config",
]

STATE_DIR_ENV = "TGDAEMON_STATE_DIR"
#: Set by systemd/tgdaemon@.service to the unit's instance name (%i); beats daemon.instance_id.
INSTANCE_ENV = "TGDAEMON_INSTANCE"
INSTANCE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
NAME_RE = re.compile(r"[a-z0-9_-]{1,32}")
_DIGITS_ONLY = re.compile(r"[0-9_-]{7,}")
_PLUGIN_RE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*", re.ASCII)
_HOST_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?")
_LANG_RE = re.compile(r"[A-Za-z]{2,8}([-_][A-Za-z0-9]{1,8})?")
_HEX32_RE = re.compile(r"[0-9a-fA-F]{32}")
_TOML_POS_RE = re.compile(r"^(?P<msg>.*) \(at (?P<where>line \d+, column \d+|end of document)\)$")
_FILE_VARS = ("CREDENTIALS_DIRECTORY",)

FileReader = Callable[[Path], bytes]


class ConfigValidationError(ConfigError):
    """One or more problems in the config file; ``problems`` holds one line each."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        super().__init__("\n".join(self.problems))


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Address:
    """A ``host:port`` endpoint; IPv6 hosts are stored without brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Proxy:
    """An outgoing proxy for one account; credentials are kept out of the repr."""

    scheme: str  # "socks5" | "socks4" | "http" | "mtproxy"
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    secret: str | None = field(default=None, repr=False)  # MTProxy secret (hex)

    def telethon_proxy(self) -> dict[str, Any] | tuple[str, int, str]:
        """The ``proxy=`` argument for ``TelegramClient``. socks/http need the ``python-socks``
        package; MTProxy also needs ``connection=ConnectionTcpMTProxyRandomizedIntermediate``."""
        if self.scheme == "mtproxy":
            assert self.secret is not None
            return (self.host, self.port, self.secret)
        return {
            "proxy_type": self.scheme,
            "addr": self.host,
            "port": self.port,
            "username": self.username,
            "password": self.password,
            "rdns": True,
        }


@dataclass(frozen=True)
class DaemonConfig:
    state_dir: Path = Path("/var/lib/tgdaemon")
    master_key_file: Path | None = None
    http_listen: Address | None = Address("127.0.0.1", 9464)  # None: HTTP disabled
    http_token_file: Path | None = None
    # The token read from http_token_file at load time (never in a repr).
    http_token: str | None = field(default=None, repr=False,
                                   metadata={"read_from": "http_token_file"})
    # Host header values the HTTP server answers (DNS rebinding); empty: the listen host,
    # localhost, 127.0.0.1 and ::1. Stored lower-case, IPv6 without brackets.
    http_allowed_hosts: tuple[str, ...] = ()
    log_level: str = "info"
    log_format: str = "text"
    connect_rate: float = 20.0  # 0 = unlimited
    connect_burst: int = 50
    connect_concurrency: int = 100  # connects (handshake + validation) in flight at once
    drain_timeout: float = 10.0
    metrics_histograms: str = "fleet"
    metrics_counters: str = "fleet"
    # -- a fleet shared by several daemons (tgdaemon/fleet.py); "" = a single daemon
    instance_id: str = ""
    capacity: int = 10_000
    database_url: str = field(default="", repr=False)  # "" = SQLite in state_dir
    lease_ttl: float = 60.0
    lease_renew_interval: float = 10.0
    lease_moves_per_minute: int = 120

    @property
    def clustered(self) -> bool:
        """Whether accounts come from leases in a store shared with other daemons."""
        return bool(self.instance_id)


def allowed_hosts(daemon: DaemonConfig) -> tuple[str, ...]:
    """The Host header values the HTTP server answers: the configured list, else the listen
    host and the loopback names."""
    if daemon.http_allowed_hosts:
        return daemon.http_allowed_hosts
    listen = (daemon.http_listen.host.lower(),) if daemon.http_listen is not None else ()
    return tuple(dict.fromkeys(listen + LOCAL_HOSTS))


def is_loopback_host(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class TelegramConfig:
    api_id: int
    api_hash: str = field(repr=False)
    api_hash_file: Path | None = None
    # PKCS#1 PEM files of extra server keys (content checked at load time).
    rsa_keys: tuple[Path, ...] = ()
    use_ipv6: bool = False
    # DC id -> addresses to try in order; empty means Telethon's built-in production DCs.
    servers: Mapping[int, tuple[Address, ...]] = field(
        default_factory=lambda: types.MappingProxyType({})
    )


@dataclass(frozen=True)
class RetryLimits:
    """Maximum consecutive attempts per error category; 0 means unlimited."""

    network: int = 0
    server: int = 0
    flood_wait: int = 0
    unknown: int = 10
    client: int = 1

    def for_category(self, category: str) -> int:
        """Limit for a category value (``"network"``, ...); categories without one: 0."""
        return int(getattr(self, category, 0)) if category in _RETRY_KEYS else 0


@dataclass(frozen=True)
class PolicyConfig:
    heartbeat_interval: float = 30.0
    stale_after: float = 90.0
    connect_timeout: float = 15.0
    request_timeout: float = 15.0
    backoff_base: float = 1.0
    # A network failure younger than this is retried within backoff_base; an older one backs
    # off up to it (tgdaemon.lifecycle.recovery_for).
    backoff_cap: float = 30.0
    backoff_jitter: str = "full"
    # Longest FLOOD_WAIT waited out on an open connection; a longer one closes the connection
    # and reconnects at the deadline (tgdaemon.lifecycle.recovery_for).
    flood_sleep_max: int = 3600
    failover_after: int = 3
    update_gap_heartbeats: int = 2
    retry_limits: RetryLimits = RetryLimits()


@dataclass(frozen=True)
class SecurityConfig:
    """The authorization watch (``tgdaemon.security``)."""

    on_new_authorization: OnNewAuthorization = OnNewAuthorization.ALERT
    # Seconds between two looks at an account's sessions (account.getAuthorizations); the
    # fleet's first looks are spread over one interval. updateNewAuthorization triggers a
    # look at once, whatever this says.
    check_interval: float = 4 * 3600.0
    # Glob patterns (case-insensitive) on a session's device or app: never terminated.
    allow: tuple[str, ...] = ()
    # Whether log lines may carry the IP address of a foreign session (personal data).
    log_ip: bool = False


@dataclass(frozen=True)
class AccountConfig:
    name: str
    phone: str | None = field(default=None, repr=False)
    enabled: bool = True
    device_model: str = "tgdaemon"
    system_version: str = "Linux"
    app_version: str = "0.1.0"
    lang_code: str = "en"
    system_lang_code: str = "en"
    proxy: Proxy | None = None
    plugins: tuple[str, ...] = ()
    # None: [security].on_new_authorization applies.
    on_new_authorization: OnNewAuthorization | None = None


@dataclass(frozen=True)
class Config:
    path: Path
    daemon: DaemonConfig
    telegram: TelegramConfig
    policy: PolicyConfig
    accounts: tuple[AccountConfig, ...]
    security: SecurityConfig = SecurityConfig()
    api: ApiConfig = field(default_factory=ApiConfig)

    def on_new_authorization(self, account: AccountConfig) -> OnNewAuthorization:
        """The account's own setting, else the fleet's."""
        return account.on_new_authorization or self.security.on_new_authorization

    def account(self, name: str) -> AccountConfig:
        try:
            return self._by_name[name]
        except KeyError:
            raise AccountError(f"no account named {name!r} in {self.path}") from None

    @functools.cached_property
    def _by_name(self) -> dict[str, AccountConfig]:
        """O(1) lookups: a reload of 10,000 accounts looks every one of them up."""
        return {a.name: a for a in self.accounts}

    @property
    def enabled_accounts(self) -> tuple[AccountConfig, ...]:
        return tuple(a for a in self.accounts if a.enabled)


_CLUSTER_KEYS = ("instance_id", "capacity", "database_url", "lease_ttl", "lease_renew_interval",
                 "lease_moves_per_minute")
#: The categories with a retry limit: the fields of RetryLimits (a subset of lifecycle.Category).
_RETRY_KEYS = tuple(f.name for f in dataclasses.fields(RetryLimits))
#: Telegram's api_id is an MTProto ``int`` (32-bit signed).
INT32_MAX = 2**31 - 1
#: Host names that are always local, whatever the listen address.
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def config_warnings(config: Config) -> list[str]:
    """Settings that are valid but probably not what the operator wants (logged at start and
    on reload, printed by ``check-config``): they do not stop the daemon."""
    out = []
    d = config.daemon
    if d.http_listen is not None and d.http_token is None and not is_loopback_host(
            d.http_listen.host):
        out.append(
            f"{config.path}: daemon.http_listen ({d.http_listen}) is not a loopback address and "
            "daemon.http_token_file is not set: anyone who can reach it reads /status")
    for key, path in (("daemon.http_token_file", d.http_token_file),
                      ("daemon.master_key_file", d.master_key_file),
                      ("telegram.api_hash_file", config.telegram.api_hash_file)):
        mode = _file_mode(path)
        if mode is not None and mode & 0o077:
            out.append(f"{config.path}: {key}: {path} has mode {mode:04o}; other users can "
                       f"read it: chmod 600 {path}")
    p = config.policy
    slowest = longest_heartbeat_gap(p)
    if p.stale_after < slowest:
        out.append(
            f"{config.path}: policy.stale_after ({p.stale_after:g}) is below the longest gap "
            f"between two answered heartbeats ({HEARTBEAT_JITTER:g} x heartbeat_interval + "
            f"request_timeout = {slowest:g}): the watchdog may restart workers that are only slow")
    d = config.daemon
    if d.clustered:
        # The worker asks the server to drop its connection when no heartbeat comes within
        # the lease's remaining time, and heartbeats early enough to re-arm it with the lag
        # allowance to spare: a room too short for the heartbeat interval costs heartbeats.
        room = heartbeat_room(d.lease_ttl, d.lease_renew_interval)
        allowance = lag_allowance(d.lease_ttl, d.lease_renew_interval)
        longest = room + d.lease_renew_interval - allowance  # armed just after a renewal
        shortest = (2 - HEARTBEAT_JITTER) * p.heartbeat_interval
        if longest < shortest:
            out.append(
                f"{config.path}: daemon.lease_ttl ({d.lease_ttl:g}) leaves {room:g} s between "
                f"renewal and close: to re-arm the server's disconnect with {allowance:.1f} s "
                f"to spare for a busy process, heartbeats come every {longest:.1f} s at most, "
                f"sooner than policy.heartbeat_interval ({p.heartbeat_interval:g} s, at least "
                f"{shortest:g} s with jitter) asks: they cost more than it says; "
                "raise lease_ttl or lower policy.heartbeat_interval")
    return out


def _file_mode(path: Path | None) -> int | None:
    if path is None:
        return None
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None


# --------------------------------------------------------------------------- loading


def load_config(
    path: Path,
    *,
    env: Mapping[str, str] = os.environ,
    state_dir: Path | None = None,
    read_file: FileReader = Path.read_bytes,
) -> Config:
    """Read and validate ``path``. ``state_dir`` (from the CLI) beats ``TGDAEMON_STATE_DIR``,
    which beats the file. Raises :class:`ConfigValidationError` listing every problem."""
    path = Path(path)
    try:
        raw = read_file(path)
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise ConfigValidationError([f"{path}: cannot read: {why}"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigValidationError([f"{path}: not UTF-8 (byte {e.start})"]) from None
    except tomllib.TOMLDecodeError as e:
        m = _TOML_POS_RE.match(str(e))
        where, msg = (m["where"], m["msg"]) if m else ("syntax", str(e))
        raise ConfigValidationError([f"{path}: {where}: TOML syntax error: {msg}"]) from None
    return parse_config(data, path=path, env=env, state_dir=state_dir, read_file=read_file)


def parse_config(
    data: Mapping[str, Any],
    *,
    path: Path,
    env: Mapping[str, str] = os.environ,
    state_dir: Path | None = None,
    read_file: FileReader = Path.read_bytes,
) -> Config:
    """Validate already-parsed TOML. Only reads the files the config names (api_hash_file,
    rsa_keys), through ``read_file``."""
    p = _Parser(Path(path), env, read_file)
    root = p.table(data, "", ("daemon", "telegram", "policy", "security", "accounts", "api"))
    daemon = p.daemon(root.get("daemon", {}), state_dir)
    if "telegram" not in root:
        p.err("telegram", "required section missing")
    telegram = p.telegram(root.get("telegram", {}))
    policy = p.policy(root.get("policy", {}))
    security = p.security(root.get("security", {}))
    accounts = p.accounts(root.get("accounts", []))
    api = parse_api(p, root.get("api", {}))
    if p.problems:
        raise ConfigValidationError(p.problems)
    assert telegram is not None  # no problems => telegram parsed
    return Config(Path(path), daemon, telegram, policy, accounts, security, api)


class _Parser:
    """Accumulates problems while converting plain TOML data into the dataclasses."""

    def __init__(self, path: Path, env: Mapping[str, str], read_file: FileReader) -> None:
        self.path = path
        self.base = path.parent
        self.env = env
        self.read_file = read_file
        self.problems: list[str] = []

    def err(self, key: str, what: str) -> None:
        self.problems.append(f"{self.path}: {key}: {what}")

    # ---- generic helpers

    def table(self, value: Any, key: str, allowed: Iterable[str]) -> dict[str, Any]:
        """Check ``value`` is a table with only ``allowed`` keys; return it (or {})."""
        if not isinstance(value, Mapping):
            self.err(key or "<root>", f"must be a table, not {_tname(value)}")
            return {}
        allowed = tuple(allowed)
        for k in value:
            if k not in allowed:
                hint = difflib.get_close_matches(str(k), allowed, n=1)
                more = f" (did you mean {hint[0]!r}?)" if hint else ""
                self.err(_join(key, k), f"unknown key{more}")
        return dict(value)

    def get(self, tbl: Mapping[str, Any], prefix: str, key: str, kind: type, default: Any) -> Any:
        """Typed lookup: bools are not ints, ints are accepted as floats."""
        if key not in tbl:
            return default
        v = tbl[key]
        ok = (
            isinstance(v, bool)
            if kind is bool
            else (isinstance(v, int | float) and not isinstance(v, bool))
            if kind is float
            else (isinstance(v, int) and not isinstance(v, bool))
            if kind is int
            else isinstance(v, kind)
        )
        if not ok:
            self.err(_join(prefix, key), f"must be {_KIND_NAMES[kind]}, not {_tname(v)}")
            return default
        return float(v) if kind is float else v

    def choice(self, tbl: Mapping[str, Any], prefix: str, key: str, choices: tuple[str, ...],
               default: str) -> str:
        v: str = self.get(tbl, prefix, key, str, default)
        if v.lower() not in choices:
            self.err(_join(prefix, key), f"must be one of {'|'.join(choices)}, not {_short(v)}")
            return default
        return v.lower()

    def number(self, tbl: Mapping[str, Any], prefix: str, key: str, kind: type, default: Any,
               *, minimum: float, exclusive: bool = False) -> Any:
        v = self.get(tbl, prefix, key, kind, default)
        if not math.isfinite(v):
            self.err(_join(prefix, key), f"must be a finite number, not {v}")
            return default
        if exclusive and not v > minimum:
            self.err(_join(prefix, key), f"must be > {minimum:g}, not {v:g}")
            return default
        if v < minimum:
            self.err(_join(prefix, key), f"must be >= {minimum:g}, not {v:g}")
            return default
        return v

    def file_path(self, tbl: Mapping[str, Any], prefix: str, key: str) -> Path | None:
        """Optional path ("" = unset), ${CREDENTIALS_DIRECTORY} expanded, relative to config."""
        v = self.get(tbl, prefix, key, str, "")
        return self.resolve(v, _join(prefix, key)) if v else None

    def resolve(self, value: str, key: str) -> Path | None:
        try:
            expanded = string.Template(value).substitute(
                {k: self.env[k] for k in _FILE_VARS if k in self.env}
            )
        except (KeyError, ValueError) as e:
            what = f"${e.args[0]} is not set" if isinstance(e, KeyError) else "bad $-placeholder"
            self.err(key, f"{what} (only ${{{', '.join(_FILE_VARS)}}} may be used)")
            return None
        p = Path(expanded).expanduser()
        return p if p.is_absolute() else self.base / p

    def read(self, p: Path, key: str) -> bytes | None:
        try:
            return self.read_file(p)
        except OSError as e:
            self.err(key, f"cannot read {p}: {e.strerror or type(e).__name__}")
            return None

    def address(self, value: Any, key: str, *, min_port: int = 1) -> Address | None:
        if not isinstance(value, str):
            self.err(key, f"must be a string \"host:port\", not {_tname(value)}")
            return None
        addr = _parse_address(value, min_port=min_port)
        if addr is None:
            self.err(key, f"must be \"host:port\" or \"[ipv6]:port\" "
                          f"(port {min_port}-65535), not {_short(value)}")
        return addr

    # ---- sections

    def daemon(self, value: Any, override: Path | None) -> DaemonConfig:
        d = DaemonConfig()
        t = self.table(value, "daemon", (
            "state_dir", "master_key_file", "http_listen", "http_token_file", "log_level",
            "log_format", "connect_rate", "connect_burst", "connect_concurrency", "drain_timeout",
            "metrics_histograms", "metrics_counters", "http_allowed_hosts", *_CLUSTER_KEYS,
        ))
        state_dir: Path | None = d.state_dir
        raw_state = self.get(t, "daemon", "state_dir", str, "")
        env_state = self.env.get(STATE_DIR_ENV, "")
        if "state_dir" in t and not raw_state:
            self.err("daemon.state_dir", "must not be empty")
        if override is not None:
            state_dir = Path(override)
        elif env_state:
            state_dir = Path(env_state)
            if not state_dir.is_absolute():
                self.err(STATE_DIR_ENV, "must be an absolute path")
        elif raw_state:
            state_dir = self.resolve(raw_state, "daemon.state_dir")
        listen_raw = self.get(t, "daemon", "http_listen", str, str(d.http_listen))
        # Port 0 binds an ephemeral port (tests, several daemons on one host).
        listen = (self.address(listen_raw, "daemon.http_listen", min_port=0)
                  if listen_raw else None)
        token_file = self.file_path(t, "daemon", "http_token_file")
        return DaemonConfig(
            state_dir=state_dir or d.state_dir,
            master_key_file=self.file_path(t, "daemon", "master_key_file"),
            http_listen=listen,
            http_token_file=token_file,
            http_token=self._token(token_file),
            http_allowed_hosts=self._allowed_hosts(t.get("http_allowed_hosts", [])),
            log_level=self.choice(t, "daemon", "log_level",
                                  ("debug", "info", "warning", "error"), d.log_level),
            log_format=self.choice(t, "daemon", "log_format", ("text", "json"), d.log_format),
            connect_rate=self.number(t, "daemon", "connect_rate", float, d.connect_rate,
                                     minimum=0),
            connect_burst=self.number(t, "daemon", "connect_burst", int, d.connect_burst,
                                      minimum=1),
            connect_concurrency=self.number(t, "daemon", "connect_concurrency", int,
                                            d.connect_concurrency, minimum=1),
            drain_timeout=self.number(t, "daemon", "drain_timeout", float, d.drain_timeout,
                                      minimum=0, exclusive=True),
            metrics_histograms=self.choice(t, "daemon", "metrics_histograms",
                                           ("account", "fleet"), d.metrics_histograms),
            metrics_counters=self.choice(t, "daemon", "metrics_counters", ("account", "fleet"),
                                         d.metrics_counters),
            **self._cluster(t, d),
        )

    def _cluster(self, t: Mapping[str, Any], d: DaemonConfig) -> dict[str, Any]:
        """The fleet keys of ``[daemon]`` (README: Scaling out)."""
        instance = self.env.get(INSTANCE_ENV, "") or self.get(t, "daemon", "instance_id", str, "")
        if instance and not INSTANCE_RE.fullmatch(instance):
            self.err("daemon.instance_id", f"must match {INSTANCE_RE.pattern}")
        url = self.get(t, "daemon", "database_url", str, "")
        if url and not url.startswith(("postgresql://", "postgres://")):
            self.err("daemon.database_url", "must be a postgresql:// URL (or \"\" for SQLite)")
        elif url and not instance:
            self.err("daemon.database_url", f"needs daemon.instance_id (or ${INSTANCE_ENV})")
        ttl = self.number(t, "daemon", "lease_ttl", float, d.lease_ttl, minimum=0,
                          exclusive=True)
        renew = self.number(t, "daemon", "lease_renew_interval", float, d.lease_renew_interval,
                            minimum=0, exclusive=True)
        for problem in timing_problems(ttl, renew, default_close_margin(ttl)):
            self.err("daemon.lease_ttl", problem)
        return {
            "instance_id": instance,
            "capacity": self.number(t, "daemon", "capacity", int, d.capacity, minimum=1),
            "database_url": url,
            "lease_ttl": ttl,
            "lease_renew_interval": renew,
            "lease_moves_per_minute": self.number(t, "daemon", "lease_moves_per_minute", int,
                                                  d.lease_moves_per_minute, minimum=0),
        }

    def _token(self, path: Path | None) -> str | None:
        """A set token file must hold a token: an empty one would silently disable
        authentication."""
        key = "daemon.http_token_file"
        raw = self.read(path, key) if path is not None else None
        if raw is None:
            return None
        try:
            token = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            self.err(key, f"{path} is not UTF-8 text")
            return None
        if not token:
            self.err(key, f"{path} is empty: write a token into it, or remove "
                          "daemon.http_token_file to run without authentication")
            return None
        if not token.isprintable() or any(c.isspace() for c in token):
            # Never echo the value: it is a credential.
            self.err(key, f"{path} must hold one token without spaces or control characters")
            return None
        return token

    def _allowed_hosts(self, value: Any) -> tuple[str, ...]:
        key = "daemon.http_allowed_hosts"
        if not isinstance(value, list):
            self.err(key, f"must be an array of host names or IP addresses, not {_tname(value)}")
            return ()
        out: list[str] = []
        for i, item in enumerate(value):
            host = item.strip().lower().rstrip(".") if isinstance(item, str) else ""
            if host.startswith("[") and host.endswith("]"):
                host = host[1:-1]
            if not host or not (_HOST_RE.fullmatch(host) or _is_ip(host)):
                self.err(f"{key}[{i}]", f"must be a host name or IP address without a port, "
                                        f"not {_short(item)}")
                continue
            out.append(host)
        return tuple(dict.fromkeys(out))

    def telegram(self, value: Any) -> TelegramConfig | None:
        t = self.table(value, "telegram", (
            "api_id", "api_hash", "api_hash_file", "rsa_keys", "use_ipv6", "servers",
        ))
        api_id = self.get(t, "telegram", "api_id", int, None)
        if "api_id" not in t:
            self.err("telegram.api_id", "required")
        elif api_id is not None and not 0 < api_id <= INT32_MAX:
            self.err("telegram.api_id", f"must be a positive 32-bit integer (1-{INT32_MAX})")
        api_hash, hash_file = self._api_hash(t)
        rsa_keys = self._rsa_keys(t.get("rsa_keys", []))
        servers = self._servers(t.get("servers", {}))
        use_ipv6 = self.get(t, "telegram", "use_ipv6", bool, False)
        if api_hash is None:
            return None
        return TelegramConfig(api_id or 0, api_hash, hash_file, rsa_keys, use_ipv6, servers)

    def _api_hash(self, t: Mapping[str, Any]) -> tuple[str | None, Path | None]:
        inline = self.get(t, "telegram", "api_hash", str, "")
        file_raw = self.get(t, "telegram", "api_hash_file", str, "")
        has_file = bool(file_raw)
        hash_file = self.resolve(file_raw, "telegram.api_hash_file") if has_file else None
        if inline and has_file:
            self.err("telegram.api_hash", "set exactly one of api_hash and api_hash_file")
            return None, hash_file
        if not inline and not has_file:
            self.err("telegram.api_hash", "required (or telegram.api_hash_file)")
            return None, None
        key = "telegram.api_hash"
        if has_file:
            key = "telegram.api_hash_file"
            raw = self.read(hash_file, key) if hash_file is not None else None
            if raw is None:
                return None, hash_file
            try:
                inline = raw.decode("ascii").strip()
            except UnicodeDecodeError:
                inline = ""
        if not _HEX32_RE.fullmatch(inline):
            # Never echo the value: it is a credential.
            self.err(key, "must be 32 hexadecimal characters")
            return None, hash_file
        return inline.lower(), hash_file

    def _rsa_keys(self, value: Any) -> tuple[Path, ...]:
        if not isinstance(value, list):
            self.err("telegram.rsa_keys", f"must be an array of paths, not {_tname(value)}")
            return ()
        keys = []
        for i, item in enumerate(value):
            key = f"telegram.rsa_keys[{i}]"
            if not isinstance(item, str) or not item:
                self.err(key, f"must be a non-empty path string, not {_tname(item)}")
                continue
            p = self.resolve(item, key)
            raw = self.read(p, key) if p is not None else None
            if p is None or raw is None:
                continue
            if not _is_pkcs1(raw):
                self.err(key, f"{p} is not a PKCS#1 PEM RSA public key "
                              "(-----BEGIN RSA PUBLIC KEY-----)")
                continue
            keys.append(p)
        return tuple(keys)

    def _servers(self, value: Any) -> Mapping[int, tuple[Address, ...]]:
        if not isinstance(value, Mapping):
            self.err("telegram.servers", f"must be a table, not {_tname(value)}")
            return types.MappingProxyType({})
        out: dict[int, tuple[Address, ...]] = {}
        for dc_key_raw, addrs in value.items():
            dc_key = str(dc_key_raw)
            key = f"telegram.servers.{dc_key}"
            if not (dc_key.isascii() and dc_key.isdigit() and 0 < int(dc_key) < 10_000):
                self.err(key, "keys must be DC ids (integers 1-9999)")
                continue
            if not isinstance(addrs, list) or not addrs:
                self.err(key, "must be a non-empty array of \"host:port\" strings")
                continue
            parsed = [self.address(a, f"{key}[{i}]") for i, a in enumerate(addrs)]
            if all(parsed):
                out[int(dc_key)] = tuple(a for a in parsed if a is not None)
        return types.MappingProxyType(dict(sorted(out.items())))

    def policy(self, value: Any) -> PolicyConfig:
        d = PolicyConfig()
        t = self.table(value, "policy", (
            "heartbeat_interval", "stale_after", "connect_timeout", "request_timeout",
            "backoff_base", "backoff_cap", "backoff_jitter", "flood_sleep_max", "failover_after",
            "update_gap_heartbeats", "retry_limits",
        ))

        def pos(key: str, kind: type = float, minimum: float = 0, exclusive: bool = True) -> Any:
            return self.number(t, "policy", key, kind, getattr(d, key), minimum=minimum,
                               exclusive=exclusive)

        heartbeat = pos("heartbeat_interval")
        stale = pos("stale_after")
        if stale <= heartbeat:
            self.err("policy.stale_after", f"must be > heartbeat_interval ({heartbeat:g})")
        base = pos("backoff_base")
        cap = pos("backoff_cap")
        if cap < base:
            self.err("policy.backoff_cap", f"must be >= backoff_base ({base:g})")
        limits = self.table(t.get("retry_limits", {}), "policy.retry_limits", _RETRY_KEYS)
        dl = RetryLimits()
        return PolicyConfig(
            heartbeat_interval=heartbeat,
            stale_after=stale,
            connect_timeout=pos("connect_timeout"),
            request_timeout=pos("request_timeout"),
            backoff_base=base,
            backoff_cap=cap,
            backoff_jitter=self.choice(t, "policy", "backoff_jitter", ("full", "none"),
                                       d.backoff_jitter),
            flood_sleep_max=pos("flood_sleep_max", int, 0, False),
            failover_after=pos("failover_after", int, 1, False),
            update_gap_heartbeats=pos("update_gap_heartbeats", int, 1, False),
            retry_limits=RetryLimits(**{
                k: self.number(limits, "policy.retry_limits", k, int, getattr(dl, k), minimum=0)
                for k in _RETRY_KEYS
            }),
        )

    def security(self, value: Any) -> SecurityConfig:
        d = SecurityConfig()
        t = self.table(value, "security",
                       ("on_new_authorization", "check_interval", "allow", "log_ip"))
        allow = t.get("allow", [])
        if not isinstance(allow, list) or not all(
            isinstance(x, str) and x.strip() and x.isprintable() for x in allow
        ):
            self.err("security.allow", "must be an array of non-empty glob patterns")
            allow = []
        return SecurityConfig(
            on_new_authorization=self._on_new_authorization(t, "security")
            or d.on_new_authorization,
            # At most one look a minute: a typo must not turn into a request storm.
            check_interval=self.number(t, "security", "check_interval", float,
                                       d.check_interval, minimum=60),
            allow=tuple(allow),
            log_ip=self.get(t, "security", "log_ip", bool, d.log_ip),
        )

    def _on_new_authorization(self, t: Mapping[str, Any], prefix: str
                              ) -> OnNewAuthorization | None:
        if "on_new_authorization" not in t:
            return None
        choices = tuple(a.value for a in OnNewAuthorization)
        return OnNewAuthorization(self.choice(t, prefix, "on_new_authorization", choices,
                                              OnNewAuthorization.ALERT.value))

    def accounts(self, value: Any) -> tuple[AccountConfig, ...]:
        if not isinstance(value, list):
            self.err("accounts", f"must be an array of tables ([[accounts]]), not {_tname(value)}")
            return ()
        out: list[AccountConfig] = []
        seen: dict[str, int] = {}
        for i, item in enumerate(value):
            name = item.get("name") if isinstance(item, Mapping) else None
            if isinstance(name, str) and name in seen:
                self.err(f"accounts[{i}].name",
                         f"duplicate name {name!r} (also accounts[{seen[name]}])")
            elif isinstance(name, str):
                seen[name] = i
            acc = self.account(item, f"accounts[{i}]")
            if acc is not None:
                out.append(acc)
        return tuple(out)

    def account(self, value: Any, prefix: str) -> AccountConfig | None:
        d = AccountConfig(name="")
        n_before = len(self.problems)
        if not isinstance(value, Mapping):
            self.err(prefix, f"must be a table, not {_tname(value)}")
            return None
        t = self.table(value, prefix, (
            "name", "phone", "enabled", "device_model", "system_version", "app_version",
            "lang_code", "system_lang_code", "proxy", "plugins", "on_new_authorization",
        ))
        name = self.get(t, prefix, "name", str, "")
        if "name" not in t:
            self.err(f"{prefix}.name", "required")
        elif not NAME_RE.fullmatch(name):
            self.err(f"{prefix}.name", f"must match {NAME_RE.pattern}")
        elif _DIGITS_ONLY.fullmatch(name):
            # The name is a metric label and a log field: it must not be a phone number.
            self.err(f"{prefix}.name", "must not be all digits (it would look like a phone "
                                       "number in metrics and logs)")
        phone = self._phone(t, prefix)
        texts = {}
        for key in ("device_model", "system_version", "app_version"):
            v = self.get(t, prefix, key, str, getattr(d, key))
            if not v.strip() or len(v) > 64 or not v.isprintable():
                self.err(f"{prefix}.{key}", "must be 1-64 printable characters")
            texts[key] = v
        for key in ("lang_code", "system_lang_code"):
            v = self.get(t, prefix, key, str, getattr(d, key))
            if not _LANG_RE.fullmatch(v):
                self.err(f"{prefix}.{key}", f"must be a language code like \"en\" or \"pt-br\", "
                                            f"not {_short(v)}")
            texts[key] = v.lower()
        proxy_raw = self.get(t, prefix, "proxy", str, "")
        proxy = self._proxy(proxy_raw, f"{prefix}.proxy") if proxy_raw else None
        plugins = self._plugins(t.get("plugins", []), f"{prefix}.plugins")
        enabled = self.get(t, prefix, "enabled", bool, True)
        on_new = self._on_new_authorization(t, prefix)
        if len(self.problems) != n_before:
            return None
        return AccountConfig(name=name, phone=phone, enabled=enabled, proxy=proxy,
                             plugins=plugins, on_new_authorization=on_new, **texts)

    def _phone(self, t: Mapping[str, Any], prefix: str) -> str | None:
        v = self.get(t, prefix, "phone", str, "")
        if not v:
            return None
        digits = re.sub(r"[\s().-]", "", v)
        if not re.fullmatch(r"\+?[0-9]{5,15}", digits):
            # Never echo the value: phone numbers are personal data.
            self.err(f"{prefix}.phone", "must be an international number (+ and 5-15 digits)")
            return None
        return "+" + digits.lstrip("+")

    def _plugins(self, value: Any, key: str) -> tuple[str, ...]:
        if not isinstance(value, list):
            self.err(key, f"must be an array of \"pkg.module:function\" strings, "
                          f"not {_tname(value)}")
            return ()
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, str) or not _PLUGIN_RE.fullmatch(item):
                self.err(f"{key}[{i}]", f"must look like \"pkg.module:function\", "
                                        f"not {_short(item)}")
            elif item in out:
                self.err(f"{key}[{i}]", f"duplicate plugin {item!r}")
            else:
                out.append(item)
        return tuple(out)

    def _proxy(self, value: str, key: str) -> Proxy | None:
        # Error messages below never include the URL: it may carry a password or secret.
        try:
            u = urlsplit(value)
            host, port = u.hostname, u.port
        except ValueError:
            self.err(key, "not a valid proxy URL")
            return None
        scheme = u.scheme.lower()
        if scheme not in ("socks5", "socks4", "http", "mtproxy"):
            self.err(key, "scheme must be socks5://, socks4://, http:// or mtproxy://")
            return None
        if not host or port is None or not 0 < port < 65536 or _parse_address(
            f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        ) is None:
            self.err(key, "must include host and port (scheme://[user:pass@]host:port)")
            return None
        if (u.path not in ("", "/")) or u.query or u.fragment:
            self.err(key, "must not have a path, query or fragment")
            return None
        user = unquote(u.username) if u.username else None
        password = unquote(u.password) if u.password is not None else None
        if scheme == "mtproxy":
            if user and len(user) > 32 and user[:2].lower() == "ee":
                self.err(key, "fake-TLS (ee) MTProxy secrets are not supported (Telethon 1.45 "
                              "has no fake-TLS transport); use the proxy's dd secret")
                return None
            if password is not None or not user or not _is_mtproxy_secret(user):
                self.err(key, "mtproxy needs mtproxy://SECRET@host:port with a hex secret "
                              "(32 hex digits, or dd + 32)")
                return None
            return Proxy(scheme, host, port, secret=user.lower())
        return Proxy(scheme, host, port, username=user, password=password)


# --------------------------------------------------------------------------- diff


@dataclass(frozen=True)
class ConfigDiff:
    """What a reload (SIGHUP) means for the running fleet. Only *enabled* accounts count:
    enabled->disabled (or deleted) is ``removed``, disabled->enabled (or new) is ``added``;
    accounts disabled in both configs appear nowhere. Names are sorted."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    unchanged: tuple[str, ...]
    policy_changed: bool
    telegram_changed: bool


def diff_config(old: Config, new: Config) -> ConfigDiff:
    """Pure comparison; ``telegram_changed`` affects every account, which the caller handles."""
    before = {a.name: a for a in old.accounts if a.enabled}
    after = {a.name: a for a in new.accounts if a.enabled}
    both = before.keys() & after.keys()
    return ConfigDiff(
        added=tuple(sorted(after.keys() - before.keys())),
        removed=tuple(sorted(before.keys() - after.keys())),
        changed=tuple(sorted(n for n in both if before[n] != after[n])),
        unchanged=tuple(sorted(n for n in both if before[n] == after[n])),
        policy_changed=old.policy != new.policy,
        telegram_changed=old.telegram != new.telegram,
    )


class ConfigHolder:
    """The running configuration, in one place: the daemon, the supervisor and every worker
    read ``current`` when they need a setting, so a reload is one assignment."""

    __slots__ = ("current",)

    def __init__(self, config: Config) -> None:
        self.current = config


# --------------------------------------------------------------------------- helpers

_KIND_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def _tname(v: Any) -> str:
    return {
        bool: "a boolean", int: "an integer", float: "a float", str: "a string",
        list: "an array", dict: "a table",
    }.get(type(v), type(v).__name__)


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _parse_address(value: str, *, min_port: int = 1) -> Address | None:
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or not rest.startswith(":"):
            return None
        port_s = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
    else:
        host, sep, port_s = value.rpartition(":")
        if not sep or not _HOST_RE.fullmatch(host):
            return None
    if not (port_s.isascii() and port_s.isdigit()) or not min_port <= int(port_s) < 65536:
        return None
    return Address(host, int(port_s))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_pkcs1(raw: bytes) -> bool:
    """True if Telethon's ``rsa.add_key`` (``rsa.PublicKey.load_pkcs1``) will accept it."""
    import rsa  # Telethon's own dependency; imported lazily, only when keys are configured

    try:
        rsa.PublicKey.load_pkcs1(raw)
    except Exception:  # rsa raises ValueError, pyasn1 errors, ... for bad input
        return False
    return True


def _is_mtproxy_secret(secret: str) -> bool:
    s = secret.lower()
    if not re.fullmatch(r"[0-9a-f]+", s) or len(s) % 2:
        return False
    # 16 bytes (obfuscated) or "dd" + 16 bytes (padded intermediate). Fake-TLS "ee" secrets
    # are refused by the caller with their own message.
    return len(s) == 32 or (s[:2] == "dd" and len(s) == 34)
