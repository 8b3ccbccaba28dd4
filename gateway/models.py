"""Providers, public models with their deployments and prices, and the usage ledger."""

from __future__ import annotations

from decimal import Decimal

from django.db import models
from django.db.models.functions import Now
from django.utils import timezone

from gateway.crypto import decrypt, encrypt

__all__ = [
    "DailyUsage",
    "Deployment",
    "HourlyUsage",
    "LLMModel",
    "Price",
    "Provider",
    "RollupCursor",
    "RollupHour",
    "UsageRecord",
]


class Provider(models.Model):
    class Kind(models.TextChoices):
        OPENAI = "openai", "OpenAI-compatible"
        ANTHROPIC = "anthropic", "Anthropic"
        OLLAMA = "ollama", "Ollama (native API)"
        MOCK = "mock", "Mock (offline, deterministic)"

    slug = models.SlugField(max_length=100, unique=True)
    kind = models.CharField(max_length=20, choices=Kind.choices)
    base_url = models.URLField(max_length=500, blank=True, default="")
    api_key_encrypted = models.TextField(blank=True, default="", help_text="Fernet token; never logged")
    extra_headers = models.JSONField(default=dict, blank=True)
    connect_timeout = models.FloatField(default=5.0, help_text="Seconds")
    read_timeout = models.FloatField(default=600.0, help_text="Seconds between bytes from the upstream")
    max_retries = models.PositiveSmallIntegerField(default=2)
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug

    @property
    def api_key(self) -> str:
        return decrypt(self.api_key_encrypted) if self.api_key_encrypted else ""

    @api_key.setter
    def api_key(self, value: str) -> None:
        self.api_key_encrypted = encrypt(value) if value else ""


class LLMModel(models.Model):
    """A public model name clients ask for, served by one or more deployments."""

    class Kind(models.TextChoices):
        CHAT = "chat"
        EMBEDDING = "embedding"
        COMPLETION = "completion"

    name = models.CharField(max_length=200, unique=True)
    kind = models.CharField(max_length=20, choices=Kind.choices, default=Kind.CHAT)
    aliases = models.JSONField(
        default=list, blank=True, help_text="Other names clients may use, e.g. a Claude name mapped here"
    )
    owned_by = models.CharField(max_length=100, blank=True, default="chittycan")
    context_window = models.PositiveIntegerField(default=128_000)
    max_output_tokens = models.PositiveIntegerField(
        default=16_384, help_text="Used for the worst-case budget reservation and Anthropic's max_tokens"
    )
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]
        verbose_name = "model"

    def __str__(self) -> str:
        return self.name


class Deployment(models.Model):
    """One place a public model is served: a provider and the upstream's model name."""

    model = models.ForeignKey(LLMModel, on_delete=models.CASCADE, related_name="deployments")
    provider = models.ForeignKey(Provider, on_delete=models.PROTECT, related_name="deployments")
    upstream_model = models.CharField(max_length=200)
    priority = models.PositiveSmallIntegerField(default=0, help_text="Lower goes first; higher are fallbacks")
    weight = models.PositiveIntegerField(default=1, help_text="Share among deployments of equal priority")
    is_active = models.BooleanField(default=True)

    class Meta:
        ordering = ["model", "priority", "id"]
        constraints = [
            models.UniqueConstraint(fields=["model", "provider", "upstream_model"], name="deployment_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.model} → {self.provider}:{self.upstream_model}"


class Price(models.Model):
    """USD per million tokens for a public model, from a date on."""

    model = models.ForeignKey(LLMModel, on_delete=models.CASCADE, related_name="prices")
    effective_from = models.DateTimeField(default=timezone.now)
    input_per_mtok = models.DecimalField(max_digits=12, decimal_places=6, default=Decimal(0))
    cached_input_per_mtok = models.DecimalField(
        max_digits=12, decimal_places=6, null=True, blank=True, help_text="Cache reads; empty = input price"
    )
    cache_write_per_mtok = models.DecimalField(
        max_digits=12, decimal_places=6, null=True, blank=True, help_text="Cache writes; empty = input price"
    )
    output_per_mtok = models.DecimalField(max_digits=12, decimal_places=6, default=Decimal(0))

    class Meta:
        ordering = ["model", "-effective_from"]
        constraints = [
            models.UniqueConstraint(fields=["model", "effective_from"], name="price_unique_model_date"),
        ]

    def __str__(self) -> str:
        return f"{self.model} from {self.effective_from:%Y-%m-%d}"


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
    cost_micro = models.BigIntegerField(default=0, help_text="Integer micro-USD")
    usage_source = models.CharField(max_length=20, default="upstream", help_text="upstream | estimated | cache")
    latency_ms = models.PositiveIntegerField(default=0)
    ttft_ms = models.PositiveIntegerField(null=True, blank=True)
    status = models.CharField(max_length=30, choices=Status.choices, default=Status.OK)
    http_status = models.PositiveSmallIntegerField(default=200)
    error_type = models.CharField(max_length=100, blank=True, default="")
    stream = models.BooleanField(default=False)
    cache_hit = models.BooleanField(default=False)
    end_user = models.CharField(max_length=200, blank=True, default="")
    timings = models.JSONField(default=dict, blank=True, help_text="Per-stage milliseconds")
    recorded_at = models.DateTimeField(
        db_default=Now(), editable=False, help_text="When the row reached the ledger (rollups find late rows by it)"
    )

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["tenant", "created_at"], name="usage_tenant_time"),
            models.Index(fields=["api_key", "created_at"], name="usage_key_time"),
            models.Index(fields=["recorded_at"], name="usage_recorded"),
        ]

    def __str__(self) -> str:
        return self.request_id


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


class HourlyUsage(UsageTotals):
    """Usage per UTC hour, tenant, key, model and provider; recomputed from the ledger."""

    hour = models.DateTimeField(help_text="Start of the UTC hour")

    class Meta:
        ordering = ["-hour"]
        constraints = [
            models.UniqueConstraint(
                fields=["hour", "tenant", "api_key", "model", "provider"],
                name="hourly_usage_unique",
                nulls_distinct=False,
            ),
        ]
        indexes = [models.Index(fields=["tenant", "hour"], name="hourly_usage_tenant")]

    def __str__(self) -> str:
        return f"{self.hour:%Y-%m-%d %H}:00 tenant {self.tenant_id} {self.model}"


class DailyUsage(UsageTotals):
    """Usage per calendar day in the tenant's time zone; recomputed from the hourly rollups."""

    date = models.DateField(help_text="Calendar day in the tenant's time zone")

    class Meta:
        ordering = ["-date"]
        constraints = [
            models.UniqueConstraint(
                fields=["date", "tenant", "api_key", "model", "provider"],
                name="daily_usage_unique",
                nulls_distinct=False,
            ),
        ]
        indexes = [models.Index(fields=["tenant", "date"], name="daily_usage_tenant")]

    def __str__(self) -> str:
        return f"{self.date} tenant {self.tenant_id} {self.model}"


class RollupHour(models.Model):
    """Bookkeeping per UTC hour. A sealed hour's raw rows were pruned: its rollup is the record."""

    hour = models.DateTimeField(unique=True)
    computed_at = models.DateTimeField(default=timezone.now)
    sealed = models.BooleanField(default=False)

    class Meta:
        ordering = ["-hour"]

    def __str__(self) -> str:
        return f"{self.hour:%Y-%m-%d %H}:00{' sealed' if self.sealed else ''}"


class RollupCursor(models.Model):
    """How far (by ``UsageRecord.recorded_at``) the rollup job has looked for new ledger rows."""

    name = models.CharField(max_length=50, unique=True)
    position = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.name} @ {self.position:%Y-%m-%d %H:%M:%S}"
