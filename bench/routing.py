"""``make bench-routing``: the roadmap's routing policy (examples/routing-policy.yaml) on a mix of
1,000 prompts of varied length, and the cost of policy evaluation per request.

Part 1 counts each prompt's tokens with the gateway's own tokenizer (``gateway.tokens``), evaluates
the policy as the route stage does, and prices every request at its routed model's price (from the
example file) against sending all of them to the default model. The mix (seeded, so runs repeat)
is described in docs/routing.md: short chat questions, medium tasks with some context, and long
documents or code.

Part 2 times, per request, building the facts (``gateway.pipeline.route.request_facts``) and
evaluating the policy (``gateway.routing.policy.evaluate``), median of several rounds; and the
route stage's whole decision (``gateway.pipeline.route.decide``: facts, evaluation, the route it
makes with its fallback chain, the explanation, the budget check) on a route table holding the
example's models, with the policy attached to the key's tenant and without any policy: the
difference is what attaching the policy adds to a request. ``make bench`` runs this part too
(``--timing-only --json``) and puts the figures in its report.

    .venv/bin/python -m bench.routing [--prompts 1000] [--rounds 5] [--seed 7] [--timing-only] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "routing-policy.yaml"

WORDS = (
    "the a to of and in is for on with that this it be as by are from or at an can how what why "
    "please explain write summarise translate review code function error database query customer "
    "order invoice report meeting email draft python django request response latency budget model "
    "token price cheap strong fallback gateway tenant key policy route deploy server test bug fix"
).split()

#: The tenant's and key's id in the timing: no row has it, so the key has no budget (the route
#: stage's budget check over a fallback chain, a counter read, is not part of the figure).
NO_SUCH_ID = 2**31 - 1

# (share of traffic, low, high words): short questions, medium tasks, long documents or code.
MIX = ((0.62, 3, 60), (0.24, 60, 330), (0.14, 330, 2400))


def make_prompts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        pick, acc = rng.random(), 0.0
        low, high = MIX[-1][1], MIX[-1][2]
        for share, lo, hi in MIX:
            acc += share
            if pick < acc:
                low, high = lo, hi
                break
        n = int(round(low * (high / low) ** rng.random()))  # log-uniform within the band
        prompts.append(" ".join(rng.choice(WORDS) for _ in range(n)))
    return prompts


def _prices(document: dict[str, Any]) -> dict[str, tuple[Decimal, Decimal]]:
    """USD per M tokens (input, output) by public model name and by alias."""
    found: dict[str, tuple[Decimal, Decimal]] = {}
    for model in document.get("models", []):
        price = model["prices"][0]
        pair = (Decimal(price["input"]), Decimal(price["output"]))
        for name in (model["name"], *model.get("aliases", [])):
            found[name] = pair
    return found


def routing_mix(prompts: list[str], seed: int) -> dict[str, Any]:
    from gateway import tokens
    from gateway.routing.policy import evaluate, parse_policy

    document = yaml.safe_load(EXAMPLE.read_text())
    spec = document["routing_policies"][0]
    policy = parse_policy(spec["name"], spec["rules"], spec.get("fallback_chain"))
    prices = _prices(document)
    default_target = next(r for r in spec["rules"] if not r.get("condition"))["route"]
    rng = random.Random(seed + 1)
    served: dict[str, int] = {}
    cost = Decimal(0)
    default_cost = Decimal(0)
    for prompt in prompts:
        prompt_tokens = tokens.count_messages([{"role": "user", "content": prompt}], "gpt-4o")
        output_tokens = int(rng.lognormvariate(5.0, 0.8))  # median ~150 output tokens
        decision = evaluate([policy], {"tokens": prompt_tokens})
        target = decision.targets[0]
        served[decision.rule] = served.get(decision.rule, 0) + 1
        inp, out = prices[target]
        cost += (inp * prompt_tokens + out * output_tokens) / 1_000_000
        d_in, d_out = prices[default_target]
        default_cost += (d_in * prompt_tokens + d_out * output_tokens) / 1_000_000
    return {"served": served, "cost": cost, "default_cost": default_cost, "default_target": default_target}


def _example_table(with_policy: bool) -> Any:
    """A route table of the example file's models (prices, aliases, deployments), with the
    ``roadmap`` policy attached to the timing's tenant, or no policy at all."""
    from datetime import UTC, datetime

    from core.money import PriceInfo
    from gateway.providers.base import ProviderConfig
    from gateway.routing.policy import PolicySet, parse_policy
    from gateway.routing.table import DeploymentRoute, ModelRoute, RouteTable

    document = yaml.safe_load(EXAMPLE.read_text())
    providers = {
        p["slug"]: ProviderConfig(id=n, slug=p["slug"], kind=p["kind"], base_url=p["base_url"])
        for n, p in enumerate(document["providers"], 1)
    }
    models: dict[str, ModelRoute] = {}
    for n, m in enumerate(document["models"], 1):
        price = m["prices"][0]
        info = PriceInfo(
            datetime(2025, 1, 1, tzinfo=UTC),
            Decimal(price["input"]),
            Decimal(price.get("cached_input", price["input"])),
            Decimal(price.get("cache_write", price["input"])),
            Decimal(price["output"]),
        )
        deployments = tuple(
            DeploymentRoute(id=n * 10 + k, provider=providers[d["provider"]], upstream_model=d["upstream_model"])
            for k, d in enumerate(m["deployments"])
        )
        route = ModelRoute(
            id=n,
            name=m["name"],
            kind="chat",
            owned_by=m.get("owned_by", "system"),
            created=0,
            context_window=m["context_window"],
            max_output_tokens=m["max_output_tokens"],
            deployments=deployments,
            prices=(info,),
            aliases=tuple(m.get("aliases", [])),
        )
        for name in (route.name, *route.aliases):
            models[name] = route
    policies = PolicySet()
    if with_policy:
        spec = document["routing_policies"][0]
        policy = parse_policy(spec["name"], spec["rules"], spec.get("fallback_chain"), tenant_id=NO_SUCH_ID)
        policies = PolicySet(by_tenant={NO_SUCH_ID: policy}, by_name={policy.name: policy})
    return RouteTable(models=models, policies=policies)


def evaluation_cost(rounds: int, per_round: int = 2000) -> dict[str, Any]:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chittycan.settings")
    import django

    django.setup()
    from django.conf import settings

    from gateway.context import RequestContext
    from gateway.pipeline.route import decide, request_facts
    from gateway.routing.policy import evaluate, parse_policy
    from tenants.keyinfo import KeyInfo, TenantInfo

    settings.CHITTYCAN_MODE = "prod"  # the route stage as in production (dev mode routes to the mock)
    spec = yaml.safe_load(EXAMPLE.read_text())["routing_policies"][0]
    policy = parse_policy(spec["name"], spec["rules"], spec.get("fallback_chain"))
    tenant = TenantInfo(
        id=NO_SUCH_ID,
        slug="demo",
        time_zone="Europe/Paris",
        rpm_limit=None,
        tpm_limit=None,
        monthly_request_quota=None,
    )
    key = KeyInfo(
        id=NO_SUCH_ID,
        prefix="p",
        hashed="h",
        tenant=tenant,
        lineage=(tenant,),
        models=None,
        endpoints=None,
        rpm_limit=None,
        tpm_limit=None,
        expires_at=None,
        name="k",
    )
    ctx = RequestContext(request_id="r", endpoint="chat", requested_model="gpt-4o-mini", key=key)
    ctx.body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200}
    results: dict[str, list[float]] = {"facts_and_evaluate_us": [], "evaluate_us": []}
    tables = {"with": _example_table(True), "without": _example_table(False)}

    async def decisions(table: Any, count: int) -> float:
        """Seconds per ``decide`` of the route stage (a fresh context each, as per request)."""
        base = table.resolve("gpt-4o-mini") or table.resolve("openai/gpt-4")
        elapsed = 0.0
        for _ in range(count):
            one = RequestContext(request_id="r", endpoint="chat", requested_model=base.name, key=key)
            one.body, one.route, one.estimated_prompt_tokens = ctx.body, base, ctx.estimated_prompt_tokens
            start = time.perf_counter()
            await decide(one, table, ("chat",))
            elapsed += time.perf_counter() - start
        return elapsed / count

    decide_note = ""
    try:  # the first decision with a policy reads the key's budgets (PostgreSQL), then they are cached
        ctx.estimated_prompt_tokens = 10
        asyncio.run(decisions(tables["with"], 1))
    except Exception as exc:  # no database reachable (make bench-routing without the services)
        decide_note = f"not measured: {type(exc).__name__}: {str(exc)[:120]}"
    if not decide_note:
        results.update(decide_with_policy_us=[], decide_without_policy_us=[])
    for _ in range(rounds):
        for tokens_ in (10, 300, 900):  # each rule of the roadmap policy in turn
            ctx.estimated_prompt_tokens = tokens_
            start = time.perf_counter()
            for _ in range(per_round):
                evaluate([policy], request_facts(ctx))
            results["facts_and_evaluate_us"].append((time.perf_counter() - start) / per_round * 1e6)
            facts = request_facts(ctx)
            start = time.perf_counter()
            for _ in range(per_round):
                evaluate([policy], facts)
            results["evaluate_us"].append((time.perf_counter() - start) / per_round * 1e6)
            if not decide_note:
                results["decide_with_policy_us"].append(asyncio.run(decisions(tables["with"], per_round)) * 1e6)
                results["decide_without_policy_us"].append(asyncio.run(decisions(tables["without"], per_round)) * 1e6)
    out: dict[str, Any] = {name: statistics.median(values) for name, values in results.items()}
    if decide_note:
        out.update(decide_with_policy_us=None, decide_without_policy_us=None, policy_added_us=None, note=decide_note)
    else:
        out["policy_added_us"] = out["decide_with_policy_us"] - out["decide_without_policy_us"]
    out["rounds"], out["per_round"] = rounds, per_round
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--timing-only", action="store_true", help="part 2 only: the evaluation cost per request")
    parser.add_argument("--json", action="store_true", help="print the timing figures as one JSON object")
    args = parser.parse_args()
    if args.timing_only:
        timing = evaluation_cost(args.rounds)
        print(json.dumps(timing) if args.json else _timing_line(timing))
        return
    mix = routing_mix(make_prompts(args.prompts, args.seed), args.seed)
    total = sum(mix["served"].values())
    print(f"routing policy `roadmap` (examples/routing-policy.yaml) on {total} prompts:")
    for rule, count in sorted(mix["served"].items(), key=lambda item: -item[1]):
        print(f"  {rule:<20} {count:>5}  {count / total:6.1%}")
    cheap = mix["served"].get("cheap_for_simple", 0) / total
    saved = 1 - mix["cost"] / mix["default_cost"] if mix["default_cost"] else Decimal(0)
    print(f"cheap model share: {cheap:.1%} (roadmap target: 80 %+)")
    print(
        f"cost: ${mix['cost']:.4f} with the policy vs ${mix['default_cost']:.4f} all to {mix['default_target']}"
        f" ({saved:.1%} less)"
    )
    print(_timing_line(evaluation_cost(args.rounds)))


def _timing_line(timing: dict[str, Any]) -> str:
    line = (
        f"policy evaluation per request: {timing['facts_and_evaluate_us']:.1f} us with the facts built,"
        f" {timing['evaluate_us']:.1f} us evaluating alone (median; target < 50 us)"
    )
    if timing.get("policy_added_us") is not None:
        line += (
            f"\nroute stage decision per request: {timing['decide_with_policy_us']:.1f} us with the policy attached,"
            f" {timing['decide_without_policy_us']:.1f} us without: the policy adds {timing['policy_added_us']:.1f} us"
        )
    else:
        line += f"\nroute stage decision: {timing.get('note', 'not measured')}"
    return line


if __name__ == "__main__":
    main()
