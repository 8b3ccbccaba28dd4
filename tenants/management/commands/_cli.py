"""Helpers shared by the ``can keys`` and ``can tenants`` commands: parsing and table printing."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from django.core.management.base import CommandError
from django.utils import timezone

from tenants.models import KNOWN_ENDPOINTS

SCOPE_KINDS = ("models", "endpoints")

_DURATION = re.compile(r"^(\d+)([hdw])$")
_UNITS = {"h": "hours", "d": "days", "w": "weeks"}


def parse_scopes(text: str) -> dict[str, list[str]]:
    """``models=gpt-4o,gpt-4o-mini;endpoints=chat`` -> ``{"models": [...], "endpoints": ["chat"]}``."""
    scopes: dict[str, list[str]] = {}
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        kind, sep, values = part.partition("=")
        kind = kind.strip()
        if not sep or kind not in SCOPE_KINDS:
            raise CommandError(
                f"--scopes: {part!r} is not KIND=a,b where KIND is one of {', '.join(SCOPE_KINDS)} "
                "(e.g. models=gpt-4o,gpt-4o-mini;endpoints=chat)"
            )
        if kind in scopes:
            raise CommandError(f"--scopes: {kind} given twice")
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not items:
            raise CommandError(f"--scopes: {kind}= lists nothing")
        if kind == "endpoints":
            unknown = [v for v in items if v not in KNOWN_ENDPOINTS]
            if unknown:
                raise CommandError(
                    f"--scopes: unknown endpoint {', '.join(unknown)}; known: {', '.join(KNOWN_ENDPOINTS)}"
                )
        scopes[kind] = list(dict.fromkeys(items))
    return scopes


def format_scopes(scopes: dict[str, Any] | None) -> str:
    parts = [f"{kind}={','.join(scopes[kind])}" for kind in SCOPE_KINDS if scopes and scopes.get(kind)]
    return ";".join(parts) or "all"


def parse_expires(text: str, *, tz: str = "UTC", now: datetime | None = None) -> datetime:
    """``30d``/``12h``/``2w`` from now, a date (its midnight in ``tz``), or an ISO date-time."""
    now = now or timezone.now()
    match = _DURATION.match(text.strip())
    if match:
        amount = int(match.group(1))
        if amount == 0:
            raise CommandError("--expires: a duration must be more than zero")
        return now + timedelta(**{_UNITS[match.group(2)]: amount})
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise CommandError(
            f"--expires: {text!r} is neither a duration (30d, 12h, 2w) nor a date (2027-01-01) or date-time"
        ) from None
    if timezone.is_naive(value):
        value = value.replace(tzinfo=ZoneInfo(tz))
    if value <= now:
        raise CommandError(f"--expires: {text} is in the past")
    return value


def table(rows: Sequence[Sequence[str]], headers: Sequence[str]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)
