"""Hard and soft budgets through the real gateway: refusal, hierarchy, exact charging of streams,
disconnects and upstream errors, counters equal to the ledger, periods in the tenant's time zone."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import httpx
import openai
import orjson
import pytest
import redis
from django.conf import settings

from budgets import periods, service
from ledger.models import UsageRecord
from tests.conftest import wait_usage
from tests.fakes.openai_upstream import Reply, sse, usage_for


def counter_value(root_id: int, name: str) -> int | None:
    conn = redis.Redis.from_url(settings.REDIS_URL)
    try:
        raw = conn.get(f"{settings.REDIS_PREFIX}:bud:{{{root_id}}}:c:{name}")
    finally:
        conn.close()
    return int(raw) if raw is not None else None


def month_name(prefix: str, obj_id: int, tz: str = "UTC") -> str:
    return f"{prefix}{obj_id}:{periods.period_key('month', tz, datetime.now(UTC))}"


def ledger_sum(**filters) -> int:
    return sum(UsageRecord.objects.filter(**filters).values_list("cost_micro", flat=True))


def client_for(gateway_server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway_server.url}/v1", api_key=key, max_retries=0)


def chat(client: openai.OpenAI, **kwargs):
    return client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=10, **kwargs
    )


# --- periods ----------------------------------------------------------------------------------------


# --- hard budget ------------------------------------------------------------------------------------


def test_hard_budget_refuses_with_402_and_counter_equals_ledger(upstream, gateway_server, make_tenant, make_key):
    from budgets import services

    tenant = make_tenant("acme")
    key = make_key(tenant)
    # Each request: 10 prompt + 7 completion tokens = 95 micro-USD actual, reserved worst case more.
    services.budget_set(tenant=tenant, period="month", limit_micro=1_000, hard=True)
    client = client_for(gateway_server, key)
    admitted = 0
    with pytest.raises(openai.APIStatusError) as exc:
        for _ in range(50):
            chat(client)
            admitted += 1
    err = exc.value
    assert err.status_code == 402
    assert err.code == "insufficient_quota" and err.type == "insufficient_quota"
    assert err.response.headers["x-should-retry"] == "false"
    assert "Hard budget exceeded for tenant acme" in err.message
    rows = wait_usage(admitted, tenant=tenant)
    assert len(rows) == admitted and admitted >= 5
    spent = ledger_sum(tenant=tenant)
    assert spent == 95 * admitted <= 1_000
    assert counter_value(tenant.pk, month_name("t", tenant.pk)) == spent
    # The refused request never reached the upstream.
    assert len(upstream.requests) == admitted


def test_soft_budget_never_refuses_and_reports_spend(upstream, gateway_server, make_tenant, make_key):
    from budgets import services

    tenant = make_tenant("soft")
    key = make_key(tenant)
    budget = services.budget_set(tenant=tenant, period="day", limit_micro=100, hard=False)
    client = client_for(gateway_server, key)
    for _ in range(3):
        chat(client)
    wait_usage(3, tenant=tenant)
    status = service.spend_status(budget)
    assert status.spent_micro == 285 and status.limit_micro == 100 and not status.hard
    assert status.reserved_micro == 0 and status.remaining_micro == 0 and status.percent == 285.0
    assert counter_value(tenant.pk, f"t{tenant.pk}:{periods.period_key('day', 'UTC', datetime.now(UTC))}") == 285


def test_key_budget_and_max_tokens_lowering(upstream, gateway_server, make_tenant, make_key):
    from budgets import services
    from tenants.models import ApiKey

    tenant = make_tenant("keyed")
    key = make_key(tenant)
    api_key = ApiKey.objects.get(tenant=tenant)
    services.budget_set(api_key=api_key, period="total", limit_micro=500)
    client = client_for(gateway_server, key)
    # 4096 output tokens at $10/M could cost 40,960 micro-USD: refused although little was spent.
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert exc.value.status_code == 402 and "this API key" in exc.value.message
    assert upstream.requests == []
    chat(client)  # a small cap fits
    [row] = wait_usage(1, api_key_id=api_key.pk)
    assert counter_value(tenant.pk, f"k{api_key.pk}:total") == row.cost_micro == 95


def test_budget_change_reaches_the_gateway_without_restart(upstream, gateway_server, make_tenant, make_key):
    from budgets import services

    tenant = make_tenant("live")
    key = make_key(tenant)
    client = client_for(gateway_server, key)
    chat(client)  # warms the key cache (no budget yet)
    budget = services.budget_set(tenant=tenant, period="month", limit_micro=50)
    with pytest.raises(openai.APIStatusError) as exc:
        chat(client)
    assert exc.value.status_code == 402
    wait_usage(1, tenant=tenant)
    # The counter was built from the ledger: the request made before the budget existed counts.
    assert counter_value(tenant.pk, month_name("t", tenant.pk)) == 95
    services.budget_delete(budget=budget, allow_weaken=True)
    chat(client)


# --- hierarchy ----------------------------------------------------------------------------------------


def test_grandchild_spend_stops_the_grandparents_other_children(upstream, gateway_server, make_tenant, make_key):
    from budgets import services

    org = make_tenant("org")
    team_a = make_tenant("team-a", parent=org, kind="team")
    project = make_tenant("project-a1", parent=team_a, kind="project")
    team_b = make_tenant("team-b", parent=org, kind="team")
    services.budget_set(tenant=org, period="month", limit_micro=1_000)
    services.budget_set(tenant=team_b, period="month", limit_micro=1_000_000)  # plenty of its own
    grandchild = client_for(gateway_server, make_key(project))
    sibling = client_for(gateway_server, make_key(team_b))
    chat(sibling)
    admitted = 1
    with pytest.raises(openai.APIStatusError) as exc:
        for _ in range(50):
            chat(grandchild)
            admitted += 1
    assert exc.value.status_code == 402 and "tenant org" in exc.value.message
    with pytest.raises(openai.APIStatusError) as exc:
        chat(sibling)
    assert exc.value.status_code == 402 and "tenant org" in exc.value.message
    wait_usage(admitted)
    spent = ledger_sum()
    assert spent == 95 * admitted <= 1_000
    assert counter_value(org.pk, month_name("t", org.pk)) == spent
    assert counter_value(org.pk, month_name("t", team_b.pk)) == 95


# --- exact charging --------------------------------------------------------------------------------


def test_streams_disconnects_and_upstream_errors_are_charged_what_was_reported(
    upstream, gateway_server, make_tenant, make_key
):
    from budgets import services

    tenant = make_tenant("exact")
    key = make_key(tenant)
    services.budget_set(tenant=tenant, period="month", limit_micro=10_000_000)
    client = client_for(gateway_server, key)
    name = month_name("t", tenant.pk)

    # 1. A stream: the usage chunk (forced upstream) is what is charged.
    list(client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}], stream=True))
    [row] = wait_usage(1, tenant=tenant)
    assert row.cost_micro == 95 and row.usage_source == "upstream"
    assert counter_value(tenant.pk, name) == 95

    # 2. Upstream fails (non-retryable 400): nothing generated, charged 0, reservation released.
    upstream.push(
        "/v1/chat/completions",
        Reply(status=400, json={"error": {"message": "bad", "type": "invalid_request_error", "code": None}}),
    )
    with pytest.raises(openai.BadRequestError):
        chat(client)
    rows = wait_usage(2, tenant=tenant)
    assert rows[-1].status == "upstream_error" and rows[-1].cost_micro == 0
    assert counter_value(tenant.pk, name) == 95

    # 3. A stream whose upstream reports big usage mid-way, then resets: charged what it reported.
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o"}
    frames = [
        sse({**base, "choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]}),
        sse({**base, "choices": [], "usage": usage_for(1000, 2000)}),
        sse({**base, "choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": None}]}),
    ]
    upstream.push("/v1/chat/completions", Reply(frames=frames, reset_after=3))
    list(client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}], stream=True))
    rows = wait_usage(3, tenant=tenant)
    assert rows[-1].cost_micro == 1000 * 2.5 + 2000 * 10
    assert counter_value(tenant.pk, name) == ledger_sum(tenant=tenant) == 95 + 22_500

    # 4. The client disconnects mid-stream: the documented estimate (tokens streamed so far).
    slow = [sse({**base, "choices": [{"index": 0, "delta": {"content": "word "}, "finish_reason": None}]})] * 50
    upstream.push("/v1/chat/completions", Reply(frames=slow, frame_delay=0.05))
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "stream": True}

    async def disconnect() -> None:
        async with httpx.AsyncClient(timeout=10) as http:
            headers = {"authorization": f"Bearer {key}"}
            url = f"{gateway_server.url}/v1/chat/completions"
            async with http.stream("POST", url, json=body, headers=headers) as r:
                seen = 0
                async for _ in r.aiter_bytes():
                    seen += 1
                    if seen >= 3:
                        break

    asyncio.run(disconnect())
    rows = wait_usage(4, tenant=tenant)
    last = rows[-1]
    assert last.status == "client_disconnected" and last.usage_source == "estimated"
    assert last.completion_tokens > 0 and last.cost_micro > 0
    deadline = time.monotonic() + 5
    while counter_value(tenant.pk, name) != ledger_sum(tenant=tenant) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert counter_value(tenant.pk, name) == ledger_sum(tenant=tenant)


def test_counters_are_rebuilt_from_the_ledger_after_redis_loses_them(upstream, gateway_server, make_tenant, make_key):
    from budgets import services
    from budgets.tasks import reconcile

    tenant = make_tenant("rebuilt")
    key = make_key(tenant)
    services.budget_set(tenant=tenant, period="month", limit_micro=10_000_000)
    client = client_for(gateway_server, key)
    for _ in range(3):
        chat(client)
    wait_usage(3, tenant=tenant)
    name = month_name("t", tenant.pk)
    assert counter_value(tenant.pk, name) == 285
    assert reconcile(settle_time=0.2) == []
    # Drift (a lost update, say) is reported, twice in a row, and repaired on request.
    conn = redis.Redis.from_url(settings.REDIS_URL)
    conn.incrby(f"{settings.REDIS_PREFIX}:bud:{{{tenant.pk}}}:c:{name}", 7)
    [drift] = reconcile(settle_time=0.2, repair=True)
    assert (drift.counter, drift.live, drift.expected, drift.drift) == (name, 292, 285, 7)
    assert counter_value(tenant.pk, name) == 285
    # Redis restarted empty: the next request rebuilds the counter from the ledger.
    for k in conn.scan_iter(f"{settings.REDIS_PREFIX}:bud:*"):
        conn.delete(k)
    conn.close()
    chat(client)
    wait_usage(4, tenant=tenant)
    assert counter_value(tenant.pk, name) == 380 == ledger_sum(tenant=tenant)


def test_usage_rows_not_yet_written_count_when_a_counter_is_built(transactional_db, make_tenant):
    """A row still in the usage stream (handed off, writer behind) is part of the rebuilt value."""
    from budgets import counters
    from ledger import writer

    tenant = make_tenant("pending")
    row = {"request_id": "req_pending1", "created_at": time.time(), "tenant_id": tenant.pk, "api_key_id": None}
    row["cost_micro"] = 1234
    conn = redis.Redis.from_url(settings.REDIS_URL)
    conn.xadd(writer.stream_key(), {b"row": orjson.dumps(row)})
    conn.close()
    counter = periods.Counter(month_name("t", tenant.pk), "m", 5000, 60, "UTC")
    # Counted exactly once whether or not a running writer has meanwhile moved it to the ledger.
    assert counters._ledger_values([counter], True) == [1234]
    # The moment between the writer's commit and its XDEL: in the ledger and still in the stream.
    writer.write_rows([{**row, "endpoint": "chat", "requested_model": "m"}])
    conn = redis.Redis.from_url(settings.REDIS_URL)
    conn.xadd(writer.stream_key(), {b"row": orjson.dumps(row)})
    conn.close()
    assert UsageRecord.objects.filter(request_id="req_pending1").count() == 1
    assert counters._ledger_values([counter], True) == [1234]
    assert counters._ledger_values([counter], False) == [1234]


def test_budgets_command(upstream, gateway_server, make_tenant, make_key):
    from io import StringIO

    from django.core.management import CommandError, call_command

    from budgets.models import Budget
    from tenants.models import AuditEvent

    tenant = make_tenant("cli-co", time_zone="Europe/Berlin")
    out = StringIO()
    call_command("budgets", "set", "--tenant", "cli-co", "--limit", "1.50", "--period", "day", stdout=out)
    budget = Budget.objects.get(tenant=tenant)
    assert (budget.limit_micro, budget.period, budget.hard) == (1_500_000, "day", True)
    assert AuditEvent.objects.filter(action="budget.create", target="cli-co").exists()
    call_command("budgets", "set", "--tenant", "cli-co", "--limit", "2", "--period", "day", "--soft", stdout=out)
    budget.refresh_from_db()
    assert (budget.limit_micro, budget.hard) == (1_500_000, True)  # a soft level beside it, never a swap
    soft = Budget.objects.get(tenant=tenant, hard=False)
    assert (soft.limit_micro, soft.period) == (2_000_000, "day")
    for bad in ("1.0000001", "-1", "lots"):
        with pytest.raises(CommandError):
            call_command("budgets", "set", "--tenant", "cli-co", "--limit", bad)
    chat(client_for(gateway_server, make_key(tenant)))
    wait_usage(1, tenant=tenant)
    out = StringIO()
    call_command("budgets", "list", "--tenant", "cli-co", stdout=out)
    assert "tenant cli-co" in out.getvalue() and "0.000095" in out.getvalue() and "soft" in out.getvalue()
    out = StringIO()
    call_command("budgets", "reconcile", stdout=out)
    assert "no drift" in out.getvalue()
    call_command("budgets", "delete", "--tenant", "cli-co", "--period", "day", "--soft", stdout=out)
    call_command("budgets", "delete", "--tenant", "cli-co", "--period", "day", "--allow-weaken", stdout=out)
    assert not Budget.objects.filter(tenant=tenant).exists()
