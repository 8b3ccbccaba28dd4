"""Prometheus metrics of the gateway (``GET /metrics``), recorded by the pipeline's record stage.

Per request (``observe``): counters and histograms of ``prometheus_client``; an update is a few
dict lookups and float additions on the event loop's thread (no lock is ever contended: each
process has one loop). At scrape time (``render``): budget utilisation from the live budget
counters and the usage writer's queue depth and lag, read from Redis by a custom collector.

Several server workers: ``can serve --workers N`` (N > 1) points ``PROMETHEUS_MULTIPROC_DIR`` at
``$CHITTYCAN_VAR_DIR/prometheus`` (emptied before the workers start) and every worker writes its
values there; any worker's ``/metrics`` then answers for all of them (``prometheus_client``'s
multiprocess mode). Names and their OpenTelemetry GenAI equivalents: docs/observability.md.
"""

from __future__ import annotations

import hmac
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from django.conf import settings
from django.db import DatabaseError
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from budgets.counters import counter_key
from budgets.models import Budget
from budgets.periods import budget_counter
from gateway.models import Deployment
from gateway.routing import breaker
from ledger import writer

if TYPE_CHECKING:
    from gateway.context import RequestContext

log = logging.getLogger(__name__)
request_log = logging.getLogger("chittycan.requests")  # one line per request; CHITTYCAN_REQUEST_LOG

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: 1 ms to 60 s, roughly x2.5 per step (a latency of an LLM call spans five orders of magnitude).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)

REQUEST_LABELS = ("route", "model", "provider", "status_class", "cache", "tenant")
MODEL_LABELS = ("route", "model", "provider", "tenant")

# The process-wide default registry: in multiprocess mode the values go to files instead and the
# scrape reads them back through MultiProcessCollector (see ``render``).
REQUESTS = Counter("chittycan_requests", "Requests answered by the gateway.", REQUEST_LABELS)
REQUEST_DURATION = Histogram(
    "chittycan_request_duration_seconds",
    "Time from receiving a request to the end of its answer.",
    ("route", "model", "provider", "status_class"),
    buckets=LATENCY_BUCKETS,
)
UPSTREAM_DURATION = Histogram(
    "chittycan_upstream_duration_seconds",
    "Time the upstream took: a whole answer, or a stream's first chunk.",
    ("model", "provider"),
    buckets=LATENCY_BUCKETS,
)
TTFT = Histogram(
    "chittycan_time_to_first_token_seconds",
    "Streams: time from receiving the request to the first content sent to the client.",
    ("model", "provider"),
    buckets=LATENCY_BUCKETS,
)
TOKENS = Counter(
    "chittycan_tokens", "Tokens billed, by kind (input, cached, output, reasoning).", (*MODEL_LABELS, "kind")
)
COST = Counter("chittycan_cost_usd", "Cost charged to clients, in US dollars.", MODEL_LABELS)
RETRIES = Counter(
    "chittycan_upstream_retries",
    "Upstream attempts beyond the first (retries and fallbacks), by the provider that finally answered.",
    ("route", "model", "provider"),
)
FALLBACKS = Counter(
    "chittycan_fallbacks", "Requests served by a deployment other than the first.", ("route", "model", "provider")
)
CACHE_HITS = Counter("chittycan_cache_hits", "Requests answered from the response cache.", MODEL_LABELS)
CACHE_SAVED = Counter(
    "chittycan_cache_saved_usd",
    "What the answers served from the response cache would have cost at the model's price, in US dollars.",
    MODEL_LABELS,
)
BREAKER_STATES = ("closed", "open", "half_open")


#: Each metric's labelled children as ``observe`` met them: ``labels()`` checks and converts its
#: arguments and takes the metric's lock on every call (~3 us), a dict lookup does not. Nothing
#: here ever removes a child, so the cached ones stay the registry's.
_children: dict[tuple[Any, tuple[str, ...]], Any] = {}


def _child(metric: Any, *values: str) -> Any:
    key = (metric, values)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*values)
    return child


def status_class(http_status: int) -> str:
    return f"{http_status // 100}xx" if 100 <= http_status < 600 else "other"


def cache_result(ctx: RequestContext) -> str:
    """hit | miss | bypass | none (set by the pipeline's cache stage; none: the cache is off)."""
    return ctx.cache_result


def _tenant_label(ctx: RequestContext) -> str:
    if not settings.CHITTYCAN_METRICS_TENANT_LABEL or ctx.key is None:
        return ""
    return ctx.key.tenant.slug


def observe(ctx: RequestContext) -> None:
    """Count and log one finished request (any outcome, refused ones included). Never raises."""
    try:
        _observe(ctx)
        if request_log.isEnabledFor(logging.INFO):
            _log_line(ctx)
    except Exception:  # metrics must never break a request
        log.exception("metrics: could not record request %s", ctx.request_id)


def _log_line(ctx: RequestContext) -> None:
    """The request's JSON log line: ids, names and numbers only (never a key, credential or prompt)."""
    usage = ctx.usage
    key = ctx.key
    extra: dict[str, object] = {"trace_id": ctx.trace.trace_id_hex} if ctx.trace is not None else {}
    request_log.info(
        "request",
        extra={
            **extra,
            "request_id": ctx.request_id,
            "tenant": key.tenant.slug if key else "",
            "key_name": key.name if key else "",
            "route": ctx.endpoint,
            "model": ctx.route.name if ctx.route is not None else "",
            "provider": ctx.deployment.provider.slug if ctx.deployment is not None else "",
            "status": ctx.http_status,
            "outcome": ctx.status,
            "error_type": ctx.error_type,
            "stream": ctx.stream,
            "cache": cache_result(ctx),
            "input_tokens": usage.prompt_tokens if usage else 0,
            "cached_tokens": usage.cached_tokens if usage else 0,
            "output_tokens": usage.completion_tokens if usage else 0,
            "reasoning_tokens": usage.reasoning_tokens if usage else 0,
            "cost_usd": ctx.cost_micro / 1_000_000,
            "latency_ms": ctx.elapsed_ms(),
            "ttft_ms": ctx.ttft_ms,
        },
    )


def _observe(ctx: RequestContext) -> None:
    route = ctx.endpoint
    model = ctx.route.name if ctx.route is not None else ""
    provider = ctx.deployment.provider.slug if ctx.deployment is not None else ""
    tenant = _tenant_label(ctx)
    klass = status_class(ctx.http_status)
    _child(REQUESTS, route, model, provider, klass, cache_result(ctx), tenant).inc()
    _child(REQUEST_DURATION, route, model, provider, klass).observe(time.perf_counter() - ctx.started)
    if ctx.cache_hit:
        _child(CACHE_HITS, route, model, provider, tenant).inc()
        if ctx.saved_micro:
            _child(CACHE_SAVED, route, model, provider, tenant).inc(ctx.saved_micro / 1_000_000)
    if not ctx.reached_provider:
        return
    if ctx.attempts > 1:
        _child(RETRIES, route, model, provider).inc(ctx.attempts - 1)
    if ctx.route_reason.startswith("fallback"):
        _child(FALLBACKS, route, model, provider).inc()
    upstream = ctx.timings.get("upstream", ctx.timings.get("upstream_first_chunk"))
    if upstream is not None:
        _child(UPSTREAM_DURATION, model, provider).observe(upstream / 1000)
    if ctx.ttft_ms is not None and ctx.stream:
        _child(TTFT, model, provider).observe(ctx.ttft_ms / 1000)
    usage = ctx.usage
    if usage is not None:
        for kind, value in (
            ("input", usage.prompt_tokens),
            ("cached", usage.cached_tokens),
            ("output", usage.completion_tokens),
            ("reasoning", usage.reasoning_tokens),
        ):
            if value:
                _child(TOKENS, route, model, provider, tenant, kind).inc(value)
    if ctx.cost_micro:
        _child(COST, route, model, provider, tenant).inc(ctx.cost_micro / 1_000_000)


# --- scrape time ----------------------------------------------------------------------------------


class ScrapeCollector(Collector):
    """Values read when Prometheus scrapes: budget utilisation and the usage writer's queue."""

    def collect(self) -> Iterator[Metric]:
        conn: redis.Redis | None = None
        if settings.REDIS_URL:
            conn = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=1, socket_connect_timeout=1)
        try:
            yield from self._queue(conn)
            yield from self._budgets(conn)
            yield from self._breakers(conn)
        finally:
            if conn is not None:
                conn.close()

    def _queue(self, conn: redis.Redis | None) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "chittycan_usage_queue_depth", "Usage rows handed off and not yet written to the ledger."
        )
        lag = GaugeMetricFamily(
            "chittycan_usage_queue_lag_seconds", "Age of the oldest usage row not yet written (0 when none)."
        )
        if conn is None:
            depth.add_metric([], len(writer.local_pending_rows()))
            lag.add_metric([], 0.0)
        else:
            try:
                key = writer.stream_key()
                length = int(conn.xlen(key))
                oldest: list[tuple[bytes, object]] = conn.xrange(key, "-", "+", count=1) if length else []  # type: ignore[assignment]
            except (redis.RedisError, OSError):
                return  # Redis unreachable: no value rather than a wrong one (/readyz says why)
            depth.add_metric([], length)
            age = 0.0
            if oldest:
                millis = int(oldest[0][0].split(b"-")[0])
                age = max(0.0, time.time() - millis / 1000)
            lag.add_metric([], age)
        yield depth
        yield lag

    def _budgets(self, conn: redis.Redis | None) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "chittycan_budget_utilisation_ratio",
            "Live spend (settled and reserved) over the limit of each budget in its current period.",
            labels=("budget", "scope", "period", "hard", "tenant"),
        )
        if conn is None:
            yield family
            return
        cap = settings.CHITTYCAN_METRICS_MAX_BUDGETS
        roots: dict[int, int] = {}
        keys: list[str] = []
        try:
            budgets = list(Budget.objects.select_related("tenant", "api_key__tenant").order_by("pk")[:cap])
            for budget in budgets:
                tenant = budget.tenant if budget.tenant_id else budget.api_key.tenant  # type: ignore[union-attr]
                assert tenant is not None
                if tenant.pk not in roots:
                    roots[tenant.pk] = int([tenant, *tenant.ancestors()][-1].pk)
                keys.append(counter_key(roots[tenant.pk], budget_counter(budget).name))
        except DatabaseError:
            log.warning("metrics: budgets unreadable (database unavailable); utilisation left out", exc_info=True)
            return
        if not keys:
            yield family
            return
        try:
            values = conn.mget(keys)
        except (redis.RedisError, OSError):
            return
        show_tenant = settings.CHITTYCAN_METRICS_TENANT_LABEL
        for budget, raw in zip(budgets, values, strict=True):
            spent = int(raw) if raw is not None else 0
            tenant = budget.tenant if budget.tenant_id else budget.api_key.tenant  # type: ignore[union-attr]
            ratio = spent / budget.limit_micro if budget.limit_micro else 0.0
            family.add_metric(
                [
                    str(budget.pk),
                    "tenant" if budget.tenant_id else "key",
                    budget.period,
                    "true" if budget.hard else "false",
                    tenant.slug if show_tenant and tenant is not None else "",
                ],
                ratio,
            )
        yield family

    def _breakers(self, conn: redis.Redis | None) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "chittycan_breaker_state",
            "Circuit breaker of each active deployment: 1 for its current state, 0 for the other two.",
            labels=("model", "provider", "deployment", "state"),
        )
        try:
            deployments = list(
                Deployment.objects.filter(is_active=True, model__is_active=True, provider__is_active=True)
                .select_related("model", "provider")
                .order_by("pk")
            )
        except DatabaseError:
            log.warning("metrics: deployments unreadable (database unavailable); breakers left out", exc_info=True)
            return
        keys = [f"d{d.pk}" for d in deployments]
        if conn is None:
            local = breaker.store()
            snaps = [
                local.states.get(k, breaker.CLOSED) if isinstance(local, breaker.MemoryStore) else breaker.CLOSED
                for k in keys
            ]
        else:
            try:
                pipe = conn.pipeline(transaction=False)
                for key in keys:
                    pipe.hmget(breaker.state_key(key), ["s", "u", "f", "o"])
                snaps = [breaker.parse_state(list(raw)) for raw in pipe.execute()]
            except (redis.RedisError, OSError):
                return
        now = time.time()
        for deployment, snap in zip(deployments, snaps, strict=True):
            state = snap.state(now)
            for candidate in BREAKER_STATES:
                labels = [deployment.model.name, deployment.provider.slug, str(deployment.pk), candidate]
                family.add_metric(labels, 1.0 if candidate == state else 0.0)
        yield family


_SCRAPE = ScrapeCollector()
PER_REQUEST = (
    REQUESTS,
    REQUEST_DURATION,
    UPSTREAM_DURATION,
    TTFT,
    TOKENS,
    COST,
    RETRIES,
    FALLBACKS,
    CACHE_HITS,
    CACHE_SAVED,
)


def render() -> bytes:
    """The text exposition of every metric (all worker processes' in multiprocess mode)."""
    registry = CollectorRegistry(auto_describe=False)
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        MultiProcessCollector(registry, path=path)
    else:
        for collector in PER_REQUEST:
            registry.register(collector)
    registry.register(_SCRAPE)
    return generate_latest(registry)


def token_ok(authorization: str | None, remote_addr: str | None, proxied: bool = False) -> bool:
    """With ``CHITTYCAN_METRICS_TOKEN`` set: ``Authorization: Bearer <it>``. Without: loopback
    clients only, and not through a proxy (a request carrying forwarding headers)."""
    token = settings.CHITTYCAN_METRICS_TOKEN
    if not token:
        return remote_addr in _LOOPBACK and not proxied
    given = (authorization or "").removeprefix("Bearer ").strip()
    return hmac.compare_digest(given.encode(), token.encode())


PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")


_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


def prepare_multiprocess_dir(var_dir: Path) -> Path:
    """Empty ``var_dir/prometheus`` (values of a previous run) and return it; before workers start."""
    path = var_dir / "prometheus"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    return path
