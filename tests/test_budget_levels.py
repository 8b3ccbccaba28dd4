"""A hard cap and soft alert levels on the same scope and period: the cap is enforced exactly as
before (soft levels never refuse nor loosen it), soft levels alert, and nothing weakens a hard
budget without an explicit flag (CLI, REST API, service). `can apply` / `can export` carry both."""

from __future__ import annotations

import io
import re
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
import yaml
from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command

from budgets import alerts, counters, services
from budgets.models import AlertSent, Budget
from budgets.periods import BudgetInfo, counters_for
from budgets.tasks import live_counters, reconcile
from ledger.models import UsageRecord
from tenants.keyinfo import KeyInfo, TenantInfo
from tests.conftest import wait_usage
from tests.test_budgets import counter_value, month_name
from tests.test_budgets_concurrency import ACTUAL, LIMIT, chat_reply, fire, open_reservations

DOCS = Path(__file__).resolve().parent.parent / "docs" / "budgets.md"


def run(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


# --- the model and the service ------------------------------------------------------------------


def test_one_hard_and_many_soft_levels_per_scope_and_period(make_tenant):
    tenant = make_tenant("levels-co")
    hard = services.budget_set(tenant=tenant, period="month", limit_micro=500_000_000)
    soft = [
        services.budget_set(tenant=tenant, period="month", limit_micro=limit, hard=False, alert_thresholds=[100])
        for limit in (300_000_000, 800_000_000)
    ]
    assert Budget.objects.filter(tenant=tenant).count() == 3
    hard.refresh_from_db()
    assert (hard.hard, hard.limit_micro) == (True, 500_000_000)
    # Setting a soft level again updates it in place; setting the hard one again updates the cap.
    again = services.budget_set(
        tenant=tenant, period="month", limit_micro=800_000_000, hard=False, alert_emails=["a@x.test"]
    )
    assert again.pk == soft[1].pk and again.alert_emails == ["a@x.test"]
    assert services.budget_set(tenant=tenant, period="month", limit_micro=400_000_000).pk == hard.pk
    # The database itself refuses a second hard budget or a second soft one at the same limit.
    for extra in (
        Budget(tenant=tenant, period="month", limit_micro=1, hard=True),
        Budget(tenant=tenant, period="month", limit_micro=300_000_000, hard=False),
    ):
        with pytest.raises(ValidationError):
            extra.full_clean()
    # Turning a soft level hard beside the cap, or moving it onto another level, is refused too.
    with pytest.raises(ValidationError):
        services.budget_update(soft[0], hard=True)
    with pytest.raises(ValidationError):
        services.budget_update(soft[0], limit_micro=800_000_000)
    # Another period is another scope.
    assert services.budget_set(tenant=tenant, period="day", limit_micro=1).hard


def test_service_never_weakens_a_hard_budget_without_allow_weaken(make_tenant):
    tenant = make_tenant("weaken-co")
    hard = services.budget_set(tenant=tenant, period="month", limit_micro=500_000_000)
    with pytest.raises(services.WeakenRefused, match="raise the hard budget from 500.00 to 800.00"):
        services.budget_set(tenant=tenant, period="month", limit_micro=800_000_000)
    with pytest.raises(services.WeakenRefused, match="soft"):
        services.budget_update(hard, hard=False)
    with pytest.raises(services.WeakenRefused, match="delete"):
        services.budget_delete(budget=hard)
    hard.refresh_from_db()
    assert (hard.hard, hard.limit_micro) == (True, 500_000_000)
    # Tightening is always allowed; weakening with the flag too, and both are audited.
    change = services.budget_put(tenant=tenant, period="month", limit_micro=450_000_000)
    assert change.fields == {"limit_micro": (500_000_000, 450_000_000)}
    change = services.budget_put(tenant=tenant, period="month", limit_micro=900_000_000, allow_weaken=True)
    assert change.fields == {"limit_micro": (450_000_000, 900_000_000)}
    services.budget_delete(budget=Budget.objects.get(pk=hard.pk), allow_weaken=True)
    assert not Budget.objects.filter(tenant=tenant).exists()


def test_the_hot_path_counts_one_counter_per_scope_with_the_hard_limit():
    tenant = TenantInfo(id=5, slug="t", time_zone="UTC", rpm_limit=None, tpm_limit=None, monthly_request_quota=None)
    key = KeyInfo(
        id=9,
        prefix="chitty_x",
        hashed="",
        tenant=tenant,
        lineage=(tenant,),
        models=None,
        endpoints=None,
        rpm_limit=None,
        tpm_limit=None,
        expires_at=None,
    )
    budgets = [
        BudgetInfo(1, "tenant", 5, "month", 800, False, "UTC"),
        BudgetInfo(2, "tenant", 5, "month", 500, True, "UTC"),
        BudgetInfo(3, "tenant", 5, "month", 300, False, "UTC"),
    ]
    when = datetime(2026, 11, 22, tzinfo=UTC)
    for order in (budgets, budgets[::-1]):
        [counter] = counters_for(key, order, when)
        assert (counter.name, counter.limit) == ("t5:m2026-11", 500)
    [soft_only] = counters_for(key, [budgets[0], budgets[2]], when)
    assert soft_only.limit is None  # counted, never refuses


# --- enforcement with soft levels present --------------------------------------------------------


def test_hard_cap_holds_under_concurrency_with_soft_levels_and_soft_alerts_fire(
    upstream, gateway_server, make_tenant, make_key
):
    tenant = make_tenant("levels-race")
    key = make_key(tenant)
    services.budget_set(tenant=tenant, period="month", limit_micro=LIMIT, alert_thresholds=[])
    low = services.budget_set(tenant=tenant, period="month", limit_micro=LIMIT // 2, hard=False, alert_thresholds=[100])
    services.budget_set(tenant=tenant, period="month", limit_micro=LIMIT * 5, hard=False, alert_thresholds=[100])
    # Enough requests that some still arrive after the first wave settles: a gateway fast enough to
    # refuse every other request of 80 while the first wave's reservations are open would leave
    # three reservations' worth unspent (a timing artefact the assertions below are not about).
    total = 400
    upstream.push("/v1/chat/completions", *(chat_reply(3000, delay=0.02) for _ in range(total)))
    responses = fire([gateway_server.url], key, total)
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) == {200, 402}, statuses
    admitted = statuses[200]
    wait_usage(admitted, timeout=30, tenant=tenant)
    spent = sum(UsageRecord.objects.filter(tenant=tenant).values_list("cost_micro", flat=True))
    assert spent == ACTUAL * admitted <= LIMIT  # the hard cap, not a soft level, decided
    assert LIMIT - spent < 2 * 40_100
    assert counter_value(tenant.pk, month_name("t", tenant.pk)) == spent
    assert open_reservations(tenant.pk) == 0
    # The $0.50 soft level crossed 100 %: it alerts (once); the $5 one and the hard cap do not.
    due = alerts.check_budgets()
    assert [(a.budget_id, a.threshold) for a in due] == [(low.pk, 100)]
    assert alerts.check_budgets() == []
    assert AlertSent.objects.filter(budget__tenant=tenant).count() == 1


# --- the CLI ------------------------------------------------------------------------------------


def _doc_commands() -> list[list[str]]:
    """The `can budgets set|delete` lines of docs/budgets.md's "Setting budgets" block."""
    text = DOCS.read_text()
    block = text.split("## Setting budgets", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = []
    for line in block.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith(".venv/bin/can budgets "):
            commands.append(line.split()[1:])
    return commands


def test_docs_example_pasted_top_to_bottom_gives_a_hard_cap_plus_soft_alerts(make_tenant, make_key):
    acme = make_tenant("acme")
    make_tenant("acme-research", parent=acme, kind="team")
    commands = _doc_commands()
    assert commands, "docs/budgets.md lost its example"
    for args in commands:
        if "--key" in args:  # the docs' key prefix is an example; make a key with it
            continue
        run(*args)
    month = Budget.objects.filter(tenant=acme, period="month")
    assert sorted((b.hard, b.limit_micro) for b in month) == [
        (False, 400_000_000),
        (False, 800_000_000),
        (True, 500_000_000),
    ]
    soft = month.get(hard=False, limit_micro=800_000_000)
    assert soft.alert_thresholds == [50, 80, 100] and soft.alert_emails == ["ops@acme.test"]


def test_set_prints_what_it_changed_and_refuses_to_weaken(make_tenant):
    make_tenant("cli-levels")
    out = run("budgets", "set", "--tenant", "cli-levels", "--limit", "500")
    assert re.search(r"created budget \d+: tenant cli-levels: 500.00 USD per month \(hard\)", out)
    out = run("budgets", "set", "--tenant", "cli-levels", "--limit", "450", "--thresholds", "80,100")
    assert "limit_micro: 500.00 USD -> 450.00 USD" in out and "alert_thresholds: [50, 80, 100] -> [80, 100]" in out
    assert "unchanged budget" in run("budgets", "set", "--tenant", "cli-levels", "--limit", "450")
    with pytest.raises(
        CommandError, match=r"refused: would raise the hard budget from 450.00 to 800.00 .*--allow-weaken"
    ):
        run("budgets", "set", "--tenant", "cli-levels", "--limit", "800")
    with pytest.raises(CommandError, match="refused: would delete the hard budget"):
        run("budgets", "delete", "--tenant", "cli-levels")
    assert Budget.objects.get(tenant__slug="cli-levels").limit_micro == 450_000_000
    # A soft level beside it never touches the cap, and says so.
    out = run("budgets", "set", "--tenant", "cli-levels", "--limit", "800", "--soft")
    assert (
        "created budget" in out
        and "(soft)" in out
        and "also on this scope" in out
        and "450.00 USD per month (hard)" in out
    )
    assert Budget.objects.get(tenant__slug="cli-levels", hard=True).limit_micro == 450_000_000
    # With the flag: raised, and the change is printed.
    out = run("budgets", "set", "--tenant", "cli-levels", "--limit", "600", "--allow-weaken")
    assert "limit_micro: 450.00 USD -> 600.00 USD" in out
    run("budgets", "set", "--tenant", "cli-levels", "--limit", "900", "--soft")
    with pytest.raises(CommandError, match="several soft budgets"):
        run("budgets", "delete", "--tenant", "cli-levels", "--soft")
    assert "deleted budget" in run("budgets", "delete", "--tenant", "cli-levels", "--soft", "--limit", "900")
    assert "deleted budget" in run("budgets", "delete", "--tenant", "cli-levels", "--allow-weaken")
    assert list(Budget.objects.filter(tenant__slug="cli-levels").values_list("limit_micro", "hard")) == [
        (800_000_000, False)
    ]


def test_small_limits_print_exactly(make_tenant):
    make_tenant("cli-tiny")
    out = run("budgets", "set", "--tenant", "cli-tiny", "--limit", "0.001")
    assert "0.001 USD per month" in out and "0.00 USD" not in out
    out = run("budgets", "set", "--tenant", "cli-tiny", "--limit", "0.000250")
    assert "limit_micro: 0.001 USD -> 0.00025 USD" in out


# --- can apply / can export ------------------------------------------------------------------------

YAML = """\
version: 1
tenants:
  - slug: yaml-co
    budgets:
      - period: month
        limit_usd: "500.00"
        thresholds: [80, 100]
      - period: month
        limit_usd: "300.00"
        hard: false
        thresholds: [100]
        emails: [ops@yaml.test]
      - period: month
        limit_usd: "800.00"
        hard: false
        webhook: https://hooks.yaml.test/budget
        webhook_secret: ${YAML_SOFT_SECRET}
"""


def test_apply_and_export_round_trip_a_hard_cap_with_soft_levels(db, tmp_path, monkeypatch):
    monkeypatch.setenv("YAML_SOFT_SECRET", "whsec_1")
    path = tmp_path / "c.yaml"
    path.write_text(YAML)
    out = run("apply", "-f", str(path))
    assert out.count("create budget") == 3, out
    rows = Budget.objects.filter(tenant__slug="yaml-co")
    assert sorted((b.hard, b.limit_micro) for b in rows) == [
        (False, 300_000_000),
        (False, 800_000_000),
        (True, 500_000_000),
    ]
    assert rows.get(limit_micro=800_000_000).webhook_secret == "whsec_1"
    assert "no changes" in run("apply", "-f", str(path))

    exported = tmp_path / "export.yaml"
    run("export", "-o", str(exported))
    doc = yaml.safe_load(exported.read_text())
    [tenant] = [t for t in doc["tenants"] if t["slug"] == "yaml-co"]
    assert [(b["limit_usd"], b.get("hard", True)) for b in tenant["budgets"]] == [
        ("500.00", True),
        ("300.00", False),
        ("800.00", False),
    ]
    [secret_ref] = [b["webhook_secret"] for b in tenant["budgets"] if "webhook_secret" in b]
    monkeypatch.setenv(secret_ref[2:-1], "whsec_1")
    assert "no changes" in run("apply", "-f", str(exported))


def test_apply_refuses_two_hard_budgets_for_one_period(db, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(YAML.replace("        hard: false\n        thresholds: [100]\n", "        thresholds: [100]\n"))
    err = io.StringIO()
    with pytest.raises(CommandError, match="nothing was written"):
        call_command("apply", "-f", str(path), stdout=io.StringIO(), stderr=err)
    assert "tenants[0].budgets[1]: a second hard month budget (also at tenants[0].budgets[0])" in err.getvalue()
    assert not Budget.objects.filter(tenant__slug="yaml-co").exists()


def test_reconcile_repairs_a_shared_counter_once(upstream, gateway_server, make_tenant, make_key):
    tenant = make_tenant("levels-drift")
    key = make_key(tenant)
    services.budget_set(tenant=tenant, period="month", limit_micro=LIMIT)
    services.budget_set(tenant=tenant, period="month", limit_micro=LIMIT // 2, hard=False)
    services.budget_set(tenant=tenant, period="month", limit_micro=LIMIT * 2, hard=False)
    upstream.push("/v1/chat/completions", chat_reply(3000))
    assert [r.status_code for r in fire([gateway_server.url], key, 1)] == [200]
    wait_usage(1, tenant=tenant)
    name = month_name("t", tenant.pk)
    assert [c.name for _, c in live_counters()].count(name) == 1
    conn = redis.Redis.from_url(settings.REDIS_URL)
    conn.incrby(counters.counter_key(tenant.pk, name), 1_000)  # drift
    conn.close()
    [drift] = [d for d in reconcile(repair=True, settle_time=0.1) if d.counter == name]
    assert drift.drift == 1_000
    assert counter_value(tenant.pk, name) == ACTUAL
