"""Typed readers for settings that come from the environment.

Every variable the project reads is listed in docs/configuration.md; keep the two in step.
"""

from __future__ import annotations

import os

from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name} must be true or false, got {raw!r}")


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be an integer, got {raw!r}") from exc


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be a number, got {raw!r}") from exc


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(name, default).strip().lower()
    if value not in choices:
        raise ImproperlyConfigured(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def env_secret(name: str, default: str = "") -> str:
    """Read NAME, or the contents of the file named by NAME_FILE (Docker secrets)."""
    path = os.environ.get(f"{name}_FILE")
    if path:
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()
    return os.environ.get(name, default)


#: How to make a SECRET_KEY, as printed when one is missing or weak.
GENERATE_SECRET_KEY = "python3 -c 'import secrets; print(secrets.token_urlsafe(50))'"
SECRET_KEY_MIN_LENGTH = 32


def secret_key_problem(value: str, dev_default: str) -> str:
    """Why ``value`` is not a production SECRET_KEY ("" when it is one).

    API key hashes and the provider-credential encryption key are derived from it, so the public
    development default, a short value or one of a few repeated characters is refused."""
    how = (
        f"Set SECRET_KEY (or SECRET_KEY_FILE, a file holding it) to a long random value, e.g. "
        f'SECRET_KEY="$({GENERATE_SECRET_KEY})", or set CHITTYCAN_MODE=dev for local development.'
    )
    if not value.strip():
        return f"SECRET_KEY is empty. {how}"
    if value == dev_default:
        return f"SECRET_KEY is not set: the public development default would be used outside dev mode. {how}"
    if len(value) < SECRET_KEY_MIN_LENGTH or len(set(value)) < 5:
        return (
            f"SECRET_KEY is too weak ({len(value)} characters, {len(set(value))} distinct; "
            f"at least {SECRET_KEY_MIN_LENGTH} and 5 are needed). {how}"
        )
    return ""
