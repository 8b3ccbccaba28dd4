"""A test-only password hasher: Django's PBKDF2 at 1,000 iterations instead of 1,000,000.

The suite creates and logs in a few hundred users (admin, dashboard, REST API tests); at Django's
default cost each hash is a second of CPU on the shared two-core machine. The hash keeps the
``pbkdf2_sha256`` format, iteration count included, so a gateway process of the suite running the
default hashers (``can serve``, ``manage.py``) still checks these passwords (and upgrades the hash
on login, as Django does after a change of cost). Production settings are not touched: only
tests/conftest.py puts this hasher first.
"""

from __future__ import annotations

from django.contrib.auth.hashers import PBKDF2PasswordHasher

DEFAULT = "django.contrib.auth.hashers.PBKDF2PasswordHasher"


class QuickPBKDF2PasswordHasher(PBKDF2PasswordHasher):
    iterations = 1_000


def quick_first(hashers: list[str]) -> list[str]:
    """``hashers`` with Django's PBKDF2 hasher replaced by the quick one, first."""
    return [f"{__name__}.QuickPBKDF2PasswordHasher", *(h for h in hashers if h != DEFAULT)]
