"""Encryption at rest for provider credentials (Fernet: AES-128-CBC + HMAC-SHA256)."""

from __future__ import annotations

import base64
import functools
import hashlib

from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings


@functools.cache
def _fernet() -> Fernet:
    material = settings.CHITTYCAN_ENCRYPTION_KEY
    if material:
        try:
            return Fernet(material.encode())
        except ValueError:
            pass  # not a Fernet key: derive one from it below
    else:
        material = settings.SECRET_KEY
    digest = hashlib.sha256(b"chittycan-provider-credentials:" + material.encode()).digest()
    return Fernet(base64.urlsafe_b64encode(digest))


def encrypt(plaintext: str) -> str:
    return _fernet().encrypt(plaintext.encode()).decode()


def decrypt(token: str) -> str:
    try:
        return _fernet().decrypt(token.encode()).decode()
    except InvalidToken as exc:
        raise ValueError("provider credential cannot be decrypted: was the encryption key changed?") from exc
