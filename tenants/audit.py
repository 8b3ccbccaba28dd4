"""The audit log's one writer: every control-plane change (admin, CLI, REST API, ``can apply``)
records itself here, inside the transaction that makes the change, so a rolled-back change leaves
no row and a committed one always has its row.

The log is tamper-evident: each row carries a hash over its fields and the previous row's hash
(``tenants/auditchain.py``); writers lock the chain's bookkeeping row, so concurrent writers queue
and the chain cannot fork. ``verify()`` names the first row altered or removed; ``prune()`` drops
rows past retention and moves the chain's anchor, so what remains still verifies.

``record()`` is the only code that creates ``AuditEvent`` rows. Service functions call it; views,
commands and the applier call the service functions.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any, Final, Protocol

from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser
from django.db import transaction
from django.db.models import Model, QuerySet
from django.utils import timezone

from core import origin
from tenants.auditchain import GENESIS, normalise, row_hash
from tenants.models import AuditChain, AuditEvent, Tenant

__all__ = [
    "HIDDEN",
    "PRUNE_ACTION",
    "Changes",
    "Pruned",
    "Verification",
    "as_dict",
    "diff",
    "events",
    "prune",
    "record",
    "subtree_ids",
    "verify",
    "write_csv",
    "write_jsonl",
]

log = logging.getLogger(__name__)


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
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    return value


def _head() -> AuditChain:
    """The chain's bookkeeping row, locked until the transaction ends (PostgreSQL: the writers queue
    here; SQLite takes the database's write lock at BEGIN IMMEDIATE)."""
    head = AuditChain.objects.select_for_update().filter(pk=1).first()
    if head is None:  # a fresh or flushed database: create it, racing writers agree on pk 1
        AuditChain.objects.bulk_create(
            [AuditChain(pk=1, head_seq=0, head_hash=GENESIS, anchor_seq=0, anchor_hash=GENESIS)],
            ignore_conflicts=True,
        )
        head = AuditChain.objects.select_for_update().get(pk=1)
    return head


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
    """Write one audit row, chained to the one before.

    ``action`` is ``<kind>.<verb>`` (``tenant.create``, ``price.update``, ``key.revoke``...);
    ``changes`` (field -> (old, new), secrets as ``HIDDEN``) is stored as the changed field names
    and their old and new values; ``actor`` is the logged-in person, ``actor_label`` the channel
    (``admin``, ``cli``, ``apply``, ``api:<user>``...), ``source`` where the change came from
    (e.g. the applied file). Where it came from (surface, address, user agent, OS user) and, when
    the caller gives no actor, the request's authenticated user come from ``core.origin``."""
    where = origin.current()
    if actor is None:
        actor = where.user()
    payload: dict[str, Any] = {}
    if source:
        payload["source"] = source
    if changes:
        payload["fields"] = sorted(changes)
        payload["changes"] = {name: [_jsonable(old), _jsonable(new)] for name, (old, new) in changes.items()}
    for key, value in (data or {}).items():
        payload[key] = _jsonable(value)
    event = AuditEvent(
        action=action,
        tenant=tenant if tenant is not None and tenant.pk is not None else None,
        target=target[:_TARGET_MAX],
        data=normalise(payload),
        actor_id=actor.pk if actor is not None else None,
        actor_name=actor.get_username()[:150] if actor is not None else "",
        actor_label=actor_label or where.surface,
        origin=(where.surface or actor_label.split(":", 1)[0])[:20],
        address=where.address,
        user_agent=where.user_agent,
        os_user=where.os_user,
    )
    with transaction.atomic():
        head = _head()
        event.seq = head.head_seq + 1
        event.prev_hash = head.head_hash
        event.at = timezone.now()
        event.hash = row_hash(event)
        event.save(force_insert=True)
        head.head_seq, head.head_hash = event.seq, event.hash
        head.save(update_fields=["head_seq", "head_hash"])
    return event


# --- verification --------------------------------------------------------------------------------


@dataclass
class Verification:
    """What ``verify()`` found: ``problem`` is None when the chain holds."""

    checked: int = 0
    anchor_seq: int = 0
    head_seq: int = 0
    problem: str | None = None
    seq: int | None = None  # the first row altered or removed

    @property
    def ok(self) -> bool:
        return self.problem is None


def verify() -> Verification:
    """Walk the chain from the anchor (the last pruned row) to the head; stop at the first row that
    was altered, removed or inserted."""
    head = AuditChain.objects.filter(pk=1).first()
    rows = AuditEvent.objects.order_by("seq")
    if head is None:
        if rows.exists():
            return Verification(problem="the chain's bookkeeping row (tenants_auditchain pk 1) was removed")
        return Verification()
    result = Verification(anchor_seq=head.anchor_seq, head_seq=head.head_seq)
    expected, prev = head.anchor_seq + 1, head.anchor_hash
    for row in rows.iterator(chunk_size=2000):
        if row.seq < expected:
            result.problem, result.seq = (
                f"row #{row.seq} (id {row.pk}) lies before the anchor #{head.anchor_seq}",
                row.seq,
            )
            return result
        if row.seq > expected:
            missing = f"#{expected}" if row.seq == expected + 1 else f"#{expected} to #{row.seq - 1}"
            result.problem, result.seq = f"row {missing} removed (the next row is #{row.seq})", expected
            return result
        if row.prev_hash != prev:
            result.problem, result.seq = (
                f"row #{row.seq} (id {row.pk}) does not link to row #{row.seq - 1}: "
                f"row #{row.seq - 1} was replaced or row #{row.seq}'s link altered",
                row.seq,
            )
            return result
        if row_hash(row) != row.hash:
            result.problem, result.seq = f"row #{row.seq} (id {row.pk}) altered: its hash does not match", row.seq
            return result
        prev, expected = row.hash, expected + 1
        result.checked += 1
    if expected - 1 != head.head_seq or prev != head.head_hash:
        if expected - 1 < head.head_seq:
            first = expected
            result.problem = f"row #{first} to #{head.head_seq} removed (the chain's head is #{head.head_seq})"
        else:
            first = head.head_seq
            result.problem = f"the chain's head (#{head.head_seq}) does not match the last row (#{expected - 1})"
        result.seq = first
        return result
    if head.anchor_seq:
        prune = AuditEvent.objects.filter(action=PRUNE_ACTION).order_by("-seq").first()
        through = prune.data.get("through_seq") if prune is not None else None
        if prune is None or through != head.anchor_seq or prune.data.get("through_hash") != head.anchor_hash:
            result.problem = (
                f"the anchor (#{head.anchor_seq}) does not match the last {PRUNE_ACTION} row "
                f"({'none' if prune is None else f'#{prune.seq}, through #{through}'})"
            )
            result.seq = head.anchor_seq
    return result


# --- retention -----------------------------------------------------------------------------------

PRUNE_ACTION = "audit.prune"


@dataclass
class Pruned:
    cutoff: datetime
    rows: int = 0
    through_seq: int = 0


def prune(now: datetime | None = None, retention_days: int | None = None) -> Pruned:
    """Delete the rows older than ``CHITTYCAN_AUDIT_RETENTION_DAYS`` (a prefix of the chain), move
    the anchor to the last one deleted and record that in the chain (``audit.prune``), so the rest
    still verifies and the anchor itself is covered by a hash."""
    days = settings.CHITTYCAN_AUDIT_RETENTION_DAYS if retention_days is None else retention_days
    cutoff = (now or timezone.now()) - timedelta(days=days)
    result = Pruned(cutoff=cutoff)
    with transaction.atomic():
        head = _head()
        last = AuditEvent.objects.filter(at__lt=cutoff).order_by("-seq").first()
        if last is None:
            return result
        result.rows, _ = AuditEvent.objects.filter(seq__lte=last.seq).delete()
        result.through_seq = last.seq
        head.anchor_seq, head.anchor_hash = last.seq, last.hash
        head.save(update_fields=["anchor_seq", "anchor_hash"])
        record(
            PRUNE_ACTION,
            data={
                "through_seq": last.seq,
                "through_hash": last.hash,
                "rows": result.rows,
                "cutoff": cutoff.isoformat(),
                "retention_days": days,
            },
            actor_label=origin.current().surface or "retention",
        )
    if result.rows:
        log.info("pruned %d audit rows through #%d (before %s)", result.rows, last.seq, cutoff.isoformat())
    return result


# --- export --------------------------------------------------------------------------------------

EXPORT_FIELDS: Final = (
    "seq",
    "at",
    "action",
    "target",
    "tenant",
    "actor",
    "actor_label",
    "origin",
    "address",
    "user_agent",
    "os_user",
    "data",
    "prev_hash",
    "hash",
)


def subtree_ids(tenant: Tenant) -> set[int]:
    """The tenant and every tenant below it."""
    children: dict[int | None, list[int]] = {}
    for pk, parent in Tenant.objects.values_list("id", "parent_id"):
        children.setdefault(parent, []).append(pk)
    ids: set[int] = set()
    todo = [tenant.pk]
    while todo:
        node = todo.pop()
        if node not in ids:
            ids.add(node)
            todo.extend(children.get(node, []))
    return ids


def events(
    *, since: datetime | None = None, until: datetime | None = None, tenant_ids: set[int] | None = None
) -> QuerySet[AuditEvent]:
    """Audit rows in chain order, from ``since`` (inclusive) to ``until`` (exclusive), of the given
    tenants (``None``: every row, the ones about no tenant included)."""
    qs = AuditEvent.objects.select_related("tenant").order_by("seq")
    if since is not None:
        qs = qs.filter(at__gte=since)
    if until is not None:
        qs = qs.filter(at__lt=until)
    if tenant_ids is not None:
        qs = qs.filter(tenant_id__in=tenant_ids)
    return qs


def as_dict(event: AuditEvent) -> dict[str, Any]:
    """One row for an export or the REST API (the tenant by slug, the actor by name)."""
    return {
        "seq": event.seq,
        "at": event.at.isoformat(),
        "action": event.action,
        "target": event.target,
        "tenant": event.tenant.slug if event.tenant is not None else None,
        "actor": event.actor_name or None,
        "actor_label": event.actor_label,
        "origin": event.origin,
        "address": event.address,
        "user_agent": event.user_agent,
        "os_user": event.os_user,
        "data": event.data,
        "prev_hash": event.prev_hash,
        "hash": event.hash,
    }


class Writer(Protocol):
    def write(self, text: str, /) -> Any: ...


def write_jsonl(rows: Iterable[AuditEvent], out: Writer) -> int:
    count = 0
    for event in rows:
        out.write(json.dumps(as_dict(event), sort_keys=True, ensure_ascii=False) + "\n")
        count += 1
    return count


def write_csv(rows: Iterable[AuditEvent], out: Writer) -> int:
    writer = csv.DictWriter(out, fieldnames=EXPORT_FIELDS, lineterminator="\n")
    writer.writeheader()
    count = 0
    for event in rows:
        row = as_dict(event)
        row["data"] = json.dumps(row["data"], sort_keys=True, ensure_ascii=False)
        row["tenant"] = row["tenant"] or ""
        row["actor"] = row["actor"] or ""
        writer.writerow(row)
        count += 1
    return count
