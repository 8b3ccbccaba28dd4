"""The configuration file's schema: typed, strict specs of providers, models (deployments, prices),
plans and tenants (budgets, the cache settings of their existing keys), and the checks a schema
cannot express (uniqueness, references between objects, the tenant tree). The format is in
docs/config.md.

Money is a quoted decimal string (``"2.50"``); secrets are ``${ENV_VAR}`` references, never
literals (they are read from the environment at apply time).
"""

from __future__ import annotations

import re
import zoneinfo
from collections.abc import Iterator
from datetime import UTC, date, datetime, time
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.validators import URLValidator, validate_email, validate_slug
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from gateway.routing.experiments import ExperimentError, parse_arms
from gateway.routing.policy import PolicyError, check_includes, parse_policy

__all__ = [
    "MICRO",
    "SECRET_REF",
    "VERSION",
    "BudgetSpec",
    "ConfigError",
    "DeploymentSpec",
    "Document",
    "KeyCacheSpec",
    "KeySpec",
    "ModelSpec",
    "Path",
    "PlanSpec",
    "PriceSpec",
    "ProviderSpec",
    "RoutingPolicySpec",
    "TenantSpec",
    "check_references",
    "format_path",
]

VERSION = 1
MICRO = Decimal(1_000_000)
SECRET_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")


class ConfigError(Exception):
    """The file is invalid (or cannot be applied); ``errors`` holds one message per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


# --- field types ---------------------------------------------------------------------------------


def _decimal_string(value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise PydanticCustomError("decimal_string", 'must be a decimal string such as "2.50" (quote it)')
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation:
        raise PydanticCustomError("decimal_string", 'must be a decimal string such as "2.50"') from None
    if not number.is_finite():
        raise PydanticCustomError("decimal_string", "must be a finite decimal")
    if number < 0:
        raise PydanticCustomError("decimal_string", "must not be negative")
    if number.as_tuple().exponent < -6:  # type: ignore[operator]
        raise PydanticCustomError("decimal_string", "has more than 6 decimal places (the unit is 1 micro-USD)")
    if number >= Decimal(10) ** 6:
        raise PydanticCustomError("decimal_string", "is too large (at most 999999.999999)")
    return number


def _limit_usd(value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise PydanticCustomError("decimal_string", 'must be a decimal string such as "500.00" (quote it)')
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation:
        raise PydanticCustomError("decimal_string", 'must be a decimal string such as "500.00"') from None
    if not number.is_finite() or number < 0:
        raise PydanticCustomError("decimal_string", "must be a non-negative decimal")
    if number.as_tuple().exponent < -6:  # type: ignore[operator]
        raise PydanticCustomError("decimal_string", "has more than 6 decimal places (the unit is 1 micro-USD)")
    if number * MICRO > 2**63 - 1:
        raise PydanticCustomError("decimal_string", "is too large")
    return number


def _effective_from(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime.combine(value, time.min, tzinfo=UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            pass
        else:
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    raise PydanticCustomError(
        "date", "must be a date (2025-01-01) or an ISO date-time (2025-01-01T00:00:00Z), read as UTC"
    )


def _slug(value: Any) -> str:
    if not isinstance(value, str):
        raise PydanticCustomError("slug", "must be a string")
    try:
        validate_slug(value)
    except DjangoValidationError:
        raise PydanticCustomError("slug", "must be a slug: letters, digits, '-' and '_' only") from None
    if len(value) > 100:
        raise PydanticCustomError("slug", "is longer than 100 characters")
    return value


def _secret_ref(value: Any) -> str:
    if not isinstance(value, str) or not SECRET_REF.match(value):
        raise PydanticCustomError(
            "secret_ref",
            "must be an environment reference such as ${OPENAI_API_KEY}: secrets are never written in the file",
        )
    return value


def _time_zone(value: Any) -> str:
    if not isinstance(value, str) or value not in zoneinfo.available_timezones():
        raise PydanticCustomError("time_zone", "must be an IANA time zone such as Europe/Berlin")
    return value


def _url(value: Any) -> str:
    if not isinstance(value, str):
        raise PydanticCustomError("url", "must be a string")
    if value:
        try:
            URLValidator()(value)
        except DjangoValidationError:
            raise PydanticCustomError("url", "must be an http(s) URL") from None
    return value


def _email(value: Any) -> str:
    if not isinstance(value, str):
        raise PydanticCustomError("email", "must be a string")
    try:
        validate_email(value)
    except DjangoValidationError:
        raise PydanticCustomError("email", "must be an email address") from None
    return value


DecimalString = Annotated[Decimal, BeforeValidator(_decimal_string)]
LimitUSD = Annotated[Decimal, BeforeValidator(_limit_usd)]
EffectiveFrom = Annotated[datetime, BeforeValidator(_effective_from)]
Slug = Annotated[str, BeforeValidator(_slug)]
SecretRef = Annotated[str, BeforeValidator(_secret_ref)]
TimeZone = Annotated[str, BeforeValidator(_time_zone)]
Url = Annotated[str, BeforeValidator(_url)]
Email = Annotated[str, BeforeValidator(_email)]
PositiveInt = Annotated[int, Field(gt=0)]
Name = Annotated[str, Field(min_length=1, max_length=200)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class BreakerSpec(_Spec):
    """``breaker:`` on a provider: when each of its deployments' circuit breaker opens (docs/resilience.md)."""

    failures: Annotated[int, Field(ge=1, le=10_000)] = 5
    error_rate: Annotated[float, Field(ge=0.01, le=1.0)] = 0.5
    min_requests: Annotated[int, Field(ge=1)] = 20
    window: Annotated[float, Field(ge=1, le=3600)] = 30.0
    cooldown: Annotated[float, Field(ge=0.1, le=3600)] = 30.0


class ProbeSpec(_Spec):
    """``probe:`` on a provider: active health probes of each of its deployments (docs/resilience.md)."""

    enabled: bool = True
    interval: Annotated[float, Field(ge=1, le=86_400)] = 30.0
    request: dict[str, Any] = {}  # an OpenAI chat body (model set per deployment); empty: one "ping", max_tokens 1


class ProviderSpec(_Spec):
    slug: Slug
    kind: Literal["openai", "anthropic", "ollama", "mock"]
    base_url: Url = ""
    api_key: SecretRef | None = None
    extra_headers: dict[str, str] = {}
    connect_timeout: Annotated[float, Field(gt=0)] = 5.0
    read_timeout: Annotated[float, Field(gt=0)] = 600.0
    first_byte_timeout: Annotated[float, Field(ge=0.01)] | None = None
    total_timeout: Annotated[float, Field(ge=0.01)] | None = None
    max_retries: Annotated[int, Field(ge=0, le=20)] = 2
    responses_api: bool = False  # the upstream serves /v1/responses itself (else translated to chat)
    breaker: BreakerSpec = BreakerSpec()
    probe: ProbeSpec = ProbeSpec(enabled=False)
    outlier_latency_factor: Annotated[float, Field(ge=0, le=1000)] = 0.0
    active: bool = True


class DeploymentSpec(_Spec):
    provider: Slug
    upstream_model: Name
    priority: Annotated[int, Field(ge=0, le=32767)] = 0
    weight: Annotated[int, Field(ge=0)] = 1
    active: bool = True


class PriceSpec(_Spec):
    effective_from: EffectiveFrom
    input: DecimalString = Decimal(0)
    cached_input: DecimalString | None = None
    cache_write: DecimalString | None = None
    output: DecimalString = Decimal(0)
    # Per unit (docs/media.md): USD per image (default, and by "size" or "size/quality"), per
    # minute of audio transcribed, per million characters spoken.
    per_image: DecimalString = Decimal(0)
    image_prices: dict[Annotated[str, Field(min_length=1, max_length=40)], DecimalString] = {}
    audio_per_minute: DecimalString = Decimal(0)
    per_mchars: DecimalString = Decimal(0)


class CacheSpec(_Spec):
    """``cache: {ttl: 3600}`` on a model: identical requests answered from the cache for ``ttl`` s."""

    enabled: bool = True
    ttl: Annotated[int, Field(ge=1)] = 86_400


class SemanticCacheSpec(_Spec):
    """``semantic_cache: {embedding_model: text-embedding-3-small, threshold: 0.95}`` on a model:
    a cached answer also serves a prompt this similar (cosine); needs ``cache`` on the model."""

    enabled: bool = True
    embedding_model: Name
    threshold: Annotated[float, Field(ge=0.5, le=1.0)] = 0.95


class ModelSpec(_Spec):
    name: Name
    kind: Literal["chat", "embedding", "completion", "image", "transcription", "speech", "moderation"] = "chat"
    aliases: list[Name] = []
    owned_by: Annotated[str, Field(max_length=100)] = "chittycan"
    context_window: Annotated[int, Field(ge=0)] = 128_000
    max_output_tokens: Annotated[int, Field(ge=0)] = 16_384
    active: bool = True
    cache: CacheSpec | None = None  # the exact response cache; absent: off
    semantic_cache: SemanticCacheSpec | None = None  # the semantic cache; absent: off
    strategy: Literal["priority", "weighted", "lowest_latency", "lowest_cost", "least_in_flight"] = "priority"
    deployments: list[DeploymentSpec] = []
    prices: list[PriceSpec] = []


class PlanSpec(_Spec):
    slug: Slug
    name: Name | None = None
    monthly_request_quota: PositiveInt | None = None
    rpm: PositiveInt | None = None
    tpm: PositiveInt | None = None


class BudgetSpec(_Spec):
    period: Literal["day", "month", "total"] = "month"
    limit_usd: LimitUSD
    hard: bool = True
    thresholds: list[Annotated[int, Field(gt=0, le=1000)]] = [50, 80, 100]
    emails: list[Email] = []
    webhook: Url = ""
    webhook_secret: SecretRef | None = None


class TenantCacheSpec(_Spec):
    """``cache: {enabled: true, scope: key}`` on a tenant: the response cache for every model of its
    subtree (``enabled``; absent: as each model says) and whose entries its keys share (``scope``:
    ``tenant``, the default; ``key``, each key its own; ``tree``, the whole tenant tree's;
    ``global``, every tenant that says global)."""

    enabled: bool | None = None
    scope: Literal["tenant", "key", "tree", "global"] = "tenant"


class KeyCacheSpec(_Spec):
    """``cache: {enabled: false}`` or ``cache: {scope: own}`` on a key: the response cache for this
    key's requests (``enabled``; absent: as its tenant and the model say) and whose entries it
    reads and writes (``scope``: ``tenant``, as its tenant's ``cache.scope`` says, the default;
    ``own``, the key's own entries, shared with no other key)."""

    enabled: bool | None = None
    scope: Literal["tenant", "own"] = "tenant"


class KeySpec(_Spec):
    """An existing key of the tenant, by its name (``can keys create --name``): the file sets its
    settings, never creates it (a key's secret is not configuration)."""

    name: Name
    cache: KeyCacheSpec | None = None


class TenantSpec(_Spec):
    slug: Slug
    name: Name | None = None
    kind: Literal["organisation", "team", "project"] | None = None
    parent: Slug | None = None
    plan: Slug | None = None
    time_zone: TimeZone = "UTC"
    stripe_customer: Annotated[str, Field(max_length=255)] = ""
    rpm: PositiveInt | None = None
    tpm: PositiveInt | None = None
    allowed_models: list[Name] = []
    active: bool = True
    require_otp: bool = False  # dashboard users of this tenant and its subtree need a TOTP second factor
    cache: TenantCacheSpec | None = None
    budgets: list[BudgetSpec] = []
    keys: list[KeySpec] = []  # settings of the tenant's existing keys, by name


class RoutingPolicySpec(_Spec):
    """A routing policy (docs/routing.md): rules with CEL conditions, compiled when the file is read."""

    name: Slug
    tenant: Slug | None = None  # absent: the global policy (or a library rule set)
    library: bool = False  # a rule set used only through `include`
    description: Annotated[str, Field(max_length=300)] = ""
    active: bool = True
    rules: list[dict[str, Any]] = []
    fallback_chain: list[Any] = []

    @model_validator(mode="after")
    def _compiles(self) -> RoutingPolicySpec:
        if self.library and self.tenant is not None:
            raise PydanticCustomError("routing_policy", "a library rule set is attached to no tenant")
        try:
            parse_policy(self.name, self.rules, self.fallback_chain, library=self.library)
        except PolicyError as err:
            raise PydanticCustomError("routing_policy", "{error}", {"error": str(err)}) from None
        return self


class AutoPromoteSpec(_Spec):
    """Promote the best arm once every arm has ``min_samples`` and the difference is significant."""

    metric: Literal["score", "latency", "cost", "error_rate"] = "score"
    min_samples: Annotated[int, Field(ge=2)] = 100
    significance: Annotated[float, Field(gt=0, le=0.5)] = 0.05


class ExperimentSpec(_Spec):
    """A routing experiment (docs/routing.md, Experiments): arms with targets and weights."""

    id: Slug
    tenant: Slug | None = None  # absent: every tenant
    model: Name | None = None  # the public model it applies to ...
    rule: Annotated[str, Field(min_length=1, max_length=200)] | None = None  # ... or a policy rule
    arms: list[dict[str, Any]]
    status: Literal["draft", "running", "paused", "promoted"] = "running"
    description: Annotated[str, Field(max_length=300)] = ""
    auto_promote: AutoPromoteSpec | None = None
    winner: Annotated[str, Field(max_length=50)] = ""

    @model_validator(mode="after")
    def _valid(self) -> ExperimentSpec:
        if (self.model is None) == (self.rule is None):
            raise PydanticCustomError("experiment", "give `model` or `rule` (one of them)")
        try:
            arms = parse_arms(self.arms)
        except ExperimentError as err:
            raise PydanticCustomError("experiment", "{error}", {"error": err.message}) from None
        if self.winner and self.winner not in {a.name for a in arms}:
            raise PydanticCustomError("experiment", "winner: no arm named {arm}", {"arm": self.winner})
        if self.status == "promoted" and not self.winner:
            raise PydanticCustomError("experiment", "a promoted experiment names its `winner`")
        return self


class Document(_Spec):
    version: Literal[1] = 1
    providers: list[ProviderSpec] = []
    models: list[ModelSpec] = []
    plans: list[PlanSpec] = []
    tenants: list[TenantSpec] = []
    routing_policies: list[RoutingPolicySpec] = []
    experiments: list[ExperimentSpec] = []


# --- checks beyond types ---------------------------------------------------------------------------

# Where a value sits in the document: ("models", 2, "prices", 0, "input").
Path = tuple[str | int, ...]


def format_path(path: Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _dupes(items: list[Any], key: str, where: Path, what: str) -> Iterator[tuple[Path, str]]:
    seen: dict[Any, int] = {}
    for i, item in enumerate(items):
        value = getattr(item, key)
        if value in seen:
            yield (*where, i, key), f"duplicate {what} {value!s} (also at {format_path((*where, seen[value]))})"
        else:
            seen[value] = i


def _budget_dupes(budgets: list[BudgetSpec], where: Path) -> Iterator[tuple[Path, str]]:
    """One hard budget per period; soft ones (alert levels) at distinct limits."""
    seen: dict[tuple[str, Decimal | None], int] = {}
    for i, budget in enumerate(budgets):
        ident = (budget.period, None if budget.hard else budget.limit_usd)
        if ident in seen:
            what = (
                f"a second hard {budget.period} budget"
                if budget.hard
                else f"a second soft {budget.period} budget at {budget.limit_usd}"
            )
            yield (*where, i), f"{what} (also at {format_path((*where, seen[ident]))})"
        else:
            seen[ident] = i


def _semantic_problems(doc: Document, i: int, model: ModelSpec) -> list[tuple[Path, str]]:
    """A semantic cache needs the model's exact cache and an embedding model of the file."""
    semantic = model.semantic_cache
    if semantic is None or not semantic.enabled:
        return []
    path: Path = ("models", i, "semantic_cache")
    problems: list[tuple[Path, str]] = []
    if model.cache is None or not model.cache.enabled:
        problems.append((path, "needs the model's cache on (a semantic hit replays a cached answer)"))
    kinds = {m.name: m.kind for m in doc.models}
    kind = kinds.get(semantic.embedding_model)
    if kind is None:
        problems.append(((*path, "embedding_model"), f"no model {semantic.embedding_model} in models"))
    elif kind != "embedding":
        problems.append(
            ((*path, "embedding_model"), f"{semantic.embedding_model} is a {kind} model, not an embedding one")
        )
    return problems


def check_references(doc: Document) -> list[tuple[Path, str]]:
    """What a schema cannot say: uniqueness, references between objects, the tenant tree."""
    problems: list[tuple[Path, str]] = []
    problems += _dupes(doc.providers, "slug", ("providers",), "provider")
    problems += _dupes(doc.models, "name", ("models",), "model")
    problems += _dupes(doc.plans, "slug", ("plans",), "plan")
    problems += _dupes(doc.tenants, "slug", ("tenants",), "tenant")
    provider_slugs = {p.slug for p in doc.providers}
    plan_slugs = {p.slug for p in doc.plans}
    names: dict[str, Path] = {}
    for i, model in enumerate(doc.models):
        names.setdefault(model.name, ("models", i, "name"))
    for i, model in enumerate(doc.models):
        for j, alias in enumerate(model.aliases):
            path: Path = ("models", i, "aliases", j)
            other = names.get(alias)
            if other is not None and other != ("models", i, "name"):
                problems.append((path, f"{alias} is already the name or an alias of {format_path(other[:2])}"))
            names.setdefault(alias, path)
        seen_deployments: dict[tuple[str, str], int] = {}
        for j, dep in enumerate(model.deployments):
            path = ("models", i, "deployments", j)
            if dep.provider not in provider_slugs:
                problems.append(((*path, "provider"), f"no provider {dep.provider} in providers"))
            ident = (dep.provider, dep.upstream_model)
            if ident in seen_deployments:
                problems.append((path, f"duplicate deployment {dep.provider}:{dep.upstream_model}"))
            seen_deployments.setdefault(ident, j)
        problems += _dupes(model.prices, "effective_from", ("models", i, "prices"), "price date")
        problems += _semantic_problems(doc, i, model)
    tenant_slugs = {t.slug for t in doc.tenants}
    parents = {t.slug: t.parent for t in doc.tenants}
    for i, tenant in enumerate(doc.tenants):
        path = ("tenants", i)
        if tenant.parent is not None:
            if tenant.parent not in tenant_slugs:
                problems.append(((*path, "parent"), f"no tenant {tenant.parent} in tenants"))
            else:
                node: str | None = tenant.parent
                hops = 0
                while node is not None and hops <= len(parents):
                    if node == tenant.slug:
                        problems.append(((*path, "parent"), f"{tenant.slug} would be its own ancestor"))
                        break
                    node = parents.get(node)
                    hops += 1
        if tenant.plan is not None and tenant.plan not in plan_slugs:
            problems.append(((*path, "plan"), f"no plan {tenant.plan} in plans"))
        problems += _budget_dupes(tenant.budgets, (*path, "budgets"))
        problems += _dupes(tenant.keys, "name", (*path, "keys"), "key")
    problems += _dupes(doc.routing_policies, "name", ("routing_policies",), "routing policy")
    attached: dict[str | None, int] = {}
    for i, policy in enumerate(doc.routing_policies):
        if policy.library:
            continue
        if policy.tenant in attached:
            whose = f"tenant {policy.tenant}" if policy.tenant else "the whole gateway (global)"
            problems.append((("routing_policies", i), f"a second policy for {whose}"))
        attached.setdefault(policy.tenant, i)
    problems += _dupes(doc.experiments, "id", ("experiments",), "experiment")
    compiled = {p.name: parse_policy(p.name, p.rules, p.fallback_chain) for p in doc.routing_policies}
    try:
        check_includes(compiled)
    except PolicyError as err:
        problems.append((("routing_policies",), str(err)))
    return problems
