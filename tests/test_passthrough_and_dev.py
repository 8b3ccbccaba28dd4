"""Passthrough mode (clients keep their own provider key) and dev mode (everything offline)."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.conftest import add_model, exact_usage

HELLO = [{"role": "user", "content": "Say hello in 3 words."}]


@pytest.fixture
def passthrough(settings, upstream):
    from core import invalidation

    settings.CHITTYCAN_PASSTHROUGH = True
    settings.CHITTYCAN_PASSTHROUGH_PROVIDER = "fake-openai"
    invalidation.drop_local()  # also forgets the cached passthrough key of a flushed database
    yield upstream
    invalidation.drop_local()


def sdk(server, key):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def test_passthrough_forwards_the_clients_own_key(passthrough, gateway_server, tenant_key):
    from tenants.models import Tenant

    client = sdk(gateway_server, "sk-proj-client-own-key")
    res = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HELLO)
    assert res.parse().choices[0].message.content == "Hello from the fake upstream!"
    sent = passthrough.requests[-1]
    assert sent.headers["authorization"] == "Bearer sk-proj-client-own-key"
    assert sent.body["model"] == "gpt-4o"
    assert res.headers["x-chittycan-provider"] == "fake-openai"
    # Metered under the passthrough tenant, priced as the known model.
    tenant = Tenant.objects.get(slug="passthrough")
    [row] = exact_usage(tenant, 1)
    assert (row.prompt_tokens, row.completion_tokens, row.cost_micro) == (10, 7, 95)
    assert row.tenant_id != tenant_key[0].pk
    # Streams and embeddings too.
    parts = list(client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True))
    assert "".join(p.choices[0].delta.content or "" for p in parts) == "Hello from the fake upstream!"
    assert client.embeddings.create(model="text-embedding-3-small", input="x").data
    assert {r.headers["authorization"] for r in passthrough.requests} == {"Bearer sk-proj-client-own-key"}
    assert len(exact_usage(tenant, 3)) == 3


def test_passthrough_unknown_model_is_forwarded_unpriced(passthrough, gateway_server):
    from tenants.models import Tenant

    sdk(gateway_server, "sk-other").chat.completions.create(model="gpt-9-preview", messages=HELLO)
    assert passthrough.requests[-1].body["model"] == "gpt-9-preview"
    [row] = exact_usage(Tenant.objects.get(slug="passthrough"), 1)
    assert row.requested_model == "gpt-9-preview" and row.cost_micro == 0


def test_passthrough_upstream_rejection_reaches_the_client(passthrough, gateway_server):
    from tests.fakes.openai_upstream import Reply

    passthrough.push(
        "/v1/chat/completions",
        Reply(status=401, json={"error": {"message": "Incorrect API key provided: sk-bad", "type": "x", "code": None}}),
    )
    with pytest.raises(openai.AuthenticationError) as exc:
        sdk(gateway_server, "sk-bad").chat.completions.create(model="gpt-4o", messages=HELLO)
    # The provider refused the client's own key: a 401 for the client, not a gateway 502, no retry.
    assert exc.value.message.startswith("Error code: 401 - ") and "Incorrect API key provided" in exc.value.message
    assert len(passthrough.requests) == 1


def test_gateway_keys_still_work_with_passthrough_on(passthrough, gateway_server, tenant_key):
    res = sdk(gateway_server, tenant_key[1]).chat.completions.with_raw_response.create(model="gpt-4o", messages=HELLO)
    assert res.parse().choices[0].message.content
    assert passthrough.requests[-1].headers["authorization"] == "Bearer sk-upstream-secret"
    assert exact_usage(tenant_key[0], 1)[0].tenant_id == tenant_key[0].pk


def test_passthrough_is_off_by_default(upstream, gateway_server):
    from django.conf import settings

    assert settings.CHITTYCAN_PASSTHROUGH is False
    with pytest.raises(openai.AuthenticationError):
        sdk(gateway_server, "sk-proj-client-own-key").chat.completions.create(model="gpt-4o", messages=HELLO)
    assert upstream.requests == []


@pytest.fixture
def dev_mode(settings):
    from core import invalidation

    settings.CHITTYCAN_MODE = "dev"
    settings.OLLAMA_BASE_URL = ""
    invalidation.drop_local()
    yield settings
    invalidation.drop_local()


def test_dev_mode_routes_catalogue_models_to_the_mock(dev_mode, upstream, gateway_server, tenant_key):
    from gateway.models import Provider

    # A catalogue model whose provider has no key and is inactive, reached by an alias: dev mode
    # serves it anyway, priced as the model.
    idle = Provider.objects.create(
        slug="anthropic-idle", kind="anthropic", base_url="http://127.0.0.1:9", is_active=False
    )
    add_model("claude-sonnet-4", idle, upstream="claude-sonnet-4-20250514", aliases=["claude-sonnet-4-20250514"])
    client = sdk(gateway_server, tenant_key[1])
    res = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HELLO)
    completion = res.parse()
    assert res.headers["x-chittycan-provider"] == "dev-mock"
    assert "hello" in completion.choices[0].message.content.lower()
    assert upstream.requests == []  # the configured (paid) upstream is never called
    other = client.chat.completions.create(model="claude-sonnet-4-20250514", messages=HELLO)
    assert other.choices[0].message.content.startswith("Mock reply")
    parts = list(client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True))
    assert "".join(p.choices[0].delta.content or "" for p in parts) == completion.choices[0].message.content
    assert len(client.embeddings.create(model="text-embedding-3-small", input="x").data[0].embedding) == 1536
    assert upstream.requests == []
    rows = exact_usage(tenant_key[0], 4)
    assert {r.provider for r in rows} == {"dev-mock"}
    # Each is priced as the real model, so a team sees what the suite would have cost.
    assert all(r.cost_micro > 0 for r in rows if r.endpoint == "chat")
    assert {r.requested_model for r in rows} >= {"gpt-4o", "claude-sonnet-4-20250514"}


def test_dev_mode_unknown_model_is_a_404_as_in_production(dev_mode, upstream, gateway_server, tenant_key):
    """Error parity: a parity suite's "invalid model rejects" passes against dev mode too."""
    import anthropic

    client = sdk(gateway_server, tenant_key[1])
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="gpt-nonexistent-model", messages=HELLO)
    assert exc.value.code == "model_not_found"
    body: Any = exc.value.body
    assert body["type"] == "invalid_request_error" and body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        list(client.chat.completions.create(model="my-anything", messages=HELLO, stream=True))
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-embedding", input="x")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("anything-at-all")
    claude = anthropic.Anthropic(base_url=gateway_server.url, api_key=tenant_key[1], max_retries=0)
    with pytest.raises(anthropic.NotFoundError) as aexc:
        claude.messages.create(model="claude-nonexistent", max_tokens=16, messages=[{"role": "user", "content": "Hi"}])
    abody: Any = aexc.value.body
    assert abody["type"] == "error" and abody["error"]["type"] == "not_found_error"
    # Nothing was served or billed; a catalogue model still answers.
    assert client.chat.completions.create(model="gpt-4o", messages=HELLO).choices[0].message.content
    assert [r.requested_model for r in exact_usage(tenant_key[0], 1)] == ["gpt-4o"]
    assert upstream.requests == []


def test_dev_mode_accept_any_model_serves_every_name(dev_mode, upstream, gateway_server, tenant_key):
    dev_mode.CHITTYCAN_DEV_ACCEPT_ANY_MODEL = True
    client = sdk(gateway_server, tenant_key[1])
    parts = list(client.chat.completions.create(model="my-anything", messages=HELLO, stream=True))
    assert "".join(p.choices[0].delta.content or "" for p in parts).startswith("Mock reply")
    assert client.models.retrieve("anything-at-all").id == "anything-at-all"
    [row] = exact_usage(tenant_key[0], 1)
    assert (row.requested_model, row.provider, row.cost_micro) == ("my-anything", "dev-mock", 0)
    assert upstream.requests == []


def test_dev_mode_uses_ollama_when_configured(dev_mode, upstream, fake_ollama, gateway_server, tenant_key):
    from core import invalidation

    dev_mode.OLLAMA_BASE_URL = fake_ollama.url
    invalidation.drop_local()
    client = sdk(gateway_server, tenant_key[1])
    res = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HELLO)
    assert res.parse().choices[0].message.content == "Hello from fake Ollama!"
    assert res.headers["x-chittycan-provider"] == "dev-ollama"
    assert fake_ollama.requests[-1].path == "/api/chat"
    assert fake_ollama.requests[-1].body["model"] == dev_mode.CHITTYCAN_DEV_OLLAMA_MODEL
    parts = list(client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True))
    assert "".join(p.choices[0].delta.content or "" for p in parts) == "Hello from fake Ollama!"
    [_, _] = exact_usage(tenant_key[0], 2)


def test_passthrough_unlisted_embedding_model(passthrough, gateway_server):
    from tenants.models import Tenant

    result = sdk(gateway_server, "sk-emb").embeddings.create(model="text-embedding-ada-002", input="x")
    assert result.data and passthrough.requests[-1].body["model"] == "text-embedding-ada-002"
    assert passthrough.requests[-1].path == "/v1/embeddings"
    [row] = exact_usage(Tenant.objects.get(slug="passthrough"), 1)
    assert row.endpoint == "embeddings"


def test_dev_mode_model_lookup(dev_mode, upstream, gateway_server, tenant_key):
    client = sdk(gateway_server, tenant_key[1])
    assert client.models.retrieve("gpt-4o").id == "gpt-4o"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("anything-at-all")
