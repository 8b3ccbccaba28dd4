"""Every answered request has exactly one ledger row even when Redis loses the usage stream
(restarted without persistence) before the writer drained it: the hand-off journal
(``ledger.writer.journal_row``) keeps a local copy until PostgreSQL has the row."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest

from ledger import writer
from ledger.models import UsageRecord
from tests.disposable_redis import DisposableRedis
from tests.test_budgets_concurrency import chat_reply, fire, gateways, wait_for

pytestmark = pytest.mark.slow
__all__ = ["gateways"]  # the fixture


@pytest.fixture
def private_redis() -> Iterator[DisposableRedis]:
    server = DisposableRedis()
    yield server
    server.stop()


def _ids(responses: list) -> list[str]:
    assert {r.status_code for r in responses} == {200}, [r.status_code for r in responses]
    return [r.headers["x-request-id"] for r in responses]


def _exactly_once(ids: list[str], timeout: float = 20.0) -> None:
    wait_for(lambda: UsageRecord.objects.filter(request_id__in=ids).count() >= len(ids), timeout=timeout)
    time.sleep(0.5)  # a doubled row would show up now
    rows = list(UsageRecord.objects.filter(request_id__in=ids).values_list("request_id", flat=True))
    assert sorted(rows) == sorted(ids)


def _stalled_writer_env(redis_url: str) -> dict[str, str]:
    # The writer sleeps a minute between rounds: rows stay in the Redis stream, not yet in PostgreSQL.
    return {
        "REDIS_URL": redis_url,
        "CHITTYCAN_USAGE_FLUSH_INTERVAL": "60",
        "CHITTYCAN_USAGE_JOURNAL_GRACE": "2",
        "CHITTYCAN_REDIS_FAILURE_POLICY": "refuse",
    }


def test_rows_in_the_stream_survive_redis_restarting_empty(upstream, gateways, make_tenant, make_key, private_redis):
    key = make_key(make_tenant("journal"))
    gw = gateways(**_stalled_writer_env(private_redis.url))
    upstream.push("/v1/chat/completions", *(chat_reply(5) for _ in range(13)))
    warm = _ids(fire([gw.url], key, 1, max_tokens=10))
    time.sleep(1.0)  # the writer's first round (at start) is over: it now sleeps
    ids = _ids(fire([gw.url], key, 12, concurrency=4, max_tokens=10))
    stream = private_redis.client()
    assert stream.xlen(writer.stream_key()) >= 12  # handed off, not yet written
    stream.close()
    assert UsageRecord.objects.filter(request_id__in=ids).count() == 0

    private_redis.kill()
    private_redis.start()  # empty: the stream and its rows are gone
    _exactly_once(warm + ids)


def test_a_killed_gateways_journal_is_written_by_the_next_process(
    upstream, gateways, make_tenant, make_key, private_redis
):
    key = make_key(make_tenant("journal-kill"))
    env = _stalled_writer_env(private_redis.url)
    env["CHITTYCAN_USAGE_JOURNAL_GRACE"] = "600"  # the dying process never gets to write them itself
    first = gateways(**env)
    upstream.push("/v1/chat/completions", *(chat_reply(5) for _ in range(9)))
    warm = _ids(fire([first.url], key, 1, max_tokens=10))
    time.sleep(1.0)
    ids = _ids(fire([first.url], key, 8, concurrency=4, max_tokens=10))
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(5)
    private_redis.kill()
    private_redis.start()
    assert UsageRecord.objects.filter(request_id__in=ids).count() == 0

    second = gateways(**env)
    _ids(fire([second.url], key, 1, max_tokens=10))  # its background tasks start with a request
    _exactly_once(warm + ids)


# --- in one process ---------------------------------------------------------------------------


def _row(rid: str, tenant_id: int) -> dict:
    return {
        "request_id": rid,
        "created_at": time.time(),
        "tenant_id": tenant_id,
        "endpoint": "chat",
        "requested_model": "m",
        "cost_micro": 5,
    }


def test_the_journal_empties_once_the_ledger_has_its_rows(transactional_db, make_tenant, settings, tmp_path):
    import asyncio

    settings.CHITTYCAN_USAGE_SPOOL_DIR = tmp_path
    settings.CHITTYCAN_USAGE_JOURNAL_GRACE = 0.0
    tenant = make_tenant("journal-unit")
    journal = writer._Journal()
    monkey = writer._journal
    writer._journal = journal
    try:
        writer.journal_row(_row("req_j1", tenant.pk))
        writer.journal_row(_row("req_j2", tenant.pk))
        path = next((tmp_path / "journal").glob("journal-*.jsonl"))
        assert path.stat().st_size > 0 and writer.journal_size() == 2
        assert {r["request_id"] for r in writer.pending_rows()} >= {"req_j1", "req_j2"}  # counted as pending
        writer.write_rows([_row("req_j1", tenant.pk)])  # the writer wrote one; the other was lost
        assert asyncio.run(writer.journal_pass()) == 2
        assert sorted(UsageRecord.objects.values_list("request_id", flat=True)) == ["req_j1", "req_j2"]
        assert writer.journal_size() == 0 and path.stat().st_size == 0  # emptied, not grown forever
        assert writer.lost_rows_written() >= 1
    finally:
        writer._journal = monkey


def test_spooled_rows_are_replayed_within_a_second_not_at_the_next_round(settings):
    timer = writer._SpoolTimer()
    settings.CHITTYCAN_USAGE_SPOOL_REPLAY_INTERVAL = 30.0
    import asyncio

    asyncio.run(timer.maybe_replay())  # a periodic round: the next one is 30 s away
    assert timer.next_at - time.monotonic() > 25
    writer._spooled_since_replay = True  # a row was spooled
    timer.soon()
    assert timer.next_at - time.monotonic() <= 1.0
