"""The audit chain's pure parts: the canonical serialisation and hash (tenants/auditchain.py), the
origin context (core/origin.py) and the command origin the `can` entry point and Celery set."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta, timezone
from types import SimpleNamespace

from django.test import RequestFactory

from chittycan import celery as celery_app
from chittycan.cli import command_origin
from core import origin
from tenants.auditchain import GENESIS, canonical, normalise, row_hash


def _row(**overrides):
    fields = {
        "seq": 1,
        "at": datetime(2026, 11, 1, 12, 0, 0, 123456, tzinfo=UTC),
        "action": "tenant.create",
        "target": "acme",
        "tenant_id": 7,
        "actor_name": "alice",
        "actor_label": "admin",
        "origin": "admin",
        "address": "127.0.0.1",
        "user_agent": "ua",
        "os_user": "",
        "data": {"b": 1, "a": [1, 2]},
        "prev_hash": GENESIS,
    }
    fields.update(overrides)
    return SimpleNamespace(**fields)


def test_hash_is_sha256_of_prev_hash_and_sorted_compact_json():
    row = _row()
    body = canonical(row)
    assert body.startswith(b'{"action":"tenant.create","actor_label":"admin"')
    assert b'"at":"2026-11-01T12:00:00.123456Z"' in body and b'"data":{"a":[1,2],"b":1}' in body
    assert row_hash(row) == hashlib.sha256(GENESIS.encode() + b"\n" + body).hexdigest()


def test_every_field_and_the_link_change_the_hash():
    base = row_hash(_row())
    for name, value in [
        ("seq", 2),
        ("action", "tenant.delete"),
        ("target", "acme2"),
        ("tenant_id", 8),
        ("actor_name", "mallory"),
        ("actor_label", "cli"),
        ("origin", "cli"),
        ("address", "10.0.0.1"),
        ("user_agent", "x"),
        ("os_user", "root"),
        ("data", {"b": 2, "a": [1, 2]}),
        ("prev_hash", "1" * 64),
        ("at", datetime(2026, 11, 1, 12, 0, 0, 123457, tzinfo=UTC)),
    ]:
        assert row_hash(_row(**{name: value})) != base, name


def test_the_same_moment_in_another_zone_hashes_the_same():
    paris = timezone(timedelta(hours=1))
    moment = datetime(2026, 11, 1, 13, 0, 0, 123456, tzinfo=paris)
    assert row_hash(_row(at=moment)) == row_hash(_row())


def test_normalise_makes_values_read_back_from_json_columns_equal():
    assert normalise({"x": 1e20, "y": 0.5, "z": [float("inf")], 3: "k"}) == {
        "x": "1e+20",
        "y": 0.5,
        "z": ["inf"],
        "3": "k",
    }


def test_command_origin_never_records_options():
    where = command_origin(["keys", "create", "--tenant", "acme", "--name", "secret-ish"])
    assert (where.surface, where.user_agent) == ("cli", "can keys create")
    assert command_origin(["apply", "-f", "x.yaml"]).user_agent == "can apply"
    assert command_origin(["--version"]).user_agent == "can"


def test_request_origin_and_nesting():
    request = RequestFactory().post(
        "/admin/tenants/tenant/add/", HTTP_USER_AGENT="UA/1", HTTP_X_FORWARDED_FOR="203.0.113.9"
    )
    where = origin.for_request(request)
    assert (where.surface, where.user_agent) == ("admin", "UA/1")
    assert where.address == "127.0.0.1 (forwarded for 203.0.113.9)"
    assert origin.surface_of("/api/keys/") == "api" and origin.surface_of("/dashboard/") == "dashboard"
    assert origin.current().surface == ""
    with origin.using(where):
        assert origin.current() is where
        with origin.using(origin.for_command("task", "t")):
            assert origin.current().surface == "task"
        assert origin.current() is where
    assert origin.current().surface == ""


def test_celery_tasks_run_with_the_task_origin():
    celery_app._task_origin(task_id="t-1", task=SimpleNamespace(name="gateway.tasks.prune_usage"))
    try:
        assert (origin.current().surface, origin.current().user_agent) == ("task", "gateway.tasks.prune_usage")
    finally:
        celery_app._task_origin_done(task_id="t-1")
    assert origin.current().surface == ""
