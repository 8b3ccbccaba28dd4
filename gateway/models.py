"""Providers, and the public models with their deployments and prices.

The usage ledger and its rollups live in ``ledger.models``."""

from __future__ import annotations

from decimal import Decimal

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.utils import timezone

from gateway.crypto import decrypt, encrypt

__all__ = [
    "Deployment",
    "LLMModel",
    "Price",
    "Provider",
    "StoredResponse",
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
    responses_api = models.BooleanField(
        default=False,
        help_text="The upstream serves the Responses API (/v1/responses) itself: OpenAI does, most "
        "OpenAI-compatible servers do not. Off: /v1/responses is translated to chat completions.",
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
        IMAGE = "image"  # /v1/images/generations and /v1/images/edits
        TRANSCRIPTION = "transcription"  # /v1/audio/transcriptions
        SPEECH = "speech"  # /v1/audio/speech
        MODERATION = "moderation"  # /v1/moderations

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
    # Prices per unit, for the media routes (docs/media.md).
    per_image = models.DecimalField(
        max_digits=12, decimal_places=6, default=Decimal(0), help_text="USD per image when no size entry matches"
    )
    image_prices = models.JSONField(
        default=dict,
        blank=True,
        help_text='USD per image by "size" or "size/quality", e.g. {"1024x1024": "0.04", "1024x1024/hd": "0.08"}',
    )
    audio_per_minute = models.DecimalField(
        max_digits=12, decimal_places=6, default=Decimal(0), help_text="USD per minute of audio transcribed"
    )
    per_mchars = models.DecimalField(
        max_digits=12, decimal_places=6, default=Decimal(0), help_text="USD per million characters spoken (TTS)"
    )

    class Meta:
        ordering = ["model", "-effective_from"]
        constraints = [
            models.UniqueConstraint(fields=["model", "effective_from"], name="price_unique_model_date"),
        ]

    def __str__(self) -> str:
        return f"{self.model} from {self.effective_from:%Y-%m-%d}"

    def clean(self) -> None:
        check_image_prices(self.image_prices)


def check_image_prices(value: object) -> None:
    """``image_prices``: an object of ``size`` or ``size/quality`` to a non-negative USD amount."""
    if not isinstance(value, dict):
        raise ValidationError({"image_prices": 'must be an object such as {"1024x1024": "0.04"}'})
    for key, amount in value.items():
        try:
            ok = isinstance(amount, (str, int, float)) and Decimal(str(amount)) >= 0
        except ArithmeticError:
            ok = False
        if not key or not ok:
            raise ValidationError({"image_prices": f"{key!r}: must map a size to a USD amount of 0 or more"})


class StoredResponse(models.Model):
    """A Responses API answer the gateway keeps for its tenant (``store`` true, the default), so
    ``GET /v1/responses/{id}`` and ``previous_response_id`` work whatever served it (docs/responses.md).

    ``input_items`` is everything the model was given as input: the earlier turns of the
    conversation (``previous_response_id``'s input and output) followed by this request's own
    items, so the next turn needs one row, not a walk up the chain. Rows past ``expires_at``
    (``CHITTYCAN_RESPONSES_RETENTION_DAYS``) are pruned by the retention task.
    """

    id = models.CharField(primary_key=True, max_length=64)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="+")
    model = models.CharField(max_length=200)
    previous_response_id = models.CharField(max_length=64, blank=True, default="")
    instructions = models.TextField(blank=True, default="")
    input_items = models.JSONField(default=list)
    response = models.JSONField(help_text="The response object as the client received it")
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(db_index=True)

    class Meta:
        indexes = [models.Index(fields=["tenant", "created_at"], name="storedresponse_tenant_created")]

    def __str__(self) -> str:
        return self.id
