"""The usage pipeline: rows reach PostgreSQL in batches, idempotent by request id, and survive a
PostgreSQL outage (kept pending in the Redis stream) and a Redis outage (spooled to disk)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from contextlib import contextmanager

import orjson
import pytest
import redis
from django.conf import settings
from django.db import OperationalError, connection

from core import runtime
from gateway import auth
from ledger import writer
from ledger.models import UsageRecord
from tenants import keys
from tests.conftest import wait_usage


@pytest.fixture(autouse=True)
def _only_this_test_drains_the_stream(request):
    """The session's gateway (started by earlier tests) runs a usage writer of its own; tests
    that drain the stream by hand must not race it."""
    if "gateway_server" not in request.fixturenames:
        request.getfixturevalue("paused_gateway_writer")


def _row(tenant_id, request_id=None, **extra):
    row = {
        "request_id": request_id or f"req_{uuid.uuid4().hex}",
        "created_at": time.time(),
        "tenant_id": tenant_id,
        "api_key_id": None,
        "endpoint": "chat",
        "requested_model": "gpt-4o",
        "served_model": "gpt-4o-2024-08-06",
        "provider": "fake-openai",
        "prompt_tokens": 10,
        "completion_tokens": 7,
        "cost_micro": 95,
        "status": "ok",
    }
    row.update(extra)
    return row


def _redis():
    return redis.Redis.from_url(settings.REDIS_URL)


def _run(coro_fn, *args, **kwargs):
    """Run a coroutine on a fresh loop with its own Redis client."""

    async def main():
        try:
            return await coro_fn(*args, **kwargs)
        finally:
            await runtime.close_redis()

    return asyncio.run(main())


def _in_new_thread(fn):
    """Call ``fn`` in a new thread (so it needs a new database connection); return or raise its result."""
    out = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as exc:
            out["error"] = exc
        finally:
            from django.db import connections

            connections.close_all()

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(30)
    if "error" in out:
        raise out["error"]
    return out["value"]


def _admin_connection():
    """A connection to the maintenance database (a database cannot refuse connections to itself)."""
    import psycopg

    params = connection.settings_dict
    return psycopg.connect(
        host=params["HOST"] or None,
        port=params["PORT"] or None,
        user=params["USER"] or None,
        password=params["PASSWORD"] or None,
        dbname="postgres",
        autocommit=True,
    )


@contextmanager
def postgres_outage():
    """Make the test database refuse every new connection and drop all but this test's own."""
    name = connection.settings_dict["NAME"]
    with connection.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        own_pid = cur.fetchone()[0]
    with _admin_connection() as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> %s",
            [name, own_pid],
        )
    try:
        yield
    finally:
        with _admin_connection() as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


def test_rows_are_idempotent_by_request_id(make_tenant):
    tenant = make_tenant("ledger-a")
    rows = [_row(tenant.pk) for _ in range(5)]
    assert writer.write_rows(rows) == 5
    assert writer.write_rows([*rows, _row(tenant.pk, request_id=rows[0]["request_id"])]) == 0
    assert UsageRecord.objects.filter(tenant_id=tenant.pk).count() == 5


def test_batch_from_stream_is_written_and_acknowledged(make_tenant):
    tenant = make_tenant("ledger-b")
    rows = [_row(tenant.pk) for _ in range(30)]

    async def hand_all():
        for row in rows:
            await writer.hand_off(row)
        return await writer.drain_redis_once(count=100, block_ms=10)

    assert _run(hand_all) == 30
    assert UsageRecord.objects.filter(tenant_id=tenant.pk).count() == 30
    assert _redis().xlen(writer.stream_key()) == 0


def test_poison_row_goes_to_dead_letter_and_does_not_block_the_batch(make_tenant):
    tenant = make_tenant("ledger-c")
    good = [_row(tenant.pk) for _ in range(3)]
    poison = _row(None)  # no tenant: the database refuses it for good

    async def go():
        for row in [good[0], poison, *good[1:]]:
            await writer.hand_off(row)
        await writer.drain_redis_once(count=100, block_ms=10)

    _run(go)
    assert UsageRecord.objects.filter(tenant_id=tenant.pk).count() == 3
    [(_, fields)] = _redis().xrange(writer.dead_letter_key())
    assert orjson.loads(fields[b"row"])["request_id"] == poison["request_id"]
    assert _redis().xlen(writer.stream_key()) == 0


def test_rows_of_a_crashed_writer_are_claimed_once(make_tenant, settings):
    """A writer that committed but died before acknowledging: the rows are re-delivered, not doubled."""
    tenant = make_tenant("ledger-d")
    rows = [_row(tenant.pk) for _ in range(6)]

    async def go():
        await writer._ensure_group()
        for row in rows:
            await writer.hand_off(row)
        conn = runtime.redis_client()
        await conn.xreadgroup(writer.GROUP, "crashed-writer", {writer.stream_key(): ">"}, count=100)

    _run(go)
    writer.write_rows(rows[:4])  # it had committed these before dying
    settings.CHITTYCAN_USAGE_CLAIM_IDLE_MS = 0
    assert _run(writer.drain_redis_once, count=100, block_ms=10) == 6
    assert UsageRecord.objects.filter(tenant_id=tenant.pk).count() == 6
    assert _redis().xpending(writer.stream_key(), writer.GROUP)["pending"] == 0


def test_postgres_outage_keeps_rows_pending_then_writes_exactly_n(upstream, gateway_server, openai_client, tenant_key):
    tenant = tenant_key[0]
    # Warm the key and route caches, so the hot path needs no database during the outage. The
    # fixtures' writes announce a change to every gateway process (core.invalidation), and the
    # in-process gateway's listener may be resubscribing after an earlier test's Redis upsets:
    # either drops the caches just warmed, so warm until the key stays cached for a second.
    prefix = keys.key_prefix(tenant_key[1])
    warmed = 0
    for _ in range(10):
        warmed += 1
        openai_client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "warm"}])
        time.sleep(1.0)
        if prefix in auth._cache:
            break
    else:
        pytest.fail("the gateway kept dropping its key cache")
    assert len(wait_usage(warmed, tenant_id=tenant.pk)) == warmed
    n = 15
    request_ids = []
    with postgres_outage():
        for i in range(n):
            res = openai_client.chat.completions.with_raw_response.create(
                model="gpt-4o", messages=[{"role": "user", "content": f"during outage {i}"}]
            )
            assert res.http_response.status_code == 200
            request_ids.append(res.headers["x-request-id"])
        # The writer cannot reach the database: a new connection is refused ...
        with pytest.raises(OperationalError):
            _in_new_thread(lambda: UsageRecord.objects.count())
        time.sleep(1.0)  # ... so it retries with backoff while the rows wait in the stream.
        assert UsageRecord.objects.filter(tenant_id=tenant.pk).count() == warmed
        assert _redis().xlen(writer.stream_key()) == n
    rows = wait_usage(warmed + n, timeout=60, tenant_id=tenant.pk)
    assert len(rows) == warmed + n
    time.sleep(0.5)  # anything doubled would show up by now
    stored = set(UsageRecord.objects.filter(tenant_id=tenant.pk).values_list("request_id", flat=True))
    assert UsageRecord.objects.filter(tenant_id=tenant.pk).count() == warmed + n
    assert set(request_ids) <= stored
    # The stream empties once the writer's next batch goes through. If the outage outlasted the
    # journal's grace period, the journal wrote the rows first and the writer may still be in its
    # backoff (up to a few seconds): its batch then finds them written and only acknowledges.
    deadline = time.monotonic() + 30
    while _redis().xlen(writer.stream_key()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _redis().xlen(writer.stream_key()) == 0
    assert UsageRecord.objects.filter(tenant_id=tenant.pk).count() == warmed + n


def test_redis_outage_spools_and_replay_survives_a_database_outage(make_tenant, settings, tmp_path):
    tenant = make_tenant("ledger-e")
    settings.CHITTYCAN_USAGE_SPOOL_DIR = tmp_path
    rows = [_row(tenant.pk) for _ in range(8)]
    real_url = settings.REDIS_URL
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there

    async def spool_all():
        for row in rows:
            await writer.hand_off_or_spool(row)

    _run(spool_all)
    settings.REDIS_URL = real_url
    [spool_file] = list(tmp_path.glob("usage-*.jsonl"))
    assert len(spool_file.read_bytes().splitlines()) == 8

    with postgres_outage(), pytest.raises(OperationalError):
        _in_new_thread(writer.replay_spool)
    assert spool_file.exists()  # kept for the next replay
    assert UsageRecord.objects.filter(tenant_id=tenant.pk).count() == 0

    writer.write_rows(rows[:2])  # some rows already made it (e.g. a replay that died after commit)
    assert _in_new_thread(writer.replay_spool) == 8
    assert not spool_file.exists()
    assert _in_new_thread(writer.replay_spool) == 0
    assert UsageRecord.objects.filter(tenant_id=tenant.pk).count() == 8


def test_spool_append_after_replay_starts_a_new_file(make_tenant, settings, tmp_path):
    tenant = make_tenant("ledger-f")
    settings.CHITTYCAN_USAGE_SPOOL_DIR = tmp_path
    writer.spool_row(_row(tenant.pk))
    assert writer.replay_spool() == 1
    writer.spool_row(_row(tenant.pk))
    assert writer.replay_spool() == 1
    assert UsageRecord.objects.filter(tenant_id=tenant.pk).count() == 2


def test_pending_rows_are_the_stream_and_the_spool_minus_the_ledger(make_tenant, settings, tmp_path):
    """What budget counters add to the ledger: rows handed off and not yet written, each once."""
    tenant = make_tenant("ledger-pending")
    settings.CHITTYCAN_USAGE_SPOOL_DIR = tmp_path
    streamed, spooled, written = _row(tenant.pk), _row(tenant.pk), _row(tenant.pk)
    conn = _redis()
    for row in (streamed, written, streamed):  # a hand-off retried after a timeout queues a row twice
        conn.xadd(writer.stream_key(), {b"row": orjson.dumps(row)})
    conn.close()
    writer.spool_row(spooled)
    writer.spool_row(written)
    (tmp_path / "usage-torn.jsonl").write_bytes(b'{"request_id": "req_torn", "tena')  # mid-append
    writer.write_rows([written])
    pending = sorted(r["request_id"] for r in writer.pending_rows())
    assert pending == sorted([streamed["request_id"], spooled["request_id"]])


def test_an_idle_writer_does_not_report_redis_unavailable(settings, tmp_path, caplog):
    """The writer's blocking read ends inside the Redis client's socket timeout: with nothing to
    write it waits quietly, it does not time out, warn and back off."""
    settings.CHITTYCAN_USAGE_SPOOL_DIR = tmp_path

    async def idle():
        task = asyncio.create_task(writer.writer_loop())
        await asyncio.sleep(3.0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.INFO, logger="ledger.writer"):
        _run(idle)
    assert _redis().xinfo_groups(writer.stream_key())[0]["name"] == writer.GROUP.encode()  # it did read
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_embedded_mode_spools_rows_while_the_database_is_down(make_tenant, settings, tmp_path, paused_gateway_writer):
    """Without Redis the queue is in memory: a database outage moves the batch to the spool.
    (The in-process gateway's background tasks are paused: its journal pass, meeting the same
    outage, would spool an earlier test's row into this test's spool directory.)"""
    tenant = make_tenant("ledger-g")
    settings.CHITTYCAN_USAGE_SPOOL_DIR = tmp_path
    rows = [_row(tenant.pk) for _ in range(4)]
    writer._memory_queue.extend(rows)
    with postgres_outage(), pytest.raises(OperationalError):
        _in_new_thread(lambda: asyncio.run(writer.drain_memory_once()))
    assert not writer._memory_queue
    [spool_file] = list(tmp_path.glob("usage-*.jsonl"))
    assert len(spool_file.read_bytes().splitlines()) == 4
    assert _in_new_thread(writer.replay_spool) == 4
    assert UsageRecord.objects.filter(tenant_id=tenant.pk).count() == 4


def test_database_outage_on_a_cold_key_is_a_retryable_503_then_recovers(
    upstream, gateway_server, make_tenant, make_key
):
    import openai

    key = make_key(make_tenant("ledger-cold"))  # never used: its lookup needs the database
    client = openai.OpenAI(base_url=f"{gateway_server.url}/v1", api_key=key, max_retries=0)
    with postgres_outage():
        with pytest.raises(openai.InternalServerError) as exc:
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert exc.value.status_code == 503
    assert exc.value.response.headers["retry-after"] == "1"
    assert isinstance(exc.value.body, dict) and exc.value.body["code"] == "database_unavailable"
    # Once the database is back, the same key works: the dead connections were replaced.
    reply = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert reply.choices[0].message.content
