"""Which client process is at the other end of a loopback connection: the socket's inode in
``/proc/net/tcp``, then the process holding that inode in ``/proc/*/fd``.  Walks ``/proc``, so
it is asked only when one auth key has two connections open at once (tgdaemon/localdc/keyuse.py
counts those overlaps)."""

from __future__ import annotations

import contextlib
import os
import socket
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
