"""tgdaemon: keeps a fleet of Telegram user accounts connected through Telethon."""

__version__ = "0.1.0"
