"""A fake Stripe API on loopback: ``POST /v1/billing/meter_events`` (form-encoded, as the ``stripe``
library sends it), enough of Stripe's behaviour to test exactly-once delivery:

- Bearer auth with an ``sk_test_``/``rk_test_`` key, else 401 like Stripe.
- Validation: event_name, payload[stripe_customer_id], payload[value] (a non-negative number with
  at most 15 significant digits), timestamp within the past 35 days / 5 minutes ahead -> 400
  ``invalid_request_error`` with ``stripe-should-retry: false``.
- ``Idempotency-Key``: the first response that executed (200) is saved and replayed for the same
  key with the same parameters (``idempotent-replayed: true``); other parameters -> 400
  ``idempotency_error``.
- ``identifier`` dedupe: a second event with a known identifier -> 400 "An event already exists
  with identifier ...", as Stripe answers.
- Faults, consumed in order by the next requests: ``pass`` (none: to aim at a later request),
  ``hang`` (record the event and save the idempotent response, then hold the request until
  ``release()``: a response lost in flight or a pusher killed mid-request) and ``error`` (answer
  ``status`` before recording anything).

``events`` lists every recorded event; ``requests`` every request seen.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

MAX_AGE = 35 * 86400
MAX_FUTURE = 300


@dataclass
class Fault:
    kind: str  # "pass" | "hang" | "error"
    status: int = 500
    should_retry: bool | None = None


@dataclass
class FakeStripe:
    events: list[dict[str, Any]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    idempotency: dict[str, tuple[str, int, bytes]] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    hanging: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._release = threading.Event()

    def reset(self) -> None:
        with self._lock:
            self.events.clear()
            self.requests.clear()
            self.idempotency.clear()
            self.faults.clear()
            self.hanging = 0
        self._release.set()
        self._release = threading.Event()

    def add_fault(self, kind: str, *, status: int = 500, should_retry: bool | None = None, times: int = 1) -> None:
        with self._lock:
            self.faults.extend(Fault(kind, status, should_retry) for _ in range(times))

    def release(self) -> None:
        self._release.set()

    def identifiers(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for event in self.events:
            counts[event["identifier"]] = counts.get(event["identifier"], 0) + 1
        return counts

    def total_value(self) -> int:
        return sum(int(e["payload"]["value"]) for e in self.events)

    # --- ASGI -------------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        status, extra, payload = await self._handle(scope["method"], scope["path"], headers, body)
        out = [(b"content-type", b"application/json"), (b"request-id", b"req_fake")]
        out += [(k.encode(), v.encode()) for k, v in extra.items()]
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": payload})

    async def _handle(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        form = dict(parse_qsl(body.decode(), keep_blank_values=True))
        key = headers.get("idempotency-key", "")
        with self._lock:
            self.requests.append({"method": method, "path": path, "form": form, "idempotency_key": key})
        auth = headers.get("authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:].startswith(("sk_test_", "rk_test_")):
            return _error(401, "invalid_request_error", "Invalid API Key provided.")
        if method != "POST" or path != "/v1/billing/meter_events":
            return _error(404, "invalid_request_error", f"Unrecognized request URL ({method}: {path}).")

        fault: Fault | None = None
        with self._lock:
            if self.faults:
                fault = self.faults.pop(0)
        if fault is not None and fault.kind == "error":
            retry = {} if fault.should_retry is None else {"stripe-should-retry": str(fault.should_retry).lower()}
            return _error(fault.status, "api_error", "Injected failure", extra=retry)

        fingerprint = json.dumps(form, sort_keys=True)
        with self._lock:
            if key and key in self.idempotency:
                saved_fp, saved_status, saved_body = self.idempotency[key]
                if saved_fp != fingerprint:
                    return _error(
                        400,
                        "idempotency_error",
                        "Keys for idempotent requests can only be used with the same parameters they were first "
                        "used with.",
                    )
                return saved_status, {"idempotent-replayed": "true", "idempotency-key": key}, saved_body

        problem = _validate(form)
        if problem:
            return _error(400, "invalid_request_error", problem[1], param=problem[0])

        with self._lock:
            identifier = form.get("identifier") or f"fake_{len(self.events) + 1}"
            if any(e["identifier"] == identifier for e in self.events):
                return _error(
                    400,
                    "invalid_request_error",
                    f"An event already exists with identifier {identifier}.",
                    param="identifier",
                )
            event = {
                "object": "billing.meter_event",
                "created": int(time.time()),
                "event_name": form["event_name"],
                "identifier": identifier,
                "livemode": False,
                "payload": {k[8:-1]: v for k, v in form.items() if k.startswith("payload[")},
                "timestamp": int(form.get("timestamp") or time.time()),
            }
            self.events.append(event)
            data = json.dumps(event).encode()
            if key:
                self.idempotency[key] = (fingerprint, 200, data)
        if fault is not None and fault.kind == "hang":
            with self._lock:
                self.hanging += 1
            release = self._release
            await asyncio.get_running_loop().run_in_executor(None, release.wait, 30)
        return 200, {"idempotency-key": key} if key else {}, data


def _validate(form: dict[str, str]) -> tuple[str, str] | None:
    if not form.get("event_name"):
        return "event_name", "Missing required param: event_name."
    if not form.get("payload[stripe_customer_id]", "").startswith("cus_"):
        return "payload[stripe_customer_id]", "payload[stripe_customer_id] must be a customer id (cus_...)."
    value = form.get("payload[value]", "")
    try:
        number = float(value)
    except ValueError:
        return "payload[value]", f"Invalid value: {value!r}."
    digits = value.lstrip("-").replace(".", "").lstrip("0")
    if number < 0:
        return "payload[value]", "The value in the event payload must be non-negative."
    if len(digits) > 15:
        return "payload[value]", f"The value in the event payload can have at most 15 digits. Received {value}."
    if "timestamp" in form:
        try:
            ts = int(form["timestamp"])
        except ValueError:
            return "timestamp", "Invalid integer."
        now = int(time.time())
        if ts < now - MAX_AGE or ts > now + MAX_FUTURE:
            return "timestamp", "Timestamp must be within the past 35 calendar days or up to 5 minutes in the future."
    return None


def _error(
    status: int, kind: str, message: str, *, param: str = "", extra: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    err: dict[str, Any] = {"type": kind, "message": message}
    if param:
        err["param"] = param
    headers = {"stripe-should-retry": "false"} if status < 500 and status not in (409, 429) else {}
    headers.update(extra or {})
    return status, headers, json.dumps({"error": err}).encode()
