"""A circuit breaker per deployment, shared by every gateway process, and a retry budget.

A deployment is a public model's (provider, upstream model) pair: its breaker is keyed by the
deployment's id, so two public models that share an upstream model name do not share a breaker.

States: *closed* (requests go through), *open* (the deployment is skipped at once, no upstream
call) until ``cooldown`` seconds passed, then *half-open*: exactly one request, the probe, holds a
lease (Redis ``SET NX PX``) and goes through; its success closes the breaker, its failure opens it
for another cool-down. Every other request skips the deployment while the probe is in flight.

It opens on ``failures`` consecutive failures (counted in Redis, across processes) or when a
process sees an error rate of at least ``error_rate`` over ``min_requests`` or more requests in the
last ``window`` seconds (each process's own traffic, counted in memory). Failures are 5xx, Anthropic
529, timeouts, refused or reset connections and the provider refusing our credentials; a 429 never
counts (it says "slow down", not "broken"); a 4xx the upstream blames on the request shows that it
is alive.

Every process sees a state change at once: opening (by failures, the error rate, a failed probe,
an ejection) and the probe's closing are published, from the Redis script that makes them, on the
invalidation channel (``core.invalidation``, topic ``brk``), and each gateway process's listener
puts the new state in its cache. The cache TTL only bounds how stale a process can be when a
message is lost (a Redis reconnect).

While a breaker is half-open, a stream request does not take the probe when another deployment
it could use remains after this one (``admit(..., may_probe=False)``): a stream cut after its first
chunk cannot fail over, so a failed stream probe would be a failed client request, where a
failed non-stream probe is retried on the next deployment. The half-open deployment is then
probed by a non-stream request or by a health probe (``gateway.routing.health.probe_soon``).

Calm-weather cost: the state is read with one ``HMGET`` per deployment per
``CHITTYCAN_BREAKER_CACHE_TTL`` seconds per process (whatever the request rate), and a success
writes nothing unless a failure was counted before it. Redis is written on failures, on opening
and on probes only. Without Redis (embedded mode) the same state lives in this process. If Redis
fails, the breaker lets requests through (it never turns a Redis outage into an upstream outage).

The retry budget is a token bucket per deployment in each process: every request through a
deployment adds ``CHITTYCAN_RETRY_BUDGET_RATIO`` of a token (up to ``CHITTYCAN_RETRY_BUDGET_BURST``),
every retry on the same deployment spends one, so retries add at most that share to the request
rate a deployment sees, even when all of it fails.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

import redis
from django.conf import settings
from redis.commands.core import AsyncScript

from core import invalidation, runtime
from gateway.errors import UpstreamError
from gateway.providers.base import BreakerSettings
from gateway.routing.table import DeploymentRoute, route_table

log = logging.getLogger(__name__)

State = Literal["closed", "open", "half_open"]
Outcome = Literal["success", "failure", "neutral"]

#: Redis errors the breaker survives by letting requests through.
REDIS_ERRORS = (redis.RedisError, OSError, TimeoutError)


def breaker_id(deployment: DeploymentRoute) -> str:
    """The deployment's id; dev and passthrough routes (no row) by provider and upstream model."""
    if deployment.id is not None:
        return f"d{deployment.id}"
    return f"p{deployment.provider.slug}:{deployment.upstream_model}"


def outcome_of(err: UpstreamError | None) -> Outcome:
    """What an attempt's result says about the deployment's health."""
    if err is None:
        return "success"
    if err.status == 429:
        return "neutral"
    if err.retryable:
        return "failure"
    return "success"  # the upstream answered; it blamed the request


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A breaker's shared state: ``open_until`` is a Unix time (0 when closed)."""

    open: bool = False
    open_until: float = 0.0
    failures: int = 0
    opened: int = 0  # how many times it opened (while the key lived)
    reason: str = ""  # why it last opened: one of REASONS ("" before the first opening)

    def state(self, now: float | None = None) -> State:
        if not self.open:
            return "closed"
        return "open" if (now if now is not None else time.time()) < self.open_until else "half_open"


CLOSED = Snapshot()

#: Why a breaker opened. ``unhealthy`` ones come from the health checks (``gateway.routing.health``):
#: passive outlier detection ejected the deployment, or an active health probe failed.
OPENED_BY_FAILURES = "consecutive failures"
OPENED_BY_ERROR_RATE = "error rate"
OPENED_BY_PROBE = "half-open probe failed"
OPENED_BY_OUTLIER = "latency outlier"
OPENED_BY_HEALTH_PROBE = "health probe failed"
UNHEALTHY = frozenset({OPENED_BY_OUTLIER, OPENED_BY_HEALTH_PROBE})


@dataclass(frozen=True, slots=True)
class Admission:
    """A deployment may be tried; ``probe`` when this request holds the half-open lease."""

    key: str
    probe: bool = False
    token: str = ""  # the probe lease's value


# --- the shared store: Redis, or this process (embedded mode) --------------------------------------

#: The invalidation channel's topic of breaker state changes: ``brk\t<key>\t<s>\t<u>\t<f>\t<o>\t<r>``.
TOPIC = "brk"

# Publishes a state change on the invalidation channel (ARGV[ch]; "" publishes nothing) as
# "brk\t<breaker key>\t" and the hash's fields s, u, f, o, r; r is the HMGET result.
_PUBLISH = """
local function publish(ch, key, r)
  if ch == '' then return end
  local parts = {'brk', key}
  for i = 1, 5 do parts[#parts + 1] = tostring(r[i] or '') end
  redis.call('PUBLISH', ch, table.concat(parts, '\t'))
end
"""

# KEYS[1] the breaker's hash. ARGV: now (s), threshold, cooldown (s), force ("1" opens it now), ttl (ms),
# the reason recorded when it opens, the channel to publish an opening on, the breaker's key
_FAIL = (
    _PUBLISH
    + """
local f = redis.call('HINCRBY', KEYS[1], 'f', 1)
local s = redis.call('HGET', KEYS[1], 's')
local u = tonumber(redis.call('HGET', KEYS[1], 'u') or '0')
local now = tonumber(ARGV[1])
local opened = false
if ARGV[4] == '1' or (s ~= 'open' and f >= tonumber(ARGV[2])) then
  if s ~= 'open' or now >= u or ARGV[4] == '1' then
    u = now + tonumber(ARGV[3])
    redis.call('HSET', KEYS[1], 's', 'open', 'u', tostring(u), 'r', ARGV[6])
    redis.call('HINCRBY', KEYS[1], 'o', 1)
    opened = true
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
local r = redis.call('HMGET', KEYS[1], 's', 'u', 'f', 'o', 'r')
if opened then publish(ARGV[7], ARGV[8], r) end
return r
"""
)

# KEYS[1] the hash, KEYS[2] the probe lease. ARGV: "1" when the success is the probe's, lease token,
# the channel to publish the closing on, the breaker's key
_SUCCEED = (
    _PUBLISH
    + """
local s = redis.call('HGET', KEYS[1], 's')
if ARGV[1] == '1' then
  redis.call('HSET', KEYS[1], 's', 'closed', 'u', '0', 'f', '0')
  if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end
elseif s ~= 'open' then
  redis.call('HSET', KEYS[1], 'f', '0')
end
local r = redis.call('HMGET', KEYS[1], 's', 'u', 'f', 'o', 'r')
if ARGV[1] == '1' and s == 'open' then publish(ARGV[3], ARGV[4], r) end
return r
"""
)

# KEYS[1] the hash, KEYS[2] the probe lease. ARGV: now (s), lease token, lease (ms). The lease is
# refused while the breaker is open in Redis: a process whose cached state says half-open may be
# behind a probe that failed meanwhile (and reopened it); without this it would probe again.
_PROBE = """
local u = tonumber(redis.call('HGET', KEYS[1], 'u') or '0')
if redis.call('HGET', KEYS[1], 's') == 'open' and tonumber(ARGV[1]) < u then return 0 end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then return 1 end
return 0
"""

_TTL_MS = 86_400_000  # an idle breaker's state expires after a day


def _parse(raw: list[Any]) -> Snapshot:
    s, u, f, o, *rest = (v.decode() if isinstance(v, bytes) else v for v in raw)
    reason = str(rest[0] or "") if rest else ""
    return Snapshot(open=s == "open", open_until=float(u or 0), failures=int(f or 0), opened=int(o or 0), reason=reason)


def state_key(key: str) -> str:
    """The Redis hash of a breaker's shared state (fields s, u, f, o); read at scrape time too."""
    return f"{runtime.key_prefix()}:brk:{{{key}}}"


def parse_state(raw: list[Any]) -> Snapshot:
    """A breaker's state from ``HMGET <state_key> s u f o``."""
    return _parse(raw)


class RedisStore:
    def __init__(self) -> None:
        self._scripts: dict[asyncio.AbstractEventLoop, tuple[AsyncScript, AsyncScript, AsyncScript]] = {}

    def _hash(self, key: str) -> str:
        return state_key(key)

    def _lease(self, key: str) -> str:
        return f"{runtime.key_prefix()}:brk:{{{key}}}:probe"

    def _script(self, index: int) -> AsyncScript:
        loop = asyncio.get_running_loop()
        scripts = self._scripts.get(loop)
        if scripts is None:
            conn = runtime.redis_client()
            scripts = self._scripts[loop] = (
                conn.register_script(_FAIL),
                conn.register_script(_SUCCEED),
                conn.register_script(_PROBE),
            )
        return scripts[index]

    async def read(self, key: str) -> Snapshot:
        raw = await runtime.redis_client().hmget(self._hash(key), ["s", "u", "f", "o", "r"])
        return _parse(list(raw))

    async def fail(self, key: str, cfg: BreakerSettings, *, force: bool, reason: str = "") -> Snapshot:
        args: list[str | int] = [
            repr(time.time()),
            cfg.failures,
            repr(cfg.cooldown),
            "1" if force else "0",
            _TTL_MS,
            reason or (OPENED_BY_ERROR_RATE if force else OPENED_BY_FAILURES),
            invalidation.channel(),
            key,
        ]
        raw = await self._script(0)(keys=[self._hash(key)], args=args)
        return _parse(list(raw))

    async def succeed(self, key: str, *, probe: bool, token: str) -> Snapshot:
        args = ["1" if probe else "0", token, invalidation.channel(), key]
        raw = await self._script(1)(keys=[self._hash(key), self._lease(key)], args=args)
        return _parse(list(raw))

    async def acquire_probe(self, key: str, token: str, lease: float) -> bool:
        args: list[str | int] = [repr(time.time()), token, max(1, int(lease * 1000))]
        got = await self._script(2)(keys=[self._hash(key), self._lease(key)], args=args)
        return bool(got)

    async def release_probe(self, key: str, token: str) -> None:
        conn = runtime.redis_client()
        if (await conn.get(self._lease(key))) == token.encode():
            await conn.delete(self._lease(key))


class MemoryStore:
    """The same state in this process, for embedded mode (no Redis)."""

    def __init__(self) -> None:
        self.states: dict[str, Snapshot] = {}
        self.leases: dict[str, tuple[str, float]] = {}

    async def read(self, key: str) -> Snapshot:
        return self.states.get(key, CLOSED)

    async def fail(self, key: str, cfg: BreakerSettings, *, force: bool, reason: str = "") -> Snapshot:
        cur = self.states.get(key, CLOSED)
        now = time.time()
        failures = cur.failures + 1
        snap = Snapshot(cur.open, cur.open_until, failures, cur.opened, cur.reason)
        if force or (not cur.open and failures >= cfg.failures):
            if not cur.open or now >= cur.open_until or force:
                why = reason or (OPENED_BY_ERROR_RATE if force else OPENED_BY_FAILURES)
                snap = Snapshot(True, now + cfg.cooldown, failures, cur.opened + 1, why)
        self.states[key] = snap
        return snap

    async def succeed(self, key: str, *, probe: bool, token: str) -> Snapshot:
        cur = self.states.get(key, CLOSED)
        if probe:
            snap = Snapshot(False, 0.0, 0, cur.opened, cur.reason)
            if self.leases.get(key, ("", 0.0))[0] == token:
                self.leases.pop(key, None)
        elif not cur.open:
            snap = Snapshot(False, 0.0, 0, cur.opened, cur.reason)
        else:
            snap = cur
        self.states[key] = snap
        return snap

    async def acquire_probe(self, key: str, token: str, lease: float) -> bool:
        now = time.monotonic()
        held = self.leases.get(key)
        if held is not None and held[1] > now:
            return False
        self.leases[key] = (token, now + lease)
        return True

    async def release_probe(self, key: str, token: str) -> None:
        if self.leases.get(key, ("", 0.0))[0] == token:
            self.leases.pop(key, None)


Store = RedisStore | MemoryStore

_redis_store = RedisStore()
_memory_store = MemoryStore()


def store() -> Store:
    return _redis_store if settings.REDIS_URL else _memory_store


def forget_loop() -> None:
    """Drop the Redis scripts registered for this event loop: call it before a loop of its own
    ends (the health probes' task), or the scripts, and the client they hold, stay behind."""
    _redis_store._scripts.pop(asyncio.get_running_loop(), None)


# --- this process's view ------------------------------------------------------------------------


class _Window:
    """Requests and failures per second over the last ``window`` seconds (this process only)."""

    __slots__ = ("buckets",)

    def __init__(self) -> None:
        self.buckets: deque[list[int]] = deque()  # [second, requests, failures]

    def add(self, failed: bool, window: float) -> tuple[int, int]:
        second = int(time.monotonic())
        if not self.buckets or self.buckets[-1][0] != second:
            self.buckets.append([second, 0, 0])
        bucket = self.buckets[-1]
        bucket[1] += 1
        bucket[2] += int(failed)
        oldest = second - max(int(window), 1)
        while self.buckets and self.buckets[0][0] <= oldest:
            self.buckets.popleft()
        return sum(b[1] for b in self.buckets), sum(b[2] for b in self.buckets)


class _Bucket:
    """The retry budget's token bucket of one deployment."""

    __slots__ = ("tokens",)

    def __init__(self, burst: float) -> None:
        self.tokens = burst


_cache: dict[str, tuple[float, Snapshot]] = {}
_refreshing: set[str] = set()
_windows: dict[str, _Window] = {}
_buckets: dict[str, _Bucket] = {}
_probe_busy: dict[str, float] = {}  # until when (monotonic) a probe is known to be in flight
#: Seconds before a process that lost the probe lease asks Redis again.
PROBE_BUSY_RECHECK = 0.25
#: Redis round trips this process made to read breaker state (the calm-weather cost; tests read it).
reads = 0
#: State changes this process learnt from the invalidation channel, per breaker key (tests read it).
transitions_seen: dict[str, int] = {}


def reset_local() -> None:
    """Forget this process's cached state, windows and budgets (tests)."""
    global reads
    _cache.clear()
    _refreshing.clear()
    _windows.clear()
    _buckets.clear()
    _probe_busy.clear()
    _failed_at.clear()
    transitions_seen.clear()
    _memory_store.states.clear()
    _memory_store.leases.clear()
    reads = 0


def _remember(key: str, snap: Snapshot) -> Snapshot:
    _cache[key] = (time.monotonic(), snap)
    return snap


async def snapshot(key: str) -> Snapshot:
    """The breaker's state, from this process's cache when it is fresh enough."""
    global reads
    cached = _cache.get(key)
    now = time.monotonic()
    if cached is not None and (now - cached[0] < settings.CHITTYCAN_BREAKER_CACHE_TTL or key in _refreshing):
        return cached[1]
    _refreshing.add(key)
    try:
        reads += 1
        snap = await store().read(key)
    except REDIS_ERRORS as exc:
        log.warning("breaker state unreadable; letting requests through", extra={"error": str(exc)})
        snap = cached[1] if cached is not None else CLOSED
        _cache[key] = (now, snap)  # retry the read after the cache TTL, not on every request
        return snap
    finally:
        _refreshing.discard(key)
    return _remember(key, snap)


def _on_transition(payload: bytes) -> None:
    """Another process (or this one) changed a breaker's state: cache what it published."""
    try:
        key, *fields = payload.decode().split("\t")
        if len(fields) != 5 or not key:
            raise ValueError("expected a key and 5 fields")
        snap = _parse(list(fields))
    except ValueError:
        shown = payload[:200].decode(errors="replace")
        log.warning("malformed breaker state message ignored", extra={"payload": shown})
        return
    _remember(key, snap)
    transitions_seen[key] = transitions_seen.get(key, 0) + 1


invalidation.subscribe_topic(TOPIC, _on_transition)


def cached_state(deployment: DeploymentRoute) -> State | None:
    """The deployment's breaker state as this process last saw it (no I/O); None: never read."""
    cached = _cache.get(breaker_id(deployment))
    return None if cached is None else cached[1].state()


#: How long after a failure (in this process) a stream keeps off a deployment whose breaker is still
#: closed, when another deployment can serve it: see ``failing``.
FAILING_SECONDS = 5.0
_failed_at: dict[str, float] = {}


def failing(deployment: DeploymentRoute) -> bool:
    """Whether the deployment is on a failure streak below its threshold, as this process saw it
    in the last ``FAILING_SECONDS`` (no I/O): its breaker closed with failures counted, the last one
    recent. A stream cannot be retried once its first chunk went out, so dispatch sends a stream
    elsewhere meanwhile; non-stream requests (which fail over) keep deciding whether it opens."""
    key = breaker_id(deployment)
    cached = _cache.get(key)
    if cached is None or cached[1].open or not cached[1].failures:
        return False
    return time.monotonic() - _failed_at.get(key, float("-inf")) < FAILING_SECONDS


def known_open(deployment: DeploymentRoute) -> bool:
    """Whether this process last saw the deployment's breaker open (no I/O)."""
    cached = _cache.get(breaker_id(deployment))
    return cached is not None and cached[1].state() == "open"


def skip_reason(deployment: DeploymentRoute) -> tuple[str, str] | None:
    """Why routing skips the deployment, as this process last saw its breaker (no I/O): None when
    it is not open; else (``unhealthy``, what the health checks found) when an outlier ejection or a
    failed health probe opened it, or (``breaker open``, why) when client traffic did."""
    cached = _cache.get(breaker_id(deployment))
    if cached is None or cached[1].state() != "open":
        return None
    reason = cached[1].reason
    return ("unhealthy" if reason in UNHEALTHY else "breaker open"), reason


def _lease_seconds(deployment: DeploymentRoute) -> float:
    cfg = deployment.provider
    return min(cfg.connect_timeout + cfg.read_timeout, 60.0) + 1.0


async def admit(deployment: DeploymentRoute, *, may_probe: bool = True) -> Admission | None:
    """May this request try the deployment? ``None``: skip it (open, another request probes, or
    half-open and this request may not be the probe: ``may_probe`` False, a stream with another
    deployment left; ``cached_state`` then says ``half_open``)."""
    key = breaker_id(deployment)
    snap = await snapshot(key)
    state = snap.state()
    if state == "closed":
        return Admission(key)
    if state == "open" or not may_probe:
        return None
    if _probe_busy.get(key, 0.0) > time.monotonic():
        return None  # another request probes: do not ask Redis again on every request meanwhile
    token = f"{time.time_ns()}:{id(asyncio.current_task())}"
    try:
        got = await store().acquire_probe(key, token, _lease_seconds(deployment))
    except REDIS_ERRORS:
        return Admission(key)
    if not got:
        _probe_busy[key] = time.monotonic() + PROBE_BUSY_RECHECK
        return None
    _probe_busy[key] = time.monotonic() + _lease_seconds(deployment)  # ours: this process waits for it
    return Admission(key, probe=True, token=token)


def probe_busy(deployment: DeploymentRoute) -> bool:
    """Whether this process knows a half-open probe of the deployment is in flight (no I/O)."""
    return _probe_busy.get(breaker_id(deployment), 0.0) > time.monotonic()


async def record(
    deployment: DeploymentRoute,
    admission: Admission | None,
    err: UpstreamError | None,
    *,
    health_probe: bool = False,
) -> None:
    """Feed an attempt's result to the deployment's breaker (``admission`` None: a mid-stream failure;
    ``health_probe``: the result of an active health probe, not of a client's request)."""
    key = admission.key if admission is not None else breaker_id(deployment)
    probe = admission is not None and admission.probe
    token = admission.token if admission is not None else ""
    outcome = outcome_of(err)
    if probe:
        _probe_busy.pop(key, None)
    cfg = deployment.provider.breaker
    window = _windows.get(key)
    if window is None:
        window = _windows[key] = _Window()
    try:
        if outcome == "neutral":
            if probe:  # a 429 says nothing about recovery: let the next probe come soon
                await store().release_probe(key, token)
            return
        total, failed = window.add(outcome == "failure", cfg.window)
        if outcome == "success":
            _failed_at.pop(key, None)
            cached = _cache.get(key)
            if probe or cached is None or cached[1].failures or cached[1].open:
                _remember(key, await store().succeed(key, probe=probe, token=token))
            return
        force = probe or (total >= cfg.min_requests and failed >= cfg.error_rate * total)
        if health_probe:
            reason = OPENED_BY_HEALTH_PROBE
        elif probe:
            reason = OPENED_BY_PROBE
        else:
            reason = OPENED_BY_ERROR_RATE if force else OPENED_BY_FAILURES
        _failed_at[key] = time.monotonic()
        snap = _remember(key, await store().fail(key, cfg, force=force, reason=reason))
        if probe:
            await store().release_probe(key, token)
        if snap.open and snap.state() == "open" and (force or snap.failures == cfg.failures):
            log.warning(
                "circuit breaker open",
                extra={"breaker": key, "provider": deployment.provider.slug, "failures": snap.failures},
            )
    except REDIS_ERRORS as exc:
        log.warning("breaker state not written", extra={"breaker": key, "error": str(exc)})


async def eject(deployment: DeploymentRoute, reason: str = OPENED_BY_OUTLIER) -> None:
    """Open the deployment's breaker now, for its cool-down (passive outlier detection,
    ``gateway.routing.health``); the half-open probe then tests it. Raises ``REDIS_ERRORS``."""
    key = breaker_id(deployment)
    _remember(key, await store().fail(key, deployment.provider.breaker, force=True, reason=reason))


async def release(admission: Admission) -> None:
    """The probe ended without a verdict (the client left): let another request probe."""
    if admission.probe:
        _probe_busy.pop(admission.key, None)
        try:
            await store().release_probe(admission.key, admission.token)
        except REDIS_ERRORS:
            pass


# --- the retry budget -----------------------------------------------------------------------------


def _bucket(key: str) -> _Bucket:
    bucket = _buckets.get(key)
    if bucket is None:
        bucket = _buckets[key] = _Bucket(settings.CHITTYCAN_RETRY_BUDGET_BURST)
    return bucket


def budget_deposit(admission: Admission) -> None:
    """A request reached the deployment: the budget earns a share of a retry."""
    bucket = _bucket(admission.key)
    bucket.tokens = min(settings.CHITTYCAN_RETRY_BUDGET_BURST, bucket.tokens + settings.CHITTYCAN_RETRY_BUDGET_RATIO)


def budget_spend(admission: Admission) -> bool:
    """May this request retry on the same deployment? Spends a token if so."""
    bucket = _bucket(admission.key)
    if bucket.tokens < 1.0:
        return False
    bucket.tokens -= 1.0
    return True


# --- status ---------------------------------------------------------------------------------------


async def status(deployments: list[tuple[str, DeploymentRoute]]) -> list[dict[str, Any]]:
    """Each (public model, deployment)'s breaker, read fresh from the store (for the status views)."""
    out: list[dict[str, Any]] = []
    now = time.time()
    for model, dep in deployments:
        key = breaker_id(dep)
        try:
            snap = await store().read(key)
            error = None
        except REDIS_ERRORS as exc:
            snap, error = CLOSED, f"state unreadable: {exc}"
        state = snap.state(now)
        item: dict[str, Any] = {
            "model": model,
            "provider": dep.provider.slug,
            "upstream_model": dep.upstream_model,
            "deployment_id": dep.id,
            "state": state,
            "consecutive_failures": snap.failures,
            "times_opened": snap.opened,
            "opened_by": snap.reason,
            "retry_in_seconds": round(max(snap.open_until - now, 0.0), 1) if state == "open" else 0.0,
            "settings": {
                "failures": dep.provider.breaker.failures,
                "error_rate": dep.provider.breaker.error_rate,
                "min_requests": dep.provider.breaker.min_requests,
                "window": dep.provider.breaker.window,
                "cooldown": dep.provider.breaker.cooldown,
            },
        }
        if error is not None:
            item["error"] = error
        out.append(item)
    return out


async def all_status() -> list[dict[str, Any]]:
    """The breaker of every active deployment of every active public model."""
    table = await route_table()
    return await status([(route.name, dep) for route in table.public_models() for dep in route.deployments])
