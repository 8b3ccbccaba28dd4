"""What a request carries through the pipeline stages."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from core.money import Usage

if TYPE_CHECKING:
    from gateway.routing import DeploymentRoute, ModelRoute
    from tenants.keyinfo import KeyInfo


@dataclass(slots=True)
class RequestContext:
    request_id: str
    endpoint: str  # chat | completions | embeddings | messages
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
    reservations: list[Any] = field(default_factory=list)
    reached_provider: bool = False
    status: str = "ok"
    http_status: int = 200
    error_type: str = ""
    ttft_ms: int | None = None
    attempts: int = 0
    route_reason: str = ""
    cache_hit: bool = False
    estimated_prompt_tokens: int = 0
    output_text_chars: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    extra_headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # e.g. x-ratelimit-*
    upstream_headers: dict[str, str] = field(default_factory=dict)  # client headers to forward (anthropic-beta)
    _mark: float = 0.0

    def stage(self, name: str) -> None:
        """Close the current stage: its duration in ms is kept with the usage record."""
        now = time.perf_counter()
        self.timings[name] = round((now - (self._mark or self.started)) * 1000, 3)
        self._mark = now

    def elapsed_ms(self) -> int:
        return int((time.perf_counter() - self.started) * 1000)
