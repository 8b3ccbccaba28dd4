"""The Responses API answers the gateway keeps, per tenant (``gateway.models.StoredResponse``).

Every lookup is by id *and* tenant: another tenant's id is simply not found (a 404 wherever it
appears, ``previous_response_id`` included). The async functions run the ORM off the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.utils import timezone

from gateway.models import StoredResponse

Json = dict[str, Any]

__all__ = ["Prior", "delete", "find", "prior", "prune_expired", "save"]


@dataclass(frozen=True, slots=True)
class Prior:
    """A stored response as the next turn of its conversation needs it."""

    id: str
    input_items: list[Json]
    output: list[Json]


def _live(tenant_id: int, response_id: str) -> StoredResponse | None:
    return StoredResponse.objects.filter(pk=response_id, tenant_id=tenant_id, expires_at__gt=timezone.now()).first()


async def find(tenant_id: int, response_id: str) -> StoredResponse | None:
    """The tenant's stored response, or None (unknown, another tenant's, deleted or expired)."""
    return await sync_to_async(_live, thread_sensitive=False)(tenant_id, response_id)


async def prior(tenant_id: int, response_id: str) -> Prior | None:
    row = await find(tenant_id, response_id)
    if row is None:
        return None
    output = row.response.get("output") if isinstance(row.response, dict) else None
    return Prior(id=row.pk, input_items=list(row.input_items or []), output=list(output or []))


def _save(tenant_id: int, response: Json, input_items: list[Json], created_at: datetime) -> None:
    days = settings.CHITTYCAN_RESPONSES_RETENTION_DAYS
    StoredResponse.objects.update_or_create(
        pk=response["id"],
        defaults={
            "tenant_id": tenant_id,
            "model": str(response.get("model") or "")[:200],
            "previous_response_id": str(response.get("previous_response_id") or ""),
            "instructions": str(response.get("instructions") or ""),
            "input_items": input_items,
            "response": response,
            "created_at": created_at,
            "expires_at": created_at + timedelta(days=days),
        },
    )


async def save(tenant_id: int, response: Json, input_items: list[Json]) -> None:
    await sync_to_async(_save, thread_sensitive=False)(tenant_id, response, input_items, timezone.now())


def delete(tenant_id: int, response_id: str) -> bool:
    deleted, _ = StoredResponse.objects.filter(pk=response_id, tenant_id=tenant_id).delete()
    return deleted > 0


def prune_expired(now: datetime | None = None) -> int:
    """Delete stored responses past their retention; how many went (the retention task calls it)."""
    deleted, _ = StoredResponse.objects.filter(expires_at__lte=now or timezone.now()).delete()
    return deleted
