"""Stage 3, route: the public model name to its deployments, if the key may use it; then the
routing policy (docs/routing.md) picks the target model or deployments, the fallback chain, the
timeouts and retries, or rejects the request.

Dev mode sends every model to the mock (or a local Ollama); passthrough mode to the passthrough
provider (no policy applies: the client's own key decides). An unknown model and a model the key
may not use look the same to the client.

The policies are compiled in the route table snapshot: no database query on the hot path. Live
state a condition reads (``health``, ``p50_ms``, ``budget_used``) is computed only when a rule of
the tenant's policies references it. The decision and every candidate's fate ("why this model")
go to ``ctx.route_explanation`` (the ledger row's ``route``) and ``X-ChittyCan-Route``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import redis
from django.conf import settings
from django.utils import timezone

from budgets import counters
from budgets import service as budget_service
from budgets.periods import Counter, counters_for
from core import money, runtime
from core.money import PriceInfo
from gateway.admission import INPUT_MARGIN, INPUT_OVERHEAD_TOKENS
from gateway.context import RequestContext
from gateway.errors import GatewayError, NotFound, PermissionDenied
from gateway.routing import breaker, inflight, latency, strategy
from gateway.routing.experiments import ExperimentSpec, assign
from gateway.routing.policy import LIVE_VARIABLES, Decision, Policy, Timeouts, evaluate
from gateway.routing.table import (
    DeploymentRoute,
    HopTimeouts,
    ModelRoute,
    RouteTable,
    deployment_ident,
    dev_route,
    passthrough_route,
    route_table,
)
from tenants.keyinfo import KeyInfo

__all__ = [
    "EXPERIMENT_HEADER",
    "TAGS_HEADER",
    "apply_experiment",
    "decide",
    "request_facts",
    "request_tags",
    "resolve",
]

TAGS_HEADER = b"x-chittycan-tags"
EXPERIMENT_HEADER = b"x-chittycan-experiment"
MAX_TAGS = 20


async def resolve(
    ctx: RequestContext, kinds: tuple[str, ...], headers: Mapping[bytes, bytes] | None = None
) -> ModelRoute:
    name = ctx.requested_model
    table = await route_table()
    route = table.resolve(name)
    if settings.CHITTYCAN_MODE == "dev":
        route = dev_route(name, route)
    elif ctx.passthrough_key:
        route = await passthrough_route(name, route)
    key = ctx.key
    assert key is not None
    if route is None or not key.allows_model(route.name, route.aliases):
        # Unknown and not-allowed look the same: a key never learns what other tenants may use.
        if route is not None and key.models is not None and name in key.models:
            raise PermissionDenied(f"This API key may not use the model {name}.")
        raise NotFound(f"The model `{name}` does not exist or you do not have access to it.", param="model")
    # Dev mode serves any kind from its one deployment; passthrough cannot know an unlisted model's kind.
    unlisted_passthrough = bool(ctx.passthrough_key) and route.id is None
    if route.kind not in kinds and settings.CHITTYCAN_MODE != "dev" and not unlisted_passthrough:
        raise GatewayError(
            f"The model `{name}` does not support the {ctx.endpoint} endpoint.",
            status=400,
            type="invalid_request_error",
            code="unsupported_model",
            param="model",
        )
    ctx.route = route
    ctx.tags = request_tags(headers or {})
    if not ctx.passthrough_key:
        decision = await _apply_policy(ctx, table, kinds)
        if table.experiments:
            apply_experiment(ctx, table, kinds, decision)
        routed = ctx.route
        if routed.strategy != "priority":
            busy = None
            if routed.strategy == "least_in_flight" and len(routed.deployments) > 1:
                busy = await inflight.counts(breaker.breaker_id(d) for d in routed.deployments)
            ctx.route = strategy.order(
                routed,
                routed.strategy,
                key_of=breaker.breaker_id,
                prompt_tokens=ctx.estimated_prompt_tokens,
                output_tokens=routed.max_output_tokens,
                in_flight=busy,
            )
            if ctx.route_explanation:
                ctx.route_explanation["strategy"] = routed.strategy
                if busy:
                    ctx.route_explanation["in_flight"] = {
                        deployment_name(d): busy.get(breaker.breaker_id(d), 0) for d in routed.deployments
                    }
    return ctx.route


async def _apply_policy(ctx: RequestContext, table: RouteTable, kinds: tuple[str, ...]) -> Decision | None:
    decision, routed = await decide(ctx, table, kinds)
    if decision is None:
        return None
    if decision.reject:
        ctx.extra_headers.append((b"x-chittycan-route", ctx.route_header.encode()))
        raise PermissionDenied(decision.reject, code="policy_rejected")
    if routed is not None:
        ctx.route = routed
    return decision


def apply_experiment(
    ctx: RequestContext, table: RouteTable, kinds: tuple[str, ...], decision: Decision | None
) -> ExperimentSpec | None:
    """The first running experiment on the requested model (or on the policy rule that matched):
    the request's arm serves it, keeping the rule's fallback chain, timeouts and retries.

    The arm is the request id's (deterministic), or the end user's when the body names one
    (sticky). It goes to ``ctx.experiment``/``ctx.arm`` (the ledger row), to
    ``X-ChittyCan-Experiment: id=arm`` and to the route explanation. Experiment traffic skips the
    response cache: a cached answer of one arm must not be counted for another.
    """
    key, base = ctx.key, ctx.route
    assert key is not None and base is not None
    rule, policy = (decision.rule, decision.policy) if decision is not None else ("", "")
    lineage = [t.id for t in key.lineage]
    spec = next((e for e in table.experiments if e.applies(ctx.requested_model, rule, policy, lineage)), None)
    if spec is None:
        return None
    arm = assign(spec, f"user:{ctx.end_user}" if ctx.end_user else ctx.request_id)
    about: dict[str, Any] = {"id": spec.slug, "arm": arm.name, "target": arm.target}
    if spec.status == "promoted":
        about["promoted"] = True
    found = _target(table, arm.target)
    if found is None or (found[0].kind not in kinds and settings.CHITTYCAN_MODE != "dev"):
        # A target this request cannot use: the request is served as if there were no experiment
        # (and not counted for the arm).
        about["skipped"] = "unknown target" if found is None else f"{found[0].kind} model"
        ctx.route_explanation = {**(ctx.route_explanation or {"requested": ctx.requested_model}), "experiment": about}
        return None
    plan = Decision(
        policy=policy,
        rule=rule,
        route=(arm.target,),
        fallback=decision.fallback if decision is not None else (),
        timeouts=decision.timeouts if decision is not None else None,
        retries=decision.retries if decision is not None else None,
    )
    routed, candidates, target_model = _plan(plan, table, base, kinds)
    ctx.route = dataclasses.replace(routed, cache_ttl=0)
    ctx.experiment, ctx.arm = spec.slug, arm.name
    ctx.extra_headers.append((EXPERIMENT_HEADER, f"{spec.slug}={arm.name}".encode()))
    explanation: dict[str, Any] = dict(ctx.route_explanation or {"requested": ctx.requested_model})
    explanation.update(model=target_model, candidates=candidates, experiment=about)
    ctx.route_explanation = explanation
    if ctx.route_header:
        ctx.route_header = f"rule={rule or '-'}; model={target_model}"
    return spec


async def decide(
    ctx: RequestContext, table: RouteTable, kinds: tuple[str, ...]
) -> tuple[Decision | None, ModelRoute | None]:
    """Evaluate the tenant's policies for the request in ``ctx`` (route already resolved).

    Returns (None, None) when no policy applies to the tenant; else the decision and the route it
    makes (None when the decision keeps the requested model as it is, or rejects). Fills
    ``ctx.route_explanation``, ``ctx.route_header`` and ``ctx.tags``. ``can route explain`` calls
    this without sending anything.
    """
    key, base = ctx.key, ctx.route
    assert key is not None and base is not None
    policies = table.policies.chain(t.id for t in key.lineage)
    if not policies:
        return None, None
    wanted = _variables(table, policies)
    facts = request_facts(ctx)
    if wanted & LIVE_VARIABLES:
        facts.update(await live_facts(wanted, table, key))
    decision = evaluate(policies, facts, table.policies.by_name)
    ctx.tags = (*ctx.tags, *(t for t in decision.tags if t not in ctx.tags))
    explanation: dict[str, Any] = {
        "policy": decision.policy or policies[0].name,
        "rule": decision.rule or None,
        "requested": ctx.requested_model,
    }
    if ctx.tags:
        explanation["tags"] = list(ctx.tags)
    if decision.errors:
        explanation["errors"] = decision.errors[:10]
    if decision.reject:
        explanation["rejected"] = decision.reject
        ctx.route_explanation = explanation
        ctx.route_header = f"rule={decision.rule}; rejected"
        return decision, None
    routed, candidates, target_model = _planned(decision, table, base, kinds)
    over, left = await _over_budget(ctx, routed, key)
    if over:
        routed, candidates, target_model = _plan(decision, table, base, kinds, over)
        explanation["budget_left_usd"] = money.format_usd(left)
    explanation["model"] = target_model
    explanation["candidates"] = candidates
    if decision.timeouts is not None:
        explanation["timeouts"] = decision.timeouts.as_dict()
    if decision.retries is not None:
        explanation["retries"] = decision.retries
    ctx.route_explanation = explanation
    ctx.route_header = f"rule={decision.rule or '-'}; model={target_model}"
    skipped = sum(1 for c in candidates if c.get("skipped") and c.get("skipped") != "weight")
    if skipped:
        ctx.route_header += f"; skipped={skipped}"
    return decision, routed


# --- the facts a condition reads ----------------------------------------------------------------


def request_tags(headers: Mapping[bytes, bytes]) -> tuple[str, ...]:
    raw = headers.get(TAGS_HEADER, b"")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return ()
    tags: list[str] = []
    for part in text.split(","):
        tag = part.strip()[:64]
        if tag and tag not in tags:
            tags.append(tag)
    return tuple(tags[:MAX_TAGS])


def request_facts(ctx: RequestContext, now: datetime | None = None) -> dict[str, Any]:
    """The request's, key's, tenant's and time's variables (cheap; no I/O)."""
    body, key = ctx.body, ctx.key
    assert key is not None
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 0
    metadata = body.get("metadata")
    try:
        zone = ZoneInfo(key.tenant.time_zone or "UTC")
    except (ValueError, KeyError):
        zone = ZoneInfo("UTC")
    local = (now or timezone.now()).astimezone(zone)
    return {
        "model": ctx.requested_model,
        "tokens": int(ctx.estimated_prompt_tokens),
        "max_tokens": max_tokens if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) else 0,
        "has_tools": bool(body.get("tools") or body.get("functions")),
        "has_images": _has_images(body),
        "stream": bool(ctx.stream),
        "tags": list(ctx.tags),
        "metadata": {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {},
        "endpoint": ctx.endpoint,
        "key_name": key.name,
        "key_scopes": sorted(key.endpoints) if key.endpoints is not None else ["*"],
        "tenant": key.tenant.slug,
        "tenant_path": [t.slug for t in reversed(key.lineage)],
        "plan": key.tenant.plan,
        "hour": local.hour,
        "weekday": local.weekday(),
    }


def _has_images(body: Mapping[str, Any]) -> bool:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return False
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") in ("image_url", "image", "input_image"):
                    return True
    return False


def deployment_name(deployment: DeploymentRoute) -> str:
    return f"{deployment.provider.slug}/{deployment.upstream_model}"


async def live_facts(wanted: Iterable[str], table: RouteTable, key: KeyInfo) -> dict[str, Any]:
    """Live state, only what the policies reference: breaker state, p50 latency, budget use."""
    names = set(wanted)
    facts: dict[str, Any] = {}
    deployments = {deployment_name(d): d for r in table.public_models() for d in r.deployments}
    if "health" in names:
        health: dict[str, str] = {}
        for label, dep in deployments.items():
            health[label] = (await breaker.snapshot(breaker.breaker_id(dep))).state()
        facts["health"] = health
    if "p50_ms" in names:
        facts["p50_ms"] = {label: latency.p50(breaker.breaker_id(dep)) or -1.0 for label, dep in deployments.items()}
    if "budget_used" in names:
        facts["budget_used"] = await budget_used(key)
    return facts


async def budget_used(key: KeyInfo) -> float:
    """The highest spent/limit fraction over the hard money budgets of the key and its tenant chain."""
    budgets = await budget_service.budgets_for(key)
    if not budgets:
        return 0.0
    money = [c for c in counters_for(key, budgets, timezone.now()) if c.kind == "m" and c.limit]
    if not money:
        return 0.0
    used = 0.0
    for counter, value in zip(money, await peek(money, key.root_id), strict=True):
        if value is not None and counter.limit:
            used = max(used, value / counter.limit)
    return used


async def budget_left(key: KeyInfo) -> int | None:
    """The least money (micro-USD) left over the hard money budgets of the key and its tenant
    chain, as their counters stand (reservations in flight included); None without such a budget."""
    budgets = await budget_service.budgets_for(key)
    if not budgets:
        return None
    money_counters = [c for c in counters_for(key, budgets, timezone.now()) if c.kind == "m" and c.limit]
    if not money_counters:
        return None
    values = await peek(money_counters, key.root_id)
    left = min(c.limit - (v or 0) for c, v in zip(money_counters, values, strict=True) if c.limit)
    return max(left, 0)


async def peek(found: list[Counter], root: int) -> list[int | None]:
    """The live values of budget counters (None: not built yet, or Redis unreachable): one ``MGET``
    on this event loop's Redis client (the counters of a tenant tree share a hash slot), no
    thread and no new connection; in embedded mode the in-process store."""
    if not settings.REDIS_URL:
        return [counters.peek_sync(c, root) for c in found]
    try:
        raw = await runtime.redis_client().mget([counters.counter_key(root, c.name) for c in found])
    except (redis.RedisError, OSError):
        return [None] * len(found)
    return [int(v) if v is not None else None for v in raw]


def worst_case(ctx: RequestContext, route: ModelRoute, deployment: DeploymentRoute) -> int:
    """What the budget reservation would hold (micro-USD) were ``deployment`` the route's only one:
    the padded prompt estimate and the output cap at its own model's price."""
    prompt = math.ceil(ctx.estimated_prompt_tokens * INPUT_MARGIN) + INPUT_OVERHEAD_TOKENS
    asked = ctx.body.get("max_completion_tokens") or ctx.body.get("max_tokens")
    cap = route.max_output_tokens
    output = min(asked, cap) if isinstance(asked, int) and not isinstance(asked, bool) and asked > 0 else cap
    return money.worst_case_micro(route.price_for(deployment), prompt, output)


async def _over_budget(ctx: RequestContext, routed: ModelRoute | None, key: KeyInfo) -> tuple[dict[str, int], int]:
    """The deployments of a policy's route whose worst case exceeds the money left on the tenant's
    budgets, when some others fit (they are dropped from the route, so neither tried nor reserved
    for). Only a route whose deployments differ in price (a fallback chain or split over models)
    is checked: when none fits the budget stage refuses the request as before (402). Returns them
    and the money left."""
    if routed is None or not routed.hop_prices or len(routed.deployments) < 2:
        return {}, 0
    left = await budget_left(key)
    if left is None:
        return {}, 0
    costs = {breaker.breaker_id(d): worst_case(ctx, routed, d) for d in routed.deployments}
    over = {ident: cost for ident, cost in costs.items() if cost > left}
    if not over or len(over) == len(costs):
        return {}, left
    return over, left


# --- from a decision to a route ------------------------------------------------------------------


def _hop_timeouts(limits: Timeouts | None, current: HopTimeouts) -> HopTimeouts:
    if limits is None:
        return current
    return HopTimeouts(connect=limits.connect, first_byte=limits.first_byte, total=limits.total)


def _target(table: RouteTable, target: str) -> tuple[ModelRoute, tuple[DeploymentRoute, ...]] | None:
    """A target: a public model (all its deployments) or ``provider/upstream-model`` (that one)."""
    dev = settings.CHITTYCAN_MODE == "dev"
    model = table.resolve(target)
    if model is not None:
        routed = dev_route(model.name, model) if dev else model
        return (routed, routed.deployments) if routed is not None else None
    found = table.deployment(target)
    if found is not None:
        owner, dep = found
        if dev:
            routed = dev_route(owner.name, owner)
            return (routed, routed.deployments) if routed is not None else None
        return owner, (dep,)
    if dev:
        routed = dev_route(target, None)
        return (routed, routed.deployments) if routed is not None else None
    return None


#: A planned route and its candidates, each with the deployment whose breaker may skip it (None:
#: explained as skipped already, or no deployment), and the target model's name.
Plan = tuple[ModelRoute, list[tuple[dict[str, Any], DeploymentRoute | None]], str]

#: Plans of the current route table snapshot by decision (``_planned``); dropped with the snapshot.
_plans: dict[tuple[Any, ...], Plan] = {}
_plans_table: list[RouteTable] = []
PLAN_CACHE_SIZE = 1024


_variables_of: dict[tuple[int, ...], frozenset[str]] = {}


def _variables(table: RouteTable, policies: list[Policy]) -> frozenset[str]:
    """The variables a tenant's policies reference, once per route table snapshot and chain."""
    _same_table(table)
    key = tuple(id(p) for p in policies)
    found = _variables_of.get(key)
    if found is None:
        if len(_variables_of) >= PLAN_CACHE_SIZE:
            _variables_of.clear()
        found = _variables_of[key] = table.policies.variables(policies)
    return found


def _same_table(table: RouteTable) -> None:
    """Drop what was computed from an older route table snapshot."""
    if not _plans_table or _plans_table[0] is not table:
        _plans.clear()
        _variables_of.clear()
        _plans_table[:] = [table]


def _live(plan: Plan) -> tuple[ModelRoute, list[dict[str, Any]], str]:
    """A plan's candidates as this request sees them: each with its breaker's skip reason now."""
    routed, template, target_model = plan
    candidates = []
    for entry, dep in template:
        found = dict(entry)
        if dep is not None and (skip := breaker.skip_reason(dep)) is not None:
            found["skipped"], found["reason"] = skip
        candidates.append(found)
    return routed, candidates, target_model


def _planned(
    decision: Decision, table: RouteTable, base: ModelRoute, kinds: tuple[str, ...]
) -> tuple[ModelRoute, list[dict[str, Any]], str]:
    """``_plan`` of a decision, computed once per route table snapshot and decision (the route it
    makes depends on nothing else; only the candidates' breaker state is read per request)."""
    _same_table(table)
    key = (
        decision.policy,
        decision.rule,
        decision.targets,
        decision.fallback,
        decision.timeouts,
        decision.retries,
        decision.split,
        base.name,
        kinds,
        settings.CHITTYCAN_MODE,
    )
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) >= PLAN_CACHE_SIZE:
            _plans.clear()
        plan = _plans[key] = _plan_template(decision, table, base, kinds, {})
    return _live(plan)


def _plan(
    decision: Decision,
    table: RouteTable,
    base: ModelRoute,
    kinds: tuple[str, ...],
    over_budget: Mapping[str, int] | None = None,
) -> tuple[ModelRoute, list[dict[str, Any]], str]:
    """The route a decision makes: its targets in order, then the fallback chain's hops, each
    target's deployments in their own priority order after the previous target's; duplicates
    dropped. Prices, context window and output cap are the first usable target's; the name, aliases
    and response-cache setting the requested model's. ``over_budget`` (breaker id -> worst case in
    micro-USD): deployments left out of the route, explained as skipped ``over budget``."""
    return _live(_plan_template(decision, table, base, kinds, over_budget or {}))


def _plan_template(
    decision: Decision,
    table: RouteTable,
    base: ModelRoute,
    kinds: tuple[str, ...],
    over_budget: Mapping[str, int],
) -> Plan:
    """``_plan`` without the live part: each candidate comes with the deployment whose breaker
    state ``_live`` reads."""
    hops: list[tuple[str, Timeouts | None, int | None, str]] = [
        (t, decision.timeouts, decision.retries, "route") for t in decision.targets
    ]
    if not hops:
        hops.append(("", decision.timeouts, decision.retries, "route"))  # the requested model itself
    hops += [(h.target, h.timeouts, None, "fallback") for h in decision.fallback]
    candidates: list[tuple[dict[str, Any], DeploymentRoute | None]] = []
    deployments: list[DeploymentRoute] = []
    seen: set[str] = set()
    owners: dict[tuple[int | None, str, str], tuple[PriceInfo, ...]] = {}  # each deployment's model's prices
    primary: ModelRoute | None = None
    for rank, (target, limits, retries, role) in enumerate(hops):
        found = (base, base.deployments) if not target else _target(table, target)
        label = target or base.name
        if found is None:
            candidates.append(({"target": label, "role": role, "skipped": "unknown target"}, None))
            continue
        model, deps = found
        if model.kind not in kinds and settings.CHITTYCAN_MODE != "dev":
            candidates.append(
                ({"target": label, "role": role, "model": model.name, "skipped": f"{model.kind} model"}, None)
            )
            continue
        if not deps:
            candidates.append(
                ({"target": label, "role": role, "model": model.name, "skipped": "no active deployment"}, None)
            )
            continue
        for dep in sorted(deps, key=lambda d: d.priority):
            ident = breaker.breaker_id(dep)
            entry: dict[str, Any] = {
                "target": label,
                "role": role,
                "model": model.name,
                "deployment": deployment_name(dep),
            }
            if ident in seen:
                continue  # already a candidate earlier in the order
            seen.add(ident)
            if limits is not None and limits.as_dict():
                entry["timeouts"] = limits.as_dict()
            if ident in over_budget:
                entry["skipped"] = "over budget"
                entry["worst_case_usd"] = money.format_usd(over_budget[ident])
                candidates.append((entry, None))
                continue  # not in the route: not tried, and not in the reservation's worst case
            provider = dep.provider
            if retries is not None and retries != provider.max_retries:
                provider = dataclasses.replace(provider, max_retries=retries)
            routed_dep = dataclasses.replace(
                dep,
                provider=provider,
                priority=rank * 100_000 + dep.priority,
                timeouts=_hop_timeouts(limits, dep.timeouts),
            )
            deployments.append(routed_dep)
            owners[deployment_ident(routed_dep)] = model.prices
            if primary is None:
                primary = model
            candidates.append((entry, dep))
    for arm, weight in decision.split:
        if arm != decision.split_pick:
            candidates.append(({"target": arm, "role": "split", "weight": weight, "skipped": "weight"}, None))
    if primary is None:
        # Nothing the rule names can serve this request: the requested model as it is.
        candidates.append(({"target": base.name, "role": "requested", "note": "no usable target in the rule"}, None))
        return base, candidates, base.name
    hop_prices = tuple((ident, prices) for ident, prices in owners.items() if prices is not primary.prices)
    # Named as the client asked (metrics, the response cache and its invalidation key on that name);
    # served, capped and priced as the target.
    routed = dataclasses.replace(
        primary,
        name=base.name,
        aliases=base.aliases,
        cache_ttl=base.cache_ttl,
        deployments=tuple(deployments),
        hop_prices=hop_prices,
    )
    return routed, candidates, primary.name
