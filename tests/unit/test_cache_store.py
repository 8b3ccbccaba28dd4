"""The response cache's pure parts: the embedded store, the request digest, and the two shapes of
a cached answer (``gateway.cache.render``), without services."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.cache import render

HI: Any = [{"role": "user", "content": "Hi"}]


def test_embedded_store_is_bounded_and_per_tenant(settings: Any) -> None:
    from core.money import Usage
    from gateway import cache

    memory = cache.MemoryStore(max_entries=2)

    async def scenario() -> None:
        entry = cache.Entry(endpoint="chat", stored_at=0.0, usage=Usage(3, 0, 0, 4), body={"id": "x"})
        digest = cache.request_digest("chat", "m", {"messages": HI, "temperature": 1.0})
        assert digest == cache.request_digest("chat", "m", {"temperature": 1, "user": "u", "messages": HI})
        assert digest != cache.request_digest("chat", "m", {"temperature": 1, "messages": HI, "seed": 1})
        assert await cache.store("1", "m", digest, entry, 60, memory)
        found = await cache.lookup("1", "m", digest, memory)
        assert found is not None and found.body == {"id": "x"} and found.usage.completion_tokens == 4
        assert found.usage.source == "cache"
        assert await cache.lookup("2", "m", digest, memory) is None
        one, two = cache.Selection((1,)), cache.Selection((2,))
        assert await cache.stats(one, memory) == 1 and await cache.stats(two, memory) == 0
        assert await cache.invalidate(two, memory) == 0 and await cache.stats(one, memory) == 1
        assert await cache.invalidate(cache.Selection((1,), "other"), memory) == 0
        assert await cache.invalidate(cache.Selection((1,), "m"), memory) == 1
        assert await cache.lookup("1", "m", digest, memory) is None
        # bounded: a third entry pushes the least recently used out
        for n in range(3):
            assert await cache.store("1", "m", f"d{n}", entry, 60, memory)
        assert await cache.stats(one, memory) == 2 and await cache.lookup("1", "m", "d0", memory) is None
        # expired entries are gone
        assert await cache.store("1", "m", "short", entry, 1, memory)
        await asyncio.sleep(1.1)
        assert await cache.lookup("1", "m", "short", memory) is None
        settings.CHITTYCAN_CACHE_MAX_BYTES = 10
        assert not await cache.store("1", "m", digest, entry, 60, memory)

    asyncio.run(scenario())


def test_invalidation_selects_by_model_key_prefix_and_prompt_glob(settings: Any) -> None:
    from core.money import Usage
    from gateway import cache

    memory = cache.MemoryStore(max_entries=100)

    def entry(prompt: str) -> Any:
        return cache.Entry(endpoint="chat", stored_at=0.0, usage=Usage(1, 0, 0, 1), body={}, prompt=prompt)

    async def scenario() -> None:
        await cache.store("1", "m", "aa11", entry("Explain quantum computing"), 60, memory)
        await cache.store("1", "m", "bb22", entry("Write a poem"), 60, memory)
        await cache.store("1", "n", "aa33", entry("Explain quantum physics"), 60, memory)
        await cache.store("1.k7", "m", "cc44", entry("Explain quantum foam"), 60, memory)  # a key's own
        await cache.store("12", "m", "aa55", entry("Explain quantum computing"), 60, memory)  # tenant 12
        await cache.store("global", "m", "aa66", entry("Explain quantum computing"), 60, memory)
        assert await cache.stats(cache.Selection((1,)), memory) == 4
        assert await cache.stats(cache.Selection((1,), key_prefix="aa"), memory) == 2
        assert await cache.stats(cache.Selection((1,), "m", "aa"), memory) == 1
        assert await cache.stats(cache.Selection(None, pattern="*quantum*"), memory) == 5
        assert await cache.invalidate(cache.Selection((1,), pattern="*quantum*"), memory) == 3
        # tenant 12 (whose id starts like tenant 1's) and the shared space are untouched
        assert await cache.lookup("12", "m", "aa55", memory) is not None
        assert await cache.lookup("global", "m", "aa66", memory) is not None
        assert await cache.lookup("1", "m", "bb22", memory) is not None
        assert await cache.invalidate(cache.Selection(None), memory) == 3

    asyncio.run(scenario())


def test_prompt_text_of_each_route() -> None:
    from gateway import cache

    chat = {
        "messages": [
            {"role": "system", "content": "Be brief"},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        ]
    }
    assert cache.prompt_text("chat", chat) == "Be brief\nHi"
    assert cache.prompt_text("messages", {"system": "S", "messages": [{"role": "user", "content": "Q"}]}) == "S\nQ"
    assert cache.prompt_text("completions", {"prompt": ["a", "b"]}) == "a\nb"
    assert cache.prompt_text("embeddings", {"input": "vec"}) == "vec"


CHAT_BODY: Any = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "gpt-4o",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
                    {"id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}},
                ],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        },
        {
            "index": 1,
            "message": {"role": "assistant", "content": "second"},
            "logprobs": None,
            "finish_reason": "stop",
        },
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11},
}

MESSAGE_BODY: Any = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude",
    "content": [
        {"type": "thinking", "thinking": "hmm", "signature": "sig"},
        {"type": "text", "text": "Hello"},
        {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"x": [1, 2]}},
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {"input_tokens": 9, "output_tokens": 12},
}


def test_chat_body_round_trips_through_chunks() -> None:
    items = render.explode("chat", CHAT_BODY)
    assert render.complete_stream("chat", items)
    assert render.assemble("chat", items) == CHAT_BODY
    assert items[-1] == {
        **{k: CHAT_BODY[k] for k in ("id", "created", "model")},
        "object": "chat.completion.chunk",
        "choices": [],
        "usage": CHAT_BODY["usage"],
    }


def test_cut_or_failed_streams_are_incomplete() -> None:
    items = render.explode("chat", CHAT_BODY)
    assert not render.complete_stream("chat", items[:-3])  # the second choice never finished
    assert not render.complete_stream("chat", [*items, {"error": {"message": "boom"}}])
    assert not render.complete_stream("chat", [])
    events = render.explode("messages", MESSAGE_BODY)
    assert render.complete_stream("messages", events)
    assert not render.complete_stream("messages", events[:-2])
    assert not render.complete_stream("messages", [*events[:3], {"type": "error", "error": {}}])


def test_message_body_round_trips_through_events() -> None:
    events = render.explode("messages", MESSAGE_BODY)
    assert [e["type"] for e in events][:2] == ["message_start", "content_block_start"]
    assert events[-1] == {"type": "message_stop"}
    assert render.assemble("messages", events) == MESSAGE_BODY


def test_legacy_completion_round_trips() -> None:
    body: Any = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "text": "hi there", "logprobs": None, "finish_reason": "length"}],
    }
    assert render.assemble("completions", render.explode("completions", body)) == body


def test_streamed_fragments_assemble() -> None:
    def chunk(delta: Any, finish: str | None = None) -> Any:
        return {
            "id": "c",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    items = [
        chunk({"role": "assistant", "content": ""}),
        chunk(
            {
                "tool_calls": [
                    {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get", "arguments": ""}}
                ]
            }
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ty": 1}'}}]}),
        chunk({}, "tool_calls"),
    ]
    body = render.assemble("chat", items)
    call = body["choices"][0]["message"]["tool_calls"][0]
    assert call == {"id": "call_1", "type": "function", "function": {"name": "get", "arguments": '{"city": 1}'}}
    assert body["choices"][0]["finish_reason"] == "tool_calls" and "usage" not in body


def test_embedded_coalescing_leads_once_and_fans_out(settings: Any) -> None:
    """Without Redis, flights are the process's own: the first joiner leads, the others follow and
    read the leader's messages as they come; after the end a new joiner leads a new flight."""
    from core.money import Usage
    from gateway.cache import coalesce

    settings.REDIS_URL = ""

    async def follower(flight: Any) -> list[Any]:
        return [message async for message in flight.read()]

    async def scenario() -> None:
        joined = await coalesce.join("k")
        assert joined is not None and joined[1]
        leader = joined[0]
        followed = [await coalesce.join("k") for _ in range(3)]
        assert all(j is not None and j[0] is leader and not j[1] for j in followed)
        readers = [asyncio.ensure_future(follower(leader)) for _ in range(3)]
        leader.push("item", {"n": 1})
        await asyncio.sleep(0)
        leader.push("item", {"n": 2})
        leader.end(Usage(3, 0, 0, 4), 7)
        got = await asyncio.gather(*readers)
        assert all([kind for kind, _ in messages] == ["item", "item", "end"] for messages in got)
        assert coalesce.usage_from(got[0][-1][1]) == (Usage(3, 0, 0, 4, source="cache"), 7)
        await leader.close()
        again = await coalesce.join("k")
        assert again is not None and again[1] and again[0] is not leader
        # A leader that fails: its followers read the failure (and go again).
        late = asyncio.ensure_future(follower(again[0]))
        await again[0].close()  # closed without an end: failed
        assert [kind for kind, _ in await late] == ["fail"]

    asyncio.run(scenario())
