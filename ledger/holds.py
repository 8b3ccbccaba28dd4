"""Holds on raw ledger rows: rows that retention must not prune (nor fold into a sealed hour's
rollup) because something still reads them raw.

``ledger`` sits below the apps that read its rows, so they register their holds here when their
app is ready; ``billing_export`` holds every billable row not yet exported to Stripe. A hold is a
reason and a function that narrows a set of ledger rows to those it holds.
"""

from __future__ import annotations

from collections.abc import Callable

from django.db.models import QuerySet

from ledger.models import UsageRecord

__all__ = ["Hold", "held", "hold_rows", "holds", "unheld"]

Hold = Callable[[QuerySet[UsageRecord]], QuerySet[UsageRecord]]

_holds: dict[str, Hold] = {}


def hold_rows(reason: str, rows_held: Hold) -> None:
    """Register a hold: ``rows_held(rows)`` returns the rows of ``rows`` that must stay raw,
    ``reason`` says why (shown by ``can analytics prune``). Registering a reason again replaces it."""
    _holds[reason] = rows_held


def holds() -> dict[str, Hold]:
    return dict(_holds)


def held(rows: QuerySet[UsageRecord]) -> dict[str, int]:
    """How many of ``rows`` each hold keeps (reasons holding none are left out)."""
    counts = {reason: hold(rows).count() for reason, hold in _holds.items()}
    return {reason: n for reason, n in counts.items() if n}


def unheld(rows: QuerySet[UsageRecord]) -> QuerySet[UsageRecord]:
    """The rows of ``rows`` that no hold keeps."""
    for hold in _holds.values():
        rows = rows.exclude(pk__in=hold(rows).values("pk"))
    return rows
