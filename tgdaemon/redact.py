"""The one redactor: what logs, ``/status`` and classified errors may show of a text.

Code never logs secrets in the first place; this catches what a third-party text carries:
Telethon's request reprs and raw records at DEBUG (phone numbers as TL strings, without
``+``), an exception message, an aiohttp line. One set of rules and one output format for
every sink, so a value hidden in the log is hidden in ``/status`` too.

Removed: ``name=value`` of login fields (phone, code, password); a login code after the word
"code"; phone numbers with ``+`` (7+ digits, separators allowed) and without (9+ digits with
separators, or any run of 7+ digits: user ids and message ids go too, ports and counts stay);
hex runs over 16 characters (keys, hashes); base64-looking tokens over 16 characters that mix
digits with both cases (session strings, keys). Error names, class names, paths stay.
"""

from __future__ import annotations

import re

__all__ = ["redact"]

_FIELD = re.compile(
    r"\b(phone_number|phone_code|phone|password|code)=('[^']*'|\"[^\"]*\"|\S+)")
_CODE = re.compile(r"\b(code)(\s+)\d{4,}\b", re.IGNORECASE)
_HEX = re.compile(r"\b[0-9a-fA-F]{17,}\b")
_B64ISH = re.compile(r"[A-Za-z0-9+/=_-]{17,}")
_PLUS_PHONE = re.compile(r"\+\d[\d\s().-]{5,}\d")
_SEPARATED_PHONE = re.compile(r"\d[\d\s()-]{7,}\d")
_LONG_NUMBER = re.compile(r"\d{7,}")


#: Texts the rules left as they were (nothing in them to hide): a fleet repeats its reasons
#: ("connection closed" for 10,000 accounts in an outage), and a lookup is cheaper than seven
#: scans (profiled: ~7 regex substitutions per transition). Only unchanged texts are kept, so
#: the cache never holds what the rules remove; bounded, emptied when full.
_CLEAN: dict[str, None] = {}
_CLEAN_MAX = 4096
_CLEAN_TEXT_MAX = 512


def redact(text: str, limit: int | None = None) -> str:
    """``text`` without what might be a secret or personal data (see the module docstring),
    cut to ``limit`` characters when given."""
    if text not in _CLEAN:
        clean = _apply_rules(text)
        if clean != text or len(text) > _CLEAN_TEXT_MAX:
            text = clean
        else:
            if len(_CLEAN) >= _CLEAN_MAX:
                _CLEAN.clear()
            _CLEAN[text] = None
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def _apply_rules(text: str) -> str:
    text = _FIELD.sub(r"\1=<redacted>", text)
    text = _CODE.sub(r"\1\2<code>", text)
    text = _HEX.sub("<hex>", text)
    text = _B64ISH.sub(lambda m: "<blob>" if _looks_random(m[0]) else m[0], text)
    text = _PLUS_PHONE.sub(lambda m: "<phone>" if _digits(m[0]) >= 7 else m[0], text)
    text = _SEPARATED_PHONE.sub(lambda m: "<phone>" if _digits(m[0]) >= 9 else m[0], text)
    return _LONG_NUMBER.sub("<num>", text)


def _digits(text: str) -> int:
    return sum(c.isdigit() for c in text)


def _looks_random(token: str) -> bool:
    # base64 of random bytes mixes digits with both cases; identifiers rarely do all three.
    return (
        any(c.isdigit() for c in token)
        and any(c.islower() for c in token)
        and any(c.isupper() for c in token)
    )
