"""Deployment health: active probes and passive outlier detection, both feeding the breaker.

**Active probes** (``probe_due``, run by Celery beat's ``provider-probes`` entry, or the embedded
scheduler when no beat runs): every deployment of a provider with probes on gets a cheap request
(the provider's ``probe_request``, by default one "ping" message with ``max_tokens`` 1) every
``probe_interval`` seconds. A probe goes through the deployment's breaker like a request: skipped
while the breaker is open, the half-open probe when the cool-down is over (its success closes the
breaker), and its failure counts as a failure (enough of them open the breaker before any client
request meets the outage).

**On-demand probes** (``probe_soon``, called by dispatch): a stream request does not take a
half-open breaker's probe while another deployment remains (``gateway.routing.breaker``), so a
model whose traffic is all streams would leave the breaker half-open until a non-stream request
comes. Dispatch then asks for a probe now, in the background: the same cheap request as an active
probe, at most one per deployment per process at a time (and one across processes: the lease),
whether the provider's periodic probes are on or off.

**Passive outlier detection** (``observe``, called by dispatch after each successful attempt):
each gateway process keeps a decaying average of every deployment's latency (an answer's, or a
stream's first chunk). A deployment whose average exceeds ``outlier_latency_factor`` times the
fastest sibling's (another deployment of the same public model), both over at least
``OUTLIER_MIN_SAMPLES`` answers and above ``OUTLIER_MIN_LATENCY`` seconds, is ejected: its breaker
opens for its cool-down, then the half-open probe tests it. Failures are the breaker's own
business (consecutive failures, error rate).

Results (last probe, last ejection, the average latency this process measured) live beside the
breaker state: in Redis when there is one (every process and ``can providers status`` see them),
else in this process (``GET /health/providers`` of the running gateway). They are shown by the
admin, ``GET /health/providers`` and ``can providers status``.

A probe is not a client's request: it has no tenant and no ledger row; its tokens (a few per
probe) are reported with its result.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DatabaseError

from core import money, runtime
from core.money import Usage
from gateway import http
from gateway.errors import GatewayError, UpstreamError
from gateway.providers import get_provider
from gateway.providers.base import UpstreamCall
from gateway.routing import breaker
from gateway.routing.table import DeploymentRoute, ModelRoute, RouteTable
from ledger import probes

log = logging.getLogger(__name__)

#: Decay of the latency average: each answer weighs this much (about the last 10 answers count).
EWMA_ALPHA = 0.1
#: Answers a deployment and its sibling need before either is compared.
OUTLIER_MIN_SAMPLES = 10
#: Seconds below which a deployment is never an outlier (fast enough, whatever its siblings do).
OUTLIER_MIN_LATENCY = 0.2
#: Seconds a probe may take at most (less when the provider's total or first-byte limit is lower).
PROBE_TIMEOUT = 10.0
#: Seconds between writes of one deployment's latency average to the shared store (per process).
PUBLISH_EVERY = 5.0

DEFAULT_PROBE: dict[str, Any] = {"messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}


# --- the shared record: Redis, or this process ---------------------------------------------------


class _Records:
    """Health fields per breaker key (``d<deployment id>``): a Redis hash, else a dict here."""

    def __init__(self) -> None:
        self.local: dict[str, dict[str, str]] = {}

    @staticmethod
    def _key(key: str) -> str:
        return f"{runtime.key_prefix()}:hlth:{{{key}}}"

    async def write(self, key: str, fields: dict[str, str]) -> None:
        if not settings.REDIS_URL:
            self.local.setdefault(key, {}).update(fields)
            return
        conn = runtime.redis_client()
        mapping: dict[Any, Any] = dict(fields)
        await conn.hset(self._key(key), mapping=mapping)
        await conn.expire(self._key(key), 86_400)

    async def read(self, key: str) -> dict[str, str]:
        if not settings.REDIS_URL:
            return dict(self.local.get(key, {}))
        raw = await runtime.redis_client().hgetall(self._key(key))
        return {
            (k.decode() if isinstance(k, bytes) else str(k)): (v.decode() if isinstance(v, bytes) else str(v))
            for k, v in raw.items()
        }


records = _Records()


# --- passive outlier detection ---------------------------------------------------------------------


@dataclass(slots=True)
class _Latency:
    average: float = 0.0
    samples: int = 0
    published: float = 0.0  # monotonic time of the last write to the shared record


_latency: dict[str, _Latency] = {}


def reset_local() -> None:
    """Forget this process's latency averages and local records (tests)."""
    _latency.clear()
    records.local.clear()
    _on_demand.clear()


def latency_of(deployment: DeploymentRoute) -> tuple[float, int]:
    """(decaying average latency in seconds, answers measured) of a deployment in this process."""
    found = _latency.get(breaker.breaker_id(deployment))
    return (found.average, found.samples) if found is not None else (0.0, 0)


async def observe(siblings: Iterable[DeploymentRoute], deployment: DeploymentRoute, seconds: float) -> bool:
    """A successful attempt took ``seconds``: update the average; True when it ejected the deployment."""
    key = breaker.breaker_id(deployment)
    stat = _latency.get(key)
    if stat is None:
        stat = _latency[key] = _Latency(average=seconds)
    else:
        stat.average += EWMA_ALPHA * (seconds - stat.average)
    stat.samples += 1
    now = time.monotonic()
    try:
        if now - stat.published >= PUBLISH_EVERY:
            stat.published = now
            await records.write(key, {"latency_ms": f"{stat.average * 1000:.1f}", "latency_samples": str(stat.samples)})
        factor = deployment.provider.outlier_latency_factor
        if factor <= 0 or stat.samples < OUTLIER_MIN_SAMPLES or stat.average < OUTLIER_MIN_LATENCY:
            return False
        peers = [
            s.average
            for d in siblings
            if d is not deployment
            and (s := _latency.get(breaker.breaker_id(d))) is not None
            and s.samples >= OUTLIER_MIN_SAMPLES
        ]
        if not peers or stat.average <= factor * min(peers):
            return False
        reason = (
            f"latency outlier: {stat.average * 1000:.0f} ms average against {min(peers) * 1000:.0f} ms "
            f"(factor {factor:g})"
        )
        del _latency[key]  # after the cool-down, the deployment earns a fresh average
        await breaker.eject(deployment)
        await records.write(key, {"ejected_at": f"{time.time():.3f}", "ejected_reason": reason})
    except breaker.REDIS_ERRORS as exc:
        log.warning("deployment health not written", extra={"breaker": key, "error": str(exc)})
        return False
    log.warning("deployment ejected", extra={"breaker": key, "provider": deployment.provider.slug, "reason": reason})
    return True


# --- active probes ---------------------------------------------------------------------------------


def probe_limit(deployment: DeploymentRoute) -> float:
    provider = deployment.provider
    limits = [PROBE_TIMEOUT, provider.first_byte_timeout, provider.total_timeout]
    return min(x for x in limits if x is not None)


def probe_call(route: ModelRoute, deployment: DeploymentRoute) -> UpstreamCall:
    if route.kind == "embedding":
        body: dict[str, Any] = {"input": "ping"}
    else:
        body = dict(deployment.provider.probe.request or DEFAULT_PROBE)
        body.pop("stream", None)
    body["model"] = deployment.upstream_model
    return UpstreamCall(
        provider=deployment.provider, upstream_model=deployment.upstream_model, body=body, max_output_tokens=16
    )


async def _send(route: ModelRoute, deployment: DeploymentRoute) -> dict[str, Any]:
    provider = get_provider(deployment.provider.kind)
    call = probe_call(route, deployment)
    async with asyncio.timeout(probe_limit(deployment)):
        if route.kind == "embedding":
            return await provider.embeddings(call)
        return await provider.chat(call)


async def probe(route: ModelRoute, deployment: DeploymentRoute, *, trigger: str = "interval") -> dict[str, str]:
    """Probe one deployment through its breaker; returns (and stores) the result's fields.
    ``trigger``: ``interval`` (the periodic probes) or ``on demand`` (``probe_soon``)."""
    key = breaker.breaker_id(deployment)
    fields = {"probe_at": f"{time.time():.3f}", "probe_trigger": trigger}
    admission = await breaker.admit(deployment)
    if admission is None:
        fields.update(probe_result="skipped", probe_error="breaker open (or another probe in flight)")
        if trigger != "on demand":  # an on-demand probe that lost the lease to another leaves no trace
            await records.write(key, fields)
        return fields
    started = time.monotonic()
    err: UpstreamError | None = None
    tokens = 0
    usage: Usage | None = None
    try:
        answer = await _send(route, deployment)
        reported = answer.get("usage")
        if isinstance(reported, dict):
            tokens = int(reported.get("total_tokens") or 0)
            usage = Usage.from_openai(reported)
    except TimeoutError:
        err = UpstreamError(f"probe timed out after {probe_limit(deployment):g} s", retryable=True, code="timeout")
    except UpstreamError as exc:
        err = exc
    except GatewayError as exc:  # the provider refused the probe's request itself: it answered
        err = UpstreamError(exc.message, retryable=False, status=exc.status)
    except BaseException:
        await asyncio.shield(breaker.release(admission))
        raise
    await breaker.record(deployment, admission, err, health_probe=True)
    outcome = breaker.outcome_of(err)
    fields.update(
        probe_result="ok" if err is None else ("answered" if outcome == "success" else "failed"),
        probe_ms=f"{(time.monotonic() - started) * 1000:.1f}",
        probe_error="" if err is None else err.message[:300],
        probe_tokens=str(tokens),
    )
    await records.write(key, fields)
    await _ledger_row(route, deployment, fields, usage)
    return fields


async def _ledger_row(
    route: ModelRoute, deployment: DeploymentRoute, fields: dict[str, str], usage: Usage | None
) -> None:
    """The probe's row in the ledger (``ledger.probes``): sent, so it cost something. A database
    that cannot take it is logged, never a failed probe."""
    usage = usage or Usage()
    try:
        await sync_to_async(probes.record, thread_sensitive=False)(
            provider=deployment.provider.slug,
            model=route.name,
            upstream_model=deployment.upstream_model,
            deployment_id=deployment.id,
            trigger=fields["probe_trigger"],
            result=fields["probe_result"],
            latency_ms=int(float(fields["probe_ms"])),
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cost_micro=money.cost_micro(route.price_for(deployment), usage),
            error=fields["probe_error"],
        )
    except DatabaseError as exc:
        key = breaker.breaker_id(deployment)
        log.warning("probe not recorded in the ledger", extra={"breaker": key, "error": str(exc)})


_on_demand: dict[str, asyncio.Task[dict[str, str]]] = {}


def probe_soon(route: ModelRoute, deployment: DeploymentRoute) -> bool:
    """Probe a half-open deployment now, in the background of this event loop (dispatch calls it
    when a stream skipped the deployment's half-open probe). At most one per deployment in this
    process at a time, none while this process knows another probe is in flight. True when one
    was started."""
    key = breaker.breaker_id(deployment)
    if key in _on_demand or breaker.probe_busy(deployment):
        return False
    task = asyncio.get_running_loop().create_task(probe(route, deployment, trigger="on demand"))
    _on_demand[key] = task

    def done(finished: asyncio.Task[dict[str, str]]) -> None:
        if _on_demand.get(key) is finished:
            del _on_demand[key]
        if not finished.cancelled() and (exc := finished.exception()) is not None:
            log.warning("on-demand probe failed", extra={"breaker": key, "error": repr(exc)})

    task.add_done_callback(done)
    return True


async def probe_due(table: RouteTable, *, force: bool = False) -> list[dict[str, Any]]:
    """Probe every deployment whose provider probes and whose interval has passed (``force``: all
    of those now). Returns one result per deployment probed."""
    now = time.time()
    due: list[tuple[ModelRoute, DeploymentRoute]] = []
    for route in table.public_models():
        for dep in route.deployments:
            if not dep.provider.probe.enabled:
                continue
            if not force:
                last = (await records.read(breaker.breaker_id(dep))).get("probe_at")
                if last and now - float(last) < dep.provider.probe.interval - 0.5:
                    continue
            due.append((route, dep))
    results = await asyncio.gather(*(probe(route, dep) for route, dep in due))
    return [
        {"model": route.name, "provider": dep.provider.slug, "upstream_model": dep.upstream_model, **fields}
        for (route, dep), fields in zip(due, results, strict=True)
    ]


async def probe_in_own_loop(table: RouteTable, *, force: bool = False) -> list[dict[str, Any]]:
    """``probe_due`` in an event loop of its own (a Celery task, the embedded scheduler's thread):
    closes that loop's upstream and Redis clients at the end."""
    try:
        return await probe_due(table, force=force)
    finally:
        breaker.forget_loop()
        await http.aclose()
        if settings.REDIS_URL:
            await runtime.close_redis()


# --- status -------------------------------------------------------------------------------------------


def _number(raw: str | None) -> float | None:
    try:
        return float(raw) if raw else None
    except ValueError:
        return None


async def status(route_deployments: list[tuple[str, DeploymentRoute]]) -> list[dict[str, Any]]:
    """The breaker rows (``breaker.status``), each with its ``health``: last probe, last ejection,
    average latency (this process's when it measured one, else the last one published)."""
    rows = await breaker.status(route_deployments)
    now = time.time()
    keys = [(model, dep.provider.slug, dep.upstream_model) for model, dep in route_deployments]
    try:
        spent: dict[tuple[str, str, str], dict[str, int]] | None = await sync_to_async(
            probes.spend, thread_sensitive=False
        )(keys)
    except DatabaseError:
        spent = None
    for row, (model, dep) in zip(rows, route_deployments, strict=True):
        key = breaker.breaker_id(dep)
        try:
            rec = await records.read(key)
        except breaker.REDIS_ERRORS as exc:
            rec = {"error": f"health unreadable: {exc}"}
        average, samples = latency_of(dep)
        probe_at = _number(rec.get("probe_at"))
        ejected_at = _number(rec.get("ejected_at"))
        row["health"] = {
            "probes": dep.provider.probe.enabled,
            "probe_interval": dep.provider.probe.interval,
            "last_probe": None
            if probe_at is None
            else {
                "result": rec.get("probe_result", ""),
                "trigger": rec.get("probe_trigger", "interval"),
                "seconds_ago": round(now - probe_at, 1),
                "latency_ms": _number(rec.get("probe_ms")),
                "error": rec.get("probe_error", ""),
                "tokens": int(_number(rec.get("probe_tokens")) or 0),
            },
            "latency_ms": round(average * 1000, 1) if samples else _number(rec.get("latency_ms")),
            "outlier_latency_factor": dep.provider.outlier_latency_factor,
            "last_ejection": None
            if ejected_at is None
            else {"seconds_ago": round(now - ejected_at, 1), "reason": rec.get("ejected_reason", "")},
        }
        if "error" in rec:
            row["health"]["error"] = rec["error"]
        # Probes sent in the last 24 h and what they cost (the ledger's ProbeRecord rows).
        row["health"]["probes_24h"] = None if spent is None else spent[(model, dep.provider.slug, dep.upstream_model)]
    return rows


async def all_status(table: RouteTable) -> list[dict[str, Any]]:
    """Breaker and health of every active deployment of every active public model."""
    return await status([(route.name, dep) for route in table.public_models() for dep in route.deployments])
