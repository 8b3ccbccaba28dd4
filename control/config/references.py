"""The placeholder names a configuration file used for its secrets, kept for ``can export``.

A file says ``api_key: ${OPENAI_PROD_KEY}``; the value is read from the environment at apply time
and stored encrypted on the row, and the name is kept here, so an export writes
``${OPENAI_PROD_KEY}`` back instead of a name made up from the slug. Secrets set another way
(the admin, the REST API) have no reference; export then derives one (``env_name``).
"""

from __future__ import annotations

from collections.abc import Iterable

from django.utils import timezone

from control.models import SecretReference

__all__ = ["PROVIDER_API_KEY", "BUDGET_WEBHOOK_SECRET", "forget_missing", "names", "remember"]

PROVIDER_API_KEY = SecretReference.Kind.PROVIDER_API_KEY
BUDGET_WEBHOOK_SECRET = SecretReference.Kind.BUDGET_WEBHOOK_SECRET


def remember(kind: str, object_id: int, env_name: str) -> None:
    """Record (or change) the placeholder of one object's secret."""
    SecretReference.objects.update_or_create(
        kind=kind, object_id=object_id, defaults={"env_name": env_name, "updated_at": timezone.now()}
    )


def forget_missing(kind: str, existing_ids: Iterable[int]) -> None:
    """Drop the references of objects that no longer exist."""
    SecretReference.objects.filter(kind=kind).exclude(object_id__in=list(existing_ids)).delete()


def names(kind: str) -> dict[int, str]:
    """Object id -> the placeholder name the file used."""
    return dict(SecretReference.objects.filter(kind=kind).values_list("object_id", "env_name"))
