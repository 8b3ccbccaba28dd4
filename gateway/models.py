"""Providers, and the public models with their deployments and prices.

The usage ledger and its rollups live in ``ledger.models``."""

from __future__ import annotations

from decimal import Decimal

from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.utils import timezone

from gateway.crypto import decrypt, encrypt

__all__ = [
    "Deployment",
    "LLMModel",
    "Price",
    "Provider",
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
    # Per-hop limits (docs/resilience.md); a route's deployment may set its own (HopTimeouts).
    first_byte_timeout = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(0.01)],
        help_text="Seconds until the upstream's first byte (a stream: its first event); empty: the read timeout",
    )
    total_timeout = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(0.01)],
        help_text="Seconds for a whole attempt (a stream cut later ends with an error event); empty: no limit",
    )
    max_retries = models.PositiveSmallIntegerField(default=2)
    # The circuit breaker of each of its deployments (gateway.routing.breaker, docs/resilience.md).
    breaker_failures = models.PositiveSmallIntegerField(
        default=5, validators=[MinValueValidator(1)], help_text="Consecutive failures that open the breaker"
    )
    breaker_error_rate = models.FloatField(
        default=0.5,
        validators=[MinValueValidator(0.01), MaxValueValidator(1.0)],
        help_text="Or this share of failed requests (0.01 to 1) ...",
    )
    breaker_min_requests = models.PositiveIntegerField(
        default=20, validators=[MinValueValidator(1)], help_text="... among at least this many requests ..."
    )
    breaker_window = models.FloatField(
        default=30.0,
        validators=[MinValueValidator(1.0), MaxValueValidator(3600.0)],
        help_text="... in this many seconds (per gateway process)",
    )
    breaker_cooldown = models.FloatField(
        default=30.0,
        validators=[MinValueValidator(0.1), MaxValueValidator(3600.0)],
        help_text="Seconds an open breaker skips the deployment before one probe request",
    )
    # Active health probes (gateway.routing.health): a cheap request per deployment, by Celery beat.
    probe_enabled = models.BooleanField(
        default=False, help_text="Send each deployment a cheap probe request every interval (it costs a few tokens)"
    )
    probe_interval = models.FloatField(
        default=30.0,
        validators=[MinValueValidator(1.0), MaxValueValidator(86_400.0)],
        help_text="Seconds between probes of each deployment",
    )
    probe_request = models.JSONField(
        default=dict,
        blank=True,
        help_text='An OpenAI chat body (model set per deployment); empty: one "ping" message, max_tokens 1',
    )
    # Passive outlier detection from live traffic (gateway.routing.health).
    outlier_latency_factor = models.FloatField(
        default=0.0,
        validators=[MinValueValidator(0.0), MaxValueValidator(1000.0)],
        help_text="Eject a deployment whose average latency exceeds this many times its fastest sibling's (0: off)",
    )
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


DEFAULT_CACHE_TTL = 86_400  # seconds: the response cache's default TTL (24 h)


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
    cache_enabled = models.BooleanField(
        default=False, help_text="Serve identical requests from the exact response cache (per tenant)"
    )
    cache_ttl = models.PositiveIntegerField(
        default=DEFAULT_CACHE_TTL,
        validators=[MinValueValidator(1)],
        help_text="Seconds a cached answer is served (default 24 h)",
    )
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
