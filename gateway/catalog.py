"""Writes to the catalogue: providers, public models, their deployments and prices.

The one write path for these rows: the admin, ``can apply`` and anything else that changes them
call these functions. Each runs in one transaction, validates the row (``full_clean``), writes an
audit row through ``tenants.audit`` and announces the change to every gateway process after
commit, so routes and prices are reloaded.

``*_update`` functions take the row to change (it may carry unsaved edits, as an admin form's
instance does: the change is measured against the stored row) and return what changed; nothing
is written, audited or announced when nothing did.
"""

from __future__ import annotations

from datetime import UTC, datetime, time
from decimal import Decimal
from typing import TypedDict, Unpack

from django.contrib.auth.base_user import AbstractBaseUser
from django.db import transaction

from core import invalidation
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
    max_retries: int
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


def deployment_label(deployment: Deployment) -> str:
    """``gpt-4o -> openai:gpt-4o-2024-08-06``: how the audit log and ``can apply`` name a deployment."""
    return f"{deployment.model.name} -> {deployment.provider.slug}:{deployment.upstream_model}"


def price_label(price: Price) -> str:
    """``gpt-4o from 2025-01-01`` (or from an ISO date-time when it starts mid-day, UTC)."""
    when = price.effective_from.astimezone(UTC)
    text = when.date().isoformat() if when.time() == time.min else when.isoformat().replace("+00:00", "Z")
    return f"{price.model.name} from {text}"


def _stored_secret(provider: Provider) -> str | None:
    """The stored credential, or None when it cannot be read (encrypted under another key)."""
    try:
        return provider.api_key
    except ValueError:
        return None


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
    provider.full_clean()
    provider.save()
    audit.record("provider.create", target=provider.slug, actor=actor, actor_label=actor_label, source=source)
    invalidation.announce_on_commit()
    return provider


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
    target = provider.slug
    provider.delete()
    audit.record("provider.delete", target=target, actor=actor, actor_label=actor_label, source=source)
    invalidation.announce_on_commit()


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
    model.full_clean()
    model.save()
    audit.record("model.create", target=model.name, actor=actor, actor_label=actor_label, source=source)
    invalidation.announce_on_commit()
    return model


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
    changes = audit.diff(stored, fields)
    if not changes:
        return changes
    for name, value in fields.items():
        setattr(model, name, value)
    model.full_clean()
    model.save(update_fields=list(changes))
    audit.record(
        "model.update", target=model.name, changes=changes, actor=actor, actor_label=actor_label, source=source
    )
    invalidation.announce_on_commit()
    return changes


@transaction.atomic
def model_delete(
    model: LLMModel, *, actor: AbstractBaseUser | None = None, actor_label: str = "", source: str = ""
) -> None:
    """Delete a public model with its deployments and prices (the ledger keeps its name)."""
    target = model.name
    model.delete()
    audit.record("model.delete", target=target, actor=actor, actor_label=actor_label, source=source)
    invalidation.announce_on_commit()


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
    deployment.full_clean()
    deployment.save()
    audit.record(
        "deployment.create",
        target=deployment_label(deployment),
        actor=actor,
        actor_label=actor_label,
        source=source,
    )
    invalidation.announce_on_commit()
    return deployment


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
    changes = audit.diff(stored, fields)
    if not changes:
        return changes
    for name, value in fields.items():
        setattr(deployment, name, value)
    deployment.full_clean()
    deployment.save(update_fields=list(changes))
    audit.record(
        "deployment.update",
        target=deployment_label(deployment),
        changes=changes,
        actor=actor,
        actor_label=actor_label,
        source=source,
    )
    invalidation.announce_on_commit()
    return changes


@transaction.atomic
def deployment_delete(
    deployment: Deployment, *, actor: AbstractBaseUser | None = None, actor_label: str = "", source: str = ""
) -> None:
    target = deployment_label(deployment)
    deployment.delete()
    audit.record("deployment.delete", target=target, actor=actor, actor_label=actor_label, source=source)
    invalidation.announce_on_commit()


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
    price.full_clean()
    price.save()
    audit.record("price.create", target=price_label(price), actor=actor, actor_label=actor_label, source=source)
    invalidation.announce_on_commit()
    return price


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
    changes = audit.diff(stored, fields)
    if not changes:
        return changes
    for name, value in fields.items():
        setattr(price, name, value)
    price.full_clean()
    price.save(update_fields=list(changes))
    audit.record(
        "price.update",
        target=price_label(price),
        changes=changes,
        actor=actor,
        actor_label=actor_label,
        source=source,
    )
    invalidation.announce_on_commit()
    return changes


@transaction.atomic
def price_delete(
    price: Price, *, actor: AbstractBaseUser | None = None, actor_label: str = "", source: str = ""
) -> None:
    target = price_label(price)
    price.delete()
    audit.record("price.delete", target=target, actor=actor, actor_label=actor_label, source=source)
    invalidation.announce_on_commit()
