"""OpenTelemetry traces (gateway/tracing.py): exported over OTLP/HTTP to a fake receiver on loopback
that decodes the protobuf; the span tree and its GenAI attributes for a non-stream, a stream, a
fallback and a cached request; W3C ``traceparent`` from the client and on to the upstream."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway import catalog, tracing
from gateway.models import LLMModel, Provider
from tests.conftest import exact_usage, wait_usage
from tests.fakes.openai_upstream import Reply
from tests.fakes.otlp_receiver import FakeOTLP, Span
from tests.fakes.server import ServerThread

CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hello there"}]
SERVER, CLIENT = 2, 3  # OTLP span kinds
ERROR = 2  # OTLP status code
STAGES = {
    "chittycan.parse",
    "chittycan.auth",
    "chittycan.route",
    "chittycan.limit",
    "chittycan.reserve",
    "chittycan.dispatch",
    "chittycan.relay",
    "chittycan.settle",
    "chittycan.record",
}
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[FakeOTLP, ServerThread]]:
    app = FakeOTLP()
    server = ServerThread(app, name="fake-otlp").start()
    yield app, server
    server.stop()


@pytest.fixture
def otlp(receiver: tuple[FakeOTLP, ServerThread], monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOTLP]:
    """Tracing on in the in-process gateway, exporting to the fake receiver (the standard OTEL_* env)."""
    app, server = receiver
    app.reset()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"{server.url}/v1/traces")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "chittycan-test")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    tracing.configure(True)
    yield app
    tracing.configure(False)


def post(gateway: Any, key: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(f"{gateway.url}{CHAT}", json=body, headers={"authorization": f"Bearer {key}", **headers})


def wait_trace(app: FakeOTLP, request_id: str, timeout: float = 10.0) -> tuple[Span, list[Span]]:
    """The request's span and every span of its trace, once the receiver has them."""
    deadline = time.monotonic() + timeout
    while True:
        tracing.flush()
        roots = [s for s in list(app.spans) if s.attributes.get("chittycan.request_id") == request_id]
        if roots:
            assert len(roots) == 1
            return roots[0], app.trace(roots[0].trace_id)
        assert time.monotonic() < deadline, f"no spans for {request_id}"
        time.sleep(0.05)


def children(spans: list[Span], parent: Span) -> list[Span]:
    return sorted((s for s in spans if s.parent_id == parent.span_id), key=lambda s: s.start_ns)


def one(spans: list[Span], name: str) -> Span:
    [span] = [s for s in spans if s.name == name]
    return span


def test_non_stream_span_tree_attributes_and_traceparent(upstream, gateway_server, tenant_key, otlp, caplog):
    caplog.set_level(logging.INFO, logger="chittycan.requests")
    tenant, key = tenant_key
    res = post(
        gateway_server, key, {"model": "gpt-4o", "messages": MSG}, traceparent=f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    )
    assert res.status_code == 200, res.text
    request_id = res.headers["x-request-id"]
    root, spans = wait_trace(otlp, request_id)
    [row] = exact_usage(tenant, 1, settle=0)

    # The client's trace continues: same trace id, the client's span is the request span's parent.
    assert root.trace_id == CLIENT_TRACE and root.parent_id == CLIENT_SPAN
    assert root.kind == SERVER and root.name == "chat gpt-4o"
    assert root.resource["service.name"] == "chittycan-test"
    assert root.scope == "chittycan.gateway" and root.schema_url.endswith("/1.44.0")
    a = root.attributes
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == "gpt-4o"
    assert a["gen_ai.response.model"] == "gpt-4o-2024-08-06"
    assert a["gen_ai.provider.name"] == "openai" and a["chittycan.provider"] == "fake-openai"
    assert a["gen_ai.usage.input_tokens"] == row.prompt_tokens == 10
    assert a["gen_ai.usage.output_tokens"] == row.completion_tokens == 7
    assert a["gen_ai.response.finish_reasons"] == ["stop"]
    assert a["chittycan.tenant"] == "acme" and a["chittycan.key_name"] == "test"
    assert a["chittycan.cost_usd"] == pytest.approx(row.cost_micro / 1_000_000) and row.cost_micro > 0
    assert a["http.response.status_code"] == 200 and "error.type" not in a

    # One span per stage, in order, inside the request span; the attempt inside dispatch.
    stages = children(spans, root)
    assert {s.name for s in stages} == STAGES
    assert [s.name for s in stages][:3] == ["chittycan.parse", "chittycan.auth", "chittycan.route"]
    assert stages[-1].name == "chittycan.record"
    for before, after in zip(stages, stages[1:], strict=False):
        assert before.end_ns <= after.start_ns + 1000  # sequential (rounding to the microsecond)
    assert all(root.start_ns <= s.start_ns <= s.end_ns <= root.end_ns + 1000 for s in spans)
    assert one(stages, "chittycan.route").attributes["chittycan.route.deployments"] == ["fake-openai:gpt-4o-2024-08-06"]
    dispatch = one(stages, "chittycan.dispatch")
    [attempt] = children(spans, dispatch)
    assert attempt.kind == CLIENT and attempt.name == "chat gpt-4o-2024-08-06"
    assert attempt.attributes["gen_ai.provider.name"] == "openai"
    assert attempt.attributes["server.address"] == "127.0.0.1"
    assert attempt.attributes["http.response.status_code"] == 200
    assert dispatch.start_ns <= attempt.start_ns <= attempt.end_ns <= dispatch.end_ns + 1000

    # The upstream saw the attempt's span as its parent, in the client's trace.
    [sent] = [r for r in upstream.requests if r.path == CHAT]
    assert sent.headers["traceparent"] == f"00-{CLIENT_TRACE}-{attempt.span_id}-01"
    # The trace id joins the request's log line.
    [line] = [r for r in caplog.records if r.name == "chittycan.requests" and r.request_id == request_id]
    assert line.trace_id == CLIENT_TRACE


def test_stream_spans(upstream, gateway_server, openai_client, tenant_key, otlp):
    raw = openai_client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MSG, stream=True, stream_options={"include_usage": True}
    )
    request_id = raw.headers["x-request-id"]
    chunks = list(raw.parse())
    assert chunks[-1].usage is not None
    root, spans = wait_trace(otlp, request_id)
    [row] = exact_usage(tenant_key[0], 1, settle=0)
    assert root.parent_id == "" and len(root.trace_id) == 32  # no client traceparent: a new trace
    a = root.attributes
    assert a["chittycan.stream"] is True
    assert a["gen_ai.response.finish_reasons"] == ["stop"]
    assert (
        a["gen_ai.usage.input_tokens"] == row.prompt_tokens and a["gen_ai.usage.output_tokens"] == row.completion_tokens
    )
    assert a["chittycan.ttft_ms"] == row.ttft_ms
    stages = children(spans, root)
    assert {s.name for s in stages} == STAGES
    [attempt] = children(spans, one(stages, "chittycan.dispatch"))
    [sent] = [r for r in upstream.requests if r.path == CHAT]
    assert sent.headers["traceparent"] == f"00-{root.trace_id}-{attempt.span_id}-01"


def test_fallback_has_two_attempt_spans(upstream, fake_openai, gateway_server, tenant_key, otlp):
    primary = Provider.objects.get(slug="fake-openai")
    primary.max_retries = 0
    primary.save()
    backup = Provider.objects.create(
        slug="backup-openai", kind="openai", base_url=f"{fake_openai[1].url}/backup/v1", max_retries=0
    )
    LLMModel.objects.get(name="gpt-4o").deployments.create(provider=backup, upstream_model="gpt-4o-b", priority=1)
    upstream.push(CHAT, Reply(status=500, json={"error": {"message": "boom", "type": "server_error", "code": None}}))
    res = post(gateway_server, tenant_key[1], {"model": "gpt-4o", "messages": MSG})
    assert res.status_code == 200, res.text
    request_id = res.headers["x-request-id"]
    root, spans = wait_trace(otlp, request_id)

    assert root.attributes["chittycan.provider"] == "backup-openai"
    assert root.attributes["chittycan.route.reason"] == "fallback:1"
    assert root.attributes["chittycan.attempts"] == 2
    dispatch = one(children(spans, root), "chittycan.dispatch")
    first, second = children(spans, dispatch)
    assert first.kind == second.kind == CLIENT
    assert first.status_code == ERROR and first.attributes["http.response.status_code"] == 500
    assert (
        first.attributes["chittycan.provider"] == "fake-openai"
        and first.attributes["chittycan.attempt.why"] == "primary"
    )
    assert first.attributes["error.type"]
    assert second.status_code != ERROR and second.attributes["chittycan.provider"] == "backup-openai"
    assert second.attributes["chittycan.attempt.why"].startswith("fallback after 500")
    assert second.attributes["gen_ai.response.model"] == "gpt-4o-b"
    assert first.end_ns <= second.start_ns
    # Each upstream request carried its own attempt's span id.
    sent = [r for r in upstream.requests if r.path.endswith("/chat/completions")]
    assert [r.path for r in sent] == [CHAT, "/backup/v1/chat/completions"]
    assert [r.headers["traceparent"].split("-")[2] for r in sent] == [first.span_id, second.span_id]

    # The same attempts are in the ledger and the request log API.
    [row] = wait_usage(1, request_id=request_id)
    assert [(a["provider"], a["outcome"], a["status"]) for a in row.attempts] == [
        ("fake-openai", "error", 500),
        ("backup-openai", "ok", 200),
    ]
    detail = httpx.get(
        f"{gateway_server.url}/api/requests/{request_id}", headers={"Authorization": f"Bearer {tenant_key[1]}"}
    ).json()
    assert [a["provider"] for a in detail["attempts"]] == ["fake-openai", "backup-openai"]
    assert detail["attempts"][1]["why"].startswith("fallback after 500")
    assert "route" in detail["timings_ms"] and "upstream" in detail["timings_ms"]


def test_cached_request_spans(upstream, gateway_server, tenant_key, otlp):
    model = LLMModel.objects.get(name="gpt-4o")
    catalog.model_update(model, cache_enabled=True, cache_ttl=600)
    body = {"model": "gpt-4o", "messages": MSG}
    assert post(gateway_server, tenant_key[1], body).headers["x-chittycan-cache"] == "MISS"
    hit = post(gateway_server, tenant_key[1], body)
    assert hit.headers["x-chittycan-cache"] == "HIT"
    root, spans = wait_trace(otlp, hit.headers["x-request-id"])
    row = wait_usage(1, request_id=hit.headers["x-request-id"])[0]
    assert row.cache_hit and row.saved_micro > 0
    a = root.attributes
    assert a["chittycan.cache"] == "hit" and a["chittycan.cost_usd"] == 0
    assert a["chittycan.cache.saved_usd"] == pytest.approx(row.saved_micro / 1_000_000)
    assert a["gen_ai.usage.input_tokens"] == 10
    names = [s.name for s in children(spans, root)]
    assert "chittycan.cache" in names and "chittycan.relay" in names
    assert "chittycan.dispatch" not in names and "chittycan.reserve" not in names
    assert not [s for s in spans if s.kind == CLIENT]  # no upstream call
    assert len([r for r in upstream.requests if r.path == CHAT]) == 1


def test_unsampled_parent_is_propagated_not_exported(upstream, gateway_server, tenant_key, otlp):
    off = post(
        gateway_server,
        tenant_key[1],
        {"model": "gpt-4o", "messages": MSG},
        traceparent=f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00",
    )
    assert off.status_code == 200
    [sent] = [r for r in upstream.requests if r.path == CHAT]
    version, trace_id, span_id, flags = sent.headers["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", CLIENT_TRACE, "00") and span_id != CLIENT_SPAN
    on = post(gateway_server, tenant_key[1], {"model": "gpt-4o", "messages": MSG}, traceparent="garbage")
    root, _ = wait_trace(otlp, on.headers["x-request-id"])
    assert root.parent_id == "" and root.trace_id != CLIENT_TRACE  # a malformed header starts a new trace
    assert not [s for s in otlp.spans if s.attributes.get("chittycan.request_id") == off.headers["x-request-id"]]
    assert not otlp.trace(CLIENT_TRACE)


def test_refused_request_is_traced(gateway_server, transactional_db, otlp):
    res = httpx.post(
        f"{gateway_server.url}{CHAT}",
        headers={"authorization": "Bearer sk-not-a-key"},
        json={"model": "gpt-4o", "messages": MSG},
    )
    assert res.status_code == 401
    root, spans = wait_trace(otlp, res.headers["x-request-id"])
    assert root.attributes["http.response.status_code"] == 401
    assert root.attributes["error.type"] == "invalid_request_error"  # OpenAI's type for a bad key
    assert root.status_code != ERROR  # a 4xx is the client's error, not the server span's
    assert [s.name for s in children(spans, root)] == ["chittycan.parse", "chittycan.record"]


def test_off_by_default_nothing_is_traced_or_propagated(upstream, gateway_server, tenant_key, caplog):
    caplog.set_level(logging.INFO, logger="chittycan.requests")
    assert tracing.ENABLED is False
    res = post(
        gateway_server,
        tenant_key[1],
        {"model": "gpt-4o", "messages": MSG},
        traceparent=f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01",
    )
    assert res.status_code == 200
    [sent] = [r for r in upstream.requests if r.path == CHAT]
    assert "traceparent" not in sent.headers
    wait_usage(1, request_id=res.headers["x-request-id"])  # the log line follows the ledger hand-off
    [line] = [
        r for r in caplog.records if r.name == "chittycan.requests" and r.request_id == res.headers["x-request-id"]
    ]
    assert not hasattr(line, "trace_id")
