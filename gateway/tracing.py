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

This module imports nothing of OpenTelemetry: the SDK side (``gateway/otel.py``: sampler,
propagator, exporter, the spans) is imported when tracing is turned on or a trace is begun, so a
gateway with tracing off never loads it (about 4 MiB resident and 0.13 s of start-up).

The tree (names and attributes follow the OpenTelemetry GenAI semantic conventions of
``gateway.otel.SEMCONV_SCHEMA``; ChittyCan's own attributes are ``chittycan.*``)::

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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.sampling import Sampler
    from opentelemetry.trace import SpanContext, TraceState

    from gateway.context import RequestContext
    from gateway.otel import Exporter

log = logging.getLogger(__name__)

#: Read on the hot path: tracing is on in this process. Set by ``configure`` (gateway/apps.py).
ENABLED = False


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

_sampler: Sampler | None = None  # None: gateway.otel.DEFAULT_SAMPLER (parentbased_always_on)
_exporter: Exporter | None = None


def configure(enabled: bool) -> None:
    """Turn tracing on or off in this process (the exporter starts with the first exported span)."""
    global ENABLED, _sampler, _exporter
    if not enabled:
        ENABLED = False
        shutdown()
        return
    from gateway import otel  # noqa: PLC0415  (the OpenTelemetry SDK: loaded only when tracing is on)

    _sampler = sampler_from_env()
    shutdown()
    _exporter = otel.Exporter(otlp_endpoint, _random_id)
    ENABLED = True


def sampler_from_env() -> Sampler:
    """``OTEL_TRACES_SAMPLER`` (default ``parentbased_always_on``) and ``OTEL_TRACES_SAMPLER_ARG``."""
    from gateway import otel  # noqa: PLC0415  (the OpenTelemetry SDK: loaded only when tracing is on)

    name = os.environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    try:
        ratio = float(os.environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))
    except ValueError:
        log.warning("OTEL_TRACES_SAMPLER_ARG is not a number; sampling everything")
        ratio = 1.0
    chosen = otel.sampler(name, ratio)
    if chosen is None:
        log.warning("OTEL_TRACES_SAMPLER=%s is not supported; using parentbased_always_on", name)
        return otel.DEFAULT_SAMPLER
    return chosen


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
    return _exporter.flush(timeout_ms) if _exporter is not None else True


def shutdown() -> None:
    global _exporter
    exporter, _exporter = _exporter, None
    if exporter is not None:
        exporter.shutdown()


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
    from gateway import otel  # noqa: PLC0415  (the OpenTelemetry SDK: loaded only when tracing is on)

    parent = otel.remote_parent(headers)
    trace_id = parent.trace_id if parent is not None else _random_id(128)
    sampled, state = otel.decide(_sampler or otel.DEFAULT_SAMPLER, parent, trace_id)
    ctx.trace = Trace(trace_id=trace_id, span_id=_random_id(64), parent=parent, sampled=sampled, state=state)


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
    tr, exporter = ctx.trace, _exporter
    if tr is None or not tr.sampled or not ENABLED or exporter is None:
        return
    try:
        exporter.export(ctx, tr)
    except Exception:  # tracing must never break a request
        log.exception("tracing: could not export request %s", ctx.request_id)
