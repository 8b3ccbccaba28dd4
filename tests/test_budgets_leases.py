"""The counter stores directly (Redis, PostgreSQL, in-process): all-or-nothing reservations,
idempotent settlement, lease expiry and release, late settlement of a swept reservation."""

from __future__ import annotations

import asyncio
import time

import pytest

from budgets import counters
from budgets.periods import Counter


def run(coro_factory):
    async def wrapped():
        from core import runtime

        try:
            return await coro_factory()
        finally:
            await runtime.close_redis()

    return asyncio.run(wrapped())


@pytest.fixture(params=["redis", "postgres", "memory"])
def store(request, transactional_db):
    if request.param == "redis":
        return counters.RedisCounters()
    if request.param == "postgres":
        return counters.PostgresCounters()
    return counters.MemoryCounters()


def value(store, root: int, counter: Counter) -> int:
    if isinstance(store, counters.MemoryCounters):
        return store.values[counter.name]
    if isinstance(store, counters.PostgresCounters):
        from budgets.models import BudgetCounter

        return BudgetCounter.objects.get(name=counter.name).value
    got = counters.peek_sync(counter, root)
    assert got is not None
    return got


def make_counters(tenant_id: int, key_id: int) -> tuple[Counter, Counter, Counter]:
    tenant = Counter(f"t{tenant_id}:m2026-11", "m", 1_000, 3600, "UTC")
    key = Counter(f"k{key_id}:total", "m", None, 0, "UTC")  # soft: counted, never refuses
    quota = Counter(f"q{tenant_id}:m2026-11", "q", 2, 3600, "UTC")
    return tenant, key, quota


def parts(cs, amount: int) -> list[counters.Part]:
    return [counters.Part(c, 1 if c.kind == "q" else amount) for c in cs]


def test_reserve_is_all_or_nothing_and_idempotent(store):
    tenant, key, quota = make_counters(901, 902)
    cs = [tenant, key, quota]

    async def go():
        first = await store.reserve("req_a", 901, parts(cs, 600))
        assert isinstance(first, counters.Reservation)
        again = await store.reserve("req_a", 901, parts(cs, 600))  # same request id: counted once
        assert isinstance(again, counters.Reservation)
        refused = await store.reserve("req_b", 901, parts(cs, 600))  # 600 + 600 > 1000 on the tenant
        assert isinstance(refused, counters.Refused)
        assert refused.counter == tenant and refused.current == 600 and refused.amount == 600
        return first

    run(go)
    # Nothing of the refused request was counted anywhere, soft counter and quota included.
    assert (value(store, 901, tenant), value(store, 901, key), value(store, 901, quota)) == (600, 600, 1)


def test_settle_applies_actual_once(store):
    tenant, key, quota = make_counters(911, 912)
    cs = [tenant, key, quota]

    async def go():
        res = await store.reserve("req_s", 911, parts(cs, 700))
        assert isinstance(res, counters.Reservation)
        assert await store.settle(res, 95, 1) is True
        assert await store.settle(res, 95, 1) is False  # settling twice changes nothing
        assert await store.settle(res, 5000, 1) is False
        # The released 605 micro-USD are available again at once.
        other = await store.reserve("req_t", 911, parts(cs, 900))
        assert isinstance(other, counters.Reservation)
        # A request that never reached the provider gives its quota slot back too.
        assert await store.settle(other, 0, 0) is True

    run(go)
    assert (value(store, 911, tenant), value(store, 911, key), value(store, 911, quota)) == (95, 95, 1)


def test_expired_lease_is_released_and_a_late_settle_charges_actual(store, settings):
    settings.CHITTYCAN_RESERVATION_LEASE = 30
    tenant, key, quota = make_counters(921, 922)
    cs = [tenant, key, quota]

    async def go():
        crashed = await store.reserve("req_crashed", 921, parts(cs, 800))
        alive = await store.reserve("req_alive", 921, parts(cs, 100))
        assert isinstance(crashed, counters.Reservation) and isinstance(alive, counters.Reservation)
        assert await store.sweep(time.time() + 5) == 0  # leases still running
        # The live process renews its lease (with a longer lease from now on); the crashed one cannot.
        settings.CHITTYCAN_RESERVATION_LEASE = 120
        await store.renew(921, ["req_alive"])
        released = await store.sweep(time.time() + 45)
        assert released == 1
        return crashed, alive

    crashed, alive = run(go)
    # The crashed request's 800 and its quota slot came back; the live one keeps its 100.
    assert (value(store, 921, tenant), value(store, 921, quota)) == (100, 1)

    async def late():
        assert await store.settle(crashed, 300, 1) is True  # the crashed request did finish after all
        assert await store.settle(crashed, 300, 1) is False
        assert await store.settle(alive, 40, 1) is True

    run(late)
    assert (value(store, 921, tenant), value(store, 921, key), value(store, 921, quota)) == (340, 340, 2)


def test_counters_start_from_the_ledger(store, make_tenant):
    from datetime import UTC, datetime

    from budgets.periods import period_key
    from ledger.models import UsageRecord

    tenant = make_tenant("ledgered")
    child = make_tenant("ledgered-child", parent=tenant)
    now = datetime.now(UTC)
    for i, (owner, cost) in enumerate([(tenant, 1_000), (child, 234), (child, 66)]):
        UsageRecord.objects.create(
            request_id=f"req_ledger{i}", tenant=owner, endpoint="chat", requested_model="m", cost_micro=cost
        )
    money = Counter(f"t{tenant.pk}:{period_key('month', 'UTC', now)}", "m", 2_000, 3600, "UTC")
    quota = Counter(f"q{child.pk}:{period_key('month', 'UTC', now)}", "q", 3, 3600, "UTC")

    async def go():
        refused = await store.reserve("req_x", tenant.pk, [counters.Part(money, 701), counters.Part(quota, 1)])
        assert isinstance(refused, counters.Refused) and refused.current == 1_300
        ok = await store.reserve("req_y", tenant.pk, [counters.Part(money, 700), counters.Part(quota, 1)])
        assert isinstance(ok, counters.Reservation)
        full = await store.reserve("req_z", tenant.pk, [counters.Part(quota, 1)])
        assert isinstance(full, counters.Refused) and full.counter == quota  # 2 child rows + 1 reserved

    run(go)
    assert value(store, tenant.pk, money) == 2_000


def test_celery_tasks_sweep_and_reconcile(transactional_db, settings, paused_gateway_writer):
    """(The in-process test gateway's own lease sweeper is paused: it would race the task.)"""
    from budgets.tasks import reconcile_budgets, sweep_reservations

    settings.CHITTYCAN_RESERVATION_LEASE = 0.05
    store = counters.RedisCounters()
    counter = Counter("t931:total", "m", 10_000, 0, "UTC")

    async def go():
        return await store.reserve("req_lost", 931, [counters.Part(counter, 5_000)])

    assert isinstance(run(go), counters.Reservation)
    assert counters.peek_sync(counter, 931) == 5_000
    time.sleep(0.1)
    assert sweep_reservations.apply().get() == 1
    assert counters.peek_sync(counter, 931) == 0
    assert reconcile_budgets.apply().get() == []  # no budget rows: nothing live to compare


def test_concurrent_redis_reservations_share_connections_and_never_overrun(transactional_db):
    """Requests admitted in the same turn of the event loop reserve in one pipeline: 60 at once
    share pooled connections (the first few are sent on their own, the rest in one pipeline), not
    one each, and the limit still holds exactly."""
    from core import runtime

    store = counters.RedisCounters()
    tenant = Counter("t941:m2026-11", "m", 1_000, 3600, "UTC")

    async def go():
        first = await store.reserve("req_c_first", 941, [counters.Part(tenant, 10)])  # builds the counter
        assert isinstance(first, counters.Reservation)
        pool = runtime.redis_client().connection_pool
        outcomes = await asyncio.gather(
            *(store.reserve(f"req_c{n}", 941, [counters.Part(tenant, 30)]) for n in range(60))
        )
        return outcomes, len(pool._available_connections) + len(pool._in_use_connections)

    outcomes, connections = run(go)
    admitted = [o for o in outcomes if isinstance(o, counters.Reservation)]
    assert len(admitted) == 33  # 10 + 33 * 30 = 1,000: not a micro-dollar over
    assert all(isinstance(o, counters.Refused) for o in outcomes if o not in admitted)
    assert value(store, 941, tenant) == 1_000
    assert connections <= runtime.ALONE_MAX + 1  # 60 before
