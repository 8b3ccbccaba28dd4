"""The OpenAI Responses API wire format: ``POST /v1/responses``.

The third wire format of the one pipeline (metered, budgeted, cached and routed like chat). What
is its own:

- state: the gateway keeps answers itself (``gateway.responses_store``), per tenant, so
  ``previous_response_id`` works for every upstream kind and ownership is ours to check.
  ``prepare`` (after authentication) loads the earlier turns and prepends them to ``input``; an id
  that is not the tenant's is a 404. The upstream is sent the whole conversation with
  ``store: false`` and never our ids; ``complete`` gives every answer (fresh or a cache hit) the
  gateway's own ``resp_`` id, echoes ``previous_response_id``, ``store`` and ``metadata``, and stores
  it unless ``store`` is false, before the client sees it.
- streams: typed ``event: <type>`` frames, each with its ``sequence_number``; usage is read from
  ``response.completed`` (or ``response.incomplete``); a failure after the start is an ``error``
  event.
- usage: ``input_tokens`` / ``output_tokens`` with their details (``translate.responses_api``).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from core.money import Usage
from gateway import responses_store, tokens
from gateway.context import RequestContext
from gateway.errors import GatewayError, InvalidRequest, NotFound
from gateway.formats.base import Json, StreamTracker, WireFormat
from gateway.formats.checks import stream_flags
from gateway.providers.base import Operation, close_stream
from gateway.sse import event_frame
from gateway.translate import responses_api
from gateway.translate.responses_api import ESTIMATED_MARK, item_type

_ITEM_TYPES = frozenset({"message", "function_call", "function_call_output", "reasoning", "item_reference"})
_ROLES = frozenset({"user", "assistant", "system", "developer"})
_TOOL_CHOICES = frozenset({"auto", "none", "required"})
_FORMATS = frozenset({"text", "json_object", "json_schema"})
_TERMINAL = frozenset({"response.completed", "response.incomplete"})
#: Item fields an upstream must not see: our ids mean nothing there (it is sent ``store: false``).
_ID_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}


def _bad(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(f"{param}: {message}", param=param)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_item(item: Any, where: str) -> None:
    if not isinstance(item, dict):
        raise _bad("must be an object (an input item)", where)
    kind = item_type(item)
    if kind not in _ITEM_TYPES:
        raise _bad(f"unknown input item type {kind or None!r}", f"{where}.type")
    if kind == "message":
        if item.get("role") not in _ROLES:
            raise _bad("must be one of 'user', 'assistant', 'system', 'developer'", f"{where}.role")
        if not isinstance(item.get("content"), (str, list)):
            raise _bad("must be a string or an array of content parts", f"{where}.content")
    elif kind == "function_call":
        for name in ("call_id", "name", "arguments"):
            if not isinstance(item.get(name), str):
                raise _bad("must be a string", f"{where}.{name}")
    elif kind == "function_call_output":
        if not isinstance(item.get("call_id"), str):
            raise _bad("must be a string", f"{where}.call_id")
        if not isinstance(item.get("output"), (str, list)):
            raise _bad("must be a string or an array of content parts", f"{where}.output")
    elif kind == "item_reference":
        raise _bad("item references are not supported; send the item itself", f"{where}.type")


def _check_tools(data: Json) -> None:
    tools = data.get("tools")
    if tools is None:
        return
    if not isinstance(tools, list):
        raise _bad("must be an array", "tools")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("type"), str):
            raise _bad("must be an object with a type", f"tools.{i}")
        if tool["type"] == "function":
            if not isinstance(tool.get("name"), str) or not tool["name"]:
                raise _bad("a function tool needs a name", f"tools.{i}.name")
            if tool.get("parameters") is not None and not isinstance(tool["parameters"], dict):
                raise _bad("must be a JSON schema object", f"tools.{i}.parameters")
    choice = data.get("tool_choice")
    if choice is not None and choice not in _TOOL_CHOICES and not isinstance(choice, dict):
        raise _bad("must be 'auto', 'none', 'required' or an object", "tool_choice")


def _check_text(data: Json) -> None:
    text = data.get("text")
    if text is None:
        return
    if not isinstance(text, dict):
        raise _bad("must be an object", "text")
    fmt = text.get("format")
    if fmt is None:
        return
    if not isinstance(fmt, dict) or fmt.get("type") not in _FORMATS:
        raise _bad("type must be 'text', 'json_object' or 'json_schema'", "text.format.type")
    if fmt["type"] == "json_schema":
        if not isinstance(fmt.get("name"), str) or not fmt["name"]:
            raise _bad("Field required", "text.format.name")
        if not isinstance(fmt.get("schema"), dict):
            raise _bad("must be a JSON schema object", "text.format.schema")


def validate(data: Json) -> None:
    """A Responses request body, checked just enough to route, bill and store it."""
    value = data.get("input")
    if value is None:
        raise _bad("Field required", "input")
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_item(item, f"input.{i}")
    elif not isinstance(value, str):
        raise _bad("must be a string or an array of input items", "input")
    for name in ("instructions", "previous_response_id", "user", "safety_identifier"):
        if data.get(name) is not None and not isinstance(data[name], str):
            raise _bad("must be a string", name)
    if data.get("previous_response_id") == "":
        raise _bad("must not be empty", "previous_response_id")
    if data.get("conversation") is not None:
        raise _bad("conversations are not supported; chain turns with previous_response_id", "conversation")
    if data.get("background"):
        raise _bad("background responses are not supported", "background")
    for name in ("store", "parallel_tool_calls"):
        if data.get(name) is not None and not isinstance(data[name], bool):
            raise _bad("must be a boolean", name)
    most = data.get("max_output_tokens")
    if most is not None and (not _is_int(most) or most < 1):
        raise _bad("must be an integer of at least 1", "max_output_tokens")
    for name, high in (("temperature", 2.0), ("top_p", 1.0)):
        number = data.get(name)
        if number is not None and (not _is_number(number) or not 0 <= number <= high):
            raise _bad(f"must be a number from 0 to {high:g}", name)
    metadata = data.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict) or len(metadata) > 16:
            raise _bad("must be an object of at most 16 keys", "metadata")
        if not all(isinstance(k, str) and len(k) <= 64 and isinstance(v, str) for k, v in metadata.items()):
            raise _bad("keys must be strings of at most 64 characters and values strings", "metadata")
    reasoning = data.get("reasoning")
    if reasoning is not None and not isinstance(reasoning, dict):
        raise _bad("must be an object", "reasoning")
    _check_tools(data)
    _check_text(data)


def _with_id(item: Json) -> Json:
    """An input item as stored (and listed by ``input_items``): every item has an id."""
    if item.get("id"):
        return item
    prefix = _ID_PREFIXES.get(item_type(item), "item")
    stored = {"id": responses_api.new_id(prefix), **item}
    if "type" not in stored:
        stored["type"] = "message"
    return stored


def _for_upstream(items: list[Json]) -> list[Json]:
    """Items as sent upstream: without our ids (the upstream stores nothing of ours)."""
    return [{k: v for k, v in item.items() if k != "id"} if item_type(item) in _ID_PREFIXES else item for item in items]


@dataclass(slots=True)
class ResponseState:
    """What the Responses format keeps for one request (``RequestContext.wire_state``)."""

    response_id: str
    request: Json  # the client's body, as sent (the answer echoes its settings)
    own_items: list[Json]  # this request's input items, with ids
    prior_items: list[Json] = field(default_factory=list)  # the conversation before this turn
    estimated: bool = False  # the answer's usage was counted offline


def state_of(ctx: RequestContext) -> ResponseState:
    state = ctx.wire_state
    assert isinstance(state, ResponseState), "the Responses format's parse did not run"
    return state


class ResponseEventTracker(StreamTracker):
    """``event: <type>`` frames, numbered; usage from the terminal response, else estimated."""

    def __init__(self, ctx: RequestContext) -> None:
        super().__init__(ctx)
        self.sequence = 0
        self.final: Json | None = None
        self.output: list[str] = []

    def frame(self, item: Json) -> bytes | None:
        kind = str(item.get("type") or "")
        state = state_of(self.ctx)
        if isinstance(item.get("response"), dict):
            finish(state, item["response"])
        if kind in _TERMINAL:
            self.final = item.get("response")
        elif kind in ("response.output_text.delta", "response.function_call_arguments.delta"):
            self.output.append(str(item.get("delta") or ""))
        elif kind in ("error", "response.failed"):  # the upstream's own failure: relayed, and the end
            error = item.get("error") if kind == "error" else (item.get("response") or {}).get("error")
            code = (error or {}).get("code") if isinstance(error, dict) else item.get("code")
            self.ctx.status, self.ctx.error_type = "upstream_error", str(code or "error")
            self.stopped = True
        item["sequence_number"] = self.sequence
        self.sequence += 1
        return event_frame(kind, item)

    def usage(self) -> Usage:
        found = responses_api.ledger_usage(self.final.get("usage")) if self.final is not None else None
        if found is None:
            return self.ctx.estimated_usage("".join(self.output))
        if state_of(self.ctx).estimated:
            found.source = "estimated"
        return found

    def error_frame(self, err: GatewayError) -> bytes:
        event: Json = {"type": "error", "code": err.code, "message": err.message, "param": err.param}
        event["sequence_number"] = self.sequence
        self.sequence += 1
        return event_frame("error", event)

    def closing(self, cost_usd: str) -> bytes:
        # SDKs skip SSE comments; people reading the raw stream see the cost.
        return f": x-chittycan-cost={cost_usd}\n\n".encode()


def finish(state: ResponseState, response: Json) -> Json:
    """A response as the client sees it: the gateway's id and the client's own settings echoed."""
    request = state.request
    response["id"] = state.response_id
    response["object"] = "response"
    response["previous_response_id"] = request.get("previous_response_id")
    response["store"] = request.get("store", True) is not False
    response["metadata"] = request.get("metadata") or {}
    response["instructions"] = request.get("instructions")
    return response


class ResponsesFormat(WireFormat):
    endpoint = "responses"
    operation = Operation.RESPONSES
    kinds = ("chat",)
    keeps_state = True

    def parse(self, ctx: RequestContext, data: Json, headers: dict[bytes, bytes]) -> None:
        validate(data)
        ctx.stream, _ = stream_flags({"stream": data.get("stream")})
        user = data.get("safety_identifier") or data.get("user")
        ctx.end_user = user if isinstance(user, str) else ""
        own = [_with_id(item) for item in responses_api.input_items(data.get("input"))]
        ctx.wire_state = ResponseState(response_id=responses_api.new_id("resp"), request=dict(data), own_items=own)

    async def prepare(self, ctx: RequestContext) -> None:
        """The earlier turns (``previous_response_id``, the tenant's own only) before this input;
        the upstream gets the whole conversation and stores nothing."""
        state = state_of(ctx)
        assert ctx.key is not None
        previous = state.request.get("previous_response_id")
        if isinstance(previous, str):
            prior = await responses_store.prior(ctx.key.tenant.id, previous)
            if prior is None:
                raise NotFound(
                    f"Previous response with id '{previous}' not found.",
                    param="previous_response_id",
                    code="previous_response_not_found",
                )
            state.prior_items = prior.input_items + [o for o in prior.output if o.get("type") != "reasoning"]
        body = {k: v for k, v in ctx.body.items() if k != "previous_response_id"}
        body["input"] = _for_upstream(state.prior_items + state.own_items)
        body["store"] = False
        ctx.body = body

    def prompt_tokens(self, ctx: RequestContext) -> int:
        tools = ctx.body.get("tools")
        return tokens.count_messages(
            responses_api.flat_messages(ctx.body), ctx.requested_model, tools if isinstance(tools, list) else None
        )

    def max_output_tokens(self, ctx: RequestContext) -> int:
        assert ctx.route is not None
        asked = ctx.body.get("max_output_tokens")
        most = ctx.route.max_output_tokens
        return min(asked, most) if isinstance(asked, int) else most

    async def complete(self, ctx: RequestContext, body: Json) -> Json:
        """A complete answer (fresh, or a cache hit) under this request's id, stored unless
        ``store`` is false, before the client sees it.

        Its usage is noted first: should the database fail to store it (the client then hears a
        503), the ledger row still bills what the upstream answered.
        """
        state = state_of(ctx)
        state.estimated = bool(body.pop(ESTIMATED_MARK, False)) or state.estimated
        finish(state, body)
        if ctx.cache_hit:
            body["created_at"] = int(time.time())
        else:
            ctx.usage = self.read_result(ctx, body)
        if body["store"]:
            assert ctx.key is not None
            await responses_store.save(ctx.key.tenant.id, body, state.prior_items + state.own_items)
        return body

    def watch_stream(self, ctx: RequestContext, items: AsyncIterator[Json]) -> AsyncIterator[Json]:
        return _Watched(self._watch(ctx, items), items)

    async def _watch(self, ctx: RequestContext, items: AsyncIterator[Json]) -> AsyncGenerator[Json, None]:
        """The stream's items; the terminal response is completed (and stored) before it is sent."""
        try:
            async for item in items:
                if item.get("type") in _TERMINAL and isinstance(item.get("response"), dict):
                    if item.pop(ESTIMATED_MARK, False):
                        state_of(ctx).estimated = True
                    await self.complete(ctx, item["response"])
                yield item
        finally:
            aclose = getattr(items, "aclose", None)
            if aclose is not None:
                await aclose()

    def read_result(self, ctx: RequestContext, result: Json) -> Usage:
        found = responses_api.ledger_usage(result.get("usage"))
        if found is None:
            return ctx.estimated_usage(responses_api.output_text(result))
        if state_of(ctx).estimated:
            found.source = "estimated"
        return found

    def stream_tracker(self, ctx: RequestContext) -> StreamTracker:
        return ResponseEventTracker(ctx)


class _Watched:
    """The watched stream; closing it closes the upstream's too, even if it was never iterated
    (an async generator that never started skips its ``finally``)."""

    def __init__(self, watched: AsyncGenerator[Json, None], upstream: AsyncIterator[Json]) -> None:
        self.watched = watched
        self.upstream = upstream

    def __aiter__(self) -> _Watched:
        return self

    async def __anext__(self) -> Json:
        return await anext(self.watched)

    async def aclose(self) -> None:
        try:
            await self.watched.aclose()
        finally:
            await close_stream(self.upstream)


RESPONSES = ResponsesFormat()
