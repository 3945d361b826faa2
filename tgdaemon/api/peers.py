"""Peers as API clients name them: a numeric id, ``@username``, ``+phone`` or ``me``.

Parsing is pure (:func:`parse_peer`); resolving asks Telegram the way its apps do:
``contacts.resolveUsername`` for a username, ``contacts.resolvePhone`` for a phone number, and
Telethon's entity cache (then ``users.getUsers``) for an id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from telethon import functions, utils
from telethon.tl import types as tl

if TYPE_CHECKING:
    from tgdaemon.telegram import ManagedClient

_USERNAME = re.compile(r"@?([A-Za-z][A-Za-z0-9_]{3,31})")
_PHONE = re.compile(r"\+[0-9][0-9 ()-]{4,20}")
_ID = re.compile(r"-?[0-9]{1,20}")


@dataclass(frozen=True)
class PeerRef:
    """How a peer was named: exactly one of the fields is set."""

    id: int | None = None
    username: str | None = None
    phone: str | None = field(default=None, repr=False)  # personal data: never in a repr
    me: bool = False


def parse_peer(value: Any) -> PeerRef:
    """A peer reference from JSON/query input; ValueError with a safe message otherwise."""
    if isinstance(value, bool):
        raise ValueError("peer must be an id, \"@username\", \"+phone\" or \"me\"")
    if isinstance(value, int):
        return PeerRef(id=value)
    if not isinstance(value, str):
        raise ValueError("peer must be an id, \"@username\", \"+phone\" or \"me\"")
    text = value.strip()
    if text in ("me", "self"):
        return PeerRef(me=True)
    if _ID.fullmatch(text):
        return PeerRef(id=int(text))
    if _PHONE.fullmatch(text):
        return PeerRef(phone=re.sub(r"\D", "", text))
    m = _USERNAME.fullmatch(text)
    if m and (text.startswith("@") or not text.isdigit()):
        return PeerRef(username=m[1])
    raise ValueError("peer must be an id, \"@username\", \"+phone\" or \"me\"")


async def resolve_peer(client: ManagedClient, ref: PeerRef) -> tl.TypeInputPeer:
    """The InputPeer for ``ref`` (raises Telethon's errors; ValueError when not found)."""
    if ref.me:
        return tl.InputPeerSelf()
    if ref.username is not None:
        found = await client(functions.contacts.ResolveUsernameRequest(ref.username))
        return _input_peer_of(found)
    if ref.phone is not None:
        found = await client(functions.contacts.ResolvePhoneRequest(ref.phone))
        return _input_peer_of(found)
    assert ref.id is not None
    peer: tl.TypeInputPeer = await client.get_input_entity(ref.id)
    return peer


def _input_peer_of(resolved: Any) -> tl.TypeInputPeer:
    peer_id = utils.get_peer_id(resolved.peer)
    for entity in (*resolved.users, *resolved.chats):
        if utils.get_peer_id(entity) == peer_id:
            peer: tl.TypeInputPeer = utils.get_input_peer(entity)
            return peer
    raise ValueError("Cannot find any entity corresponding to the resolved peer")
