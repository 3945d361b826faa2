"""Finds secrets in text (logs, CLI output): used by the process tests and the soak.

It reports *descriptions* of what leaked, never the values, so its own output is safe.
"""

from __future__ import annotations

import base64
import re
from urllib.parse import quote

from tgdaemon.crypto import KeyRing
from tgdaemon.localdc.testing import API_HASH


def phone_pattern(phone: str) -> re.Pattern[str]:
    """The number's digits in any grouping: +99966 12345, 999-661-2345, (999) 6612345..."""
    digits = re.sub(r"\D", "", phone)
    return re.compile(r"(?<!\d)" + r"[\s\-().]*".join(digits) + r"(?!\d)")


def key_forms(secret: bytes) -> list[str]:
    forms = [secret.hex(), secret.hex().upper(), base64.b64encode(secret).decode(),
             base64.urlsafe_b64encode(secret).decode().rstrip("=")]
    # A leaked prefix is a leak too: the first 16 bytes in hex.
    forms.append(secret[:16].hex())
    return forms


def secrets_found(text: str, *, phones: list[str], codes: list[str], keyring: KeyRing,
                  auth_keys: list[bytes], passwords: list[str] | None = None) -> list[str]:
    """Descriptions (never values) of every secret that appears in ``text``; ``passwords``:
    proxy passwords and MTProxy secrets, found verbatim or URL-quoted."""
    found = []
    for i, password in enumerate(passwords or []):
        if password in text or quote(password, safe="") in text:
            found.append(f"proxy password #{i}")
    for i, phone in enumerate(phones):
        if phone_pattern(phone).search(text):
            found.append(f"phone number #{i}")
    for i, code in enumerate(codes):
        if re.search(rf"(?<!\d){re.escape(code)}(?!\d)", text):
            found.append(f"login code #{i}")
    for key in keyring:
        if any(form in text for form in key_forms(key.secret)):
            found.append(f"master key {key.key_id}")
    for i, auth_key in enumerate(auth_keys):
        if any(form in text for form in key_forms(auth_key)):
            found.append(f"auth key #{i}")
    if API_HASH in text or API_HASH.upper() in text:
        found.append("api_hash")
    return found
