"""Stripe export: ledger rows -> Billing Meter events (CSV for the Dashboard import, or pushed by API).

``export_run_create`` is the only writer of export lines. Under one database lock and one
transaction it reads the ledger rows of the period that have no ``ExportedUsage`` mark, maps
each tenant to the nearest tenant (itself or an ancestor) holding a Stripe customer id, sums the
integer micro-USD cost per customer and bucket, writes one ``ExportLine`` per sum and one mark per
ledger row covered. Rows of tenants without a customer are reported on the run and left unmarked,
so they are billed once a customer id is set. Exporting a period again only bills rows that
arrived since; their line reuses the bucket's identifier with a ``-<seq>`` suffix.

``export_run_push`` sends the lines through the ``stripe`` library with an idempotency key derived
from the identifier; see ``billing_export/stripe_api.py``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import re
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Exists, OuterRef
from django.utils import timezone

from billing_export.models import ExportedUsage, ExportLine, ExportRun, Granularity
from ledger.models import UsageRecord
from tenants.models import Tenant

__all__ = [
    "ExportError",
    "Period",
    "PushResult",
    "csv_header",
    "export_csv_parts",
    "export_run_create",
    "export_run_push",
    "export_write_files",
    "parse_period",
    "resolve_customers",
]

logger = logging.getLogger(__name__)

# Stripe accepts meter event timestamps "within the past 35 calendar days or up to 5 minutes in the future".
STRIPE_MAX_AGE = timedelta(days=35)
# Stripe rejects values with more than 15 significant digits.
MAX_VALUE = 10**15 - 1
IDENTIFIER_MAX = 100
_LOCK_KEY = 0x63635F62696C6C  # "cc_bill": one export at a time per database
_MARK_BATCH = 5000


class ExportError(Exception):
    """A bad period or setting, or a ledger state the export refuses to bill."""


@dataclass(frozen=True)
class Period:
    label: str
    start: datetime
    end: datetime  # exclusive


_MONTH = re.compile(r"^(\d{4})-(\d{2})$")
_DAY = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$")


def parse_period(text: str) -> Period:
    """``YYYY-MM`` (a calendar month) or ``YYYY-MM-DD`` (one day), in UTC."""
    value = text.strip()
    try:
        if m := _MONTH.match(value):
            year, month = int(m[1]), int(m[2])
            start = datetime(year, month, 1, tzinfo=UTC)
            end = datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=UTC)
            return Period(value, start, end)
        if m := _DAY.match(value):
            day = date(int(m[1]), int(m[2]), int(m[3]))
            start = datetime(day.year, day.month, day.day, tzinfo=UTC)
            return Period(value, start, start + timedelta(days=1))
    except ValueError as exc:
        raise ExportError(f"period {text!r} is not a valid date: {exc}") from exc
    raise ExportError(f"period must be YYYY-MM or YYYY-MM-DD, got {text!r}")


# --- tenant -> customer ----------------------------------------------------------------------


@dataclass(frozen=True)
class Billed:
    tenant_id: int
    slug: str
    customer_id: str


def resolve_customers() -> tuple[dict[int, Billed], dict[int, str]]:
    """Map every tenant id to the tenant that pays for it: itself if it has a Stripe customer id,
    else its nearest ancestor that has one. Returns (mapping, slugs of all tenants)."""
    rows = {t[0]: t for t in Tenant.objects.values_list("id", "parent_id", "slug", "stripe_customer_id")}
    slugs = {tid: row[2] for tid, row in rows.items()}
    result: dict[int, Billed] = {}
    for tid in rows:
        node: int | None = tid
        seen: set[int] = set()
        while node is not None and node not in seen and node in rows:
            seen.add(node)
            _, parent_id, slug, customer = rows[node]
            if customer.strip():
                result[tid] = Billed(node, slug, customer.strip())
                break
            node = parent_id
    return result, slugs


# --- export ------------------------------------------------------------------------------------


def _bucket(created_at: datetime, granularity: str) -> datetime:
    at = created_at.astimezone(UTC)
    if granularity == Granularity.HOUR:
        return at.replace(minute=0, second=0, microsecond=0)
    if granularity == Granularity.DAY:
        return at.replace(hour=0, minute=0, second=0, microsecond=0)
    return at


def _bucket_code(bucket: datetime, granularity: str, request_id: str) -> str:
    if granularity == Granularity.DAY:
        return bucket.strftime("%Y%m%d")
    if granularity == Granularity.HOUR:
        return bucket.strftime("%Y%m%dT%H")
    return f"r{request_id}"


def _identifier(base_key: str, seq: int) -> str:
    """Readable when it fits Stripe's 100 characters, else a stable hash of the same key."""
    suffix = "" if seq == 1 else f"-{seq}"
    ident = f"{base_key}{suffix}"
    if len(ident) <= IDENTIFIER_MAX:
        return ident
    prefix = settings.CHITTYCAN_STRIPE_IDENTIFIER_PREFIX
    return f"{prefix}-h{hashlib.sha256(base_key.encode()).hexdigest()[:64]}{suffix}"


@dataclass
class _Tally:
    """A number of ledger rows and the sum of their integer micro-USD cost."""

    rows: int = 0
    cost: int = 0

    def add(self, cost: int) -> None:
        self.rows += 1
        self.cost += cost


@dataclass
class _BucketSum:
    """One customer's not-yet-exported rows in one bucket: what becomes one ``ExportLine``."""

    billed: Billed
    bucket: datetime
    code: str
    first_id: int
    last_id: int = 0
    total: _Tally = field(default_factory=_Tally)
    ids: array[int] = field(default_factory=lambda: array("q"))
    sources: dict[int, _Tally] = field(default_factory=dict)  # tenant id -> its share of the sum

    def add(self, usage_id: int, tenant_id: int, cost: int) -> None:
        self.total.add(cost)
        self.last_id = usage_id
        self.ids.append(usage_id)
        self.sources.setdefault(tenant_id, _Tally()).add(cost)


@dataclass
class _Sums:
    """The period's unexported rows summed: per bucket key for mapped tenants, per tenant for the rest."""

    buckets: dict[str, _BucketSum] = field(default_factory=dict)  # base key -> sum, in first-row order
    unmapped: dict[int, _Tally] = field(default_factory=dict)  # tenant id without a customer -> its rows


# id, tenant id, created_at, cost_micro, request_id of one ledger row
_Row = tuple[int, int, datetime, int, str]


def _lock() -> None:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_LOCK_KEY])
    # SQLite (embedded mode) runs write transactions one at a time (transaction_mode IMMEDIATE).


def _unexported_rows(period: Period) -> Iterator[_Row]:
    """The period's billable ledger rows (cost > 0) that no export line covers yet, by id."""
    marked = ExportedUsage.objects.filter(usage_id=OuterRef("pk"))
    qs = (
        UsageRecord.objects.filter(created_at__gte=period.start, created_at__lt=period.end, cost_micro__gt=0)
        .filter(~Exists(marked))
        .order_by("id")
        .values_list("id", "tenant_id", "created_at", "cost_micro", "request_id")
    )
    return qs.iterator(chunk_size=_MARK_BATCH)


def export_run_create(
    *,
    period: str,
    granularity: str | None = None,
    event_name: str | None = None,
    actor_label: str = "",
    now: datetime | None = None,
) -> ExportRun:
    """Bill every not-yet-exported ledger row of ``period``; return the recorded run.

    On failure nothing is billed (one transaction) and a FAILED run records the error, which is
    then raised as ``ExportError``.
    """
    p = parse_period(period)
    gran = granularity or settings.CHITTYCAN_STRIPE_AGGREGATION
    if gran not in Granularity.values:
        raise ExportError(f"granularity must be one of {', '.join(Granularity.values)}, got {gran!r}")
    event = (event_name or settings.CHITTYCAN_STRIPE_METER_EVENT).strip()
    if not event or len(event) > 100:
        raise ExportError("the meter event name must be 1 to 100 characters")
    now = now or timezone.now()
    try:
        with transaction.atomic():
            _lock()
            return _export(p, gran, event, actor_label, now)
    except ExportError as exc:
        _record_failure(p, gran, event, actor_label, str(exc))
        raise
    except Exception as exc:
        _record_failure(p, gran, event, actor_label, f"{type(exc).__name__}: {exc}")
        raise ExportError(f"export failed, nothing was billed: {type(exc).__name__}: {exc}") from exc


def _new_run(
    p: Period,
    gran: str,
    event: str,
    actor_label: str,
    *,
    status: str = ExportRun.Status.RUNNING,
    finished_at: datetime | None = None,
    error: str = "",
) -> ExportRun:
    return ExportRun.objects.create(
        period=p.label,
        period_start=p.start,
        period_end=p.end,
        granularity=gran,
        event_name=event,
        status=status,
        actor_label=actor_label,
        finished_at=finished_at,
        error=error,
    )


def _record_failure(p: Period, gran: str, event: str, actor_label: str, error: str) -> None:
    _new_run(p, gran, event, actor_label, status=ExportRun.Status.FAILED, finished_at=timezone.now(), error=error)


def _export(p: Period, gran: str, event: str, actor_label: str, now: datetime) -> ExportRun:
    run = _new_run(p, gran, event, actor_label)
    mapping, slugs = resolve_customers()
    sums = _sum_rows(_unexported_rows(p), mapping, gran, event)
    lines = _new_lines(run, sums.buckets, _exported_seqs(sums.buckets), slugs)
    created = _write_lines(lines, sums.buckets)
    _finish_run(run, created, sums, slugs, now)
    logger.info(
        "billing export",
        extra={"run": run.pk, "period": p.label, "lines": run.lines_count, "total_micro": run.total_micro},
    )
    return run


def _sum_rows(rows: Iterable[_Row], mapping: dict[int, Billed], gran: str, event: str) -> _Sums:
    """Sum rows per customer and bucket (the base key of their line), or per tenant when the tenant
    has no customer."""
    prefix = settings.CHITTYCAN_STRIPE_IDENTIFIER_PREFIX
    sums = _Sums()
    for usage_id, tenant_id, created_at, cost, request_id in rows:
        billed = mapping.get(tenant_id)
        if billed is None:
            sums.unmapped.setdefault(tenant_id, _Tally()).add(cost)
            continue
        bucket = _bucket(created_at, gran)
        code = _bucket_code(bucket, gran, request_id)
        base_key = f"{prefix}-{event}-{billed.customer_id}-{code}"
        acc = sums.buckets.get(base_key)
        if acc is None:
            acc = sums.buckets[base_key] = _BucketSum(billed=billed, bucket=bucket, code=code, first_id=usage_id)
        acc.add(usage_id, tenant_id, cost)
    return sums


def _exported_seqs(base_keys: Iterable[str]) -> dict[str, int]:
    """The highest sequence number already exported per bucket key, 0 for a new bucket.

    Deltas: a bucket exported before gets the next sequence number, so the same history always
    yields the same identifiers and a re-export never reuses one.
    """
    seqs = dict.fromkeys(base_keys, 0)
    for base_key, seq in ExportLine.objects.filter(base_key__in=list(seqs)).values_list("base_key", "seq"):
        seqs[base_key] = max(seqs[base_key], seq)
    return seqs


def _new_lines(
    run: ExportRun, buckets: dict[str, _BucketSum], exported_seqs: dict[str, int], slugs: dict[int, str]
) -> list[ExportLine]:
    """One unsaved line per bucket sum, ordered by bucket, customer and key."""
    lines: list[ExportLine] = []
    for base_key in sorted(buckets, key=lambda k: (buckets[k].bucket, buckets[k].billed.customer_id, k)):
        acc = buckets[base_key]
        if acc.total.cost > MAX_VALUE:
            raise ExportError(
                f"{acc.billed.slug} {acc.code}: {acc.total.cost} micro-USD has more than 15 digits; "
                "use a finer granularity (hour or request)"
            )
        seq = exported_seqs[base_key] + 1
        lines.append(
            ExportLine(
                run=run,
                identifier=_identifier(base_key, seq),
                base_key=base_key,
                seq=seq,
                event_name=run.event_name,
                customer_id=acc.billed.customer_id,
                tenant_id=acc.billed.tenant_id,
                tenant_slug=acc.billed.slug,
                granularity=run.granularity,
                bucket_start=acc.bucket,
                timestamp=int(acc.bucket.timestamp()),
                value=acc.total.cost,
                cost_micro=acc.total.cost,
                rows_count=acc.total.rows,
                first_usage_id=acc.first_id,
                last_usage_id=acc.last_id,
                sources=[
                    {"tenant_id": tid, "slug": slugs.get(tid, ""), "rows": t.rows, "cost_micro": t.cost}
                    for tid, t in sorted(acc.sources.items())
                ],
            )
        )
    return lines


def _write_lines(lines: list[ExportLine], buckets: dict[str, _BucketSum]) -> list[ExportLine]:
    """Save the lines and mark every ledger row each one covers; return the saved lines."""
    created = ExportLine.objects.bulk_create(lines, batch_size=1000)
    for line in created:
        ids = buckets[line.base_key].ids
        for i in range(0, len(ids), _MARK_BATCH):
            ExportedUsage.objects.bulk_create(
                [ExportedUsage(usage_id=uid, line_id=line.pk) for uid in ids[i : i + _MARK_BATCH]]
            )
    return created


def _unmapped_report(unmapped: dict[int, _Tally], slugs: dict[int, str]) -> list[dict[str, Any]]:
    """Tenants whose rows were left unbilled for want of a customer id, by slug."""
    return [
        {"tenant_id": tid, "slug": slugs.get(tid, f"#{tid} (deleted)"), "rows": t.rows, "cost_micro": t.cost}
        for tid, t in sorted(unmapped.items(), key=lambda kv: slugs.get(kv[0], ""))
    ]


def _stale_warning(lines: list[ExportLine], now: datetime) -> str:
    oldest_allowed = now - STRIPE_MAX_AGE
    stale = [line for line in lines if line.bucket_start < oldest_allowed]
    if not stale:
        return ""
    return (
        f"{len(stale)} line(s) have timestamps older than 35 days (oldest "
        f"{min(line.bucket_start for line in stale):%Y-%m-%d}); Stripe rejects them, so they will not be "
        "pushed and the CSV import will refuse them. Export at least daily."
    )


def _unmapped_warning(report: list[dict[str, Any]], unmapped_micro: int) -> str:
    if not report:
        return ""
    return (
        f"{len(report)} tenant(s) with billable usage have no Stripe customer id on themselves or any "
        f"ancestor; {unmapped_micro} micro-USD not exported (billed once a customer id is set): "
        + ", ".join(u["slug"] for u in report)
    )


def _finish_run(run: ExportRun, lines: list[ExportLine], sums: _Sums, slugs: dict[int, str], now: datetime) -> None:
    """Record the run's totals, its unmapped tenants and its warnings, and mark it done."""
    run.unmapped = _unmapped_report(sums.unmapped, slugs)
    run.unmapped_micro = sum(t.cost for t in sums.unmapped.values())
    warnings = (_stale_warning(lines, now), _unmapped_warning(run.unmapped, run.unmapped_micro))
    run.warnings = [w for w in warnings if w]
    run.lines_count = len(lines)
    run.rows_count = sum(b.total.rows for b in sums.buckets.values())
    run.total_micro = sum(b.total.cost for b in sums.buckets.values())
    run.total_value = sum(line.value for line in lines)
    run.status = ExportRun.Status.DONE
    run.finished_at = timezone.now()
    run.save()


# --- CSV ---------------------------------------------------------------------------------------


def csv_header() -> list[str]:
    return [
        "identifier",
        "timestamp",
        "event_name",
        f"payload_{settings.CHITTYCAN_STRIPE_CUSTOMER_KEY}",
        f"payload_{settings.CHITTYCAN_STRIPE_VALUE_KEY}",
    ]


def _csv_row(values: Iterable[object]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(values)
    return buf.getvalue().encode()


def export_csv_parts(lines: Iterable[ExportLine], max_bytes: int | None = None) -> list[bytes]:
    """Render lines as Stripe Billing Meter Event import CSV, split so each part stays under
    ``max_bytes`` (default CHITTYCAN_STRIPE_CSV_MAX_BYTES; Stripe's limit is 5 MB). Every part has
    the header. No lines gives one header-only part."""
    limit = max_bytes or settings.CHITTYCAN_STRIPE_CSV_MAX_BYTES
    header = _csv_row(csv_header())
    parts: list[bytes] = []
    current = [header]
    size = len(header)
    for line in lines:
        row = _csv_row([line.identifier, line.timestamp, line.event_name, line.customer_id, line.value])
        if size + len(row) > limit and len(current) > 1:
            parts.append(b"".join(current))
            current, size = [header], len(header)
        if size + len(row) > limit:
            raise ExportError(f"CSV size limit {limit} bytes is too small for one row")
        current.append(row)
        size += len(row)
    parts.append(b"".join(current))
    return parts


def export_write_files(lines: Iterable[ExportLine], out: Path, max_bytes: int | None = None) -> list[Path]:
    """Write ``out`` (one part) or ``<stem>-001<suffix>``, ``-002``, ... when the CSV is split."""
    parts = export_csv_parts(lines, max_bytes)
    out.parent.mkdir(parents=True, exist_ok=True)
    if len(parts) == 1:
        paths = [out]
    else:
        paths = [out.with_name(f"{out.stem}-{i:03d}{out.suffix or '.csv'}") for i in range(1, len(parts) + 1)]
    for path, data in zip(paths, parts, strict=True):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return paths


# --- push --------------------------------------------------------------------------------------


@dataclass
class PushResult:
    accepted: int = 0
    already_accepted: int = 0
    duplicates: int = 0
    failed: int = 0
    stale: int = 0
    skipped_locked: int = 0
    stopped: str = ""
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.stale == 0 and not self.stopped


def export_run_push(
    *,
    lines: Iterable[ExportLine] | None = None,
    period: str | None = None,
    client: object | None = None,
    now: datetime | None = None,
) -> PushResult:
    """Send not-yet-accepted lines (of ``period``, or the given ones) to Stripe as meter events.

    One line at a time, its row locked while it is sent, its status committed right after: a
    crash leaves every accepted line recorded, and the line in flight is re-sent with the same
    idempotency key and identifier, which Stripe answers without counting it again. Lines older
    than 35 days are marked stale and not sent. A connection failure or a 5xx stops the push
    (re-run it); a 4xx marks that line failed and goes on.
    """
    from billing_export import stripe_api  # noqa: PLC0415  (the stripe SDK is loaded only to push)

    if lines is None:
        if period is None:
            raise ExportError("push needs a period or lines")
        p = parse_period(period)
        lines = ExportLine.objects.filter(bucket_start__gte=p.start, bucket_start__lt=p.end).order_by("id")
    ids = [line.pk for line in lines]
    stripe_client = client if client is not None else stripe_api.make_client()
    now = now or timezone.now()
    result = PushResult()
    skip_locked = connection.features.has_select_for_update_skip_locked
    runs: set[int] = set()
    for line_id in ids:
        with transaction.atomic():
            qs = ExportLine.objects.filter(pk=line_id).select_for_update(skip_locked=skip_locked)
            line = qs.first()
            if line is None:
                result.skipped_locked += 1
                continue
            if line.push_status == ExportLine.PushStatus.ACCEPTED:
                result.already_accepted += 1
                continue
            runs.add(line.run_id)
            if line.timestamp < int((now - STRIPE_MAX_AGE).timestamp()):
                line.push_status = ExportLine.PushStatus.STALE
                line.push_error = "timestamp older than 35 days: Stripe refuses it; bill it by hand"
                line.save(update_fields=["push_status", "push_error"])
                result.stale += 1
                continue
            outcome = stripe_api.send_meter_event(stripe_client, line)
            line.push_attempts += 1
            if outcome.accepted:
                line.push_status = ExportLine.PushStatus.ACCEPTED
                line.pushed_at = timezone.now()
                line.push_error = "duplicate: Stripe already had this identifier" if outcome.duplicate else ""
                if outcome.duplicate:
                    result.duplicates += 1
                else:
                    result.accepted += 1
            else:
                line.push_status = ExportLine.PushStatus.FAILED
                line.push_error = outcome.error
                result.failed += 1
                result.errors.append(f"{line.identifier}: {outcome.error}")
            line.save(update_fields=["push_status", "push_attempts", "pushed_at", "push_error"])
        if not outcome.accepted and outcome.retryable:
            result.stopped = f"stopped after a transient error ({outcome.error}); re-run the push"
            break
    if runs:
        ExportRun.objects.filter(pk__in=runs).update(last_push_at=timezone.now())
    return result
