"""The tamper-evident audit log (docs/audit.md): the hash chain and `can audit verify`, concurrent
writers, retention with an anchor, the retention system check, exports, secrets never stored, and
one row with its origin from every surface (admin, CLI, REST, `can apply`)."""

from __future__ import annotations

import csv
import getpass
import io
import json
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, connections
from django.db.migrations.executor import MigrationExecutor
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from django_otp.oath import TOTP
from django_otp.plugins.otp_totp.models import TOTPDevice
from rest_framework.test import APIClient

from billing_export.checks import STRIPE_MAX_EVENT_AGE_DAYS, audit_retention_outlives_billing_window
from chittycan import cli
from control import tokens
from control.models import TenantMembership
from gateway import catalog
from ledger import tasks as ledger_tasks
from tenants import audit, auditchain, keys, services
from tenants.models import ApiKey, AuditChain, AuditEvent, Tenant
from tests.processes import ROOT, services_env

PASSWORD = "correct horse battery staple"


def _verify_command() -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command("audit", "verify", stdout=out, stderr=err)
    except SystemExit as exc:
        return int(exc.code or 0), out.getvalue(), err.getvalue()
    return 0, out.getvalue(), err.getvalue()


@pytest.fixture
def five(transactional_db):
    """Five chained rows from ordinary service calls."""
    org = services.tenant_create(slug="org", actor_label="test")
    services.tenant_create(slug="team", parent=org, kind="team", actor_label="test")
    api_key, _ = services.key_issue(tenant=org, name="k1", actor_label="test")
    services.key_revoke(api_key=api_key, actor_label="test")
    services.tenant_create(slug="other", actor_label="test")
    rows = list(AuditEvent.objects.order_by("seq"))
    assert [r.seq for r in rows] == [1, 2, 3, 4, 5]
    return rows


# --- the chain -----------------------------------------------------------------------------------


def test_rows_are_chained_and_verify(five):
    assert five[0].prev_hash == "0" * 64
    for before, after in zip(five, five[1:], strict=False):
        assert after.prev_hash == before.hash and len(after.hash) == 64
    head = AuditChain.objects.get(pk=1)
    assert (head.head_seq, head.head_hash) == (5, five[-1].hash)
    result = audit.verify()
    assert result.ok and result.checked == 5
    code, out, _ = _verify_command()
    assert code == 0 and "audit chain OK: 5 rows verified" in out


def test_a_row_altered_by_sql_is_named(five):
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE tenants_auditevent SET data = %s WHERE seq = 3", [json.dumps({"name": "someone else's key"})]
        )
    result = audit.verify()
    assert not result.ok and result.seq == 3 and "altered" in (result.problem or "")
    code, _, err = _verify_command()
    assert code == 1 and "BROKEN at row #3" in err and "altered" in err


def test_an_altered_target_or_actor_is_named(five):
    with connection.cursor() as cursor:
        cursor.execute("UPDATE tenants_auditevent SET actor_label = 'nobody' WHERE seq = 2")
    assert audit.verify().seq == 2


def test_a_rehashed_row_breaks_the_next_link(five):
    """Whoever alters a row and recomputes its hash still breaks the link the next row holds."""
    row = AuditEvent.objects.get(seq=2)
    row.target = "forged"
    AuditEvent.objects.filter(pk=row.pk).update(target="forged", hash=auditchain.row_hash(row))
    result = audit.verify()
    assert result.seq == 3 and "does not link" in (result.problem or "")


def test_a_deleted_middle_row_is_named(five):
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM tenants_auditevent WHERE seq = 3")
    result = audit.verify()
    assert not result.ok and result.seq == 3 and "row #3 removed" in (result.problem or "")
    code, _, err = _verify_command()
    assert code == 1 and "row #3 removed" in err


def test_deleted_last_rows_are_named(five):
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM tenants_auditevent WHERE seq >= 4")
    result = audit.verify()
    assert result.seq == 4 and "#4 to #5 removed" in (result.problem or "")


def test_a_removed_chain_head_is_reported(five):
    AuditChain.objects.all().delete()
    assert not audit.verify().ok


def test_concurrent_writers_do_not_fork_the_chain(transactional_db):
    """Eight threads, each with its own PostgreSQL connection, writing at once."""
    assert connection.vendor == "postgresql"
    org = services.tenant_create(slug="busy", actor_label="test")
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            start.wait()
            for i in range(15):
                audit.record("test.write", tenant=org, target=f"w{n}-{i}", data={"n": n, "i": i})
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    seqs = list(AuditEvent.objects.order_by("seq").values_list("seq", flat=True))
    assert seqs == list(range(1, 8 * 15 + 2))
    result = audit.verify()
    assert result.ok and result.checked == 121


# --- retention -----------------------------------------------------------------------------------


def test_prune_keeps_the_chain_verifiable(five):
    cutoff_row = five[2]
    now = cutoff_row.at + timedelta(days=90, microseconds=1)  # rows 1-3 are past 90 days
    pruned = audit.prune(now=now, retention_days=90)
    assert (pruned.rows, pruned.through_seq) == (3, 3)
    assert list(AuditEvent.objects.order_by("seq").values_list("seq", flat=True)) == [4, 5, 6]
    marker = AuditEvent.objects.get(seq=6)
    assert marker.action == audit.PRUNE_ACTION and marker.data["through_hash"] == cutoff_row.hash
    head = AuditChain.objects.get(pk=1)
    assert (head.anchor_seq, head.anchor_hash) == (3, cutoff_row.hash)
    result = audit.verify()
    assert result.ok and result.anchor_seq == 3 and result.checked == 3
    # The first row after the anchor is still covered: deleting it is named.
    AuditEvent.objects.filter(seq=4).delete()
    assert audit.verify().seq == 4


def test_a_moved_anchor_is_detected(five):
    audit.prune(now=five[2].at + timedelta(days=90, microseconds=1), retention_days=90)
    # Hide rows 4-5 by deleting them and moving the anchor past them.
    row5 = AuditEvent.objects.get(seq=5)
    AuditEvent.objects.filter(seq__in=[4, 5]).delete()
    AuditChain.objects.filter(pk=1).update(anchor_seq=5, anchor_hash=row5.hash)
    result = audit.verify()
    assert not result.ok and "anchor" in (result.problem or "")


def test_the_prune_task_prunes_the_audit_log(five, settings):
    settings.CHITTYCAN_AUDIT_RETENTION_DAYS = 90
    AuditEvent.objects.filter(seq__lte=2).update(at=timezone.now() - timedelta(days=91))
    # (rows 1-2 no longer verify after that UPDATE: pruning them is exactly what removes them)
    result = ledger_tasks.prune_usage()
    assert result["audit_rows"] == 2
    assert audit.verify().ok
    marker = AuditEvent.objects.get(action=audit.PRUNE_ACTION)
    assert marker.origin == "task" and marker.data["through_seq"] == 2


def test_prune_command(five):
    out = io.StringIO()
    call_command("audit", "prune", "--days", "1", stdout=out)
    assert "pruned 0 audit rows" in out.getvalue()
    with pytest.raises(CommandError, match="at least 1"):
        call_command("audit", "prune", "--days", "0")


def test_system_check_refuses_a_retention_inside_the_billing_window(settings):
    settings.CHITTYCAN_AUDIT_RETENTION_DAYS = 90
    assert audit_retention_outlives_billing_window() == []
    settings.CHITTYCAN_AUDIT_RETENTION_DAYS = STRIPE_MAX_EVENT_AGE_DAYS
    errors = audit_retention_outlives_billing_window()
    assert [e.id for e in errors] == ["billing_export.E002"]
    assert "CHITTYCAN_AUDIT_RETENTION_DAYS" in errors[0].msg
    with pytest.raises(Exception, match="billing_export.E002"):
        call_command("check")


# --- export --------------------------------------------------------------------------------------


def test_export_jsonl_and_csv(five):
    out = io.StringIO()
    call_command("audit", "export", "--since", "2000-01-01", "--format", "jsonl", stdout=out)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["seq"] for r in lines] == [1, 2, 3, 4, 5]
    assert lines[0]["action"] == "tenant.create" and lines[0]["tenant"] == "org"
    assert lines[1]["prev_hash"] == lines[0]["hash"]

    out = io.StringIO()
    call_command("audit", "export", "--since", "2000-01-01", "--tenant", "org", stdout=out)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [r["tenant"] for r in rows] == ["org", "team", "org", "org"]  # org's subtree, not "other"
    assert json.loads(rows[2]["data"]) == five[2].data

    future = (timezone.now() + timedelta(days=1)).date().isoformat()
    out = io.StringIO()
    call_command("audit", "export", "--since", future, "--format", "jsonl", stdout=out)
    assert out.getvalue() == ""
    out = io.StringIO()
    call_command("audit", "export", "--since", "2000-01-01", "--until", five[2].at.isoformat(), stdout=out)
    assert len(list(csv.DictReader(io.StringIO(out.getvalue())))) == 2


def test_export_to_a_file_and_bad_input(five, tmp_path: Path):
    target = tmp_path / "audit.jsonl"
    call_command("audit", "export", "--since", "2000-01-01", "--format", "jsonl", "--output", str(target))
    assert len(target.read_text().splitlines()) == 5
    with pytest.raises(CommandError, match="--since"):
        call_command("audit", "export", "--since", "last tuesday")
    with pytest.raises(CommandError, match="no tenant"):
        call_command("audit", "export", "--since", "2000-01-01", "--tenant", "nope")


# --- secrets -------------------------------------------------------------------------------------


def _everything_audited() -> str:
    return "\n".join(
        json.dumps(audit.as_dict(e), default=str) + repr(AuditEvent.objects.filter(pk=e.pk).values().get())
        for e in AuditEvent.objects.all()
    )


def test_secrets_never_reach_the_audit_log(transactional_db):
    org = services.tenant_create(slug="org")
    api_key, plaintext = services.key_issue(tenant=org, name="k")
    rotated, rotated_plaintext = services.key_rotate(api_key=api_key)
    user = get_user_model().objects.create_user("tok", password="pw-tok-123")
    token, token_plaintext = tokens.token_create(user=user, name="ci")
    provider = catalog.provider_create(
        slug="up", kind="openai", base_url="https://up.example/v1", api_key="sk-provider-secret-123"
    )
    catalog.provider_update(provider, api_key="sk-provider-secret-456")
    logged = _everything_audited()
    assert AuditEvent.objects.count() >= 6
    secrets = [
        plaintext,
        rotated_plaintext,
        api_key.hashed_secret,
        ApiKey.objects.get(pk=rotated.pk).hashed_secret,
        keys.hash_key(plaintext),
        token_plaintext,
        token.hashed_secret,
        "sk-provider-secret-123",
        "sk-provider-secret-456",
    ]
    for secret in secrets:
        assert secret and secret not in logged


# --- surfaces ------------------------------------------------------------------------------------


def _code(device: TOTPDevice) -> str:
    totp = TOTP(device.bin_key, device.step, device.t0, device.digits, device.drift)
    return f"{totp.token():0{device.digits}d}"


@pytest.fixture
def admin_client(transactional_db) -> Client:
    root = get_user_model().objects.create_superuser("root", "root@example.com", PASSWORD)
    device = TOTPDevice.objects.create(user=root, name="phone", confirmed=True)
    client = Client(HTTP_USER_AGENT="AuditTest/1.0 (admin)")
    response = client.post(
        reverse("admin:login"),
        {"username": "root", "password": PASSWORD, "otp_token": _code(device), "next": "/admin/"},
    )
    assert response.status_code == 302, response.content[:2000]
    return client


def test_admin_post_records_its_origin(admin_client):
    org = services.tenant_create(slug="org")
    form = {
        "slug": "org-web",
        "name": "Web",
        "kind": "team",
        "parent": str(org.pk),
        "is_active": "on",
        "plan": "",
        "time_zone": "UTC",
        "stripe_customer_id": "",
        "rpm_limit": "",
        "tpm_limit": "",
        "allowed_models": "[]",
        "budgets-TOTAL_FORMS": "0",
        "budgets-INITIAL_FORMS": "0",
        "budgets-MIN_NUM_FORMS": "0",
        "budgets-MAX_NUM_FORMS": "1000",
    }
    response = admin_client.post(reverse("admin:tenants_tenant_add"), form)
    assert response.status_code == 302, response.content.decode()[:3000]
    event = AuditEvent.objects.get(action="tenant.create", target="org-web")
    assert (event.origin, event.actor_label, event.actor_name) == ("admin", "admin", "root")
    assert event.address == "127.0.0.1" and event.user_agent == "AuditTest/1.0 (admin)"
    assert event.os_user == ""
    assert audit.verify().ok


def test_admin_writes_without_a_service_are_audited_with_secrets_hidden(admin_client):
    """Users are written by Django's own admin: the gap the generic admin audit closes."""
    form = {"username": "newbie", "password1": "a-long-pass-phrase-1", "password2": "a-long-pass-phrase-1"}
    form["usable_password"] = "true"
    response = admin_client.post(reverse("admin:auth_user_add"), form)
    assert response.status_code == 302, response.content.decode()[:3000]
    user = get_user_model().objects.get(username="newbie")
    created = AuditEvent.objects.get(action="auth.user.create", target="newbie")
    assert (created.origin, created.actor_name, created.address) == ("admin", "root", "127.0.0.1")
    assert "password" in created.data["fields"] and created.data["changes"]["password"] == [None, None]

    url = reverse("admin:auth_user_password_change", args=[user.pk])
    response = admin_client.post(url, {"password1": "another-pass-phrase-2", "password2": "another-pass-phrase-2"})
    assert response.status_code == 302, response.content.decode()[:3000]
    changed = AuditEvent.objects.get(action="auth.user.update", target="newbie")
    assert changed.data["fields"] == ["password"]

    response = admin_client.post(reverse("admin:auth_user_delete", args=[user.pk]), {"post": "yes"})
    assert response.status_code == 302
    deleted = AuditEvent.objects.get(action="auth.user.delete", target="newbie")
    assert deleted.data["changes"]["username"] == ["newbie", None]
    logged = _everything_audited()
    for secret in ("a-long-pass-phrase-1", "another-pass-phrase-2", user.password):
        assert secret not in logged
    # The login itself (last_login) is no audit row.
    assert not AuditEvent.objects.filter(action="auth.user.update", target="root").exists()
    assert audit.verify().ok


def test_cli_records_cli_and_the_os_user(transactional_db):
    cli.main(["tenants", "create", "cli-co", "--name", "CLI Co"])
    event = AuditEvent.objects.get(action="tenant.create", target="cli-co")
    assert (event.origin, event.actor_label) == ("cli", "cli")
    assert event.os_user == getpass.getuser() and event.user_agent == "can tenants create"
    assert event.address  # the host name


def test_apply_records_apply_from_the_cli(transactional_db, tmp_path: Path):
    config = tmp_path / "chittycan.yaml"
    config.write_text("tenants:\n  - slug: applied-co\n    time_zone: UTC\n")
    cli.main(["apply", "-f", str(config)])
    event = AuditEvent.objects.get(action="tenant.create", target="applied-co")
    assert (event.origin, event.actor_label) == ("cli", "apply")
    assert event.data.get("source") and event.os_user == getpass.getuser()


def _api(user) -> APIClient:
    client = APIClient(HTTP_USER_AGENT="AuditTest/1.0 (rest)", REMOTE_ADDR="10.1.2.3")
    _, plaintext = tokens.token_create(user=user, name="test")
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {plaintext}")
    return client


@pytest.fixture
def world(transactional_db):
    users = get_user_model().objects
    org_a = services.tenant_create(slug="org-a")
    team_a = services.tenant_create(slug="team-a", parent=org_a, kind="team")
    org_b = services.tenant_create(slug="org-b")
    alice = users.create_user("alice", password="pw-alice-123")
    bob = users.create_user("bob", password="pw-bob-123")
    charlie = users.create_user("charlie", password="pw-charlie-123")
    sam = users.create_user("sam", password="pw-sam-123", is_staff=True)
    TenantMembership.objects.create(user=alice, tenant=org_a, role="admin")
    TenantMembership.objects.create(user=bob, tenant=org_a, role="member")
    TenantMembership.objects.create(user=charlie, tenant=org_b, role="admin")
    services.key_issue(tenant=team_a, name="a-key")
    services.key_issue(tenant=org_b, name="b-key")
    return {"alice": _api(alice), "bob": _api(bob), "charlie": _api(charlie), "sam": _api(sam)}


def test_rest_write_records_its_origin(world):
    response = world["alice"].post("/api/tenants/", {"slug": "team-a2", "parent": "org-a"}, format="json")
    assert response.status_code == 201, response.content
    event = AuditEvent.objects.get(action="tenant.create", target="team-a2")
    assert (event.origin, event.actor_label, event.actor_name) == ("api", "api:alice", "alice")
    assert event.address == "10.1.2.3" and event.user_agent == "AuditTest/1.0 (rest)"
    # Deleting the user empties the foreign key, not the name; the chain still verifies.
    get_user_model().objects.filter(username="alice").delete()
    event.refresh_from_db()
    assert (event.actor_id, event.actor_name) == (None, "alice")
    assert audit.verify().ok


def test_rest_audit_endpoint_is_scoped_to_the_admins_subtree(world):
    def tenants_seen(client, query=""):
        response = client.get(f"/api/audit/{query}")
        assert response.status_code == 200, response.content
        return {row["tenant"] for row in response.json()["results"]}

    assert tenants_seen(world["alice"]) == {"org-a", "team-a"}
    assert tenants_seen(world["charlie"]) == {"org-b"}
    assert tenants_seen(world["sam"]) >= {"org-a", "team-a", "org-b", None}
    assert tenants_seen(world["alice"], "?tenant=team-a") == {"team-a"}
    assert world["bob"].get("/api/audit/").status_code == 403  # a member, not an admin
    assert world["charlie"].get("/api/audit/?tenant=org-a").status_code == 404  # not confirmed to exist
    assert world["alice"].get("/api/audit/?since=yesterday-ish").status_code == 400
    assert world["alice"].get("/api/audit/?limit=0").status_code == 400
    assert APIClient().get("/api/audit/").status_code == 401

    page = world["sam"].get("/api/audit/?limit=2").json()
    assert [r["seq"] for r in page["results"]] == [1, 2] and page["next_after_seq"] == 2
    page = world["sam"].get(f"/api/audit/?limit=2&after_seq={page['next_after_seq']}").json()
    assert [r["seq"] for r in page["results"]] == [3, 4]
    keys_issued = world["alice"].get("/api/audit/?action=key.issue").json()["results"]
    assert [r["tenant"] for r in keys_issued] == ["team-a"]
    since = (timezone.now() + timedelta(days=1)).date().isoformat()
    assert world["sam"].get(f"/api/audit/?since={since}").json()["results"] == []


def test_admin_audit_page_is_read_only(admin_client):
    services.tenant_create(slug="seen")
    event = AuditEvent.objects.get(target="seen")
    changelist = admin_client.get(reverse("admin:tenants_auditevent_changelist"))
    assert changelist.status_code == 200 and "seen" in changelist.content.decode()
    filtered = admin_client.get(reverse("admin:tenants_auditevent_changelist") + "?origin=admin")
    assert filtered.status_code == 200
    detail = admin_client.get(reverse("admin:tenants_auditevent_change", args=[event.pk]))
    assert detail.status_code == 200 and event.hash in detail.content.decode()
    assert admin_client.get(reverse("admin:tenants_auditevent_add")).status_code == 403
    response = admin_client.post(reverse("admin:tenants_auditevent_delete", args=[event.pk]), {"post": "yes"})
    assert response.status_code == 403
    response = admin_client.post(
        reverse("admin:tenants_auditevent_change", args=[event.pk]), {"target": "rewritten", "action": "x"}
    )
    assert response.status_code == 403
    assert AuditEvent.objects.get(pk=event.pk).target == "seen"


# --- the data migration ----------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_rows_written_before_the_chain_are_hashed_by_the_migration():
    executor = MigrationExecutor(connection)
    before = [("tenants", "0004_move_budgets_out")]
    leaves = executor.loader.graph.leaf_nodes()
    try:
        executor.migrate(before)
        old = executor.loader.project_state(before).apps
        tenant = old.get_model("tenants", "Tenant").objects.create(slug="old-co", name="Old Co")
        user = old.get_model("auth", "User").objects.create(username="olduser")
        events = old.get_model("tenants", "AuditEvent").objects
        events.create(action="tenant.create", target="old-co", tenant=tenant, actor_label="cli")
        events.create(action="key.issue", target="ck_old", tenant=tenant, actor=user, actor_label="api:olduser")
        events.create(action="plan.create", target="pro", data={"rpm": 1.5})
    finally:
        executor = MigrationExecutor(connection)
        executor.loader.build_graph()
        executor.migrate(leaves)
    rows = list(AuditEvent.objects.order_by("seq"))
    assert [(r.seq, r.action) for r in rows] == [(1, "tenant.create"), (2, "key.issue"), (3, "plan.create")]
    assert (rows[1].actor_name, rows[1].origin) == ("olduser", "api")
    assert audit.verify().ok
    services.tenant_create(slug="new-co")  # the writer continues the migrated chain
    result = audit.verify()
    assert result.ok and result.checked == 4
    assert Tenant.objects.filter(slug="old-co").exists()


def test_settings_default_retention_is_90_days():
    assert settings.CHITTYCAN_AUDIT_RETENTION_DAYS == 90


def test_rest_write_through_the_asgi_server_records_its_origin(world, gateway_server):
    """The served (ASGI) app: the origin set by the async middleware reaches the sync view."""
    sam = get_user_model().objects.get(username="sam")
    _, plaintext = tokens.token_create(user=sam, name="asgi")
    response = httpx.post(
        f"{gateway_server.url}/api/tenants/",
        json={"slug": "served-co", "name": "Served"},
        headers={"Authorization": f"Bearer {plaintext}", "User-Agent": "AuditTest/1.0 (asgi)"},
        timeout=10,
    )
    assert response.status_code == 201, response.text
    event = AuditEvent.objects.get(action="tenant.create", target="served-co")
    assert (event.origin, event.actor_name, event.user_agent) == ("api", "sam", "AuditTest/1.0 (asgi)")
    assert event.address == "127.0.0.1"
    assert audit.verify().ok


WRITER = """
import os, sys, time
import django
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chittycan.settings")
django.setup()
from tenants import audit
start, name = float(sys.argv[1]), sys.argv[2]
time.sleep(max(0.0, start - time.time()))
for i in range(20):
    audit.record("test.write", target=f"{name}-{i}", data={"process": name, "i": i})
"""


def test_concurrent_processes_do_not_fork_the_chain(transactional_db):
    """Three processes on the test database, released at the same moment, writing 20 rows each."""
    services.tenant_create(slug="first", actor_label="test")
    env = {**os.environ, **services_env()}
    start = time.time() + 6  # after every process has imported Django
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(start), f"p{n}"], cwd=ROOT, env=env) for n in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    seqs = list(AuditEvent.objects.order_by("seq").values_list("seq", flat=True))
    assert seqs == list(range(1, 62))
    written = AuditEvent.objects.filter(action="test.write")
    assert {e.data["process"] for e in written} == {"p0", "p1", "p2"}
    result = audit.verify()
    assert result.ok and result.checked == 61


def test_users_written_by_commands_are_audited(transactional_db, monkeypatch):
    monkeypatch.setenv("DJANGO_SUPERUSER_PASSWORD", "a-cli-pass-phrase-3")
    cli.main(["createsuperuser", "--username", "ops", "--email", "ops@example.com", "--noinput"])
    event = AuditEvent.objects.get(action="auth.user.create", target="ops")
    assert (event.origin, event.actor_label, event.user_agent) == ("cli", "cli", "can createsuperuser")
    assert event.os_user == getpass.getuser()
    assert event.data["changes"]["password"] == [None, None]
    user = get_user_model().objects.get(username="ops")
    logged = _everything_audited()
    assert "a-cli-pass-phrase-3" not in logged and user.password not in logged
    # Outside the admin and commands (a service, a test, the gateway), user saves are no audit rows.
    get_user_model().objects.create_user("quiet", password="pw-quiet-123")
    assert not AuditEvent.objects.filter(target="quiet").exists()
