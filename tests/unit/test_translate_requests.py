"""Request translation both ways, on recorded bodies (no I/O)."""

from __future__ import annotations

import pytest

from gateway.errors import InvalidRequest
from gateway.translate.requests import chat_to_messages, hoist_system_messages, messages_to_chat

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="


def test_system_and_developer_messages_become_top_level_system_blocks_in_order():
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "one"},
            {"role": "user", "content": "hi"},
            {"role": "developer", "content": [{"type": "text", "text": "two"}]},
        ],
    }
    out = chat_to_messages(body, default_max_tokens=4096)
    assert out["system"] == [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    assert out["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert out["max_tokens"] == 4096


def test_max_tokens_prefers_max_completion_tokens_then_max_tokens():
    base = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    assert chat_to_messages({**base, "max_tokens": 5}, default_max_tokens=99)["max_tokens"] == 5
    both = {**base, "max_tokens": 5, "max_completion_tokens": 7}
    assert chat_to_messages(both, default_max_tokens=99)["max_tokens"] == 7


def test_images_data_uri_to_base64_block_and_http_url_to_url_block():
    body = {
        "model": "m",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in these?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "low"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                    {"type": "text", "text": ""},
                ],
            }
        ],
    }
    [turn] = chat_to_messages(body, default_max_tokens=10)["messages"]
    assert turn["content"] == [
        {"type": "text", "text": "What is in these?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]  # the empty text part is dropped: Anthropic refuses empty text blocks


def test_audio_parts_are_refused_with_param():
    body = {"model": "m", "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}
    with pytest.raises(InvalidRequest) as exc:
        chat_to_messages(body, default_max_tokens=10)
    assert exc.value.param == "messages.[0].content.[0]"


def test_invalid_tool_arguments_are_a_400():
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "x"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": '}}],
            },
        ],
    }
    with pytest.raises(InvalidRequest) as exc:
        chat_to_messages(body, default_max_tokens=10)
    assert exc.value.param == "messages.[1].tool_calls.[0].function.arguments"


def test_assistant_text_and_tool_calls_then_consecutive_tool_results_in_one_user_turn():
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "a", "arguments": '{"x": 1}'}},
                    {"id": "c2", "type": "function", "function": {"name": "b", "arguments": ""}},
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "r1"}]},
            {"role": "tool", "tool_call_id": "c2", "content": "r2"},
            {"role": "user", "content": "thanks"},
        ],
    }
    out = chat_to_messages(body, default_max_tokens=10)["messages"]
    assert out[1] == {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "c1", "name": "a", "input": {"x": 1}},
            {"type": "tool_use", "id": "c2", "name": "b", "input": {}},
        ],
    }
    assert out[2] == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "c1", "content": "r1"},
            {"type": "tool_result", "tool_use_id": "c2", "content": "r2"},
            {"type": "text", "text": "thanks"},
        ],
    }
    assert len(out) == 3


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("required", None, {"type": "any"}),
        ("none", None, {"type": "none"}),
        ({"type": "function", "function": {"name": "f"}}, None, {"type": "tool", "name": "f"}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
    ],
)
def test_tool_choice_mapping(choice, parallel, expected):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [tool]}
    if choice is not None:
        body["tool_choice"] = choice
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    out = chat_to_messages(body, default_max_tokens=10)
    assert out["tool_choice"] == expected
    assert out["tools"] == [{"name": "f", "input_schema": {"type": "object", "properties": {}}}]


def test_tool_without_parameters_gets_an_empty_object_schema():
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "x"}],
        "tools": [{"type": "function", "function": {"name": "f"}}],
    }
    assert chat_to_messages(body, default_max_tokens=10)["tools"][0]["input_schema"] == {
        "type": "object",
        "properties": {},
    }


def test_stop_string_and_list_and_temperature_clamp_and_json_schema():
    base = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    assert chat_to_messages({**base, "stop": "END"}, default_max_tokens=1)["stop_sequences"] == ["END"]
    assert chat_to_messages({**base, "stop": ["a", "b"]}, default_max_tokens=1)["stop_sequences"] == ["a", "b"]
    assert chat_to_messages({**base, "temperature": 2}, default_max_tokens=1)["temperature"] == 1.0
    assert chat_to_messages({**base, "temperature": 0.3}, default_max_tokens=1)["temperature"] == 0.3
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    out = chat_to_messages({**base, "response_format": fmt}, default_max_tokens=1)
    assert out["output_config"] == {"format": {"type": "json_schema", "schema": schema}}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"seed": 0}, "seed"),
    ],
)
def test_unsupported_openai_parameters_are_refused(extra, param):
    with pytest.raises(InvalidRequest) as exc:
        chat_to_messages({"model": "m", "messages": [{"role": "user", "content": "x"}], **extra}, default_max_tokens=1)
    assert exc.value.param == param and exc.value.status == 400


def test_harmless_defaults_are_accepted():
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 1, "logprobs": False, "logit_bias": {}}
    assert chat_to_messages(body, default_max_tokens=1)["max_tokens"] == 1


# --- Anthropic -> OpenAI -----------------------------------------------------------------------------


def test_messages_to_chat_system_tools_images_and_tool_results():
    body = {
        "model": "claude-sonnet-4",
        "max_tokens": 300,
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Look:"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "s"},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}]},
                    {"type": "text", "text": "And tomorrow?"},
                ],
            },
        ],
        "tools": [{"name": "get_weather", "description": "w", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "stop_sequences": ["END"],
        "metadata": {"user_id": "u1"},
        "temperature": 0.5,
        "top_k": 5,
    }
    out = messages_to_chat(body)
    assert out["messages"] == [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look:"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
            ],
        },
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {"role": "user", "content": "And tomorrow?"},
    ]
    assert out["tools"] == [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}, "description": "w"}}
    ]
    assert out["tool_choice"] == "required" and out["parallel_tool_calls"] is False
    assert out["stop"] == ["END"] and out["user"] == "u1" and out["temperature"] == 0.5
    assert out["max_tokens"] == 300 and "top_k" not in out


def test_messages_to_chat_url_image_error_result_and_system_role_message():
    body = {
        "model": "m",
        "max_tokens": 5,
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "t", "content": "boom", "is_error": True}],
            },
        ],
    }
    out = messages_to_chat(body)["messages"]
    assert out[0] == {"role": "system", "content": "sys"}
    assert out[1]["content"] == [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]
    assert out[2]["content"] is None and out[2]["tool_calls"][0]["function"]["arguments"] == "{}"
    assert out[3] == {"role": "tool", "tool_call_id": "t", "content": "Error: boom"}


def test_server_tools_cannot_be_translated():
    body = {
        "model": "m",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "x"}],
        "tools": [{"type": "web_search_20250305", "name": "web_search"}],
    }
    with pytest.raises(InvalidRequest) as exc:
        messages_to_chat(body)
    assert exc.value.param == "tools.[0]"


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "none"}, "none"),
        ({"type": "tool", "name": "f"}, {"type": "function", "function": {"name": "f"}}),
    ],
)
def test_anthropic_tool_choice_to_openai(choice, expected):
    body = {
        "model": "m",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "x"}],
        "tools": [{"name": "f", "input_schema": {"type": "object"}}],
        "tool_choice": choice,
    }
    out = messages_to_chat(body)
    assert out["tool_choice"] == expected and "parallel_tool_calls" not in out


def test_system_role_turns_are_hoisted_for_native_upstreams():
    body = {
        "model": "m",
        "max_tokens": 5,
        "system": "base",
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "cached", "cache_control": {"type": "ephemeral"}}]},
            {"role": "user", "content": "hi"},
            {"role": "system", "content": "late"},
        ],
    }
    out = hoist_system_messages(body)
    assert out["system"] == [
        {"type": "text", "text": "base"},
        {"type": "text", "text": "cached", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "late"},
    ]
    assert out["messages"] == [{"role": "user", "content": "hi"}]
    untouched = {"model": "m", "max_tokens": 5, "system": "s", "messages": [{"role": "user", "content": "x"}]}
    assert hoist_system_messages(untouched) is untouched
