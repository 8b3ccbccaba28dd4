"""`can keys create|list|revoke|rotate`: a key is printed once, works against the real gateway, and
the listing never shows a secret."""

from __future__ import annotations

import io
from datetime import timedelta

import openai
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from tenants import keys
from tenants.models import ApiKey, AuditEvent


def can(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_create_prints_key_once_with_scopes_and_expiry(make_tenant):
    make_tenant("acme", time_zone="Europe/Berlin")
    out, err = can(
        "keys",
        "create",
        "--tenant",
        "acme",
        "--name",
        "ci",
        "--scopes",
        "models=gpt-4o,gpt-4o-mini;endpoints=chat",
        "--expires",
        "2030-01-01",
    )
    plaintext = out.strip()
    assert keys.looks_valid(plaintext)
    assert "shown once" in err and plaintext not in err
    row = ApiKey.objects.get(prefix=keys.key_prefix(plaintext))
    assert row.name == "ci" and row.tenant.slug == "acme"
    assert row.scopes == {"models": ["gpt-4o", "gpt-4o-mini"], "endpoints": ["chat"]}
    assert row.expires_at is not None
    assert row.expires_at.isoformat() == "2029-12-31T23:00:00+00:00"  # midnight in Berlin
    assert plaintext not in row.hashed_secret and keys.verify_key(plaintext, row.hashed_secret)
    assert AuditEvent.objects.filter(action="key.issue", target=row.prefix, actor_label="cli").exists()


def test_create_with_duration_and_limits(make_tenant):
    make_tenant("acme")
    out, _ = can("keys", "create", "--tenant", "acme", "--expires", "30d", "--rpm", "5")
    row = ApiKey.objects.get(prefix=keys.key_prefix(out.strip()))
    assert row.expires_at is not None
    assert abs(row.expires_at - (timezone.now() + timedelta(days=30))) < timedelta(minutes=1)
    assert row.rpm_limit == 5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tenant", "nope"], "no tenant 'nope'"),
        (["--tenant", "acme", "--scopes", "model=x"], "--scopes: 'model=x' is not KIND=a,b"),
        (["--tenant", "acme", "--scopes", "endpoints=chat,pictures"], "unknown endpoint pictures"),
        (["--tenant", "acme", "--expires", "2001-01-01"], "is in the past"),
        (["--tenant", "acme", "--expires", "soon"], "neither a duration"),
        (["--tenant", "acme", "--rpm", "0"], "--rpm must be a positive integer"),
    ],
)
def test_create_refuses_bad_input(make_tenant, args, message):
    make_tenant("acme")
    with pytest.raises(CommandError, match=message):
        can("keys", "create", *args)
    assert not ApiKey.objects.exists()


def test_list_shows_prefixes_never_secrets(make_tenant, make_key):
    acme, globex = make_tenant("acme"), make_tenant("globex")
    a = make_key(acme, name="prod", scopes={"models": ["gpt-4o"]})
    g = make_key(globex, name="other")
    out, _ = can("keys", "list")
    assert keys.key_prefix(a) in out and keys.key_prefix(g) in out
    assert a not in out and g not in out
    assert "models=gpt-4o" in out and "active" in out
    out, _ = can("keys", "list", "--tenant", "acme")
    assert keys.key_prefix(a) in out and keys.key_prefix(g) not in out


def test_revoke_and_rotate(make_tenant, make_key):
    acme = make_tenant("acme")
    first = make_key(acme, name="svc", scopes={"endpoints": ["chat"]})
    prefix = keys.key_prefix(first)
    out, err = can("keys", "rotate", prefix)
    new = out.strip()
    assert keys.looks_valid(new) and new != first and "shown once" in err
    old_row, new_row = ApiKey.objects.get(prefix=prefix), ApiKey.objects.get(prefix=keys.key_prefix(new))
    assert old_row.revoked_at is not None and new_row.rotated_from_id == old_row.pk
    assert (new_row.name, new_row.scopes) == ("svc", {"endpoints": ["chat"]})
    with pytest.raises(CommandError, match="is revoked"):
        can("keys", "rotate", prefix)
    out, _ = can("keys", "list", "--all")
    assert "rotated" in out
    out, _ = can("keys", "revoke", keys.key_prefix(new)[len("chitty_") :])  # the id alone works too
    assert "revoked" in out
    assert ApiKey.objects.get(prefix=keys.key_prefix(new)).revoked_at is not None
    out, _ = can("keys", "revoke", keys.key_prefix(new))
    assert "already revoked" in out
    with pytest.raises(CommandError, match="no API key with prefix chitty_zzzzzzzz"):
        can("keys", "revoke", "chitty_zzzzzzzz")


def test_created_key_works_with_the_gateway_and_revocation_takes_effect(upstream, gateway_server, make_tenant):
    make_tenant("acme")
    out, _ = can("keys", "create", "--tenant", "acme", "--scopes", "models=gpt-4o;endpoints=chat")
    client = openai.OpenAI(base_url=f"{gateway_server.url}/v1", api_key=out.strip(), max_retries=0)
    reply = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content
    with pytest.raises(openai.PermissionDeniedError):
        client.embeddings.create(model="text-embedding-3-small", input="hi")
    can("keys", "revoke", keys.key_prefix(out.strip()))
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
