"""Stage 3, limit: requests and tokens per minute, per key and per tenant (and each ancestor).

Fixed one-minute windows (UTC minute boundaries) in Redis, shared by every gateway process. The
windows are taken in the same Lua script as the budget reservation (``budgets.counters.Gate``):
one round trip admits the request, only if every window has room and every hard budget can take
the worst case. A fixed window lets a client send up to twice its limit
across a minute boundary; in exchange each check is one script on a handful of integer keys.

Tokens are counted the way OpenAI does at admission: the prompt estimate plus the output cap
(``max_tokens``); when the request settles, the window is corrected to the tokens actually used.

Without Redis (embedded mode, or Redis down under the ``degrade`` policy) the same windows live
in this process's memory: limits then hold per process.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from budgets.counters import CounterUnavailable, Gate, Gated, redis_failed
from core.runtime import RedisBatch, key_prefix, redis_client
from tenants.keyinfo import KeyInfo

WINDOW = 60


@dataclass(frozen=True, slots=True)
class Window:
    name: str  # e.g. "k7:r" or "t3:t"
    kind: str  # "r" requests | "t" tokens
    limit: int
    amount: int


@dataclass(slots=True)
class RateTicket:
    store: str  # redis | memory
    root: int
    window: int
    token_keys: list[str] = field(default_factory=list)
    charged_tokens: int = 0


@dataclass(slots=True)
class RateResult:
    allowed: bool
    ticket: RateTicket | None
    headers: list[tuple[bytes, bytes]]
    retry_after: int = 0
    refused: Window | None = None


def windows_for(key: KeyInfo, tokens: int) -> list[Window]:
    found: list[Window] = []
    if key.id is not None:
        if key.rpm_limit is not None:
            found.append(Window(f"k{key.id}:r", "r", key.rpm_limit, 1))
        if key.tpm_limit is not None:
            found.append(Window(f"k{key.id}:t", "t", key.tpm_limit, tokens))
    for tenant in key.lineage:
        if tenant.rpm_limit is not None:
            found.append(Window(f"t{tenant.id}:r", "r", tenant.rpm_limit, 1))
        if tenant.tpm_limit is not None:
            found.append(Window(f"t{tenant.id}:t", "t", tenant.tpm_limit, tokens))
    return found


def _redis_key(root: int, name: str, window: int) -> str:
    return f"{key_prefix()}:rl:{{{root}}}:{name}:{window}"


# KEYS: token windows. ARGV[1] delta. Existing windows only.
ADJUST_LUA = """
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('INCRBY', KEYS[i], ARGV[1]) end
end
return 1
"""

_memory: dict[str, int] = {}
_memory_window = -1
_scripts: dict[tuple[int, str], Any] = {}


def _script(lua: str) -> Any:
    conn = redis_client()
    slot = (id(conn), lua)
    found = _scripts.get(slot)
    if found is None:
        found = _scripts[slot] = conn.register_script(lua)
    return found


def _headers(windows: list[Window], values: list[int], reset: int) -> list[tuple[bytes, bytes]]:
    headers: list[tuple[bytes, bytes]] = []
    for kind, label in (("r", b"requests"), ("t", b"tokens")):
        mine = [(w.limit, max(0, w.limit - v)) for w, v in zip(windows, values, strict=True) if w.kind == kind]
        if not mine:
            continue
        limit, remaining = min(mine, key=lambda lr: lr[1])
        headers.append((b"x-ratelimit-limit-" + label, str(limit).encode()))
        headers.append((b"x-ratelimit-remaining-" + label, str(remaining).encode()))
        headers.append((b"x-ratelimit-reset-" + label, f"{reset}s".encode()))
    return headers


def _result(
    windows: list[Window], status: int, values: list[int], ticket: RateTicket, now: float, refused_index: int = 0
) -> RateResult:
    reset = max(1, math.ceil((ticket.window + 1) * WINDOW - now))
    if status == 1:
        return RateResult(True, ticket, _headers(windows, values, reset))
    return RateResult(False, None, _headers(windows, values, reset), reset, windows[refused_index])


@dataclass(slots=True)
class RatePlan:
    """The windows a request will be counted in, to be taken in Redis with its reservation."""

    root: int
    windows: list[Window]
    keys: list[str]
    tokens: int
    window: int
    now: float


#: Seconds a window's Redis key lives (it is only read during its minute).
GATE_TTL = WINDOW * 2


def plan(key: KeyInfo, tokens: int) -> RatePlan | None:
    """The Redis windows of a request, or None when no limit applies."""
    windows = windows_for(key, tokens)
    if not windows:
        return None
    now = time.time()
    window = int(now // WINDOW)
    root = key.root_id
    keys = [_redis_key(root, w.name, window) for w in windows]
    return RatePlan(root, windows, keys, tokens, window, now)


def gates(rate: RatePlan) -> list[Gate]:
    return [Gate(k, w.amount, w.limit, w.kind == "r") for k, w in zip(rate.keys, rate.windows, strict=True)]


def taken(rate: RatePlan, gated: Gated, *, tokens_counted: bool) -> RateResult:
    """What the gates of ``rate`` said, as a result; ``tokens_counted``: the token windows were
    counted (the request was admitted), so settling corrects them to the tokens actually used."""
    token_keys = [k for k, w in zip(rate.keys, rate.windows, strict=True) if w.kind == "t"]
    ticket = RateTicket("redis", rate.root, rate.window, token_keys)
    if gated.full is not None:
        return _result(rate.windows, 0, gated.values, ticket, rate.now, gated.full)
    if tokens_counted:
        ticket.charged_tokens = rate.tokens
    return _result(rate.windows, 1, gated.values, ticket, rate.now)


def hit(key: KeyInfo, tokens: int) -> RateResult | None:
    """Count a request in this process's windows, or refuse it (no Redis: the embedded mode, or
    Redis down under the ``degrade`` policy). None when no limit applies."""
    windows = windows_for(key, tokens)
    if not windows:
        return None
    now = time.time()
    return _memory_hit(key, windows, int(now // WINDOW), tokens, now)


def _memory_hit(key: KeyInfo, windows: list[Window], window: int, tokens: int, now: float) -> RateResult:
    global _memory_window
    if window != _memory_window:
        _memory.clear()
        _memory_window = window
    names = [f"{w.name}:{window}" for w in windows]
    values = [_memory.get(n, 0) for n in names]
    token_names = [n for n, w in zip(names, windows, strict=True) if w.kind == "t"]
    ticket = RateTicket("memory", key.root_id, window, token_names)
    for i, w in enumerate(windows):
        if values[i] + w.amount > w.limit:
            return _result(windows, 0, values, ticket, now, i)
    for i, w in enumerate(windows):
        values[i] += w.amount
        _memory[names[i]] = values[i]
    ticket.charged_tokens = tokens
    return _result(windows, 1, values, ticket, now)


async def adjust(ticket: RateTicket, actual_tokens: int, batch: RedisBatch | None = None) -> None:
    """Correct the token windows to the tokens actually used (refunds the unused output cap).

    With ``batch``, a Redis correction joins the request's closing round trip instead of taking
    its own."""
    delta = actual_tokens - ticket.charged_tokens
    if not delta or not ticket.token_keys:
        return
    ticket.charged_tokens = actual_tokens
    if ticket.store == "redis":
        if batch is not None:
            batch.script(_script(ADJUST_LUA), ticket.token_keys, [delta], on_error=_adjust_failed)
            return
        try:
            await _script(ADJUST_LUA)(keys=ticket.token_keys, args=[delta])
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise CounterUnavailable(str(exc)) from exc
        return
    if ticket.window == _memory_window:
        for name in ticket.token_keys:
            if name in _memory:
                _memory[name] = max(0, _memory[name] + delta)


def _adjust_failed(exc: BaseException) -> None:
    """A lost correction only leaves a window high until its minute ends."""
    redis_failed()
