"""Active health probes as ledger rows (``ProbeRecord``): one per probe a gateway sent, with what it
cost at the probed model's price, so the operator sees what health checking spends. Written by
``gateway.routing.health``; read by its status (``can providers status``, ``GET /health/providers``);
pruned with the usage ledger's retention (registered in ``ledger.apps``)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import Count, Sum
from django.utils import timezone

from ledger.models import ProbeRecord

#: The window of the probe spend the status views show.
SPEND_WINDOW = timedelta(hours=24)


def record(**fields: Any) -> ProbeRecord:
    """Store one probe that was sent (``fields``: the model's fields)."""
    fields["error"] = str(fields.get("error") or "")[:300]
    return ProbeRecord.objects.create(**fields)


Key = tuple[str, str, str]  # (public model, provider slug, upstream model)


def spend(keys: Iterable[Key], now: datetime | None = None) -> dict[Key, dict[str, int]]:
    """Probes sent and their cost over ``SPEND_WINDOW`` per (public model, provider, upstream model)."""
    wanted = set(keys)
    since = (now or timezone.now()) - SPEND_WINDOW
    out = {key: {"probes": 0, "cost_micro": 0} for key in wanted}
    rows = (
        ProbeRecord.objects.filter(created_at__gte=since)
        .values("model", "provider", "upstream_model")
        .annotate(probes=Count("id"), cost=Sum("cost_micro"))
        .order_by()
    )
    for row in rows:
        key = (row["model"], row["provider"], row["upstream_model"])
        if key in wanted:
            out[key] = {"probes": int(row["probes"]), "cost_micro": int(row["cost"] or 0)}
    return out


def prune(now: datetime) -> int:
    """Delete probe rows older than the usage ledger's retention."""
    cutoff = now - timedelta(days=settings.CHITTYCAN_USAGE_RETENTION_DAYS)
    deleted, _ = ProbeRecord.objects.filter(created_at__lt=cutoff).delete()
    return deleted
