"""The OpenAI Responses API (``/v1/responses``) through the real gateway, driven by the official
``openai`` SDK: native pass-through to an OpenAI upstream that serves it, translation to chat
completions (OpenAI-compatible fake) and on to Anthropic Messages (fake Anthropic), streams, the
gateway's own store (retrieve, delete, input items, ``previous_response_id``, ``store: false``,
tenant isolation), metering, budgets, the response cache and errors."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import httpx
import openai
import pytest

from gateway.models import StoredResponse
from ledger.models import UsageRecord
from tests import anthropic_support as support
from tests.conftest import wait_usage
from tests.fakes.openai_upstream import Reply, sse

fake_anthropic_server = support.fake_anthropic_server
anthropic_upstream = support.anthropic_upstream

WEATHER: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
SCHEMA: dict[str, Any] = {
    "type": "json_schema",
    "name": "city",
    "schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": True,
}
TEXT = "Hello from the fake upstream!"


def error_of(exc: Any) -> Any:
    """The error object the SDK parsed from the answer's envelope."""
    return exc.value.body


def upstream_calls(app: Any, suffix: str) -> list[Any]:
    return [r for r in app.requests if r.path.endswith(suffix)]


@pytest.fixture
def native(upstream: Any) -> Any:
    """The fake OpenAI provider marked as serving the Responses API itself."""
    from gateway import catalog
    from gateway.models import Provider

    catalog.provider_update(Provider.objects.get(slug="fake-openai"), responses_api=True)
    return upstream


def events_of(stream: Any) -> list[Any]:
    return list(stream)


def check_sequence(events: list[Any]) -> None:
    """The typed sequence the SDKs parse: numbered from 0 without a gap, opened and closed."""
    assert [e.sequence_number for e in events] == list(range(len(events)))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    assert types.count("response.output_item.added") == types.count("response.output_item.done") >= 1


# --- translated to chat completions (an OpenAI-compatible upstream without /v1/responses) ----------


def test_create_translated_to_chat_completions(upstream, openai_client):
    raw = openai_client.responses.with_raw_response.create(
        model="gpt-4o",
        input="Hi",
        instructions="Be brief.",
        max_output_tokens=50,
        temperature=0.5,
        metadata={"team": "blue"},
        reasoning={"effort": "low"},
    )
    response = raw.parse()
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status == "completed" and response.output_text == TEXT
    assert response.instructions == "Be brief." and response.metadata == {"team": "blue"}
    assert response.previous_response_id is None and response.store is True
    assert (response.usage.input_tokens, response.usage.output_tokens, response.usage.total_tokens) == (20, 7, 27)
    [sent] = upstream_calls(upstream, "/chat/completions")
    assert sent.body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert (sent.body["max_tokens"], sent.body["temperature"], sent.body["reasoning_effort"]) == (50, 0.5, "low")
    assert "metadata" not in sent.body and "store" not in sent.body
    assert not upstream_calls(upstream, "/responses")
    # Metered: one ledger row, endpoint responses, priced as chat (20 x 2.50 + 7 x 10.00 micro-USD).
    [row] = wait_usage(1, request_id=raw.headers["x-request-id"])
    assert row.endpoint == "responses" and row.requested_model == "gpt-4o"
    assert (row.prompt_tokens, row.completion_tokens, row.cost_micro) == (20, 7, 120)
    assert raw.headers["x-chittycan-cost"] == "0.000120"


def test_stream_translated_with_the_typed_event_sequence(upstream, openai_client):
    events = events_of(openai_client.responses.create(model="gpt-4o", input="Hi", stream=True))
    check_sequence(events)
    types = [e.type for e in events]
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * len(TEXT.split(" ")),
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == TEXT
    final = events[-1].response
    assert final.output_text == TEXT and final.usage.input_tokens == 10 and final.usage.output_tokens == 7
    assert events[0].response.id == final.id and final.id.startswith("resp_")
    [sent] = upstream_calls(upstream, "/chat/completions")
    assert sent.body["stream"] is True and sent.body["stream_options"] == {"include_usage": True}
    [row] = wait_usage(1, endpoint="responses")
    assert row.stream and (row.prompt_tokens, row.completion_tokens) == (10, 7) and row.usage_source == "upstream"


def test_stream_helper_and_final_response(upstream, openai_client):
    with openai_client.responses.stream(model="gpt-4o", input="Hi") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == TEXT and final.output_text == TEXT
    assert openai_client.responses.retrieve(final.id).output_text == TEXT


def test_function_calling_round_trip_through_previous_response_id(upstream, openai_client):
    first = openai_client.responses.create(model="gpt-4o", input="Weather in Paris?", tools=[WEATHER])
    [call] = [item for item in first.output if item.type == "function_call"]
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris", "n": 0})
    assert call.call_id == "call_fake0" and call.id.startswith("fc_")
    second = openai_client.responses.create(
        model="gpt-4o",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 18}'}],
        tools=[WEATHER],
    )
    assert second.output_text == TEXT and second.previous_response_id == first.id
    sent = upstream_calls(upstream, "/chat/completions")[-1].body
    assert sent["messages"] == [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_fake0",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": call.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_fake0", "content": '{"temp": 18}'},
    ]
    assert sent["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": WEATHER["parameters"],
                "description": "Weather for a city",
            },
        }
    ]


def test_streamed_function_call_arguments(upstream, openai_client):
    events = events_of(openai_client.responses.create(model="gpt-4o", input="Hi", tools=[WEATHER], stream=True))
    check_sequence(events)
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert json.loads(deltas) == json.loads(done.arguments) == {"city": "Paris", "n": 0}
    [item] = events[-1].response.output
    assert item.type == "function_call" and item.call_id == "call_fake0" and item.arguments == done.arguments


def test_text_format_json_schema_is_translated(upstream, openai_client, monkeypatch):
    monkeypatch.setattr(upstream, "text", '{"city": "Paris"}')
    response = openai_client.responses.create(model="gpt-4o", input="Where?", text={"format": SCHEMA})
    assert json.loads(response.output_text) == {"city": "Paris"}
    assert response.text.format.type == "json_schema"
    sent = upstream_calls(upstream, "/chat/completions")[-1].body
    assert sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "city", "schema": SCHEMA["schema"], "strict": True},
    }


def test_conversation_chain_prepends_every_earlier_turn(upstream, openai_client):
    one = openai_client.responses.create(model="gpt-4o", input="One", instructions="Count.")
    two = openai_client.responses.create(model="gpt-4o", input="Two", previous_response_id=one.id)
    three = openai_client.responses.create(model="gpt-4o", input="Three", previous_response_id=two.id)
    assert (two.previous_response_id, three.previous_response_id) == (one.id, two.id)
    sent = upstream_calls(upstream, "/chat/completions")[-1].body["messages"]
    assert [(m["role"], m["content"]) for m in sent] == [
        ("user", "One"),
        ("assistant", TEXT),
        ("user", "Two"),
        ("assistant", TEXT),
        ("user", "Three"),
    ]  # instructions are not carried over (as OpenAI: each request brings its own)
    assert openai_client.responses.retrieve(three.id).previous_response_id == two.id


# --- the gateway's store ---------------------------------------------------------------------------


def test_retrieve_input_items_and_delete(upstream, openai_client):
    first = openai_client.responses.create(model="gpt-4o", input="First")
    created = openai_client.responses.create(
        model="gpt-4o",
        previous_response_id=first.id,
        input=[
            {"role": "user", "content": "Second"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Third"}]},
        ],
    )
    got = openai_client.responses.retrieve(created.id)
    assert got.id == created.id and got.output_text == TEXT and got.usage.input_tokens == created.usage.input_tokens
    page = openai_client.responses.input_items.list(created.id, order="asc")
    texts = [item.content[0].text if not isinstance(item.content, str) else item.content for item in page.data]
    assert texts == ["First", TEXT, "Second", "Third"]
    assert all(item.id for item in page.data)
    # Pagination: the SDK follows `after` with the last id of each page.
    one_by_one = list(openai_client.responses.input_items.list(created.id, limit=1))
    assert [item.id for item in one_by_one] == [item.id for item in reversed(page.data)]
    first_page = openai_client.responses.input_items.list(created.id, limit=3, order="asc")
    assert first_page.has_more is True and first_page.last_id == page.data[2].id
    deleted = httpx.delete(
        f"{openai_client.base_url}responses/{created.id}",
        headers={"authorization": f"Bearer {openai_client.api_key}"},
    )
    assert deleted.status_code == 200 and deleted.json() == {"id": created.id, "object": "response", "deleted": True}
    with pytest.raises(openai.NotFoundError) as exc:
        openai_client.responses.retrieve(created.id)
    assert error_of(exc)["code"] == "response_not_found"
    with pytest.raises(openai.NotFoundError):
        openai_client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        openai_client.responses.create(model="gpt-4o", input="Again", previous_response_id=created.id)


def test_store_false_is_not_retrievable(upstream, openai_client):
    response = openai_client.responses.create(model="gpt-4o", input="Hi", store=False)
    assert response.store is False and response.output_text == TEXT
    with pytest.raises(openai.NotFoundError):
        openai_client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError) as exc:
        openai_client.responses.create(model="gpt-4o", input="More", previous_response_id=response.id)
    assert error_of(exc)["param"] == "previous_response_id"
    assert error_of(exc)["code"] == "previous_response_not_found"
    with pytest.raises(openai.NotFoundError):
        openai_client.responses.input_items.list(response.id)


def test_another_tenants_response_is_a_404_everywhere(upstream, openai_client, gateway_server, make_tenant, make_key):
    mine = openai_client.responses.create(model="gpt-4o", input="Secret plans")
    other = openai.OpenAI(base_url=f"{gateway_server.url}/v1", api_key=make_key(make_tenant("globex")), max_retries=0)
    calls_before = len(upstream.requests)
    for attempt in (
        lambda: other.responses.retrieve(mine.id),
        lambda: other.responses.delete(mine.id),
        lambda: other.responses.input_items.list(mine.id),
        lambda: other.responses.create(model="gpt-4o", input="Tell me", previous_response_id=mine.id),
        lambda: other.responses.create(model="gpt-4o", input="Tell me", previous_response_id=mine.id, stream=True),
    ):
        with pytest.raises(openai.NotFoundError):
            attempt()
    assert len(upstream.requests) == calls_before  # refused before any upstream call ...
    assert UsageRecord.objects.filter(tenant__slug="globex").count() == 0  # ... so nothing billed
    assert openai_client.responses.retrieve(mine.id).output_text == TEXT  # still there for its owner


def test_expired_responses_are_pruned_by_the_retention_task(upstream, openai_client):
    from django.utils import timezone

    from gateway.models import StoredResponse
    from ledger import retention

    old = openai_client.responses.create(model="gpt-4o", input="Old")
    new = openai_client.responses.create(model="gpt-4o", input="New")
    StoredResponse.objects.filter(pk=old.id).update(expires_at=timezone.now() - timedelta(seconds=1))
    with pytest.raises(openai.NotFoundError):
        openai_client.responses.retrieve(old.id)  # expired: gone at once, before the prune
    result = retention.prune_usage()
    assert result.others["stored_responses"] == 1
    assert list(StoredResponse.objects.values_list("pk", flat=True)) == [new.id]
    stored = StoredResponse.objects.get(pk=new.id)
    assert timedelta(days=29) < stored.expires_at - stored.created_at <= timedelta(days=30)


# --- native pass-through (an OpenAI upstream that serves /v1/responses) ----------------------------


def test_native_passthrough_sends_the_whole_conversation_and_no_ids_of_ours(native, openai_client):
    native.cached_tokens = 4
    raw = openai_client.responses.with_raw_response.create(
        model="gpt-4o",
        input="Hi",
        instructions="Be brief.",
        text={"format": SCHEMA},
        reasoning={"effort": "high"},
        metadata={"k": "v"},
    )
    first = raw.parse()
    assert first.id.startswith("resp_") and first.id != "resp_upstream123"
    assert first.output_text == TEXT and first.store is True and first.metadata == {"k": "v"}
    assert first.usage.input_tokens_details.cached_tokens == 4
    [sent] = upstream_calls(native, "/responses")
    assert sent.path == "/v1/responses" and sent.headers["authorization"] == "Bearer sk-upstream-secret"
    assert sent.body["store"] is False and sent.body["stream"] is False
    assert sent.body["model"] == "gpt-4o-2024-08-06" and sent.body["reasoning"] == {"effort": "high"}
    assert sent.body["text"] == {"format": SCHEMA} and sent.body["instructions"] == "Be brief."
    assert sent.body["input"] == [{"type": "message", "role": "user", "content": "Hi"}]
    [row] = wait_usage(1, request_id=raw.headers["x-request-id"])
    assert (row.endpoint, row.prompt_tokens, row.cached_tokens, row.completion_tokens) == ("responses", 20, 4, 7)
    assert row.cost_micro == 16 * 2.5 + 4 * 1.25 + 7 * 10 == 115

    second = openai_client.responses.create(model="gpt-4o", input="And?", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    body = upstream_calls(native, "/responses")[-1].body
    assert "previous_response_id" not in body
    assert body["input"] == [
        {"type": "message", "role": "user", "content": "Hi"},
        {
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": TEXT, "annotations": [], "logprobs": []}],
        },
        {"type": "message", "role": "user", "content": "And?"},
    ]
    assert not upstream_calls(native, "/chat/completions")


def test_native_stream_is_relayed_renumbered_under_our_id(native, openai_client):
    events = events_of(openai_client.responses.create(model="gpt-4o", input="Hi", stream=True))
    check_sequence(events)
    ids = {e.response.id for e in events if hasattr(e, "response")}
    assert len(ids) == 1 and ids != {"resp_upstream123"}
    assert events[-1].response.output_text == TEXT and events[-1].response.store is True
    assert upstream_calls(native, "/responses")[-1].body["stream"] is True
    [row] = wait_usage(1, endpoint="responses")
    assert row.stream and (row.prompt_tokens, row.completion_tokens, row.usage_source) == (10, 7, "upstream")
    assert openai_client.responses.retrieve(ids.pop()).output_text == TEXT


def test_native_function_call_round_trip(native, openai_client):
    first = openai_client.responses.create(model="gpt-4o", input="Weather?", tools=[WEATHER])
    [call] = first.output
    assert call.type == "function_call" and call.name == "get_weather"
    with openai_client.responses.stream(
        model="gpt-4o",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "18C"}],
        tools=[WEATHER],
    ) as stream:
        final = stream.get_final_response()
    assert final.output_text == TEXT and final.previous_response_id == first.id
    sent = upstream_calls(native, "/responses")[-1].body["input"]
    assert [item.get("type") for item in sent] == ["message", "function_call", "function_call_output"]
    assert sent[1]["call_id"] == call.call_id and "id" not in sent[1]


def test_native_in_stream_error_is_relayed_as_an_error_event(native, openai_client):
    created = {"type": "response.created", "sequence_number": 0, "response": {"id": "resp_u", "status": "in_progress"}}
    error = {"type": "error", "sequence_number": 1, "code": "server_error", "message": "boom", "param": None}
    native.push(
        "/v1/responses",
        Reply(frames=[b"event: response.created\ndata: " + json.dumps(created).encode() + b"\n\n", sse(error)]),
    )
    events = events_of(openai_client.responses.create(model="gpt-4o", input="Hi", stream=True))
    assert [e.type for e in events] == ["response.created", "error"]
    assert events[1].message == "boom" and events[1].sequence_number == 1
    [row] = wait_usage(1, endpoint="responses")
    assert row.status == "upstream_error" and row.error_type == "server_error"


# --- Anthropic, through the chat <-> messages translation --------------------------------------------


def test_anthropic_upstream_translated(anthropic_upstream, gateway_server, tenant_key):
    client = openai.OpenAI(base_url=f"{gateway_server.url}/v1", api_key=tenant_key[1], max_retries=0)
    response = client.responses.create(
        model="claude-sonnet-4", input="Hi", instructions="Be brief.", max_output_tokens=64
    )
    assert response.output_text == "Hello from the fake Anthropic!" and response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (10, 7)
    sent = anthropic_upstream.requests[-1]
    assert sent.path == "/v1/messages"
    assert sent.body["system"] == [{"type": "text", "text": "Be brief."}] and sent.body["max_tokens"] == 64
    assert sent.body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    events = events_of(client.responses.create(model="claude-sonnet-4", input="Hi", stream=True))
    check_sequence(events)
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == response.output_text
    assert events[-1].response.usage.output_tokens == 7
    rows = wait_usage(2, endpoint="responses")
    assert [(r.stream, r.prompt_tokens, r.completion_tokens) for r in rows] == [(False, 10, 7), (True, 10, 7)]
    follow = client.responses.create(model="claude-sonnet-4", input="More", previous_response_id=response.id)
    assert follow.previous_response_id == response.id
    assert [m["role"] for m in anthropic_upstream.requests[-1].body["messages"]] == ["user", "assistant", "user"]


def test_anthropic_function_tools(anthropic_upstream, gateway_server, tenant_key):
    client = openai.OpenAI(base_url=f"{gateway_server.url}/v1", api_key=tenant_key[1], max_retries=0)
    with client.responses.stream(model="claude-sonnet-4", input="Weather?", tools=[WEATHER]) as stream:
        final = stream.get_final_response()
    calls = [item for item in final.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and json.loads(calls[0].arguments)["city"] == "Paris"
    assert anthropic_upstream.requests[-1].body["tools"][0]["name"] == "get_weather"


# --- budgets, cache, errors --------------------------------------------------------------------------


def test_hard_budget_refuses_before_the_upstream(upstream, gateway_server, make_tenant, make_key):
    from budgets import services

    tenant = make_tenant("frugal")
    client = openai.OpenAI(base_url=f"{gateway_server.url}/v1", api_key=make_key(tenant), max_retries=0)
    # The worst case reserved: the prompt plus max_output_tokens (1000 x 10.00 = 10,000 micro-USD).
    services.budget_set(tenant=tenant, period="month", limit_micro=5_000, hard=True)
    with pytest.raises(openai.APIStatusError) as exc:
        client.responses.create(model="gpt-4o", input="Hi", max_output_tokens=1000)
    assert exc.value.status_code == 402 and exc.value.code == "insufficient_quota"
    assert not upstream.requests
    small = client.responses.create(model="gpt-4o", input="Hi", max_output_tokens=100)
    assert small.output_text == TEXT
    [row] = wait_usage(1, tenant=tenant)
    assert row.endpoint == "responses" and row.cost_micro == 95


def test_cache_hit_is_a_new_stored_response(upstream, openai_client):
    from gateway import catalog
    from gateway.models import LLMModel

    catalog.model_update(LLMModel.objects.get(name="gpt-4o"), cache_enabled=True, cache_ttl=600)
    miss = openai_client.responses.with_raw_response.create(model="gpt-4o", input="Cache me")
    hit = openai_client.responses.with_raw_response.create(model="gpt-4o", input="Cache me")
    assert (miss.headers["x-chittycan-cache"], hit.headers["x-chittycan-cache"]) == ("MISS", "HIT")
    first, second = miss.parse(), hit.parse()
    assert second.output_text == first.output_text == TEXT and second.id != first.id
    assert openai_client.responses.retrieve(second.id).id == second.id
    events = events_of(openai_client.responses.create(model="gpt-4o", input="Cache me", stream=True))
    check_sequence(events)
    assert events[-1].response.output_text == TEXT and events[-1].response.id not in (first.id, second.id)
    assert len(upstream_calls(upstream, "/chat/completions")) == 1
    rows = wait_usage(3, endpoint="responses")
    assert [r.cache_hit for r in rows] == [False, True, True]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "gpt-4o"}, "input"),
        ({"model": "gpt-4o", "input": 5}, "input"),
        ({"model": "gpt-4o", "input": [{"type": "message", "role": "robot", "content": "x"}]}, "input.0.role"),
        ({"model": "gpt-4o", "input": [{"type": "function_call_output", "output": "x"}]}, "input.0.call_id"),
        ({"model": "gpt-4o", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": "gpt-4o", "input": "x", "temperature": 3}, "temperature"),
        ({"model": "gpt-4o", "input": "x", "text": {"format": {"type": "json_schema"}}}, "text.format.name"),
        ({"model": "gpt-4o", "input": "x", "tools": [{"type": "function"}]}, "tools.0.name"),
        ({"model": "gpt-4o", "input": "x", "metadata": {"k": 1}}, "metadata"),
        ({"model": "gpt-4o", "input": "x", "conversation": "conv_1"}, "conversation"),
        ({"model": "gpt-4o", "input": "x", "previous_response_id": 7}, "previous_response_id"),
    ],
)
def test_bad_requests_are_400_in_the_openai_envelope(upstream, gateway_server, tenant_key, body, param):
    response = httpx.post(
        f"{gateway_server.url}/v1/responses",
        json=body,
        headers={"authorization": f"Bearer {tenant_key[1]}"},
        timeout=10,
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert not upstream.requests


def test_unsupported_tools_for_a_translated_model_are_a_400(upstream, openai_client):
    with pytest.raises(openai.BadRequestError) as exc:
        openai_client.responses.create(model="gpt-4o", input="Hi", tools=[{"type": "web_search"}])
    assert error_of(exc)["param"] == "tools.0.type"
    assert not upstream_calls(upstream, "/chat/completions")


def test_unknown_ids_and_bad_listing_parameters(upstream, openai_client, gateway_server, tenant_key):
    with pytest.raises(openai.NotFoundError) as exc:
        openai_client.responses.retrieve("resp_nope")
    assert error_of(exc)["code"] == "response_not_found"
    created = openai_client.responses.create(model="gpt-4o", input="Hi")
    headers = {"authorization": f"Bearer {tenant_key[1]}"}
    base = f"{gateway_server.url}/v1/responses/{created.id}/input_items"
    for query, param in (("limit=0", "limit"), ("limit=abc", "limit"), ("order=up", "order"), ("after=x", "after")):
        response = httpx.get(f"{base}?{query}", headers=headers, timeout=10)
        assert response.status_code == 400, query
        assert response.json()["error"]["param"] == param
    assert httpx.get(f"{gateway_server.url}/v1/responses/{created.id}", timeout=10).status_code == 401


def test_key_scoped_to_other_endpoints_is_refused(upstream, gateway_server, make_tenant, make_key):
    tenant = make_tenant("scoped")
    key = make_key(tenant, scopes={"endpoints": ["chat"]})
    client = openai.OpenAI(base_url=f"{gateway_server.url}/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        client.responses.create(model="gpt-4o", input="Hi")
    with pytest.raises(openai.PermissionDeniedError):
        client.responses.retrieve("resp_anything")


# --- the offline mock (what `make run` serves) ---------------------------------------------------------


def test_the_mock_answers_the_responses_api(transactional_db, gateway_server, make_tenant, make_key):
    from gateway.models import Provider
    from tests.conftest import add_model

    add_model("mock-gpt", Provider.objects.create(slug="mock", kind="mock"))
    client = openai.OpenAI(base_url=f"{gateway_server.url}/v1", api_key=make_key(make_tenant("demo")), max_retries=0)
    first = client.responses.create(model="mock-gpt", input="Say hello")
    again = client.responses.create(model="mock-gpt", input="Say hello")
    assert first.output_text and first.output_text == again.output_text  # deterministic
    assert first.usage is not None and first.usage.input_tokens > 0 and first.usage.output_tokens > 0
    with client.responses.stream(model="mock-gpt", input="Say hello") as stream:
        final = stream.get_final_response()
    assert final.output_text == first.output_text and final.usage == first.usage
    called = client.responses.create(model="mock-gpt", input="Weather?", tools=[WEATHER])
    [call] = called.output
    assert call.type == "function_call" and call.name == "get_weather" and "city" in json.loads(call.arguments)
    done = client.responses.create(
        model="mock-gpt",
        previous_response_id=called.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "18C"}],
        tools=[WEATHER],
    )
    assert done.output[0].type == "message" and done.output_text
    rows = wait_usage(5, endpoint="responses")
    assert len(rows) == 5 and all(r.usage_source == "upstream" and r.cost_micro > 0 for r in rows)


def test_translated_stream_cut_midway_ends_with_an_error_event(upstream, openai_client):
    frames = upstream.chat_stream_reply({"model": "gpt-4o", "stream": True}).frames
    assert frames is not None
    upstream.push("/v1/chat/completions", Reply(frames=frames, reset_after=3))
    events = events_of(openai_client.responses.create(model="gpt-4o", input="Hi", stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].type == "error" and "response.completed" not in [e.type for e in events]
    assert [e.delta for e in events if e.type == "response.output_text.delta"] == ["Hello", " from"]
    [row] = wait_usage(1, endpoint="responses")
    assert row.status == "upstream_error" and row.usage_source == "estimated" and row.completion_tokens > 0
    assert not StoredResponse.objects.filter(pk=events[0].response.id).exists()  # never completed: not stored
