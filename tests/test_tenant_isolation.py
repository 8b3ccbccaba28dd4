"""One tenant's key never sees another tenant's models or usage; every ledger row carries the
tenant (and key) that made the request."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import add_model, exact_usage

HELLO: Any = [{"role": "user", "content": "hi"}]


@pytest.fixture
def two_tenants(upstream, make_tenant, make_key, gateway_server):
    from core import invalidation
    from gateway.models import Provider

    provider = Provider.objects.get(slug="fake-openai")
    add_model("acme-finetune", provider, upstream="ft:gpt-4o:acme")
    a = make_tenant("tenant-a")
    a.allowed_models = ["acme-finetune", "gpt-4o", "text-embedding-3-small"]
    a.save(update_fields=["allowed_models"])
    b = make_tenant("tenant-b")
    b.allowed_models = ["gpt-4o", "text-embedding-3-small"]
    b.save(update_fields=["allowed_models"])
    invalidation.drop_local()
    key_a, key_b = make_key(a, name="a"), make_key(b, name="b")
    return {
        "a": (a, key_a, openai.OpenAI(base_url=f"{gateway_server.url}/v1", api_key=key_a, max_retries=0)),
        "b": (b, key_b, openai.OpenAI(base_url=f"{gateway_server.url}/v1", api_key=key_b, max_retries=0)),
    }


def test_other_tenants_model_is_invisible(two_tenants, upstream, gateway_server):
    _, key_a, client_a = two_tenants["a"]
    _, key_b, client_b = two_tenants["b"]
    assert client_a.chat.completions.create(model="acme-finetune", messages=HELLO).choices
    assert upstream.requests[-1].body["model"] == "ft:gpt-4o:acme"

    assert "acme-finetune" in [m.id for m in client_a.models.list().data]
    assert "acme-finetune" not in [m.id for m in client_b.models.list().data]
    with pytest.raises(openai.NotFoundError) as forbidden:
        client_b.chat.completions.create(model="acme-finetune", messages=HELLO)
    with pytest.raises(openai.NotFoundError) as missing:
        client_b.chat.completions.create(model="no-such-model", messages=HELLO)
    # Same status, code and wording as a model that does not exist: nothing leaks.
    assert forbidden.value.code == missing.value.code == "model_not_found"
    assert forbidden.value.message.replace("acme-finetune", "X") == missing.value.message.replace("no-such-model", "X")
    with pytest.raises(openai.NotFoundError):
        client_b.models.retrieve("acme-finetune")
    for stream in (False, True):
        res = httpx.post(
            f"{gateway_server.url}/v1/chat/completions",
            json={"model": "acme-finetune", "messages": HELLO, "stream": stream},
            headers={"authorization": f"Bearer {key_b}"},
        )
        assert res.status_code == 404
    assert len(upstream.requests) == 1


def test_usage_rows_carry_the_right_tenant_and_key(two_tenants):
    from tenants.models import ApiKey

    tenant_a, _, client_a = two_tenants["a"]
    tenant_b, _, client_b = two_tenants["b"]

    def call(i):
        client = client_a if i % 3 == 0 else client_b
        if i % 2:
            client.embeddings.create(model="text-embedding-3-small", input=f"item {i}")
        else:
            client.chat.completions.create(model="gpt-4o", messages=HELLO, user=f"user-{i}")
        return i

    with ThreadPoolExecutor(max_workers=6) as pool:
        done = list(pool.map(call, range(12)))
    assert len(done) == 12
    rows_a = exact_usage(tenant_a, 4)
    rows_b = exact_usage(tenant_b, 8)
    assert len(rows_a) == 4 and len(rows_b) == 8
    key_a = ApiKey.objects.get(tenant=tenant_a, name="a")
    key_b = ApiKey.objects.get(tenant=tenant_b, name="b")
    assert {r.api_key_id for r in rows_a} == {key_a.pk}
    assert {r.api_key_id for r in rows_b} == {key_b.pk}
    assert {r.end_user for r in rows_a if r.endpoint == "chat"} == {"user-0", "user-6"}
    assert len({r.request_id for r in rows_a + rows_b}) == 12


def test_child_tenant_usage_is_its_own(upstream, make_tenant, make_key, gateway_server):
    parent = make_tenant("org")
    team = make_tenant("org-team", parent=parent)
    sibling = make_tenant("org-other", parent=parent)
    for tenant in (team, sibling):
        key = make_key(tenant)
        openai.OpenAI(base_url=f"{gateway_server.url}/v1", api_key=key, max_retries=0).chat.completions.create(
            model="gpt-4o", messages=HELLO
        )
    [team_row] = exact_usage(team, 1)
    [sibling_row] = exact_usage(sibling, 1)
    assert team_row.request_id != sibling_row.request_id
    assert exact_usage(parent, 0, settle=0) == []


def test_parent_allow_list_narrows_children(upstream, make_tenant, make_key, gateway_server):
    from core import invalidation

    parent = make_tenant("strict-org")
    parent.allowed_models = ["text-embedding-3-small"]
    parent.save(update_fields=["allowed_models"])
    child = make_tenant("strict-team", parent=parent)
    invalidation.drop_local()
    client = openai.OpenAI(base_url=f"{gateway_server.url}/v1", api_key=make_key(child), max_retries=0)
    assert [m.id for m in client.models.list().data] == ["text-embedding-3-small"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
