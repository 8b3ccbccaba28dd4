"""Configuration as code: ``can apply -f chittycan.yaml`` and ``can export``.

The file describes providers, public models (aliases, deployments, prices), plans and tenants
(hierarchy, limits, budgets): the same objects the admin edits. The format is in docs/config.md.

- ``load()`` parses and validates a file. Every problem is reported at once as
  ``<file>: <path>: <what is wrong> (line N)``, e.g.
  ``chittycan.yaml: models[2].prices[0].input: must be a decimal string such as "2.50" (line 31)``.
- ``apply()`` makes the database match the file in ONE transaction: every change writes an audit
  row, and the gateway processes are told once, after commit. A dry run does the same work and
  rolls it back, so it reports exactly what a real run would change.
- ``export()`` writes the current configuration in the same format; ``export -> apply`` is a no-op.

Secrets are never in the file: a provider's ``api_key`` (and a budget's ``webhook_secret``) must
be an ``${ENV_VAR}`` reference, read from the environment at apply time, stored encrypted, and
exported again as a reference. An unset variable keeps the stored secret (an error if none is
stored). ``${VAR}`` also works in any other string value.
"""

from __future__ import annotations

import difflib
import os
import re
import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

import yaml
from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.validators import URLValidator, validate_email, validate_slug
from django.db import IntegrityError, transaction
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError
from pydantic_core import PydanticCustomError

from budgets import services
from budgets.models import Budget
from core import invalidation
from gateway.models import Deployment, LLMModel, Price, Provider
from tenants.models import AuditEvent, Plan, Tenant

__all__ = ["Change", "ConfigError", "Document", "Result", "apply", "dump", "export", "load", "load_text"]

VERSION = 1
ACTOR = "apply"
MICRO = Decimal(1_000_000)
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SECRET_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")


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
    if not isinstance(value, str) or not _SECRET_REF.match(value):
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


class ProviderSpec(_Spec):
    slug: Slug
    kind: Literal["openai", "anthropic", "ollama", "mock"]
    base_url: Url = ""
    api_key: SecretRef | None = None
    extra_headers: dict[str, str] = {}
    connect_timeout: Annotated[float, Field(gt=0)] = 5.0
    read_timeout: Annotated[float, Field(gt=0)] = 600.0
    max_retries: Annotated[int, Field(ge=0, le=20)] = 2
    active: bool = True


class DeploymentSpec(_Spec):
    provider: Slug
    upstream_model: Name
    priority: Annotated[int, Field(ge=0, le=32767)] = 0
    weight: Annotated[int, Field(ge=0)] = 1
    active: bool = True


class PriceSpec(_Spec):
    effective_from: EffectiveFrom
    input: DecimalString
    cached_input: DecimalString | None = None
    cache_write: DecimalString | None = None
    output: DecimalString


class ModelSpec(_Spec):
    name: Name
    kind: Literal["chat", "embedding", "completion"] = "chat"
    aliases: list[Name] = []
    owned_by: Annotated[str, Field(max_length=100)] = "chittycan"
    context_window: Annotated[int, Field(ge=0)] = 128_000
    max_output_tokens: Annotated[int, Field(ge=0)] = 16_384
    active: bool = True
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
    budgets: list[BudgetSpec] = []


class Document(_Spec):
    version: Literal[1] = 1
    providers: list[ProviderSpec] = []
    models: list[ModelSpec] = []
    plans: list[PlanSpec] = []
    tenants: list[TenantSpec] = []


# --- loading and validation ------------------------------------------------------------------------

Path = tuple[str | int, ...]


def _format_path(path: Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _line_map(text: str) -> dict[Path, int]:
    """Path in the document -> 1-based line where its value starts."""
    lines: dict[Path, int] = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines

    def walk(node: yaml.Node, path: Path) -> None:
        lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    lines[(*path, key.value)] = key.start_mark.line + 1
                    walk(value, (*path, key.value))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, i))

    if root is not None:
        walk(root, ())
    return lines


_SECRET_PATHS = (("providers", int, "api_key"), ("tenants", int, "budgets", int, "webhook_secret"))


def _is_secret_path(path: Path) -> bool:
    for pattern in _SECRET_PATHS:
        if len(pattern) == len(path) and all(
            (isinstance(p, int) if want is int else p == want) for want, p in zip(pattern, path, strict=True)
        ):
            return True
    return False


def _interpolate(data: Any, path: Path, env: dict[str, str], errors: list[tuple[Path, str]]) -> Any:
    """``${VAR}`` in string values, from ``env``; secret fields are resolved later, at apply time."""
    if isinstance(data, dict):
        return {k: _interpolate(v, (*path, k), env, errors) for k, v in data.items()}
    if isinstance(data, list):
        return [_interpolate(v, (*path, i), env, errors) for i, v in enumerate(data)]
    if isinstance(data, str) and "${" in data and not _is_secret_path(path):

        def sub(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in env:
                errors.append((path, f"environment variable {name} is not set"))
                return ""
            return env[name]

        return _ENV_REF.sub(sub, data.replace("$${", "\x00")).replace("\x00", "${")
    return data


_FRIENDLY = {
    "missing": "is required",
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
}


def _pydantic_message(err: Any) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind in _FRIENDLY:
        return _FRIENDLY[kind]
    if kind == "literal_error":
        return f"must be one of: {ctx.get('expected', '').replace(chr(39), '')}"
    if kind == "greater_than":
        return f"must be greater than {ctx.get('gt')}"
    if kind == "greater_than_equal":
        return f"must be at least {ctx.get('ge')}"
    if kind == "less_than_equal":
        return f"must be at most {ctx.get('le')}"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "string_too_long":
        return f"is longer than {ctx.get('max_length')} characters"
    return str(err["msg"])


def _known_fields(path: Path) -> list[str]:
    spec: type[BaseModel] = Document
    for part in path:
        if isinstance(part, int):
            continue
        info = spec.model_fields.get(part)
        if info is None:
            return []
        inner = _spec_of(info.annotation)
        if inner is None:
            return []
        spec = inner
    return list(spec.model_fields)


def _spec_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _spec_of(arg)
        if found is not None:
            return found
    return None


def load_text(text: str, *, filename: str = "chittycan.yaml", env: dict[str, str] | None = None) -> Document:
    """Parse and validate a configuration; raise ConfigError listing every problem."""
    env = dict(os.environ) if env is None else env

    def fail(problems: list[tuple[Path, str]], lines: dict[Path, int]) -> ConfigError:
        out = []
        for path, message in problems:
            line = next((lines[path[:n]] for n in range(len(path), -1, -1) if path[:n] in lines), None)
            suffix = f" (line {line})" if line else ""
            out.append(f"{filename}: {_format_path(path)}: {message}{suffix}")
        return ConfigError(out)

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{filename}: not valid YAML: {problem}{where}"]) from None
    lines = _line_map(text)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise fail([((), "must be a mapping with providers, models, plans and tenants")], lines)
    problems: list[tuple[Path, str]] = []
    data = _interpolate(data, (), env, problems)
    if problems:
        raise fail(problems, lines)
    try:
        doc = Document.model_validate(data)
    except PydanticValidationError as exc:
        for err in exc.errors():
            path: Path = tuple(p for p in err["loc"] if isinstance(p, str | int))
            message = _pydantic_message(err)
            if err["type"] == "extra_forbidden" and path:
                known = _known_fields(path[:-1])
                close = difflib.get_close_matches(str(path[-1]), known, n=1)
                message = "unknown field" + (f" (did you mean {close[0]}?)" if close else "")
                if known:
                    message += f"; allowed: {', '.join(known)}"
            problems.append((path, message))
        raise fail(problems, lines) from None
    problems = _check_references(doc)
    if problems:
        raise fail(problems, lines)
    return doc


def load(path: str, *, env: dict[str, str] | None = None) -> Document:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    return load_text(text, filename=path, env=env)


def _dupes(items: list[Any], key: str, where: Path, what: str) -> Iterator[tuple[Path, str]]:
    seen: dict[Any, int] = {}
    for i, item in enumerate(items):
        value = getattr(item, key)
        if value in seen:
            yield (*where, i, key), f"duplicate {what} {value!s} (also at {_format_path((*where, seen[value]))})"
        else:
            seen[value] = i


def _check_references(doc: Document) -> list[tuple[Path, str]]:
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
                problems.append((path, f"{alias} is already the name or an alias of {_format_path(other[:2])}"))
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
        problems += _dupes(tenant.budgets, "period", (*path, "budgets"), "budget period")
    return problems


# --- applying --------------------------------------------------------------------------------------


@dataclass
class Change:
    op: Literal["create", "update", "delete", "deactivate"]
    kind: str  # provider, model, deployment, price, plan, tenant, budget
    target: str
    fields: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    note: str = ""

    def __str__(self) -> str:
        sign = {"create": "+", "update": "~", "delete": "-", "deactivate": "-"}[self.op]
        text = f"{sign} {self.op} {self.kind} {self.target}"
        if self.fields and self.op == "update":
            text += ": " + ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in self.fields.items())
        if self.note:
            text += f" ({self.note})"
        return text


_HIDDEN = object()


def _show(value: Any) -> str:
    if value is _HIDDEN:
        return "(secret)"
    if value is None:
        return "none"
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


@dataclass
class Result:
    changes: list[Change]
    notes: list[str]
    dry_run: bool


class _Applier:
    def __init__(self, doc: Document, *, prune: bool, env: dict[str, str], actor: Any, filename: str) -> None:
        self.doc = doc
        self.prune = prune
        self.env = env
        self.actor = actor
        self.filename = filename
        self.changes: list[Change] = []
        self.notes: list[str] = []
        self.errors: list[str] = []
        self._doomed_providers: list[Provider] = []

    # Each change is recorded and audited the moment it is made.
    def record(self, change: Change, tenant: Tenant | None = None, *, audit: bool = True) -> None:
        self.changes.append(change)
        if not audit:  # the service function that made the change wrote the audit row
            return
        data: dict[str, Any] = {"source": self.filename}
        if change.fields:
            data["changes"] = {
                k: [None if a is _HIDDEN else _jsonable(a), None if b is _HIDDEN else _jsonable(b)]
                for k, (a, b) in change.fields.items()
            }
        if change.note:
            data["note"] = change.note
        AuditEvent.objects.create(
            action=f"{change.kind}.{change.op}",
            tenant=tenant,
            target=change.target[:200],
            data=data,
            actor=self.actor,
            actor_label=ACTOR,
        )

    def sync(self, obj: Any, desired: dict[str, Any], kind: str, target: str, tenant: Tenant | None = None) -> None:
        """Create ``obj`` (unsaved) or update it to ``desired``, recording what changed."""
        if obj.pk is None:
            for name, value in desired.items():
                setattr(obj, name, value)
            self.full_clean(obj, kind, target)
            obj.save()
            self.record(Change("create", kind, target), tenant=tenant if tenant is not None else _tenant_of(obj))
            return
        diff = {name: (getattr(obj, name), value) for name, value in desired.items() if getattr(obj, name) != value}
        if not diff:
            return
        for name, (_, value) in diff.items():
            setattr(obj, name, value)
        self.full_clean(obj, kind, target)
        obj.save(update_fields=list(diff))
        self.record(Change("update", kind, target, diff), tenant=tenant if tenant is not None else _tenant_of(obj))

    def full_clean(self, obj: Any, kind: str, target: str) -> None:
        try:
            obj.full_clean(validate_unique=False, validate_constraints=False)
        except DjangoValidationError as exc:
            messages = (
                "; ".join(f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items())
                if hasattr(exc, "error_dict")
                else " ".join(exc.messages)
            )
            raise ConfigError([f"{self.filename}: {kind} {target}: {messages}"]) from None

    def secret(self, ref: str | None, current: str, path: str) -> tuple[str | None, str | None]:
        """(new plaintext or None to keep, a note). Errors when nothing is stored to keep."""
        if ref is None:
            return None, None
        match = _SECRET_REF.match(ref)
        assert match is not None  # validated by the schema
        name = match.group(1)
        if name in self.env:
            value = self.env[name]
            return (value if value != current else None), None
        if current:
            return None, f"{path}: {name} is not set; the stored secret is kept"
        self.errors.append(f"{self.filename}: {path}: environment variable {name} is not set")
        return None, None

    def run(self) -> None:
        plans = self.plans()
        providers = self.providers()
        self.models(providers)
        self.tenants(plans)
        if self.errors:
            raise ConfigError(self.errors)

    def plans(self) -> dict[str, Plan]:
        out: dict[str, Plan] = {}
        for spec in self.doc.plans:
            plan = Plan.objects.filter(slug=spec.slug).first() or Plan(slug=spec.slug)
            desired = {
                "name": spec.name or spec.slug,
                "monthly_request_quota": spec.monthly_request_quota,
                "rpm_limit": spec.rpm,
                "tpm_limit": spec.tpm,
            }
            self.sync(plan, desired, "plan", spec.slug)
            out[spec.slug] = plan
        if self.prune:
            for plan in Plan.objects.exclude(slug__in=out):
                target = plan.slug
                plan.delete()  # tenants still on it (none in the file) are left without a plan
                self.record(Change("delete", "plan", target))
        return out

    def providers(self) -> dict[str, Provider]:
        out: dict[str, Provider] = {}
        for i, spec in enumerate(self.doc.providers):
            provider = Provider.objects.filter(slug=spec.slug).first() or Provider(slug=spec.slug)
            desired: dict[str, Any] = {
                "kind": spec.kind,
                "base_url": spec.base_url,
                "extra_headers": dict(spec.extra_headers),
                "connect_timeout": spec.connect_timeout,
                "read_timeout": spec.read_timeout,
                "max_retries": spec.max_retries,
                "is_active": spec.active,
            }
            try:
                current = provider.api_key if provider.api_key_encrypted else ""
            except ValueError:  # encrypted under another key: only a new value helps
                current = ""
            new_secret, note = self.secret(spec.api_key, current, f"providers[{i}].api_key")
            if note:
                self.notes.append(note)
            if new_secret is not None and provider.pk is None:
                provider.api_key, new_secret = new_secret, None
            self.sync(provider, desired, "provider", spec.slug)
            if new_secret is not None:
                provider.api_key = new_secret
                provider.save(update_fields=["api_key_encrypted"])
                self.record(Change("update", "provider", spec.slug, {"api_key": (_HIDDEN, _HIDDEN)}))
            out[spec.slug] = provider
        if self.prune:
            keep = {s.slug for s in self.doc.providers}
            doomed = Provider.objects.exclude(slug__in=keep)
            # Deployments of pruned models go first, below; whatever still points here is kept.
            self._doomed_providers = list(doomed)
        return out

    def models(self, providers: dict[str, Provider]) -> None:
        file_names = {m.name for m in self.doc.models}
        if self.prune:
            for model in LLMModel.objects.exclude(name__in=file_names):
                target = model.name
                model.delete()
                self.record(Change("delete", "model", target))
        for spec in self.doc.models:
            model = LLMModel.objects.filter(name=spec.name).first() or LLMModel(name=spec.name)
            desired = {
                "kind": spec.kind,
                "aliases": list(spec.aliases),
                "owned_by": spec.owned_by,
                "context_window": spec.context_window,
                "max_output_tokens": spec.max_output_tokens,
                "is_active": spec.active,
            }
            self.sync(model, desired, "model", spec.name)
            self.deployments(model, spec, providers)
            self.prices(model, spec)
        if self.prune:
            for provider in self._doomed_providers:
                if provider.deployments.exists():
                    self.notes.append(f"provider {provider.slug} is still used by deployments; not pruned")
                    continue
                target = provider.slug
                provider.delete()
                self.record(Change("delete", "provider", target))
        self._check_alias_clashes(file_names)

    def _check_alias_clashes(self, file_names: set[str]) -> None:
        """Aliases against models that stay in the database without being in the file."""
        index = {m.name: i for i, m in enumerate(self.doc.models)}
        taken: dict[str, str] = {}
        rows = list(LLMModel.objects.order_by("name").values_list("name", "aliases"))
        for name, _ in rows:
            taken[name] = name
        for name, aliases in rows:
            for alias in aliases or []:
                owner = taken.setdefault(alias, name)
                if owner == name or (name not in file_names and owner not in file_names):
                    continue
                where = f"models[{index[name]}].aliases" if name in index else f"model {name} (not in the file)"
                self.errors.append(
                    f"{self.filename}: {where}: {alias} is already the name or an alias of model {owner}"
                )

    def deployments(self, model: LLMModel, spec: ModelSpec, providers: dict[str, Provider]) -> None:
        existing = {(d.provider.slug, d.upstream_model): d for d in model.deployments.select_related("provider")}
        wanted = set()
        for dep in spec.deployments:
            ident = (dep.provider, dep.upstream_model)
            wanted.add(ident)
            row = existing.get(ident) or Deployment(
                model=model, provider=providers[dep.provider], upstream_model=dep.upstream_model
            )
            desired = {"priority": dep.priority, "weight": dep.weight, "is_active": dep.active}
            self.sync(row, desired, "deployment", f"{model.name} -> {dep.provider}:{dep.upstream_model}")
        if self.prune:
            for ident, row in existing.items():
                if ident not in wanted:
                    row.delete()
                    self.record(Change("delete", "deployment", f"{model.name} -> {ident[0]}:{ident[1]}"))

    def prices(self, model: LLMModel, spec: ModelSpec) -> None:
        existing = {p.effective_from: p for p in model.prices.all()}
        wanted = set()
        for price in spec.prices:
            wanted.add(price.effective_from)
            row = existing.get(price.effective_from) or Price(model=model, effective_from=price.effective_from)
            desired = {
                "input_per_mtok": price.input,
                "cached_input_per_mtok": price.cached_input,
                "cache_write_per_mtok": price.cache_write,
                "output_per_mtok": price.output,
            }
            self.sync(row, desired, "price", f"{model.name} from {_date_text(price.effective_from)}")
        if self.prune:
            for when, row in existing.items():
                if when not in wanted:
                    row.delete()
                    self.record(Change("delete", "price", f"{model.name} from {_date_text(when)}"))

    def tenants(self, plans: dict[str, Plan]) -> None:
        by_slug = {t.slug: t for t in self.doc.tenants}
        rows: dict[str, Tenant] = {}
        # Parents before children, so a new child can point at a parent created in this run.
        for spec in _parents_first(self.doc.tenants):
            tenant = Tenant.objects.filter(slug=spec.slug).first() or Tenant(slug=spec.slug)
            parent = rows.get(spec.parent) if spec.parent else None
            kind = spec.kind or _default_kind(by_slug[spec.parent].kind if spec.parent else None, parent)
            desired = {
                "name": spec.name or spec.slug,
                "kind": kind,
                "parent": parent,
                "plan": plans.get(spec.plan) if spec.plan else None,
                "time_zone": spec.time_zone,
                "stripe_customer_id": spec.stripe_customer,
                "rpm_limit": spec.rpm,
                "tpm_limit": spec.tpm,
                "allowed_models": list(spec.allowed_models),
                "is_active": spec.active,
            }
            self.sync(tenant, desired, "tenant", spec.slug)
            rows[spec.slug] = tenant
            self.budgets(tenant, spec)
        if self.prune:
            keep = set(by_slug) | {settings.CHITTYCAN_PASSTHROUGH_TENANT}
            for tenant in Tenant.objects.exclude(slug__in=keep).filter(is_active=True):
                tenant.is_active = False
                tenant.save(update_fields=["is_active"])
                self.record(
                    Change("deactivate", "tenant", tenant.slug, note="not in the file; keys and usage kept"),
                    tenant=tenant,
                )

    def budgets(self, tenant: Tenant, spec: TenantSpec) -> None:
        """Through ``budgets.services.budget_set``/``budget_delete`` (they write the audit rows)."""
        existing = {b.period: b for b in Budget.objects.filter(tenant=tenant)}
        wanted = set()
        i = next(n for n, t in enumerate(self.doc.tenants) if t.slug == spec.slug)
        for j, budget in enumerate(spec.budgets):
            wanted.add(budget.period)
            row = existing.get(budget.period)
            desired: dict[str, Any] = {
                "limit_micro": int(budget.limit_usd * MICRO),
                "hard": budget.hard,
                "alert_thresholds": list(budget.thresholds),
                "alert_emails": list(budget.emails),
                "webhook_url": budget.webhook,
            }
            target = f"{tenant.slug} per {budget.period}"
            current_secret = row.webhook_secret if row is not None else ""
            new_secret, note = self.secret(
                budget.webhook_secret, current_secret, f"tenants[{i}].budgets[{j}].webhook_secret"
            )
            if note:
                self.notes.append(note)
            diff = {k: (getattr(row, k), v) for k, v in desired.items() if getattr(row, k) != v} if row else {}
            if new_secret is not None and row is not None:
                diff["webhook_secret"] = (_HIDDEN, _HIDDEN)
            if row is not None and not diff:
                continue
            try:
                services.budget_set(
                    tenant=tenant,
                    period=budget.period,
                    webhook_secret=new_secret,
                    actor_label=ACTOR,
                    **desired,
                )
            except (DjangoValidationError, ValueError) as exc:
                text = "; ".join(exc.messages) if isinstance(exc, DjangoValidationError) else str(exc)
                raise ConfigError([f"{self.filename}: tenants[{i}].budgets[{j}]: {text}"]) from None
            change = Change("create", "budget", target) if row is None else Change("update", "budget", target, diff)
            self.record(change, audit=False)
        if self.prune:
            for period, row in existing.items():
                if period not in wanted:
                    services.budget_delete(budget=row, actor_label=ACTOR)
                    self.record(Change("delete", "budget", f"{tenant.slug} per {period}"), audit=False)


def _tenant_of(obj: Any) -> Tenant | None:
    if isinstance(obj, Tenant):
        return obj if obj.pk else None
    return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, Decimal | datetime):
        return str(value)
    if isinstance(value, Tenant | Plan | Provider | LLMModel):
        return str(value)
    return value


def _date_text(when: datetime) -> str:
    when = when.astimezone(UTC)
    return when.date().isoformat() if when.time() == time.min else when.isoformat().replace("+00:00", "Z")


def _default_kind(parent_kind: str | None, parent: Tenant | None) -> str:
    kind = parent_kind or (parent.kind if parent else None)
    if kind is None:
        return Tenant.Kind.ORGANISATION
    return Tenant.Kind.TEAM if kind == Tenant.Kind.ORGANISATION else Tenant.Kind.PROJECT


def _parents_first(tenants: list[TenantSpec]) -> list[TenantSpec]:
    by_slug = {t.slug: t for t in tenants}
    out: list[TenantSpec] = []
    done: set[str] = set()

    def visit(spec: TenantSpec) -> None:
        if spec.slug in done:
            return
        done.add(spec.slug)
        if spec.parent and spec.parent in by_slug:
            visit(by_slug[spec.parent])
        out.append(spec)

    for spec in tenants:
        visit(spec)
    return out


def apply(
    doc: Document,
    *,
    prune: bool = False,
    dry_run: bool = False,
    env: dict[str, str] | None = None,
    actor: Any = None,
    filename: str = "chittycan.yaml",
) -> Result:
    """Make the database match ``doc`` in one transaction (rolled back when ``dry_run``)."""
    applier = _Applier(doc, prune=prune, env=dict(os.environ) if env is None else env, actor=actor, filename=filename)
    try:
        with transaction.atomic():
            applier.run()
            if applier.changes and not dry_run:
                transaction.on_commit(invalidation.announce)
            if dry_run:
                transaction.set_rollback(True)
    except IntegrityError as exc:
        raise ConfigError([f"{filename}: the database refused the change: {exc}".strip()]) from None
    return Result(changes=applier.changes, notes=applier.notes, dry_run=dry_run)


# --- export ----------------------------------------------------------------------------------------


def env_name(*parts: str) -> str:
    name = "_".join(re.sub(r"[^A-Za-z0-9]+", "_", p).strip("_").upper() for p in parts if p)
    return name if name and not name[0].isdigit() else f"_{name}"


def _money(value: Decimal | None) -> str | None:
    if value is None:
        return None
    text = format(value.normalize(), "f")
    if "." not in text:
        text += ".00"
    elif len(text.split(".")[1]) == 1:
        text += "0"
    return text


def export() -> dict[str, Any]:
    """The current configuration as the document ``apply`` reads (defaults left out)."""
    out: dict[str, Any] = {"version": VERSION}
    providers = []
    for p in Provider.objects.order_by("slug"):
        item: dict[str, Any] = {"slug": p.slug, "kind": p.kind}
        if p.base_url:
            item["base_url"] = p.base_url
        if p.api_key_encrypted:
            item["api_key"] = "${" + env_name(p.slug, "API_KEY") + "}"
        if p.extra_headers:
            item["extra_headers"] = dict(p.extra_headers)
        _put_if(item, "connect_timeout", p.connect_timeout, 5.0)
        _put_if(item, "read_timeout", p.read_timeout, 600.0)
        _put_if(item, "max_retries", p.max_retries, 2)
        _put_if(item, "active", p.is_active, True)
        providers.append(item)
    out["providers"] = providers
    models = []
    for m in LLMModel.objects.order_by("name").prefetch_related("deployments__provider", "prices"):
        item = {"name": m.name}
        _put_if(item, "kind", m.kind, "chat")
        if m.aliases:
            item["aliases"] = list(m.aliases)
        _put_if(item, "owned_by", m.owned_by, "chittycan")
        _put_if(item, "context_window", m.context_window, 128_000)
        _put_if(item, "max_output_tokens", m.max_output_tokens, 16_384)
        _put_if(item, "active", m.is_active, True)
        deployments = []
        for d in sorted(m.deployments.all(), key=lambda d: (d.priority, d.provider.slug, d.upstream_model)):
            dep: dict[str, Any] = {"provider": d.provider.slug, "upstream_model": d.upstream_model}
            _put_if(dep, "priority", d.priority, 0)
            _put_if(dep, "weight", d.weight, 1)
            _put_if(dep, "active", d.is_active, True)
            deployments.append(dep)
        if deployments:
            item["deployments"] = deployments
        prices = []
        for pr in sorted(m.prices.all(), key=lambda pr: pr.effective_from):
            price: dict[str, Any] = {
                "effective_from": _date_text(pr.effective_from),
                "input": _money(pr.input_per_mtok),
            }
            if pr.cached_input_per_mtok is not None:
                price["cached_input"] = _money(pr.cached_input_per_mtok)
            if pr.cache_write_per_mtok is not None:
                price["cache_write"] = _money(pr.cache_write_per_mtok)
            price["output"] = _money(pr.output_per_mtok)
            prices.append(price)
        if prices:
            item["prices"] = prices
        models.append(item)
    out["models"] = models
    plans = []
    for plan in Plan.objects.order_by("slug"):
        item = {"slug": plan.slug}
        _put_if(item, "name", plan.name, plan.slug)
        _put_if(item, "monthly_request_quota", plan.monthly_request_quota, None)
        _put_if(item, "rpm", plan.rpm_limit, None)
        _put_if(item, "tpm", plan.tpm_limit, None)
        plans.append(item)
    out["plans"] = plans
    tenants = []
    all_tenants = list(Tenant.objects.select_related("parent", "plan").prefetch_related("budgets"))
    for t in _tree_order(all_tenants):
        item = {"slug": t.slug}
        _put_if(item, "name", t.name, t.slug)
        item["kind"] = t.kind
        if t.parent_id:
            item["parent"] = t.parent.slug  # type: ignore[union-attr]
        if t.plan_id:
            item["plan"] = t.plan.slug  # type: ignore[union-attr]
        _put_if(item, "time_zone", t.time_zone, "UTC")
        _put_if(item, "stripe_customer", t.stripe_customer_id, "")
        _put_if(item, "rpm", t.rpm_limit, None)
        _put_if(item, "tpm", t.tpm_limit, None)
        if t.allowed_models:
            item["allowed_models"] = list(t.allowed_models)
        _put_if(item, "active", t.is_active, True)
        budgets = []
        for b in sorted(t.budgets.all(), key=lambda b: ["day", "month", "total"].index(b.period)):
            budget: dict[str, Any] = {"period": b.period, "limit_usd": _money(Decimal(b.limit_micro) / MICRO)}
            _put_if(budget, "hard", b.hard, True)
            if list(b.alert_thresholds) != [50, 80, 100]:
                budget["thresholds"] = list(b.alert_thresholds)
            if b.alert_emails:
                budget["emails"] = list(b.alert_emails)
            if b.webhook_url:
                budget["webhook"] = b.webhook_url
            if b.webhook_secret:
                budget["webhook_secret"] = "${" + env_name(t.slug, b.period, "WEBHOOK_SECRET") + "}"
            budgets.append(budget)
        if budgets:
            item["budgets"] = budgets
        tenants.append(item)
    out["tenants"] = tenants
    return out


def _put_if(item: dict[str, Any], key: str, value: Any, default: Any) -> None:
    if value != default:
        item[key] = value


def _tree_order(tenants: list[Tenant]) -> list[Tenant]:
    """Parents before their children; siblings by slug."""
    kids: dict[int | None, list[Tenant]] = {}
    ids = {t.pk for t in tenants}
    for t in sorted(tenants, key=lambda t: t.slug):
        kids.setdefault(t.parent_id if t.parent_id in ids else None, []).append(t)
    out: list[Tenant] = []

    def walk(parent: int | None) -> None:
        for t in kids.get(parent, []):
            out.append(t)
            walk(t.pk)

    walk(None)
    return out


class _Dumper(yaml.SafeDumper):
    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)  # indent list items under their key


def _str_presenter(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="'" if "${" in value else None)


_Dumper.add_representer(str, _str_presenter)


def dump(data: dict[str, Any]) -> str:
    header = (
        "# ChittyCan configuration (`can export`). Apply with `can apply -f <this file>`.\n"
        "# Secrets are ${ENV_VAR} references, read from the environment at apply time.\n"
    )
    body = yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False, width=100)
    return header + body
