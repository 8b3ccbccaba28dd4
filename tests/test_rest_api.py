"""The management REST API, persona style.

- alice is admin of org A: she sees and manages A's subtree (team A1, project A1x).
- bob is a member of org A: he reads A's subtree but changes nothing.
- charlie is admin of org B: he sees nothing of A (404, never 403: nothing is confirmed to exist).
- sam is staff: he sees everything.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from budgets import services as budget_services
from budgets.models import Budget
from control import tokens
from control.models import TenantMembership
from ledger import writer
from tenants import keys, services
from tenants.models import ApiKey, AuditEvent


def _client(user=None):
    client = APIClient()
    if user is not None:
        _, plaintext = tokens.token_create(user=user, name="test")
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {plaintext}")
    return client


@pytest.fixture
def world(make_tenant):
    users = get_user_model().objects
    org_a = make_tenant("org-a", time_zone="Europe/Paris")
    team_a1 = make_tenant("team-a1", parent=org_a, kind="team")
    project = make_tenant("project-a1x", parent=team_a1, kind="project")
    org_b = make_tenant("org-b")
    alice = users.create_user("alice", password="pw-alice-123")
    bob = users.create_user("bob", password="pw-bob-123")
    charlie = users.create_user("charlie", password="pw-charlie-123")
    sam = users.create_user("sam", password="pw-sam-123", is_staff=True)
    TenantMembership.objects.create(user=alice, tenant=org_a, role="admin")
    TenantMembership.objects.create(user=bob, tenant=org_a, role="member")
    TenantMembership.objects.create(user=charlie, tenant=org_b, role="admin")
    key_a, _ = services.key_issue(tenant=team_a1, name="a1-key")
    key_b, _ = services.key_issue(tenant=org_b, name="b-key")
    budget_a = budget_services.budget_set(tenant=org_a, period="month", limit_micro=50_000_000)
    budget_b = budget_services.budget_set(tenant=org_b, period="month", limit_micro=10_000_000)
    return {
        "org_a": org_a,
        "team_a1": team_a1,
        "project": project,
        "org_b": org_b,
        "key_a": key_a,
        "key_b": key_b,
        "budget_a": budget_a,
        "budget_b": budget_b,
        "alice": _client(alice),
        "bob": _client(bob),
        "charlie": _client(charlie),
        "sam": _client(sam),
    }


def _slugs(response):
    assert response.status_code == 200, response.content
    return sorted(t["slug"] for t in response.json()["results"])


def test_authentication_is_required(world):
    anonymous = _client()
    assert anonymous.get("/api/tenants/").status_code == 401
    bad = APIClient()
    bad.credentials(HTTP_AUTHORIZATION="Bearer ccm_" + "x" * 44)
    assert bad.get("/api/tenants/").status_code == 401
    injected = APIClient()
    injected.credentials(HTTP_AUTHORIZATION="Bearer ' OR 1=1--")
    assert injected.get("/api/tenants/").status_code == 401
    # A user with no membership (and not staff) has no access at all.
    nobody = get_user_model().objects.create_user("nobody", password="pw-nobody-123")
    assert _client(nobody).get("/api/tenants/").status_code == 403
    # Revoked tokens stop working.
    user = get_user_model().objects.get(username="alice")
    token, plaintext = tokens.token_create(user=user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {plaintext}")
    assert client.get("/api/me/").json()["memberships"] == [{"tenant": "org-a", "role": "admin"}]
    tokens.token_revoke(token=token)
    assert client.get("/api/me/").status_code == 401


def test_session_login_works_too(world):
    client = APIClient()
    assert client.login(username="sam", password="pw-sam-123")
    assert "org-b" in _slugs(client.get("/api/tenants/"))


def test_tenants_are_scoped_to_the_subtree(world):
    assert _slugs(world["alice"].get("/api/tenants/")) == ["org-a", "project-a1x", "team-a1"]
    assert _slugs(world["bob"].get("/api/tenants/")) == ["org-a", "project-a1x", "team-a1"]
    assert _slugs(world["charlie"].get("/api/tenants/")) == ["org-b"]
    assert _slugs(world["sam"].get("/api/tenants/")) == ["org-a", "org-b", "project-a1x", "team-a1"]
    assert world["alice"].get("/api/tenants/team-a1/").json()["parent"] == "org-a"
    assert world["charlie"].get("/api/tenants/org-a/").status_code == 404
    assert world["charlie"].get("/api/tenants/team-a1/").status_code == 404
    assert world["charlie"].get("/api/tenants/no-such-tenant/").status_code == 404


def test_creating_child_tenants(world):
    res = world["alice"].post("/api/tenants/", {"slug": "team-a2", "parent": "org-a"}, format="json")
    assert res.status_code == 201, res.content
    assert res.json()["time_zone"] == "Europe/Paris"  # inherited from the parent
    assert AuditEvent.objects.filter(action="tenant.create", target="team-a2", actor_label="api:alice").exists()
    assert world["bob"].post("/api/tenants/", {"slug": "x1", "parent": "org-a"}, format="json").status_code == 403
    res = world["charlie"].post("/api/tenants/", {"slug": "x2", "parent": "org-a"}, format="json")
    assert res.status_code == 400 and "does not exist" in res.json()["parent"][0]
    assert world["alice"].post("/api/tenants/", {"slug": "rootless"}, format="json").status_code == 403
    assert (
        world["sam"].post("/api/tenants/", {"slug": "org-c", "kind": "organisation"}, format="json").status_code == 201
    )
    res = world["alice"].post("/api/tenants/", {"slug": "tz", "parent": "org-a", "time_zone": "Mars/Olympus"}, "json")
    assert res.status_code == 400 and "time_zone" in res.json()


def test_keys_create_once_revoke_rotate(world):
    alice, charlie, bob = world["alice"], world["charlie"], world["bob"]
    res = alice.post(
        "/api/keys/",
        {"tenant": "project-a1x", "name": "ci", "scopes": {"models": ["gpt-4o"], "endpoints": ["chat"]}},
        format="json",
    )
    assert res.status_code == 201, res.content
    body = res.json()
    plaintext = body["key"]
    assert keys.looks_valid(plaintext)
    stored = ApiKey.objects.get(pk=body["id"])
    assert stored.hashed_secret == keys.hash_key(plaintext) and plaintext not in str(stored.__dict__)
    listing = alice.get("/api/keys/").json()["results"]
    assert {k["name"] for k in listing} == {"ci", "a1-key"}
    assert all("key" not in k for k in listing)
    assert alice.get(f"/api/keys/{body['id']}/").json()["scopes"] == {"models": ["gpt-4o"], "endpoints": ["chat"]}

    # Charlie cannot see, revoke or rotate A's keys, nor issue keys in A; bob may only read.
    key_a = world["key_a"]
    assert charlie.get(f"/api/keys/{key_a.pk}/").status_code == 404
    assert charlie.post(f"/api/keys/{key_a.pk}/revoke/").status_code == 404
    assert charlie.post(f"/api/keys/{key_a.pk}/rotate/").status_code == 404
    assert charlie.post("/api/keys/", {"tenant": "team-a1"}, format="json").status_code == 400
    assert [k["name"] for k in charlie.get("/api/keys/").json()["results"]] == ["b-key"]
    assert bob.get(f"/api/keys/{key_a.pk}/").status_code == 200
    assert bob.post(f"/api/keys/{key_a.pk}/revoke/").status_code == 403
    assert bob.post("/api/keys/", {"tenant": "team-a1"}, format="json").status_code == 403

    bad = alice.post("/api/keys/", {"tenant": "team-a1", "scopes": {"endpoints": ["shell"]}}, format="json")
    assert bad.status_code == 400 and "scopes" in bad.json()

    rotated = alice.post(f"/api/keys/{key_a.pk}/rotate/")
    assert rotated.status_code == 201
    assert rotated.json()["rotated_from"] == key_a.pk and keys.looks_valid(rotated.json()["key"])
    key_a.refresh_from_db()
    assert key_a.revoked_at is not None
    assert alice.post(f"/api/keys/{key_a.pk}/rotate/").status_code == 400
    revoked = alice.post(f"/api/keys/{rotated.json()['id']}/revoke/")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] and not revoked.json()["is_usable"]


def test_budgets_crud_and_rights(world):
    alice, charlie, bob, sam = world["alice"], world["charlie"], world["bob"], world["sam"]
    res = alice.post(
        "/api/budgets/",
        {
            "tenant": "team-a1",
            "period": "day",
            "limit_micro": 2_000_000,
            "hard": False,
            "alert_thresholds": [50, 90],
            "alert_emails": ["a1@example.com"],
            "webhook_url": "https://hooks.example.com/a1",
            "webhook_secret": "s",
        },
        format="json",
    )
    assert res.status_code == 201, res.content
    created = res.json()
    assert created["has_webhook_secret"] and "webhook_secret" not in created
    budget_id = created["id"]
    assert Budget.objects.get(pk=budget_id).alert_thresholds == [50, 90]
    assert AuditEvent.objects.filter(action="budget.create", actor_label="api:alice").exists()

    # Her own org's budget is set from above.
    assert alice.get(f"/api/budgets/{world['budget_a'].pk}/").status_code == 200
    assert alice.patch(f"/api/budgets/{world['budget_a'].pk}/", {"limit_micro": 1}, format="json").status_code == 403
    assert alice.delete(f"/api/budgets/{world['budget_a'].pk}/").status_code == 403
    assert (
        alice.post("/api/budgets/", {"tenant": "org-a", "period": "day", "limit_micro": 5}, "json").status_code == 403
    )
    # A key budget inside her subtree is fine.
    res = alice.post("/api/budgets/", {"api_key": world["key_a"].pk, "limit_micro": 1_000}, format="json")
    assert res.status_code == 201 and res.json()["period"] == "month"

    # Charlie: 404 for A's budgets, "does not exist" for A's tenants and keys.
    assert charlie.get(f"/api/budgets/{budget_id}/").status_code == 404
    assert charlie.patch(f"/api/budgets/{budget_id}/", {"limit_micro": 1}, format="json").status_code == 404
    assert charlie.delete(f"/api/budgets/{budget_id}/").status_code == 404
    res = charlie.post("/api/budgets/", {"tenant": "team-a1", "limit_micro": 1}, format="json")
    assert res.status_code == 400 and "does not exist" in str(res.json())
    res = charlie.post("/api/budgets/", {"api_key": world["key_a"].pk, "limit_micro": 1}, format="json")
    assert res.status_code == 400 and "does not exist" in str(res.json())
    assert [b["tenant"] for b in charlie.get("/api/budgets/").json()["results"]] == ["org-b"]
    assert bob.patch(f"/api/budgets/{budget_id}/", {"limit_micro": 1}, format="json").status_code == 403

    # Exact integers only.
    for bad in (1.5, "100", True, -1, None):
        res = alice.patch(f"/api/budgets/{budget_id}/", {"limit_micro": bad}, format="json")
        assert res.status_code == 400, bad
    assert alice.patch(f"/api/budgets/{budget_id}/", {"alert_thresholds": [0]}, format="json").status_code == 400
    assert alice.patch(f"/api/budgets/{budget_id}/", {"period": "month"}, format="json").status_code == 400
    soft_again = {"tenant": "team-a1", "period": "day", "limit_micro": 2_000_000, "hard": False}
    dup = alice.post("/api/budgets/", soft_again, format="json")
    assert dup.status_code == 400 and "soft day budget at this limit" in str(dup.json())
    # A hard cap beside the soft level is fine; a second hard one is not.
    hard = alice.post("/api/budgets/", {"tenant": "team-a1", "period": "day", "limit_micro": 1_000_000}, format="json")
    assert hard.status_code == 201, hard.content
    dup = alice.post("/api/budgets/", {"tenant": "team-a1", "period": "day", "limit_micro": 5}, format="json")
    assert dup.status_code == 400 and "hard day budget" in str(dup.json())
    # Weakening the hard one needs allow_weaken, whether raising it, turning it soft or deleting it.
    hard_url = f"/api/budgets/{hard.json()['id']}/"
    for change in ({"limit_micro": 1_000_001}, {"hard": False}):
        res = alice.patch(hard_url, change, format="json")
        assert res.status_code == 400 and "allow_weaken" in str(res.json()), change
    assert Budget.objects.get(pk=hard.json()["id"]).limit_micro == 1_000_000
    assert alice.patch(hard_url, {"limit_micro": 900_000}, format="json").status_code == 200  # lowering is fine
    res = alice.patch(hard_url, {"limit_micro": 1_500_000, "allow_weaken": True}, format="json")
    assert res.status_code == 200 and res.json()["limit_micro"] == 1_500_000
    assert alice.delete(hard_url).status_code == 400
    assert alice.delete(hard_url + "?allow_weaken=true").status_code == 204

    res = alice.patch(f"/api/budgets/{budget_id}/", {"limit_micro": 3_000_000}, format="json")
    assert res.status_code == 200 and res.json()["limit_micro"] == 3_000_000
    assert res.json()["alert_emails"] == ["a1@example.com"]  # untouched fields stay
    assert alice.delete(f"/api/budgets/{budget_id}/").status_code == 204
    assert not Budget.objects.filter(pk=budget_id).exists()

    assert sam.patch(f"/api/budgets/{world['budget_a'].pk}/", {"limit_micro": 7}, format="json").status_code == 200


def _spend(tenant, micro, model="gpt-4o", key=None, when=None):
    writer.write_rows(
        [
            {
                "request_id": f"req_{uuid.uuid4().hex}",
                "created_at": (when or datetime.now(UTC)).timestamp(),
                "tenant_id": tenant.pk,
                "api_key_id": key.pk if key else None,
                "endpoint": "chat",
                "requested_model": model,
                "served_model": model,
                "provider": "fake-openai",
                "cost_micro": micro,
            }
        ]
    )


def test_usage_and_spend_are_scoped(world):
    alice, charlie, sam = world["alice"], world["charlie"], world["sam"]
    _spend(world["team_a1"], 1_000, key=world["key_a"])
    _spend(world["project"], 250, model="gpt-4o-mini")
    _spend(world["org_b"], 99_999, key=world["key_b"])
    _spend(world["team_a1"], 7, when=datetime(2020, 1, 1, tzinfo=UTC))  # outside this month

    res = alice.get("/api/usage/", {"tenant": "org-a", "period": "month", "group_by": "model"})
    assert res.status_code == 200, res.content
    body = res.json()
    assert [(r["model"], r["calls"], r["cost_micro"]) for r in body["results"]] == [
        ("gpt-4o", 1, 1_000),
        ("gpt-4o-mini", 1, 250),
    ]
    assert body["total"] == {
        "calls": 2,
        "cost_micro": 1_250,
        "cache_hits": 0,
        "coalesced": 0,
        "saved_micro": 0,
        "saved_usd": "0.000000",
        "cache_hit_rate": 0.0,
    }
    by_key = alice.get("/api/usage/", {"tenant": "team-a1", "group_by": "key"}).json()
    assert {r["key"]: r["cost_micro"] for r in by_key["results"]} == {world["key_a"].pk: 1_000, None: 257}
    days = alice.get("/api/usage/", {"tenant": "org-a", "period": "month", "group_by": "day"}).json()
    assert sum(d["cost_micro"] for d in days["results"]) == 1_250
    window = alice.get("/api/usage/", {"tenant": "team-a1", "start": "2019-12-01T00:00:00Z", "end": "last tuesday"})
    assert window.status_code == 400 and "end" in window.json()
    window = alice.get(
        "/api/usage/", {"tenant": "team-a1", "start": "2019-12-01T00:00:00Z", "end": "2020-02-01T00:00:00Z"}
    )
    total = window.json()["total"]
    assert (total["calls"], total["cost_micro"], total["cache_hits"]) == (1, 7, 0)

    # Charlie sees only B; A's tenant is 404 to him.
    assert charlie.get("/api/usage/", {"tenant": "org-a"}).status_code == 404
    charlie_total = charlie.get("/api/usage/").json()["total"]
    assert (charlie_total["calls"], charlie_total["cost_micro"], charlie_total["cache_hits"]) == (1, 99_999, 0)
    assert alice.get("/api/usage/").json()["total"]["cost_micro"] == 1_257
    assert sam.get("/api/usage/", {"group_by": "tenant"}).json()["total"]["cost_micro"] == 101_256
    assert alice.get("/api/usage/", {"group_by": "colour"}).status_code == 400

    # Real-time spend against the budget: the child's spend counts against the org.
    status = alice.get(f"/api/budgets/{world['budget_a'].pk}/status/").json()
    assert (status["spent_micro"], status["limit_micro"], status["exceeded"]) == (1_250, 50_000_000, False)
    assert status["remaining_micro"] == 50_000_000 - 1_250 - (status["reserved_micro"] or 0)
    assert charlie.get(f"/api/budgets/{world['budget_a'].pk}/status/").status_code == 404
    spend = alice.get("/api/tenants/org-a/spend/").json()
    assert [b["spent_micro"] for b in spend["budgets"]] == [1_250]
    assert charlie.get("/api/tenants/org-a/spend/").status_code == 404


def test_cli_memberships_and_tokens(world):
    from io import StringIO

    from django.core.management import call_command
    from django.core.management.base import CommandError

    get_user_model().objects.create_user("dana", password="pw-dana-123")
    out = StringIO()
    call_command("members", "add", "--user", "dana", "--tenant", "team-a1", "--role", "admin", stdout=out)
    assert "dana is admin of team-a1" in out.getvalue()
    out = StringIO()
    call_command("apitoken", "create", "--user", "dana", "--name", "cli", stdout=out, stderr=StringIO())
    plaintext = out.getvalue().strip()
    assert plaintext.startswith("ccm_")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {plaintext}")
    assert _slugs(client.get("/api/tenants/")) == ["project-a1x", "team-a1"]
    call_command("apitoken", "revoke", plaintext[:16], stdout=StringIO())
    assert client.get("/api/tenants/").status_code == 401
    call_command("members", "remove", "--user", "dana", "--tenant", "team-a1", stdout=StringIO())
    with pytest.raises(CommandError, match="no user"):
        call_command("apitoken", "create", "--user", "ghost", stdout=StringIO())
