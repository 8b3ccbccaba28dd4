"""Stage 9, record: one usage row per request, handed off durably before the response completes.

With Redis the row is appended to a Redis stream (``XADD``) and the gateway's writer task (one
per process, in a consumer group) inserts rows in batches, acknowledging them only after the
database committed; rows of a crashed writer are claimed by another. Inserts are idempotent by
request id (``ON CONFLICT DO NOTHING``), so a replay never doubles a row. Without Redis (embedded
mode) rows queue in memory and the same writer inserts them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from asgiref.sync import sync_to_async
from django.conf import settings

from gateway.context import RequestContext
from gateway.runtime import background, redis_client

log = logging.getLogger(__name__)

GROUP = "writers"
_memory_queue: deque[dict[str, Any]] = deque()
_memory_event: asyncio.Event | None = None


def stream_key() -> str:
    return f"{settings.REDIS_PREFIX}:usage"


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def row_from_context(ctx: RequestContext) -> dict[str, Any]:
    usage = ctx.usage
    key = ctx.key
    deployment = ctx.deployment
    return {
        "request_id": ctx.request_id,
        "created_at": ctx.created_at,
        "tenant_id": key.tenant.id if key else None,
        "api_key_id": key.id if key else None,
        "endpoint": ctx.endpoint,
        "requested_model": ctx.requested_model[:200],
        "served_model": deployment.upstream_model if deployment else "",
        "provider": deployment.provider.slug if deployment else "",
        "deployment_id": deployment.id if deployment else None,
        "prompt_tokens": usage.prompt_tokens if usage else 0,
        "cached_tokens": usage.cached_tokens if usage else 0,
        "cache_write_tokens": usage.cache_write_tokens if usage else 0,
        "completion_tokens": usage.completion_tokens if usage else 0,
        "reasoning_tokens": usage.reasoning_tokens if usage else 0,
        "cost_micro": ctx.cost_micro,
        "usage_source": usage.source if usage else "estimated",
        "latency_ms": ctx.elapsed_ms(),
        "ttft_ms": ctx.ttft_ms,
        "status": ctx.status,
        "http_status": ctx.http_status,
        "error_type": ctx.error_type[:100],
        "stream": ctx.stream,
        "cache_hit": ctx.cache_hit,
        "end_user": ctx.end_user[:200],
        "timings": ctx.timings,
    }


async def hand_off(row: dict[str, Any]) -> None:
    """Queue a row durably. Raises if Redis cannot take it (the caller spools it)."""
    if settings.REDIS_URL:
        await redis_client().xadd(stream_key(), {b"row": orjson.dumps(row)})
        return
    _memory_queue.append(row)
    if _memory_event is not None:
        _memory_event.set()


async def hand_off_or_spool(row: dict[str, Any]) -> None:
    """Hand the row off; if the queue is unreachable, append it to the local spool file.

    The spool is an append-only JSON-lines file, fsynced per row, replayed by the writer loop
    (``replay_spool``); the unique request id makes a replay harmless.
    """
    try:
        await hand_off(row)
    except Exception:
        log.warning("usage queue unreachable; spooling row", extra={"request_id": row.get("request_id")})
        await sync_to_async(spool_row, thread_sensitive=False)(row)


def _spool_path() -> Path:
    directory: Path = settings.CHITTYCAN_USAGE_SPOOL_DIR
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"usage-{socket.gethostname()}-{os.getpid()}.jsonl"


def spool_row(row: dict[str, Any]) -> None:
    with open(_spool_path(), "ab") as fh:
        fh.write(orjson.dumps(row) + b"\n")
        fh.flush()
        os.fsync(fh.fileno())


def replay_spool() -> int:
    """Write every spooled row to the database, then remove the spool files. Returns rows replayed."""
    directory: Path = settings.CHITTYCAN_USAGE_SPOOL_DIR
    if not directory.exists():
        return 0
    replayed = 0
    for path in sorted(directory.glob("usage-*.jsonl")):
        working = path.with_suffix(".replaying")
        try:
            path.rename(working)
        except FileNotFoundError:
            continue
        rows = [orjson.loads(line) for line in working.read_bytes().splitlines() if line.strip()]
        try:
            write_rows(rows)
        except Exception:
            working.rename(path.with_name(f"{path.stem}-retry-{os.getpid()}.jsonl"))
            raise
        working.unlink()
        replayed += len(rows)
    return replayed


def write_rows(rows: list[dict[str, Any]]) -> int:
    """Insert rows, skipping request ids already present. Returns how many were new."""
    from gateway.models import UsageRecord

    if not rows:
        return 0
    objs = []
    for row in rows:
        data = dict(row)
        data["created_at"] = datetime.fromtimestamp(float(data["created_at"]), tz=UTC)
        objs.append(UsageRecord(**data))
    ids = [o.request_id for o in objs]
    before = set(UsageRecord.objects.filter(request_id__in=ids).values_list("request_id", flat=True))
    UsageRecord.objects.bulk_create(objs, ignore_conflicts=True, batch_size=500)
    return len(set(ids) - before)


async def _ensure_group() -> None:
    import redis

    try:
        await redis_client().xgroup_create(stream_key(), GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _decode(entries: list[Any]) -> tuple[list[bytes], list[dict[str, Any]]]:
    ids: list[bytes] = []
    rows: list[dict[str, Any]] = []
    for entry_id, fields in entries:
        ids.append(entry_id)
        raw = fields.get(b"row")
        if raw:
            rows.append(orjson.loads(raw))
    return ids, rows


async def _write_and_ack(ids: list[bytes], rows: list[dict[str, Any]]) -> None:
    if rows:
        await sync_to_async(write_rows, thread_sensitive=False)(rows)
    if ids:
        conn = redis_client()
        await conn.xack(stream_key(), GROUP, *ids)
        await conn.xdel(stream_key(), *ids)


async def drain_redis_once(count: int | None = None, block_ms: int = 1000) -> int:
    """Read one batch for this consumer (its own pending entries first) and write it."""
    await _ensure_group()
    conn = redis_client()
    batch = count or settings.CHITTYCAN_USAGE_BATCH_SIZE
    name = consumer_name()
    # Entries this consumer read but did not ack (a failed write): retry them first.
    pending: Any = await conn.xreadgroup(GROUP, name, {stream_key(): "0"}, count=batch)
    entries: list[Any] = pending[0][1] if pending else []
    if not entries:
        # Entries another consumer took and never acked for a minute (it crashed): take them over.
        claimed: Any = await conn.xautoclaim(stream_key(), GROUP, name, min_idle_time=60_000, count=batch)
        entries = claimed[1] if claimed else []
    if not entries:
        fresh: Any = await conn.xreadgroup(GROUP, name, {stream_key(): ">"}, count=batch, block=block_ms)
        entries = fresh[0][1] if fresh else []
    ids, rows = _decode(entries)
    await _write_and_ack(ids, rows)
    return len(rows)


async def drain_memory_once() -> int:
    rows: list[dict[str, Any]] = []
    while _memory_queue and len(rows) < settings.CHITTYCAN_USAGE_BATCH_SIZE:
        rows.append(_memory_queue.popleft())
    if rows:
        try:
            await sync_to_async(write_rows, thread_sensitive=False)(rows)
        except Exception:
            _memory_queue.extendleft(reversed(rows))
            raise
    return len(rows)


@background("usage-writer")
async def writer_loop() -> None:
    global _memory_event
    await sync_to_async(replay_spool, thread_sensitive=False)()
    if settings.REDIS_URL:
        while True:
            written = await drain_redis_once()
            if not written:
                await asyncio.sleep(settings.CHITTYCAN_USAGE_FLUSH_INTERVAL)
    _memory_event = asyncio.Event()
    while True:
        if not _memory_queue:
            _memory_event.clear()
            try:
                await asyncio.wait_for(_memory_event.wait(), timeout=1.0)
            except TimeoutError:
                continue
        await asyncio.sleep(settings.CHITTYCAN_USAGE_FLUSH_INTERVAL)  # let a batch build up
        await drain_memory_once()
