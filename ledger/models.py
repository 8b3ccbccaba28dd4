"""The usage ledger: one row per request, and the hourly and daily rollups computed from it.

The tables keep the names they had when these models lived in the gateway app (``gateway_...``):
moving the models changed no data.
"""

from __future__ import annotations

from django.db import models
from django.db.models.functions import Now
from django.utils import timezone

__all__ = [
    "DailyUsage",
    "Feedback",
    "HourlyUsage",
    "ProbeRecord",
    "RollupCursor",
    "RollupHour",
    "UsageRecord",
    "UsageTotals",
]


class UsageRecord(models.Model):
    """The ledger: exactly one row per request that reached (or was served in place of) a provider.

    Tenant and key are plain ids without database constraints so the table can be range-partitioned
    by ``created_at`` (see docs/operations.md) and rows outlive deleted keys.
    """

    class Status(models.TextChoices):
        OK = "ok"
        UPSTREAM_ERROR = "upstream_error"
        CLIENT_DISCONNECTED = "client_disconnected"
        UPSTREAM_TIMEOUT = "upstream_timeout"
        ERROR = "error"

    request_id = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.DO_NOTHING, db_constraint=False, related_name="+")
    api_key = models.ForeignKey(
        "tenants.ApiKey", null=True, on_delete=models.DO_NOTHING, db_constraint=False, related_name="+"
    )
    endpoint = models.CharField(max_length=40)
    requested_model = models.CharField(max_length=200)
    served_model = models.CharField(max_length=200, blank=True, default="")
    provider = models.CharField(max_length=100, blank=True, default="")
    deployment_id = models.BigIntegerField(null=True, blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0, help_text="All input tokens, cached included")
    cached_tokens = models.PositiveIntegerField(default=0, help_text="Input tokens read from a prompt cache")
    cache_write_tokens = models.PositiveIntegerField(default=0, help_text="Input tokens written to a cache")
    completion_tokens = models.PositiveIntegerField(default=0)
    reasoning_tokens = models.PositiveIntegerField(default=0)
    # What the media routes bill per unit (docs/media.md).
    images = models.PositiveIntegerField(default=0, help_text="Images generated or edited")
    audio_ms = models.BigIntegerField(default=0, help_text="Milliseconds of audio transcribed")
    characters = models.PositiveIntegerField(default=0, help_text="Characters spoken (text to speech)")
    cost_micro = models.BigIntegerField(default=0, help_text="Integer micro-USD")
    usage_source = models.CharField(max_length=20, default="upstream", help_text="upstream | estimated | cache")
    latency_ms = models.PositiveIntegerField(default=0)
    ttft_ms = models.PositiveIntegerField(null=True, blank=True)
    status = models.CharField(max_length=30, choices=Status.choices, default=Status.OK)
    http_status = models.PositiveSmallIntegerField(default=200)
    error_type = models.CharField(max_length=100, blank=True, default="")
    stream = models.BooleanField(default=False)
    cache_hit = models.BooleanField(default=False)
    saved_micro = models.BigIntegerField(
        default=0, help_text="A cache hit: what the answer would have cost (micro-USD)"
    )
    coalesced = models.BooleanField(
        default=False, help_text="A cache hit answered by an identical in-flight request's upstream call"
    )
    end_user = models.CharField(max_length=200, blank=True, default="")
    timings = models.JSONField(default=dict, blank=True, help_text="Per-stage milliseconds")
    attempts = models.JSONField(
        default=list,
        blank=True,
        help_text="Each upstream attempt: deployment, provider, why (retry, fallback), start and ms, outcome",
    )
    route = models.JSONField(
        default=dict, blank=True, help_text="Why this model: the policy rule matched and each candidate's fate"
    )
    experiment = models.CharField(
        max_length=100, blank=True, default="", help_text="The routing experiment that assigned the request"
    )
    arm = models.CharField(max_length=50, blank=True, default="", help_text="Its arm")
    recorded_at = models.DateTimeField(
        db_default=Now(), editable=False, help_text="When the row reached the ledger (rollups find late rows by it)"
    )

    class Meta:
        db_table = "gateway_usagerecord"  # the table predates the ledger app; kept with its data
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["tenant", "created_at"], name="usage_tenant_time"),
            models.Index(fields=["api_key", "created_at"], name="usage_key_time"),
            models.Index(fields=["recorded_at"], name="usage_recorded"),
            models.Index(fields=["experiment", "arm"], condition=~models.Q(experiment=""), name="usage_experiment_arm"),
        ]

    def __str__(self) -> str:
        return self.request_id


class Feedback(models.Model):
    """An outcome a client reported for one of its requests (``POST /v1/feedback``): a score, a
    label, or both; the latest report per request counts (experiments read it per arm)."""

    request_id = models.CharField(max_length=64, unique=True)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.DO_NOTHING, db_constraint=False, related_name="+")
    api_key = models.ForeignKey(
        "tenants.ApiKey", null=True, on_delete=models.DO_NOTHING, db_constraint=False, related_name="+"
    )
    score = models.FloatField(null=True, blank=True)
    label = models.CharField(max_length=100, blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name_plural = "feedback"
        indexes = [models.Index(fields=["tenant", "created_at"], name="feedback_tenant_time")]

    def __str__(self) -> str:
        return f"{self.request_id}: {self.score if self.score is not None else self.label}"


# --- rollups ------------------------------------------------------------------------------------


class UsageTotals(models.Model):
    """The sums a rollup keeps. Averages are sums divided by counts, so buckets add up exactly."""

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.DO_NOTHING, db_constraint=False, related_name="+")
    api_key = models.ForeignKey(
        "tenants.ApiKey", null=True, on_delete=models.DO_NOTHING, db_constraint=False, related_name="+"
    )
    model = models.CharField(max_length=200, help_text="Served model (the requested name if none was served)")
    provider = models.CharField(max_length=100, blank=True, default="")
    calls = models.PositiveBigIntegerField(default=0)
    errors = models.PositiveBigIntegerField(default=0, help_text="Rows whose status is not ok")
    cache_hits = models.PositiveBigIntegerField(default=0)
    saved_micro = models.BigIntegerField(default=0, help_text="What the cache hits would have cost (micro-USD)")
    stream_calls = models.PositiveBigIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    cached_tokens = models.PositiveBigIntegerField(default=0)
    cache_write_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    reasoning_tokens = models.PositiveBigIntegerField(default=0)
    cost_micro = models.BigIntegerField(default=0, help_text="Integer micro-USD")
    latency_ms_sum = models.PositiveBigIntegerField(default=0)
    ttft_ms_sum = models.PositiveBigIntegerField(default=0)
    ttft_count = models.PositiveBigIntegerField(default=0, help_text="Calls with a time to first token")

    class Meta:
        abstract = True


def unique_per_key(bucket: str, prefix: str) -> tuple[models.UniqueConstraint, models.UniqueConstraint]:
    """One rollup row per bucket, tenant, key (or no key), model and provider.

    Two partial unique constraints rather than one with ``nulls_distinct=False``: SQLite cannot
    create that one (Django skips it there with warning models.W047), partial ones it can.
    """
    return (
        models.UniqueConstraint(
            fields=[bucket, "tenant", "api_key", "model", "provider"],
            condition=models.Q(api_key__isnull=False),
            name=f"{prefix}_unique",
        ),
        models.UniqueConstraint(
            fields=[bucket, "tenant", "model", "provider"],
            condition=models.Q(api_key__isnull=True),
            name=f"{prefix}_unique_keyless",
        ),
    )


class HourlyUsage(UsageTotals):
    """Usage per UTC hour, tenant, key, model and provider; recomputed from the ledger."""

    hour = models.DateTimeField(help_text="Start of the UTC hour")

    class Meta:
        db_table = "gateway_hourlyusage"
        ordering = ["-hour"]
        constraints = [*unique_per_key("hour", "hourly_usage")]
        indexes = [models.Index(fields=["tenant", "hour"], name="hourly_usage_tenant")]

    def __str__(self) -> str:
        return f"{self.hour:%Y-%m-%d %H}:00 tenant {self.tenant_id} {self.model}"


class DailyUsage(UsageTotals):
    """Usage per calendar day in the tenant's time zone; recomputed from the hourly rollups."""

    date = models.DateField(help_text="Calendar day in the tenant's time zone")

    class Meta:
        db_table = "gateway_dailyusage"
        ordering = ["-date"]
        constraints = [*unique_per_key("date", "daily_usage")]
        indexes = [models.Index(fields=["tenant", "date"], name="daily_usage_tenant")]

    def __str__(self) -> str:
        return f"{self.date} tenant {self.tenant_id} {self.model}"


class RollupHour(models.Model):
    """Bookkeeping per UTC hour. A sealed hour's raw rows were pruned: its rollup is the record."""

    hour = models.DateTimeField(unique=True)
    computed_at = models.DateTimeField(default=timezone.now)
    sealed = models.BooleanField(default=False)

    class Meta:
        db_table = "gateway_rolluphour"
        ordering = ["-hour"]

    def __str__(self) -> str:
        return f"{self.hour:%Y-%m-%d %H}:00{' sealed' if self.sealed else ''}"


class RollupCursor(models.Model):
    """How far (by ``UsageRecord.recorded_at``) the rollup job has looked for new ledger rows."""

    name = models.CharField(max_length=50, unique=True)
    position = models.DateTimeField()

    class Meta:
        db_table = "gateway_rollupcursor"

    def __str__(self) -> str:
        return f"{self.name} @ {self.position:%Y-%m-%d %H:%M:%S}"


class ProbeRecord(models.Model):
    """One active health probe a gateway sent to a provider (``gateway.routing.health``): what it
    cost the operator. It is nobody's usage: not in a tenant's budget, rollups or the Stripe export."""

    class Result(models.TextChoices):
        OK = "ok"
        ANSWERED = "answered", "answered (the upstream refused the probe's request but is up)"
        FAILED = "failed"

    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    provider = models.CharField(max_length=100)
    model = models.CharField(max_length=200, help_text="The public model whose deployment was probed")
    upstream_model = models.CharField(max_length=200)
    deployment_id = models.BigIntegerField(null=True, blank=True)
    trigger = models.CharField(max_length=20, help_text="interval (periodic, or can providers probe) | on demand")
    result = models.CharField(max_length=20, choices=Result.choices)
    latency_ms = models.PositiveIntegerField(default=0)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cost_micro = models.BigIntegerField(default=0, help_text="Integer micro-USD, at the model's price then")
    error = models.CharField(max_length=300, blank=True, default="")

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["provider", "created_at"], name="ledger_probe_provider_at")]

    def __str__(self) -> str:
        return f"probe {self.provider}:{self.upstream_model} {self.result} at {self.created_at:%Y-%m-%d %H:%M:%S}"
