"""The hot ``/v1`` routes as Channels ``AsyncHttpConsumer``s, reached by exact path before anything
else (``chittycan.routing.HotRoutes``).

``GatewayConsumer`` reads the body (refusing oversized ones early), runs the pipeline and watches
the connection meanwhile: if the client goes away, the pipeline is cancelled, which closes the
upstream request and still records the partial usage. It skips the channel layer and Django's
per-message ``close_old_connections`` (the hot path runs no ORM query).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from channels.generic.http import AsyncHttpConsumer
from django.db import Error as DatabaseError

from core import runtime
from gateway import formats, pipeline
from gateway.context import Headers, RequestContext
from gateway.errors import GatewayError, PayloadTooLarge, ServiceUnavailable
from gateway.formats import WireFormat

log = logging.getLogger(__name__)

_JSON = (b"content-type", b"application/json")


class GatewayConsumer(AsyncHttpConsumer):
    """One ``/v1`` route: its wire format decides the envelope of the errors raised here too."""

    wire: WireFormat = formats.CHAT
    channel_layer_alias = None  # no channel layer on the HTTP hot path

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.headers: dict[bytes, bytes] = {}
        self._started = False
        self._finished = False
        self._client_left = False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.scope = scope
        self.base_send = send
        self.headers = dict(scope.get("headers") or ())
        runtime.ensure_started()
        ctx = RequestContext(request_id=pipeline.new_request_id(), endpoint=self.wire.endpoint)
        limit = self.wire.body_limit()
        try:
            if scope.get("method") != "POST":
                raise GatewayError(
                    f"Method {scope.get('method')} not allowed; use POST.",
                    status=405,
                    code="method_not_allowed",
                    type="invalid_request_error",
                )
            declared = self.headers.get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise PayloadTooLarge(f"The request body exceeds the {limit} byte limit.")
            body = await self._read_body(receive, limit)
        except GatewayError as err:
            status, payload, headers = self.error_response(err, ctx)
            await self.send_json(status, payload, headers)
            return
        if body is None:
            return  # the client left before sending the whole body
        # The pipeline runs in this task; a watcher task cancels it if the client goes away first.
        current = asyncio.current_task()
        assert current is not None
        watcher = asyncio.ensure_future(self._wait_disconnect(receive, current))
        try:
            await self.run(ctx, body)
        except asyncio.CancelledError:
            if not self._client_left:
                raise  # the server is cancelling us: not ours to swallow
            current.uncancel()
        except Exception as exc:  # never leak it as a hung connection
            watcher.cancel()  # the pipeline is over: nothing left for a disconnect to cancel
            log.exception("pipeline failed", extra={"request_id": ctx.request_id})
            if not self._started:
                status, payload, headers = self.error_response(_unexpected(exc, ctx), ctx)
                await self.send_json(status, payload, headers)
            else:
                await self.finish()
        finally:
            watcher.cancel()

    async def _read_body(self, receive: Any, limit: int) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"The request body exceeds the {limit} byte limit.")
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    async def _wait_disconnect(self, receive: Any, pipeline_task: asyncio.Task[Any]) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
        # The server also says "disconnect" once the response is complete (uvicorn does): what
        # the pipeline does after its answer went out (cache store, settle, record) must go on.
        # This task only runs while the pipeline's is suspended at an await, and is cancelled as
        # soon as the pipeline ends: the cancellation lands inside it (settle and record are shielded).
        if not self._finished:
            self._client_left = True
            pipeline_task.cancel()

    async def run(self, ctx: RequestContext, body: bytes) -> None:
        await pipeline.run(self.wire, self, ctx, body)

    def error_response(self, err: GatewayError, ctx: RequestContext) -> tuple[int, bytes, Headers]:
        return self.wire.error_response(err, ctx)

    # --- the Responder protocol the pipeline writes through ---------------------------------

    # The ASGI messages go straight to the server (``base_send``): Channels' ``send_headers`` and
    # ``send_body`` add two coroutine layers per message and nothing the gateway needs.

    async def send_json(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        await self.base_send({"type": "http.response.start", "status": status, "headers": [_JSON, *headers]})
        self._started = True  # only now: if the headers were refused, an error response can still go out
        await self.base_send({"type": "http.response.body", "body": body, "more_body": False})
        self._finished = True

    async def start_stream(self, headers: list[tuple[bytes, bytes]]) -> None:
        await self.base_send({"type": "http.response.start", "status": 200, "headers": headers})
        self._started = True

    async def write(self, data: bytes) -> None:
        await self.base_send({"type": "http.response.body", "body": data, "more_body": True})

    async def finish(self) -> None:
        if not self._finished:
            self._finished = True
            await self.base_send({"type": "http.response.body", "body": b"", "more_body": False})


class ChatCompletionsConsumer(GatewayConsumer):
    wire = formats.CHAT


class CompletionsConsumer(GatewayConsumer):
    wire = formats.COMPLETIONS


class EmbeddingsConsumer(GatewayConsumer):
    wire = formats.EMBEDDINGS


class MessagesConsumer(GatewayConsumer):
    """``/v1/messages``: Anthropic wire format, errors in the Anthropic envelope."""

    wire = formats.MESSAGES


class ResponsesConsumer(GatewayConsumer):
    """``POST /v1/responses``: the Responses API (its GET and DELETE are in ``gateway.api``)."""

    wire = formats.RESPONSES


class ImagesConsumer(GatewayConsumer):
    wire = formats.IMAGES


class ImageEditsConsumer(GatewayConsumer):
    wire = formats.IMAGE_EDITS


class TranscriptionsConsumer(GatewayConsumer):
    wire = formats.TRANSCRIPTIONS


class SpeechConsumer(GatewayConsumer):
    """``/v1/audio/speech``: the audio relayed as the upstream streams it (binary, not SSE)."""

    wire = formats.SPEECH


class ModerationsConsumer(GatewayConsumer):
    wire = formats.MODERATIONS


class CountTokensConsumer(GatewayConsumer):
    """``/v1/messages/count_tokens`` (Claude Code calls it); nothing is billed."""

    wire = formats.MESSAGES

    async def run(self, ctx: RequestContext, body: bytes) -> None:
        await pipeline.count_tokens(self, ctx, body)


class CacheInvalidateConsumer(GatewayConsumer):
    """``/v1/cache/invalidate``: drop the caller's tenant's cached answers (one model's, or all)."""

    async def run(self, ctx: RequestContext, body: bytes) -> None:
        await pipeline.invalidate_cache(self, ctx, body)


class FeedbackConsumer(GatewayConsumer):
    """``/v1/feedback``: a score or label for one of the caller's tenant's requests."""

    async def run(self, ctx: RequestContext, body: bytes) -> None:
        await pipeline.feedback(self, ctx, body)


def _unexpected(exc: Exception, ctx: RequestContext) -> GatewayError:
    """A database outage is a 503 the SDKs retry; anything else is our bug: a 500."""
    if isinstance(exc, DatabaseError):
        return ServiceUnavailable(
            f"The gateway's database is unavailable; retry shortly. Request id {ctx.request_id}.",
            code="database_unavailable",
            headers={"retry-after": "1"},
        )
    return GatewayError(f"Internal error ({type(exc).__name__}); request id {ctx.request_id}.")
