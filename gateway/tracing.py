"""OpenTelemetry traces of the request pipeline: one span per request, per stage and per upstream attempt.

Off by default (``CHITTYCAN_TRACING``, settings.py). Off, the hot path pays one boolean test per
request (``ENABLED`` in ``gateway.pipeline.run``) and a ``ctx.trace is None`` test per upstream
attempt: no span object, no context attached, no id drawn.

On, a request's live part is small: ``begin`` reads the client's W3C ``traceparent`` (through the
standard propagator; a malformed header starts a new trace), draws the request span's id and takes
the sampling decision; each upstream attempt draws its span id and sends ``traceparent`` with it
to the provider (``upstream_headers``). Everything else is built at record time (``export``) from
what the pipeline writes anyway: the stage timings (``ctx.stage``), the attempt log (dispatch), the
usage and the cost. The spans are SDK ``ReadableSpan``s handed to a ``BatchSpanProcessor`` whose
``OTLPSpanExporter`` (OTLP over HTTP, protobuf) posts them from its own thread; both read the
standard ``OTEL_*`` variables (endpoint, headers, timeout, compression, batch sizes), the resource
``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``, sampling ``OTEL_TRACES_SAMPLER(_ARG)``.

The tree (names and attributes follow the OpenTelemetry GenAI semantic conventions of
``SEMCONV_SCHEMA``; ChittyCan's own attributes are ``chittycan.*``)::

    chat gpt-4o                        SERVER  gen_ai.*, tenant, key name, request id, cost
      chittycan.parse / auth / route / limit / cache / reserve
      chittycan.dispatch
        chat gpt-4o-2024-08-06         CLIENT  one per upstream attempt (provider, status, error)
      chittycan.relay / settle / record
"""

from __future__ import annotations

import atexit
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry import trace as trace_api
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as gen_ai
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.semconv.attributes.http_attributes import HTTP_RESPONSE_STATUS_CODE
from opentelemetry.semconv.attributes.server_attributes import SERVER_ADDRESS
from opentelemetry.semconv.schemas import Schemas
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from gateway.context import RequestContext
    from gateway.routing.table import DeploymentRoute

log = logging.getLogger(__name__)

#: The semantic conventions followed: 1.44.0, as the pinned opentelemetry-semantic-conventions
#: 0.66b2 carries them (its attribute constants are used below). The GenAI ones are "development"
#: status: names may change in a later version; the pin keeps them fixed here.
SEMCONV_SCHEMA = Schemas.V1_44_0.value

#: Read on the hot path: tracing is on in this process. Set by ``configure`` (gateway/apps.py).
ENABLED = False

_SCOPE = InstrumentationScope("chittycan.gateway", schema_url=SEMCONV_SCHEMA)
_PROPAGATOR = TraceContextTextMapPropagator()
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_UNSAMPLED = TraceFlags(TraceFlags.DEFAULT)

#: ``gen_ai.operation.name`` per pipeline endpoint (Anthropic messages are chat).
OPERATIONS = {"chat": "chat", "completions": "text_completion", "embeddings": "embeddings", "messages": "chat"}
#: ``gen_ai.provider.name`` per provider kind: the convention's well-known values.
PROVIDER_NAMES = {"openai": "openai", "anthropic": "anthropic", "ollama": "ollama"}
#: Stage timings (``ctx.timings`` keys) to span names; unknown stages keep their own name.
STAGE_SPANS = {
    "parse": "chittycan.parse",
    "auth": "chittycan.auth",
    "route": "chittycan.route",
    "limit": "chittycan.limit",
    "cache": "chittycan.cache",
    "admit": "chittycan.reserve",
    "upstream": "chittycan.dispatch",
    "upstream_first_chunk": "chittycan.dispatch",
    "relay": "chittycan.relay",
    "settle": "chittycan.settle",
}


@dataclass(slots=True)
class Trace:
    """A traced request's ids: the request span's, its remote parent's and each attempt's."""

    trace_id: int
    span_id: int
    parent: SpanContext | None  # the client's span, from its traceparent
    sampled: bool
    state: TraceState | None = None
    attempt_ids: list[int] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)

    @property
    def trace_id_hex(self) -> str:
        return f"{self.trace_id:032x}"

    def upstream_headers(self) -> dict[str, str]:
        """W3C trace context for the current upstream attempt (its span is the provider's parent)."""
        span_id = self.attempt_ids[-1] if self.attempt_ids else self.span_id
        headers = {"traceparent": f"00-{self.trace_id:032x}-{span_id:016x}-{'01' if self.sampled else '00'}"}
        if self.state:
            headers["tracestate"] = self.state.to_header()
        return headers


# --- set-up -----------------------------------------------------------------------------------------

_lock = threading.Lock()
_processor: BatchSpanProcessor | None = None
_processor_pid = 0
_resource: Resource | None = None
_sampler: Sampler = ParentBased(ALWAYS_ON)


def configure(enabled: bool) -> None:
    """Turn tracing on or off in this process (the exporter starts with the first exported span)."""
    global ENABLED, _sampler, _resource
    if not enabled:
        ENABLED = False
        shutdown()
        return
    _sampler = sampler_from_env()
    _resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME") or "chittycan"})
    ENABLED = True


def sampler_from_env() -> Sampler:
    """``OTEL_TRACES_SAMPLER`` (default ``parentbased_always_on``) and ``OTEL_TRACES_SAMPLER_ARG``."""
    name = os.environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    try:
        ratio = float(os.environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))
    except ValueError:
        log.warning("OTEL_TRACES_SAMPLER_ARG is not a number; sampling everything")
        ratio = 1.0
    samplers: dict[str, Sampler] = {
        "always_on": ALWAYS_ON,
        "always_off": ALWAYS_OFF,
        "traceidratio": TraceIdRatioBased(ratio),
        "parentbased_always_on": ParentBased(ALWAYS_ON),
        "parentbased_always_off": ParentBased(ALWAYS_OFF),
        "parentbased_traceidratio": ParentBased(TraceIdRatioBased(ratio)),
    }
    if name not in samplers:
        log.warning("OTEL_TRACES_SAMPLER=%s is not supported; using parentbased_always_on", name)
    return samplers.get(name, samplers["parentbased_always_on"])


def _span_processor() -> BatchSpanProcessor:
    """This process's exporter (created after a fork, in the worker that exports)."""
    global _processor, _processor_pid
    pid = os.getpid()
    if _processor is None or _processor_pid != pid:
        with _lock:
            if _processor is None or _processor_pid != pid:
                _processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint()))
                _processor_pid = pid
    return _processor


def otlp_endpoint() -> str | None:
    """Where spans go: ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` as is, or ``OTEL_EXPORTER_OTLP_ENDPOINT``
    plus ``/v1/traces`` (None: the exporter's default, http://localhost:4318/v1/traces). An empty
    variable (as compose passes an unset one) counts as unset."""
    traces = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if traces:
        return traces
    base = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    return f"{base.rstrip('/')}/v1/traces" if base else None


def flush(timeout_ms: int = 5000) -> bool:
    """Export what is queued now (tests, shutdown)."""
    return _processor.force_flush(timeout_ms) if _processor is not None else True


def shutdown() -> None:
    global _processor
    processor, _processor = _processor, None
    if processor is not None:
        processor.shutdown()


atexit.register(shutdown)


# --- live part (only when ENABLED) ------------------------------------------------------------------


def _random_id(bits: int) -> int:
    """A non-zero id, as the SDK's ``RandomIdGenerator`` draws them (``random`` reseeds after a fork)."""
    while True:
        value = random.getrandbits(bits)
        if value:
            return value


def begin(ctx: RequestContext, headers: dict[bytes, bytes]) -> None:
    """Start the request's trace: the client's ``traceparent`` continues its trace, else a new one."""
    parent: SpanContext | None = None
    raw = headers.get(b"traceparent")
    if raw is not None:
        carrier = {"traceparent": raw.decode("latin-1")}
        state = headers.get(b"tracestate")
        if state is not None:
            carrier["tracestate"] = state.decode("latin-1")
        found = trace_api.get_current_span(_PROPAGATOR.extract(carrier)).get_span_context()
        parent = found if found.is_valid else None
    trace_id = parent.trace_id if parent is not None else _random_id(128)
    parent_context = trace_api.set_span_in_context(NonRecordingSpan(parent)) if parent is not None else None
    decision = _sampler.should_sample(parent_context, trace_id, "request", SpanKind.SERVER)
    ctx.trace = Trace(
        trace_id=trace_id,
        span_id=_random_id(64),
        parent=parent,
        sampled=decision.decision.is_sampled(),
        state=decision.trace_state or (parent.trace_state if parent is not None else None),
    )


def new_attempt(tr: Trace) -> None:
    """An upstream attempt starts: its span id, sent upstream as the ``traceparent`` parent."""
    tr.attempt_ids.append(_random_id(64))


def finish_reasons(tr: Trace, result: dict[str, Any]) -> None:
    """A complete answer's finish reasons (OpenAI ``choices[].finish_reason``, Anthropic ``stop_reason``)."""
    reasons = [c.get("finish_reason") for c in result.get("choices") or () if isinstance(c, dict)]
    reasons.append(result.get("stop_reason"))
    tr.finish_reasons.extend(r for r in reasons if isinstance(r, str) and r)


def stream_item(tr: Trace, item: dict[str, Any]) -> None:
    """A streamed item's finish reason, if it carries one (OpenAI chunks, Anthropic message_delta)."""
    for choice in item.get("choices") or ():
        if isinstance(choice, dict) and isinstance(choice.get("finish_reason"), str):
            tr.finish_reasons.append(choice["finish_reason"])
    delta = item.get("delta")
    if item.get("type") == "message_delta" and isinstance(delta, dict) and isinstance(delta.get("stop_reason"), str):
        tr.finish_reasons.append(delta["stop_reason"])


# --- record time ------------------------------------------------------------------------------------


def export(ctx: RequestContext) -> None:
    """Build the request's spans from what the pipeline recorded and queue them. Never raises."""
    tr = ctx.trace
    if tr is None or not tr.sampled or not ENABLED:
        return
    try:
        processor = _span_processor()
        for span in build_spans(ctx, tr):
            processor.on_end(span)
    except Exception:  # tracing must never break a request
        log.exception("tracing: could not export request %s", ctx.request_id)


def build_spans(ctx: RequestContext, tr: Trace) -> list[ReadableSpan]:
    start_ns = int(ctx.created_at * 1e9)
    end_ms = (time.perf_counter() - ctx.started) * 1000

    def at(ms: float) -> int:
        return start_ns + int(ms * 1_000_000)

    root = SpanContext(tr.trace_id, tr.span_id, is_remote=False, trace_flags=_SAMPLED, trace_state=tr.state)
    spans: list[ReadableSpan] = []

    def child(
        name: str, begin_ms: float, end: float, attributes: dict[str, Any], parent: SpanContext = root, **kw: Any
    ) -> SpanContext:
        context = SpanContext(tr.trace_id, kw.pop("span_id", None) or _random_id(64), False, _SAMPLED, tr.state)
        spans.append(
            ReadableSpan(
                name=name,
                context=context,
                parent=parent,
                resource=_resource,
                attributes=attributes,
                kind=kw.pop("kind", SpanKind.INTERNAL),
                status=kw.pop("status", Status(StatusCode.UNSET)),
                start_time=at(begin_ms),
                end_time=at(max(end, begin_ms)),
                instrumentation_scope=_SCOPE,
            )
        )
        return context

    # Stages, one after another from the request's start (ctx.stage closes each).
    offset = 0.0
    dispatch: SpanContext | None = None
    dispatch_start = 0.0
    for stage, ms in ctx.timings.items():
        attributes = _stage_attributes(ctx, stage)
        context = child(STAGE_SPANS.get(stage, f"chittycan.{stage}"), offset, offset + ms, attributes)
        if stage in ("upstream", "upstream_first_chunk"):
            dispatch, dispatch_start = context, offset
        offset += ms
    child("chittycan.record", offset, end_ms, {})

    # Upstream attempts (the dispatch stage's children).
    calls = [a for a in ctx.attempt_log if a.get("outcome") != "skipped"]
    for attempt, span_id in zip(calls, tr.attempt_ids, strict=False):
        begin_ms = float(attempt.get("start_ms") or dispatch_start)
        child(
            f"{_operation(ctx)} {attempt.get('model', '')}".strip(),
            begin_ms,
            begin_ms + float(attempt.get("ms") or 0.0),
            _attempt_attributes(ctx, attempt),
            parent=dispatch or root,
            span_id=span_id,
            kind=SpanKind.CLIENT,
            status=Status(StatusCode.ERROR, attempt.get("error") or "")
            if attempt.get("outcome") != "ok"
            else Status(StatusCode.UNSET),
        )

    server_error = ctx.http_status >= 500 or ctx.status not in ("ok", "refused", "client_disconnected")
    spans.append(
        ReadableSpan(
            name=f"{_operation(ctx)} {ctx.requested_model}".strip(),
            context=root,
            parent=tr.parent,
            resource=_resource,
            attributes=_request_attributes(ctx, tr),
            kind=SpanKind.SERVER,
            status=Status(StatusCode.ERROR, ctx.error_type) if server_error else Status(StatusCode.UNSET),
            start_time=start_ns,
            end_time=at(end_ms),
            instrumentation_scope=_SCOPE,
        )
    )
    return spans


def _operation(ctx: RequestContext) -> str:
    return OPERATIONS.get(ctx.endpoint, ctx.endpoint)


def _request_attributes(ctx: RequestContext, tr: Trace) -> dict[str, Any]:
    key, usage, deployment = ctx.key, ctx.usage, ctx.deployment
    attributes: dict[str, Any] = {
        gen_ai.GEN_AI_OPERATION_NAME: _operation(ctx),
        gen_ai.GEN_AI_REQUEST_MODEL: ctx.requested_model,
        HTTP_RESPONSE_STATUS_CODE: ctx.http_status,
        "chittycan.request_id": ctx.request_id,
        "chittycan.endpoint": ctx.endpoint,
        "chittycan.stream": ctx.stream,
        "chittycan.outcome": ctx.status,
        "chittycan.cache": ctx.cache_result,
        "chittycan.attempts": ctx.attempts,
        "chittycan.cost_usd": ctx.cost_micro / 1_000_000,
    }
    if key is not None:
        attributes["chittycan.tenant"] = key.tenant.slug
        attributes["chittycan.key_name"] = key.name
    if ctx.route is not None:
        attributes["chittycan.model"] = ctx.route.name
    if deployment is not None:
        attributes[gen_ai.GEN_AI_RESPONSE_MODEL] = deployment.upstream_model
        attributes[gen_ai.GEN_AI_PROVIDER_NAME] = PROVIDER_NAMES.get(deployment.provider.kind, deployment.provider.kind)
        attributes["chittycan.provider"] = deployment.provider.slug
    if usage is not None:
        attributes[gen_ai.GEN_AI_USAGE_INPUT_TOKENS] = usage.prompt_tokens
        attributes[gen_ai.GEN_AI_USAGE_OUTPUT_TOKENS] = usage.completion_tokens
        if usage.cached_tokens:
            attributes[gen_ai.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS] = usage.cached_tokens
        if usage.cache_write_tokens:
            attributes[gen_ai.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS] = usage.cache_write_tokens
        if usage.reasoning_tokens:
            attributes[gen_ai.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS] = usage.reasoning_tokens
    if tr.finish_reasons:
        attributes[gen_ai.GEN_AI_RESPONSE_FINISH_REASONS] = list(dict.fromkeys(tr.finish_reasons))
    if ctx.route_reason:
        attributes["chittycan.route.reason"] = ctx.route_reason
    if ctx.cache_hit:
        attributes["chittycan.cache.saved_usd"] = ctx.saved_micro / 1_000_000
    if ctx.ttft_ms is not None:
        attributes["chittycan.ttft_ms"] = ctx.ttft_ms
    if ctx.error_type:
        attributes[ERROR_TYPE] = ctx.error_type
    return attributes


def _stage_attributes(ctx: RequestContext, stage: str) -> dict[str, Any]:
    if stage == "route" and ctx.route is not None:
        attributes: dict[str, Any] = {
            "chittycan.model": ctx.route.name,
            "chittycan.route.deployments": [
                f"{d.provider.slug}:{d.upstream_model}" for d in ctx.route.ordered_deployments()
            ],
        }
        if ctx.route_reason:
            attributes["chittycan.route.reason"] = ctx.route_reason
        decision = getattr(ctx, "route_decision", None)  # the routing policy's explanation, where built
        if isinstance(decision, str) and decision:
            attributes["chittycan.route.decision"] = decision
        return attributes
    if stage == "cache":
        return {"chittycan.cache": ctx.cache_result}
    if stage in ("upstream", "upstream_first_chunk"):
        return {"chittycan.attempts": ctx.attempts}
    return {}


def _attempt_attributes(ctx: RequestContext, attempt: dict[str, Any]) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        gen_ai.GEN_AI_OPERATION_NAME: _operation(ctx),
        gen_ai.GEN_AI_REQUEST_MODEL: attempt.get("model", ""),
        "chittycan.provider": attempt.get("provider", ""),
        "chittycan.attempt": attempt.get("n", 0),
        "chittycan.attempt.why": attempt.get("why", ""),
    }
    deployment = _deployment(ctx, attempt)
    if deployment is not None:
        kind = deployment.provider.kind
        attributes[gen_ai.GEN_AI_PROVIDER_NAME] = PROVIDER_NAMES.get(kind, kind)
        host = urlsplit(deployment.provider.base_url).hostname
        if host:
            attributes[SERVER_ADDRESS] = host
    if attempt.get("status") is not None:
        attributes[HTTP_RESPONSE_STATUS_CODE] = attempt["status"]
    if attempt.get("error"):
        attributes[ERROR_TYPE] = attempt["error"]
    if attempt.get("outcome") == "ok":
        attributes[gen_ai.GEN_AI_RESPONSE_MODEL] = attempt.get("model", "")
    return attributes


def _deployment(ctx: RequestContext, attempt: dict[str, Any]) -> DeploymentRoute | None:
    if ctx.route is None:
        return None
    for deployment in ctx.route.deployments:
        if deployment.id == attempt.get("deployment_id") and deployment.provider.slug == attempt.get("provider"):
            return deployment
    return None
