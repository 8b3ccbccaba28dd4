"""The OpenTelemetry side of ``gateway.tracing``: the SDK's sampler, propagator and exporter, and
the spans a traced request becomes.

The SDK's tracing side, the OTLP exporter (protobuf) and the semantic conventions take about
4 MiB resident and 0.13 s to import on top of what redis-py already imports (the OTel metrics
API); tracing is off by default, so ``gateway.tracing`` (what the request path imports) loads this
module only when tracing is turned on (``configure``) or a trace is begun.
This module never imports ``gateway.tracing``: the request's ``Trace`` is passed in.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
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
    from gateway.tracing import Trace

#: The semantic conventions followed: 1.44.0, as the pinned opentelemetry-semantic-conventions
#: 0.66b2 carries them (its attribute constants are used below). The GenAI ones are "development"
#: status: names may change in a later version; the pin keeps them fixed here.
SEMCONV_SCHEMA = Schemas.V1_44_0.value

_SCOPE = InstrumentationScope("chittycan.gateway", schema_url=SEMCONV_SCHEMA)
_PROPAGATOR = TraceContextTextMapPropagator()
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)

#: The sampler when ``OTEL_TRACES_SAMPLER`` says nothing: the client's decision, else sample.
DEFAULT_SAMPLER: Sampler = ParentBased(ALWAYS_ON)

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


def sampler(name: str, ratio: float) -> Sampler | None:
    """The SDK sampler an ``OTEL_TRACES_SAMPLER`` name stands for (None: not one we support)."""
    samplers: dict[str, Sampler] = {
        "always_on": ALWAYS_ON,
        "always_off": ALWAYS_OFF,
        "traceidratio": TraceIdRatioBased(ratio),
        "parentbased_always_on": DEFAULT_SAMPLER,
        "parentbased_always_off": ParentBased(ALWAYS_OFF),
        "parentbased_traceidratio": ParentBased(TraceIdRatioBased(ratio)),
    }
    return samplers.get(name)


def remote_parent(headers: dict[bytes, bytes]) -> SpanContext | None:
    """The client's span from its W3C ``traceparent`` (and ``tracestate``); None when absent or malformed."""
    raw = headers.get(b"traceparent")
    if raw is None:
        return None
    carrier = {"traceparent": raw.decode("latin-1")}
    state = headers.get(b"tracestate")
    if state is not None:
        carrier["tracestate"] = state.decode("latin-1")
    found = trace_api.get_current_span(_PROPAGATOR.extract(carrier)).get_span_context()
    return found if found.is_valid else None


def decide(chosen: Sampler, parent: SpanContext | None, trace_id: int) -> tuple[bool, TraceState | None]:
    """The sampling decision for a new request span: (sampled, the trace state to carry on)."""
    parent_context = trace_api.set_span_in_context(NonRecordingSpan(parent)) if parent is not None else None
    decision = chosen.should_sample(parent_context, trace_id, "request", SpanKind.SERVER)
    return decision.decision.is_sampled(), decision.trace_state or (parent.trace_state if parent is not None else None)


class Exporter:
    """The resource and this process's span processor (created on first use, again after a fork)."""

    def __init__(self, endpoint: Callable[[], str | None], random_id: Callable[[int], int]) -> None:
        self.resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME") or "chittycan"})
        self._endpoint = endpoint
        self._random_id = random_id
        self._lock = threading.Lock()
        self._processor: BatchSpanProcessor | None = None
        self._pid = 0

    def processor(self) -> BatchSpanProcessor:
        pid = os.getpid()
        if self._processor is None or self._pid != pid:
            with self._lock:
                if self._processor is None or self._pid != pid:
                    self._processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=self._endpoint()))
                    self._pid = pid
        return self._processor

    def export(self, ctx: RequestContext, tr: Trace) -> None:
        processor = self.processor()
        for span in build_spans(ctx, tr, self.resource, self._random_id):
            processor.on_end(span)

    def flush(self, timeout_ms: int) -> bool:
        return self._processor.force_flush(timeout_ms) if self._processor is not None else True

    def shutdown(self) -> None:
        processor, self._processor = self._processor, None
        if processor is not None:
            processor.shutdown()


def build_spans(
    ctx: RequestContext, tr: Trace, resource: Resource, random_id: Callable[[int], int]
) -> list[ReadableSpan]:
    start_ns = int(ctx.created_at * 1e9)
    end_ms = (time.perf_counter() - ctx.started) * 1000

    def at(ms: float) -> int:
        return start_ns + int(ms * 1_000_000)

    root = SpanContext(tr.trace_id, tr.span_id, is_remote=False, trace_flags=_SAMPLED, trace_state=tr.state)
    spans: list[ReadableSpan] = []

    def child(
        name: str, begin_ms: float, end: float, attributes: dict[str, Any], parent: SpanContext = root, **kw: Any
    ) -> SpanContext:
        context = SpanContext(tr.trace_id, kw.pop("span_id", None) or random_id(64), False, _SAMPLED, tr.state)
        spans.append(
            ReadableSpan(
                name=name,
                context=context,
                parent=parent,
                resource=resource,
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
            resource=resource,
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
