"""What a request carries through the pipeline stages, and how the pipeline writes to the client."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from core.money import Usage
from gateway import tokens

if TYPE_CHECKING:
    from budgets.counters import Reservation
    from core.runtime import RedisBatch
    from gateway.cache import Entry
    from gateway.cache.coalesce import Flight
    from gateway.cache.semantic import Probe
    from gateway.limits import RatePlan, RateTicket
    from gateway.routing.table import DeploymentRoute, ModelRoute
    from gateway.tracing import Trace
    from tenants.keyinfo import KeyInfo


Headers = list[tuple[bytes, bytes]]


class Responder(Protocol):
    """How the pipeline writes to the client (implemented by the consumer)."""

    headers: dict[bytes, bytes]

    async def send_json(self, status: int, body: bytes, headers: Headers) -> None: ...
    async def start_stream(self, headers: Headers) -> None: ...
    async def write(self, data: bytes) -> None: ...
    async def finish(self) -> None: ...


@dataclass(slots=True)
class RequestContext:
    request_id: str
    endpoint: str  # chat | completions | embeddings | messages | responses | images | ... (docs/media.md)
    started: float = field(default_factory=time.perf_counter)
    created_at: float = field(default_factory=time.time)
    body: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    client_wants_usage: bool = False
    requested_model: str = ""
    end_user: str = ""
    key: KeyInfo | None = None
    route: ModelRoute | None = None
    deployment: DeploymentRoute | None = None
    passthrough_key: str = ""
    # Filled while dispatching and relaying.
    usage: Usage | None = None
    cost_micro: int = 0
    reserved_micro: int = 0
    rate_plan: RatePlan | None = None  # the rate windows to take in Redis with the reservation
    rate_ticket: RateTicket | None = None  # what the rate limiter took (given back at settle)
    reservation: Reservation | None = None  # the budget reservation (settled to the actual cost)
    closing: RedisBatch | None = None  # settle's Redis commands, sent by record with the ledger hand-off
    reached_provider: bool = False
    status: str = "ok"
    http_status: int = 200
    error_type: str = ""
    ttft_ms: int | None = None
    attempts: int = 0
    attempt_log: list[dict[str, Any]] = field(default_factory=list)  # each upstream attempt (ledger ``attempts``)
    trace: Trace | None = None  # set only when tracing is on (gateway.tracing)
    route_reason: str = ""  # dispatch: primary | fallback:N (...)
    # dispatch: the half-open breaker probe a stream holds (a ``breaker.Admission``); the relay
    # settles it at the stream's end (a clean end closes the breaker, a failure reopens it).
    stream_probe: Any = None
    route_header: str = ""  # the routing policy's summary for X-ChittyCan-Route (rule=...; model=...)
    route_explanation: dict[str, Any] = field(default_factory=dict)  # why this model (the ledger's `route`)
    experiment: str = ""  # the routing experiment that assigned this request (its slug) ...
    arm: str = ""  # ... and the arm
    tags: tuple[str, ...] = ()  # X-ChittyCan-Tags, plus any a routing policy added
    cache_hit: bool = False
    cache_result: str = "none"  # hit | miss | bypass | none (the cache is off for the model)
    cache_entry: Entry | None = None  # the cached answer a hit serves
    cache_digest: str = ""  # the request's cache key digest, when the answer may be stored
    cache_ttl: int = 0  # seconds a stored answer is kept (0: the answer is not stored)
    cache_items: list[dict[str, Any]] | None = None  # a streamed miss's items, recorded as relayed
    saved_micro: int = 0  # a hit: what the answer would have cost
    semantic: Probe | None = None  # the embedded prompt, stored with the answer (the semantic cache)
    cache_space: str = ""  # whose entries the request reads and writes (docs/caching.md, scopes)
    cache_flight: Flight | None = None  # coalescing: the flight this request leads or follows
    cache_follow: Any = None  # a streamed follower's reader of its leader's messages
    coalesced: bool = False  # answered from an identical in-flight request's upstream call
    estimated_prompt_tokens: int = 0
    most_units: Usage | None = None  # the most images, audio and characters it may bill (reserved)
    output_text_chars: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    extra_headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # e.g. x-ratelimit-*
    upstream_headers: dict[str, str] = field(default_factory=dict)  # client headers to forward (anthropic-beta)
    wire_state: Any = None  # what a wire format keeps for the request (the Responses API's ids and turns)
    _mark: float = 0.0

    def stage(self, name: str) -> None:
        """Close the current stage: its duration in ms is kept with the usage record."""
        now = time.perf_counter()
        self.timings[name] = round((now - (self._mark or self.started)) * 1000, 3)
        self._mark = now

    def elapsed_ms(self) -> int:
        return int((time.perf_counter() - self.started) * 1000)

    def estimated_usage(self, output_text: str, prompt_tokens: int | None = None) -> Usage:
        """Usage counted offline: the prompt as estimated before dispatch, the output as relayed."""
        model = self.deployment.upstream_model if self.deployment else self.requested_model
        return Usage(
            prompt_tokens=self.estimated_prompt_tokens if prompt_tokens is None else prompt_tokens,
            completion_tokens=tokens.count_text(output_text, model),
            source="estimated",
        )
