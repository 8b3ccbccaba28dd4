"""Budgets under concurrency across several real gateway processes (uvicorn subprocesses on the
test database and the same Redis), and with Redis unreachable under both failure policies."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import httpx
import pytest
import redis
from django.conf import settings

from ledger.models import UsageRecord
from tests.conftest import wait_usage
from tests.fakes.openai_upstream import Reply, usage_for
from tests.processes import Gateway, free_port, services_env, start_together
from tests.test_budgets import counter_value, month_name

pytestmark = pytest.mark.slow


class Gateways:
    """``gateways(**env)`` starts one gateway process on the test services (``env`` added);
    ``gateways.pair(**env)`` starts two at once. All are stopped at the end of the test."""

    def __init__(self) -> None:
        self.started: list[Gateway] = []

    def __call__(self, **env: str) -> Gateway:
        gw = Gateway({**services_env(), **env})
        self.started.append(gw)
        return gw

    def pair(self, **env: str) -> list[Gateway]:
        both = start_together([{**services_env(), **env}] * 2)
        self.started.extend(both)
        return both


@pytest.fixture
def gateways(transactional_db):
    started = Gateways()
    yield started
    for gw in started.started:
        gw.stop()


def chat_reply(completion_tokens: int, delay: float = 0.0) -> Reply:
    return Reply(
        delay=delay,
        json={
            "id": "chatcmpl-x",
            "object": "chat.completion",
            "created": 1,
            "model": "gpt-4o-2024-08-06",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "ok"},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": usage_for(10, completion_tokens),
        },
    )


async def _fire(urls: list[str], key: str, total: int, concurrency: int, max_tokens: int) -> list[httpx.Response]:
    sem = asyncio.Semaphore(concurrency)
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency * 2)) as client:

        async def one(i: int) -> httpx.Response:
            async with sem:
                return await client.post(
                    f"{urls[i % len(urls)]}/v1/chat/completions",
                    json=body,
                    headers={"authorization": f"Bearer {key}"},
                )

        return list(await asyncio.gather(*(one(i) for i in range(total))))


def fire(urls: list[str], key: str, total: int, concurrency: int = 40, max_tokens: int = 4000) -> list[httpx.Response]:
    return asyncio.run(_fire(urls, key, total, concurrency, max_tokens))


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.1)


def open_reservations(root: int) -> int:
    conn = redis.Redis.from_url(settings.REDIS_URL)
    try:
        return int(conn.hlen(f"{settings.REDIS_PREFIX}:bud:{{{root}}}:res"))
    finally:
        conn.close()


# Each admitted request: 10 prompt tokens at $2.50/M + 3,000 completion tokens at $10/M.
ACTUAL = 10 * 25 // 10 + 3000 * 10  # 30,025 micro-USD
LIMIT = 1_000_000  # $1.00


def test_one_dollar_budget_holds_across_two_processes(upstream, gateways, make_tenant, make_key):
    from budgets import services

    tenant = make_tenant("race")
    key = make_key(tenant)
    services.budget_set(tenant=tenant, period="month", limit_micro=LIMIT)
    total = 240
    upstream.push("/v1/chat/completions", *(chat_reply(3000, delay=0.02) for _ in range(total)))
    procs = gateways.pair()
    responses = fire([g.url for g in procs], key, total)
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) == {200, 402}, statuses
    admitted = statuses[200]
    refused = [r for r in responses if r.status_code == 402]
    assert all(r.json()["error"]["code"] == "insufficient_quota" for r in refused)
    assert all(r.headers["x-should-retry"] == "false" for r in refused)
    # Both processes admitted requests.
    served_by = {str(r.url).split("/v1")[0] for r in responses if r.status_code == 200}
    assert served_by == {g.url for g in procs}
    # Never more than the budget allows, and the budget was really used (not refused early):
    # a worst case reservation is ~40,070 micro-USD, so at most that much can be left unused.
    wait_usage(admitted, timeout=30, tenant=tenant)
    spent = sum(UsageRecord.objects.filter(tenant=tenant).values_list("cost_micro", flat=True))
    assert UsageRecord.objects.filter(tenant=tenant).count() == admitted
    assert spent == ACTUAL * admitted <= LIMIT
    assert LIMIT - spent < 2 * 40_100
    assert len(upstream.requests) == admitted
    # After quiesce: the counter equals the ledger exactly and no reservation is left open.
    assert counter_value(tenant.pk, month_name("t", tenant.pk)) == spent
    assert open_reservations(tenant.pk) == 0


class Proxy:
    """A TCP proxy to the real Redis on a port of its own: closed, it is a Redis that is down."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.target_port = target_port
        self.server: asyncio.base_events.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers.extend((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def start(self) -> None:
        async def go() -> None:
            self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

        asyncio.run_coroutine_threadsafe(go(), self.loop).result(5)

    def stop(self) -> None:
        async def go() -> None:
            if self.server is not None:
                self.server.close()
            for writer in self.writers:
                writer.close()
            await asyncio.sleep(0.1)
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
            await asyncio.sleep(0.1)

        asyncio.run_coroutine_threadsafe(go(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def _dead_redis_url(port: int) -> str:
    db = settings.REDIS_URL.rsplit("/", 1)[-1]
    return f"redis://127.0.0.1:{port}/{db}"


def test_redis_down_with_refuse_policy_answers_503(upstream, gateways, make_tenant, make_key):
    from budgets import services

    tenant = make_tenant("closed")
    key = make_key(tenant)
    services.budget_set(tenant=tenant, period="month", limit_micro=LIMIT)
    gw = gateways(REDIS_URL=_dead_redis_url(free_port()), CHITTYCAN_REDIS_FAILURE_POLICY="refuse")
    [res] = fire([gw.url], key, 1, max_tokens=10)
    assert res.status_code == 503
    assert res.headers["retry-after"] == str(settings.CHITTYCAN_REDIS_RETRY_AFTER)
    assert res.json()["error"]["code"] == "enforcement_unavailable"
    # A rate limit needs Redis just as much.
    limited = make_key(make_tenant("closed-rpm"), rpm_limit=100)
    [res] = fire([gw.url], limited, 1, max_tokens=10)
    assert res.status_code == 503 and res.headers["retry-after"]
    assert upstream.requests == []
    # A key with nothing to enforce does not need Redis: it is served.
    free = make_key(make_tenant("unlimited"))
    [res] = fire([gw.url], free, 1, max_tokens=10)
    assert res.status_code == 200


def test_redis_down_with_degrade_policy_enforces_in_postgres_then_recovers(upstream, gateways, make_tenant, make_key):
    from budgets import services
    from budgets.models import BudgetCounter, BudgetReservation

    tenant = make_tenant("degraded")
    key = make_key(tenant)
    services.budget_set(tenant=tenant, period="month", limit_micro=LIMIT)
    # Spend some with Redis up first: the PostgreSQL path must start from the ledger, not zero.
    up = gateways()
    upstream.push("/v1/chat/completions", *(chat_reply(3000) for _ in range(5)))
    assert {r.status_code for r in fire([up.url], key, 5, concurrency=5)} == {200}
    wait_usage(5, tenant=tenant)
    up.stop()

    proxy = Proxy(int(settings.REDIS_URL.rsplit(":", 1)[1].split("/")[0]))
    env = {
        "REDIS_URL": _dead_redis_url(proxy.port),
        "CHITTYCAN_REDIS_FAILURE_POLICY": "degrade",
        "CHITTYCAN_USAGE_SPOOL_REPLAY_INTERVAL": "0.5",
    }
    procs = gateways.pair(**env)
    total = 120
    upstream.push("/v1/chat/completions", *(chat_reply(3000, delay=0.02) for _ in range(total)))
    responses = fire([g.url for g in procs], key, total, concurrency=20)
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) == {200, 402}, statuses
    admitted = 5 + statuses[200]
    # Rows are spooled (Redis is down) and replayed into PostgreSQL.
    rows = wait_usage(admitted, timeout=30, tenant=tenant)
    assert len(rows) == admitted
    spent = sum(r.cost_micro for r in rows)
    assert spent == ACTUAL * admitted <= LIMIT
    assert LIMIT - spent < 2 * 40_100
    name = month_name("t", tenant.pk)
    assert BudgetCounter.objects.get(name=name).value == spent
    assert not BudgetReservation.objects.filter(settled_at__isnull=True).exists()

    # Redis comes back: the stale Redis counter (5 requests) is dropped and rebuilt from the ledger.
    proxy.start()
    try:
        time.sleep(1.2)  # past the 1 s back-off after a failure
        upstream.replies.clear()  # replies the refused requests did not use
        upstream.push("/v1/chat/completions", *(chat_reply(1) for _ in range(4)))
        late = fire([g.url for g in procs], key, 4, concurrency=1, max_tokens=5)
        assert {r.status_code for r in late} <= {200, 402}
        wait_for(lambda: counter_value(tenant.pk, name) is not None)
        ok = sum(1 for r in late if r.status_code == 200)
        wait_usage(admitted + ok, timeout=30, tenant=tenant)
        ledger = sum(UsageRecord.objects.filter(tenant=tenant).values_list("cost_micro", flat=True))
        wait_for(lambda: counter_value(tenant.pk, name) == ledger)
        assert ledger <= LIMIT
    finally:
        proxy.stop()
