"""MTProto server-side cryptography, built on Telethon's own primitives.

Pure functions and small value classes: the RSA key of the local DC, the three key-exchange
steps, MTProto 2.0 message encryption in the server direction, and the server half of SRP.
CPU is kept light for many clients: pq comes from a fixed set of small prime pairs, the DH
exponent is 320 bits, and RSA decryption uses the CRT.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import random
import struct
import time
from dataclasses import dataclass
from hashlib import sha1, sha256
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa as crsa
from telethon import helpers
from telethon.crypto import AES, AuthKey
from telethon.extensions import BinaryReader
from telethon.network.mtprotostate import MTProtoState
from telethon.password import (
    big_num_for_hash,
    compute_hash,
    is_good_mod_exp_first,
    num_bytes_for_hash,
    xor,
)
from telethon.tl import TLObject
from telethon.tl import types as tl

# Telegram's 2048-bit safe prime (also the SRP prime the client accepts without factoring).
DH_PRIME = int(
    "C71CAEB9C6B1C9048E6C522F70F13F73980D40238E3E21C14934D037563D930F"
    "48198A0AA7C140582294" "93D22530F4DBFA336F6E0AC925139543AED44CCE7C37"
    "20FD51F69458705AC68CD4FE6B6B13ABDC9746512969328454F18FAF8C595F64"
    "2477FE96BB2A941D5BCD1D4AC8CC49880708FA9B378E3C4F3A9060BEE67CF9A4"
    "A4A695811051907E162753B56B0F6B410DBA74D8A84B2A14B3144E0EF1284754"
    "FD17ED950D5965B4B9DD46582DB1178D169C6BC465B0D6FF9CA3928FEF5B9AE4"
    "E418FC15E83EBEA0F87FA9FF5EED70050DED2849F47BF959D956850CE929851F"
    "0D8115F635B105EE2E4E15D04B2454BF6F4FADF034B10403119CD8E3B92FCC5B",
    16,
)
DH_G = 3
DH_PRIME_BYTES = DH_PRIME.to_bytes(256, "big")
#: A 2039-bit odd modulus (Telegram's prime shifted right; not prime, which clients do not
#: check): DH over it gives auth keys whose value needs at most 255 bytes. It makes certain,
#: for tests, the 1-in-256 case of Telegram's prime where g^ab < 2^2040.
SHORT_KEY_MODULUS = (DH_PRIME >> 9) | 1
_SAFETY = 2 ** (2048 - 64)

# Pairs of ~20-bit primes (well below the 2^32 limit): Telethon factors pq with Pollard-Brent
# in pure Python, ~25 ms per client for 31-bit primes but ~0.4 ms for these. Matters when a
# benchmark connects thousands of clients.
PQ_PAIRS: tuple[tuple[int, int], ...] = (
    (1005527, 1916333),
    (948089, 1613173),
    (782539, 2040917),
    (1041281, 1314851),
    (880483, 1958063),
    (1023973, 1713823),
)


def int_to_bytes(value: int) -> bytes:
    """Minimal big-endian bytes, exactly as Telethon's ``rsa.get_byte_array``."""
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


class ServerRsaKey:
    """The DC's RSA key pair; only the public half ever leaves the process."""

    def __init__(self, private_pem: bytes) -> None:
        key = serialization.load_pem_private_key(private_pem, password=None)
        if not isinstance(key, crsa.RSAPrivateKey):
            raise ValueError("not an RSA private key")
        self._private_pem = private_pem
        nums = key.private_numbers()
        self._n = nums.public_numbers.n
        self._e = nums.public_numbers.e
        self._p, self._q = nums.p, nums.q
        self._dp, self._dq, self._qinv = nums.dmp1, nums.dmq1, nums.iqmp
        self.public_pem: str = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.PKCS1
        ).decode("ascii")
        n = TLObject.serialize_bytes(int_to_bytes(self._n))
        e = TLObject.serialize_bytes(int_to_bytes(self._e))
        self.fingerprint: int = struct.unpack("<q", sha1(n + e).digest()[-8:])[0]

    def __repr__(self) -> str:
        return f"ServerRsaKey(fingerprint={self.fingerprint})"

    @classmethod
    def generate(cls) -> ServerRsaKey:
        key = crsa.generate_private_key(public_exponent=65537, key_size=2048)
        return cls(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    @property
    def private_pem(self) -> bytes:
        return self._private_pem

    def decrypt_raw(self, block: bytes) -> bytes:
        """Textbook RSA (what Telethon 1.45 sends), via the CRT; returns the 255-byte block."""
        c = int.from_bytes(block, "big")
        m1 = pow(c, self._dp, self._p)
        m2 = pow(c, self._dq, self._q)
        h = (self._qinv * (m1 - m2)) % self._p
        m = m2 + h * self._q
        if m >= 1 << (255 * 8):
            raise HandshakeError("RSA block out of range")
        return m.to_bytes(255, "big")


class HandshakeError(Exception):
    """The client's key-exchange message is malformed or does not match the ongoing exchange."""


@dataclass
class Handshake:
    """The server's state across the three key-exchange steps of one connection.

    ``prime``: the DH modulus, Telegram's prime; :data:`SHORT_KEY_MODULUS` only for the
    localdc test option that makes every auth key a value below 2^2040."""

    prime: int = DH_PRIME
    nonce: int = 0
    server_nonce: int = 0
    p: int = 0
    q: int = 0
    new_nonce: int = 0
    a: int = 0
    tmp_key: bytes = b""
    tmp_iv: bytes = b""

    def res_pq(self, req: Any, fingerprint: int) -> tl.ResPQ:
        self.nonce = req.nonce
        self.server_nonce = int.from_bytes(os.urandom(16), "big", signed=True)
        self.p, self.q = random.choice(PQ_PAIRS)
        return tl.ResPQ(
            nonce=self.nonce,
            server_nonce=self.server_nonce,
            pq=int_to_bytes(self.p * self.q),
            server_public_key_fingerprints=[fingerprint],
        )

    def server_dh_params(self, req: Any, key: ServerRsaKey, time_offset: float = 0.0
                         ) -> tl.ServerDHParamsOk:
        self._check_nonces(req)
        if req.public_key_fingerprint != key.fingerprint:
            raise HandshakeError("unknown RSA fingerprint")
        block = req.encrypted_data
        if len(block) != 256:
            raise HandshakeError("bad RSA block length")
        plain = key.decrypt_raw(block)
        reader = BinaryReader(plain[20:])
        inner = reader.tgread_object()
        if not isinstance(inner, tl.PQInnerData):
            raise HandshakeError("p_q_inner_data expected")
        if sha1(plain[20:20 + reader.tell_position()]).digest() != plain[:20]:
            raise HandshakeError("p_q_inner_data hash mismatch")
        if inner.nonce != self.nonce or inner.server_nonce != self.server_nonce:
            raise HandshakeError("nonce mismatch in p_q_inner_data")
        self.new_nonce = inner.new_nonce
        while True:
            self.a = int.from_bytes(os.urandom(40), "big")
            g_a = pow(DH_G, self.a, self.prime)
            if _SAFETY <= g_a <= self.prime - _SAFETY:
                break
        answer = bytes(tl.ServerDHInnerData(
            nonce=self.nonce,
            server_nonce=self.server_nonce,
            g=DH_G,
            dh_prime=int_to_bytes(self.prime),
            g_a=int_to_bytes(g_a),
            server_time=int(time.time() + time_offset),
        ))
        self.tmp_key, self.tmp_iv = helpers.generate_key_data_from_nonce(
            self.server_nonce, self.new_nonce
        )
        data = sha1(answer).digest() + answer
        data += os.urandom(-len(data) % 16)
        return tl.ServerDHParamsOk(
            nonce=self.nonce,
            server_nonce=self.server_nonce,
            encrypted_answer=AES.encrypt_ige(data, self.tmp_key, self.tmp_iv),
        )

    def dh_gen(self, req: Any) -> tuple[tl.DhGenOk, bytes]:
        """Finish the exchange: the answer and the new auth key's bytes."""
        self._check_nonces(req)
        if not self.tmp_key:
            raise HandshakeError("set_client_DH_params before req_DH_params")
        data = req.encrypted_data
        if not data or len(data) % 16:
            raise HandshakeError("bad client_DH_inner_data length")
        plain = AES.decrypt_ige(data, self.tmp_key, self.tmp_iv)
        inner = BinaryReader(plain[20:]).tgread_object()
        if not isinstance(inner, tl.ClientDHInnerData):
            raise HandshakeError("client_DH_inner_data expected")
        g_b = int.from_bytes(inner.g_b, "big")
        if not (_SAFETY <= g_b <= self.prime - _SAFETY):
            raise HandshakeError("g_b out of range")
        # The key is the 256-byte big-endian value, as Telegram hashes it (never minimal bytes).
        key_bytes = pow(g_b, self.a, self.prime).to_bytes(256, "big")
        auth_key = AuthKey(key_bytes)
        answer = tl.DhGenOk(
            nonce=self.nonce,
            server_nonce=self.server_nonce,
            new_nonce_hash1=auth_key.calc_new_nonce_hash(self.new_nonce, 1),
        )
        return answer, key_bytes

    def _check_nonces(self, req: Any) -> None:
        if (req.nonce != self.nonce
                or req.server_nonce != self.server_nonce):
            raise HandshakeError("nonce mismatch")


def key_id_of(key: bytes) -> int:
    """Unsigned 64-bit auth_key_id: the low 8 bytes of sha1(key)."""
    key_id: int = struct.unpack("<Q", sha1(key).digest()[12:20])[0]
    return key_id


def decrypt_client_message(key: bytes, body: bytes) -> bytes:
    """Decrypt a client→server MTProto 2.0 packet (auth_key_id included); checks msg_key.

    Lengths are checked first: libssl's IGE aborts the whole process on a partial block.
    """
    if len(body) < 24 + 32 or (len(body) - 24) % 16:
        raise ValueError("bad encrypted message length")
    msg_key = body[8:24]
    aes_key, aes_iv = MTProtoState._calc_key(key, msg_key, True)
    plain: bytes = AES.decrypt_ige(body[24:], aes_key, aes_iv)
    if sha256(key[88:120] + plain).digest()[8:24] != msg_key:
        raise ValueError("msg_key mismatch")
    return plain


def encrypt_server_message(key: bytes, key_id: int, plain: bytes) -> bytes:
    """Encrypt a server→client payload: salt+session+message, padded 12..27 bytes."""
    padding = os.urandom(-(len(plain) + 12) % 16 + 12)
    msg_key = sha256(key[96:128] + plain + padding).digest()[8:24]
    aes_key, aes_iv = MTProtoState._calc_key(key, msg_key, False)
    encrypted: bytes = AES.encrypt_ige(plain + padding, aes_key, aes_iv)
    return struct.pack("<Q", key_id) + msg_key + encrypted


# -- SRP (2FA), server half of telethon/password.py ------------------------------------------


@dataclass(frozen=True)
class SrpVerifier:
    """What the server stores for a 2FA password: salts and g^x, never the password."""

    salt1: bytes
    salt2: bytes
    verifier: bytes

    def __repr__(self) -> str:
        return "SrpVerifier(<redacted>)"

    @property
    def algo(self) -> tl.PasswordKdfAlgoSHA256SHA256PBKDF2HMACSHA512iter100000SHA256ModPow:
        return _srp_algo(self.salt1, self.salt2)

    @classmethod
    def create(cls, password: str) -> SrpVerifier:
        salt1, salt2 = os.urandom(40), os.urandom(16)
        x = int.from_bytes(compute_hash(_srp_algo(salt1, salt2), password), "big")
        return cls(salt1, salt2, big_num_for_hash(pow(DH_G, x, DH_PRIME)))


def _srp_algo(
    salt1: bytes, salt2: bytes
) -> tl.PasswordKdfAlgoSHA256SHA256PBKDF2HMACSHA512iter100000SHA256ModPow:
    """Telegram's KDF description with these salts over the 2048-bit prime."""
    return tl.PasswordKdfAlgoSHA256SHA256PBKDF2HMACSHA512iter100000SHA256ModPow(
        salt1=salt1, salt2=salt2, g=DH_G, p=DH_PRIME_BYTES)


def _h(*parts: bytes) -> bytes:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.digest()


@dataclass(frozen=True)
class SrpChallenge:
    """One account.getPassword answer's secret half, kept until auth.checkPassword."""

    srp_id: int
    b: int
    srp_b: bytes

    def __repr__(self) -> str:
        return f"SrpChallenge(srp_id={self.srp_id})"


def srp_challenge(v: SrpVerifier) -> SrpChallenge:
    """B = k·v + g^b mod p, with g^b in the range the client insists on."""
    k = int.from_bytes(_h(DH_PRIME_BYTES, big_num_for_hash(DH_G)), "big")
    vi = int.from_bytes(v.verifier, "big")
    while True:
        b = int.from_bytes(os.urandom(256), "big")
        g_b = pow(DH_G, b, DH_PRIME)
        big_b = (k * vi + g_b) % DH_PRIME
        if is_good_mod_exp_first(g_b, DH_PRIME) and big_b > 0:
            srp_id = struct.unpack("<q", os.urandom(8))[0]
            return SrpChallenge(srp_id, b, big_num_for_hash(big_b))


def srp_check(v: SrpVerifier, ch: SrpChallenge, a_bytes: bytes, m1: bytes) -> bool:
    """Verify the client's proof M1 for the challenge; constant work, no early outs on M1."""
    big_a = int.from_bytes(a_bytes, "big")
    if not (0 < big_a < DH_PRIME):
        return False
    a_for_hash = big_num_for_hash(big_a)
    b_for_hash = num_bytes_for_hash(ch.srp_b)
    u = int.from_bytes(_h(a_for_hash, b_for_hash), "big")
    vi = int.from_bytes(v.verifier, "big")
    s = pow(big_a * pow(vi, u, DH_PRIME) % DH_PRIME, ch.b, DH_PRIME)
    k_ = _h(big_num_for_hash(s))
    expected = _h(
        xor(_h(DH_PRIME_BYTES), _h(big_num_for_hash(DH_G))),
        _h(v.salt1),
        _h(v.salt2),
        a_for_hash,
        b_for_hash,
        k_,
    )
    return hmac.compare_digest(expected, m1)
