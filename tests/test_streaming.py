"""Streaming through the gateway: tool-call deltas, disconnects, resets and odd upstream frames."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.conftest import exact_usage
from tests.fakes.openai_upstream import Reply, sse, usage_for

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
]


def chunk(content=None, finish=None, index=0):
    delta = {} if content is None else {"content": content}
    return sse(
        {
            "id": "chatcmpl-s",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "gpt-4o-2024-08-06",
            "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }
    )


def test_parallel_tool_call_stream_accumulates_arguments(upstream, openai_client, tenant_key):
    stream = openai_client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "Weather and time in Paris?"}],
        tools=TOOLS,
        stream=True,
    )
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for part in stream:
        choice = part.choices[0]
        finish = choice.finish_reason or finish
        for delta in choice.delta.tool_calls or []:
            slot = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            slot["id"] += delta.id or ""
            slot["name"] += (delta.function.name if delta.function else None) or ""
            slot["arguments"] += (delta.function.arguments if delta.function else None) or ""
    assert finish == "tool_calls"
    assert sorted(calls) == [0, 1]
    assert [calls[i]["name"] for i in (0, 1)] == ["get_weather", "get_time"]
    assert [calls[i]["id"] for i in (0, 1)] == ["call_fake0", "call_fake1"]
    assert [json.loads(calls[i]["arguments"]) for i in (0, 1)] == [{"city": "Paris", "n": 0}, {"city": "Paris", "n": 1}]
    [row] = exact_usage(tenant_key[0], 1)
    assert row.status == "ok" and row.stream and row.completion_tokens == 7


def test_sdk_stream_helper_accumulates_tool_calls(upstream, openai_client):
    with openai_client.chat.completions.stream(
        model="gpt-4o", messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS
    ) as stream:
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[1].function.arguments) == {"city": "Paris", "n": 1}


def test_n_greater_than_one_non_stream(upstream, openai_client, tenant_key):
    completion = openai_client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], n=3
    )
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert upstream.requests[-1].body["n"] == 3
    [row] = exact_usage(tenant_key[0], 1)
    assert row.completion_tokens == 21  # every choice is billed


def test_n_greater_than_one_stream_interleaved(upstream, openai_client):
    frames = [chunk("a", index=0), chunk("b", index=1), chunk("c", index=0), chunk(None, "stop", 0)]
    frames += [chunk(None, "stop", 1), b"data: [DONE]\n\n"]
    upstream.push("/v1/chat/completions", Reply(frames=frames))
    texts: dict[int, str] = {}
    for part in openai_client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], n=2, stream=True
    ):
        for choice in part.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    assert texts == {0: "ac", 1: "b"}


def test_client_disconnect_cancels_upstream_and_records_partial_usage(upstream, gateway_server, tenant_key):
    frames = [chunk("word ") for _ in range(50)] + [chunk(None, "stop"), b"data: [DONE]\n\n"]
    upstream.push("/v1/chat/completions", Reply(frames=frames, frame_delay=0.1))
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Write a lot."}], "stream": True}
    headers = {"authorization": f"Bearer {tenant_key[1]}"}
    with httpx.Client(timeout=10) as client:
        with client.stream("POST", f"{gateway_server.url}/v1/chat/completions", json=body, headers=headers) as res:
            assert res.status_code == 200
            request_id = res.headers["x-request-id"]
            seen = 0
            for line in res.iter_lines():
                if line.startswith("data: "):
                    seen += 1
                if seen == 3:
                    break
    left_at = time.monotonic()
    while upstream.disconnects == 0 and time.monotonic() - left_at < 1.5:
        time.sleep(0.02)
    assert upstream.disconnects == 1, "the upstream request was not cancelled"
    assert time.monotonic() - left_at < 1.2
    assert upstream.completed_streams == 0
    [row] = exact_usage(tenant_key[0], 1)
    assert row.request_id == request_id
    assert row.status == "client_disconnected" and row.usage_source == "estimated"
    assert row.prompt_tokens > 0 and 2 <= row.completion_tokens < 50
    assert row.cost_micro > 0


def test_upstream_reset_mid_stream_ends_with_an_error_not_done(upstream, gateway_server, openai_client, tenant_key):
    frames = [chunk("one "), chunk("two "), chunk("three "), chunk(None, "stop"), b"data: [DONE]\n\n"]
    upstream.push("/v1/chat/completions", Reply(frames=frames, reset_after=2))
    received = []
    with pytest.raises(openai.APIError):
        for part in openai_client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "count"}], stream=True
        ):
            received.append(part.choices[0].delta.content)
    assert received == ["one ", "two "]
    # Raw bytes: the error frame is there and [DONE] is not.
    upstream.push("/v1/chat/completions", Reply(frames=frames, reset_after=2))
    raw = httpx.post(
        f"{gateway_server.url}/v1/chat/completions",
        json={"model": "gpt-4o", "messages": [{"role": "user", "content": "count"}], "stream": True},
        headers={"authorization": f"Bearer {tenant_key[1]}"},
        timeout=10,
    )
    assert b"[DONE]" not in raw.content
    error_frames = [
        json.loads(line[6:]) for line in raw.text.splitlines() if line.startswith("data: {") and '"error"' in line
    ]
    assert len(error_frames) == 1 and set(error_frames[0]["error"]) == {"message", "type", "param", "code"}
    rows = exact_usage(tenant_key[0], 2)
    assert [r.status for r in rows] == ["upstream_error", "upstream_error"]
    assert all(r.usage_source == "estimated" and 2 <= r.completion_tokens <= 4 and r.prompt_tokens > 0 for r in rows)


def test_comment_lines_and_keepalives_are_skipped(upstream, openai_client):
    frames = [
        b": OPENROUTER PROCESSING\n\n",
        chunk("Hel"),
        b": ping\n\n",
        chunk("lo"),
        chunk(None, "stop"),
        sse(
            {
                "id": "x",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "m",
                "choices": [],
                "usage": usage_for(3, 2),
            }
        ),
        b"data: [DONE]\n\n",
    ]
    upstream.push("/v1/chat/completions", Reply(frames=frames))
    parts = list(
        openai_client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}], stream=True)
    )
    assert "".join(p.choices[0].delta.content or "" for p in parts) == "Hello"


def test_frames_split_across_reads_are_reassembled(upstream, openai_client):
    whole = chunk("Grüße") + chunk(None, "stop") + b"data: [DONE]\n\n"
    pieces = [whole[i : i + 7] for i in range(0, len(whole), 7)]  # splits inside the UTF-8 of "ü"
    upstream.push("/v1/chat/completions", Reply(frames=pieces))
    parts = list(
        openai_client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}], stream=True)
    )
    assert "".join(p.choices[0].delta.content or "" for p in parts) == "Grüße"


def test_vllm_flat_error_shape(upstream, openai_client, tenant_key):
    flat = {
        "object": "error",
        "message": "This model's maximum context length is 4096 tokens",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }
    upstream.push("/v1/chat/completions", Reply(status=400, json=flat))
    with pytest.raises(openai.BadRequestError) as exc:
        openai_client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert "maximum context length" in exc.value.message
    assert isinstance(exc.value.body, dict) and set(exc.value.body) >= {"message", "type", "code"}
    # The same shape inside a stream becomes an in-stream error in the OpenAI envelope.
    upstream.push("/v1/chat/completions", Reply(frames=[chunk("a"), sse(flat)]))
    with pytest.raises(openai.APIError) as stream_exc:
        for _ in openai_client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "x"}], stream=True
        ):
            pass
    assert "maximum context length" in str(stream_exc.value)
    rows = exact_usage(tenant_key[0], 2)
    assert [r.status for r in rows] == ["upstream_error", "upstream_error"]


def test_legacy_completion_stream_usage_stripped(upstream, openai_client):
    parts = list(openai_client.completions.create(model="gpt-3.5-turbo-instruct", prompt="hello", stream=True))
    assert "".join(p.choices[0].text for p in parts) == " world"
    assert all(p.usage is None for p in parts)


@pytest.mark.parametrize("stream", [False, True])
def test_client_leaving_before_the_answer_records_a_disconnect(upstream, gateway_server, tenant_key, stream):
    """The client gives up while the upstream is still thinking (no byte relayed yet)."""
    upstream.push("/v1/chat/completions", Reply(json=upstream.chat_json({"messages": [1]}), delay=3))
    if stream:
        upstream.replies["/v1/chat/completions"].clear()
        frames = [chunk("late"), chunk(None, "stop"), b"data: [DONE]\n\n"]
        upstream.push("/v1/chat/completions", Reply(frames=frames, delay=3))
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Think hard."}], "stream": stream}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{gateway_server.url}/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {tenant_key[1]}"},
            timeout=httpx.Timeout(0.5, connect=5),
        )
    [row] = exact_usage(tenant_key[0], 1)
    assert row.status == "client_disconnected" and row.http_status == 499
    assert row.prompt_tokens > 0 and row.completion_tokens == 0 and row.usage_source == "estimated"


def test_chunks_are_relayed_as_they_arrive(upstream, gateway_server, tenant_key):
    frames = [chunk(f"w{i} ") for i in range(5)] + [chunk(None, "stop"), b"data: [DONE]\n\n"]
    upstream.push("/v1/chat/completions", Reply(frames=frames, frame_delay=0.3))
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "slowly"}], "stream": True}
    arrivals = []
    started = time.monotonic()
    with httpx.stream(
        "POST",
        f"{gateway_server.url}/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {tenant_key[1]}"},
        timeout=10,
    ) as res:
        for line in res.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.monotonic() - started)
    assert len(arrivals) == 6
    # The first chunk is out long before the upstream is done (about 1.8 s): nothing is buffered.
    assert arrivals[0] < 0.5 and arrivals[-1] > 1.2
    assert all(b - a > 0.15 for a, b in zip(arrivals[:4], arrivals[1:5], strict=True))
