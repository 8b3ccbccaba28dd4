"""`can tenants create|list`: the tenant tree from the terminal."""

from __future__ import annotations

import io

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from tenants.models import AuditEvent, Plan, Tenant


def can(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def test_create_hierarchy_and_list_as_tree(db):
    Plan.objects.create(slug="pro", name="Pro")
    can(
        "tenants",
        "create",
        "acme",
        "--name",
        "Acme Corp",
        "--plan",
        "pro",
        "--time-zone",
        "Europe/Berlin",
        "--stripe-customer",
        "cus_1",
    )
    can("tenants", "create", "acme-ml", "--parent", "acme")
    can("tenants", "create", "acme-ml-search", "--parent", "acme-ml")
    can("tenants", "create", "acme-web", "--parent", "acme", "--kind", "project", "--time-zone", "UTC")
    can("tenants", "create", "globex")
    ml, search, web = (Tenant.objects.get(slug=s) for s in ("acme-ml", "acme-ml-search", "acme-web"))
    assert ml.parent is not None and search.parent is not None
    assert (ml.kind, ml.time_zone, ml.parent.slug) == ("team", "Europe/Berlin", "acme")  # inherits the zone
    assert (search.kind, search.parent.slug) == ("project", "acme-ml")
    assert (web.kind, web.time_zone) == ("project", "UTC")
    acme = Tenant.objects.get(slug="acme")
    assert acme.plan is not None
    assert (acme.name, acme.plan.slug, acme.stripe_customer_id) == ("Acme Corp", "pro", "cus_1")
    assert AuditEvent.objects.filter(action="tenant.create", actor_label="cli").count() == 5
    lines = can("tenants", "list").splitlines()
    assert lines[0].startswith('acme (organisation) "Acme Corp" plan=pro tz=Europe/Berlin stripe=cus_1')
    assert lines[1].startswith("├── acme-ml (team)")
    assert lines[2].startswith("│   └── acme-ml-search (project)")
    assert lines[3].startswith("└── acme-web (project)")
    assert lines[4].startswith("globex (organisation)")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["acme"], "tenant 'acme' already exists"),
        (["x", "--parent", "ghost"], "--parent: no tenant 'ghost'"),
        (["x", "--plan", "gold"], "--plan: no plan 'gold'"),
        (["x", "--time-zone", "Mars/Base"], "not an IANA time zone"),
        (["Not A Slug"], "slug"),
    ],
)
def test_create_refuses_bad_input(db, args, message):
    Tenant.objects.create(slug="acme", name="Acme")
    with pytest.raises(CommandError, match=message):
        can("tenants", "create", *args)
    assert Tenant.objects.count() == 1


def test_inactive_tenants_are_hidden_unless_asked(db):
    Tenant.objects.create(slug="live", name="Live")
    Tenant.objects.create(slug="gone", name="Gone", is_active=False)
    assert "gone" not in can("tenants", "list")
    assert "gone (organisation)" in can("tenants", "list", "--inactive")
