"""Benchmarks of tgdaemon against plain Telethon on the local stand-in DC (``make bench``)."""
