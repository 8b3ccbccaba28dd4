"""The migration playbook's parity checks through the real gateway with the official openai SDK."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import wait_usage


def test_non_stream_parity(upstream, openai_client, tenant_key):
    res = openai_client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Say hello in 3 words."}], temperature=0
    )
    completion = res.parse()
    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.created > 0
    assert completion.model == "gpt-4o-2024-08-06"
    assert completion.choices[0].message.content == "Hello from the fake upstream!"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens == 10 and completion.usage.completion_tokens == 7
    assert res.headers["x-request-id"].startswith("req_")
    assert res.headers["x-chittycan-provider"] == "fake-openai"
    assert res.headers["x-chittycan-model"] == "gpt-4o-2024-08-06"
    # 10 input tokens at $2.50/M + 7 output at $10/M = 25 + 70 micro-USD
    assert res.headers["x-chittycan-cost"] == "0.000095"
    sent = upstream.requests[-1]
    assert sent.body["model"] == "gpt-4o-2024-08-06"
    assert sent.headers["authorization"] == "Bearer sk-upstream-secret"
    [row] = wait_usage(1)
    assert row.request_id == res.headers["x-request-id"]
    assert (row.prompt_tokens, row.completion_tokens, row.cost_micro) == (10, 7, 95)
    assert row.tenant_id == tenant_key[0].pk and row.status == "ok" and not row.stream


def test_stream_parity_strips_usage_chunk_client_did_not_ask_for(upstream, openai_client):
    stream = openai_client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Count to 3."}], stream=True
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and len(c.choices) == 1 for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello from the fake upstream!"
    assert all(c.usage is None for c in chunks)
    assert upstream.requests[-1].body["stream_options"] == {"include_usage": True}
    [row] = wait_usage(1)
    assert row.stream and (row.prompt_tokens, row.completion_tokens, row.cost_micro) == (10, 7, 95)
    assert row.usage_source == "upstream"


def test_stream_with_include_usage_relays_usage_chunk(upstream, openai_client):
    chunks = list(
        openai_client.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 17


def test_unknown_model_is_404_in_openai_envelope(upstream, openai_client, tenant_key):
    with pytest.raises(openai.NotFoundError) as exc:
        openai_client.chat.completions.create(model="invalid-model-name", messages=[{"role": "user", "content": "x"}])
    assert exc.value.code == "model_not_found"
    # Scoped to this test's tenant: the previous test's row may reach the ledger after its teardown.
    assert wait_usage(0, timeout=0.3, tenant_id=tenant_key[0].pk) == []


def test_bad_key_is_401(upstream, gateway_server):
    client = openai.OpenAI(base_url=f"{gateway_server.url}/v1", api_key="chitty_nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
