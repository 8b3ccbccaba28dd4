"""Shared bits of ``can analytics`` and ``can metrics``: argument parsing and plain tables."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from django.core.management.base import CommandError
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from tenants.models import Tenant

_SINCE = re.compile(r"^(\d+)([mhdw])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def tenant_by_slug(slug: str) -> Tenant:
    tenant = Tenant.objects.filter(slug=slug).first()
    if tenant is None:
        raise CommandError(f"no tenant with slug {slug!r} (see `can tenants list`)")
    return tenant


def parse_month(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d{4})-(\d{2})", text.strip())
    if not match or not 1 <= int(match.group(2)) <= 12:
        raise CommandError(f"--month {text!r} is not YYYY-MM (e.g. 2026-11)")
    return int(match.group(1)), int(match.group(2))


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``90m``, ``24h``, ``7d``, ``2w`` ago, a date (UTC midnight) or an ISO date-time."""
    now = now or timezone.now()
    match = _SINCE.match(text.strip())
    if match:
        return now - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    moment = parse_datetime(text)
    if moment is not None:
        return moment if timezone.is_aware(moment) else timezone.make_aware(moment, timezone.get_fixed_timezone(0))
    day = parse_date(text)
    if day is not None:
        return datetime(day.year, day.month, day.day, tzinfo=timezone.get_fixed_timezone(0))
    raise CommandError(f"--since {text!r}: use 24h, 7d, 2w, a date (2026-11-01) or an ISO date-time")


def usd(micro: int | None) -> str:
    if micro is None:
        return "-"
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), 1_000_000)
    return f"{sign}{whole}.{frac:06d}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[bool]) -> str:
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right, strict=True)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)
