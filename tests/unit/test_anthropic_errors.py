"""Anthropic error types and statuses, both ways (no I/O): what is retried, what the client sees."""

from __future__ import annotations

import httpx
import orjson
import pytest

from gateway.errors import AuthenticationFailed, NotFound, QuotaExceeded, RateLimited, UpstreamError
from gateway.providers.base import raise_for_status
from gateway.translate.streams import error_from_event

# (Anthropic error type, HTTP status it comes with, status we answer, retried or failed over)
CASES = [
    ("invalid_request_error", 400, 400, False),
    ("authentication_error", 401, 502, True),  # our upstream credentials: fail over, never the same deployment
    ("billing_error", 402, 402, False),
    ("permission_error", 403, 502, True),
    ("not_found_error", 404, 404, False),
    ("request_too_large", 413, 413, False),
    ("rate_limit_error", 429, 429, True),
    ("api_error", 500, 502, True),
    ("timeout_error", 504, 502, True),
    ("overloaded_error", 529, 502, True),
]


@pytest.mark.parametrize(("kind", "upstream_status", "status", "retryable"), CASES)
def test_in_stream_error_events_map_like_their_http_status(kind, upstream_status, status, retryable):
    err = error_from_event({"type": "error", "error": {"type": kind, "message": "boom"}})
    assert (err.status, err.retryable) == (status, retryable)


@pytest.mark.parametrize(("kind", "upstream_status", "status", "retryable"), CASES)
def test_http_error_bodies_map_to_status_and_retry(kind, upstream_status, status, retryable):
    body = orjson.dumps({"type": "error", "error": {"type": kind, "message": "boom"}, "request_id": "req_1"})
    response = httpx.Response(upstream_status, content=body, headers={"retry-after": "1"})
    with pytest.raises(UpstreamError) as exc:
        raise_for_status(response, body)
    assert (exc.value.status, exc.value.retryable) == (status, retryable)
    assert "boom" in exc.value.message
    if upstream_status not in (401, 403):
        assert exc.value.code == kind  # clients branch on it
    assert exc.value.headers.get("retry-after") == "1"


@pytest.mark.parametrize(
    ("error", "anthropic_type"),
    [
        (AuthenticationFailed("bad key"), "authentication_error"),
        (QuotaExceeded("budget"), "billing_error"),
        (NotFound("no model"), "not_found_error"),
        (RateLimited("slow down"), "rate_limit_error"),
        (UpstreamError("busy", retryable=True), "api_error"),
        (UpstreamError("overloaded", retryable=True, status=529), "overloaded_error"),
    ],
)
def test_gateway_errors_in_the_anthropic_envelope(error, anthropic_type):
    body = error.anthropic_body("req_abc")
    assert body == {
        "type": "error",
        "error": {"type": anthropic_type, "message": error.message},
        "request_id": "req_abc",
    }
