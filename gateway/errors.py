"""Errors the gateway returns, and how each leaves on the wire.

Every error a client can see is a ``GatewayError``:

- GatewayError(status, message, type, code, param)
  - InvalidRequest            400 invalid_request_error (bad body, bad parameter)
  - AuthenticationFailed      401 invalid_api_key
  - PermissionDenied          403 model or endpoint outside the key's scopes
  - NotFound                  404 model_not_found
  - PayloadTooLarge           413 request_too_large
  - QuotaExceeded             402 insufficient_quota (hard budget or plan quota; never retried)
  - RateLimited               429 rate_limit_exceeded (with retry-after)
  - ServiceUnavailable        503 (our own dependency is down; with retry-after)
  - UpstreamError             the provider failed; status mirrors it (5xx as 502 unless it
                              is a client error we pass on). ``retryable`` steers retry and
                              fallback: only retryable errors are retried or failed over.

``openai_body()`` renders the OpenAI envelope; ``anthropic_body()`` the Anthropic one, used on
``/v1/messages``.
"""

from __future__ import annotations

from typing import Any

_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


class GatewayError(Exception):
    status = 500
    type = "server_error"
    code: str | None = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        if code is not None:
            self.code = code
        self.param = param
        self.headers: dict[str, str] = dict(headers or {})

    def openai_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def anthropic_body(self, request_id: str = "") -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": "error",
            "error": {"type": _ANTHROPIC_TYPES.get(self.status, "api_error"), "message": self.message},
        }
        if request_id:
            body["request_id"] = request_id
        return body


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class QuotaExceeded(GatewayError):
    status = 402
    type = "insufficient_quota"
    code = "insufficient_quota"

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.headers.setdefault("x-should-retry", "false")


class RateLimited(GatewayError):
    status = 429
    type = "requests"
    code = "rate_limit_exceeded"


class ServiceUnavailable(GatewayError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


class UpstreamError(GatewayError):
    """The provider answered with an error or could not be reached."""

    status = 502
    type = "upstream_error"
    code = "upstream_error"
    upstream_status: int | None = None  # the provider's own HTTP status, when it answered with one

    def __init__(self, message: str, *, retryable: bool, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retryable = retryable


def upstream_status_error(status: int, message: str, *, code: str | None = None) -> UpstreamError:
    """The error for a provider's HTTP error status (``_status_error``), keeping that status."""
    err = _status_error(status, message, code=code)
    err.upstream_status = status
    return err


def _status_error(status: int, message: str, *, code: str | None = None) -> UpstreamError:
    """Map a provider's HTTP error status to what the client gets and whether to retry.

    Client errors the provider blames on the request (400, 404, 413, 422) pass through with their
    status: retrying or failing over would not help. Auth problems with *our* provider credentials
    (401/403) are a gateway misconfiguration: 502, not retryable on the same deployment but worth
    failing over. 408/409/429/5xx/529 are retryable.
    """
    if status in (400, 404, 413, 422):
        return UpstreamError(
            message, retryable=False, status=status, type="invalid_request_error", code=code or "upstream_rejected"
        )
    if status in (401, 403):
        return UpstreamError(
            f"upstream rejected the gateway's credentials: {message}",
            retryable=True,
            status=502,
            code="upstream_auth_failed",
        )
    if status == 429:
        return UpstreamError(message, retryable=True, status=429, type="requests", code=code or "rate_limit_exceeded")
    retryable = status in (408, 409) or status >= 500
    return UpstreamError(message, retryable=retryable, status=502 if status >= 500 else status, code=code)
