"""Providers, and the public models with their deployments and prices.

The usage ledger and its rollups live in ``ledger.models``."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.utils import timezone

from gateway.crypto import decrypt, encrypt
from gateway.routing.experiments import STATUSES, ExperimentError, parse_arms
from gateway.routing.policy import PolicyError, parse_chain, parse_rule

__all__ = [
    "Deployment",
    "Experiment",
    "LLMModel",
    "Price",
    "Provider",
    "SemanticVector",
    "StoredResponse",
    "RoutingPolicy",
    "RoutingRule",
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
    responses_api = models.BooleanField(
        default=False,
        help_text="The upstream serves the Responses API (/v1/responses) itself: OpenAI does, most "
        "OpenAI-compatible servers do not. Off: /v1/responses is translated to chat completions.",
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
DEFAULT_SEMANTIC_THRESHOLD = 0.95  # cosine similarity a semantic cache hit needs by default


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
    # The semantic cache (gateway.cache.semantic, docs/caching.md): needs the exact cache on.
    semantic_cache_enabled = models.BooleanField(
        default=False, help_text="Also serve a cached answer to a similar prompt (needs the response cache on)"
    )
    semantic_threshold = models.FloatField(
        default=DEFAULT_SEMANTIC_THRESHOLD,
        validators=[MinValueValidator(0.5), MaxValueValidator(1.0)],
        help_text="Cosine similarity (0.5 to 1) a cached prompt must reach to be served",
    )
    semantic_embedding_model = models.CharField(
        max_length=200,
        blank=True,
        default="",
        help_text="The public name of the catalogue's embedding model that embeds the prompts (metered)",
    )
    strategy = models.CharField(
        max_length=20,
        choices=[
            ("priority", "priority (weighted among equals)"),
            ("weighted", "weighted, priorities ignored"),
            ("lowest_latency", "lowest latency (decaying average)"),
            ("lowest_cost", "lowest cost for the request"),
            ("least_in_flight", "least requests in flight (shared)"),
        ],
        default="priority",
        help_text="The order its deployments are tried in (docs/routing.md)",
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


class SemanticVector(models.Model):
    """The embedded prompt of one cached answer (the semantic cache, ``gateway.cache.semantic``).

    Searched among the rows of one tenant, public model and ``params_digest`` (every field of the
    exact cache key but the prompt's text); ``cache_digest`` names the exact cache entry a hit
    replays. ``vector`` is the unit-normalised embedding, little-endian float32.
    """

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="+")
    model = models.CharField(max_length=200, help_text="The public model name")
    params_digest = models.CharField(max_length=64)
    cache_digest = models.CharField(max_length=64)
    dims = models.PositiveIntegerField()
    vector = models.BinaryField()
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()

    class Meta:
        indexes = [
            models.Index(fields=["tenant", "model", "params_digest", "-created_at"], name="semanticvector_search"),
            models.Index(fields=["expires_at"], name="semanticvector_expiry"),
        ]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "model", "cache_digest"], name="semanticvector_unique_entry"),
        ]

    def __str__(self) -> str:
        return f"{self.model} {self.cache_digest[:12]}"


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


class RoutingPolicy(models.Model):
    """Ordered routing rules (CEL conditions), global or a tenant's, or a library rule set to include.

    A tenant sees its own policy, then each ancestor's, then the global one: the first matching
    rule wins, so a child overrides its parent. See docs/routing.md.
    """

    name = models.SlugField(max_length=100, unique=True)
    tenant = models.ForeignKey(
        "tenants.Tenant",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="routing_policies",
        help_text="Empty: the global policy (or a library rule set)",
    )
    is_library = models.BooleanField(
        default=False, help_text="A named rule set used only through a rule's `include`, attached to nothing"
    )
    description = models.CharField(max_length=300, blank=True, default="")
    fallback_chain = models.JSONField(
        default=list,
        blank=True,
        help_text='Hops tried after the routed target, e.g. ["groq/llama-3-70b (timeout: 2s)", '
        '{"route": "gpt-4", "timeouts": {"connect": 1, "first_byte": 5, "total": 10}}]',
    )
    is_active = models.BooleanField(default=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "routing policy"
        verbose_name_plural = "routing policies"
        constraints = [
            models.UniqueConstraint(
                fields=["tenant"], condition=models.Q(is_library=False), name="routing_policy_one_per_tenant"
            ),
            models.UniqueConstraint(
                fields=["is_library"],
                condition=models.Q(tenant__isnull=True, is_library=False),
                name="routing_policy_one_global",
            ),
        ]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        if self.is_library and self.tenant_id is not None:
            raise ValidationError({"tenant": "A library rule set is attached to nothing."})
        try:
            parse_chain(self.fallback_chain, field_name="fallback_chain")
        except PolicyError as err:
            raise ValidationError({"fallback_chain": err.message}) from None


class RoutingRule(models.Model):
    """One rule: a CEL condition and what to do when it holds (compiled on save)."""

    policy = models.ForeignKey(RoutingPolicy, on_delete=models.CASCADE, related_name="rules")
    position = models.PositiveIntegerField(default=0, help_text="Rules are tried lowest first")
    name = models.CharField(max_length=100)
    condition = models.TextField(
        blank=True, default="", help_text="CEL, e.g. tokens < 100 && !has_tools; empty: always"
    )
    route = models.JSONField(
        default=list, blank=True, help_text="Model names or provider/upstream-model deployments, in order"
    )
    split = models.JSONField(default=list, blank=True, help_text='Weighted split: [{"route": "m", "weight": 80}, ...]')
    reject = models.CharField(max_length=500, blank=True, default="", help_text="Refuse with this message (403)")
    fallback = models.JSONField(null=True, blank=True, help_text="This rule's fallback chain; empty: the policy's")
    timeouts = models.JSONField(
        default=dict, blank=True, help_text='Seconds: {"connect": 1, "first_byte": 5, "total": 30}'
    )
    retries = models.PositiveSmallIntegerField(null=True, blank=True, help_text="Empty: the provider's setting")
    tags = models.JSONField(default=list, blank=True, help_text="Tags added to the request")
    include = models.CharField(max_length=100, blank=True, default="", help_text="Name of a rule set to try here")

    class Meta:
        ordering = ["policy", "position", "id"]
        constraints = [
            models.UniqueConstraint(fields=["policy", "name"], name="routing_rule_unique_name"),
        ]

    def __str__(self) -> str:
        return f"{self.policy}: {self.name}"

    def as_config(self) -> dict[str, Any]:
        """The rule as the configuration file writes it (empty fields left out)."""
        data: dict[str, Any] = {"name": self.name}
        if self.condition:
            data["condition"] = self.condition
        for field_name in ("route", "split", "reject", "timeouts", "tags", "include"):
            value = getattr(self, field_name)
            if value:
                data[field_name] = value[0] if field_name == "route" and len(value) == 1 else value
        if self.fallback is not None:
            data["fallback"] = self.fallback
        if self.retries is not None:
            data["retries"] = self.retries
        return data

    def clean(self) -> None:
        try:
            parse_rule(self.as_config(), self.position)
        except PolicyError as err:
            field_name = err.field if err.field in {f.name for f in self._meta.fields} else "__all__"
            raise ValidationError({field_name: err.message}) from None


class Experiment(models.Model):
    """A routing experiment (A/B test): arms with targets and weights, on a public model or a policy
    rule; its results come from the ledger (``can experiments show``). See docs/routing.md."""

    class Status(models.TextChoices):
        DRAFT = "draft"
        RUNNING = "running"
        PAUSED = "paused"
        PROMOTED = "promoted"

    class Metric(models.TextChoices):
        SCORE = "score", "feedback score (higher wins)"
        LATENCY = "latency", "latency (lower wins)"
        COST = "cost", "cost per request (lower wins)"
        ERROR_RATE = "error_rate", "error rate (lower wins)"

    slug = models.SlugField(max_length=100, unique=True, help_text="The id in X-ChittyCan-Experiment")
    tenant = models.ForeignKey(
        "tenants.Tenant",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="experiments",
        help_text="Empty: every tenant; else this tenant and the tenants below it",
    )
    model = models.CharField(
        max_length=200, blank=True, default="", help_text="The public model (as the client asks for it) it applies to"
    )
    rule = models.CharField(
        max_length=200,
        blank=True,
        default="",
        help_text="Or the routing policy rule it applies to (policy:rule, or the rule's name)",
    )
    arms = models.JSONField(
        default=list, help_text='[{"name": "control", "route": "gpt-4o", "weight": 50}, {"name": "b", ...}]'
    )
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.RUNNING)
    description = models.CharField(max_length=300, blank=True, default="")
    auto_promote = models.BooleanField(
        default=False, help_text="Promote a winner once every arm has the samples and the difference is significant"
    )
    metric = models.CharField(
        max_length=20, choices=Metric.choices, default=Metric.SCORE, help_text="What auto-promotion compares"
    )
    min_samples = models.PositiveIntegerField(default=100, help_text="Requests (or scores) per arm before promoting")
    significance = models.FloatField(
        default=0.05,
        validators=[MinValueValidator(0.0001), MaxValueValidator(0.5)],
        help_text="The significance level alpha (0.05: 95 % confidence)",
    )
    winner = models.CharField(max_length=50, blank=True, default="", help_text="The promoted arm")
    promoted_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["slug"]
        constraints = [
            models.CheckConstraint(condition=~models.Q(model="") | ~models.Q(rule=""), name="experiment_model_or_rule"),
        ]

    def __str__(self) -> str:
        return self.slug

    def clean(self) -> None:
        if bool(self.model) == bool(self.rule):
            raise ValidationError({"model": "Give the public model or the policy rule it applies to (one of them)."})
        try:
            arms = parse_arms(self.arms)
        except ExperimentError as err:
            raise ValidationError({"arms": err.message}) from None
        if self.status not in STATUSES:
            raise ValidationError({"status": f"one of {', '.join(STATUSES)}"})
        if self.winner and self.winner not in {a.name for a in arms}:
            raise ValidationError({"winner": f"no arm named {self.winner!r}"})
        if self.status == self.Status.PROMOTED and not self.winner:
            raise ValidationError({"winner": "A promoted experiment names its winning arm."})
