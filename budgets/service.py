"""The budget service: what the reserve and settle stages ask of budgets.

- ``budgets_for(key)``: the budgets of a key, of its tenant and of every ancestor, cached per
  process (``CHITTYCAN_AUTH_CACHE_TTL``) and dropped at once when a budget, key or tenant changes
  (``core.invalidation``).
- ``reserve(request_id, key, when, amount_micro)``: the worst case on every budget counter of
  the key and its tenant chain, plus one request on every plan quota, all or nothing. Returns the
  ``Reservation``, a ``Refusal`` (which hard budget or quota would be overrun), or None when
  nothing is counted for this key.
- ``settle(reservation, actual_micro, requests)``: brings the reservation to the actual cost,
  exactly once.
- ``spend_status(budget)``: spend against one budget now (alerts, the API, the CLI).

While a request runs, this process renews its reservation's lease (``renew_leases``, run by the
``budget-leases`` background task, which also sweeps expired ones). When Redis is unreachable,
``CHITTYCAN_REDIS_FAILURE_POLICY`` decides: ``degrade`` enforces budgets in PostgreSQL alone (row
locks), ``refuse`` makes ``reserve`` raise ``counters.EnforcementUnavailable``. There is no
fail-open path. See docs/budgets.md.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime

import redis
from asgiref.sync import sync_to_async
from cachetools import TTLCache
from django.conf import settings
from django.db import DatabaseError
from django.db.models import Q

from budgets import counters
from budgets.counters import Reservation
from budgets.models import Budget
from budgets.periods import BudgetInfo, Counter, budget_counter, counters_for, period_bounds
from budgets.reconcile import Drift, reconcile
from budgets.spend import ledger_value
from core import invalidation
from core.runtime import RedisBatch, background, key_prefix
from ledger import writer
from tenants.keyinfo import KeyInfo, TenantInfo

log = logging.getLogger(__name__)

__all__ = [
    "Refusal",
    "Reservation",
    "SpendStatus",
    "budgets_for",
    "forget_budgets",
    "load_budgets",
    "renew_leases",
    "reserve",
    "reserve_gated",
    "settle",
    "spend_status",
]


# --- a key's budgets ------------------------------------------------------------------------------


def load_budgets(key: KeyInfo) -> tuple[BudgetInfo, ...]:
    """Budgets of a key and of every tenant in its chain, in one query (synchronous)."""
    zones = {t.id: t.time_zone for t in key.lineage}
    key_zone = key.lineage[0].time_zone
    query = Q(tenant_id__in=list(zones))
    if key.id is not None:
        query |= Q(api_key_id=key.id)
    found = []
    for b in Budget.objects.filter(query).order_by("pk"):
        if b.tenant_id:
            found.append(BudgetInfo(b.pk, "tenant", b.tenant_id, b.period, b.limit_micro, b.hard, zones[b.tenant_id]))
        else:
            assert b.api_key_id is not None
            found.append(BudgetInfo(b.pk, "key", b.api_key_id, b.period, b.limit_micro, b.hard, key_zone))
    return tuple(found)


_CACHE_MAX = 100_000
_CacheKey = tuple[int | None, tuple[TenantInfo, ...]]
_cache: TTLCache[_CacheKey, tuple[BudgetInfo, ...]] = TTLCache(
    maxsize=_CACHE_MAX, ttl=settings.CHITTYCAN_AUTH_CACHE_TTL
)
# The cache is read by the event loop and dropped by whichever thread commits a change; a load
# that began before a drop is not cached after it (the generation moved on).
_cache_lock = threading.Lock()
_generation = 0


@invalidation.subscribe
def forget_budgets() -> None:
    """Drop every cached budget (a budget, key or tenant changed)."""
    global _generation
    with _cache_lock:
        _generation += 1
        _cache.clear()


async def budgets_for(key: KeyInfo) -> tuple[BudgetInfo, ...]:
    """The key's budgets, its tenant's and every ancestor's. No query on the warm path."""
    slot = (key.id, key.lineage)  # the chain's ids and time zones are part of the answer
    with _cache_lock:
        found = _cache.get(slot)
        generation = _generation
    if found is None:
        found = await sync_to_async(load_budgets, thread_sensitive=False)(key)
        with _cache_lock:
            if generation == _generation:
                _cache[slot] = found
    return found


# --- reserve and settle ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Refusal:
    """The request would take a hard budget or a plan quota over its limit: the first counter
    that would go over, what it holds and what the request wanted to add."""

    counter: Counter
    current: int
    amount: int
    tenant: str  # slug of the tenant the budget or quota belongs to (its id if not in the key's chain); "" for a key

    @property
    def quota(self) -> bool:
        """A plan's monthly request quota (not a money budget)."""
        return self.counter.scope == "q"

    @property
    def scope(self) -> str:
        """``tenant`` (its whole subtree) or ``key``."""
        return "key" if self.counter.scope == "k" else "tenant"

    @property
    def period(self) -> str:
        """``day``, ``month`` or ``total``."""
        return {"d": "day", "m": "month", "t": "total"}[self.counter.period_key[0]]

    @property
    def period_label(self) -> str:
        """The period itself: ``2026-11`` or ``2026-11-22``."""
        return self.counter.period_key[1:]

    @property
    def limit(self) -> int:
        return self.counter.limit or 0

    @property
    def left(self) -> int:
        """What remained under the limit (micro-USD, or requests for a quota)."""
        return max(0, self.limit - self.current)


def _refusal(key: KeyInfo, refused: counters.Refused) -> Refusal:
    counter = refused.counter
    slugs = {t.id: t.slug for t in key.lineage}
    owner = "" if counter.scope == "k" else slugs.get(counter.scope_id, str(counter.scope_id))
    return Refusal(counter, refused.current, refused.amount, owner)


#: Attempts at a Redis reservation while the health probe says Redis is up (slow spell, busy pool).
RETRIES_WHILE_UP = 3
#: Times a degraded reservation goes back to Redis after finding its counter handed back there.
HANDBACK_PASSES = 3


async def _reserve_parts(request_id: str, root: int, parts: list[counters.Part]) -> Reservation | counters.Refused:
    if not settings.REDIS_URL:
        return await counters.primary().reserve(request_id, root, parts)
    for _pass in range(HANDBACK_PASSES):
        if not counters.redis_suspect():
            # A failed call is retried once if the health probe finds Redis up (a slow spell, a busy
            # pool): the reservation is idempotent by request id, so a retry never reserves twice.
            for _attempt in range(RETRIES_WHILE_UP):
                try:
                    if counters.degraded():
                        await counters.redis_recovered()
                    return await counters.primary().reserve(request_id, root, parts)
                except counters.CounterUnavailable:
                    if not await counters.redis_verdict():
                        _abandon(request_id, root, parts)
                        break
        counters.degrade_or_refuse()
        try:
            return await counters.postgres().reserve(request_id, root, parts)
        except counters.RedisIsBack:
            # Another process rebuilt this budget's Redis counter: Redis is back; reserve there.
            await counters.redis_back()
    # Redis is back for the other processes but will not take this reservation: neither store may.
    raise counters.EnforcementUnavailable("Redis answers other processes but not this one")


async def reserve(request_id: str, key: KeyInfo, when: datetime, amount_micro: int) -> Reservation | Refusal | None:
    """Reserve ``amount_micro`` on every budget counter of ``key`` and its tenant chain and one
    request on every plan quota, for the periods ``when`` falls in: all or nothing.

    Returns the reservation (settle it with ``settle``), the refusal, or None when no budget or
    quota counts this key. Idempotent by ``request_id``. Raises
    ``counters.EnforcementUnavailable`` when Redis is unreachable under the ``refuse`` policy.
    """
    wanted = counters_for(key, await budgets_for(key), when)
    if not wanted:
        return None
    parts = [counters.Part(c, 1 if c.kind == "q" else amount_micro) for c in wanted]
    outcome = await _reserve_parts(request_id, key.root_id, parts)
    return _outcome(request_id, key, outcome)


async def reserve_gated(
    request_id: str, key: KeyInfo, when: datetime, amount_micro: int, gates: list[counters.Gate], gate_ttl: int
) -> tuple[Reservation | Refusal | None, counters.Gated]:
    """``reserve`` and rate-limit gates in one Redis round trip (``counters.RESERVE_LUA``).

    Only when Redis is the store: raises ``counters.CounterUnavailable`` if it cannot be reached,
    having counted nothing here; the caller then enforces the limits and the reservation the
    two-step way (per process, PostgreSQL), which applies the failure policy.
    """
    if not settings.REDIS_URL or counters.redis_suspect():
        raise counters.CounterUnavailable("Redis is not the store")
    wanted = counters_for(key, await budgets_for(key), when)
    parts = [counters.Part(c, 1 if c.kind == "q" else amount_micro) for c in wanted]
    attempts = RETRIES_WHILE_UP
    while True:
        try:
            if counters.degraded():
                await counters.redis_recovered()
            outcome, gated = await counters.primary_redis().admit(request_id, key.root_id, parts, gates, gate_ttl)
            break
        except counters.CounterUnavailable:
            attempts -= 1
            # One failed call is not an outage: retry if the probe finds Redis up. (A retry after
            # a call that did land finds the reservation and takes the gates once more at worst.)
            if not attempts or not await counters.redis_verdict():
                _abandon(request_id, key.root_id, parts)
                raise
    return (_outcome(request_id, key, outcome) if outcome is not None else None), gated


def _abandon(request_id: str, root: int, parts: list[counters.Part]) -> None:
    """A Redis reservation call failed and the request goes on without it (policy) or is refused;
    the call may still have landed (a reply lost): release it once Redis answers (settling to zero
    finds nothing if it never landed), rather than leave it until its lease ends."""
    if parts:
        reservation = counters.RedisCounters._reservation(root, request_id, parts)
        _unsettled[request_id] = _Unsettled(reservation, 0, 0, abandoned=True)


def _outcome(request_id: str, key: KeyInfo, outcome: Reservation | counters.Refused) -> Reservation | Refusal:
    if isinstance(outcome, counters.Refused):
        return _refusal(key, outcome)
    abandoned = _unsettled.get(request_id)
    if outcome.store == "redis" and abandoned is not None and abandoned.abandoned:
        # An earlier call for this request failed and was queued for release; this retry holds the
        # same reservation (idempotent by request id), live now: it settles with its request.
        # Released to zero, it would drop the money the request is about to spend.
        del _unsettled[request_id]
    _active[request_id] = outcome
    return outcome


async def settle(reservation: Reservation, actual_micro: int, requests: int, batch: RedisBatch | None = None) -> None:
    """Bring a reservation to the actual cost (``requests``: 1 if the request reached a provider,
    else 0). Settling twice changes nothing. With ``batch``, a Redis settlement joins the request's
    closing round trip. A settlement that fails (Redis down or slow) is queued and retried by the
    ``budget-settle-retry`` task until it lands; the store's settle is idempotent by request id,
    so a retry of a settlement that did land (its reply lost) changes nothing."""
    _active.pop(reservation.request_id, None)
    if batch is not None and reservation.store == "redis" and not reservation.published:
        counters.primary_redis().settle_in(
            batch,
            reservation,
            actual_micro,
            requests,
            on_error=functools.partial(_settle_failed, reservation, actual_micro, requests),
        )
        return
    try:
        await counters.store_by_name(reservation.store).settle(reservation, actual_micro, requests)
    except counters.CounterUnavailable:
        _settle_failed(reservation, actual_micro, requests)
        return
    if reservation.published:
        await sync_to_async(counters.pg_settle_copy, thread_sensitive=False)(
            reservation.request_id, actual_micro, requests
        )


def _settle_failed(
    reservation: Reservation, actual_micro: int, requests: int, exc: BaseException | None = None
) -> None:
    counters.redis_failed()
    counters.note_incident()
    _unsettled[reservation.request_id] = _Unsettled(reservation, actual_micro, requests)
    log.warning("could not settle a reservation; queued for retry", extra={"request_id": reservation.request_id})


@dataclass(slots=True)
class _Unsettled:
    reservation: Reservation
    actual_micro: int
    requests: int
    copy_settled: bool = False  # its PostgreSQL copy (``counters.publish``) is settled
    abandoned: bool = False  # a reservation call that failed: released if it landed, never copied


#: Settlements that failed, by request id: retried until they land (``retry_settlements``).
_unsettled: dict[str, _Unsettled] = {}


def unsettled_count() -> int:
    """Settlements of this process waiting for Redis."""
    return len(_unsettled)


async def retry_settlements() -> int:
    """Retry every queued settlement once. Returns how many landed. While Redis is down, the
    PostgreSQL copy of a published reservation is settled (so PostgreSQL counters hold its actual
    cost, not its reservation); the Redis settlement waits for Redis."""
    landed = 0
    for rid, item in list(_unsettled.items()):
        res = item.reservation
        if res.published and not item.copy_settled:
            try:
                await sync_to_async(counters.pg_settle_copy, thread_sensitive=False)(
                    rid, item.actual_micro, item.requests
                )
                item.copy_settled = True
            except DatabaseError:
                log.warning("could not settle a reservation's PostgreSQL copy; retried", exc_info=True)
        if res.store == "redis" and counters.redis_suspect():
            continue
        if _unsettled.get(rid) is not item:
            continue  # taken back meanwhile: an abandoned call's request reserved again (``_outcome``)
        try:
            await counters.store_by_name(res.store).settle(res, item.actual_micro, item.requests)
        except counters.CounterUnavailable:
            counters.redis_failed()
            continue
        if _unsettled.get(rid) is item:
            del _unsettled[rid]
        landed += 1
    return landed


@counters.on_redis_down
async def _publish_reservations() -> None:
    """This process lost Redis: copy its Redis reservations (running, and settled but not landed)
    to PostgreSQL, so every process's PostgreSQL counters count them."""
    running = [r for r in _active.values() if r.store == "redis" and not r.published]
    queued = [i for i in _unsettled.values() if _copyable(i)]
    settled = [(i.reservation, i.actual_micro, i.requests) for i in queued]
    if running or settled:
        await sync_to_async(counters.publish, thread_sensitive=False)(running, settled)
        for item in queued:
            item.reservation.published = True


def _copyable(item: _Unsettled) -> bool:
    return item.reservation.store == "redis" and not item.reservation.published and not item.abandoned


@background("budget-settle-retry")
async def _settle_retry_loop() -> None:
    while True:
        await asyncio.sleep(SETTLE_RETRY_INTERVAL)
        if _unsettled:
            await retry_settlements()


#: Seconds between retries of failed settlements.
SETTLE_RETRY_INTERVAL = 0.5


# --- leases and the sweeper -----------------------------------------------------------------------

#: Reservations this process holds, by request id: their leases are renewed until settled.
_active: dict[str, Reservation] = {}


async def renew_leases() -> None:
    """Extend the lease of every reservation this process holds (long streams keep theirs)."""
    groups: dict[tuple[str, int], list[str]] = {}
    for res in list(_active.values()):
        groups.setdefault((res.store, res.root), []).append(res.request_id)
    for (store, root), ids in groups.items():
        try:
            await counters.store_by_name(store).renew(root, ids)
        except counters.CounterUnavailable:
            counters.redis_failed()


@background("budget-leases")
async def _lease_loop() -> None:
    interval = float(settings.CHITTYCAN_RESERVATION_SWEEP_INTERVAL)
    last_renew = last_pg = time.monotonic()
    while True:
        await asyncio.sleep(interval)
        now = time.monotonic()
        if now - last_renew >= settings.CHITTYCAN_RESERVATION_LEASE / 3:
            last_renew = now
            await renew_leases()
        try:
            if not (settings.REDIS_URL and counters.redis_suspect()) and await counters.primary().sweep():
                counters.note_incident()
        except counters.CounterUnavailable:
            counters.redis_failed()
        if settings.REDIS_URL and (counters.degraded() or now - last_pg >= 60):
            last_pg = now
            await counters.postgres().sweep()


# --- convergence after an incident ------------------------------------------------------------

#: Seconds after an incident before the first reconcile pass (requests in flight finish).
CONVERGE_DELAY = 2.0
#: Seconds between passes, and how long after the last incident to go on (a reservation left
#: open by a request that never finished is released when its lease ends, then repaired).
CONVERGE_EVERY = 5.0
CONVERGE_WINDOW = 60.0


def _reconcile_locked() -> list[Drift]:
    """One repairing reconcile pass, unless another process is running one (a Redis lock)."""
    conn = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=5)
    lock = f"{key_prefix()}:budgets:reconciling"
    try:
        if not conn.set(lock, os.getpid(), nx=True, ex=60):
            return []
        try:
            return reconcile(repair=True, settle_time=1.0)
        finally:
            conn.delete(lock)
    finally:
        conn.close()


async def converge_once(now: float | None = None, state: dict[str, float] | None = None) -> list[Drift] | None:
    """Run a repairing reconcile pass if an incident (``counters.note_incident``, or rows the
    usage journal had to write itself) asks for one. None if no pass was due."""
    state = state if state is not None else _converge_state
    moment = now if now is not None else time.monotonic()
    lost = writer.lost_rows_written()
    if lost != state.get("lost", 0):
        state["lost"] = lost
        counters.note_incident()
    incident = counters.incident_at()
    if not incident or moment - incident < CONVERGE_DELAY or moment - incident > CONVERGE_WINDOW:
        return None
    if moment - state.get("last", 0.0) < CONVERGE_EVERY:
        return None
    if counters.redis_suspect():
        return None
    state["last"] = moment
    try:
        drifts = await sync_to_async(_reconcile_locked, thread_sensitive=False)()
    except (redis.RedisError, OSError, DatabaseError):
        log.warning("budget reconcile after an incident failed; retried", exc_info=True)
        return None
    return drifts


_converge_state: dict[str, float] = {}


@background("budget-converge")
async def _converge_loop() -> None:
    if not settings.REDIS_URL:
        return
    while True:
        await asyncio.sleep(1.0)
        await converge_once()


# --- spend against one budget ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpendStatus:
    budget_id: int
    counter: str
    period_start: datetime | None
    period_end: datetime | None
    limit_micro: int
    hard: bool
    spent_micro: int  # settled spend in the ledger for the current period
    reserved_micro: int  # live counter minus ledger: open reservations and rows not yet written (>= 0)
    live: bool = True  # False: the live counter was not built or not reachable (reserved_micro is 0 then)

    @property
    def remaining_micro(self) -> int:
        return max(0, self.limit_micro - self.spent_micro - self.reserved_micro)

    @property
    def percent(self) -> float:
        return 100.0 * self.spent_micro / self.limit_micro if self.limit_micro else 100.0


def spend_status(budget: Budget, when: datetime | None = None) -> SpendStatus:
    """Current spend against a budget (for alerts, the API and the dashboard). Synchronous.

    ``spent_micro`` comes from the ledger (the truth); ``reserved_micro`` is what the live counter
    holds beyond it (in-flight requests), read from whichever counter store is active. When that
    counter is not built yet or Redis is unreachable, ``live`` is False and the ledger alone
    answers (``reserved_micro`` 0).
    """
    counter = budget_counter(budget, when)
    spent = ledger_value(counter)
    live = counters.peek_sync(counter)
    start, end = period_bounds(counter.period_key, counter.time_zone)
    return SpendStatus(
        budget_id=budget.pk,
        counter=counter.name,
        period_start=start,
        period_end=end,
        limit_micro=budget.limit_micro,
        hard=budget.hard,
        spent_micro=spent,
        reserved_micro=max(0, (live if live is not None else spent) - spent),
        live=live is not None,
    )
