"""The budget counter reconciler: every live budget and quota counter against what PostgreSQL's ledger
says it must hold (settled spend, plus rows handed off but not yet written, plus open reservations
in Redis and PostgreSQL); it repairs the drift it can prove and reports the rest.

Celery beat runs it every ``CHITTYCAN_RECONCILE_INTERVAL`` seconds (the ``tenants.reconcile_budgets``
task, ``budgets.tasks``); each gateway process also runs it after an incident (``budgets.service``:
the ``budget-converge`` task). It lives apart from the Celery tasks so that a gateway process,
which imports ``budgets.service``, does not import Celery (about 20 MiB resident) for it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import redis
from django.conf import settings

from budgets import counters, periods, spend
from budgets.models import Budget
from tenants.models import Tenant

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Drift:
    counter: str
    root: int
    live: int
    expected: int
    quiet: bool = True  # no reservation open on it (either store) and no row of it pending
    repaired: bool = False

    @property
    def drift(self) -> int:
        return self.live - self.expected


def live_counters(when: datetime | None = None) -> list[tuple[int, periods.Counter]]:
    """Every budget and plan-quota counter of the current periods, with its tree's root id, once
    each (budgets of one scope and period share a counter)."""
    now = when or datetime.now(UTC)
    roots: dict[int, int] = {}

    def root_of(tenant: Tenant) -> int:
        if tenant.pk not in roots:
            chain = [tenant, *tenant.ancestors()]
            roots[tenant.pk] = int(chain[-1].pk)
        return roots[tenant.pk]

    found: list[tuple[int, periods.Counter]] = []
    seen: set[str] = set()
    for budget in Budget.objects.select_related("tenant", "api_key__tenant").order_by("-hard", "pk"):
        owner = budget.tenant if budget.tenant_id else budget.api_key.tenant  # type: ignore[union-attr]
        assert owner is not None
        counter = periods.budget_counter(budget, now)
        if counter.name in seen:
            continue  # a hard budget and its soft levels share one counter: check (and repair) it once
        seen.add(counter.name)
        found.append((root_of(owner), counter))
    for tenant in Tenant.objects.filter(plan__monthly_request_quota__isnull=False).select_related("plan"):
        assert tenant.plan is not None and tenant.plan.monthly_request_quota is not None
        name = f"q{tenant.pk}:{periods.period_key('month', tenant.time_zone, now)}"
        quota = int(tenant.plan.monthly_request_quota)
        counter = periods.Counter(name, "q", quota, periods.MONTH_TTL, tenant.time_zone)
        found.append((root_of(tenant), counter))
    return found


def _open_reservations(conn: Any, root: int) -> dict[str, list[tuple[str, int, str]]]:
    """The tree's open Redis reservations: request id -> [(counter key, amount, kind), ...]."""
    found: dict[str, list[tuple[str, int, str]]] = {}
    for rid, raw in conn.hgetall(counters._res_key(root)).items():
        name = rid.decode() if isinstance(rid, bytes) else str(rid)
        found[name] = [(str(k), int(a), str(kind)) for k, a, kind in orjson.loads(raw)]
    return found


def _row_value(counter: periods.Counter, cost: int) -> int:
    return 1 if counter.kind == "q" else cost


def measure_drift() -> list[Drift]:
    """One pass: every Redis counter that exists and differs from what the ledger side says.

    Expected: the ledger, plus rows handed off but not yet written (stream, spool, journals),
    plus open Redis reservations at their reserved amount (a request whose row is already counted
    but whose settlement has not landed yet counts at its reserved amount, as in the counter),
    plus PostgreSQL reservations not yet in the ledger (degraded requests)."""
    if not settings.REDIS_URL:
        return []
    conn = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=5)
    try:
        unwritten = counters._unwritten_rows()
        pending_ids = {str(r["request_id"]) for r in unwritten}
        pending_cost = {str(r["request_id"]): int(r.get("cost_micro") or 0) for r in unwritten}
        pg_open = counters._pg_open_amounts(pending_ids)
        drifts: list[Drift] = []
        open_by_root: dict[int, dict[str, list[tuple[str, int, str]]]] = {}
        for root, counter in live_counters():
            key = counters.counter_key(root, counter.name)
            raw = conn.get(key)
            if raw is None:
                continue  # not built yet: it is built from the ledger when first used
            if root not in open_by_root:
                open_by_root[root] = _open_reservations(conn, root)
            mine = {rid: amt for rid, ps in open_by_root[root].items() for k, amt, _ in ps if k == key}
            # Requests still open here whose row the ledger side already has: the counter holds
            # their reservation, not their row, until their settlement lands.
            counted = counters._ledger_costs_known(list(mine), pending_cost) if mine else {}
            in_rows = sum(_row_value(counter, cost) for cost in counted.values())
            with_pending = spend.ledger_value(counter, unwritten)
            pending_part = with_pending - spend.ledger_value(counter) if unwritten else 0
            expected = with_pending - in_rows + sum(mine.values())
            expected += pg_open.get(counter.name, 0)
            live = int(raw)
            quiet = not mine and not pg_open.get(counter.name) and not pending_part
            if live != expected:
                drifts.append(Drift(counter.name, root, live, expected, quiet))
        return drifts
    finally:
        conn.close()


# KEYS[1] counter, KEYS[2] the tree's reservations. ARGV[1] the value measured, ARGV[2] the
# correction, ARGV[3] 1 if the counter must have no open reservation. Applies the correction
# only if the counter still holds what was measured (and is still quiet, when asked).
REPAIR_LUA = """
local live = redis.call('GET', KEYS[1])
if not live or live ~= ARGV[1] then return 0 end
if ARGV[3] == '1' then
  for _, raw in ipairs(redis.call('HVALS', KEYS[2])) do
    for _, p in ipairs(cjson.decode(raw)) do
      if p[1] == KEYS[1] then return 0 end
    end
  end
end
redis.call('INCRBY', KEYS[1], ARGV[2])
return 1
"""


def unrepaired_key() -> str:
    """Redis hash of drift the reconciler could not prove and left for a human: counter -> JSON."""
    return f"{settings.REDIS_PREFIX}:budgets:unrepaired"


def reconcile(*, repair: bool = False, settle_time: float = 1.0) -> list[Drift]:
    """Report counters that disagree with the ledger twice in a row (``settle_time`` apart, so a
    request finishing between the two reads is not reported).

    With ``repair``, correct the drift that can be proven: a counter that is quiet (no open
    reservation in either store, no row of it pending) in both reads and still holds the value
    measured when corrected; and a counter *below* the ledger side in both reads (raising it can
    only refuse early, never admit too much). The rest (a busy counter above the ledger) is
    logged as an error and recorded in ``unrepaired_key()``; the next quiet moment repairs it."""
    first = {(d.root, d.counter): d for d in measure_drift()}
    if not first:
        if repair and settings.REDIS_URL:
            _clear_unrepaired()
        return []
    time.sleep(settle_time)
    persistent = [d for d in measure_drift() if (d.root, d.counter) in first and _same(first[(d.root, d.counter)], d)]
    result: list[Drift] = []
    conn = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=5) if repair and persistent else None
    try:
        for d in persistent:
            quiet = d.quiet and first[(d.root, d.counter)].quiet
            done = False
            if conn is not None and (quiet or d.drift < 0):
                keys = [counters.counter_key(d.root, d.counter), counters._res_key(d.root)]
                done = bool(conn.eval(REPAIR_LUA, 2, *keys, d.live, -d.drift, 1 if quiet else 0))
            extra = {"counter": d.counter, "live": d.live, "expected": d.expected, "quiet": quiet}
            if done:
                log.warning("budget counter drift repaired", extra=extra)
                conn.hdel(unrepaired_key(), d.counter)  # type: ignore[union-attr]
            else:
                log.error("budget counter drift", extra=extra)
                if conn is not None:
                    conn.hset(unrepaired_key(), d.counter, orjson.dumps({**extra, "at": time.time()}))
            result.append(Drift(d.counter, d.root, d.live, d.expected, quiet, done))
    finally:
        if conn is not None:
            conn.close()
    return result


def _same(a: Drift, b: Drift) -> bool:
    return (a.live, a.expected) == (b.live, b.expected)


def _clear_unrepaired() -> None:
    conn = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=5)
    try:
        conn.delete(unrepaired_key())
    finally:
        conn.close()
