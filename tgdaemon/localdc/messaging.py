"""Private messages between localdc's users: send, history, dialogs, read marks, edits,
deletions, and finding a user by username or phone number.

Built on the per-user update log of :mod:`tgdaemon.localdc.updates` (``World.history``): every
change is an update recorded in the affected user's box (bumping its pts, persisted, replayed
by getDifference) and pushed to that user's sessions. A box's messages, edits, deletions and
read marks are *read back from that log* (:func:`box_view`), so there is one model of what
happened, not a second message store. As on Telegram, each side of a private chat has its own
message ids: a message from A to B is two messages, one in each box, linked as twins (kept in
memory; after a localdc restart older messages no longer propagate edits/reads to the other
side) so a read mark, an edit or a revoked deletion reaches the other side with its own id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from telethon.tl import functions as fn
from telethon.tl import types as tl
from telethon.tl.types import contacts as tl_contacts
from telethon.tl.types import messages as tl_messages

from tgdaemon.localdc.rpc import (
    SERVICE_USER_ID,
    Ctx,
    RpcFail,
    World,
    _handles,
    _now,
    normalize_phone,
)

if TYPE_CHECKING:
    from tgdaemon.localdc.store import UserRecord

_LOCAL_USERNAME = re.compile(r"local(\d+)", re.IGNORECASE)


@dataclass
class Chats:
    """What the update log does not say: which two messages are one message's two sides."""

    #: (owner, message id) -> (other owner, other's message id)
    twins: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)


def chats(w: World) -> Chats:
    state = w.__dict__.get("_chats")
    if state is None:
        state = w.__dict__["_chats"] = Chats()
    assert isinstance(state, Chats)
    return state


def _target(w: World, me: UserRecord, peer: Any) -> UserRecord:
    """The user an InputPeer names (self included); PEER_ID_INVALID otherwise."""
    if isinstance(peer, tl.InputPeerSelf):
        return me
    uid = getattr(peer, "user_id", None)
    if isinstance(peer, tl.InputPeerUser | tl.InputUser) and uid in w.store.users:
        return w.store.users[uid]
    raise RpcFail(400, "PEER_ID_INVALID")


def _peer_user_id(msg: Any) -> int | None:
    peer = getattr(msg, "peer_id", None)
    return peer.user_id if isinstance(peer, tl.PeerUser) else None


@dataclass
class BoxView:
    """A user's private messages and read marks, as the update log says they are now."""

    messages: dict[int, Any] = field(default_factory=dict)  # id -> current message
    read_inbox: dict[int, int] = field(default_factory=dict)  # peer -> max id read by owner
    read_outbox: dict[int, int] = field(default_factory=dict)  # peer -> max id peer read


def box_view(w: World, owner: int) -> BoxView:
    """Replay the owner's log (bounded: the newest ``history_limit`` updates)."""
    view = BoxView()
    for u in w.history.account.entries(owner):
        if isinstance(u, tl.UpdateNewMessage | tl.UpdateEditMessage):
            if u.message.id in view.messages or isinstance(u, tl.UpdateNewMessage):
                view.messages[u.message.id] = u.message
        elif isinstance(u, tl.UpdateDeleteMessages):
            for i in u.messages:
                view.messages.pop(i, None)
        elif isinstance(u, tl.UpdateReadHistoryInbox) and isinstance(u.peer, tl.PeerUser):
            view.read_inbox[u.peer.user_id] = max(u.max_id,
                                                  view.read_inbox.get(u.peer.user_id, 0))
        elif isinstance(u, tl.UpdateReadHistoryOutbox) and isinstance(u.peer, tl.PeerUser):
            view.read_outbox[u.peer.user_id] = max(u.max_id,
                                                   view.read_outbox.get(u.peer.user_id, 0))
    return view


def _messages_with(w: World, owner: int, peer: int) -> list[Any]:
    return [m for m in box_view(w, owner).messages.values() if _peer_user_id(m) == peer]


def _record(w: World, owner: int, make: Any, exclude_key: int | None,
            peers: tuple[int, ...] = ()) -> Any:
    update = w.history.record(owner, make)
    w.deliver(owner, [update], exclude_key, peers=peers)
    return update


def _users(w: World, viewer: int, ids: set[int]) -> list[tl.User]:
    out = [w.tl_user(w.store.users[i], viewer) for i in sorted(ids) if i in w.store.users]
    if SERVICE_USER_ID in ids:
        out.append(w.service_user())
    return out


# -- send ---------------------------------------------------------------------------------------


@_handles(fn.messages.SendMessageRequest)
def _send_message(w: World, ctx: Ctx, req: Any) -> tl.UpdateShortSentMessage:
    me = w.user(ctx)
    target = _target(w, me, req.peer)
    if not req.message:
        raise RpcFail(400, "MESSAGE_EMPTY")
    if len(req.message) > 4096:
        raise RpcFail(400, "MESSAGE_TOO_LONG")
    reply = req.reply_to.reply_to_msg_id if isinstance(req.reply_to, tl.InputReplyToMessage) \
        else None
    state = chats(w)
    sent = w.new_message(me.id, req.message, out=True, peer=target.id, exclude_key=ctx.key_id,
                         reply_to=reply)
    if target.id != me.id:
        their_reply = state.twins.get((me.id, reply), (0, 0))[1] if reply else None
        received = w.new_message(target.id, req.message, out=False, peer=me.id,
                                 exclude_key=None, reply_to=their_reply or None)
        state.twins[(me.id, sent.id)] = (target.id, received.id)
        state.twins[(target.id, received.id)] = (me.id, sent.id)
    pts = w.store.users[me.id].pts
    return tl.UpdateShortSentMessage(id=sent.id, pts=pts, pts_count=1, date=sent.date, out=True)


# -- history and dialogs ------------------------------------------------------------------------


@_handles(fn.messages.GetHistoryRequest)
def _get_history(w: World, ctx: Ctx, req: Any) -> tl_messages.Messages:
    me = w.user(ctx)
    target = _target(w, me, req.peer)
    msgs = sorted(_messages_with(w, me.id, target.id), key=lambda m: m.id, reverse=True)
    if req.offset_id:
        msgs = [m for m in msgs if m.id < req.offset_id]
    if req.max_id:
        msgs = [m for m in msgs if m.id < req.max_id]
    if req.min_id:
        msgs = [m for m in msgs if m.id > req.min_id]
    msgs = msgs[max(0, req.add_offset):][:max(0, min(req.limit or 100, 100))]
    return tl_messages.Messages(messages=msgs, topics=[], chats=[],
                                users=_users(w, me.id, {me.id, target.id}))


@_handles(fn.messages.GetDialogsRequest)
def _get_dialogs(w: World, ctx: Ctx, req: Any) -> tl_messages.Dialogs:
    me = w.user(ctx)
    view = box_view(w, me.id)
    top: dict[int, Any] = {}
    unread: dict[int, int] = {}
    for m in view.messages.values():
        peer = _peer_user_id(m)
        if peer is None:
            continue
        if peer not in top or m.id > top[peer].id:
            top[peer] = m
        if not m.out and m.id > view.read_inbox.get(peer, 0):
            unread[peer] = unread.get(peer, 0) + 1
    order = sorted(top, key=lambda p: top[p].id, reverse=True)[:max(1, min(req.limit, 100))]
    dialogs = [tl.Dialog(peer=tl.PeerUser(p), top_message=top[p].id,
                         read_inbox_max_id=view.read_inbox.get(p, 0),
                         read_outbox_max_id=view.read_outbox.get(p, 0),
                         unread_count=unread.get(p, 0), unread_mentions_count=0,
                         unread_reactions_count=0, unread_poll_votes_count=0,
                         notify_settings=tl.PeerNotifySettings())
               for p in order]
    return tl_messages.Dialogs(dialogs=dialogs, messages=[top[p] for p in order], chats=[],
                               users=_users(w, me.id, {me.id, *order}))


# -- read marks ---------------------------------------------------------------------------------


@_handles(fn.messages.ReadHistoryRequest)
def _read_history(w: World, ctx: Ctx, req: Any) -> tl_messages.AffectedMessages:
    me = w.user(ctx)
    target = _target(w, me, req.peer)
    state = chats(w)
    view = box_view(w, me.id)
    incoming = [m.id for m in view.messages.values()
                if _peer_user_id(m) == target.id and not m.out]
    newest = max(incoming, default=0)
    upto = min(req.max_id or newest, newest)
    if upto <= view.read_inbox.get(target.id, 0):
        return tl_messages.AffectedMessages(pts=me.pts, pts_count=0)
    still = sum(1 for i in incoming if i > upto)
    mark = _record(w, me.id, lambda pts: tl.UpdateReadHistoryInbox(
        peer=tl.PeerUser(target.id), max_id=upto, still_unread_count=still, pts=pts,
        pts_count=1), ctx.key_id)
    # The other side learns that its messages up to its own id were read.
    theirs = [state.twins[(me.id, i)][1] for i in incoming
              if i <= upto and (me.id, i) in state.twins]
    if theirs and target.id != me.id:
        _record(w, target.id, lambda pts: tl.UpdateReadHistoryOutbox(
            peer=tl.PeerUser(me.id), max_id=max(theirs), pts=pts, pts_count=1), None)
    return tl_messages.AffectedMessages(pts=mark.pts, pts_count=1)


# -- edits and deletions ------------------------------------------------------------------------


def replace_message(msg: tl.Message, change: dict[str, Any]) -> tl.Message:
    """A copy of a TL message with some fields changed (TL objects are plain classes)."""
    fields = {k: v for k, v in msg.__dict__.items() if not k.startswith("_")}
    fields.update(change)
    return tl.Message(**fields)


@_handles(fn.messages.EditMessageRequest)
def _edit_message(w: World, ctx: Ctx, req: Any) -> tl.Updates:
    me = w.user(ctx)
    target = _target(w, me, req.peer)
    mine = box_view(w, me.id).messages.get(req.id)
    if mine is None or _peer_user_id(mine) != target.id:
        raise RpcFail(400, "MESSAGE_ID_INVALID")
    if not mine.out:
        raise RpcFail(403, "MESSAGE_AUTHOR_REQUIRED")
    if not req.message:
        raise RpcFail(400, "MESSAGE_EMPTY")
    if req.message == mine.message:
        raise RpcFail(400, "MESSAGE_NOT_MODIFIED")
    change = {"message": req.message, "edit_date": _now()}
    edited = replace_message(mine, change)
    update = _record(w, me.id, lambda pts: tl.UpdateEditMessage(
        message=edited, pts=pts, pts_count=1), ctx.key_id)
    twin = chats(w).twins.get((me.id, mine.id))
    theirs = box_view(w, twin[0]).messages.get(twin[1]) if twin is not None else None
    if twin is not None and theirs is not None:
        their_edit = replace_message(theirs, change)
        _record(w, twin[0], lambda pts: tl.UpdateEditMessage(
            message=their_edit, pts=pts, pts_count=1), None, peers=(me.id,))
    return tl.Updates(updates=[update], users=_users(w, me.id, {me.id, target.id}), chats=[],
                      date=_now(), seq=0)


@_handles(fn.messages.DeleteMessagesRequest)
def _delete_messages(w: World, ctx: Ctx, req: Any) -> tl_messages.AffectedMessages:
    me = w.user(ctx)
    state = chats(w)
    held = box_view(w, me.id).messages
    gone = [i for i in req.id if i in held]
    if not gone:
        return tl_messages.AffectedMessages(pts=me.pts, pts_count=0)
    mark = _record(w, me.id, lambda pts: tl.UpdateDeleteMessages(
        messages=gone, pts=pts, pts_count=1), ctx.key_id)
    if req.revoke:
        others: dict[int, list[int]] = {}
        for i in gone:
            twin = state.twins.pop((me.id, i), None)
            if twin is not None:
                others.setdefault(twin[0], []).append(twin[1])
                state.twins.pop(twin, None)
        for owner, ids in others.items():
            their_held = box_view(w, owner).messages
            their_gone = [i for i in ids if i in their_held]
            if their_gone:
                _record(w, owner, lambda pts, g=their_gone: tl.UpdateDeleteMessages(
                    messages=g, pts=pts, pts_count=1), None)
    return tl_messages.AffectedMessages(pts=mark.pts, pts_count=1)


# -- finding users ------------------------------------------------------------------------------


def _resolved(w: World, me: UserRecord, user: UserRecord) -> tl_contacts.ResolvedPeer:
    return tl_contacts.ResolvedPeer(peer=tl.PeerUser(user.id), chats=[],
                                    users=[w.tl_user(user, me.id)])


@_handles(fn.contacts.ResolveUsernameRequest)
def _resolve_username(w: World, ctx: Ctx, req: Any) -> tl_contacts.ResolvedPeer:
    me = w.user(ctx)
    m = _LOCAL_USERNAME.fullmatch(req.username or "")
    if m is None or int(m[1]) not in w.store.users:
        raise RpcFail(400, "USERNAME_NOT_OCCUPIED")
    return _resolved(w, me, w.store.users[int(m[1])])


@_handles(fn.contacts.ResolvePhoneRequest)
def _resolve_phone(w: World, ctx: Ctx, req: Any) -> tl_contacts.ResolvedPeer:
    me = w.user(ctx)
    uid = w.store.users_by_phone.get(normalize_phone(req.phone))
    if uid is None:
        raise RpcFail(400, "PHONE_NOT_OCCUPIED")
    return _resolved(w, me, w.store.users[uid])


__all__ = ["BoxView", "Chats", "box_view", "chats", "replace_message"]
