"""Management API tokens: ``ccm_<12 public chars><32 secret chars>``; only an HMAC is stored."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
from typing import Any

from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser
from django.db import transaction
from django.utils import timezone
from rest_framework import authentication, exceptions
from rest_framework.request import Request

from control.models import ManagementToken
from tenants import audit

TOKEN_PREFIX = "ccm_"
_ALPHABET = string.digits + string.ascii_letters
_PUBLIC_LEN = 12
_SECRET_LEN = 32


def _hash(token: str) -> str:
    key = str(settings.CHITTYCAN_KEY_SECRET).encode()
    return hmac.new(key, b"management-token:" + token.encode(), hashlib.sha256).hexdigest()


@transaction.atomic
def token_create(*, user: Any, name: str = "") -> tuple[ManagementToken, str]:
    """Create a token for ``user``. Returns the row and the plaintext, which is never shown again."""
    body = "".join(secrets.choice(_ALPHABET) for _ in range(_PUBLIC_LEN + _SECRET_LEN))
    plaintext = TOKEN_PREFIX + body
    token = ManagementToken.objects.create(
        user=user, name=name, prefix=plaintext[: len(TOKEN_PREFIX) + _PUBLIC_LEN], hashed_secret=_hash(plaintext)
    )
    audit.record(
        "apitoken.create", target=token.prefix, data={"user": user.get_username(), "name": name}, actor_label="cli"
    )
    return token, plaintext


@transaction.atomic
def token_revoke(
    *, token: ManagementToken, actor: AbstractBaseUser | None = None, actor_label: str = "cli"
) -> ManagementToken:
    if token.revoked_at is None:
        token.revoked_at = timezone.now()
        token.save(update_fields=["revoked_at"])
        audit.record("apitoken.revoke", target=token.prefix, actor=actor, actor_label=actor_label)
    return token


def verify(plaintext: str) -> ManagementToken | None:
    if not plaintext.startswith(TOKEN_PREFIX) or len(plaintext) != len(TOKEN_PREFIX) + _PUBLIC_LEN + _SECRET_LEN:
        return None
    prefix = plaintext[: len(TOKEN_PREFIX) + _PUBLIC_LEN]
    token = ManagementToken.objects.select_related("user").filter(prefix=prefix, revoked_at__isnull=True).first()
    if token is None or not hmac.compare_digest(token.hashed_secret, _hash(plaintext)):
        return None
    return token


def is_staff_token(plaintext: str) -> bool:
    """A valid token of an active staff user (it may drop any tenant's cached answers)."""
    token = verify(plaintext)
    return token is not None and token.user.is_active and token.user.is_staff


class ManagementTokenAuthentication(authentication.BaseAuthentication):
    """``Authorization: Bearer ccm_...``."""

    keyword = "Bearer"

    def authenticate(self, request: Request) -> tuple[Any, ManagementToken] | None:
        header = authentication.get_authorization_header(request).split()
        if not header or header[0].lower() != self.keyword.lower().encode():
            return None
        if len(header) != 2:
            raise exceptions.AuthenticationFailed("Invalid Authorization header: expected 'Bearer <token>'.")
        try:
            plaintext = header[1].decode("ascii")
        except UnicodeDecodeError as exc:
            raise exceptions.AuthenticationFailed("Invalid token.") from exc
        token = verify(plaintext)
        if token is None or not token.user.is_active:
            raise exceptions.AuthenticationFailed("Invalid token.")
        if token.last_used_at is None or (timezone.now() - token.last_used_at).total_seconds() > 60:
            ManagementToken.objects.filter(pk=token.pk).update(last_used_at=timezone.now())
        return token.user, token

    def authenticate_header(self, request: Request) -> str:
        return self.keyword
