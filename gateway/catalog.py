"""Writes to the catalogue: providers, public models, their deployments and prices.

The one write path for these rows: the admin, ``can apply`` and anything else that changes them
call these functions. Each runs in one transaction, validates the row (``full_clean``; a provider's
``base_url`` also against the egress policy, ``core.egress``), writes an
audit row through ``tenants.audit`` and announces the change to every gateway process after
commit, so routes and prices are reloaded.

``*_update`` functions take the row to change (it may carry unsaved edits, as an admin form's
instance does: the change is measured against the stored row) and return what changed; nothing
is written, audited or announced when nothing did.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime, time
from decimal import Decimal
from typing import Any, TypedDict, TypeVar, Unpack

from django.contrib.auth.base_user import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import transaction

from core import egress, invalidation
from gateway.models import Deployment, LLMModel, Price, Provider
from tenants import audit

__all__ = [
    "DeploymentFields",
    "ModelFields",
    "PriceFields",
    "ProviderFields",
    "deployment_create",
    "deployment_delete",
    "deployment_label",
    "deployment_update",
    "model_create",
    "model_delete",
    "model_update",
    "price_create",
    "price_delete",
    "price_label",
    "price_update",
    "provider_create",
    "provider_delete",
    "provider_update",
]


class ProviderFields(TypedDict, total=False):
    slug: str
    kind: str
    base_url: str
    extra_headers: dict[str, str]
    connect_timeout: float
    read_timeout: float
    first_byte_timeout: float | None
    total_timeout: float | None
    max_retries: int
    responses_api: bool
    probe_enabled: bool
    probe_interval: float
    probe_request: dict[str, Any]
    outlier_latency_factor: float
    breaker_failures: int
    breaker_error_rate: float
    breaker_min_requests: int
    breaker_window: float
    breaker_cooldown: float
    is_active: bool
    created_at: datetime


class ModelFields(TypedDict, total=False):
    name: str
    kind: str
    aliases: list[str]
    owned_by: str
    context_window: int
    max_output_tokens: int
    is_active: bool
    cache_enabled: bool
    cache_ttl: int
    semantic_cache_enabled: bool
    semantic_threshold: float
    semantic_embedding_model: str
    strategy: str
    created_at: datetime


class DeploymentFields(TypedDict, total=False):
    model: LLMModel
    provider: Provider
    upstream_model: str
    priority: int
    weight: int
    is_active: bool


class PriceFields(TypedDict, total=False):
    model: LLMModel
    effective_from: datetime
    input_per_mtok: Decimal
    cached_input_per_mtok: Decimal | None
    cache_write_per_mtok: Decimal | None
    output_per_mtok: Decimal
    per_image: Decimal
    image_prices: dict[str, str]
    audio_per_minute: Decimal
    per_mchars: Decimal


def deployment_label(deployment: Deployment) -> str:
    """``gpt-4o -> openai:gpt-4o-2024-08-06``: how the audit log and ``can apply`` name a deployment."""
    return f"{deployment.model.name} -> {deployment.provider.slug}:{deployment.upstream_model}"


def price_label(price: Price) -> str:
    """``gpt-4o from 2025-01-01`` (or from an ISO date-time when it starts mid-day, UTC)."""
    when = price.effective_from.astimezone(UTC)
    text = when.date().isoformat() if when.time() == time.min else when.isoformat().replace("+00:00", "Z")
    return f"{price.model.name} from {text}"


def _check_base_url(provider: Provider) -> None:
    """The egress policy (``core.egress``) on the base URL, as a field error."""
    try:
        egress.validate_url(provider.base_url)
    except ValidationError as exc:
        raise ValidationError({"base_url": exc.error_list}) from None


def _stored_secret(provider: Provider) -> str | None:
    """The stored credential, or None when it cannot be read (encrypted under another key)."""
    try:
        return provider.api_key
    except ValueError:
        return None


_Row = TypeVar("_Row", Provider, LLMModel, Deployment, Price)


class _Who(TypedDict):
    """Who made a change, for the audit row."""

    actor: AbstractBaseUser | None
    actor_label: str
    source: str


def _created(kind: str, row: _Row, label: str, who: _Who) -> _Row:
    """Validate and save a new row, audit ``<kind>.create`` and tell the gateway after commit."""
    row.full_clean()
    row.save()
    audit.record(f"{kind}.create", target=label, **who)
    invalidation.announce_on_commit()
    return row


def _updated(
    kind: str, row: _Row, stored: _Row, fields: Mapping[str, Any], who: _Who, label: Callable[[_Row], str]
) -> audit.Changes:
    """Set ``fields`` on ``row`` where they differ from ``stored`` (the row as committed); save,
    audit and announce only what changed."""
    changes = audit.diff(stored, fields)
    if not changes:
        return changes
    for name, value in fields.items():
        setattr(row, name, value)
    row.full_clean()
    row.save(update_fields=list(changes))
    audit.record(f"{kind}.update", target=label(row), changes=changes, **who)
    invalidation.announce_on_commit()
    return changes


def _deleted(kind: str, row: Provider | LLMModel | Deployment | Price, label: str, who: _Who) -> None:
    row.delete()
    audit.record(f"{kind}.delete", target=label, **who)
    invalidation.announce_on_commit()


# --- providers ----------------------------------------------------------------------------------


@transaction.atomic
def provider_create(
    *,
    api_key: str = "",
    actor: AbstractBaseUser | None = None,
    actor_label: str = "",
    source: str = "",
    **fields: Unpack[ProviderFields],
) -> Provider:
    """Create a provider; ``api_key`` is stored encrypted and never logged."""
    provider = Provider(**fields)
    provider.api_key = api_key
    _check_base_url(provider)
    return _created("provider", provider, provider.slug, _Who(actor=actor, actor_label=actor_label, source=source))


@transaction.atomic
def provider_update(
    provider: Provider,
    *,
    api_key: str | None = None,
    actor: AbstractBaseUser | None = None,
    actor_label: str = "",
    source: str = "",
    **fields: Unpack[ProviderFields],
) -> audit.Changes:
    """Set the given fields. ``api_key``: None keeps the stored credential, ``""`` removes it, any
    other value replaces it (the audit log and the returned changes say only that it changed)."""
    stored = Provider.objects.select_for_update().get(pk=provider.pk)
    changes = audit.diff(stored, fields)
    update_fields = list(changes)
    for name, value in fields.items():
        setattr(provider, name, value)
    if api_key is not None and api_key != _stored_secret(stored):
        provider.api_key = api_key
        changes["api_key"] = (audit.HIDDEN, audit.HIDDEN)
        update_fields.append("api_key_encrypted")
    if not changes:
        return changes
    if "base_url" in changes:
        _check_base_url(provider)
    provider.full_clean()
    provider.save(update_fields=update_fields)
    audit.record(
        "provider.update",
        target=provider.slug,
        changes=changes,
        actor=actor,
        actor_label=actor_label,
        source=source,
    )
    invalidation.announce_on_commit()
    return changes


@transaction.atomic
def provider_delete(
    provider: Provider, *, actor: AbstractBaseUser | None = None, actor_label: str = "", source: str = ""
) -> None:
    """Delete a provider. One that deployments still use cannot be deleted (``ProtectedError``)."""
    _deleted("provider", provider, provider.slug, _Who(actor=actor, actor_label=actor_label, source=source))


# --- public models ------------------------------------------------------------------------------


@transaction.atomic
def model_create(
    *,
    actor: AbstractBaseUser | None = None,
    actor_label: str = "",
    source: str = "",
    **fields: Unpack[ModelFields],
) -> LLMModel:
    model = LLMModel(**fields)
    return _created("model", model, model.name, _Who(actor=actor, actor_label=actor_label, source=source))


@transaction.atomic
def model_update(
    model: LLMModel,
    *,
    actor: AbstractBaseUser | None = None,
    actor_label: str = "",
    source: str = "",
    **fields: Unpack[ModelFields],
) -> audit.Changes:
    stored = LLMModel.objects.select_for_update().get(pk=model.pk)
    who = _Who(actor=actor, actor_label=actor_label, source=source)
    return _updated("model", model, stored, fields, who, lambda m: m.name)


@transaction.atomic
def model_delete(
    model: LLMModel, *, actor: AbstractBaseUser | None = None, actor_label: str = "", source: str = ""
) -> None:
    """Delete a public model with its deployments and prices (the ledger keeps its name)."""
    _deleted("model", model, model.name, _Who(actor=actor, actor_label=actor_label, source=source))


# --- deployments --------------------------------------------------------------------------------


@transaction.atomic
def deployment_create(
    *,
    actor: AbstractBaseUser | None = None,
    actor_label: str = "",
    source: str = "",
    **fields: Unpack[DeploymentFields],
) -> Deployment:
    deployment = Deployment(**fields)
    who = _Who(actor=actor, actor_label=actor_label, source=source)
    return _created("deployment", deployment, deployment_label(deployment), who)


@transaction.atomic
def deployment_update(
    deployment: Deployment,
    *,
    actor: AbstractBaseUser | None = None,
    actor_label: str = "",
    source: str = "",
    **fields: Unpack[DeploymentFields],
) -> audit.Changes:
    stored = Deployment.objects.select_for_update().get(pk=deployment.pk)
    who = _Who(actor=actor, actor_label=actor_label, source=source)
    return _updated("deployment", deployment, stored, fields, who, deployment_label)


@transaction.atomic
def deployment_delete(
    deployment: Deployment, *, actor: AbstractBaseUser | None = None, actor_label: str = "", source: str = ""
) -> None:
    who = _Who(actor=actor, actor_label=actor_label, source=source)
    _deleted("deployment", deployment, deployment_label(deployment), who)


# --- prices -------------------------------------------------------------------------------------


@transaction.atomic
def price_create(
    *,
    actor: AbstractBaseUser | None = None,
    actor_label: str = "",
    source: str = "",
    **fields: Unpack[PriceFields],
) -> Price:
    price = Price(**fields)
    return _created("price", price, price_label(price), _Who(actor=actor, actor_label=actor_label, source=source))


@transaction.atomic
def price_update(
    price: Price,
    *,
    actor: AbstractBaseUser | None = None,
    actor_label: str = "",
    source: str = "",
    **fields: Unpack[PriceFields],
) -> audit.Changes:
    stored = Price.objects.select_for_update().get(pk=price.pk)
    who = _Who(actor=actor, actor_label=actor_label, source=source)
    return _updated("price", price, stored, fields, who, price_label)


@transaction.atomic
def price_delete(
    price: Price, *, actor: AbstractBaseUser | None = None, actor_label: str = "", source: str = ""
) -> None:
    _deleted("price", price, price_label(price), _Who(actor=actor, actor_label=actor_label, source=source))
