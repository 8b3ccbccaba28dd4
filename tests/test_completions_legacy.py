"""POST /v1/completions (legacy text completions) through the gateway with the openai SDK."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import add_model, exact_usage


def test_non_stream(upstream, openai_client, tenant_key):
    res = openai_client.completions.with_raw_response.create(
        model="gpt-3.5-turbo-instruct", prompt="Say hello", max_tokens=5, echo=False, logprobs=2, suffix="!"
    )
    result = res.parse()
    assert result.object == "text_completion" and result.choices[0].text == " world"
    assert result.usage.total_tokens == 5
    sent = upstream.requests[-1]
    assert sent.path == "/v1/completions"
    assert sent.body == {
        "model": "gpt-3.5-turbo-instruct",
        "prompt": "Say hello",
        "max_tokens": 5,
        "echo": False,
        "logprobs": 2,
        "suffix": "!",
    }
    # 3 in at $1.50/M + 2 out at $2/M = 4.5 + 4 -> 9 micro-USD under the one rounding rule
    [row] = exact_usage(tenant_key[0], 1)
    assert row.endpoint == "completions" and (row.prompt_tokens, row.completion_tokens) == (3, 2)
    assert res.headers["x-chittycan-cost"] == f"0.{row.cost_micro:06d}"


def test_stream_with_usage(upstream, openai_client, tenant_key):
    parts = list(
        openai_client.completions.create(
            model="gpt-3.5-turbo-instruct", prompt=["a", "b"], stream=True, stream_options={"include_usage": True}
        )
    )
    assert all(p.object == "text_completion" for p in parts)
    assert "".join(p.choices[0].text for p in parts if p.choices) == " world"
    assert parts[-1].usage.completion_tokens == 2
    assert upstream.requests[-1].body["stream_options"] == {"include_usage": True}
    [row] = exact_usage(tenant_key[0], 1)
    assert row.stream and row.usage_source == "upstream"


def test_token_prompt(upstream, openai_client):
    openai_client.completions.create(model="gpt-3.5-turbo-instruct", prompt=[1, 2, 3])
    assert upstream.requests[-1].body["prompt"] == [1, 2, 3]


def test_mock_completions(transactional_db, gateway_server, make_tenant, make_key):
    from gateway.models import Provider

    provider = Provider.objects.create(slug="mock", kind="mock")
    add_model("mock-instruct", provider, kind="completion")
    client = openai.OpenAI(base_url=f"{gateway_server.url}/v1", api_key=make_key(make_tenant("t1")), max_retries=0)
    one = client.completions.create(model="mock-instruct", prompt="Once upon a time", max_tokens=4)
    two = client.completions.create(model="mock-instruct", prompt="Once upon a time", max_tokens=4)
    assert one.choices[0].text == two.choices[0].text and one.choices[0].finish_reason == "length"
    streamed = list(
        client.completions.create(model="mock-instruct", prompt="Once upon a time", max_tokens=4, stream=True)
    )
    assert "".join(p.choices[0].text for p in streamed if p.choices) == one.choices[0].text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "gpt-3.5-turbo-instruct"}, "prompt"),
        ({"model": "gpt-3.5-turbo-instruct", "prompt": 5}, "prompt"),
        ({"model": "gpt-3.5-turbo-instruct", "prompt": "x", "max_tokens": "9"}, "max_tokens"),
    ],
)
def test_bad_bodies(upstream, gateway_server, tenant_key, body, param):
    res = httpx.post(
        f"{gateway_server.url}/v1/completions", json=body, headers={"authorization": f"Bearer {tenant_key[1]}"}
    )
    assert res.status_code == 400 and res.json()["error"]["param"] == param
    assert upstream.requests == []


def test_embedding_model_is_refused(upstream, openai_client):
    with pytest.raises(openai.BadRequestError):
        openai_client.completions.create(model="text-embedding-3-small", prompt="x")


def test_best_of_is_reserved_as_every_generated_choice(upstream, openai_client, tenant_key):
    """best_of=5 generates (and bills) 5 completions: the worst case reserved covers all of them."""
    from budgets import services

    # $2/M output: 1,000 max tokens is 2,000 micro-USD a choice; the budget covers two, not five.
    services.budget_set(tenant=tenant_key[0], period="month", limit_micro=5_000)
    ok = openai_client.completions.create(model="gpt-3.5-turbo-instruct", prompt="x", max_tokens=1000)
    assert ok.choices
    with pytest.raises(openai.APIStatusError) as exc:
        openai_client.completions.create(model="gpt-3.5-turbo-instruct", prompt="x", max_tokens=1000, best_of=5)
    assert exc.value.status_code == 402
    assert len(upstream.requests) == 1
