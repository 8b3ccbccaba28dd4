"""Budget counter stores: reserve the worst case on every counter at once, settle to the actual.

One interface (``CounterStore``: reserve, settle, renew, sweep), three implementations:

- ``RedisCounters`` (production): one Lua script per operation, a single round trip, all or
  nothing across every counter of the request. All keys of one tenant tree share the hash tag
  ``{<root tenant id>}`` so Redis Cluster can run the scripts. Amounts are integers (INCRBY).
- ``PostgresCounters``: the same semantics with row locks (``SELECT ... FOR UPDATE`` on the
  ``BudgetCounter`` rows in name order, then ``UPDATE``), used while Redis is unreachable and
  ``CHITTYCAN_REDIS_FAILURE_POLICY=degrade``.
- ``MemoryCounters``: embedded mode (no ``REDIS_URL``), one process.

Every store keeps reservations by request id with a lease. ``settle`` applies ``actual -
reserved`` to each counter and forgets the reservation; settling again finds nothing and changes
nothing. A reservation whose lease expired (its process crashed) is released by the sweeper and
remembered as *swept*: a late settle then charges the actual amount.

A counter that does not exist yet (first use, new period, new budget, Redis restarted, or counters
dropped after an outage) is built from the ledger (``budgets.spend.ledger_value``) plus open
reservations before the request is admitted. Redis counters are therefore rebuilt from
PostgreSQL at start and after an outage without a separate step.

Which store serves a request, and what this process knows of Redis's health, is at the end of
this module (``primary``, ``postgres``, ``redis_failed``, ``redis_recovered``...). When Redis is
unreachable ``CHITTYCAN_REDIS_FAILURE_POLICY`` decides: ``degrade_or_refuse`` raises
``EnforcementUnavailable`` under ``refuse``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections, transaction
from django.db.models import F

from budgets.models import BudgetCounter, BudgetReservation
from budgets.periods import Counter
from budgets.spend import in_ledger, ledger_value
from core.runtime import OnError, RedisBatch, key_prefix, redis_client, run_script
from ledger import writer
from ledger.models import UsageRecord
from tenants.models import ApiKey, Tenant

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Part:
    counter: Counter
    amount: int


@dataclass(slots=True)
class Refused:
    """Why a reservation was refused: the first counter that would go over its limit."""

    counter: Counter
    current: int
    amount: int


@dataclass(slots=True)
class Reservation:
    store: str  # redis | postgres | memory
    root: int
    request_id: str
    counters: list[str] = field(default_factory=list)
    #: (counter name, amount, kind) per counter: what a copy in PostgreSQL needs (see ``publish``).
    parts: list[tuple[str, int, str]] = field(default_factory=list)
    #: A Redis reservation copied to PostgreSQL when this process lost Redis (``publish``).
    published: bool = False


@dataclass(frozen=True, slots=True)
class Gate:
    """A rate-limit window taken with a Redis reservation, in the same script (see ``RESERVE_LUA``).

    ``key`` must carry the tree's hash tag so one script can touch it with the counters."""

    key: str
    amount: int
    limit: int
    per_request: bool  # counted even when a budget refuses (requests per minute, not tokens)


@dataclass(slots=True)
class Gated:
    """What the gates said: each one's value after the call, and the full one (if any)."""

    values: list[int]
    full: int | None = None  # index of the gate that had no room (then nothing was counted)


class CounterUnavailable(Exception):
    """The store cannot be reached (Redis down); the failure policy decides what happens."""


class EnforcementUnavailable(Exception):
    """Redis is unreachable and the failure policy is ``refuse``: nothing can be admitted."""


class RedisIsBack(Exception):
    """A degraded reservation found its PostgreSQL counter handed back: another process rebuilt
    the Redis counter since this one lost Redis, so Redis answers again and enforces this budget.
    Reserving in PostgreSQL too would let both stores admit the same money."""


class CounterStore(ABC):
    """Where budget and quota counters and their open reservations live.

    ``reserve`` adds every part or none (refusing on the first counter a part would take over its
    limit) and is idempotent by request id. ``settle`` brings a reservation to the actual amounts
    exactly once (True if it found something to settle). ``renew`` extends the leases of
    reservations still running; ``sweep`` releases those whose lease expired and returns how many.
    Redis stores raise ``CounterUnavailable`` when they cannot be reached.
    """

    name: str

    @abstractmethod
    async def reserve(self, request_id: str, root: int, parts: list[Part]) -> Reservation | Refused: ...

    @abstractmethod
    async def settle(self, reservation: Reservation, actual_micro: int, actual_requests: int) -> bool: ...

    @abstractmethod
    async def renew(self, root: int, request_ids: list[str]) -> None: ...

    @abstractmethod
    async def sweep(self, now: float | None = None) -> int: ...


# --- key names --------------------------------------------------------------------------------


def _tree(root: int) -> str:
    return f"{key_prefix()}:bud:{{{root}}}"


def counter_key(root: int, name: str) -> str:
    return f"{_tree(root)}:c:{name}"


def _res_key(root: int) -> str:
    return f"{_tree(root)}:res"


def _lease_key(root: int) -> str:
    return f"{_tree(root)}:lease"


def _swept_key(root: int) -> str:
    return f"{_tree(root)}:swept"


def _late_key(root: int) -> str:
    """Settlements that found a counter missing (dropped, not yet rebuilt): ``<request id>|<counter
    key>`` -> actual. A build running at that moment adds them (see ``BUILD_LUA``)."""
    return f"{_tree(root)}:late"


#: Seconds a settlement that found its counter missing is remembered for builds in progress.
LATE_TTL = 300


# --- Lua ---------------------------------------------------------------------------------------
# KEYS[1] reservations hash, KEYS[2] lease zset, KEYS[3..2+n] counters, then the gates' keys.
# ARGV[1] request id, ARGV[2] lease expiry (ms), ARGV[3] n (counters), ARGV[4] gate ttl (s),
# then per counter: amount, limit (-1: none), ttl, kind; then per gate: amount, limit, per-request.
# Gates are rate-limit windows taken in the same call (one round trip for the whole admission):
# all must have room, or nothing is counted; a budget refusal still counts the per-request ones.
# Returns {1, gates...} admitted, {2} already reserved (idempotent), {0, i, current, gates...}
# refused on counter i, {3, i, j, ...} counters i, j... do not exist yet (build them from the
# ledger, then retry), {4, j, gates...} gate j is full. ``gates...``: each gate's value after.
RESERVE_LUA = """
local rid = ARGV[1]
local n = tonumber(ARGV[3])
local m = #KEYS - 2 - n
local g0 = 4 + n * 4
if n > 0 and redis.call('HEXISTS', KEYS[1], rid) == 1 then return {2} end
local missing = {}
for i = 1, n do
  if redis.call('EXISTS', KEYS[2 + i]) == 0 then missing[#missing + 1] = i end
end
if #missing > 0 then return {3, unpack(missing)} end
local gates = {}
for j = 1, m do gates[j] = tonumber(redis.call('GET', KEYS[2 + n + j]) or '0') end
for j = 1, m do
  if gates[j] + tonumber(ARGV[g0 + (j - 1) * 3 + 1]) > tonumber(ARGV[g0 + (j - 1) * 3 + 2]) then
    return {4, j, unpack(gates)}
  end
end
local refused, current = 0, 0
for i = 1, n do
  local limit = tonumber(ARGV[4 + (i - 1) * 4 + 2])
  if limit >= 0 then
    local value = tonumber(redis.call('GET', KEYS[2 + i]))
    if value + tonumber(ARGV[4 + (i - 1) * 4 + 1]) > limit then
      refused, current = i, value
      break
    end
  end
end
for j = 1, m do
  local base = g0 + (j - 1) * 3
  if refused == 0 or ARGV[base + 3] == '1' then
    gates[j] = redis.call('INCRBY', KEYS[2 + n + j], ARGV[base + 1])
    redis.call('EXPIRE', KEYS[2 + n + j], ARGV[4])
  end
end
if refused > 0 then return {0, refused, current, unpack(gates)} end
if n == 0 then return {1, unpack(gates)} end
local parts = {}
for i = 1, n do
  local base = 4 + (i - 1) * 4
  redis.call('INCRBY', KEYS[2 + i], ARGV[base + 1])
  local ttl = tonumber(ARGV[base + 3])
  if ttl > 0 then redis.call('EXPIRE', KEYS[2 + i], ttl) end
  parts[i] = {KEYS[2 + i], ARGV[base + 1], ARGV[base + 4]}
end
redis.call('HSET', KEYS[1], rid, cjson.encode(parts))
redis.call('ZADD', KEYS[2], ARGV[2], rid)
return {1, unpack(gates)}
"""

# KEYS[1] reservations, KEYS[2] lease, KEYS[3] swept, KEYS[4] late, KEYS[5..] the request's counters.
# ARGV[1] request id, ARGV[2] actual micro-USD, ARGV[3] actual requests (0 or 1), ARGV[4] late ttl.
# Open reservation: counter += actual - reserved. Swept: counter += actual. Neither: nothing.
# A counter that no longer exists is left alone (it is rebuilt from the ledger when next used),
# but the settlement is noted in the late hash for a build that read the ledger before it.
SETTLE_LUA = """
local rid = ARGV[1]
local raw = redis.call('HGET', KEYS[1], rid)
local swept = false
if not raw then
  raw = redis.call('HGET', KEYS[3], rid)
  if not raw then return 0 end
  swept = true
end
for _, p in ipairs(cjson.decode(raw)) do
  local actual = tonumber(ARGV[2])
  if p[3] == 'q' then actual = tonumber(ARGV[3]) end
  local delta = actual
  if not swept then delta = actual - tonumber(p[2]) end
  if redis.call('EXISTS', p[1]) == 1 then
    if delta ~= 0 then redis.call('INCRBY', p[1], delta) end
  elseif not swept then
    redis.call('HSET', KEYS[4], rid .. '|' .. p[1], actual)
    redis.call('EXPIRE', KEYS[4], ARGV[4])
  end
end
redis.call('HDEL', KEYS[1], rid)
redis.call('HDEL', KEYS[3], rid)
redis.call('ZREM', KEYS[2], rid)
return 1
"""

# KEYS[1] reservations, KEYS[2] lease, KEYS[3] swept, KEYS[4..] the reservation's counters.
# ARGV[1] request id, ARGV[2] now (ms). Releases one reservation if its lease is still expired.
RELEASE_LUA = """
local rid = ARGV[1]
local expiry = redis.call('ZSCORE', KEYS[2], rid)
if not expiry or tonumber(expiry) > tonumber(ARGV[2]) then return 0 end
local raw = redis.call('HGET', KEYS[1], rid)
redis.call('ZREM', KEYS[2], rid)
if not raw then return 0 end
for _, p in ipairs(cjson.decode(raw)) do
  if redis.call('EXISTS', p[1]) == 1 then redis.call('DECRBY', p[1], p[2]) end
end
redis.call('HDEL', KEYS[1], rid)
redis.call('HSET', KEYS[3], rid, raw)
return 1
"""

# KEYS[1] reservations, KEYS[2] leases, KEYS[3] swept, KEYS[4] late, KEYS[5..4+n] counters to build.
# ARGV[1] n, ARGV[2] m, then per counter: ledger value, ttl; then m request ids that were open when
# the ledger was read but whose row it did not have (settled since: their late actual is added);
# then per request whose usage row the ledger side already counts (in the ledger, the stream, a
# spool or a journal): request id, actual micro-USD.
# Such a reservation is settled here (its counters that exist get actual - reserved, or actual if
# it was swept) and forgotten, so the ledger is its only count; a settle arriving later finds
# nothing. Then each counter that still does not exist is set to ledger + its open reservations.
BUILD_LUA = """
local n, m = tonumber(ARGV[1]), tonumber(ARGV[2])
local first = 3 + n * 2
local late = {}
for j = first, first + m - 1 do
  local rid = ARGV[j]
  if redis.call('HEXISTS', KEYS[1], rid) == 0 then
    for i = 5, 4 + n do
      local got = redis.call('HGET', KEYS[4], rid .. '|' .. KEYS[i])
      if got then late[KEYS[i]] = (late[KEYS[i]] or 0) + tonumber(got) end
    end
  end
end
for j = first + m, #ARGV - 1, 2 do
  local rid, actual = ARGV[j], tonumber(ARGV[j + 1])
  local raw = redis.call('HGET', KEYS[1], rid)
  local swept = false
  if not raw then
    raw = redis.call('HGET', KEYS[3], rid)
    swept = true
  end
  if raw then
    for _, p in ipairs(cjson.decode(raw)) do
      local a = actual
      if p[3] == 'q' then a = 1 end
      local delta = a
      if not swept then delta = a - tonumber(p[2]) end
      if delta ~= 0 and redis.call('EXISTS', p[1]) == 1 then redis.call('INCRBY', p[1], delta) end
    end
    redis.call('HDEL', KEYS[1], rid)
    redis.call('HDEL', KEYS[3], rid)
    redis.call('ZREM', KEYS[2], rid)
  end
end
local open = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 2, #all, 2 do
  for _, p in ipairs(cjson.decode(all[i])) do
    open[p[1]] = (open[p[1]] or 0) + tonumber(p[2])
  end
end
local built = 0
for i = 5, 4 + n do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    local value = tonumber(ARGV[(i - 5) * 2 + 3]) + (open[KEYS[i]] or 0) + (late[KEYS[i]] or 0)
    redis.call('SET', KEYS[i], string.format('%d', value))
    local ttl = tonumber(ARGV[(i - 5) * 2 + 4])
    if ttl > 0 then redis.call('EXPIRE', KEYS[i], ttl) end
    built = built + 1
  end
end
return built
"""

# KEYS[1] leases, KEYS[2] leases... ARGV[1] new expiry (ms), ARGV[2..] request ids (all in KEYS[1]).
RENEW_LUA = """
local n = 0
for i = 2, #ARGV do n = n + redis.call('ZADD', KEYS[1], 'XX', 'CH', ARGV[1], ARGV[i]) end
return n
"""


#: What redis-py's blocking pool says when no connection freed up within its timeout.
POOL_BUSY = "No connection available."
#: How long a reservation waits, in all, for a pooled connection before the probe is asked.
BUSY_WAIT = 30.0


def _lease_seconds() -> float:
    return float(settings.CHITTYCAN_RESERVATION_LEASE)


# --- Redis ---------------------------------------------------------------------------------------


class RedisCounters(CounterStore):
    name = "redis"

    def __init__(self) -> None:
        self._scripts: dict[tuple[int, str], Any] = {}

    def _script(self, lua: str) -> Any:
        conn = redis_client()
        slot = (id(conn), lua)
        script = self._scripts.get(slot)
        if script is None:
            script = self._scripts[slot] = conn.register_script(lua)
        return script

    async def _run(self, lua: str, keys: list[str], args: list[Any]) -> Any:
        deadline: float | None = None
        while True:
            try:
                return await run_script(self._script(lua), keys, args)
            except redis.ConnectionError as exc:
                if str(exc) == POOL_BUSY:
                    # Every pooled connection is in use: Redis is busy, not down. Wait on.
                    deadline = deadline or time.monotonic() + BUSY_WAIT
                    if time.monotonic() < deadline:
                        continue
                raise CounterUnavailable(str(exc)) from exc
            except (redis.TimeoutError, OSError) as exc:
                raise CounterUnavailable(str(exc)) from exc

    async def reserve(self, request_id: str, root: int, parts: list[Part]) -> Reservation | Refused:
        outcome, _ = await self.admit(request_id, root, parts, [], 0)
        assert outcome is not None  # without gates nothing can be gated
        return outcome

    async def admit(
        self, request_id: str, root: int, parts: list[Part], gates: list[Gate], gate_ttl: int
    ) -> tuple[Reservation | Refused | None, Gated]:
        """``reserve`` and the gates in one script: the reservation (or refusal) and what the gates
        said. No outcome when there are no parts, or when a gate was full (``Gated.full``: then
        nothing at all was counted)."""
        keys = [_res_key(root), _lease_key(root), *(counter_key(root, p.counter.name) for p in parts)]
        keys.extend(g.key for g in gates)
        args: list[Any] = [request_id, int((time.time() + _lease_seconds()) * 1000), len(parts), gate_ttl]
        for p in parts:
            limit = p.counter.limit if p.counter.limit is not None else -1
            args.extend((p.amount, limit, p.counter.ttl, p.counter.kind))
        for g in gates:
            args.extend((g.amount, g.limit, 1 if g.per_request else 0))
        for _ in range(3):
            result = await self._run(RESERVE_LUA, keys, args)
            status = int(result[0])
            if status == 1:
                reservation = self._reservation(root, request_id, parts) if parts else None
                return reservation, Gated([int(v) for v in result[1:]])
            if status == 2:
                return self._reservation(root, request_id, parts), Gated([0] * len(gates))
            if status == 0:
                index = int(result[1]) - 1
                refused = Refused(parts[index].counter, int(result[2]), parts[index].amount)
                return refused, Gated([int(v) for v in result[3:]])
            if status == 4:
                return None, Gated([int(v) for v in result[2:]], full=int(result[1]) - 1)
            await self.build(root, [parts[int(i) - 1].counter for i in result[1:]])
        raise CounterUnavailable("budget counters could not be built")

    @staticmethod
    def _reservation(root: int, request_id: str, parts: list[Part]) -> Reservation:
        return Reservation(
            "redis",
            root,
            request_id,
            [p.counter.name for p in parts],
            [(p.counter.name, p.amount, p.counter.kind) for p in parts],
        )

    async def build(self, root: int, missing: list[Counter]) -> None:
        """Build counters from the ledger, rows not yet written, and reservations still open (in
        Redis, and in PostgreSQL from an outage's degraded requests still running)."""
        try:
            conn = redis_client()
            opened = await conn.hkeys(_res_key(root))
            ids = [*opened, *(await conn.hkeys(_swept_key(root)))]
        except (redis.RedisError, OSError) as exc:
            raise CounterUnavailable(str(exc)) from exc
        request_ids = [i.decode() if isinstance(i, bytes) else str(i) for i in ids]
        open_ids = [i.decode() if isinstance(i, bytes) else str(i) for i in opened]
        try:
            values, done = await sync_to_async(_build_values, thread_sensitive=False)(missing, request_ids)
        except (redis.RedisError, OSError) as exc:
            raise CounterUnavailable(str(exc)) from exc
        unknown = [rid for rid in open_ids if rid not in done]
        args: list[Any] = [len(missing), len(unknown)]
        for counter, value in zip(missing, values, strict=True):
            args.extend((value, counter.ttl))
        args.extend(unknown)
        for rid, actual in done.items():
            args.extend((rid, actual))
        keys = [_res_key(root), _lease_key(root), _swept_key(root), _late_key(root)]
        keys.extend(counter_key(root, c.name) for c in missing)
        await self._run(BUILD_LUA, keys, args)

    async def settle(self, reservation: Reservation, actual_micro: int, actual_requests: int) -> bool:
        root = reservation.root
        keys = [
            _res_key(root),
            _lease_key(root),
            _swept_key(root),
            _late_key(root),
            *(counter_key(root, n) for n in reservation.counters),
        ]
        args = [reservation.request_id, actual_micro, actual_requests, LATE_TTL]
        done = await self._run(SETTLE_LUA, keys, args)
        return bool(done)

    def settle_in(
        self, batch: RedisBatch, reservation: Reservation, actual_micro: int, actual_requests: int, on_error: OnError
    ) -> None:
        """``settle``, sent with the request's other closing commands in one round trip."""
        root = reservation.root
        keys = [_res_key(root), _lease_key(root), _swept_key(root), _late_key(root)]
        keys.extend(counter_key(root, n) for n in reservation.counters)
        args = [reservation.request_id, actual_micro, actual_requests, LATE_TTL]
        batch.script(self._script(SETTLE_LUA), keys, args, on_error)

    async def renew(self, root: int, request_ids: list[str]) -> None:
        expiry = int((time.time() + _lease_seconds()) * 1000)
        await self._run(RENEW_LUA, [_lease_key(root)], [expiry, *request_ids])

    async def sweep(self, now: float | None = None) -> int:
        """End every reservation whose lease expired (its process died, or its settlement never
        landed): settled to its usage row's cost if the ledger has the row, else released.
        Returns how many."""
        conn = redis_client()
        now_ms = int((now if now is not None else time.time()) * 1000)
        released = 0
        try:
            expired: list[tuple[int, str, str]] = []
            async for raw_key in conn.scan_iter(match=f"{key_prefix()}:bud:*:lease", count=500):
                lease = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
                root = int(lease.split("{", 1)[1].split("}", 1)[0])
                for rid_raw in await conn.zrangebyscore(lease, "-inf", now_ms, start=0, num=500):
                    expired.append((root, lease, rid_raw.decode() if isinstance(rid_raw, bytes) else str(rid_raw)))
            if not expired:
                return 0
            costs = await sync_to_async(_ledger_costs, thread_sensitive=False)([rid for _, _, rid in expired])
            for root, lease, rid in expired:
                raw = await conn.hget(_res_key(root), rid)
                names = [p[0] for p in orjson.loads(raw)] if raw else []
                if rid in costs:
                    keys = [_res_key(root), lease, _swept_key(root), _late_key(root), *names]
                    args = [rid, costs[rid], 1, LATE_TTL]
                    released += int(await self._script(SETTLE_LUA)(keys=keys, args=args))
                    continue
                keys = [_res_key(root), lease, _swept_key(root), *names]
                released += int(await self._script(RELEASE_LUA)(keys=keys, args=[rid, now_ms]))
        except (redis.RedisError, OSError) as exc:
            raise CounterUnavailable(str(exc)) from exc
        return released

    async def drop_all(self) -> int:
        """Forget every counter (they are rebuilt from the ledger when next used). Reservations stay."""
        conn = redis_client()
        dropped = 0
        try:
            async for key in conn.scan_iter(match=f"{key_prefix()}:bud:*:c:*", count=1000):
                dropped += int(await conn.delete(key))
        except (redis.RedisError, OSError) as exc:
            raise CounterUnavailable(str(exc)) from exc
        return dropped


def _unwritten_rows() -> list[dict[str, Any]]:
    """Usage rows handed off (Redis stream, this host's spool) but not yet in the ledger."""
    return writer.pending_rows()


def _ledger_values(counters: list[Counter], include_stream: bool) -> list[int]:
    close_old_connections()
    unwritten = _unwritten_rows() if include_stream and settings.REDIS_URL else []
    return [ledger_value(c, unwritten) for c in counters]


def _ledger_costs(request_ids: list[str]) -> dict[str, int]:
    """The cost of each of these requests whose usage row is in the ledger or handed off."""
    close_old_connections()
    wanted = set(request_ids)
    costs = {
        rid: int(cost)
        for rid, cost in UsageRecord.objects.filter(request_id__in=list(wanted)).values_list("request_id", "cost_micro")
    }
    try:
        pending = _unwritten_rows()
    except (redis.RedisError, OSError):
        pending = []
    for row in pending:
        rid = str(row.get("request_id"))
        if rid in wanted and rid not in costs:
            costs[rid] = int(row.get("cost_micro") or 0)
    return costs


def _ledger_costs_known(request_ids: list[str], pending_cost: dict[str, int]) -> dict[str, int]:
    """The cost of each of these requests whose row is in the ledger or among ``pending_cost``."""
    costs = {rid: pending_cost[rid] for rid in request_ids if rid in pending_cost}
    for rid, cost in UsageRecord.objects.filter(request_id__in=request_ids).values_list("request_id", "cost_micro"):
        costs[rid] = int(cost)
    return costs


def _build_values(counters: list[Counter], open_ids: list[str]) -> tuple[list[int], dict[str, int]]:
    """What new Redis counters must hold, and which open (or swept) Redis reservations the ledger
    side already counts (their usage row is written or handed off), with each one's cost.

    Each value: the ledger, plus rows handed off but not yet written (stream, spool, journals),
    plus what PostgreSQL reservations add (degraded requests of any process, still running or
    settled with their row not yet handed off), so a counter built while another process is still
    degraded does not miss that process's requests in flight (counted at their reserved amount,
    which the reconciler brings down to the actual once they are done)."""
    close_old_connections()
    _hand_back([c.name for c in counters])
    unwritten = _unwritten_rows()
    pending_ids = {str(r["request_id"]) for r in unwritten}
    values = [ledger_value(c, unwritten) for c in counters]
    extra = _pg_open_amounts(pending_ids)
    if any(extra.get(c.name) for c in counters):
        note_incident()  # counted at their reserved amount: the reconciler brings them to actual
    values = [v + extra.get(c.name, 0) for c, v in zip(counters, values, strict=True)]
    wanted = set(open_ids)
    done = {
        rid: int(cost)
        for rid, cost in UsageRecord.objects.filter(request_id__in=list(wanted)).values_list("request_id", "cost_micro")
    }
    for row in unwritten:
        rid = str(row["request_id"])
        if rid in wanted and rid not in done:
            done[rid] = int(row.get("cost_micro") or 0)
    return values, done


def _hand_back(names: list[str]) -> None:
    """Mark these PostgreSQL counters handed back to Redis, under their row locks, before a Redis
    counter is built from what PostgreSQL holds. A degraded reservation takes the same locks: one
    that committed first is in the build's sums; one that comes after sees the mark and goes back
    to Redis (``RedisIsBack``) instead of admitting money the Redis counter does not count."""
    now = datetime.now(UTC)
    with transaction.atomic():
        BudgetCounter.objects.bulk_create(
            [BudgetCounter(name=n, value=0, synced_at=datetime(2000, 1, 1, tzinfo=UTC)) for n in names],
            ignore_conflicts=True,
        )
        # Locked in name order, as reservations take them (an UPDATE alone may lock in any order).
        list(BudgetCounter.objects.select_for_update().filter(name__in=names).order_by("name"))
        BudgetCounter.objects.filter(name__in=names).update(handed_back_at=now)


def _add_amounts(amounts: dict[str, int], res: BudgetReservation) -> None:
    """Add what a PostgreSQL reservation holds per counter: its reserved amount while open, its
    actual once settled."""
    for name, amount, kind in res.parts:
        if res.settled_at is None:
            value = int(amount)
        else:
            value = res.actual_requests if kind == "q" else res.actual_micro
        amounts[name] = amounts.get(name, 0) + value


def _pg_open_amounts(pending_ids: set[str]) -> dict[str, int]:
    """Per counter name: PostgreSQL reservations not swept whose usage row is neither in the
    ledger nor handed off: open ones at their reserved amount, settled ones at their actual."""
    reservations = [r for r in BudgetReservation.objects.filter(swept=False) if r.request_id not in pending_ids]
    if not reservations:
        return {}
    written = in_ledger(r.request_id for r in reservations)
    amounts: dict[str, int] = {}
    for res in reservations:
        if res.request_id in written:
            continue
        _add_amounts(amounts, res)
    return amounts


# --- PostgreSQL --------------------------------------------------------------------------------


class PostgresCounters(CounterStore):
    """Row-locked counters in PostgreSQL. Rows are re-synced from the ledger the first time this
    process touches them after ``since`` (the moment it lost Redis)."""

    name = "postgres"

    def __init__(self) -> None:
        self.since: datetime = datetime.now(UTC)

    async def reserve(self, request_id: str, root: int, parts: list[Part]) -> Reservation | Refused:
        return await sync_to_async(self._reserve, thread_sensitive=False)(request_id, root, parts)

    def _sync_rows(self, names: list[str], counters: dict[str, Counter]) -> dict[str, Any]:
        BudgetCounter.objects.bulk_create(
            [BudgetCounter(name=n, value=0, synced_at=datetime(2000, 1, 1, tzinfo=UTC)) for n in names],
            ignore_conflicts=True,
        )
        rows = {r.name: r for r in BudgetCounter.objects.select_for_update().filter(name__in=names).order_by("name")}
        stale = [n for n in names if rows[n].synced_at < self.since and n in counters]
        if stale:
            # Rows not yet in the ledger that this host holds (spool, journals: Redis is out of
            # reach), and every PostgreSQL reservation (including Redis reservations that
            # processes copied here when they lost Redis), each request once.
            local = writer.local_pending_rows()
            pending = _pg_pending_amounts({str(r["request_id"]) for r in local})
            now = datetime.now(UTC)
            for n in stale:
                rows[n].value = ledger_value(counters[n], local) + pending.get(n, 0)
                rows[n].synced_at = now
                rows[n].save(update_fields=["value", "synced_at"])
        return rows

    def _reserve(self, request_id: str, root: int, parts: list[Part]) -> Reservation | Refused:
        close_old_connections()
        names = sorted(p.counter.name for p in parts)
        with transaction.atomic():
            if BudgetReservation.objects.filter(request_id=request_id).exists():
                return Reservation("postgres", root, request_id, names)
            rows = self._sync_rows(names, {p.counter.name: p.counter for p in parts})
            if any(r.handed_back_at is not None and r.handed_back_at >= self.since for r in rows.values()):
                raise RedisIsBack(request_id)
            for p in parts:
                row = rows[p.counter.name]
                if p.counter.limit is not None and row.value + p.amount > p.counter.limit:
                    return Refused(p.counter, row.value, p.amount)
            for p in parts:
                row = rows[p.counter.name]
                row.value += p.amount
                row.save(update_fields=["value"])
            BudgetReservation.objects.create(
                request_id=request_id,
                parts=[[p.counter.name, p.amount, p.counter.kind] for p in parts],
                expires_at=datetime.now(UTC) + timedelta(seconds=_lease_seconds()),
            )
        return Reservation("postgres", root, request_id, names)

    async def settle(self, reservation: Reservation, actual_micro: int, actual_requests: int) -> bool:
        return await sync_to_async(_pg_settle, thread_sensitive=False)(
            reservation.request_id, actual_micro, actual_requests
        )

    async def renew(self, root: int, request_ids: list[str]) -> None:
        await sync_to_async(_pg_renew, thread_sensitive=False)(request_ids)

    async def sweep(self, now: float | None = None) -> int:
        return await sync_to_async(pg_sweep, thread_sensitive=False)(now)


def _pg_pending_amounts(counted: set[str] | None = None) -> dict[str, int]:
    """What the PostgreSQL reservations add to the ledger, per counter: open reservations at their
    reserved amount, settled ones at their actual amount until their usage row is in the ledger
    (or among ``counted``, rows the caller counts already).

    Settled ids are checked against the ledger *before* the caller sums the ledger, so a row written
    in between is counted twice (refusing a little early) rather than not at all."""
    reservations = list(BudgetReservation.objects.filter(swept=False))
    written = in_ledger(r.request_id for r in reservations if r.settled_at is not None)
    written |= counted or set()
    amounts: dict[str, int] = {}
    for res in reservations:
        if res.settled_at is not None and res.request_id in written:
            continue
        _add_amounts(amounts, res)
    return amounts


def _pg_apply(parts: list[Any], actual_micro: int, actual_requests: int, swept: bool) -> None:
    for name, amount, kind in sorted(parts):
        actual = actual_requests if kind == "q" else actual_micro
        delta = actual if swept else actual - int(amount)
        if delta:
            BudgetCounter.objects.filter(name=name).update(value=F("value") + delta)


def _pg_settle(request_id: str, actual_micro: int, actual_requests: int) -> bool:
    close_old_connections()
    with transaction.atomic():
        res = (
            BudgetReservation.objects.select_for_update().filter(request_id=request_id, settled_at__isnull=True).first()
        )
        if res is None:
            return False
        _pg_apply(res.parts, actual_micro, actual_requests, res.swept)
        # Kept (as settled, not swept) until its usage row reaches the ledger: see _pg_pending_amounts.
        res.swept = False
        res.settled_at = datetime.now(UTC)
        res.actual_micro = actual_micro
        res.actual_requests = actual_requests
        res.save(update_fields=["swept", "settled_at", "actual_micro", "actual_requests"])
    return True


def _pg_renew(request_ids: list[str]) -> None:
    BudgetReservation.objects.filter(request_id__in=request_ids, swept=False, settled_at__isnull=True).update(
        expires_at=datetime.now(UTC) + timedelta(seconds=_lease_seconds())
    )


def publish(open_: list[Reservation], settled: list[tuple[Reservation, int, int]]) -> None:
    """Copy Redis reservations to PostgreSQL (this process just lost Redis): the ones still
    running as open reservations, the ones whose settlement has not landed as settled ones. Other
    processes' PostgreSQL counters then count them (a counter re-syncs from the ledger and every
    PostgreSQL reservation the first time a process touches it after losing Redis)."""
    close_old_connections()
    now = datetime.now(UTC)
    rows = [
        BudgetReservation(
            request_id=r.request_id,
            parts=[list(p) for p in r.parts],
            expires_at=now + timedelta(seconds=_lease_seconds()),
        )
        for r in open_
        if r.parts
    ]
    rows.extend(
        BudgetReservation(
            request_id=r.request_id,
            parts=[list(p) for p in r.parts],
            expires_at=now,
            settled_at=now,
            actual_micro=actual_micro,
            actual_requests=actual_requests,
        )
        for r, actual_micro, actual_requests in settled
        if r.parts
    )
    # Rows already synced (by a process that lost Redis earlier) take the copies now.
    with transaction.atomic():
        BudgetReservation.objects.bulk_create(rows, ignore_conflicts=True)
        amounts: dict[str, int] = {}
        for row in rows:
            for name, amount, kind in row.parts:
                if row.settled_at is None:
                    value = int(amount)
                else:
                    value = row.actual_requests if kind == "q" else row.actual_micro
                amounts[name] = amounts.get(name, 0) + value
        for name in sorted(amounts):
            # A row synced earlier in this outage takes the copies now; a stale one is re-synced
            # (overwritten, copies included) before anyone uses it.
            BudgetCounter.objects.filter(name=name).update(value=F("value") + amounts[name])
    for r in open_:
        r.published = True


def pg_settle_copy(request_id: str, actual_micro: int, actual_requests: int) -> bool:
    """Settle the PostgreSQL copy of a Redis reservation (see ``publish``), if there is one."""
    return _pg_settle(request_id, actual_micro, actual_requests)


def pg_sweep(now: float | None = None) -> int:
    """Release PostgreSQL reservations whose lease expired. Returns how many."""
    close_old_connections()
    moment = datetime.fromtimestamp(now, UTC) if now is not None else datetime.now(UTC)
    # Settled reservations whose usage row is in the ledger have served their purpose.
    settled = list(BudgetReservation.objects.filter(settled_at__isnull=False).values_list("request_id", flat=True))
    done = in_ledger(settled)
    BudgetReservation.objects.filter(request_id__in=list(done), settled_at__isnull=False).delete()
    released = 0
    expired = BudgetReservation.objects.filter(swept=False, settled_at__isnull=True, expires_at__lte=moment)
    costs = dict(
        UsageRecord.objects.filter(request_id__in=list(expired.values_list("request_id", flat=True))).values_list(
            "request_id", "cost_micro"
        )
    )
    for rid in costs:
        # Its usage row is in the ledger (its settlement never landed): settle it to that cost.
        released += int(_pg_settle(rid, int(costs[rid]), 1))
    for pk in expired.values_list("pk", flat=True):
        with transaction.atomic():
            res = expired.select_for_update().filter(pk=pk).first()
            if res is None:
                continue
            for name, amount, _kind in sorted(res.parts):
                BudgetCounter.objects.filter(name=name).update(value=F("value") - int(amount))
            res.swept = True
            res.save(update_fields=["swept"])
            released += 1
    return released


# --- in-process (embedded mode) ------------------------------------------------------------------


class MemoryCounters(CounterStore):
    """One process, one event loop: check-and-add runs without an await in between, so it is atomic."""

    name = "memory"

    def __init__(self) -> None:
        self.values: dict[str, int] = {}
        self.open: dict[str, tuple[list[tuple[str, int, str]], float]] = {}
        self.swept: dict[str, list[tuple[str, int, str]]] = {}
        self._building: asyncio.Lock | None = None

    async def reserve(self, request_id: str, root: int, parts: list[Part]) -> Reservation | Refused:
        names = [p.counter.name for p in parts]
        missing = [p.counter for p in parts if p.counter.name not in self.values]
        if missing:
            values = await sync_to_async(_ledger_values, thread_sensitive=False)(missing, False)
            for counter, value in zip(missing, values, strict=True):
                if counter.name not in self.values:
                    opened = sum(a for ps, _ in self.open.values() for n, a, _k in ps if n == counter.name)
                    self.values[counter.name] = value + opened
        if request_id in self.open:
            return Reservation("memory", root, request_id, names)
        for p in parts:
            current = self.values[p.counter.name]
            if p.counter.limit is not None and current + p.amount > p.counter.limit:
                return Refused(p.counter, current, p.amount)
        for p in parts:
            self.values[p.counter.name] += p.amount
        expires = time.time() + _lease_seconds()
        self.open[request_id] = ([(p.counter.name, p.amount, p.counter.kind) for p in parts], expires)
        return Reservation("memory", root, request_id, names)

    async def settle(self, reservation: Reservation, actual_micro: int, actual_requests: int) -> bool:
        rid = reservation.request_id
        swept = False
        if rid in self.open:
            parts = self.open.pop(rid)[0]
        elif rid in self.swept:
            parts, swept = self.swept.pop(rid), True
        else:
            return False
        for name, amount, kind in parts:
            actual = actual_requests if kind == "q" else actual_micro
            if name in self.values:
                self.values[name] += actual if swept else actual - amount
        return True

    async def renew(self, root: int, request_ids: list[str]) -> None:
        expires = time.time() + _lease_seconds()
        for rid in request_ids:
            if rid in self.open:
                self.open[rid] = (self.open[rid][0], expires)

    async def sweep(self, now: float | None = None) -> int:
        moment = now if now is not None else time.time()
        released = 0
        for rid, (parts, expires) in list(self.open.items()):
            if expires <= moment:
                for name, amount, _kind in parts:
                    if name in self.values:
                        self.values[name] -= amount
                self.swept[rid] = self.open.pop(rid)[0]
                released += 1
        return released


# --- choosing a store ---------------------------------------------------------------------------

_redis_store = RedisCounters()
_memory_store = MemoryCounters()
_pg_store: PostgresCounters | None = None
_degraded_since: float | None = None


class RedisHealth:
    """What this process knows of Redis: ``up``, ``suspect`` (a call failed; the probe is deciding)
    or ``down`` (the probe failed ``CHITTYCAN_REDIS_PROBE_FAILURES`` times in a row).

    One failed call is not an outage: it starts the probe, a ``PING`` on a connection of its own
    (not from the request pool, so a busy pool cannot fail it) with its own short timeout
    (``CHITTYCAN_REDIS_PROBE_TIMEOUT``). While Redis is down the probe keeps running and brings the
    process back within ``PROBE_INTERVAL`` of Redis answering again. In calm weather nothing runs.
    """

    def __init__(self) -> None:
        self.state = "up"
        self.failures = 0
        self.changed = 0.0  # monotonic time of the last change of state
        self.probe: asyncio.Task[None] | None = None

    def suspect(self) -> None:
        if self.state == "up":
            self.state = "suspect"
            self.changed = time.monotonic()
        self._ensure_probe()

    def _ensure_probe(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a synchronous caller): the next async caller starts it
        task = self.probe
        if task is not None and not task.done() and task.get_loop() is loop and not loop.is_closed():
            return
        self.probe = loop.create_task(self._run(), name="chittycan:redis-probe")

    async def _ping(self, conn: aioredis.Redis) -> bool:
        try:
            return bool(await conn.ping())
        except (redis.RedisError, OSError):
            return False

    async def _run(self) -> None:
        timeout = float(settings.CHITTYCAN_REDIS_PROBE_TIMEOUT)
        conn = aioredis.Redis.from_url(
            settings.REDIS_URL, socket_timeout=timeout, socket_connect_timeout=timeout, single_connection_client=True
        )
        try:
            while self.state != "up":
                if await self._ping(conn):
                    if self.state == "down":
                        await _recover()
                    self.answered()
                    log.info("Redis answers")
                    return
                self.failures += 1
                if self.state == "suspect" and self.failures >= settings.CHITTYCAN_REDIS_PROBE_FAILURES:
                    await _run_down_hooks()
                    self.state, self.changed = "down", time.monotonic()
                    _went_down()
                await asyncio.sleep(PROBE_INTERVAL)
        finally:
            await conn.aclose()

    def answered(self) -> None:
        """Redis answered: up, its failure count cleared (a running probe then stops)."""
        self.failures = 0
        if self.state != "up":
            self.state, self.changed = "up", time.monotonic()

    async def verdict(self) -> bool:
        """After a failed call: wait for the probe to decide. True if Redis is up."""
        self.suspect()
        deadline = time.monotonic() + VERDICT_WAIT
        while self.state == "suspect" and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.state == "up"


#: Seconds between probes while Redis is suspect or down (recovery is noticed within this).
PROBE_INTERVAL = 0.1
#: The longest a request waits for the probe's verdict after its own call failed.
VERDICT_WAIT = 5.0
health = RedisHealth()


_incident_at = 0.0
_down_hooks: list[Callable[[], Awaitable[None]]] = []


def on_redis_down(fn: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    """Register a coroutine function to run when the probe finds Redis down, before this process
    starts enforcing in PostgreSQL (``budgets.service`` copies its Redis reservations there)."""
    _down_hooks.append(fn)
    return fn


async def _run_down_hooks() -> None:
    for hook in _down_hooks:
        try:
            await hook()
        except Exception:
            log.exception("a Redis-down hook failed")


def note_incident() -> None:
    """Something may have left a counter off the ledger (an outage, a settlement that failed, a
    reservation swept, a counter built around degraded requests): the ``budget-converge`` task
    reconciles (and repairs) soon."""
    global _incident_at
    _incident_at = time.monotonic()


def incident_at() -> float:
    """When this process last noted an incident (monotonic seconds; 0: never)."""
    return _incident_at


def _went_down() -> None:
    note_incident()
    global _degraded_since, _pg_store
    if _degraded_since is None:
        _degraded_since = time.time()
        _pg_store = PostgresCounters()  # re-sync PostgreSQL rows touched from now on
    log.warning("Redis unreachable: budget enforcement follows CHITTYCAN_REDIS_FAILURE_POLICY")


def primary() -> RedisCounters | MemoryCounters:
    return _redis_store if settings.REDIS_URL else _memory_store


def primary_redis() -> RedisCounters:
    """The Redis store (only when REDIS_URL is set)."""
    return _redis_store


def postgres() -> PostgresCounters:
    """The PostgreSQL store; its re-sync moment is when this process last lost Redis."""
    global _pg_store
    if _pg_store is None:
        _pg_store = PostgresCounters()
    return _pg_store


def redis_failed() -> None:
    """A Redis call failed: have the health probe check whether Redis is down (one failed call,
    e.g. a timeout in a slow spell, is not an outage)."""
    if settings.REDIS_URL:
        health.suspect()


async def redis_verdict() -> bool:
    """A Redis call failed: wait for the probe's verdict (at most a few seconds). True: Redis is
    up, retry the call; False: it is down, apply the failure policy."""
    return await health.verdict()


def degraded() -> bool:
    """This process lost Redis and has not yet rebuilt its counters since."""
    return _degraded_since is not None


def redis_suspect() -> bool:
    """Redis is down (the probe said so): skip it until the probe sees it answer again."""
    if health.state != "down":
        return False
    health._ensure_probe()  # the probe may have died with another event loop
    return True


def degrade_or_refuse() -> None:
    """Redis is unreachable: go on without it (policy ``degrade``: budgets in PostgreSQL, rate
    limits per process) or raise ``EnforcementUnavailable`` (policy ``refuse``)."""
    if settings.CHITTYCAN_REDIS_FAILURE_POLICY != "degrade":
        raise EnforcementUnavailable("Redis unreachable and CHITTYCAN_REDIS_FAILURE_POLICY is refuse")


async def _recover() -> None:
    note_incident()
    try:
        await redis_recovered()
    except CounterUnavailable:
        log.warning("Redis answered the probe but not the recovery; counters are dropped on next use")


async def redis_back() -> None:
    """Another process found Redis answering (``RedisIsBack``): recover now, as the probe would on
    its next ping, rather than go on reserving in PostgreSQL meanwhile."""
    await _recover()
    health.answered()


async def redis_recovered() -> None:
    """After an outage, drop every Redis counter: spend during the outage is only in PostgreSQL,
    so each counter is rebuilt from the ledger (with rows not yet written and the reservations
    still open in either store) when next used."""
    global _degraded_since
    if _degraded_since is None:
        return
    dropped = await _redis_store.drop_all()
    _degraded_since = None
    log.warning("Redis is back: %d budget counters dropped, rebuilt from the ledger on next use", dropped)


def store_by_name(name: str) -> CounterStore:
    if name == "redis":
        return _redis_store
    if name == "postgres":
        return postgres()
    return _memory_store


def peek_sync(counter: Counter, root: int | None = None) -> int | None:
    """The live value of a counter in the primary store, or None if it is not built or unreachable."""
    if not settings.REDIS_URL:
        return _memory_store.values.get(counter.name)
    if root is None:
        root = _root_of(counter)
    try:
        conn = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=1, socket_connect_timeout=1)
        try:
            raw = conn.get(counter_key(root, counter.name))
        finally:
            conn.close()
    except (redis.RedisError, OSError):
        return None
    return int(raw) if raw is not None else None


def _root_of(counter: Counter) -> int:
    if counter.scope == "k":
        tenant = ApiKey.objects.select_related("tenant").get(pk=counter.scope_id).tenant
    else:
        tenant = Tenant.objects.get(pk=counter.scope_id)
    chain = [tenant, *tenant.ancestors()]
    return int(chain[-1].pk)
