"""The tenant dashboard (/dashboard/), persona style: every page and write per role, each with a
positive control and a cross-tenant attempt.

- org-a (team-a1 below it, project-a1x below that) and org-b;
- olivia owns org-a, alice is admin of org-a, vera is a viewer of org-a;
- mike is a member of team-a1 (not of org-a itself);
- charlie is admin of org-b: he sees nothing of org-a (404, never 403);
- sam is staff (needs the second factor).
"""

from __future__ import annotations

import csv
import html
import io
import re
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from django.contrib.auth import get_user_model
from django.db.models import Sum
from django.test import Client
from django.urls import reverse
from django_otp.plugins.otp_totp.models import TOTPDevice

from budgets import services as budget_services
from budgets.models import Budget
from control.models import TenantMembership
from ledger import writer
from ledger.models import UsageRecord
from tenants import services
from tenants.models import ApiKey, AuditEvent
from tests.test_admin import current_code

PASSWORD = "correct horse battery staple"
PAGES = ["overview", "tree", "keys", "budgets", "usage", "usage_csv", "live", "team"]


def _row(tenant, key, cost, model="gpt-4o", status="ok", http_status=200, minutes=1):
    return {
        "request_id": f"req_{uuid.uuid4().hex}",
        "created_at": (datetime.now(UTC) - timedelta(minutes=minutes)).timestamp(),
        "tenant_id": tenant.pk,
        "api_key_id": key.pk if key else None,
        "endpoint": "chat",
        "requested_model": model,
        "served_model": model,
        "provider": "fake-openai",
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "cost_micro": cost,
        "latency_ms": 120,
        "status": status,
        "http_status": http_status,
        "timings": {"route": 1, "dispatch": 100},
    }


@pytest.fixture
def world(db):
    users = get_user_model().objects
    org_a = services.tenant_create(slug="org-a", name="Org A")
    team_a1 = services.tenant_create(slug="team-a1", parent=org_a, kind="team")
    project = services.tenant_create(slug="project-a1x", parent=team_a1, kind="project")
    org_b = services.tenant_create(slug="org-b", name="Org B")
    people = {
        name: users.create_user(name, password=PASSWORD) for name in ("olivia", "alice", "vera", "mike", "charlie")
    }
    people["sam"] = users.create_user("sam", password=PASSWORD, is_staff=True)
    TenantMembership.objects.create(user=people["olivia"], tenant=org_a, role="owner")
    TenantMembership.objects.create(user=people["alice"], tenant=org_a, role="admin")
    TenantMembership.objects.create(user=people["vera"], tenant=org_a, role="viewer")
    TenantMembership.objects.create(user=people["mike"], tenant=team_a1, role="member")
    TenantMembership.objects.create(user=people["charlie"], tenant=org_b, role="admin")
    key_a, _ = services.key_issue(tenant=team_a1, name="a1-key", user=people["alice"], actor_label="test")
    key_b, _ = services.key_issue(tenant=org_b, name="b-key", actor_label="test")
    budget_services.budget_set(tenant=org_a, period="month", limit_micro=50_000_000)
    budget_services.budget_set(tenant=org_b, period="month", limit_micro=10_000_000)
    rows_a = [
        _row(team_a1, key_a, 1_234_567),
        _row(project, None, 10, model="gpt-4o-mini", status="upstream_error", http_status=502),
    ]
    row_b = _row(org_b, key_b, 777_777)
    writer.write_rows([*rows_a, row_b])
    clients = {}
    for name, user in people.items():
        client = Client()
        client.force_login(user)
        clients[name] = client
    return {
        "org_a": org_a,
        "team_a1": team_a1,
        "project": project,
        "org_b": org_b,
        "key_a": key_a,
        "key_b": key_b,
        "a_request": rows_a[0]["request_id"],
        "b_request": row_b["request_id"],
        "users": people,
        **clients,
    }


def _get(client, name, slug, *args):
    return client.get(reverse(f"dashboard:{name}", args=[slug, *args]))


def _verified_staff_client(user) -> Client:
    device = TOTPDevice.objects.create(user=user, name="phone", confirmed=True)
    client = Client()
    response = client.post(
        reverse("dashboard:login"), {"username": user.username, "password": PASSWORD, "otp_token": current_code(device)}
    )
    assert response.status_code == 302, response.content[:2000]
    return client


# --- reading: every page, per role ----------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES)
def test_owner_admin_and_viewer_read_every_page_of_their_tenant(world, page):
    for who in ("olivia", "alice", "vera"):
        for slug in ("org-a", "team-a1", "project-a1x"):
            assert _get(world[who], page, slug).status_code == 200, (who, page, slug)


@pytest.mark.parametrize("page", PAGES)
def test_nobody_reads_another_tenants_pages(world, page):
    for who in ("olivia", "alice", "vera", "mike"):
        assert _get(world[who], page, "org-b").status_code == 404, (who, page)
    assert _get(world["charlie"], page, "org-b").status_code == 200  # positive control
    for slug in ("org-a", "team-a1", "project-a1x"):
        assert _get(world["charlie"], page, slug).status_code == 404, (page, slug)


@pytest.mark.parametrize("page", PAGES)
def test_a_member_reads_its_subtree_only(world, page):
    assert _get(world["mike"], page, "team-a1").status_code == 200
    assert _get(world["mike"], page, "project-a1x").status_code == 200
    assert _get(world["mike"], page, "org-a").status_code == 404


def test_audit_page_is_for_owners_and_admins_of_the_subtree(world):
    for who in ("olivia", "alice"):
        response = _get(world[who], "audit", "org-a")
        assert response.status_code == 200
        assert b"key.issue" in response.content and world["key_a"].prefix.encode() in response.content
    for who in ("vera", "mike"):
        assert _get(world[who], "audit", "org-a").status_code == 404
        assert _get(world[who], "audit", "team-a1").status_code == 404
    assert _get(world["charlie"], "audit", "org-a").status_code == 404
    # charlie's own audit page lists org-b's events, none of org-a's.
    page = _get(world["charlie"], "audit", "org-b").content.decode()
    assert world["key_b"].prefix in page and world["key_a"].prefix not in page


def _seqs(response) -> list[int]:
    return [int(n) for n in re.findall(r'data-seq="(\d+)"', response.content.decode())]


def test_audit_page_pages_by_seq_and_filters_by_action_and_date(world):
    for limit in range(1, 106):  # 105 more events on team-a1, one on org-b
        services.tenant_update(world["team_a1"], rpm_limit=limit, actor_label="test")
    services.tenant_update(world["org_b"], rpm_limit=5, actor_label="test")
    subtree = {world["org_a"].pk, world["team_a1"].pk, world["project"].pk}
    expected = sorted(AuditEvent.objects.filter(tenant_id__in=subtree).values_list("seq", flat=True), reverse=True)
    assert len(expected) > 105
    first = _get(world["alice"], "audit", "org-a")
    assert first.status_code == 200
    assert _seqs(first) == expected[:100]  # newest first, 100 a page
    older = re.search(r'id="audit-older" href="([^"]+)"', first.content.decode())
    assert older is not None and "before=" in older[1]
    second = world["alice"].get(html.unescape(older[1]))
    assert second.status_code == 200 and _seqs(second) == expected[100:]
    assert b'id="audit-older"' not in second.content and b'id="audit-newest"' in second.content
    org_b_seqs = set(AuditEvent.objects.filter(tenant=world["org_b"]).values_list("seq", flat=True))
    assert not org_b_seqs & set(_seqs(first) + _seqs(second))

    # the action prefix filter, kept by the "older" link
    url = reverse("dashboard:audit", args=["org-a"])
    updates = world["alice"].get(url, {"action": "tenant.update"})
    assert len(_seqs(updates)) == 100 and b"key.issue" not in updates.content
    link = re.search(r'id="audit-older" href="([^"]+)"', updates.content.decode())
    assert link is not None and "action=tenant.update" in html.unescape(link[1])
    rest = world["alice"].get(html.unescape(link[1]))
    assert len(_seqs(rest)) == 5 and b"key.issue" not in rest.content
    keys = world["alice"].get(url, {"action": "key."})
    issued = AuditEvent.objects.filter(tenant_id__in=subtree, action__startswith="key.").count()
    assert issued >= 1 and len(_seqs(keys)) == issued and b"tenant.update" not in keys.content

    # the date filter (UTC days, both ends inclusive)
    today = datetime.now(UTC).date()
    assert _seqs(world["alice"].get(url, {"since": today, "until": today})) == expected[:100]
    assert _seqs(world["alice"].get(url, {"since": today + timedelta(days=1)})) == []
    assert _seqs(world["alice"].get(url, {"until": today - timedelta(days=1)})) == []
    # bad filters: a 400 with the form's message, never a 500
    for bad in ({"since": "yesterday"}, {"since": today, "until": today - timedelta(days=1)}, {"before": "-3"}):
        response = world["alice"].get(url, bad)
        assert response.status_code == 400 and b"Check the filters." in response.content, bad

    # an admin sees its subtree only: team-a1's page has none of org-a's own events
    team_page = _get(world["alice"], "audit", "team-a1")
    team_expected = sorted(
        AuditEvent.objects.filter(tenant_id__in=subtree - {world["org_a"].pk}).values_list("seq", flat=True),
        reverse=True,
    )[:100]
    assert _seqs(team_page) == team_expected
    # viewers and members: 404 whatever the query; another tenant's admin: 404; his own: his rows
    for who in ("vera", "mike"):
        assert world[who].get(url, {"action": "key."}).status_code == 404
        assert _get(world[who], "audit", "team-a1").status_code == 404
    assert world["charlie"].get(url, {"before": expected[0]}).status_code == 404
    assert set(_seqs(_get(world["charlie"], "audit", "org-b"))) == org_b_seqs


def test_pages_need_a_signed_in_user(world):
    response = Client().get(reverse("dashboard:overview", args=["org-a"]))
    assert response.status_code == 302 and response["Location"].startswith("/dashboard/login/?next=")
    assert Client().get(reverse("dashboard:usage_csv", args=["org-a"])).status_code == 302


def test_overview_shows_spend_budgets_and_chart_data(world):
    page = _get(world["alice"], "overview", "org-a").content.decode()
    assert "$1.23" in page  # 1,234,567 + 10 micro-USD this month
    assert 'id="spend-data"' in page and "gpt-4o-mini" in page
    assert "50.00" in page  # the org's budget
    assert "team-a1" in page  # children with their spend
    assert "50.0% errors" in page


def test_request_detail_in_scope_only(world):
    ok = _get(world["mike"], "request", "team-a1", world["a_request"])
    assert ok.status_code == 200 and b"dispatch" in ok.content
    assert _get(world["charlie"], "request", "org-b", world["a_request"]).status_code == 404
    assert _get(world["alice"], "request", "org-a", world["b_request"]).status_code == 404
    assert _get(world["mike"], "request", "team-a1", world["b_request"]).status_code == 404


ROUTE = {
    "policy": "team-policy",
    "rule": "long-prompts",
    "requested": "gpt-4o",
    "model": "claude-sonnet",
    "candidates": [
        {"target": "claude-sonnet", "role": "route", "model": "claude-sonnet", "deployment": "anthropic-eu/sonnet-4"},
        {
            "target": "claude-sonnet",
            "role": "route",
            "model": "claude-sonnet",
            "deployment": "anthropic-us/sonnet-4",
            "skipped": "breaker open",
        },
        {"target": "gpt-4o", "role": "fallback", "model": "gpt-4o", "deployment": "fake-openai/gpt-4o"},
        {"target": "mystery-model", "role": "fallback", "skipped": "unknown target"},
    ],
    "timeouts": {"first_byte": 2.0},
    "served": "fake-openai/gpt-4o",
    "outcome": "fallback:2",
}
ATTEMPTS = [
    {
        "n": 1,
        "deployment_id": 7,
        "provider": "anthropic-eu",
        "model": "sonnet-4",
        "why": "primary",
        "start_ms": 1.5,
        "ms": 2000.4,
        "outcome": "error",
        "status": None,
        "error": "first byte timeout",
    },
    {
        "n": 2,
        "deployment_id": 9,
        "provider": "fake-openai",
        "model": "gpt-4o",
        "why": "fallback after timeout",
        "start_ms": 2002.1,
        "ms": 95.2,
        "outcome": "ok",
        "status": 200,
        "error": "",
    },
]


def test_request_detail_shows_the_route_decision_and_attempts_per_role(world):
    row = {**_row(world["team_a1"], world["key_a"], 5_000), "route": ROUTE, "attempts": ATTEMPTS}
    writer.write_rows([row])
    rid = row["request_id"]
    for who, slug in (("olivia", "org-a"), ("alice", "org-a"), ("vera", "team-a1"), ("mike", "team-a1")):
        response = _get(world[who], "request", slug, rid)
        assert response.status_code == 200, who
        page = response.content.decode()
        assert "long-prompts" in page and "team-policy" in page  # the rule and its policy
        assert "claude-sonnet" in page  # the routed model
        assert "skipped: breaker open" in page and "anthropic-us/sonnet-4" in page
        assert "skipped: unknown target" in page and "mystery-model" in page
        assert "first_byte=2.0" in page
        assert "ok: served by fake-openai/gpt-4o (fallback:2)" in page  # the outcome
        # the attempts, next to the stage timings
        assert 'id="attempts"' in page and 'id="timings"' in page
        assert "fallback after timeout" in page and "first byte timeout" in page and "2000.4" in page
        assert "route_decision" not in page and "{&#x27;n&#x27;" not in page  # no raw JSON dumps
    # another tenant's admin, and a member outside the row's subtree: 404
    assert _get(world["charlie"], "request", "org-b", rid).status_code == 404
    assert _get(world["charlie"], "request", "org-a", rid).status_code == 404
    # a request no policy routed says so, and has no attempts recorded
    plain = _get(world["alice"], "request", "org-a", world["a_request"]).content.decode()
    assert 'id="route-none"' in plain and "No upstream attempt recorded" in plain


def test_request_detail_shows_a_rejection(world):
    decision = {"policy": "p", "rule": "no-images", "requested": "gpt-4o", "rejected": "images are not allowed"}
    row = {
        **_row(world["org_a"], None, 0, status="rejected", http_status=400),
        "route": decision,
        "served_model": "",
        "provider": "",
    }
    writer.write_rows([row])
    page = _get(world["alice"], "request", "org-a", row["request_id"]).content.decode()
    assert "rejected by the rule: images are not allowed" in page and "no-images" in page
    assert "No candidates" in page
    assert _get(world["mike"], "request", "team-a1", row["request_id"]).status_code == 404  # org-a's row


# --- usage explorer and CSV -------------------------------------------------------------------------


def _csv(response) -> list[dict[str, str]]:
    assert response.status_code == 200 and response.is_async  # streamed as read, under ASGI
    body = b"".join(response).decode()
    return list(csv.DictReader(io.StringIO(body)))


def test_usage_csv_totals_equal_the_ledger_and_stay_in_the_subtree(world):
    rows = _csv(_get(world["alice"], "usage_csv", "org-a"))
    ids = [world["org_a"].pk, world["team_a1"].pk, world["project"].pk]
    ledger = UsageRecord.objects.filter(tenant_id__in=ids).aggregate(s=Sum("cost_micro"))["s"]
    assert len(rows) == 2
    assert sum(int(r["cost_micro"]) for r in rows) == ledger == 1_234_577
    assert world["b_request"] not in {r["request_id"] for r in rows}


def test_usage_filters_by_model_status_and_key(world):
    client = world["alice"]
    url = reverse("dashboard:usage_csv", args=["org-a"])
    assert [r["model"] for r in _csv(client.get(url, {"model": "gpt-4o-mini"}))] == ["gpt-4o-mini"]
    assert [r["http_status"] for r in _csv(client.get(url, {"status": "5xx"}))] == ["502"]
    assert [r["key_id"] for r in _csv(client.get(url, {"key": str(world["key_a"].pk)}))] == [str(world["key_a"].pk)]
    page = client.get(reverse("dashboard:usage", args=["org-a"]), {"status": "nonsense"})
    assert page.status_code == 400 and b"An HTTP status (429)" in page.content
    # A key of another tenant is not among the choices: a form error, not its rows.
    other = client.get(url, {"key": str(world["key_b"].pk)})
    assert other.status_code == 400


# --- keys ---------------------------------------------------------------------------------------------


def test_viewer_cannot_create_or_revoke_keys(world):
    url = reverse("dashboard:keys", args=["org-a"])
    page = world["vera"].get(url)
    assert b'id="create-key"' not in page.content and b'id="read-only"' in page.content
    before = ApiKey.objects.count()
    assert world["vera"].post(url, {"name": "sneaky", "tenant": world["org_a"].pk}).status_code == 404
    assert ApiKey.objects.count() == before
    revoke = reverse("dashboard:key_revoke", args=["org-a", world["key_a"].pk])
    assert world["vera"].post(revoke).status_code == 404
    world["key_a"].refresh_from_db()
    assert world["key_a"].revoked_at is None


def test_member_creates_sees_once_and_revokes_own_key_only(world):
    url = reverse("dashboard:keys", args=["team-a1"])
    response = world["mike"].post(url, {"name": "mike-ci", "tenant": world["team_a1"].pk, "endpoints": ["chat"]})
    assert response.status_code == 201
    key = ApiKey.objects.get(name="mike-ci")
    assert key.user == world["users"]["mike"] and key.scopes == {"endpoints": ["chat"]}
    secret = response.context["created"][1]
    assert secret.startswith("chitty_") and secret.encode() in response.content
    assert secret.encode() not in world["mike"].get(url).content  # shown once
    # Not someone else's key (alice owns key_a), nor a key outside the subtree.
    for slug, other in (("team-a1", world["key_a"]), ("team-a1", world["key_b"]), ("org-b", world["key_b"])):
        assert world["mike"].post(reverse("dashboard:key_revoke", args=[slug, other.pk])).status_code == 404
        other.refresh_from_db()
        assert other.revoked_at is None
    # A member cannot create keys above its membership (org-a is not in its subtree).
    assert (
        world["mike"]
        .post(reverse("dashboard:keys", args=["org-a"]), {"name": "x", "tenant": world["org_a"].pk})
        .status_code
        == 404
    )
    assert world["mike"].post(reverse("dashboard:key_revoke", args=["team-a1", key.pk])).status_code == 302
    key.refresh_from_db()
    assert key.revoked_at is not None
    event = AuditEvent.objects.filter(action="key.revoke", target=key.prefix).get()
    assert event.actor == world["users"]["mike"] and event.actor_label == "dashboard"


def test_admin_manages_every_key_of_the_team_and_rotates(world):
    rotate = reverse("dashboard:key_rotate", args=["org-a", world["key_a"].pk])
    response = world["alice"].post(rotate)
    assert response.status_code == 201
    new_key, secret = response.context["created"]
    assert new_key.rotated_from_id == world["key_a"].pk and secret.encode() in response.content
    world["key_a"].refresh_from_db()
    assert world["key_a"].revoked_at is not None
    # charlie, admin elsewhere, cannot touch it through either tenant.
    for slug in ("org-b", "org-a"):
        assert world["charlie"].post(reverse("dashboard:key_revoke", args=[slug, new_key.pk])).status_code == 404
    new_key.refresh_from_db()
    assert new_key.revoked_at is None


def test_key_form_rejects_a_tenant_outside_the_subtree(world):
    url = reverse("dashboard:keys", args=["team-a1"])
    response = world["alice"].post(url, {"name": "x", "tenant": world["org_b"].pk})
    assert response.status_code == 200 and b"Select a valid choice" in response.content
    assert not ApiKey.objects.filter(name="x").exists()


# --- budgets and members --------------------------------------------------------------------------------


def test_admin_sets_budgets_inside_its_subtree_only(world):
    url = reverse("dashboard:budgets", args=["org-a"])
    ok = world["alice"].post(
        url,
        {
            "owner": f"t{world['team_a1'].pk}",
            "period": "month",
            "limit_usd": "12.50",
            "hard": "on",
            "alert_thresholds": "50,100",
        },
    )
    assert ok.status_code == 302
    budget = Budget.objects.get(tenant=world["team_a1"], hard=True)
    assert budget.limit_micro == 12_500_000 and budget.alert_thresholds == [50, 100]
    # Its own membership's tenant is set from above; another tenant is not a choice at all.
    for owner in (f"t{world['org_a'].pk}", f"t{world['org_b'].pk}", f"k{world['key_b'].pk}"):
        refused = world["alice"].post(url, {"owner": owner, "period": "month", "limit_usd": "1"})
        assert refused.status_code == 400, owner
    assert Budget.objects.get(tenant=world["org_a"]).limit_micro == 50_000_000
    # Raising a hard limit needs the box ticked.
    raised = world["alice"].post(
        url, {"owner": f"t{world['team_a1'].pk}", "period": "month", "limit_usd": "99", "hard": "on"}
    )
    assert raised.status_code == 400 and b"Refused" in raised.content
    for who in ("vera", "mike", "charlie"):
        slug = "team-a1" if who == "mike" else "org-a"
        r = world[who].post(
            reverse("dashboard:budgets", args=[slug]),
            {"owner": f"t{world['project'].pk}", "period": "month", "limit_usd": "1"},
        )
        assert r.status_code == 404, who
    assert not Budget.objects.filter(tenant=world["project"]).exists()


def test_budget_bad_amount_is_a_form_error(world):
    url = reverse("dashboard:budgets", args=["org-a"])
    r = world["alice"].post(url, {"owner": f"t{world['team_a1'].pk}", "period": "month", "limit_usd": "lots"})
    assert r.status_code == 400 and b"An amount in USD" in r.content


def test_members_page_roles(world):
    url = reverse("dashboard:team", args=["org-a"])
    assert (
        world["alice"]
        .post(url, {"action": "set", "username": "charlie", "tenant": world["team_a1"].pk, "role": "viewer"})
        .status_code
        == 302
    )
    assert TenantMembership.objects.filter(user__username="charlie", tenant=world["team_a1"], role="viewer").exists()
    # An admin cannot make owners; the owner can.
    assert (
        world["alice"]
        .post(url, {"action": "set", "username": "vera", "tenant": world["org_a"].pk, "role": "owner"})
        .status_code
        == 400
    )
    assert (
        world["olivia"]
        .post(url, {"action": "set", "username": "vera", "tenant": world["org_a"].pk, "role": "admin"})
        .status_code
        == 302
    )
    assert TenantMembership.objects.get(user__username="vera", tenant=world["org_a"]).role == "admin"
    # Viewers and members change nothing; charlie cannot reach org-a's team page.
    assert (
        world["mike"]
        .post(
            reverse("dashboard:team", args=["team-a1"]),
            {"action": "set", "username": "mike", "tenant": world["team_a1"].pk, "role": "admin"},
        )
        .status_code
        == 404
    )
    assert (
        world["charlie"]
        .post(url, {"action": "set", "username": "charlie", "tenant": world["org_a"].pk, "role": "owner"})
        .status_code
        == 404
    )
    assert TenantMembership.objects.get(user__username="mike").role == "member"
    assert not TenantMembership.objects.filter(user__username="charlie", tenant=world["org_a"]).exists()


# --- sign-in, second factor, throttle, headers, CSRF ------------------------------------------------------


def test_sign_in_with_password_then_overview(world):
    client = Client()
    response = client.post(reverse("dashboard:login"), {"username": "alice", "password": PASSWORD})
    assert response.status_code == 302
    assert client.get(response["Location"], follow=True).status_code == 200


def test_staff_need_the_second_factor(world, settings):
    settings.CHITTYCAN_ADMIN_REQUIRE_OTP = True
    sam = world["users"]["sam"]
    # signed in without a verified device: sent to sign in again (a device exists) or to enrol.
    assert world["sam"].get(reverse("dashboard:overview", args=["org-a"])).status_code == 302
    client = Client()
    enrol = client.post(reverse("dashboard:login"), {"username": "sam", "password": PASSWORD})
    assert enrol.status_code == 302 and enrol["Location"].startswith(reverse("admin:otp_enrol"))
    verified = _verified_staff_client(sam)
    wrong = Client().post(reverse("dashboard:login"), {"username": "sam", "password": PASSWORD, "otp_token": "000000"})
    assert wrong.status_code == 400
    assert verified.get(reverse("dashboard:overview", args=["org-b"])).status_code == 200  # staff see all


def test_a_tenant_can_require_the_second_factor(world):
    services.tenant_update(world["org_a"], require_otp=True, actor_label="test")
    # vera (org-a) and mike (team-a1, below org-a) now need it; charlie (org-b) does not.
    assert world["mike"].get(reverse("dashboard:overview", args=["team-a1"])).status_code == 302
    assert world["charlie"].get(reverse("dashboard:overview", args=["org-b"])).status_code == 200
    client = Client()
    first = client.post(reverse("dashboard:login"), {"username": "mike", "password": PASSWORD})
    assert first["Location"].startswith(reverse("admin:otp_enrol"))
    # The shared enrolment page takes a non-staff user who needs the factor.
    page = client.get(first["Location"])
    assert page.status_code == 200 and b"<svg" in page.content
    device = TOTPDevice.objects.get(user__username="mike", confirmed=False)
    done = client.post(first["Location"], {"token": current_code(device), "next": "/dashboard/"})
    assert done.status_code == 200 and b"/dashboard/" in done.content
    assert client.get(reverse("dashboard:overview", args=["team-a1"])).status_code == 200


def test_failed_sign_ins_are_throttled(world, settings):
    settings.CHITTYCAN_DASHBOARD_LOGIN_ATTEMPTS = 3
    client = Client()
    for _ in range(3):
        assert client.post(reverse("dashboard:login"), {"username": "vera", "password": "wrong"}).status_code == 400
    blocked = client.post(reverse("dashboard:login"), {"username": "vera", "password": PASSWORD})
    assert blocked.status_code == 429 and b"Too many failed sign-ins" in blocked.content
    assert "_auth_user_id" not in client.session


def test_security_headers_and_csrf(world):
    response = world["alice"].get(reverse("dashboard:overview", args=["org-a"]))
    csp = response["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert response["X-Frame-Options"] == "DENY"
    assert b"<script>" not in response.content  # no inline script anywhere
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(world["users"]["alice"])
    forged = strict.post(reverse("dashboard:key_revoke", args=["org-a", world["key_a"].pk]))
    assert forged.status_code == 403
    world["key_a"].refresh_from_db()
    assert world["key_a"].revoked_at is None
