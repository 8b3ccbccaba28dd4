"""Read-side queries for the Stripe export."""

from __future__ import annotations

from dataclasses import dataclass

from django.db.models import Count, Exists, OuterRef, QuerySet, Sum

from billing_export.models import ExportedUsage, ExportLine, ExportRun
from billing_export.services import Period
from ledger.models import UsageRecord

__all__ = ["UNEXPORTED", "Reconciliation", "period_reconciliation", "run_lines", "run_list", "unexported"]

#: Why ``unexported`` rows are held back from pruning (``ledger.holds``; shown by ``can analytics prune``).
UNEXPORTED = "billable and not yet exported to Stripe (run `can billing export` for their period)"


def unexported(rows: QuerySet[UsageRecord]) -> QuerySet[UsageRecord]:
    """The billable rows of ``rows`` that no export has covered yet: the export reads them raw, so
    retention must keep them (registered as a ``ledger.holds`` hold when the app is ready)."""
    return rows.filter(cost_micro__gt=0).exclude(Exists(ExportedUsage.objects.filter(usage_id=OuterRef("pk"))))


def run_list(*, period: str | None = None, limit: int = 50) -> QuerySet[ExportRun]:
    qs = ExportRun.objects.all()
    if period:
        qs = qs.filter(period=period)
    return qs[:limit]


def run_lines(run: ExportRun) -> QuerySet[ExportLine]:
    """A run's lines in CSV order."""
    return run.lines.order_by("timestamp", "customer_id", "seq", "id")


@dataclass(frozen=True)
class Reconciliation:
    ledger_rows: int
    ledger_micro: int
    exported_rows: int
    exported_micro: int
    lines_micro: int

    @property
    def pending_rows(self) -> int:
        return self.ledger_rows - self.exported_rows

    @property
    def pending_micro(self) -> int:
        return self.ledger_micro - self.exported_micro


def period_reconciliation(period: Period) -> Reconciliation:
    """Billable ledger of the period vs what export marks cover, and what the lines billed for it."""
    billable = UsageRecord.objects.filter(
        created_at__gte=period.start, created_at__lt=period.end, cost_micro__gt=0
    ).order_by()
    total = billable.aggregate(n=Count("id"), s=Sum("cost_micro"))
    marked = billable.filter(Exists(ExportedUsage.objects.filter(usage_id=OuterRef("pk"))))
    exported = marked.aggregate(n=Count("id"), s=Sum("cost_micro"))
    lines = ExportLine.objects.filter(bucket_start__gte=period.start, bucket_start__lt=period.end).aggregate(
        s=Sum("value")
    )
    return Reconciliation(
        ledger_rows=total["n"] or 0,
        ledger_micro=total["s"] or 0,
        exported_rows=exported["n"] or 0,
        exported_micro=exported["s"] or 0,
        lines_micro=lines["s"] or 0,
    )
