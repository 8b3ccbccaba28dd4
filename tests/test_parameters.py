"""Parameters reach OpenAI-compatible upstreams exactly as the client sent them."""

from __future__ import annotations

import httpx

from tests.conftest import exact_usage

HELLO = [{"role": "user", "content": "Test message"}]


def test_playbook_parameter_parity(upstream, openai_client, tenant_key):
    """The migration playbook's "temperature and parameters parity" check."""
    res = openai_client.chat.completions.create(
        model="gpt-4o",
        messages=HELLO,
        temperature=0.5,
        max_tokens=50,
        top_p=0.9,
        frequency_penalty=0.1,
        presence_penalty=0.1,
    )
    assert res.choices[0].message.content
    sent = upstream.requests[-1].body
    assert sent == {
        "model": "gpt-4o-2024-08-06",
        "messages": HELLO,
        "temperature": 0.5,
        "max_tokens": 50,
        "top_p": 0.9,
        "frequency_penalty": 0.1,
        "presence_penalty": 0.1,
    }
    assert len(exact_usage(tenant_key[0], 1)) == 1


def test_everything_passes_through_untouched(upstream, openai_client):
    vision = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this image?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "low"}},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            ],
        }
    ]
    tools = [
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "description": "Look something up",
                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
                "strict": True,
            },
        }
    ]
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": {"type": "object", "properties": {"a": {"type": "string"}}}},
    }
    openai_client.chat.completions.create(
        model="gpt-4o",
        messages=vision,
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "lookup"}},
        parallel_tool_calls=False,
        response_format=response_format,
        stop=["\n\n", "END"],
        seed=42,
        logprobs=True,
        top_logprobs=3,
        logit_bias={"50256": -100},
        user="end-user-7",
        metadata={"team": "search"},
        store=False,
        service_tier="default",
        reasoning_effort="low",
        max_completion_tokens=100,
        extra_body={
            "verbosity": "low",
            "prompt_cache_key": "k1",
            "top_k": 40,
            "chat_template_kwargs": {"enable_thinking": False},
            "brand_new_field": {"nested": [1, 2.5, None, "x"]},
        },
    )
    sent = upstream.requests[-1].body
    assert sent["messages"] == vision
    assert sent["tools"] == tools
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "lookup"}}
    assert sent["parallel_tool_calls"] is False
    assert sent["response_format"] == response_format
    assert sent["stop"] == ["\n\n", "END"] and sent["seed"] == 42
    assert sent["logprobs"] is True and sent["top_logprobs"] == 3 and sent["logit_bias"] == {"50256": -100}
    assert sent["user"] == "end-user-7" and sent["metadata"] == {"team": "search"}
    assert sent["store"] is False and sent["service_tier"] == "default" and sent["reasoning_effort"] == "low"
    assert sent["max_completion_tokens"] == 100
    assert sent["verbosity"] == "low" and sent["prompt_cache_key"] == "k1" and sent["top_k"] == 40
    assert sent["chat_template_kwargs"] == {"enable_thinking": False}
    assert sent["brand_new_field"] == {"nested": [1, 2.5, None, "x"]}


def test_stream_keeps_client_stream_options_and_forces_usage(upstream, gateway_server, tenant_key):
    body = {
        "model": "gpt-4o",
        "messages": HELLO,
        "stream": True,
        "stream_options": {"include_usage": False, "include_obfuscation": False},
        "some_vendor_flag": True,
    }
    res = httpx.post(
        f"{gateway_server.url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {tenant_key[1]}"}
    )
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/event-stream")
    sent = upstream.requests[-1].body
    assert sent["stream_options"] == {"include_usage": True, "include_obfuscation": False}
    assert sent["some_vendor_flag"] is True
    assert '"usage":{' not in res.text  # the client said no to the usage chunk


def test_request_id_and_cost_headers_on_every_response(upstream, openai_client):
    ok = openai_client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HELLO)
    assert ok.headers["x-request-id"].startswith("req_") and ok.request_id == ok.headers["x-request-id"]
    assert ok.headers["x-chittycan-cost"] and ok.headers["x-chittycan-model"] == "gpt-4o-2024-08-06"
    stream = openai_client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HELLO, stream=True)
    assert stream.headers["x-request-id"].startswith("req_") and stream.headers["x-chittycan-provider"] == "fake-openai"
    assert ok.headers["x-request-id"] != stream.headers["x-request-id"]


def test_unknown_fields_on_embeddings_and_completions(upstream, openai_client):
    openai_client.embeddings.create(
        model="text-embedding-3-small", input="x", user="u1", extra_body={"input_type": "query", "truncate": "END"}
    )
    sent = upstream.requests[-1].body
    assert sent["input_type"] == "query" and sent["truncate"] == "END" and sent["user"] == "u1"
    openai_client.completions.create(
        model="gpt-3.5-turbo-instruct", prompt="x", best_of=2, extra_body={"min_p": 0.05, "repetition_penalty": 1.1}
    )
    sent = upstream.requests[-1].body
    assert sent["best_of"] == 2 and sent["min_p"] == 0.05 and sent["repetition_penalty"] == 1.1
