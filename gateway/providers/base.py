"""The contract every upstream adapter fulfils.

The gateway's internal format is OpenAI's: a provider takes an OpenAI-format request body (with
``model`` already set to the upstream's model name) and returns OpenAI-format responses and stream
chunks. A provider raises ``UpstreamError`` on failure; ``retryable`` tells dispatch whether to
retry or fail over (only before any byte reached the client).

To add a provider: subclass ``Provider`` in ``gateway/providers/<kind>.py``, implement the
operations it supports (one method per ``Operation``), and add it to ``REGISTRY`` in
``gateway/providers/__init__.py``.
See docs/providers.md.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

import httpx
import orjson

from gateway.errors import InvalidRequest, UpstreamError, upstream_status_error
from gateway.http import aiohttp_session, client, open_stream


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """When a deployment's circuit breaker opens, and for how long (``gateway.routing.breaker``)."""

    failures: int = 5  # consecutive failures that open it
    error_rate: float = 0.5  # or this share of failures ...
    min_requests: int = 20  # ... among at least this many requests ...
    window: float = 30.0  # ... in this many seconds (each gateway process's own traffic)
    cooldown: float = 30.0  # seconds open before one half-open probe


@dataclass(frozen=True, slots=True)
class ProbeSettings:
    """Active health probes of a provider's deployments (``gateway.routing.health``)."""

    enabled: bool = False
    interval: float = 30.0  # seconds between probes of one deployment
    request: Mapping[str, Any] = field(default_factory=dict)  # an OpenAI chat body; empty: the default


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """An immutable snapshot of a ``Provider`` row, credentials decrypted."""

    id: int
    slug: str
    kind: str
    base_url: str
    api_key: str = field(default="", repr=False)
    extra_headers: Mapping[str, str] = field(default_factory=dict)
    connect_timeout: float = 5.0
    read_timeout: float = 600.0
    first_byte_timeout: float | None = None  # None: only the read timeout bounds the wait
    total_timeout: float | None = None  # None: no limit on a whole attempt
    max_retries: int = 2
    responses_api: bool = False  # the upstream serves /v1/responses itself (else translated)
    breaker: BreakerSettings = field(default_factory=BreakerSettings)
    probe: ProbeSettings = field(default_factory=ProbeSettings)
    outlier_latency_factor: float = 0.0  # passive outlier detection; 0: off


@dataclass(slots=True)
class UpstreamCall:
    """One attempt against one deployment."""

    provider: ProviderConfig
    upstream_model: str
    body: dict[str, Any]
    api_key: str = ""  # overrides the provider's key (passthrough mode)
    headers: dict[str, str] = field(default_factory=dict)  # extra request headers (e.g. anthropic-beta)
    max_output_tokens: int = 4096  # the model's cap: Anthropic's max_tokens when the client gave none
    connect_timeout: float | None = None  # this hop's connect limit; None: the provider's

    @property
    def key(self) -> str:
        return self.api_key or self.provider.api_key

    @property
    def timeout(self) -> httpx.Timeout:
        """httpx's limits: the connect (this hop's, else the provider's) and the read timeout.

        The first-byte and total limits are dispatch's (``gateway.pipeline.dispatch``): they bound
        the whole attempt, whichever transport carries it.
        """
        connect = self.connect_timeout if self.connect_timeout is not None else self.provider.connect_timeout
        return httpx.Timeout(self.provider.read_timeout, connect=connect)


#: JSON objects in the OpenAI wire format (the gateway's internal format) and Anthropic's.
ChatCompletion = dict[str, Any]  # an OpenAI ``chat.completion``, ``usage`` included
ChatChunk = dict[str, Any]  # an OpenAI ``chat.completion.chunk``
Completion = dict[str, Any]  # an OpenAI ``text_completion`` (and its stream chunks)
EmbeddingList = dict[str, Any]  # an OpenAI embeddings ``list`` with float vectors
Message = dict[str, Any]  # an Anthropic ``message``
MessageEvent = dict[str, Any]  # an Anthropic stream event (a dict with ``type``)
ResponseObject = dict[str, Any]  # an OpenAI Responses API ``response``
ResponseEvent = dict[str, Any]  # an OpenAI Responses API stream event (``response.*``, ``error``)
ImageList = dict[str, Any]  # an OpenAI images answer: ``created``, ``data`` of ``b64_json`` or ``url``
Transcription = dict[str, Any]  # an OpenAI transcription (json or verbose_json)
AudioChunk = dict[str, Any]  # ``{"audio": bytes}``: a piece of a speech answer, as the upstream sent it
ModerationList = dict[str, Any]  # an OpenAI moderations answer


@dataclass(frozen=True, slots=True)
class Upload:
    """A file of a multipart request (the transcription's audio, an edit's image or mask)."""

    filename: str
    content_type: str
    data: bytes = field(repr=False)


class Operation(StrEnum):
    """What a route asks of a provider. Each has one method (and a ``_stream`` one where it streams)."""

    CHAT = "chat"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    MESSAGES = "messages"
    RESPONSES = "responses"
    IMAGES = "images"  # /v1/images/generations
    IMAGE_EDITS = "image_edits"  # /v1/images/edits (multipart)
    TRANSCRIPTIONS = "transcriptions"  # /v1/audio/transcriptions (multipart)
    SPEECH = "speech"  # /v1/audio/speech (streamed binary: ``speech_stream``)
    MODERATIONS = "moderations"


class Provider:
    """Base adapter. Operations a kind does not support raise ``InvalidRequest``.

    Anthropic Messages (``/v1/messages``) are not part of this base: a provider that speaks them
    natively implements ``NativeMessages``; dispatch serves every other kind through
    ``gateway.providers.bridge``, which translates to and from ``chat``.
    """

    kind = "base"

    async def chat(self, call: UpstreamCall) -> ChatCompletion:
        """Return an OpenAI ``chat.completion`` object, ``usage`` included."""
        raise InvalidRequest(f"{self.kind} providers do not serve chat completions", param="model")

    def chat_stream(self, call: UpstreamCall) -> AsyncIterator[ChatChunk]:
        """Yield OpenAI ``chat.completion.chunk`` objects; the last carries ``usage`` if known.

        The caller asks upstream for usage; the provider must yield the usage chunk (empty
        ``choices``) when the upstream sends one.
        """
        raise InvalidRequest(f"{self.kind} providers do not serve chat completions", param="model")

    async def completions(self, call: UpstreamCall) -> Completion:
        raise InvalidRequest(f"{self.kind} providers do not serve legacy completions", param="model")

    def completions_stream(self, call: UpstreamCall) -> AsyncIterator[Completion]:
        raise InvalidRequest(f"{self.kind} providers do not serve legacy completions", param="model")

    async def embeddings(self, call: UpstreamCall) -> EmbeddingList:
        """Return an OpenAI embeddings list with float vectors (the pipeline encodes base64)."""
        raise InvalidRequest(f"{self.kind} providers do not serve embeddings", param="model")

    # The media routes (docs/media.md). A multipart request's files are ``Upload`` values in the body.

    async def images(self, call: UpstreamCall) -> ImageList:
        raise InvalidRequest(f"{self.kind} providers do not generate images", param="model")

    async def image_edits(self, call: UpstreamCall) -> ImageList:
        raise InvalidRequest(f"{self.kind} providers do not edit images", param="model")

    async def transcriptions(self, call: UpstreamCall) -> Transcription:
        raise InvalidRequest(f"{self.kind} providers do not transcribe audio", param="model")

    def speech_stream(self, call: UpstreamCall) -> AsyncIterator[AudioChunk]:
        """Yield ``{"audio": bytes}`` pieces of the spoken audio as they arrive."""
        raise InvalidRequest(f"{self.kind} providers do not synthesise speech", param="model")

    async def moderations(self, call: UpstreamCall) -> ModerationList:
        raise InvalidRequest(f"{self.kind} providers do not serve moderations", param="model")


@runtime_checkable
class NativeMessages(Protocol):
    """A provider that serves Anthropic Messages itself (and can count their tokens)."""

    async def messages(self, call: UpstreamCall) -> Message: ...
    def messages_stream(self, call: UpstreamCall) -> AsyncIterator[MessageEvent]: ...
    async def count_tokens(self, call: UpstreamCall) -> dict[str, Any]: ...


@runtime_checkable
class NativeResponses(Protocol):
    """A provider kind that can serve the Responses API itself; used only for upstreams whose
    provider row says they do (``ProviderConfig.responses_api``), else dispatch translates."""

    async def responses(self, call: UpstreamCall) -> ResponseObject: ...
    def responses_stream(self, call: UpstreamCall) -> AsyncIterator[ResponseEvent]: ...


def error_message_from_body(body: bytes) -> tuple[str, str | None]:
    """Pull a readable message and code out of whatever error body an upstream sent."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "replace").strip()
        return (text[:500] or "upstream returned an empty error body"), None
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, str):
            return err, None
        if isinstance(err, dict):
            message = err.get("message") or err.get("detail") or str(err)
            code = err.get("code") or err.get("type")
            return str(message), (str(code) if code is not None else None)
    return str(data)[:500], None


def raise_for_status(response: httpx.Response, body: bytes) -> None:
    _raise_for_status(response.status_code, response.headers, body)


def _raise_for_status(status: int, headers: Mapping[str, str], body: bytes) -> None:
    if status < 400:
        return
    message, code = error_message_from_body(body)
    err = upstream_status_error(status, message, code=code)
    for header in ("retry-after", "retry-after-ms"):
        if header in headers:
            err.headers[header] = headers[header]
    raise err


def _is_timeout(exc: Exception) -> bool:
    """httpx-aiohttp maps a refused connection to ``ConnectTimeout``; look at the real cause."""
    if not isinstance(exc, httpx.TimeoutException):
        return False
    cause = exc.__cause__
    return not (isinstance(cause, OSError) and not isinstance(cause, TimeoutError))


def connection_error(exc: Exception) -> UpstreamError:
    if _is_timeout(exc):
        return UpstreamError(f"upstream timed out: {type(exc).__name__}", retryable=True, status=504, code="timeout")
    return UpstreamError(
        f"upstream unreachable: {type(exc).__name__}", retryable=True, status=502, code="connect_error"
    )


async def post_json(
    url: str | httpx.URL, body: Any, headers: Mapping[str, str], timeouts: httpx.Timeout
) -> dict[str, Any]:
    """POST a JSON body to an upstream and return its JSON object; every failure is an ``UpstreamError``.

    On the default aiohttp transport the call goes to aiohttp directly (``gateway.http.open_stream``);
    otherwise through the httpx client."""
    try:
        session = aiohttp_session()
        if session is not None:
            answer = await open_stream(session, url, orjson.dumps(body), headers, timeouts)
            try:
                content = await answer.aread()
            finally:
                await answer.aclose()
            return _json_object(answer.status, answer.headers, content)
        response = await client().post(url, content=orjson.dumps(body), headers=headers, timeout=timeouts)
    except httpx.HTTPError as exc:
        raise connection_error(exc) from exc
    return _json_answer(response)


async def post_multipart(
    url: str | httpx.URL, body: Mapping[str, Any], headers: Mapping[str, str], timeouts: httpx.Timeout
) -> dict[str, Any]:
    """POST a ``multipart/form-data`` body (``Upload`` values are files, a list is sent as ``name[]``)
    and return the upstream's JSON object."""
    fields: dict[str, list[str]] = {}
    files: list[tuple[str, tuple[str, bytes, str]]] = []
    for name, value in body.items():
        part = f"{name}[]" if isinstance(value, list) else name
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, Upload):
                files.append((part, (item.filename, item.data, item.content_type)))
            elif item is not None:
                fields.setdefault(part, []).append(item if isinstance(item, str) else orjson.dumps(item).decode())
    sent = {k: v for k, v in headers.items() if k.lower() != "content-type"}  # httpx sets the boundary
    try:
        response = await client().post(url, data=fields, files=files, headers=sent, timeout=timeouts)
    except httpx.HTTPError as exc:
        raise connection_error(exc) from exc
    return _json_answer(response)


def _json_answer(response: httpx.Response) -> dict[str, Any]:
    return _json_object(response.status_code, response.headers, response.content)


def _json_object(status: int, headers: Mapping[str, str], content: bytes) -> dict[str, Any]:
    _raise_for_status(status, headers, content)
    try:
        data = orjson.loads(content)
    except orjson.JSONDecodeError as exc:
        raise UpstreamError("upstream returned a body that is not JSON", retryable=True) from exc
    if not isinstance(data, dict):
        raise UpstreamError("upstream returned an unexpected body", retryable=True)
    return data


class ByteStream(Protocol):
    """A streamed upstream answer, as providers read it."""

    def aiter_bytes(self) -> AsyncIterator[bytes]: ...


@asynccontextmanager
async def streamed_post(
    url: str | httpx.URL, body: Any, headers: Mapping[str, str], timeouts: httpx.Timeout
) -> AsyncIterator[ByteStream]:
    """POST a JSON body and hold the streamed answer open for the ``async with`` block.

    Error statuses are raised before the block runs; transport errors inside it become
    ``UpstreamError``; the response is always closed (client disconnects included). On the
    default aiohttp transport the answer is read from aiohttp directly (``gateway.http.open_stream``).
    """
    session = aiohttp_session()
    if session is None:
        async with _httpx_streamed_post(url, body, headers, timeouts) as response:
            yield response
        return
    try:
        streamed = await open_stream(session, url, orjson.dumps(body), headers, timeouts)
    except httpx.HTTPError as exc:
        raise connection_error(exc) from exc
    try:
        if streamed.status >= 400:
            _raise_for_status(streamed.status, streamed.headers, await streamed.aread())
        yield streamed
    except httpx.HTTPError as exc:
        raise connection_error(exc) from exc
    finally:
        await streamed.aclose()


@asynccontextmanager
async def _httpx_streamed_post(
    url: str | httpx.URL, body: Any, headers: Mapping[str, str], timeouts: httpx.Timeout
) -> AsyncIterator[httpx.Response]:
    http = client()
    request = http.build_request("POST", url, content=orjson.dumps(body), headers=headers, timeout=timeouts)
    try:
        response = await http.send(request, stream=True)
    except httpx.HTTPError as exc:
        raise connection_error(exc) from exc
    try:
        if response.status_code >= 400:
            raise_for_status(response, await response.aread())
        yield response
    except httpx.HTTPError as exc:
        raise connection_error(exc) from exc
    finally:
        await response.aclose()


async def close_stream(stream: AsyncIterator[Any]) -> None:
    """Close a provider's stream (an async generator's ``aclose`` ends the upstream request)."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()
