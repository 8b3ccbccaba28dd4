"""``make bench-cache``: the roadmap's cache demo, reproducibly (docs/caching.md, "The benchmark").

N identical requests ("Explain quantum computing") to a gateway process, against a fake OpenAI
upstream that takes a realistic 1.2 s per answer and reports a realistic usage, priced at gpt-4o's
list price ($2.50 / $10.00 per million tokens): once with the model's cache off, once with it on
(the cache dropped before each round), repeated R times. Per round and over the rounds: upstream
calls, total cost (the gateway's ``X-ChittyCan-Cost``), hit rate, latency p50/p95/p99.

Then the hit path against the gateway's own overhead, one request at a time against an instant
upstream: the gateway's overhead is p99(through the gateway, cache off) - p99(straight to the
upstream), the hit path's is p99(cache hits) - p99(straight to the upstream); the report says how
much the hit path adds to the gateway's overhead (the issue's target: at most 2 ms; negative: a
hit costs less than the gateway's own work on a miss).

It uses its own database (``chittycan_bench``, created and migrated if missing) and Redis db 8
with the prefix ``ccbench_cache``, like ``make bench``; override with ``BENCH_DATABASE_URL``,
``BENCH_REDIS_URL``, ``BENCH_REDIS_PREFIX``. Results go to ``bench/results/cache-latest.md`` and
``.json``.

    .venv/bin/python scripts/bench_cache.py                          # 1,000 requests x 10 rounds
    .venv/bin/python scripts/bench_cache.py --requests 100 --repeats 1 --overhead-requests 100  # a smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "Explain quantum computing"
PROMPT_TOKENS, COMPLETION_TOKENS = 12, 1_500  # a long-ish explanation
SLOW, FAST = "slow", "fast"  # upstream model names: 1.2 s per answer, or at once
MODELS = {  # public model -> (upstream model, cache on)
    "bench-cache-off": (SLOW, False),
    "bench-cache-on": (SLOW, True),
    "bench-fast-off": (FAST, False),
    "bench-fast-on": (FAST, True),
}
TENANT = "bench-cache"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the fake upstream --------------------------------------------------------------------------------


class Upstream:
    """An OpenAI-compatible ``/v1/chat/completions``: ``slow`` answers after ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.calls: dict[str, int] = {SLOW: 0, FAST: 0}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        model = json.loads(raw or b"{}").get("model", FAST)
        self.calls[model] = self.calls.get(model, 0) + 1
        if model == SLOW:
            await asyncio.sleep(self.delay)
        body = json.dumps(
            {
                "id": f"chatcmpl-bench{sum(self.calls.values())}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "Quantum computers use qubits... " * 40},
                        "finish_reason": "stop",
                        "logprobs": None,
                    }
                ],
                "usage": {
                    "prompt_tokens": PROMPT_TOKENS,
                    "completion_tokens": COMPLETION_TOKENS,
                    "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
                },
            }
        ).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


def start_upstream(app: Upstream, port: int) -> None:
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, daemon=True).start()
    wait_port(port)


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on port {port}") from None
            time.sleep(0.1)


# --- the benchmark's data -------------------------------------------------------------------------------


def prepare_database(url: str) -> None:
    import psycopg

    admin, name = url.rsplit("/", 1)[0] + "/postgres", url.rsplit("/", 1)[1].split("?")[0]
    with psycopg.connect(admin, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')
    subprocess.run([sys.executable, "manage.py", "migrate", "--no-input", "-v", "0"], cwd=ROOT, check=True)


def seed(upstream_url: str) -> str:
    """The provider, the four models (gpt-4o's price), a tenant without limits; a fresh key."""
    from datetime import UTC, datetime

    from gateway.models import Deployment, LLMModel, Price, Provider
    from tenants import services
    from tenants.models import ApiKey, Tenant

    provider = Provider.objects.filter(slug="bench-cache-upstream").first() or Provider(
        slug="bench-cache-upstream", kind="openai"
    )
    provider.base_url, provider.max_retries, provider.is_active = upstream_url, 0, True
    provider.api_key = "sk-bench-upstream"
    provider.save()
    for name, (upstream_model, cache_on) in MODELS.items():
        model, _ = LLMModel.objects.update_or_create(
            name=name,
            defaults={"kind": "chat", "is_active": True, "cache_enabled": cache_on, "cache_ttl": 86_400},
        )
        Deployment.objects.filter(model=model).exclude(provider=provider).delete()
        Deployment.objects.update_or_create(
            model=model,
            provider=provider,
            defaults={"upstream_model": upstream_model, "priority": 0, "is_active": True},
        )
        Price.objects.update_or_create(
            model=model,
            effective_from=datetime(2020, 1, 1, tzinfo=UTC),
            defaults={"input_per_mtok": Decimal("2.50"), "output_per_mtok": Decimal("10.00")},
        )
    tenant = Tenant.objects.filter(slug=TENANT).first() or services.tenant_create(slug=TENANT, actor_label="bench")
    ApiKey.objects.filter(tenant=tenant, revoked_at__isnull=True).update(revoked_at=datetime.now(tz=UTC))
    _, plaintext = services.key_issue(tenant=tenant, name="bench-cache", actor_label="bench")
    return plaintext


def flush_redis(url: str, prefix: str) -> None:
    """The benchmark's own Redis keys (breakers, counters, cache entries of earlier runs) go."""
    import redis

    conn = redis.Redis.from_url(url)
    try:
        batch = list(conn.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(batch), 1000):
            conn.unlink(*batch[start : start + 1000])
    finally:
        conn.close()


# --- measuring ------------------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(round(p * len(ordered) + 0.5)) - 1))]


async def fire(url: str, key: str, model: str, total: int, concurrency: int) -> dict[str, Any]:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    cost, hits, failed = Decimal(0), 0, 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def one() -> None:
            nonlocal cost, hits, failed
            async with sem:
                started = time.perf_counter()
                response = await client.post(
                    f"{url}/v1/chat/completions",
                    json={"model": model, "messages": [{"role": "user", "content": PROMPT}]},
                    headers={"authorization": f"Bearer {key}"},
                )
                latencies.append((time.perf_counter() - started) * 1000)
                if response.status_code != 200:
                    failed += 1
                    return
                cost += Decimal(response.headers.get("x-chittycan-cost", "0"))
                hits += response.headers.get("x-chittycan-cache") == "HIT"

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(total)))
        wall = time.perf_counter() - started
    return {
        "requests": total,
        "failed": failed,
        "cost_usd": float(cost),
        "hit_rate": hits / total,
        "p50_ms": percentile(latencies, 0.50),
        "p95_ms": percentile(latencies, 0.95),
        "p99_ms": percentile(latencies, 0.99),
        "mean_ms": statistics.fmean(latencies),
        "wall_s": wall,
    }


async def sequential(url: str, key: str | None, model: str, total: int) -> list[float]:
    """Latencies (ms) of ``total`` requests one at a time (``key`` None: straight to the upstream)."""
    import httpx

    headers = {"authorization": f"Bearer {key}"} if key else {}
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}]}
    out = []
    async with httpx.AsyncClient(timeout=30) as client:
        for _ in range(total + 20):  # 20 warm-up requests, not counted
            started = time.perf_counter()
            response = await client.post(f"{url}/chat/completions", json=body, headers=headers)
            response.raise_for_status()
            out.append((time.perf_counter() - started) * 1000)
    return out[20:]


def drop_cache(url: str, key: str) -> None:
    import httpx

    response = httpx.post(f"{url}/v1/cache/invalidate", json={}, headers={"authorization": f"Bearer {key}"})
    response.raise_for_status()


def summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("cost_usd", "hit_rate", "p50_ms", "p95_ms", "p99_ms", "mean_ms", "upstream_calls")
    return {k: statistics.median(r[k] for r in rounds) for k in keys} | {
        "cost_usd_min": min(r["cost_usd"] for r in rounds),
        "cost_usd_max": max(r["cost_usd"] for r in rounds),
        "failed": sum(r["failed"] for r in rounds),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="identical requests per round (1000)")
    parser.add_argument("--repeats", type=int, default=10, help="rounds, each with the cache off then on (10)")
    parser.add_argument("--concurrency", type=int, default=50, help="requests in flight at once (50)")
    parser.add_argument("--upstream-delay", type=float, default=1.2, help="seconds per upstream answer (1.2)")
    parser.add_argument("--overhead-requests", type=int, default=1000, help="sequential requests per path (1000)")
    args = parser.parse_args()

    os.environ["DATABASE_URL"] = os.environ.get(
        "BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/chittycan_bench"
    )
    os.environ["REDIS_URL"] = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/8")
    os.environ["CHITTYCAN_REDIS_PREFIX"] = os.environ.get("BENCH_REDIS_PREFIX", "ccbench_cache")
    os.environ.setdefault("SECRET_KEY", "chittycan-bench-secret-not-for-production-5d2b8e4a1c")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chittycan.settings")
    prepare_database(os.environ["DATABASE_URL"])
    import django

    django.setup()

    flush_redis(os.environ["REDIS_URL"], os.environ["CHITTYCAN_REDIS_PREFIX"])
    upstream = Upstream(args.upstream_delay)
    upstream_port = free_port()
    start_upstream(upstream, upstream_port)
    upstream_url = f"http://127.0.0.1:{upstream_port}/v1"
    key = seed(upstream_url)

    port = free_port()
    env = dict(os.environ, LOG_LEVEL="WARNING", CHITTYCAN_EGRESS_ALLOW="127.0.0.1")  # the fake is on loopback
    argv = [sys.executable, "-m", "uvicorn", "chittycan.asgi:application", "--host", "127.0.0.1", "--port", str(port)]
    argv += [
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--lifespan",
        "off",
        "--log-level",
        "warning",
        "--no-access-log",
    ]
    gateway = subprocess.Popen(argv, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_port(port)
        results: dict[str, Any] = {"args": vars(args), "off": [], "on": []}
        for n in range(args.repeats):
            for mode in ("off", "on"):
                if mode == "on":
                    drop_cache(url, key)
                before = upstream.calls[SLOW]
                got = asyncio.run(fire(url, key, f"bench-cache-{mode}", args.requests, args.concurrency))
                got["upstream_calls"] = upstream.calls[SLOW] - before
                results[mode].append(got)
                print(
                    f"round {n + 1}/{args.repeats} cache {mode:>3}: {got['upstream_calls']:>5} upstream calls,"
                    f" ${got['cost_usd']:.4f}, hit rate {got['hit_rate']:.1%}, p50 {got['p50_ms']:.1f} ms,"
                    f" p95 {got['p95_ms']:.1f} ms, p99 {got['p99_ms']:.1f} ms, {got['wall_s']:.1f} s",
                    flush=True,
                )
        direct = asyncio.run(sequential(upstream_url, None, FAST, args.overhead_requests))
        through = asyncio.run(sequential(f"{url}/v1", key, "bench-fast-off", args.overhead_requests))
        drop_cache(url, key)
        hits = asyncio.run(sequential(f"{url}/v1", key, "bench-fast-on", args.overhead_requests))
    finally:
        gateway.terminate()
        gateway.wait(timeout=15)
    overhead = {
        "direct_p99_ms": percentile(direct, 0.99),
        "gateway_p99_ms": percentile(through, 0.99),
        "hit_p99_ms": percentile(hits, 0.99),
        "direct_p50_ms": percentile(direct, 0.5),
        "gateway_p50_ms": percentile(through, 0.5),
        "hit_p50_ms": percentile(hits, 0.5),
    }
    overhead["gateway_overhead_p99_ms"] = overhead["gateway_p99_ms"] - overhead["direct_p99_ms"]
    overhead["hit_overhead_p99_ms"] = overhead["hit_p99_ms"] - overhead["direct_p99_ms"]
    overhead["hit_added_p99_ms"] = overhead["hit_overhead_p99_ms"] - overhead["gateway_overhead_p99_ms"]
    results["summary"] = {"off": summary(results["off"]), "on": summary(results["on"]), "overhead": overhead}
    off, on = results["summary"]["off"], results["summary"]["on"]
    saving = 1 - on["cost_usd"] / off["cost_usd"] if off["cost_usd"] else 0.0
    lines = [
        f"# Cache benchmark: {args.requests} identical requests x {args.repeats} rounds "
        f"(upstream {args.upstream_delay} s per answer, gpt-4o prices, concurrency {args.concurrency})",
        "",
        "| cache | upstream calls | total cost | hit rate | p50 | p95 | p99 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in (("off", off), ("on", on)):
        lines.append(
            f"| {name} | {s['upstream_calls']:.0f} | ${s['cost_usd']:.2f}"
            f" (${s['cost_usd_min']:.2f}-${s['cost_usd_max']:.2f}) | {s['hit_rate']:.1%}"
            f" | {s['p50_ms']:.1f} ms | {s['p95_ms']:.1f} ms | {s['p99_ms']:.1f} ms |"
        )
    lines += [
        "",
        f"Saving: {saving:.1%} of the cost. Medians over the rounds (cost: min-max); failed requests: "
        f"{off['failed'] + on['failed']}.",
        "",
        f"Hit path ({args.overhead_requests} sequential requests each, instant upstream): straight to the upstream "
        f"p99 {overhead['direct_p99_ms']:.2f} ms; through the gateway, cache off, p99 "
        f"{overhead['gateway_p99_ms']:.2f} ms "
        f"(the gateway's overhead: {overhead['gateway_overhead_p99_ms']:.2f} ms); cache hits p99 "
        f"{overhead['hit_p99_ms']:.2f} ms (overhead {overhead['hit_overhead_p99_ms']:.2f} ms): the hit path adds "
        f"{overhead['hit_added_p99_ms']:+.2f} ms at p99 to the "
        f"gateway's overhead (target: at most +2 ms: {'met' if overhead['hit_added_p99_ms'] <= 2 else 'NOT met'}).",
    ]
    report = "\n".join(lines) + "\n"
    print()
    print(report)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "cache-latest.md").write_text(report)
    (out / "cache-latest.json").write_text(json.dumps(results, indent=2))
    return 1 if off["failed"] + on["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
