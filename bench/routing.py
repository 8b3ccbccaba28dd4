"""``make bench-routing``: the roadmap's routing policy (examples/routing-policy.yaml) on a mix of
1,000 prompts of varied length, and the cost of policy evaluation per request.

Part 1 counts each prompt's tokens with the gateway's own tokenizer (``gateway.tokens``), evaluates
the policy as the route stage does, and prices every request at its routed model's price (from the
example file) against sending all of them to the default model. The mix (seeded, so runs repeat)
is described in docs/routing.md: short chat questions, medium tasks with some context, and long
documents or code.

Part 2 times, per request, building the facts (``gateway.pipeline.route.request_facts``) and
evaluating the policy (``gateway.routing.policy.evaluate``), median of several rounds.

    .venv/bin/python -m bench.routing [--prompts 1000] [--rounds 5] [--seed 7]
"""

from __future__ import annotations

import argparse
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


def evaluation_cost(rounds: int, per_round: int = 2000) -> dict[str, float]:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chittycan.settings")
    import django

    django.setup()
    from gateway.context import RequestContext
    from gateway.pipeline.route import request_facts
    from gateway.routing.policy import evaluate, parse_policy
    from tenants.keyinfo import KeyInfo, TenantInfo

    spec = yaml.safe_load(EXAMPLE.read_text())["routing_policies"][0]
    policy = parse_policy(spec["name"], spec["rules"], spec.get("fallback_chain"))
    tenant = TenantInfo(
        id=1, slug="demo", time_zone="Europe/Paris", rpm_limit=None, tpm_limit=None, monthly_request_quota=None
    )
    key = KeyInfo(
        id=1,
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
    return {name: statistics.median(values) for name, values in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
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
    timing = evaluation_cost(args.rounds)
    print(
        f"policy evaluation per request: {timing['facts_and_evaluate_us']:.1f} us with the facts built,"
        f" {timing['evaluate_us']:.1f} us evaluating alone (median; target < 50 us)"
    )


if __name__ == "__main__":
    main()
