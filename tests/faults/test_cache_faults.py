"""Coalescing when the leader's process dies (issue 11, docs/caching.md "Coalescing"): a leader
killed with SIGKILL leaves its Redis lease behind and publishes no failure. Its followers, in the
other gateway process, must each get a complete, correct answer (one of them leads again once the
dead leader's lease lapses) within a stated bound, never hang, and the upstream is called at most
twice: the dead leader's call and the new leader's.

Two gateway processes in production mode on the fault suite's disposable PostgreSQL and Redis
(tests/faults/harness.py), gpt-4o's exact cache on. Process A leads (its upstream call is held
for ``LEADER_DELAY`` seconds, so it is surely in the air at the kill); ``FOLLOWERS`` identical
requests go to process B, which follows A through Redis; A is killed; the upstream then answers
in ``UPSTREAM_DELAY`` seconds.

    bash scripts/test.sh -m faults tests/faults/test_cache_faults.py
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from gateway.cache import coalesce
from tests.faults.harness import FaultEnv, Outcome, assert_money_invariants, measure

pytestmark = pytest.mark.faults

FOLLOWERS = 12
LEADER_DELAY = 20.0  # the dead leader's upstream call: still in the air at the kill
UPSTREAM_DELAY = 3.0  # the new leader's call
LEASE_S = coalesce.LEASE_MS / 1000
#: Every follower is answered at most this long after the kill: the lease lapses (at most its TTL
#: after the leader's last renewal), a follower notices within one ``XREAD`` block, leads, and the
#: upstream answers; the rest is slack for a loaded two-core machine.
ANSWER_BOUND = LEASE_S + coalesce.READ_BLOCK_MS / 1000 + UPSTREAM_DELAY + 12.0
#: A request that gets no answer at all is cut off here (far beyond the bound: a hang shows as a
#: transport error, not as a stuck test).
CLIENT_TIMEOUT = ANSWER_BOUND + 30.0
CONVERGE_BOUND = 20.0  # the killed leader's reservation is released after its lease (10 s here)

MAIN_LIMIT = 10**12  # a hard budget never reached (every request still reserves and settles)
TEXT = "Hello from the fake upstream!"  # what the fake answers (tests/fakes/openai_upstream.py)


@pytest.fixture(scope="module")
def cache_env() -> Iterator[FaultEnv]:
    env = FaultEnv({"cn-main": MAIN_LIMIT, "cs-main": MAIN_LIMIT})
    try:
        env.manage(
            "shell",
            "-c",
            "from gateway import catalog; from gateway.models import LLMModel; "
            "catalog.model_update(LLMModel.objects.get(name='gpt-4o'), cache_enabled=True, cache_ttl=86400, "
            "actor_label='faults')",
        )
        yield env
    finally:
        env.destroy()


def body(tag: str, prompt: str, stream: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 50,
        "user": tag,  # not part of the cache key: every request of the scenario is the same one
    }
    if stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


async def send(
    client: httpx.AsyncClient, gateway: str, key: str, tag: str, prompt: str, stream: bool, t0: float
) -> tuple[Outcome, str, str]:
    """One request: its outcome, its ``X-ChittyCan-Cache`` and the answer's text."""
    started = time.monotonic() - t0
    status, code, request_id, complete, cache, text = 0, "", "", False, "", ""
    try:
        async with client.stream(
            "POST",
            f"{gateway}/v1/chat/completions",
            json=body(tag, prompt, stream),
            headers={"authorization": f"Bearer {key}"},
        ) as res:
            status = res.status_code
            request_id = res.headers.get("x-request-id", "")
            cache = res.headers.get("x-chittycan-cache", "")
            if status != 200:
                code = (await res.aread())[:200].decode(errors="replace")
            elif stream:
                parts = []
                async for line in res.aiter_lines():
                    if line == "data: [DONE]":
                        complete = True
                    elif line.startswith("data: "):
                        chunk = orjson.loads(line[6:])
                        if "error" in chunk:
                            code = "stream_error"
                        for choice in chunk.get("choices") or []:
                            parts.append((choice.get("delta") or {}).get("content") or "")
                text = "".join(parts)
            else:
                data = orjson.loads(await res.aread())
                text = data["choices"][0]["message"]["content"]
                complete = data["choices"][0]["finish_reason"] == "stop"
    except httpx.TransportError as exc:
        code = type(exc).__name__
    outcome = Outcome(tag, "main", gateway, started, time.monotonic() - t0, status, code, request_id, complete)
    return outcome, cache, text


def xread_waiting(env: FaultEnv) -> bool:
    """Whether a gateway's watcher is blocked reading a leader's stream (``XREAD BLOCK``)."""
    conn = env.redis.client()
    try:
        return any(client.get("cmd") == "xread" for client in conn.client_list())
    finally:
        conn.close()


def poll(what: str, check: Any, bound: float) -> None:
    deadline = time.monotonic() + bound
    while not check():
        assert time.monotonic() < deadline, f"not within {bound} s: {what}"
        time.sleep(0.05)


def run_scenario(env: FaultEnv, scenario: str, *, stream: bool) -> None:
    tenant = env.tenants[f"{scenario}-main"]
    env.upstream.reply_delay = 0.05
    env.upstream.frame_delay = 0.0
    var_dir = env.start_gateways(scenario)
    leader_gw, follower_gw = env.gateways
    # Both processes warm (keys, catalogue, connections), outside the scenario's tags and cache.
    for gw in env.gateways:
        warm = httpx.post(
            f"{gw.url}/v1/chat/completions",
            json=body(f"warm{scenario}-{gw.port}", f"warm {gw.port}", False),
            headers={"authorization": f"Bearer {tenant.key}", "cache-control": "no-store"},
            timeout=60,
        )
        assert warm.status_code == 200, warm.text
    prompt = f"Explain quantum computing ({scenario})"
    leader_tag = f"{scenario}-0"
    results: list[tuple[Outcome, str, str]] = []
    marks: dict[str, float] = {}

    async def main() -> None:
        limits = httpx.Limits(max_connections=FOLLOWERS + 4, max_keepalive_connections=0)
        t0 = time.monotonic()
        async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT, limits=limits) as client:
            env.upstream.reply_delay = LEADER_DELAY
            leader = asyncio.ensure_future(send(client, leader_gw.url, tenant.key, leader_tag, prompt, stream, t0))
            # The leader holds the lease once its call reached the upstream.
            await asyncio.to_thread(poll, "the leader's upstream call", lambda: env.upstream.calls(scenario), 30)
            env.upstream.reply_delay = UPSTREAM_DELAY  # the next leader's call
            followers = [
                asyncio.ensure_future(send(client, follower_gw.url, tenant.key, f"{scenario}-{i}", prompt, stream, t0))
                for i in range(1, FOLLOWERS + 1)
            ]
            # Process B follows A through Redis: its watcher blocks on A's stream.
            await asyncio.to_thread(poll, "a follower watching the leader", lambda: xread_waiting(env), 30)
            assert not leader.done(), "the leader answered before the kill: the scenario tests nothing"
            marks["kill"] = time.monotonic() - t0
            await asyncio.to_thread(leader_gw.kill)
            results.append(await leader)
            results.extend(await asyncio.gather(*followers))

    asyncio.run(main())
    outcomes = [outcome for outcome, _, _ in results]
    figures = measure(env, scenario, outcomes, [tenant], var_dir, converge_bound=CONVERGE_BOUND)
    leader_outcome, answered = results[0][0], results[1:]
    after_kill = sorted(round(o.ended - marks["kill"], 2) for o, _, _ in answered)
    caches = Counter(cache for _, cache, _ in answered)
    leader_rows = sum(1 for tag, *_ in env.state.rows(scenario) if tag == leader_tag)
    figures["answered_after_kill_s"] = {"min": after_kill[0], "max": after_kill[-1], "bound": ANSWER_BOUND}
    figures["cache_headers"] = dict(caches)
    figures["killed_leader_rows"] = leader_rows
    figures["recovery"] = (
        f"{len(answered)} followers answered {after_kill[0]}-{after_kill[-1]} s after the kill "
        f"(bound {ANSWER_BOUND:.1f} s); {dict(caches)}"
    )
    env.record(f"{scenario}. coalescing leader killed (SIGKILL{', stream' if stream else ''})", figures)

    # The killed leader's client got no answer.
    assert leader_outcome.status == 0, leader_outcome
    # Every follower: a complete, correct answer, within the bound.
    bad = [(o.tag, o.status, o.code, o.complete, text) for o, _, text in answered if o.status != 200 or not o.complete]
    assert not bad, f"followers without a complete answer: {bad}"
    wrong = [(o.tag, text) for o, _, text in answered if text != TEXT]
    assert not wrong, f"followers with a wrong answer: {wrong}"
    assert after_kill[-1] <= ANSWER_BOUND, figures["answered_after_kill_s"]
    # One follower led again (MISS, the second upstream call); the others followed it (HIT).
    assert caches == Counter({"MISS": 1, "HIT": FOLLOWERS - 1}), caches
    calls = env.upstream.calls(scenario + "-")
    assert sum(calls.values()) == 2 and calls[leader_tag] == 1, calls
    assert len({o.request_id for o, _, _ in answered}) == FOLLOWERS
    # Ledger: one row per answered request (each follower's, cost 0 for the coalesced ones), and
    # none for the killed leader: its process died before it could record it (the crash rule of
    # docs/operations.md, scenario e: an in-flight request of a killed process has no row).
    assert leader_rows == 0, figures
    assert figures["ledger_rows"] == FOLLOWERS, figures
    assert_money_invariants(figures, allowed_lost={leader_tag}, rows_without_call=FOLLOWERS - 1)
    costs = sorted(cost for tag, _, _, cost in env.state.rows(scenario))
    assert costs[:-1] == [0] * (FOLLOWERS - 1) and costs[-1] > 0, costs


def test_followers_of_a_killed_leader_are_answered(cache_env: FaultEnv) -> None:
    run_scenario(cache_env, "cn", stream=False)


def test_streamed_followers_of_a_killed_leader_are_answered(cache_env: FaultEnv) -> None:
    run_scenario(cache_env, "cs", stream=True)
