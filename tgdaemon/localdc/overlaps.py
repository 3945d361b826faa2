"""The measure of "never two owners": connections of one auth key that overlap in time and
come from different client processes.

A connection is bound to an auth key when its first encrypted message arrives and unbound when
it closes.  When a key gets a connection while another is still open, the client processes of
both are looked up (the loopback socket's owner: its inode in ``/proc/net/tcp``, then the
process holding that inode in ``/proc/*/fd``).  One process reconnecting (a new connection
before the server noticed the old one closing) is not an overlap; two processes are, and also
a client whose process cannot be found any more next to one that can.  The lookup walks
``/proc`` and is done only for that rare case, never per connection.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections import Counter
from pathlib import Path
from typing import Any

PROC = Path("/proc")


def _hex_endpoint(host: str, port: int) -> str:
    """``/proc/net/tcp``'s spelling of an IPv4 endpoint (address in host byte order)."""
    packed = socket.inet_aton(host)
    return f"{int.from_bytes(packed, 'little'):08X}:{port:04X}"


def socket_inode(client: tuple[str, int], server: tuple[str, int], proc: Path = PROC
                 ) -> int | None:
    """Inode of the client's end of a loopback IPv4 TCP connection, if it still exists."""
    try:
        local, remote = _hex_endpoint(*client), _hex_endpoint(*server)
    except OSError:
        return None  # not IPv4
    try:
        lines = (proc / "net" / "tcp").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 9 and fields[1] == local and fields[2] == remote:
            return int(fields[9]) or None
    return None


def pid_of_inode(inode: int, proc: Path = PROC) -> int | None:
    """The process holding socket ``inode`` (the first one found)."""
    target = f"socket:[{inode}]"
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) == target:
                        return int(entry.name)
    return None


def peer_pid(writer: Any) -> int | None:
    """The client process of a server-side stream (None: not found, not loopback IPv4)."""
    peer = writer.get_extra_info("peername")
    here = writer.get_extra_info("sockname")
    if not peer or not here or len(peer) != 2:
        return None
    inode = socket_inode((peer[0], peer[1]), (here[0], here[1]))
    return None if inode is None else pid_of_inode(inode)


class OverlapTracker:
    """Counts overlapping connections per auth key id (see the module docstring)."""

    def __init__(self) -> None:
        self._live: dict[int, dict[object, Any]] = {}  # key id -> {conn: writer}
        self._pids: dict[object, int | None] = {}
        self.counts: Counter[int] = Counter()

    def bind(self, conn: object, key_id: int, writer: Any) -> None:
        live = self._live.setdefault(key_id, {})
        others = [c for c in live if c is not conn]
        live[conn] = writer
        if not others:
            return
        mine = self._pid(conn, writer)
        if any(self._pid(o, live[o]) != mine for o in others):
            self.counts[key_id] += 1

    def unbind(self, conn: object, key_id: int | None) -> None:
        self._pids.pop(conn, None)
        if key_id is None:
            return
        live = self._live.get(key_id)
        if live is not None:
            live.pop(conn, None)
            if not live:
                del self._live[key_id]

    def _pid(self, conn: object, writer: Any) -> int | None:
        if conn not in self._pids:
            self._pids[conn] = peer_pid(writer)
        return self._pids[conn]

    def live(self) -> dict[int, int]:
        """Open connections per auth key id (keys with at least one)."""
        return {k: len(v) for k, v in self._live.items()}

    def snapshot(self) -> dict[str, int]:
        """Overlaps per auth key id (hex, as the key's public id), only keys that had one."""
        return {f"{k & 0xFFFF_FFFF_FFFF_FFFF:016x}": n for k, n in sorted(self.counts.items())}
