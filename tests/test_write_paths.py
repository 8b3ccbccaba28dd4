"""One write path per model: the admin writes providers, models, deployments, prices, plans, keys
and budgets through the service functions, each change audited once (with who made it) and
announced once per transaction."""

from __future__ import annotations

import ast
from decimal import Decimal
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.db import transaction
from django.test import Client
from django.urls import reverse

from budgets import services as budget_services
from budgets.models import Budget
from control.models import ManagementToken, TenantMembership
from control.tokens import token_create
from core import invalidation
from gateway import catalog
from gateway.models import Deployment, LLMModel, Price, Provider
from tenants import audit, services
from tenants.models import ApiKey, AuditEvent, Plan

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def staff(db, settings):
    settings.CHITTYCAN_ADMIN_REQUIRE_OTP = False
    user = get_user_model().objects.create_superuser("root", "root@example.com", "pw")
    client = Client()
    client.force_login(user)
    return client


def actions(**filters) -> list[str]:
    return list(AuditEvent.objects.filter(**filters).order_by("pk").values_list("action", flat=True))


def inline(prefix: str, rows: list[dict[str, str]], initial: int = 0) -> dict[str, str]:
    data = {
        f"{prefix}-TOTAL_FORMS": str(len(rows)),
        f"{prefix}-INITIAL_FORMS": str(initial),
        f"{prefix}-MIN_NUM_FORMS": "0",
        f"{prefix}-MAX_NUM_FORMS": "1000",
    }
    for i, row in enumerate(rows):
        data.update({f"{prefix}-{i}-{k}": v for k, v in row.items()})
    return data


def test_admin_writes_the_catalogue_through_the_services(staff):
    before = AuditEvent.objects.count()
    form = {
        "slug": "up",
        "kind": "openai",
        "base_url": "https://up.example/v1",
        "is_active": "on",
        "api_key": "sk-typed",
        "extra_headers": "{}",
        "connect_timeout": "5",
        "read_timeout": "600",
        "max_retries": "2",
    }
    assert staff.post(reverse("admin:gateway_provider_add"), form).status_code == 302
    provider = Provider.objects.get(slug="up")
    assert provider.api_key == "sk-typed"
    model_form = {
        "name": "house",
        "kind": "chat",
        "aliases": "[]",
        "owned_by": "us",
        "context_window": "1000",
        "max_output_tokens": "100",
        "is_active": "on",
    }
    deployment = {"provider": str(provider.pk), "upstream_model": "m-1", "priority": "0", "weight": "1"}
    deployment["is_active"] = "on"
    price = {
        "effective_from_0": "2025-01-01",
        "effective_from_1": "00:00:00",
        "input_per_mtok": "1.5",
        "output_per_mtok": "2",
    }
    post = {**model_form, **inline("deployments", [deployment]), **inline("prices", [price])}
    response = staff.post(reverse("admin:gateway_llmmodel_add"), post)
    assert response.status_code == 302, response.content.decode()[:3000]
    model = LLMModel.objects.get(name="house")
    [dep] = model.deployments.all()
    [row] = model.prices.all()
    assert (dep.upstream_model, row.input_per_mtok) == ("m-1", Decimal("1.5"))
    # Change the price, drop the deployment.
    post = {
        **model_form,
        **inline("deployments", [{**deployment, "id": str(dep.pk), "model": str(model.pk), "DELETE": "on"}], 1),
        **inline("prices", [{**price, "id": str(row.pk), "model": str(model.pk), "input_per_mtok": "1.25"}], 1),
    }
    response = staff.post(reverse("admin:gateway_llmmodel_change", args=[model.pk]), post)
    assert response.status_code == 302, response.content.decode()[:3000]
    assert not Deployment.objects.filter(pk=dep.pk).exists()
    assert Price.objects.get(pk=row.pk).input_per_mtok == Decimal("1.25")
    assert actions(pk__gt=0)[before:] == [
        "provider.create",
        "model.create",
        "deployment.create",
        "price.create",
        "deployment.delete",
        "price.update",
    ]
    events = AuditEvent.objects.filter(action__in=["provider.create", "price.update"])
    assert {(e.actor_label, e.actor.get_username() if e.actor else None) for e in events} == {("admin", "root")}
    update = AuditEvent.objects.get(action="price.update")
    assert update.target == "house from 2025-01-01"
    assert update.data["changes"] == {"input_per_mtok": ["1.500000", "1.25"]}
    assert not any("sk-typed" in str(e.data) for e in AuditEvent.objects.all())
    # Deleting the model goes through its service too.
    staff.post(reverse("admin:gateway_llmmodel_delete", args=[model.pk]), {"post": "yes"})
    assert not LLMModel.objects.filter(name="house").exists()
    assert actions()[-1] == "model.delete"


def test_admin_writes_plans_keys_and_inline_budgets_through_the_services(staff):
    plan_form = {"slug": "gold", "name": "Gold", "rpm_limit": "5", "created_at_0": "2025-01-01"}
    plan_form["created_at_1"] = "00:00:00"
    assert staff.post(reverse("admin:tenants_plan_add"), plan_form).status_code == 302
    plan = Plan.objects.get(slug="gold")
    org = services.tenant_create(slug="org", plan=plan)
    api_key, _ = services.key_issue(tenant=org, name="old")
    key_form = {"user": "", "name": "new", "scopes": "{}", "rpm_limit": "", "tpm_limit": ""}
    key_form.update({"expires_at_0": "", "expires_at_1": ""})
    response = staff.post(reverse("admin:tenants_apikey_change", args=[api_key.pk]), key_form)
    assert response.status_code == 302, response.content.decode()[:3000]
    assert ApiKey.objects.get(pk=api_key.pk).name == "new"
    event = AuditEvent.objects.get(action="key.update")
    assert event.data["changes"] == {"name": ["old", "new"]} and event.tenant == org

    budget = budget_services.budget_set(tenant=org, period="month", limit_micro=5_000_000)
    tenant_form = {
        "slug": "org",
        "name": "org",
        "kind": "organisation",
        "parent": "",
        "is_active": "on",
        "plan": str(plan.pk),
        "time_zone": "UTC",
        "stripe_customer_id": "",
        "rpm_limit": "7",
        "tpm_limit": "",
        "allowed_models": "[]",
    }
    row = {"id": str(budget.pk), "tenant": str(org.pk), "period": "day", "limit_usd": "5", "hard": "on"}
    row["allow_weaken"] = "on"  # moving a hard budget to another period drops the monthly cap
    row.update({"alert_thresholds": "[50, 80, 100]", "alert_emails": "[]", "webhook_url": ""})
    post = {**tenant_form, **inline("budgets", [row], 1)}
    response = staff.post(reverse("admin:tenants_tenant_change", args=[org.pk]), post)
    assert response.status_code == 302, response.content.decode()[:3000]
    org.refresh_from_db()
    assert org.rpm_limit == 7
    assert list(Budget.objects.filter(tenant=org).values_list("period", "limit_micro")) == [("day", 5_000_000)]
    assert actions(tenant=org)[-3:] == ["tenant.update", "budget.delete", "budget.create"]

    staff.post(reverse("admin:tenants_plan_delete", args=[plan.pk]), {"post": "yes"})
    assert not Plan.objects.filter(slug="gold").exists()
    assert actions(target="gold") == ["plan.create", "plan.delete"]


def test_one_announcement_per_transaction(db, django_capture_on_commit_callbacks, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(invalidation, "announce", lambda: calls.append(1))
    with django_capture_on_commit_callbacks(execute=True):
        with transaction.atomic():
            provider = catalog.provider_create(slug="p", kind="mock")
            catalog.provider_update(provider, max_retries=5)
            services.tenant_create(slug="t")
    assert calls == [1]
    with django_capture_on_commit_callbacks(execute=True):
        catalog.provider_update(provider, max_retries=5)  # no change: nothing announced
    assert calls == [1]


def test_audit_rows_are_created_only_by_the_audit_service():
    """No code but tenants/audit.py creates AuditEvent rows (tests and migrations aside)."""
    offenders = []
    tops = [p for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in {"tests", "var"}]
    for path in (f for top in tops for f in top.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if "migrations" in rel.parts or rel == Path("tenants/audit.py"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in {"create", "bulk_create", "get_or_create"}:
                text = ast.unparse(node)
                if "AuditEvent" in text:
                    offenders.append(f"{rel}:{node.lineno}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "AuditEvent":
                offenders.append(f"{rel}:{node.lineno}")
    assert offenders == []
    assert audit.record.__module__ == "tenants.audit"


def test_memberships_and_management_tokens_are_written_through_their_services(staff):
    org = services.tenant_create(slug="org")
    bob = get_user_model().objects.create_user("bob", "bob@example.com", "pw")
    form = {"tenant": str(org.pk), "user": str(bob.pk), "role": "admin"}
    assert staff.post(reverse("admin:control_tenantmembership_add"), form).status_code == 302
    membership = TenantMembership.objects.get(user=bob, tenant=org)
    url = reverse("admin:control_tenantmembership_change", args=[membership.pk])
    assert staff.post(url, {**form, "role": "member"}).status_code == 302
    staff.post(reverse("admin:control_tenantmembership_delete", args=[membership.pk]), {"post": "yes"})
    assert not TenantMembership.objects.exists()
    assert actions(target="bob") == ["member.set", "member.set", "member.remove"]
    assert set(AuditEvent.objects.filter(target="bob").values_list("actor_label", flat=True)) == {"admin"}

    token, _ = token_create(user=bob, name="ci")
    page = staff.get(reverse("admin:control_managementtoken_change", args=[token.pk])).content.decode()
    assert token.hashed_secret not in page
    url = reverse("admin:control_managementtoken_changelist")
    staff.post(url, {"action": "revoke_tokens", "_selected_action": [token.pk]})
    assert ManagementToken.objects.get(pk=token.pk).revoked_at is not None
    event = AuditEvent.objects.get(action="apitoken.revoke")
    assert event.actor_label == "admin" and event.actor is not None
