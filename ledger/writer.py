"""The usage writer: ledger rows handed off durably before a response completes, then written.

The gateway builds one row per request (``gateway.pipeline.record``) and hands it off here. With
Redis the row is appended to a Redis stream (``XADD``) and the writer task (one per gateway
process, in a consumer group) inserts rows in batches, acknowledging them only after the database
committed; rows of a crashed writer are claimed by another. Inserts are idempotent by request id
(``ON CONFLICT DO NOTHING``), so a replay never doubles a row. Without Redis (embedded mode) rows
queue in memory and the same writer inserts them.

Failure handling:

- Database unreachable (``OperationalError``/``InterfaceError``): nothing is acknowledged, the
  entries stay in the consumer's pending list and the writer retries with exponential backoff
  (``CHITTYCAN_USAGE_RETRY_MAX`` seconds at most). Nothing is lost and, thanks to the unique
  request id, nothing is doubled when the database comes back.
- A row the database rejects for good (bad data): the batch is split until the bad row is
  isolated; it moves to the dead-letter stream ``<prefix>:usage:dead`` and the rest are written.
- Redis unreachable at hand-off (or, in embedded mode, the database down): the row is appended
  to a local spool file (fsynced), which every writer replays periodically
  (``CHITTYCAN_USAGE_SPOOL_REPLAY_INTERVAL``), not only at start, and at once when Redis answers
  again after a failure.
- Redis losing the stream (restarted without persistence, failover to an empty replica): every
  row is also appended to this process's *journal* (``<spool dir>/journal/``, one append-only
  file per process, no fsync: the page cache survives ``kill -9`` of the process) before it is
  handed off. The journal task (``journal_loop``) forgets rows once they are in the ledger and
  writes those still missing after ``CHITTYCAN_USAGE_JOURNAL_GRACE`` seconds itself (idempotent
  by request id, so a row also in the stream is never doubled). The journal of a process that
  died is taken over by the next journal pass of any process on the host (its file lock is free).
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import logging
import os
import re
import socket
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg
import redis
import redis.asyncio as aioredis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, close_old_connections, connection
from django.db.models import Field

from core import backoff
from core.runtime import RedisBatch, background, key_prefix, redis_client
from ledger.models import UsageRecord

log = logging.getLogger(__name__)

GROUP = "writers"
_memory_queue: deque[dict[str, Any]] = deque()
_memory_event: asyncio.Event | None = None

#: Errors that mean "the database is unavailable right now": retry, never drop.
TRANSIENT_DB_ERRORS: tuple[type[BaseException], ...] = (OperationalError, InterfaceError)


def stream_key() -> str:
    return f"{key_prefix()}:usage"


def dead_letter_key() -> str:
    return f"{key_prefix()}:usage:dead"


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _setting(name: str, default: float) -> float:
    return float(getattr(settings, name, default))


async def hand_off(row: dict[str, Any]) -> None:
    """Queue a row durably. Raises if Redis cannot take it (the caller spools it)."""
    if settings.REDIS_URL:
        await redis_client().xadd(stream_key(), {b"row": orjson.dumps(row)})
        return
    _memory_queue.append(row)
    if _memory_event is not None:
        _memory_event.set()


async def hand_off_or_spool(row: dict[str, Any], batch: RedisBatch | None = None) -> None:
    """Hand the row off; if the queue is unreachable, append it to the local spool file.

    With ``batch`` (and Redis), the ``XADD`` joins the request's closing round trip; the row is
    spooled if that fails. The spool is an append-only JSON-lines file, fsynced per row, replayed
    by the writer loop (``replay_spool``); the unique request id makes a replay harmless.
    """
    data = orjson.dumps(row)
    _journal.append(row, data)
    if batch is not None and settings.REDIS_URL:
        batch.command("XADD", stream_key(), "*", b"row", data, on_error=functools.partial(_spool, row))
        return
    try:
        await hand_off(row)
    except Exception:
        await _spool(row)


async def _spool(row: dict[str, Any], exc: BaseException | None = None) -> None:
    global _spooled_since_replay
    _spooled_since_replay = True
    log.warning("usage queue unreachable; spooling row", extra={"request_id": row.get("request_id")})
    await sync_to_async(spool_row, thread_sensitive=False)(row)


# --- spool ------------------------------------------------------------------------------------
# Appenders and the replayer serialise on an exclusive flock of the spool file. The replayer
# deletes a file while holding its lock; an appender that gets the lock afterwards notices the
# path no longer names its inode and starts a fresh file, so no appended row can be lost.


#: Set when a row was spooled: the writer replays the spool as soon as Redis answers again.
_spooled_since_replay = False


def _spool_dir() -> Path:
    directory: Path = settings.CHITTYCAN_USAGE_SPOOL_DIR
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _spool_path() -> Path:
    return _spool_dir() / f"usage-{socket.gethostname()}-{os.getpid()}.jsonl"


def spool_row(row: dict[str, Any]) -> None:
    path = _spool_path()
    data = orjson.dumps(row) + b"\n"
    while True:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:
                continue  # a replayer took this file while we waited; append to a new one
            os.write(fd, data)
            os.fsync(fd)
            return
        finally:
            os.close(fd)  # closing releases the lock


def _read_spool_rows(data: bytes, path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            # A torn last line (crash mid-write) or damage: keep it aside for a human, go on.
            log.error("unreadable spool line %s:%d moved to the rejects file", path.name, number)
            with open(path.with_name("rejects.jsonl.bad"), "ab") as bad:
                bad.write(line + b"\n")
    return rows


def replay_spool() -> int:
    """Write every spooled row to the database and delete the replayed files. Returns rows replayed.

    Safe to run from several processes at once (files are locked, inserts are idempotent). If the
    database is down the files stay where they are for the next run and the error propagates.
    """
    directory: Path = settings.CHITTYCAN_USAGE_SPOOL_DIR
    if not directory.exists():
        return 0
    replayed = 0
    for path in sorted(directory.glob("usage-*.jsonl")):
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # another replayer (or an appender) holds it; next round
            try:
                if os.fstat(fd).st_ino != os.stat(path).st_ino:
                    continue
            except FileNotFoundError:
                continue
            with os.fdopen(os.dup(fd), "rb") as fh:
                rows = _read_spool_rows(fh.read(), path)
            _, rejected = write_rows_resilient(rows)
            if rejected:
                with open(path.with_name("rejects.jsonl.bad"), "ab") as bad:
                    bad.write(b"".join(orjson.dumps(r) + b"\n" for r in rejected))
            path.unlink()
            replayed += len(rows)
        finally:
            os.close(fd)
    if replayed:
        log.info("replayed %d spooled usage rows", replayed)
    return replayed


# --- journal -------------------------------------------------------------------------------------
# Every row handed off is first appended to this process's journal file (O_APPEND, one write per
# row, no fsync) and kept in ``_journal`` until the ledger has it. The file is locked (flock) for
# the life of the process: a file whose lock can be taken belongs to a process that is gone.


class _Journal:
    def __init__(self) -> None:
        self.fd: int | None = None
        self.path: Path | None = None
        self.pid = 0
        #: Request id -> (when journaled, the row's line as written): the encoded line, not the row,
        #: because it is a third of the memory (several hundred rows are in flight under load).
        self.rows: dict[str, tuple[float, bytes]] = {}
        self.size = 0

    def _open(self) -> int:
        if self.fd is not None and self.pid == os.getpid():
            return self.fd
        directory = _journal_dir()
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"journal-{socket.gethostname()}-{os.getpid()}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self.fd, self.path, self.pid, self.size = fd, path, os.getpid(), os.fstat(fd).st_size
        self.rows = {}
        return fd

    def append(self, row: dict[str, Any], encoded: bytes | None = None) -> None:
        rid = row.get("request_id")
        if not rid:
            return
        data = (encoded if encoded is not None else orjson.dumps(row)) + b"\n"
        try:
            os.write(self._open(), data)
        except OSError:
            log.exception("usage journal not writable; the row depends on the Redis stream alone")
            return
        self.size += len(data)
        self.rows[str(rid)] = (time.monotonic(), data)

    def forget(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.rows.pop(rid, None)
        self.compact()

    def compact(self) -> None:
        """Empty the file once every row is in the ledger; rewrite it when it holds mostly dead rows."""
        if self.fd is None or self.path is None or self.pid != os.getpid():
            return
        if not self.rows:
            if self.size:
                os.ftruncate(self.fd, 0)
                self.size = 0
            return
        if self.size < JOURNAL_REWRITE_BYTES:
            return
        data = b"".join(line for _, line in self.rows.values())
        if len(data) * 2 > self.size:
            return
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, data)
        os.replace(tmp, self.path)
        os.close(self.fd)
        self.fd, self.size = fd, len(data)


#: A journal file is rewritten (live rows only) past this size.
JOURNAL_REWRITE_BYTES = 4 * 1024 * 1024
_journal = _Journal()


def _journal_dir() -> Path:
    directory: Path = settings.CHITTYCAN_USAGE_SPOOL_DIR
    return directory / "journal"


def journal_row(row: dict[str, Any]) -> None:
    """Keep a local copy of a row until the ledger has it (see ``journal_loop``)."""
    _journal.append(row)


def journal_forget(request_ids: list[str]) -> None:
    """These rows are in the ledger: drop them from this process's journal."""
    if _journal.rows:
        _journal.forget(request_ids)


_lost_rows_written = 0


def lost_rows_written() -> int:
    """Rows this process wrote from its journal because the queue had lost them (since start)."""
    return _lost_rows_written


def journal_size() -> int:
    """Rows this process journaled that are not known to be in the ledger yet."""
    return len(_journal.rows) if _journal.pid == os.getpid() else 0


def _journal_files() -> list[Path]:
    directory = _journal_dir()
    return sorted(directory.glob("journal-*.jsonl")) if directory.exists() else []


def _journaled_rows() -> list[dict[str, Any]]:
    """Rows in this host's journal files (every process's), read without locks; torn lines skipped."""
    rows: list[dict[str, Any]] = []
    for path in _journal_files():
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        for line in data.splitlines():
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("request_id"):
                rows.append(row)
    return rows


def recover_orphan_journals() -> int:
    """Write the rows of journals whose process is gone (crash, restart) and delete those files.

    Returns the rows found. Raises a transient database error (the files stay for the next pass).
    """
    found = 0
    for path in _journal_files():
        if _journal.path is not None and path == _journal.path and _journal.pid == os.getpid():
            continue
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its process is alive
            try:
                if os.fstat(fd).st_ino != os.stat(path).st_ino:
                    continue
            except FileNotFoundError:
                continue
            with os.fdopen(os.dup(fd), "rb") as fh:
                rows = _read_spool_rows(fh.read(), path)
            if rows:
                new, rejected = write_rows_resilient(rows)
                if rejected:
                    with open(path.with_name("rejects.jsonl.bad"), "ab") as bad:
                        bad.write(b"".join(orjson.dumps(r) + b"\n" for r in rejected))
                if new:
                    global _lost_rows_written
                    _lost_rows_written += new
                log.warning("usage journal of a gone process: %d rows checked against the ledger", len(rows))
            path.unlink()
            found += len(rows)
        finally:
            os.close(fd)
    return found


def _settle_journal(due: list[dict[str, Any]]) -> list[str]:
    """Rows journaled a while ago: write those the ledger still lacks. Returns the ids now written."""
    close_old_connections()
    ids = [str(r["request_id"]) for r in due]
    written = set(UsageRecord.objects.filter(request_id__in=ids).values_list("request_id", flat=True))
    missing = [r for r in due if str(r["request_id"]) not in written]
    if missing:
        new, rejected = write_rows_resilient(missing)
        if new:
            global _lost_rows_written
            _lost_rows_written += new
            log.warning("usage journal: wrote %d rows the queue had lost", new)
        for row in rejected:
            spool_row(row)  # kept aside like any rejected row (the replay moves it to the rejects)
    return ids


async def journal_pass(now: float | None = None) -> int:
    """One pass of the journal task: take over gone processes' journals, then check this process's
    rows older than the grace period against the ledger (writing what is missing). Returns how
    many rows left the journal."""
    await sync_to_async(recover_orphan_journals, thread_sensitive=False)()
    if _journal.pid != os.getpid() or not _journal.rows:
        return 0
    moment = now if now is not None else time.monotonic()
    grace = _setting("CHITTYCAN_USAGE_JOURNAL_GRACE", 5.0)
    lines = [line for at, line in list(_journal.rows.values()) if moment - at >= grace][:5000]
    if not lines:
        return 0
    due = [orjson.loads(line) for line in lines]
    done = await sync_to_async(_settle_journal, thread_sensitive=False)(due)
    _journal.forget(done)
    return len(done)


@background("usage-journal")
async def journal_loop() -> None:
    failures = 0
    while True:
        try:
            await journal_pass()
            failures = 0
            await asyncio.sleep(JOURNAL_INTERVAL)
        except TRANSIENT_DB_ERRORS:
            failures += 1
            await asyncio.sleep(backoff_seconds(failures))


#: Seconds between journal passes.
JOURNAL_INTERVAL = 1.0


# --- handed off, not yet written ---------------------------------------------------------------


def _stream_rows() -> list[dict[str, Any]]:
    conn = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2)
    try:
        entries: Any = conn.xrange(stream_key(), count=100_000)
    finally:
        conn.close()
    _, rows, _ = _decode(entries or [])
    return rows


def _spooled_rows() -> list[dict[str, Any]]:
    """Rows in this host's spool files, read without taking their locks: a line being appended
    right now (torn) is skipped, not moved aside; the replayer deals with it."""
    directory: Path = settings.CHITTYCAN_USAGE_SPOOL_DIR
    rows: list[dict[str, Any]] = []
    for path in sorted(directory.glob("usage-*.jsonl")) if directory.exists() else ():
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue  # replayed meanwhile: its rows are in the ledger now
        for line in data.splitlines():
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("request_id"):
                rows.append(row)
    return rows


def local_pending_rows() -> list[dict[str, Any]]:
    """Rows on this host (spool files, journals) not yet in the ledger, each request once; needs
    no Redis. Synchronous."""
    return _not_in_ledger([*_spooled_rows(), *_journaled_rows()])


def _not_in_ledger(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` without the ones the ledger already has, each request once."""
    unique = list({str(r["request_id"]): r for r in rows if r.get("request_id")}.values())
    if not unique:
        return []
    written = set(
        UsageRecord.objects.filter(request_id__in=[r["request_id"] for r in unique]).values_list(
            "request_id", flat=True
        )
    )
    return [r for r in unique if r["request_id"] not in written]


def pending_rows() -> list[dict[str, Any]]:
    """Rows handed off but not yet in the ledger, each request once: the Redis stream (every
    process's rows, when ``REDIS_URL`` is set), this host's spool files and its journals (rows
    being handed off right now, and rows a Redis restart took from the stream). Synchronous; call
    off the event loop. Raises ``redis.RedisError`` if Redis is unreachable.

    Rows already in the ledger when this looks are left out. A row the writer commits just after
    is returned and may also be in a ledger sum the caller takes afterwards: the caller counts it
    once (``ledger_value`` of the budgets subtracts such rows in the same statement).
    """
    return _not_in_ledger([*(_stream_rows() if settings.REDIS_URL else ()), *_spooled_rows(), *_journaled_rows()])


# --- database -----------------------------------------------------------------------------------


def _usage_fields() -> set[str]:
    return {f.attname for f in UsageRecord._meta.concrete_fields if f.attname not in ("id", "recorded_at")}


def _to_record(row: dict[str, Any], fields: set[str]) -> UsageRecord:
    data = {k: v for k, v in row.items() if k in fields}
    data["created_at"] = datetime.fromtimestamp(float(data["created_at"]), tz=UTC)
    return UsageRecord(**data)


def write_rows(rows: list[dict[str, Any]]) -> int:
    """Insert rows, skipping request ids already present. Returns how many were new.

    Raises on any database error; see ``write_rows_resilient`` for the writer's policy.
    """
    if not rows:
        return 0
    if connection.vendor == "postgresql":
        return _write_rows_postgres(rows)
    fields = _usage_fields()
    objs = [_to_record(row, fields) for row in rows]
    ids = [o.request_id for o in objs]
    before = set(UsageRecord.objects.filter(request_id__in=ids).values_list("request_id", flat=True))
    UsageRecord.objects.bulk_create(objs, ignore_conflicts=True, batch_size=500)
    return len(set(ids) - before)


@functools.cache
def _postgres_insert() -> tuple[str, tuple[tuple[str, Field[Any, Any], str], ...]]:
    """The ledger's insert statement, and per column: its attribute, its field, how to convert."""
    fields = [f for f in UsageRecord._meta.concrete_fields if f.attname not in ("id", "recorded_at") and f.column]
    quote = connection.ops.quote_name
    # Base types without length (varchar(64) -> varchar): an explicit cast would truncate silently,
    # while the column's own assignment cast rejects an over-long value as bulk_create does.
    arrays = ", ".join(f"%b::{re.sub(r'[(].*[)]', '', f.db_type(connection) or 'text')}[]" for f in fields)
    sql = (
        f"INSERT INTO {quote(UsageRecord._meta.db_table)} ({', '.join(quote(f.column) for f in fields)}) "
        f"SELECT * FROM unnest({arrays}) ON CONFLICT (request_id) DO NOTHING RETURNING 1"
    )
    columns = []
    for f in fields:
        kind = "time" if f.attname == "created_at" else "json" if f.get_internal_type() == "JSONField" else ""
        columns.append((f.attname, f, kind))
    return sql, tuple(columns)


def _write_rows_postgres(rows: list[dict[str, Any]]) -> int:
    """One ``INSERT ... SELECT FROM unnest(<one array per column>) ON CONFLICT DO NOTHING``.

    Same rows as ``bulk_create`` but without building a model instance and compiling a value per
    field per row: on the benchmark the ORM path cost ~0.2 ms of the gateway's CPU per request.
    The arrays go as binary parameters (``%b``) bound by the server (a plain psycopg cursor, not Django's
    client-side binding, which quoted every element in Python while holding the GIL: a tenth of
    the gateway's CPU at c=10).
    """
    sql, spec = _postgres_insert()
    columns: list[list[Any]] = []
    for name, field, kind in spec:
        values = [row[name] if name in row else field.get_default() for row in rows]
        if kind == "time":
            values = [datetime.fromtimestamp(float(v), tz=UTC) for v in values]
        elif kind == "json":
            values = [orjson.dumps(v).decode() for v in values]
        columns.append(values)
    connection.ensure_connection()
    with connection.wrap_database_errors, psycopg.Cursor(connection.connection) as cursor:
        cursor.execute(sql, columns)
        return len(cursor.fetchall())


def write_rows_resilient(rows: list[dict[str, Any]]) -> tuple[int, list[dict[str, Any]]]:
    """Write rows; isolate rows the database rejects for good. Returns (new rows, rejected rows).

    Transient errors (database down) propagate so the caller retries the whole batch later.
    """
    close_old_connections()  # drop a connection an outage broke, so this attempt reconnects
    try:
        return write_rows(rows), []
    except TRANSIENT_DB_ERRORS:
        close_old_connections()
        raise
    except (DatabaseError, ValueError, TypeError, KeyError) as exc:
        if len(rows) == 1:
            log.error("usage row rejected: %s", exc, extra={"request_id": rows[0].get("request_id")})
            return 0, rows
    half = len(rows) // 2
    written_a, rejected_a = write_rows_resilient(rows[:half])
    written_b, rejected_b = write_rows_resilient(rows[half:])
    return written_a + written_b, rejected_a + rejected_b


# --- Redis stream consumer --------------------------------------------------------------------


async def _ensure_group() -> None:
    try:
        await redis_client().xgroup_create(stream_key(), GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _decode(entries: list[Any]) -> tuple[list[bytes], list[dict[str, Any]], list[bytes]]:
    """Entry ids, rows, and the raw payloads that are not valid rows (dead letters)."""
    ids: list[bytes] = []
    rows: list[dict[str, Any]] = []
    bad: list[bytes] = []
    for entry_id, fields in entries:
        ids.append(entry_id)
        raw = (fields or {}).get(b"row")
        if not raw:
            continue  # an entry deleted while pending shows up with no fields
        try:
            row = orjson.loads(raw)
        except orjson.JSONDecodeError:
            bad.append(raw)
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad.append(raw)
    return ids, rows, bad


async def _write_and_ack(ids: list[bytes], rows: list[dict[str, Any]], bad: list[bytes]) -> None:
    rejected: list[dict[str, Any]] = []
    if rows:
        _, rejected = await sync_to_async(write_rows_resilient, thread_sensitive=False)(rows)
        journal_forget([str(r.get("request_id")) for r in rows])
    conn = redis_client()
    for payload in [*bad, *(orjson.dumps(r) for r in rejected)]:
        await conn.xadd(dead_letter_key(), {b"row": payload})
    if ids:
        await conn.xack(stream_key(), GROUP, *ids)
        await conn.xdel(stream_key(), *ids)


#: How long an idle writer's read waits for new rows. A blocked XREADGROUP holds the socket
#: silent, so the wait must end well inside the client's socket timeout (``read_block_ms``);
#: otherwise every idle read ends in a timeout that looks like Redis being down.
READ_BLOCK_MS = 500


def read_block_ms(conn: aioredis.Redis, wanted: int = READ_BLOCK_MS) -> int:
    """``wanted`` milliseconds, but at most half the client's socket timeout."""
    timeout = conn.connection_pool.connection_kwargs.get("socket_timeout")
    if not timeout:
        return wanted
    return max(1, min(wanted, int(float(timeout) * 1000) // 2))


async def drain_redis_once(count: int | None = None, block_ms: int = READ_BLOCK_MS) -> int:
    """Read one batch for this consumer (its own pending entries first) and write it.

    Raises a transient database error without acknowledging anything: the entries stay pending
    and the next call retries them first.
    """
    await _ensure_group()
    conn = redis_client()
    block_ms = read_block_ms(conn, block_ms)
    batch = count or settings.CHITTYCAN_USAGE_BATCH_SIZE
    name = consumer_name()
    # Entries this consumer read but did not ack (a failed write): retry them first.
    pending: Any = await conn.xreadgroup(GROUP, name, {stream_key(): "0"}, count=batch)
    entries: list[Any] = pending[0][1] if pending else []
    if not entries:
        # Entries another consumer took and never acked for a while (it crashed): take them over.
        idle_ms = int(_setting("CHITTYCAN_USAGE_CLAIM_IDLE_MS", 60_000))
        claimed: Any = await conn.xautoclaim(stream_key(), GROUP, name, min_idle_time=idle_ms, count=batch)
        entries = claimed[1] if claimed else []
    if not entries:
        fresh: Any = await conn.xreadgroup(GROUP, name, {stream_key(): ">"}, count=batch, block=block_ms)
        entries = fresh[0][1] if fresh else []
    ids, rows, bad = _decode(entries)
    await _write_and_ack(ids, rows, bad)
    return len(ids)


async def drain_memory_once() -> int:
    rows: list[dict[str, Any]] = []
    while _memory_queue and len(rows) < settings.CHITTYCAN_USAGE_BATCH_SIZE:
        rows.append(_memory_queue.popleft())
    if rows:
        try:
            await sync_to_async(write_rows_resilient, thread_sensitive=False)(rows)
            journal_forget([str(r.get("request_id")) for r in rows])
        except TRANSIENT_DB_ERRORS:
            # Embedded mode has no Redis stream to keep them in: make them durable on disk; the
            # periodic spool replay writes them when the database is back.
            try:
                await sync_to_async(_spool_many, thread_sensitive=False)(rows)
            except OSError:
                _memory_queue.extendleft(reversed(rows))
            raise
        except Exception:
            _memory_queue.extendleft(reversed(rows))
            raise
    return len(rows)


def _spool_many(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        spool_row(row)


def backoff_seconds(failures: int) -> float:
    """Exponential backoff with full jitter, capped by CHITTYCAN_USAGE_RETRY_MAX."""
    cap = _setting("CHITTYCAN_USAGE_RETRY_MAX", 30.0)
    base = _setting("CHITTYCAN_USAGE_RETRY_BASE", 0.25)
    return backoff.delay(failures, base=base, cap=cap)


class _SpoolTimer:
    def __init__(self) -> None:
        self.next_at = 0.0
        self.last_at = 0.0

    def soon(self) -> None:
        """Rows were spooled: replay them within about a second (the database is what they need),
        not only at the next periodic round."""
        global _spooled_since_replay
        if _spooled_since_replay:
            _spooled_since_replay = False
            self.next_at = min(self.next_at, self.last_at + 1.0)

    async def maybe_replay(self) -> None:
        now = time.monotonic()
        if now < self.next_at:
            return
        self.last_at = now
        self.next_at = now + _setting("CHITTYCAN_USAGE_SPOOL_REPLAY_INTERVAL", 30.0)
        try:
            await sync_to_async(replay_spool, thread_sensitive=False)()
        except TRANSIENT_DB_ERRORS:
            log.warning("database unavailable; spooled usage rows kept for the next replay")


#: The stream (and with it the consumer group) was deleted under a blocked read, e.g. by FLUSHDB
#: or a failover to an empty replica: not an outage, the next round recreates the group.
_STREAM_GONE = ("NOGROUP", "no longer exists")
#: Redis errors back off less far than database errors: the queue is on the request path.
REDIS_RETRY_MAX = 5.0


@background("usage-writer")
async def writer_loop() -> None:
    global _memory_event
    spool = _SpoolTimer()
    db_failures = redis_failures = 0
    if not settings.REDIS_URL:
        _memory_event = asyncio.Event()
    while True:
        spool.soon()
        await spool.maybe_replay()
        try:
            if settings.REDIS_URL:
                written = await drain_redis_once()
                if written < settings.CHITTYCAN_USAGE_BATCH_SIZE:
                    # Not a full batch: let the next one build up (fewer, larger inserts).
                    await asyncio.sleep(settings.CHITTYCAN_USAGE_FLUSH_INTERVAL)
            else:
                await _memory_round()
            db_failures = redis_failures = 0
        except TRANSIENT_DB_ERRORS:
            db_failures += 1
            delay = backoff_seconds(db_failures)
            log.warning("database unavailable; usage rows stay queued, retry in %.2f s", delay)
            await asyncio.sleep(delay)
        except redis.ResponseError as exc:
            if any(marker in str(exc) for marker in _STREAM_GONE):
                log.info("usage stream or consumer group vanished; recreating it")
                await asyncio.sleep(settings.CHITTYCAN_USAGE_FLUSH_INTERVAL)
                continue
            redis_failures += 1
            delay = min(REDIS_RETRY_MAX, backoff_seconds(redis_failures))
            log.warning("usage queue (Redis) error %s; retry in %.2f s", exc, delay)
            await asyncio.sleep(delay)
        except redis.RedisError:
            redis_failures += 1
            delay = min(REDIS_RETRY_MAX, backoff_seconds(redis_failures))
            log.warning("usage queue (Redis) unavailable; retry in %.2f s", delay)
            await asyncio.sleep(delay)


async def _memory_round() -> None:
    assert _memory_event is not None
    if not _memory_queue:
        _memory_event.clear()
        try:
            await asyncio.wait_for(_memory_event.wait(), timeout=1.0)
        except TimeoutError:
            return
    await asyncio.sleep(settings.CHITTYCAN_USAGE_FLUSH_INTERVAL)  # let a batch build up
    await drain_memory_once()
