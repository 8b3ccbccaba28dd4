"""Feedback on requests (``POST /v1/feedback``): a score or a label per request id, for the
request's own tenant only. The latest report for a request replaces the earlier one."""

from __future__ import annotations

from ledger.models import Feedback, UsageRecord

__all__ = ["feedback_record"]


def feedback_record(
    *, tenant_id: int, api_key_id: int | None, request_id: str, score: float | None, label: str
) -> tuple[Feedback, UsageRecord] | None:
    """Store the outcome of ``request_id``; None when the tenant has no such request in the ledger
    (another tenant's request looks the same as an unknown one)."""
    row = UsageRecord.objects.filter(request_id=request_id, tenant_id=tenant_id).first()
    if row is None:
        return None
    feedback, _ = Feedback.objects.update_or_create(
        request_id=request_id,
        defaults={"tenant_id": tenant_id, "api_key_id": api_key_id, "score": score, "label": label},
    )
    return feedback, row
