"""The audit log's one writer: every control-plane change (admin, CLI, REST API, ``can apply``)
records itself here, inside the transaction that makes the change, so a rolled-back change leaves
no row and a committed one always has its row.

``record()`` is the only code that creates ``AuditEvent`` rows. Service functions call it; views,
commands and the applier call the service functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Final

from django.contrib.auth.base_user import AbstractBaseUser
from django.db.models import Model

from tenants.models import AuditEvent, Tenant

__all__ = ["HIDDEN", "Changes", "diff", "record"]


class _Hidden:
    """Stands for a secret's old and new value in a change: the log says it changed, never what to."""

    def __repr__(self) -> str:
        return "(secret)"


HIDDEN: Final = _Hidden()

# field name -> (old value, new value)
Changes = dict[str, tuple[Any, Any]]

_TARGET_MAX = AuditEvent._meta.get_field("target").max_length or 200


def diff(current: Model, values: Mapping[str, Any]) -> Changes:
    """The fields of ``values`` whose value differs from ``current``'s, with both values."""
    return {name: (getattr(current, name), value) for name, value in values.items() if getattr(current, name) != value}


def _jsonable(value: Any) -> Any:
    if value is HIDDEN:
        return None
    if isinstance(value, Decimal | datetime | date):
        return str(value)
    if isinstance(value, Model):
        return str(value)
    return value


def record(
    action: str,
    *,
    tenant: Tenant | None = None,
    target: str = "",
    changes: Mapping[str, tuple[Any, Any]] | None = None,
    data: Mapping[str, Any] | None = None,
    actor: AbstractBaseUser | None = None,
    actor_label: str = "",
    source: str = "",
) -> AuditEvent:
    """Write one audit row.

    ``action`` is ``<kind>.<verb>`` (``tenant.create``, ``price.update``, ``key.revoke``...);
    ``changes`` (field -> (old, new), secrets as ``HIDDEN``) is stored as the changed field names
    and their old and new values; ``actor`` is the logged-in person, ``actor_label`` the channel
    (``admin``, ``cli``, ``apply``, ``api:<user>``...), ``source`` where the change came from
    (e.g. the applied file)."""
    payload: dict[str, Any] = {}
    if source:
        payload["source"] = source
    if changes:
        payload["fields"] = sorted(changes)
        payload["changes"] = {name: [_jsonable(old), _jsonable(new)] for name, (old, new) in changes.items()}
    for key, value in (data or {}).items():
        payload[key] = _jsonable(value)
    return AuditEvent.objects.create(
        action=action,
        tenant=tenant if tenant is not None and tenant.pk is not None else None,
        target=target[:_TARGET_MAX],
        data=payload,
        actor_id=actor.pk if actor is not None else None,
        actor_label=actor_label,
    )
