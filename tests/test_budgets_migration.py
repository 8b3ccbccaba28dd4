"""Budgets moved out of tenants and gateway into their own app as a change of Django state only:
rows written before the move are read through ``budgets.models`` after it, and the content types
(permissions, admin history) follow the models both ways."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from django.contrib.contenttypes.models import ContentType
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from budgets.models import AlertSent, Budget, BudgetCounter, BudgetReservation

MOVE = {
    ("tenants", "0004_move_budgets_out"),
    ("gateway", "0005_move_alertsent_to_budgets"),
    ("budgets", "0001_initial"),
}


def _just_before_the_move(executor: MigrationExecutor) -> list[tuple[str, str]]:
    """The migrations the move builds on, in the apps it moves models out of."""
    graph = executor.loader.graph
    parents = {parent.key for key in MOVE for parent in graph.node_map[key].parents}
    return sorted(key for key in parents - MOVE if key[0] in ("tenants", "gateway"))


@pytest.mark.django_db(transaction=True)
def test_rows_written_before_the_move_are_read_through_budgets_models():
    ContentType.objects.clear_cache()
    budget_type = ContentType.objects.get_for_model(Budget).pk
    executor = MigrationExecutor(connection)
    before = _just_before_the_move(executor)
    try:
        executor.migrate(before)
        old = executor.loader.project_state(before).apps
        ContentType.objects.clear_cache()
        assert ContentType.objects.get(pk=budget_type).app_label == "tenants"

        tenant = old.get_model("tenants", "Tenant").objects.create(slug="moved-co", name="Moved Co")
        old_budget = old.get_model("tenants", "Budget").objects.create(
            tenant=tenant, period="month", limit_micro=12_500_000, hard=False, alert_emails=["ops@example.com"]
        )
        old.get_model("gateway", "AlertSent").objects.create(
            budget=old_budget, period_key="2026-11", threshold=80, spend_micro=10_000_000, limit_micro=12_500_000
        )
        old.get_model("tenants", "BudgetCounter").objects.create(name=f"t{tenant.pk}:m2026-11", value=42)
        old.get_model("tenants", "BudgetReservation").objects.create(
            request_id="req_moved", parts=[[f"t{tenant.pk}:m2026-11", 7, "m"]], expires_at=datetime.now(UTC)
        )
    finally:
        executor.loader.build_graph()
        executor.migrate(executor.loader.graph.leaf_nodes())

    budget = Budget.objects.select_related("tenant").get(pk=old_budget.pk)
    owner = budget.tenant
    assert owner is not None and owner.slug == "moved-co"
    assert (budget.period, budget.limit_micro, budget.hard) == ("month", 12_500_000, False)
    assert budget.alert_emails == ["ops@example.com"] and budget.alert_thresholds == [50, 80, 100]
    assert list(owner.budgets.all()) == [budget]
    alert = AlertSent.objects.get(budget=budget)
    assert (alert.period_key, alert.threshold, alert.spend_micro) == ("2026-11", 80, 10_000_000)
    assert BudgetCounter.objects.get(name=f"t{tenant.pk}:m2026-11").value == 42
    assert BudgetReservation.objects.get(request_id="req_moved").parts == [[f"t{tenant.pk}:m2026-11", 7, "m"]]
    ContentType.objects.clear_cache()
    assert ContentType.objects.get(pk=budget_type).app_label == "budgets"
    assert ContentType.objects.get_for_model(Budget).pk == budget_type
