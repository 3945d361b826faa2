"""Whether the stored session records can be read with the key ring in hand.

Why this exists: a wrong master key (a fresh ``keygen`` over the right file, another host's
credential) fails quietly by itself: every account just looks logged out, and the obvious
fix, ``tgdaemon login``, would overwrite the only good record. The daemon and the CLI run
this check, say loudly what is wrong, and refuse to replace what they cannot read.

The report names accounts and key ids only, never record content.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily, Metric

from tgdaemon.exceptions import DecryptionError

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

    from tgdaemon.store import SessionData, Store

#: Values of the ``state`` label of ``tgdaemon_session_records``.
RECORD_STATES = ("readable", "undecryptable")


@dataclass(frozen=True)
class RecordReport:
    """The stored session records measured against one key ring."""

    ring_key_ids: tuple[str, ...]
    #: key id -> number of records under it (records without a valid header are not counted)
    key_use: Mapping[str, int]
    #: account -> why its record cannot be read (no record content)
    unreadable: Mapping[str, str] = field(default_factory=dict)
    total: int = 0

    @property
    def readable(self) -> int:
        return self.total - len(self.unreadable)

    @property
    def missing_key_ids(self) -> tuple[str, ...]:
        """Key ids that records use but the ring lacks: the wrong master key."""
        return tuple(sorted(k for k in self.key_use if k not in self.ring_key_ids))

    @property
    def unused_key_ids(self) -> tuple[str, ...]:
        """Keys of the ring (other than the active one) that no record uses."""
        return tuple(k for k in self.ring_key_ids[1:] if k not in self.key_use)

    @property
    def none_readable(self) -> bool:
        return self.total > 0 and self.readable == 0

    def problem(self) -> str | None:
        """One line for an operator (None when every record decrypts)."""
        if not self.unreadable:
            return None
        n = len(self.unreadable)
        text = (f"{n} of {self.total} stored session record(s) cannot be decrypted with this "
                f"key ring (keys {', '.join(self.ring_key_ids)}): "
                f"{_names(self.unreadable)}")
        if self.missing_key_ids:
            text += (f"; records use key id(s) {', '.join(self.missing_key_ids)} that the ring "
                     "lacks: wrong master key? Install the right key file (or the ring that "
                     "still holds those keys) and restart; do not log these accounts in again, "
                     "that replaces their sessions")
        else:
            first = sorted(self.unreadable)[0]
            text += f" (first: {self.unreadable[first]})"
        return text


def _names(names: Mapping[str, str], limit: int = 5) -> str:
    shown = sorted(names)[:limit]
    more = len(names) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more else "")


async def check_records(
    store: Store, sessions: Mapping[str, SessionData | DecryptionError] | None = None,
) -> RecordReport:
    """Decrypt every stored record (off the event loop) and count the keys they use;
    ``sessions``: what ``store.load_sessions()`` just returned (the start-up reads them once)."""
    if sessions is None:
        sessions = await store.load_sessions()
    key_ids = await store.session_key_ids()
    use = Counter(k for k in key_ids.values() if k is not None)
    unreadable = {name: str(result) for name, result in sessions.items()
                  if isinstance(result, DecryptionError)}
    return RecordReport(ring_key_ids=store.keyring.key_ids, key_use=dict(use),
                        unreadable=unreadable, total=len(sessions))


class RecordsCollector:
    """``tgdaemon_session_records{state}``: how many stored records decrypt, as last checked
    (at start and on every reload). Alert on ``state="undecryptable"`` above zero."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.report: RecordReport | None = None
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "tgdaemon_session_records",
            "Stored session records by whether the key ring decrypts them",
            labels=["state"])
        report = self.report
        if report is not None:
            family.add_metric(["readable"], report.readable)
            family.add_metric(["undecryptable"], len(report.unreadable))
        yield family
