"""gateway/tracing.py without a server: the client's ``traceparent``, the header sent upstream, the
sampler and endpoint from the standard OTEL_* variables, finish reasons."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

from gateway import tracing
from gateway.context import RequestContext

PARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture(autouse=True)
def _sampler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    monkeypatch.setattr(tracing, "_sampler", tracing.sampler_from_env())


def test_a_client_traceparent_is_continued_and_sent_on():
    ctx = RequestContext(request_id="req_1", endpoint="chat")
    tracing.begin(ctx, {b"traceparent": PARENT, b"tracestate": b"vendor=abc"})
    tr = ctx.trace
    assert tr is not None and tr.sampled
    assert tr.trace_id_hex == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert tr.parent is not None and tr.parent.span_id == 0x00F067AA0BA902B7 and tr.parent.is_remote
    tracing.new_attempt(tr)
    tracing.new_attempt(tr)
    headers = tr.upstream_headers()
    assert headers == {
        "traceparent": f"00-4bf92f3577b34da6a3ce929d0e0e4736-{tr.attempt_ids[-1]:016x}-01",
        "tracestate": "vendor=abc",
    }
    assert tr.attempt_ids[0] != tr.attempt_ids[1] != tr.span_id


@pytest.mark.parametrize(
    "header",
    [
        b"garbage",
        b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # all-zero span id
        b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # version ff is invalid
    ],
)
def test_an_invalid_traceparent_starts_a_new_trace(header):
    ctx = RequestContext(request_id="req_2", endpoint="chat")
    tracing.begin(ctx, {b"traceparent": header})
    assert ctx.trace is not None and ctx.trace.parent is None and ctx.trace.sampled
    assert ctx.trace.trace_id_hex != "4bf92f3577b34da6a3ce929d0e0e4736"


def test_sampler_and_endpoint_from_the_environment(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    assert tracing.sampler_from_env() is ALWAYS_OFF
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    sampler = tracing.sampler_from_env()
    assert isinstance(sampler, ParentBased) and "0.25" in sampler.get_description()
    monkeypatch.setattr(tracing, "_sampler", tracing.sampler_from_env())
    ctx = RequestContext(request_id="req_3", endpoint="chat")
    tracing.begin(ctx, {b"traceparent": PARENT})  # a sampled parent wins over the ratio
    assert ctx.trace is not None and ctx.trace.sampled

    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://tempo:4318/")
    assert tracing.otlp_endpoint() == "http://tempo:4318/v1/traces"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "")  # empty (compose) counts as unset
    assert tracing.otlp_endpoint() == "http://tempo:4318/v1/traces"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://x/api/public/otel/v1/traces")
    assert tracing.otlp_endpoint() == "https://x/api/public/otel/v1/traces"


def test_finish_reasons_of_answers_and_streams():
    tr = tracing.Trace(trace_id=1, span_id=2, parent=None, sampled=True)
    tracing.finish_reasons(tr, {"choices": [{"finish_reason": "stop"}, {"finish_reason": "length"}]})
    tracing.finish_reasons(tr, {"type": "message", "stop_reason": "end_turn"})
    tracing.stream_item(tr, {"choices": [{"delta": {}, "finish_reason": None}]})
    tracing.stream_item(tr, {"choices": [{"delta": {}, "finish_reason": "tool_calls"}]})
    tracing.stream_item(tr, {"type": "message_delta", "delta": {"stop_reason": "max_tokens"}})
    assert tr.finish_reasons == ["stop", "length", "end_turn", "tool_calls", "max_tokens"]
