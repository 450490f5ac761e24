"""Generating and checking secrets. Passwords are argon2-hashed; random tokens SHA-256'd."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import string

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

_hasher = PasswordHasher()
_ALPHANUM = string.ascii_letters + string.digits


def new_token(nbytes: int = 32) -> str:
    return secrets.token_urlsafe(nbytes)


def new_sip_password(length: int = 20) -> str:
    """Strong and safe in any SIP or Asterisk configuration context (letters and digits).

    Never starting with 0x: some SIP clients (SIPp among them) read such a password as a
    hexadecimal key and then fail the digest challenge."""
    while True:
        pw = "".join(secrets.choice(_ALPHANUM) for _ in range(length))
        if any(c.isdigit() for c in pw) and any(c.isupper() for c in pw) and any(
                c.islower() for c in pw) and pw[:2].lower() != "0x":
            return pw


def digest(token: str) -> bytes:
    """Lookup key for a high-entropy token: SHA-256 is enough, and it is fast."""
    return hashlib.sha256(token.encode()).digest()


def hash_password_sync(password: str) -> str:
    return _hasher.hash(password)


async def hash_password(password: str) -> str:
    return await asyncio.get_running_loop().run_in_executor(None, _hasher.hash, password)


def _verify(hashed: str, password: str) -> bool:
    try:
        return _hasher.verify(hashed, password)
    except (VerificationError, InvalidHashError):
        return False


# A hash of a random password: verifying against it costs the same as a real check, so
# an unknown login takes as long to refuse as a wrong password.
_DUMMY_HASH = _hasher.hash(secrets.token_hex(16))


async def verify_password(hashed: str | None, password: str) -> bool:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, _verify, hashed or _DUMMY_HASH, password) and (
        hashed is not None)
