"""GET /v1/models and /v1/models/{id}: only what the calling key may use."""

from __future__ import annotations

import httpx
import openai
import pytest


def client_for(server, key):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def test_lists_every_model_for_an_unscoped_key(upstream, openai_client):
    page = openai_client.models.list()
    ids = [m.id for m in page.data]
    # (The default price table's models may be there too, depending on test order.)
    assert {"gpt-3.5-turbo-instruct", "gpt-4o", "text-embedding-3-small"} <= set(ids) and ids == sorted(ids)
    assert all(m.object == "model" and m.created > 0 and m.owned_by for m in page.data)
    one = openai_client.models.retrieve("gpt-4o")
    assert one.id == "gpt-4o" and one.object == "model"


def test_key_scopes_narrow_the_list(upstream, gateway_server, make_tenant, make_key):
    key = make_key(make_tenant("scoped"), scopes={"models": ["gpt-4o"]})
    client = client_for(gateway_server, key)
    assert [m.id for m in client.models.list().data] == ["gpt-4o"]
    assert client.models.retrieve("gpt-4o").id == "gpt-4o"
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve("text-embedding-3-small")
    assert exc.value.code == "model_not_found"


def test_tenant_allowed_models_narrow_the_list(upstream, gateway_server, make_tenant, make_key):
    tenant = make_tenant("narrow")
    tenant.allowed_models = ["text-embedding-3-small", "gpt-4o"]
    tenant.save(update_fields=["allowed_models"])
    child = make_tenant("narrow-team", parent=tenant)
    # The key asks for more than its tenant chain allows: the intersection wins.
    key = make_key(child, scopes={"models": ["gpt-4o", "gpt-3.5-turbo-instruct"]})
    from core import invalidation

    invalidation.drop_local()
    client = client_for(gateway_server, key)
    assert [m.id for m in client.models.list().data] == ["gpt-4o"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-3.5-turbo-instruct")


def test_unknown_model_is_404_in_envelope(upstream, gateway_server, tenant_key):
    res = httpx.get(
        f"{gateway_server.url}/v1/models/no-such-model", headers={"authorization": f"Bearer {tenant_key[1]}"}
    )
    assert res.status_code == 404
    error = res.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "model_not_found"


def test_model_ids_with_slashes(upstream, gateway_server, tenant_key):
    from gateway.models import Provider
    from tests.conftest import add_model

    add_model("meta-llama/llama-3-70b", Provider.objects.get(slug="fake-openai"))
    from core import invalidation

    invalidation.drop_local()
    client = client_for(gateway_server, tenant_key[1])
    assert client.models.retrieve("meta-llama/llama-3-70b").id == "meta-llama/llama-3-70b"


@pytest.mark.parametrize("key", ["chitty_not_a_real_key", "", "sk-someone-elses"])
def test_bad_key_is_401(upstream, gateway_server, key):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    res = httpx.get(f"{gateway_server.url}/v1/models", headers=headers)
    assert res.status_code == 401
    assert res.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.AuthenticationError):
        client_for(gateway_server, key or "x").models.list()


def test_x_api_key_header_works(upstream, gateway_server, tenant_key):
    res = httpx.get(f"{gateway_server.url}/v1/models", headers={"x-api-key": tenant_key[1]})
    assert res.status_code == 200 and res.json()["object"] == "list"


@pytest.mark.parametrize("path", ["/v1/nope", "/v1/models/", "/v1/chat/completions/", "/v1/embeddings/x"])
def test_unknown_v1_paths_are_404_in_envelope(upstream, gateway_server, tenant_key, path):
    res = httpx.post(f"{gateway_server.url}{path}", headers={"authorization": f"Bearer {tenant_key[1]}"})
    assert res.status_code == 404 and res.headers["content-type"] == "application/json"
    assert res.json()["error"]["message"] == f"Invalid URL (POST {path})"
