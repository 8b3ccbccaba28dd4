"""The interface every wire format implements, and the response pieces they share."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any

import orjson
from django.conf import settings

from core.money import Usage
from gateway.context import Headers, RequestContext
from gateway.errors import GatewayError
from gateway.formats.checks import json_object
from gateway.providers.base import Operation

log = logging.getLogger(__name__)

Json = dict[str, Any]
Response = tuple[int, bytes, Headers]


def response_headers(ctx: RequestContext) -> Headers:
    """``x-request-id`` and the ``X-ChittyCan-*`` headers of a successful answer."""
    headers: Headers = [(b"x-request-id", ctx.request_id.encode())]
    if ctx.deployment is not None:
        headers.append((b"x-chittycan-model", ctx.deployment.upstream_model.encode()))
        headers.append((b"x-chittycan-provider", ctx.deployment.provider.slug.encode()))
    if ctx.route_header:  # a routing policy decided: rule=...; model=...; outcome=<dispatch's reason>
        outcome = f"; outcome={ctx.route_reason}" if ctx.route_reason else ""
        headers.append((b"x-chittycan-route", f"{ctx.route_header}{outcome}".encode()))
    elif ctx.route_reason:
        headers.append((b"x-chittycan-route", ctx.route_reason.encode()))
    headers.extend(ctx.extra_headers)
    return headers


def reported_usage(reported: Any) -> Usage | None:
    """An upstream's OpenAI usage object as ``Usage``; None when absent or not understandable."""
    if not isinstance(reported, dict):
        return None
    try:
        return Usage.from_openai(reported)
    except (TypeError, ValueError, AttributeError):
        log.warning("upstream sent a usage object we cannot read: %.200r", reported)
        return None


class StreamTracker(ABC):
    """Reads one relayed stream: frames each item for the client and keeps what it says of usage."""

    #: Seconds of upstream silence after which ``ping`` is written (None: never).
    keepalive: float | None = None
    ping: bytes = b""

    def __init__(self, ctx: RequestContext) -> None:
        self.ctx = ctx
        self.stopped = False  # set when the stream must not be read further (an in-stream error)

    @abstractmethod
    def frame(self, item: Json) -> bytes | None:
        """The bytes to send the client for one upstream item (None: send nothing)."""

    @abstractmethod
    def usage(self) -> Usage:
        """What the stream reported, or an estimate of what was relayed so far."""

    @abstractmethod
    def error_frame(self, err: GatewayError) -> bytes:
        """An error that ended the stream after it started, framed for the client."""

    @abstractmethod
    def closing(self, cost_usd: str) -> bytes:
        """What follows a complete stream (``[DONE]``, the cost comment)."""


class WireFormat(ABC):
    """One ``/v1`` route's wire format."""

    endpoint: str  # chat | completions | embeddings | messages | responses (ledger rows, key scopes)
    operation: Operation  # what the provider is asked
    kinds: tuple[str, ...]  # the model kinds that may serve it
    keeps_state = False  # the gateway keeps its answers (the Responses API): see prepare / complete
    cacheable = True  # the exact response cache may serve it (the media routes: no)

    def body_limit(self) -> int:
        """The largest request body the route reads (bytes); larger ones are a 413."""
        return int(settings.CHITTYCAN_MAX_BODY_BYTES)

    def decode(self, body: bytes, headers: dict[bytes, bytes]) -> Json:
        """The request body as an object: JSON here; a multipart form for the upload routes."""
        return json_object(body)

    def most_units(self, ctx: RequestContext) -> Usage | None:
        """The most of what is priced per unit (images, audio, characters) the request can be
        billed for: reserved with its tokens (None: the route bills tokens only)."""
        return None

    def stream_content_type(self, ctx: RequestContext, first: Json) -> bytes:
        """The content type of a streamed answer (``first``: its first item)."""
        return b"text/event-stream; charset=utf-8"

    @abstractmethod
    def parse(self, ctx: RequestContext, data: Json, headers: dict[bytes, bytes]) -> None:
        """Check the body (a JSON object with a valid ``model``) and note what the stages need."""

    @abstractmethod
    def prompt_tokens(self, ctx: RequestContext) -> int:
        """Input tokens, counted offline (for rate limits, the reservation and estimates)."""

    def max_output_tokens(self, ctx: RequestContext) -> int:
        """The most output tokens the request can be billed for (the worst case reserved)."""
        return 0

    def error_response(self, err: GatewayError, ctx: RequestContext) -> Response:
        """An error in the OpenAI envelope (overridden by formats with their own)."""
        headers: Headers = [(b"x-request-id", ctx.request_id.encode())]
        headers.extend((k.encode(), v.encode()) for k, v in err.headers.items())
        headers.extend(ctx.extra_headers)
        return err.status, orjson.dumps(err.openai_body()), headers

    def success_headers(self, ctx: RequestContext) -> Headers:
        return response_headers(ctx)

    @abstractmethod
    def read_result(self, ctx: RequestContext, result: Json) -> Usage:
        """The usage of a complete (non-streamed) answer; may finish the body for the client."""

    def stream_tracker(self, ctx: RequestContext) -> StreamTracker:
        raise NotImplementedError(f"the {self.endpoint} route does not stream")

    # Hooks for a format whose answers the gateway keeps (``keeps_state``); the others do nothing.

    async def prepare(self, ctx: RequestContext) -> None:  # noqa: B027  (a hook: most formats need none)
        """After authentication: load the state the request refers to (a stored conversation)."""

    async def complete(self, ctx: RequestContext, body: Json) -> Json:
        """A complete answer (fresh or a cache hit), before the client sees it."""
        return body

    def watch_stream(self, ctx: RequestContext, items: AsyncIterator[Json]) -> AsyncIterator[Json]:
        """A stream's items (after the first) as they are relayed."""
        return items
