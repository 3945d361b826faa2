"""Key ring round trip, tamper / wrong key / row swap detection, key file handling."""

from __future__ import annotations

import base64
import logging
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tgdaemon.crypto import (
    HEADER_SIZE,
    DataKey,
    KeyRing,
    generate_keyring,
    load_keyring,
    record_key_id,
    write_key_file,
)
from tgdaemon.exceptions import DecryptionError, KeyMaterialError

RING = generate_keyring()
OTHER = generate_keyring()
names = st.text(min_size=0, max_size=20)
payloads = st.binary(max_size=600)


@settings(max_examples=60, deadline=None)
@given(plaintext=payloads, account=names, purpose=names)
def test_round_trip(plaintext: bytes, account: str, purpose: str) -> None:
    rec = RING.encrypt(plaintext, account=account, purpose=purpose)
    assert RING.decrypt(rec, account=account, purpose=purpose) == plaintext
    assert record_key_id(rec) == RING.active.key_id
    assert len(plaintext) < 8 or plaintext not in rec[HEADER_SIZE:]


@settings(max_examples=80, deadline=None)
@given(plaintext=payloads, data=st.data())
def test_any_single_bit_flip_is_detected(plaintext: bytes, data: st.DataObject) -> None:
    rec = bytearray(RING.encrypt(plaintext, account="a1", purpose="session"))
    pos = data.draw(st.integers(0, len(rec) - 1))
    bit = data.draw(st.integers(0, 7))
    rec[pos] ^= 1 << bit
    with pytest.raises(DecryptionError, match="'a1'"):
        RING.decrypt(bytes(rec), account="a1", purpose="session")


@settings(max_examples=40, deadline=None)
@given(plaintext=payloads, cut=st.integers(min_value=1, max_value=700))
def test_truncation_is_detected(plaintext: bytes, cut: int) -> None:
    rec = RING.encrypt(plaintext, account="a1", purpose="session")
    with pytest.raises(DecryptionError):
        RING.decrypt(rec[: max(0, len(rec) - cut)], account="a1", purpose="session")


@settings(max_examples=60, deadline=None)
@given(plaintext=payloads, a=names, b=names, p=names, q=names)
def test_row_or_field_swap_is_detected(plaintext: bytes, a: str, b: str, p: str, q: str) -> None:
    rec = RING.encrypt(plaintext, account=a, purpose=p)
    if (a, p) == (b, q):
        assert RING.decrypt(rec, account=b, purpose=q) == plaintext
    else:
        with pytest.raises(DecryptionError, match="authentication failed"):
            RING.decrypt(rec, account=b, purpose=q)


@settings(max_examples=30, deadline=None)
@given(plaintext=payloads)
def test_wrong_key_is_detected_and_names_account(plaintext: bytes) -> None:
    rec = RING.encrypt(plaintext, account="alice", purpose="session")
    with pytest.raises(DecryptionError, match=r"'alice'.*not in the key ring"):
        OTHER.decrypt(rec, account="alice", purpose="session")
    # same key id, different secret: authentication fails
    impostor = KeyRing(DataKey(RING.active.key_id, os.urandom(32)))
    with pytest.raises(DecryptionError, match=r"session record of account 'alice'.*authentication"):
        impostor.decrypt(rec, account="alice", purpose="session")


def test_bad_version_is_reported() -> None:
    rec = bytearray(RING.encrypt(b"x", account="a", purpose="p"))
    rec[0] = 9
    with pytest.raises(DecryptionError, match="unsupported record version 9"):
        RING.decrypt(bytes(rec), account="a", purpose="p")


def test_nonces_are_unique() -> None:
    recs = {RING.encrypt(b"same", account="a", purpose="p")[5:HEADER_SIZE] for _ in range(500)}
    assert len(recs) == 500


def test_rotation_keeps_old_keys_readable() -> None:
    old = RING.encrypt(b"old", account="a", purpose="p")
    new_ring = RING.with_new_active()
    assert new_ring.active.key_id != RING.active.key_id
    assert set(new_ring.key_ids) == {RING.active.key_id, new_ring.active.key_id}
    assert new_ring.decrypt(old, account="a", purpose="p") == b"old"
    new = new_ring.encrypt(b"new", account="a", purpose="p")
    assert record_key_id(new) == new_ring.active.key_id
    pruned = new_ring.without(RING.active.key_id)
    assert pruned.decrypt(new, account="a", purpose="p") == b"new"
    with pytest.raises(DecryptionError, match="not in the key ring"):
        pruned.decrypt(old, account="a", purpose="p")
    with pytest.raises(KeyMaterialError, match="active"):
        new_ring.without(new_ring.active.key_id)
    # immutability: the original ring is unchanged
    assert RING.key_ids == (RING.active.key_id,)


def test_secrets_never_in_repr() -> None:
    ring = RING.with_new_active()
    for k in ring:
        b64 = base64.urlsafe_b64encode(k.secret).decode()
        assert k.secret.hex() not in repr(k)
        assert repr(k.secret) not in repr(k)
        assert b64 not in repr(ring)
        assert str(k.secret) not in str(ring)


def test_dumps_loads_round_trip() -> None:
    ring = RING.with_new_active().with_new_active()
    text = "# comment\n\n" + ring.dumps()
    again = KeyRing.loads(text)
    assert again == ring
    assert again.active == ring.active


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no active key"),
        ("garbage here", "line 1: not a 'tgdaemon-key' line"),
        ("tgdaemon-key v9 0011aabb AAAA active", "unsupported key format"),
        ("tgdaemon-key v1 XYZ AAAA active", "8 lowercase hex"),
        ("tgdaemon-key v1 0011aabb !!!! active", "base64"),
        ("tgdaemon-key v1 0011aabb AAAA active", "32 bytes"),
        ("tgdaemon-key v1 0011aabb {k} yes", "trailing"),
        ("tgdaemon-key v1 0011aabb {k} active\ntgdaemon-key v1 0011aabc {k} active", "more than"),
        ("tgdaemon-key v1 0011aabb {k}", "no active key"),
        ("tgdaemon-key v1 0011aabb {k} active\ntgdaemon-key v1 0011aabb {j}", "twice"),
    ],
)
def test_loads_rejects_bad_text_without_echoing_it(text: str, message: str) -> None:
    k = base64.urlsafe_b64encode(b"K" * 32).decode()
    j = base64.urlsafe_b64encode(b"J" * 32).decode()
    with pytest.raises(KeyMaterialError, match=message) as info:
        KeyRing.loads(text.format(k=k, j=j), source="test.key")
    assert k not in str(info.value)
    assert j not in str(info.value)


def test_write_key_file_is_0600_and_refuses_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "tgdaemon.key"
    ring = generate_keyring()
    old_umask = os.umask(0)
    try:
        write_key_file(path, ring)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_keyring(key_file=path, env={}) == ring
    with pytest.raises(KeyMaterialError, match="already exists"):
        write_key_file(path, generate_keyring())
    assert load_keyring(key_file=path, env={}) == ring
    ring2 = ring.with_new_active()
    write_key_file(path, ring2, overwrite=True)
    assert load_keyring(key_file=path, env={}) == ring2
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["tgdaemon.key"]  # no temp files left


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_load_refuses_group_or_other_readable_file(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "k"
    write_key_file(path, generate_keyring())
    path.chmod(mode)
    with pytest.raises(KeyMaterialError, match=rf"{path}.*mode 0{mode:o}"):
        load_keyring(key_file=path, env={})


def test_source_order(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cred_ring, file_ring, env_ring = generate_keyring(), generate_keyring(), generate_keyring()
    cred_dir = tmp_path / "creds"
    cred_dir.mkdir()
    write_key_file(cred_dir / "tgdaemon.key", cred_ring)
    key_file = tmp_path / "file.key"
    write_key_file(key_file, file_ring)
    env = {"CREDENTIALS_DIRECTORY": str(cred_dir), "TGDAEMON_MASTER_KEY": env_ring.dumps()}
    assert load_keyring(key_file=key_file, env=env) == cred_ring
    env["CREDENTIALS_DIRECTORY"] = str(tmp_path / "empty")
    assert load_keyring(key_file=key_file, env=env) == file_ring
    with caplog.at_level(logging.WARNING, logger="tgdaemon.crypto"):
        assert load_keyring(key_file=None, env=env) == env_ring
    assert "development only" in caplog.text
    assert env_ring.active.secret.hex() not in caplog.text


def test_env_bare_base64_key_and_missing_key(tmp_path: Path) -> None:
    secret = os.urandom(32)
    env = {"TGDAEMON_MASTER_KEY": base64.b64encode(secret).decode()}
    ring = load_keyring(key_file=None, env=env)
    assert ring.active.secret == secret
    # stable id: records stay readable across restarts
    assert load_keyring(key_file=None, env=dict(env)).active.key_id == ring.active.key_id
    with pytest.raises(KeyMaterialError, match="no master key"):
        load_keyring(key_file=None, env={})
    with pytest.raises(KeyMaterialError, match="cannot read key file"):
        load_keyring(key_file=tmp_path / "missing.key", env={})
