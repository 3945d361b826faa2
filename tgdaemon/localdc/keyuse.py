"""Which live connections present each auth key, with which MTProto session id.

Telegram answers ``AUTH_KEY_DUPLICATED`` (406) when one auth key is used at the same time by
two connections with different session ids (two clients on one session file) and invalidates
that key: both clients must log in again. The server asks this registry on every new session
id; pure bookkeeping (no I/O), so the rule is tested without sockets and other rules about
concurrent use of a key (e.g. counting overlapping connections) extend it in one place.

Overlaps, the measure of "never two owners" for fleets of daemons: when a key gets a
connection while another is still open, the client processes of both are compared
(``process_of``, e.g. the loopback socket's owner, see tgdaemon/localdc/overlaps.py).  One
process reconnecting is not an overlap; two processes are, and so is a client whose process
cannot be found any more next to one that can.  The lookup is done only in that rare case.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable


class KeyUse:
    """Live connections per auth key (``attach``/``detach``) and their session ids."""

    def __init__(self, process_of: Callable[[Hashable], int | None] | None = None) -> None:
        self._sessions: dict[int, dict[Hashable, int | None]] = {}
        self._peak: Counter[int] = Counter()
        self._process_of = process_of
        self._processes: dict[Hashable, int | None] = {}
        #: Per key: connections that opened while one from another process was open.
        self.overlaps: Counter[int] = Counter()
        #: Keys invalidated for concurrent use: every request under them gets the 406.
        self.duplicated: set[int] = set()

    def attach(self, conn: Hashable, key_id: int) -> None:
        conns = self._sessions.setdefault(key_id, {})
        if conn in conns:
            return
        others = list(conns)
        conns[conn] = None
        self._peak[key_id] = max(self._peak[key_id], len(conns))
        if others and self._process_of is not None:
            mine = self._process(conn)
            if any(self._process(o) != mine for o in others):
                self.overlaps[key_id] += 1

    def _process(self, conn: Hashable) -> int | None:
        if conn not in self._processes:
            assert self._process_of is not None
            self._processes[conn] = self._process_of(conn)
        return self._processes[conn]

    def detach(self, conn: Hashable, key_id: int | None) -> None:
        self._processes.pop(conn, None)
        if key_id is None:
            return
        conns = self._sessions.get(key_id)
        if conns is not None:
            conns.pop(conn, None)
            if not conns:
                del self._sessions[key_id]

    def session(self, conn: Hashable, key_id: int, session_id: int) -> bool:
        """Record ``conn``'s (new) session id; True when the key is now duplicated: another
        live connection uses it with a different session id."""
        self.attach(conn, key_id)
        conns = self._sessions[key_id]
        conns[conn] = session_id
        if any(other is not conn and sid is not None and sid != session_id
               for other, sid in conns.items()):
            self.duplicated.add(key_id)
        return key_id in self.duplicated

    def live(self, key_id: int) -> int:
        """Connections presenting ``key_id`` now."""
        return len(self._sessions.get(key_id, ()))

    def peak(self, key_id: int) -> int:
        """Most connections that presented ``key_id`` at the same time."""
        return self._peak[key_id]

    def live_counts(self) -> dict[int, int]:
        """Open connections per auth key id (keys with at least one)."""
        return {k: len(v) for k, v in self._sessions.items()}

    def live_snapshot(self) -> dict[str, int]:
        """Open connections per auth key id (hex, the key's public id), keys with at least one."""
        return {_hex(k): len(v) for k, v in sorted(self._sessions.items())}

    def overlap_snapshot(self) -> dict[str, int]:
        """Overlaps per auth key id (hex, the key's public id), only keys that had one."""
        return {_hex(k): n for k, n in sorted(self.overlaps.items())}


def _hex(key_id: int) -> str:
    """An auth key id as the control API names it (64-bit, hex)."""
    return f"{key_id & 0xFFFF_FFFF_FFFF_FFFF:016x}"
