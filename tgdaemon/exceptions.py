"""The daemon's own exceptions: one root, subclasses grouped by how they are handled.

Telegram/Telethon errors are *classified* (see :mod:`tgdaemon.errors`), not wrapped here.
Messages never carry secrets: they name the account, the file or the key, never values.
"""

from __future__ import annotations


class TgdaemonError(Exception):
    """Root of every error the daemon raises on purpose."""

    #: Process exit code when this error ends a command.
    exit_code = 1


class ConfigError(TgdaemonError):
    """The configuration file is missing, unparsable or invalid: the operator must fix it."""

    exit_code = 78  # EX_CONFIG (sysexits.h); systemd shows it as "config"


class KeyMaterialError(TgdaemonError):
    """The master key is missing, malformed or insecurely stored."""

    exit_code = 78


class DecryptionError(TgdaemonError):
    """A stored record cannot be decrypted: wrong key, tampered or moved record."""

    exit_code = 65  # EX_DATAERR


class StoreError(TgdaemonError):
    """The state database cannot be opened or is not usable."""

    exit_code = 74  # EX_IOERR


class StateAccessError(StoreError):
    """The state directory or database cannot be used as it is (permissions, a read-only
    mount, a truncated database): an operator must act, so systemd must not retry."""

    exit_code = 78


class StateLockedError(StoreError):
    """Another process already uses this state directory."""

    exit_code = 75  # EX_TEMPFAIL


class InstanceLiveError(TgdaemonError):
    """``tgdaemon cluster forget``: the instance may still be running (it renewed within the
    TTL, or holds its lock on this machine); retry once it is LOST, or stop it."""

    exit_code = 75  # EX_TEMPFAIL


class AccountError(TgdaemonError):
    """An operation names an account that does not exist or is in the wrong state."""

    exit_code = 67  # EX_NOUSER


class InputError(TgdaemonError):
    """A prompt got no answer (end of input): nothing was changed."""

    exit_code = 66  # EX_NOINPUT


class BadInputError(TgdaemonError):
    """An answer at a prompt is not usable (e.g. not a phone number): nothing was changed."""

    exit_code = 65  # EX_DATAERR


class TelegramUnavailableError(TgdaemonError):
    """Telegram could not be reached, stalled past the timeout, or failed (5xx), after
    retries: nothing was changed locally; try again later."""

    exit_code = 69  # EX_UNAVAILABLE


class TelegramRefusedError(TgdaemonError):
    """Telegram answered a request with an error (invalid phone, flood wait, ...)."""

    exit_code = 76  # EX_PROTOCOL


# Unexpected failures (bugs) end the process with this code; systemd restarts it.
EXIT_UNEXPECTED = 70  # EX_SOFTWARE
