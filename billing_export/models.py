"""Export runs to Stripe (see billing_export/services.py and docs/billing-export.md).

An ``ExportRun`` turns not-yet-exported ledger rows (``ledger.UsageRecord`` with ``cost_micro > 0``)
into ``ExportLine`` rows, one Billing Meter event each, and marks every covered ledger row with an
``ExportedUsage`` row whose primary key is the ledger row's id. A ledger row can therefore be billed
by one line only, ever: the database refuses a second mark. Nothing here cascades on delete, so a
recorded export cannot be undone by deleting a run (which would make its rows billable again).
"""

from __future__ import annotations

from django.db import models
from django.utils import timezone

__all__ = ["ExportLine", "ExportRun", "ExportedUsage", "Granularity"]


class Granularity(models.TextChoices):
    DAY = "day"
    HOUR = "hour"
    REQUEST = "request"


class ExportRun(models.Model):
    class Status(models.TextChoices):
        RUNNING = "running"
        DONE = "done"
        FAILED = "failed"

    period = models.CharField(max_length=20, db_index=True, help_text="YYYY-MM or YYYY-MM-DD (UTC)")
    period_start = models.DateTimeField()
    period_end = models.DateTimeField(help_text="Exclusive")
    granularity = models.CharField(max_length=10, choices=Granularity.choices, default=Granularity.DAY)
    event_name = models.CharField(max_length=100)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.RUNNING)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    actor_label = models.CharField(max_length=200, blank=True, default="", help_text="cli, admin:<user>, ...")
    lines_count = models.PositiveIntegerField(default=0)
    rows_count = models.PositiveBigIntegerField(default=0, help_text="Ledger rows billed by this run")
    total_micro = models.BigIntegerField(default=0, help_text="Sum of cost_micro of those rows")
    total_value = models.BigIntegerField(default=0, help_text="Sum of payload values in the CSV")
    unmapped = models.JSONField(
        default=list, blank=True, help_text="Tenants with billable usage but no Stripe customer (not exported)"
    )
    unmapped_micro = models.BigIntegerField(default=0)
    warnings = models.JSONField(default=list, blank=True)
    error = models.TextField(blank=True, default="")
    last_push_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name = "Stripe export run"

    def __str__(self) -> str:
        return f"export #{self.pk} {self.period} ({self.status})"


class ExportLine(models.Model):
    """One Billing Meter event: a customer's cost in one time bucket (or one request)."""

    class PushStatus(models.TextChoices):
        PENDING = "pending"
        ACCEPTED = "accepted"
        FAILED = "failed"
        STALE = "stale", "stale (older than 35 days, not sent)"

    run = models.ForeignKey(ExportRun, on_delete=models.PROTECT, related_name="lines")
    identifier = models.CharField(max_length=100, unique=True)
    base_key = models.CharField(max_length=300, help_text="Customer + bucket key; seq counts deltas for it")
    seq = models.PositiveIntegerField(default=1, help_text="1 = first export of the bucket; 2+ = late rows")
    event_name = models.CharField(max_length=100)
    customer_id = models.CharField(max_length=255)
    tenant = models.ForeignKey(
        "tenants.Tenant", null=True, on_delete=models.SET_NULL, related_name="+", help_text="Tenant billed"
    )
    tenant_slug = models.CharField(max_length=100)
    granularity = models.CharField(max_length=10, choices=Granularity.choices)
    bucket_start = models.DateTimeField()
    timestamp = models.BigIntegerField(help_text="Unix seconds sent to Stripe")
    value = models.BigIntegerField(help_text="payload value (integer micro-USD)")
    cost_micro = models.BigIntegerField()
    rows_count = models.PositiveIntegerField()
    first_usage_id = models.BigIntegerField()
    last_usage_id = models.BigIntegerField()
    sources = models.JSONField(default=list, blank=True, help_text="Per source tenant: rows and cost rolled up")
    push_status = models.CharField(max_length=10, choices=PushStatus.choices, default=PushStatus.PENDING)
    push_attempts = models.PositiveIntegerField(default=0)
    pushed_at = models.DateTimeField(null=True, blank=True)
    push_error = models.TextField(blank=True, default="")

    class Meta:
        ordering = ["run", "timestamp", "customer_id", "seq", "id"]
        constraints = [
            models.UniqueConstraint(fields=["base_key", "seq"], name="exportline_unique_bucket_seq"),
            models.CheckConstraint(condition=models.Q(value__gte=0), name="exportline_value_not_negative"),
        ]
        indexes = [models.Index(fields=["push_status", "run"], name="exportline_push")]

    def __str__(self) -> str:
        return self.identifier


class ExportedUsage(models.Model):
    """Marks a ledger row as billed by one export line. The primary key is the UsageRecord id."""

    usage_id = models.BigIntegerField(primary_key=True)
    line = models.ForeignKey(ExportLine, on_delete=models.PROTECT, related_name="usage_marks")

    class Meta:
        verbose_name = "exported ledger row"

    def __str__(self) -> str:
        return f"usage {self.usage_id} -> {self.line_id}"
