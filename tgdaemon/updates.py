"""Catching up on missed updates, and surviving server objects Telethon cannot parse.

Telethon 1.45 resumes from a stored update state only when built with ``catch_up=True``: then
every ``connect()`` loads the state from the session (``get_update_states``: the account's
pts/qts/date/seq and each channel's pts) into its MessageBox and the update loop starts with
``updates.getDifference``, following ``differenceSlice`` until the final ``difference``;
channels announced by ``updateChannelTooLong`` (or whose pts jumps) get
``updates.getChannelDifference``. What it lacks for a daemon, and what this module adds:

* **Reporting**: :class:`CatchUpBox` is Telethon's MessageBox counting what each catch-up
  delivered (one report per finished difference, slices summed) and what a "too long" answer
  skipped: Telegram then hands over only the new state (``differenceTooLong``,
  ``channelDifferenceTooLong``), and the skipped stretch can only be re-read with
  ``messages.getHistory``.
* **Handlers first**: updates are held (queued by Telethon) until the worker has run the
  plugins after a connect, so a plugin's handlers see the catch-up (:class:`UpdateGate`).
* **Unknown constructors**: Telethon logs an unparseable server message with its raw bytes
  (phone numbers, message text) at INFO and drops it. :func:`guard_unknown_objects` drops it
  without that log and reports only the constructor id; the connection stays up, and the
  updates it carried are fetched again by the gap logic (``getDifference``). Inside a
  container only the unknown message is dropped (the answer and updates packed with it are
  handled); inside a gzip_packed one, the same (:class:`tgdaemon.handshake.PaddedKeySender`).
  A difference that itself holds such an object would make Telethon disconnect and retry on
  every reconnect: :func:`step_past_unknown` skips exactly that update instead.

Private Telethon internals read here (1.45): ``client._message_box``,
``MessageBox.getting_diff_for``/``map``, ``client._sender._state.decrypt_message_data``.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from telethon._updates.messagebox import ENTRY_ACCOUNT, LOG_LEVEL_TRACE, MessageBox
from telethon.errors import TypeNotFoundError
from telethon.tl import functions, types
from telethon.tl.core import MessageContainer, TLMessage

from tgdaemon.flag import Flag

if TYPE_CHECKING:
    from tgdaemon.telegram import ManagedClient


@dataclass(frozen=True)
class CatchUp:
    """One finished catch-up: ``recovered`` updates handed to handlers, ``skipped`` updates a
    "too long" answer jumped over. ``channel`` is None for the account's own box."""

    recovered: int
    skipped: int
    channel: int | None = None


def _ignore_catch_up(_report: CatchUp) -> None:
    return None


class CatchUpBox(MessageBox):  # type: ignore[misc]
    """Telethon's MessageBox, reporting every finished difference (see module docstring),
    whose saved state never runs ahead of the handlers.

    Telethon moves the box's pts when it *accepts* a batch of updates, then hands them to the
    handlers one by one; a disconnect in between (a stop, a network fault, a watchdog restart)
    cancels the rest, and the state it saves on the way out already counts them: lost. Here,
    while accepted updates wait for their handlers, :meth:`session_state` (what Telethon saves
    into the session) answers the state from before that batch, so the next catch-up fetches
    the interrupted batch again: at least once, never lost."""

    __slots__ = ("_counts", "_in_difference", "_safe", "_undispatched", "on_catch_up")

    def __init__(self, log: Any) -> None:
        super().__init__(log)
        self.on_catch_up: Callable[[CatchUp], None] = _ignore_catch_up
        #: Entry -> (recovered, skipped) of a difference in progress (slices are summed).
        self._counts: dict[object, tuple[int, int]] = {}
        self._in_difference = False
        #: Updates accepted but not yet through the handlers, and the state from before them.
        self._undispatched = 0
        self._safe: Any = None

    def _trace(self, msg: str, *args: Any, **kwargs: Any) -> None:
        """Telethon's trace formats the box's date before its logger looks at the level, on
        every connect (six times: box built, loaded, difference begun and applied) and every
        batch of updates: here nothing is done unless its level is enabled."""
        if self._log.isEnabledFor(LOG_LEVEL_TRACE):
            super()._trace(msg, *args, **kwargs)

    # -- the saved state follows the handlers -----------------------------------------------

    def load(self, session_state: Any, channel_states: Any) -> None:
        super().load(session_state, channel_states)
        self._undispatched = 0
        self._safe = None

    def session_state(self) -> Any:
        if self._undispatched and self._safe is not None:
            return self._safe
        return super().session_state()

    def _before_handing_out(self) -> Any:
        return None if self._undispatched else super().session_state()

    def _handed_out(self, before: Any, count: int) -> None:
        if count <= 0:
            return
        if not self._undispatched:
            self._safe = before
        self._undispatched += count

    def dispatched(self) -> None:
        """One accepted update went through the handlers (not called when cancelled)."""
        if self._undispatched:
            self._undispatched -= 1
            if not self._undispatched:
                self._safe = None

    def process_updates(self, updates: Any, chat_hashes: Any, result: list[Any]) -> Any:
        if self._in_difference:  # a difference's other_updates: counted with the difference
            return super().process_updates(updates, chat_hashes, result)
        before = self._before_handing_out()
        size = len(result)
        try:
            return super().process_updates(updates, chat_hashes, result)
        finally:
            self._handed_out(before, len(result) - size)

    # -- reporting -------------------------------------------------------------------------

    def _add(self, entry: object, recovered: int, skipped: int) -> None:
        r, s = self._counts.get(entry, (0, 0))
        self._counts[entry] = (r + recovered, s + skipped)

    def _finish(self, entry: object) -> None:
        if entry in self.getting_diff_for:
            return  # more slices to come
        recovered, skipped = self._counts.pop(entry, (0, 0))
        channel = entry if isinstance(entry, int) else None
        self.on_catch_up(CatchUp(recovered, skipped, channel))

    def apply_difference(self, diff: Any, chat_hashes: Any) -> Any:
        before = self.map[ENTRY_ACCOUNT].pts if ENTRY_ACCOUNT in self.map else None
        saved = self._before_handing_out()
        self._in_difference = True
        try:
            result = super().apply_difference(diff, chat_hashes)
        finally:
            self._in_difference = False
        self._handed_out(saved, len(result[0]))
        skipped = 0
        if isinstance(diff, types.updates.DifferenceTooLong) and before is not None:
            skipped = max(0, diff.pts - before)
        self._add(ENTRY_ACCOUNT, _real_updates(result[0]), skipped)
        self._finish(ENTRY_ACCOUNT)
        return result

    def end_difference(self) -> None:
        super().end_difference()  # ended early (server trouble): report what came so far
        self._finish(ENTRY_ACCOUNT)

    def apply_channel_difference(self, request: Any, diff: Any, chat_hashes: Any) -> Any:
        entry = request.channel.channel_id
        state = self.map.get(entry)
        before = state.pts if state is not None else None
        saved = self._before_handing_out()
        self._in_difference = True
        try:
            result = super().apply_channel_difference(request, diff, chat_hashes)
        finally:
            self._in_difference = False
        self._handed_out(saved, len(result[0]))
        skipped = 0
        if isinstance(diff, types.updates.ChannelDifferenceTooLong) and before is not None:
            skipped = max(0, diff.dialog.pts - before)
        self._add(entry, _real_updates(result[0]), skipped)
        self._finish(entry)
        return result

    def end_channel_difference(self, request: Any, reason: Any, chat_hashes: Any) -> None:
        super().end_channel_difference(request, reason, chat_hashes)
        self._finish(request.channel.channel_id)

    def account_pts(self) -> int | None:
        """The account pts processed so far; None before it is known or while a difference is
        being fetched (a catch-up in progress is not a stalled stream)."""
        if ENTRY_ACCOUNT in self.getting_diff_for:
            return None
        entry = self.map.get(ENTRY_ACCOUNT)
        return None if entry is None else int(entry.pts)


def _real_updates(updates: list[Any]) -> int:
    """How many updates a difference handed over. Telethon 1.45 feeds an empty
    ``other_updates`` to its MessageBox as ``Updates(updates=[])``, which comes back as one
    pseudo-update (the container itself): not something the server held for us."""
    return sum(1 for u in updates if not isinstance(u, types.Updates))


class UpdateGate:
    """Holds a client's update processing after each connect until :meth:`release`.

    Telethon starts its update loop (and with it the catch-up) at the end of ``connect()``;
    the worker adds plugin handlers only after connecting and validating. Updates that
    arrive in between wait in Telethon's queue instead of reaching no handler."""

    __slots__ = ("_open",)

    def __init__(self, held: bool) -> None:
        self._open = Flag(not held)  # one per client: no waiter deque until waited on

    def close(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    @property
    def released(self) -> bool:
        return self._open.is_set()

    async def wait(self) -> None:
        await self._open.wait()


async def step_past_unknown(call: Callable[[Any], Awaitable[Any]], request: Any, seq: int,
                            on_unknown: Callable[[int], None]) -> Any:
    """Answer a difference request whose answer held an object this Telethon cannot parse.

    The whole answer is lost (TL cannot be parsed past an unknown constructor), and Telethon
    would disconnect and ask again after every reconnect, forever. So ask for the next update
    alone (``pts_limit``/``limit`` 1): if it parses, hand that on (the client continues from
    there); if it is the unknown one, answer as a difference that moves past its pts and
    holds nothing. Each unknown object costs a few extra calls, once; only it is skipped.
    (Relies on the server honouring ``pts_limit`` for the account box, as localdc does.)"""
    account = isinstance(request, functions.updates.GetDifferenceRequest)
    if account:
        one = functions.updates.GetDifferenceRequest(
            pts=request.pts, date=request.date, qts=request.qts, pts_limit=1,
            pts_total_limit=request.pts_total_limit, qts_limit=request.qts_limit)
    else:
        one = functions.updates.GetChannelDifferenceRequest(
            channel=request.channel, filter=request.filter, pts=request.pts, limit=1,
            force=request.force)
    try:
        return await call(one)
    except TypeNotFoundError as exc:
        on_unknown(int(exc.invalid_constructor_id))
    if account:
        state = types.updates.State(pts=request.pts + 1, qts=request.qts, date=request.date,
                                    seq=seq, unread_count=0)
        return types.updates.DifferenceSlice(new_messages=[], new_encrypted_messages=[],
                                             other_updates=[], chats=[], users=[],
                                             intermediate_state=state)
    return types.updates.ChannelDifference(pts=request.pts + 1, new_messages=[],
                                           other_updates=[], chats=[], users=[], final=False)


DIFFERENCE_REQUESTS = (functions.updates.GetDifferenceRequest,
                       functions.updates.GetChannelDifferenceRequest)


def guard_unknown_objects(client: Any, on_unknown: Callable[[int], None]) -> None:
    """Drop server messages whose constructor this Telethon does not know, reporting only the
    constructor id (Telethon would log the raw remainder, secrets included). The sender keeps
    the connection: a dropped message is one Telethon would have dropped too. The same
    inside a gzip_packed message (:class:`tgdaemon.handshake.PaddedKeySender`)."""
    client._sender.on_unknown_object = on_unknown
    state = client._sender._state
    # Weakly: the wrapper lives on the state, and a strong bound method would make the two a
    # cycle that outlives the client (frozen by tgdaemon.gcpolicy, auth key and all).
    decrypt_of = weakref.WeakMethod(state.decrypt_message_data)

    def decrypt_message_data(body: bytes) -> Any:
        decrypt = decrypt_of()
        assert decrypt is not None  # called through the state: it lives
        try:
            return decrypt(body)
        except TypeNotFoundError as exc:
            skipped: list[int] = []
            try:
                with _containers_skipping_unknown(skipped):
                    message = decrypt(body)  # again: nothing was kept of the first try
            except TypeNotFoundError:
                skipped, message = [int(exc.invalid_constructor_id)], None  # Telethon's "ignore"
            for constructor_id in skipped:
                on_unknown(constructor_id)
            return message

    state.decrypt_message_data = decrypt_message_data


@contextlib.contextmanager
def _containers_skipping_unknown(skipped: list[int]) -> Iterator[None]:
    """While in the block, a ``msg_container`` is parsed message by message, each by its own
    length, and one this Telethon cannot parse is left out (its constructor id appended to
    ``skipped``) instead of failing the whole container: an answer or the updates packed
    with it survive. Telethon's parser (``MessageContainer.from_reader``) is swapped for the
    block only, which is synchronous: no other parse runs meanwhile."""

    def from_reader(cls: Any, reader: Any) -> MessageContainer:
        messages = []
        for _ in range(reader.read_int()):
            msg_id, seq_no, length = reader.read_long(), reader.read_int(), reader.read_int()
            start = reader.tell_position()
            try:
                messages.append(TLMessage(msg_id, seq_no, reader.tgread_object()))
            except TypeNotFoundError as exc:
                skipped.append(int(exc.invalid_constructor_id))
            reader.set_position(start + length)
        return MessageContainer(messages)

    original = MessageContainer.__dict__["from_reader"]
    MessageContainer.from_reader = classmethod(from_reader)
    try:
        yield
    finally:
        MessageContainer.from_reader = original


#: Constructor ids already reported at WARNING by this process: one line per new id for the
#: whole fleet (a server rolling out a layer sends the same object to every account).
_WARNED_CONSTRUCTORS: set[int] = set()
_WARNED_LIMIT = 256


def first_sighting(constructor_id: int) -> bool:
    """True the first time this process meets ``constructor_id`` (bounded memory)."""
    if constructor_id in _WARNED_CONSTRUCTORS or len(_WARNED_CONSTRUCTORS) >= _WARNED_LIMIT:
        return False
    _WARNED_CONSTRUCTORS.add(constructor_id)
    return True


class UpdateSink(Protocol):
    """Where one account's catch-ups and unknown objects are reported
    (:class:`tgdaemon.reporter.AccountReporter`)."""

    def caught_up(self, report: CatchUp) -> None: ...

    def unknown_object(self, constructor_id: int) -> None: ...


def observe_updates(client: ManagedClient, sink: UpdateSink) -> None:
    """Report ``client``'s catch-ups and skipped unknown objects to ``sink``."""
    client.catch_up_box.on_catch_up = sink.caught_up
    client.on_unknown_object = sink.unknown_object
    guard_unknown_objects(client, sink.unknown_object)
