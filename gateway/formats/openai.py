"""The OpenAI wire formats: chat completions, legacy completions and embeddings."""

from __future__ import annotations

import base64
import struct
from typing import Any

from core.money import Usage
from gateway import tokens
from gateway.context import RequestContext
from gateway.errors import GatewayError
from gateway.formats import checks
from gateway.formats.base import Json, StreamTracker, WireFormat, reported_usage
from gateway.providers.base import Operation
from gateway.sse import DONE_FRAME, data_frame


def _message_of(choice: Json) -> Json:
    message = choice.get("message")
    return message if isinstance(message, dict) else {}


def _chunk_text(chunk: Json) -> str:
    parts = []
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta")
        if delta is None:
            text = choice.get("text")
            if isinstance(text, str):
                parts.append(text)
            continue
        content = delta.get("content")
        if isinstance(content, str):
            parts.append(content)
        for call in delta.get("tool_calls") or ():
            fn = call.get("function") or {}
            parts.append(str(fn.get("name") or "") + str(fn.get("arguments") or ""))
    return "".join(parts)


class ChunkTracker(StreamTracker):
    """``data:`` frames; the usage chunk we forced upstream is dropped unless the client asked."""

    def __init__(self, ctx: RequestContext) -> None:
        super().__init__(ctx)
        self.reported: Usage | None = None
        self.output: list[str] = []

    def frame(self, item: Json) -> bytes | None:
        if "usage" in item:
            reported = item.get("usage")
            if reported:
                self.reported = reported_usage(reported) or self.reported
            if not self.ctx.client_wants_usage:
                if not item.get("choices"):
                    return None  # the usage chunk we asked for; the client did not
                del item["usage"]
        self.output.append(_chunk_text(item))
        return data_frame(item)

    def usage(self) -> Usage:
        return self.reported or self.ctx.estimated_usage("".join(self.output))

    def error_frame(self, err: GatewayError) -> bytes:
        return data_frame(err.openai_body())

    def closing(self, cost_usd: str) -> bytes:
        # SDKs skip SSE comments; humans and tools reading the raw stream see the cost.
        return DONE_FRAME + f": x-chittycan-cost={cost_usd}\n\n".encode()


class _Generation(WireFormat):
    def parse(self, ctx: RequestContext, data: Json, headers: dict[bytes, bytes]) -> None:
        self.check(data)
        ctx.stream, ctx.client_wants_usage = checks.stream_flags(data)
        user = data.get("user") or data.get("safety_identifier")
        ctx.end_user = user if isinstance(user, str) else ""

    def check(self, data: Json) -> None:
        raise NotImplementedError

    def max_output_tokens(self, ctx: RequestContext) -> int:
        assert ctx.route is not None
        body = ctx.body
        cap = body.get("max_completion_tokens") or body.get("max_tokens") or ctx.route.max_output_tokens
        # Every generated choice is billed: n of them, or best_of (legacy completions) when larger.
        best_of = body.get("best_of") if ctx.endpoint == "completions" else None  # validated there
        n = max(body.get("n") or 1, best_of or 1)
        most = ctx.route.max_output_tokens
        return int(min(cap, most) if isinstance(cap, int) else most) * int(n)

    def read_result(self, ctx: RequestContext, result: Json) -> Usage:
        found = reported_usage(result.get("usage"))
        if found is not None:
            return found
        choices = result.get("choices")
        text = "".join(
            str(_message_of(c).get("content") or c.get("text") or "")
            for c in (choices if isinstance(choices, list) else ())
            if isinstance(c, dict)
        )
        return ctx.estimated_usage(text)

    def stream_tracker(self, ctx: RequestContext) -> StreamTracker:
        return ChunkTracker(ctx)


class ChatFormat(_Generation):
    endpoint = "chat"
    operation = Operation.CHAT
    kinds = ("chat",)

    def check(self, data: Json) -> None:
        checks.chat(data)

    def prompt_tokens(self, ctx: RequestContext) -> int:
        return tokens.count_messages(ctx.body.get("messages") or [], ctx.requested_model, ctx.body.get("tools"))


class CompletionsFormat(_Generation):
    endpoint = "completions"
    operation = Operation.COMPLETIONS
    kinds = ("completion", "chat")

    def check(self, data: Json) -> None:
        checks.completions(data)

    def prompt_tokens(self, ctx: RequestContext) -> int:
        model = ctx.requested_model
        prompt = ctx.body.get("prompt")
        if isinstance(prompt, str):
            return tokens.count_text(prompt, model)
        if isinstance(prompt, list):
            return sum(
                len(p) if isinstance(p, list) else 1 if isinstance(p, int) else tokens.count_text(str(p), model)
                for p in prompt
            )
        return 0


def _pack_base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


class EmbeddingsFormat(WireFormat):
    endpoint = "embeddings"
    operation = Operation.EMBEDDINGS
    kinds = ("embedding",)

    def parse(self, ctx: RequestContext, data: Json, headers: dict[bytes, bytes]) -> None:
        checks.embeddings(data)
        user = data.get("user")
        ctx.end_user = user if isinstance(user, str) else ""

    def prompt_tokens(self, ctx: RequestContext) -> int:
        raw: Any = ctx.body["input"]
        items = raw if isinstance(raw, list) and raw and not isinstance(raw[0], int) else [raw]
        return sum(len(i) if isinstance(i, list) else tokens.count_text(str(i), ctx.requested_model) for i in items)

    def read_result(self, ctx: RequestContext, result: Json) -> Usage:
        if ctx.body.get("encoding_format") == "base64":
            for item in result.get("data") or ():
                if isinstance(item, dict) and isinstance(item.get("embedding"), list):
                    item["embedding"] = _pack_base64(item["embedding"])
        found = reported_usage(result.get("usage"))
        if found is None or not found.prompt_tokens:
            return Usage(prompt_tokens=ctx.estimated_prompt_tokens, source="estimated")
        return found


CHAT = ChatFormat()
COMPLETIONS = CompletionsFormat()
EMBEDDINGS = EmbeddingsFormat()
