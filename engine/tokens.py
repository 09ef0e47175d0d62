"""Secret tokens: issued once, stored only as a salted hash.

The relay's node tokens (``engine.relay.sqlite_store``) and the branch
server's workstation tokens (``engine.users``) use these functions, so there
is one way to make, hash and check a token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

#: Bytes of random salt per token.
SALT_BYTES = 16
#: Random bytes of a token (shown URL-safe base64, 43 characters).
TOKEN_BYTES = 32


def new_token() -> tuple[str, bytes]:
    """A fresh token and a fresh salt for it."""
    return secrets.token_urlsafe(TOKEN_BYTES), secrets.token_bytes(SALT_BYTES)


def token_hash(salt: bytes, token: str) -> bytes:
    """HMAC-SHA256(key=salt, token): what is stored instead of the token."""
    return hmac.new(salt, token.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()


def token_matches(salt: bytes | None, stored: bytes | None, token: str) -> bool:
    """Whether ``token`` hashes to ``stored`` under ``salt``, in constant
    time. With no stored hash (an unknown name) a hash is still computed, so
    that timing does not tell an unknown name from a wrong token."""
    if salt is None or stored is None:
        given = token_hash(b"\x00" * SALT_BYTES, token)
        hmac.compare_digest(given, given)
        return False
    return hmac.compare_digest(token_hash(salt, token), stored)
