"""The native ``ollama`` provider kind through the gateway, against the fake Ollama server."""

from __future__ import annotations

import base64
import json

import openai
import pytest

from tests.conftest import add_model, wait_usage


@pytest.fixture
def ollama_models(transactional_db, fake_ollama):
    from gateway.models import Provider

    provider = Provider.objects.create(slug="local-ollama", kind="ollama", base_url=fake_ollama.url, max_retries=0)
    add_model("llama-local", provider, upstream="llama3.2", prices=("0.10", "0.10", "0.20"))
    add_model("embed-local", provider, kind="embedding", upstream="nomic-embed-text", prices=("0.02", "0.02", "0"))
    add_model("missing-local", provider, upstream="not-pulled")
    return fake_ollama


def test_chat_non_stream_maps_options_and_usage(ollama_models, openai_client, tenant_key):
    res = openai_client.chat.completions.with_raw_response.create(
        model="llama-local",
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Say hello"}]},
        ],
        max_tokens=50,
        temperature=0.2,
        top_p=0.9,
        seed=7,
        stop="\n\n",
        response_format={"type": "json_object"},
        extra_body={"top_k": 20, "num_ctx": 8192, "keep_alive": "5m"},
    )
    completion = res.parse()
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    assert completion.choices[0].message.content == "Hello from fake Ollama!"
    assert completion.choices[0].finish_reason == "stop"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (26, 5)
    assert res.headers["x-chittycan-provider"] == "local-ollama"
    sent = ollama_models.requests[-1]
    assert sent.path == "/api/chat"
    assert sent.body["model"] == "llama3.2" and sent.body["stream"] is False
    assert sent.body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hello"},
    ]
    assert sent.body["options"] == {
        "num_predict": 50,
        "temperature": 0.2,
        "top_p": 0.9,
        "seed": 7,
        "stop": ["\n\n"],
        "top_k": 20,
        "num_ctx": 8192,
    }
    assert sent.body["format"] == "json" and sent.body["keep_alive"] == "5m"
    [row] = wait_usage(1, tenant_id=tenant_key[0].pk)
    # 26 in at $0.10/M + 5 out at $0.20/M = 2.6 + 1 micro-USD -> rounded by the one rule
    assert (row.prompt_tokens, row.completion_tokens, row.provider) == (26, 5, "local-ollama")
    assert row.status == "ok" and row.usage_source == "upstream"


def test_chat_stream_ndjson_to_sse(ollama_models, openai_client, tenant_key):
    chunks = list(
        openai_client.chat.completions.create(
            model="llama-local",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=3,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from fake"
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert ollama_models.requests[-1].body["stream"] is True
    [row] = wait_usage(1, tenant_id=tenant_key[0].pk)
    assert row.stream and (row.prompt_tokens, row.completion_tokens) == (26, 3)


def test_tool_calls_object_arguments_become_json_strings(ollama_models, openai_client):
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
    ]
    messages = [{"role": "user", "content": "Weather and time in Paris?"}]
    completion = openai_client.chat.completions.create(model="llama-local", messages=messages, tools=tools)
    calls = completion.choices[0].message.tool_calls
    assert completion.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[1].function.arguments) == {"city": "Paris", "n": 1}
    assert all(c.id.startswith("call_") for c in calls)

    stream = openai_client.chat.completions.create(model="llama-local", messages=messages, tools=tools, stream=True)
    deltas = [tc for c in stream for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(d.index, d.function.name) for d in deltas] == [(0, "get_weather"), (1, "get_time")]
    assert json.loads(deltas[0].function.arguments) == {"city": "Paris", "n": 0}

    # The tool round trip: string arguments go back as objects, the result carries the tool name.
    follow_up = [
        *messages,
        {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny"},
    ]
    final = openai_client.chat.completions.create(model="llama-local", messages=follow_up, tools=tools)
    assert final.choices[0].message.content == "Hello from fake Ollama!"
    sent = ollama_models.requests[-1].body["messages"]
    assert sent[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris", "n": 0}}
    assert sent[2] == {"role": "tool", "content": "sunny", "tool_name": "get_weather"}


def test_vision_data_uri_goes_to_images_and_http_url_is_refused(ollama_models, openai_client):
    png = base64.b64encode(b"\x89PNG fake").decode()
    openai_client.chat.completions.create(
        model="llama-local",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                ],
            }
        ],
    )
    assert ollama_models.requests[-1].body["messages"][0] == {
        "role": "user",
        "content": "What is this?",
        "images": [png],
    }
    with pytest.raises(openai.BadRequestError) as exc:
        openai_client.chat.completions.create(
            model="llama-local",
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}],
        )
    assert "data URI" in exc.value.message


def test_embeddings_float_and_base64(ollama_models, openai_client, tenant_key):
    floats = openai_client.embeddings.create(model="embed-local", input=["a", "b"], encoding_format="float")
    assert [d.embedding for d in floats.data] == [[0.25, 0.375, 0.5, 0.625], [0.5, 0.625, 0.75, 0.875]]
    assert floats.usage.prompt_tokens == 6
    sent = ollama_models.requests[-1]
    assert sent.path == "/api/embed" and sent.body == {"model": "nomic-embed-text", "input": ["a", "b"]}
    # The SDK's default asks for base64 and decodes float32; Ollama only returns floats.
    default = openai_client.embeddings.create(model="embed-local", input="a")
    assert default.data[0].embedding == [0.25, 0.375, 0.5, 0.625]
    rows = wait_usage(2, tenant_id=tenant_key[0].pk)
    assert [r.prompt_tokens for r in rows] == [6, 3]


def test_ollama_errors_are_mapped(ollama_models, openai_client, tenant_key):
    with pytest.raises(openai.NotFoundError) as exc:
        openai_client.chat.completions.create(model="missing-local", messages=[{"role": "user", "content": "x"}])
    assert "not found" in exc.value.message
    from tests.fakes.ollama_upstream import OllamaReply

    ollama_models.push(
        "/api/chat",
        OllamaReply(
            lines=[
                b'{"model":"llama3.2","message":{"role":"assistant","content":"Hel"},"done":false}\n',
                b'{"error":"an error was encountered while running the model"}\n',
            ]
        ),
    )
    stream = openai_client.chat.completions.create(
        model="llama-local", messages=[{"role": "user", "content": "x"}], stream=True
    )
    received = []
    with pytest.raises(openai.APIError) as stream_exc:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    assert "Hel" in received and "while running the model" in str(stream_exc.value)
    rows = wait_usage(2, tenant_id=tenant_key[0].pk)
    assert [r.status for r in rows] == ["upstream_error", "upstream_error"]
    assert rows[1].completion_tokens > 0 and rows[1].usage_source == "estimated"


def test_ollama_n_non_stream_asks_n_times(ollama_models, openai_client):
    completion = openai_client.chat.completions.create(
        model="llama-local", messages=[{"role": "user", "content": "x"}], n=2
    )
    assert [c.index for c in completion.choices] == [0, 1]
    assert completion.usage.completion_tokens == 10 and completion.usage.prompt_tokens == 26
    assert len(ollama_models.requests) == 2


def test_stream_cut_before_the_final_line_is_an_error(ollama_models, openai_client, tenant_key):
    from tests.fakes.ollama_upstream import OllamaReply

    ollama_models.push(
        "/api/chat",
        OllamaReply(lines=[b'{"model":"llama3.2","message":{"role":"assistant","content":"Hi"},"done":false}\n']),
    )
    with pytest.raises(openai.APIError):
        list(
            openai_client.chat.completions.create(
                model="llama-local", messages=[{"role": "user", "content": "x"}], stream=True
            )
        )
    with pytest.raises(openai.BadRequestError) as exc:
        openai_client.chat.completions.create(
            model="llama-local", messages=[{"role": "user", "content": "x"}], stream=True, n=2
        )
    assert exc.value.param == "n"


def test_native_only_fields(ollama_models, openai_client):
    openai_client.chat.completions.create(
        model="llama-local",
        messages=[{"role": "user", "content": "x"}],
        reasoning_effort="high",
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}},
        extra_body={"options": {"num_ctx": 32768, "mirostat": 2}, "keep_alive": -1},
    )
    sent = ollama_models.requests[-1].body
    assert sent["options"] == {"num_ctx": 32768, "mirostat": 2}
    assert sent["think"] == "high" and sent["keep_alive"] == -1
    assert sent["format"] == {"type": "object"}


def test_legacy_completions_use_generate(ollama_models, openai_client, tenant_key):
    from gateway.models import LLMModel

    LLMModel.objects.filter(name="llama-local").update(kind="completion")
    from core import invalidation

    invalidation.drop_local()
    result = openai_client.completions.create(model="llama-local", prompt="Once", max_tokens=8, suffix=".")
    assert result.object == "text_completion" and result.choices[0].text == " upon a time"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (4, 3)
    sent = ollama_models.requests[-1]
    assert sent.path == "/api/generate"
    assert sent.body == {
        "model": "llama3.2",
        "prompt": "Once",
        "stream": False,
        "options": {"num_predict": 8},
        "suffix": ".",
    }
    parts = list(openai_client.completions.create(model="llama-local", prompt=["Once"], stream=True))
    assert "".join(p.choices[0].text for p in parts) == " upon a time"
    assert parts[-1].choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError):
        openai_client.completions.create(model="llama-local", prompt=["a", "b"])
    assert len(wait_usage(3, tenant_id=tenant_key[0].pk)) == 3
