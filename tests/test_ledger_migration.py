"""The usage ledger moved from the gateway app to the ledger app without touching its data: rows
written under the old schema read back the same through ``ledger.models``, and the content types
(permissions, admin history) follow the models both ways."""

from __future__ import annotations

from datetime import UTC, datetime

from django.contrib.contenttypes.models import ContentType
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from ledger.models import HourlyUsage, RollupCursor, RollupHour, UsageRecord

MOVE = {("ledger", "0001_initial"), ("gateway", "0004_move_usage_to_ledger")}

WHEN = datetime(2026, 11, 22, 10, 15, tzinfo=UTC)
HOUR = datetime(2026, 11, 22, 10, tzinfo=UTC)


def _gateway_just_before_the_move(executor: MigrationExecutor):
    """The newest gateway migration the move builds on."""
    graph = executor.loader.graph
    parents = {parent.key for key in MOVE for parent in graph.node_map[key].parents} - MOVE
    return max((key for key in parents if key[0] == "gateway"), key=lambda key: len(graph.forwards_plan(key)))


def test_rows_written_before_the_move_read_back_through_ledger_models(make_tenant):
    tenant = make_tenant("moved-ledger")
    record = {
        "request_id": "req_before_the_move",
        "created_at": WHEN,
        "tenant_id": tenant.pk,
        "api_key_id": None,
        "endpoint": "chat",
        "requested_model": "gpt-4o",
        "served_model": "gpt-4o-2024-08-06",
        "provider": "openai",
        "prompt_tokens": 1200,
        "cached_tokens": 1000,
        "completion_tokens": 80,
        "cost_micro": 1_234_567,
        "latency_ms": 321,
        "ttft_ms": 45,
        "status": "ok",
        "stream": True,
        "timings": {"parse": 0.1, "dispatch": 300.5},
    }
    hourly = {
        "hour": HOUR,
        "tenant_id": tenant.pk,
        "api_key_id": None,
        "model": "gpt-4o-2024-08-06",
        "provider": "openai",
        "calls": 3,
        "errors": 1,
        "cost_micro": 2_000_001,
        "ttft_ms_sum": 90,
        "ttft_count": 2,
    }
    ContentType.objects.clear_cache()
    usage_type = ContentType.objects.get_for_model(UsageRecord).pk
    try:
        executor = MigrationExecutor(connection)
        before = _gateway_just_before_the_move(executor)
        executor.migrate([before, ("ledger", None)])
        old = executor.loader.project_state(before).apps
        ContentType.objects.clear_cache()
        assert ContentType.objects.get(pk=usage_type).app_label == "gateway"
        old.get_model("gateway", "UsageRecord").objects.create(**record)
        old.get_model("gateway", "HourlyUsage").objects.create(**hourly)
        old.get_model("gateway", "RollupHour").objects.create(hour=HOUR, sealed=True)
        old.get_model("gateway", "RollupCursor").objects.create(name="usage-rollup", position=WHEN)
    finally:
        executor = MigrationExecutor(connection)
        executor.migrate(executor.loader.graph.leaf_nodes())

    ContentType.objects.clear_cache()
    assert ContentType.objects.get(pk=usage_type).app_label == "ledger"
    row = UsageRecord.objects.get(request_id="req_before_the_move")
    assert {k: getattr(row, k) for k in record} == record
    assert row.recorded_at is not None
    rollup = HourlyUsage.objects.get(tenant_id=tenant.pk)
    assert {k: getattr(rollup, k) for k in hourly} == hourly
    assert RollupHour.objects.get(hour=HOUR).sealed
    assert RollupCursor.objects.get(name="usage-rollup").position == WHEN
