"""API key format: ``chitty_<public id><secret><checksum>``.

- ``chitty_`` makes leaked keys easy to spot and lets secret scanners match them.
- The first 8 characters after it are the public id; ``chitty_`` plus those is the stored prefix
  used for lookup, and is safe to show.
- 32 random base62 characters of secret follow, then a 6-character base62 CRC32 of everything
  before it, so a scanner can tell a real key from a look-alike without asking us.
Only ``HMAC-SHA256(CHITTYCAN_KEY_SECRET, key)`` is stored.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
import zlib

from django.conf import settings

KEY_PREFIX = "chitty_"
_ALPHABET = string.digits + string.ascii_letters
_PUBLIC_LEN = 8
_SECRET_LEN = 32
_CHECK_LEN = 6
KEY_LENGTH = len(KEY_PREFIX) + _PUBLIC_LEN + _SECRET_LEN + _CHECK_LEN


def _base62(number: int, width: int) -> str:
    out = []
    for _ in range(width):
        number, rem = divmod(number, 62)
        out.append(_ALPHABET[rem])
    return "".join(reversed(out))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode()), _CHECK_LEN)


def generate_key() -> str:
    body = KEY_PREFIX + "".join(secrets.choice(_ALPHABET) for _ in range(_PUBLIC_LEN + _SECRET_LEN))
    return body + _checksum(body)


def key_prefix(key: str) -> str:
    return key[: len(KEY_PREFIX) + _PUBLIC_LEN]


def looks_valid(key: str) -> bool:
    """Format and checksum only; says nothing about whether the key exists."""
    if len(key) != KEY_LENGTH or not key.startswith(KEY_PREFIX):
        return False
    body, check = key[:-_CHECK_LEN], key[-_CHECK_LEN:]
    if any(c not in _ALPHABET for c in key[len(KEY_PREFIX) :]):
        return False
    return hmac.compare_digest(_checksum(body), check)


def hash_key(key: str) -> str:
    return hmac.new(settings.CHITTYCAN_KEY_SECRET.encode(), key.encode(), hashlib.sha256).hexdigest()


def verify_key(key: str, hashed: str) -> bool:
    return hmac.compare_digest(hash_key(key), hashed)
