"""Load-balancing strategies: the order a model's deployments are tried in (``LLMModel.strategy``).

- ``priority`` (the default): lowest priority first; among equals a weighted random order.
- ``weighted``: a weighted random order over all the deployments, priorities ignored.
- ``lowest_latency``: the lowest decaying average latency first (``latency.ewma``, this process's
  traffic); a deployment not measured yet goes first, so each one is measured.
- ``lowest_cost``: the cheapest for the estimated request first (prompt tokens and the output cap
  at each deployment's own model price: it differs across the models of a policy's route).
- ``least_in_flight``: the fewest upstream attempts in flight first (``gateway.routing.inflight``:
  counts shared by every gateway process through Redis; this process's in embedded mode).

Within a routing policy's route, the strategy orders each hop's deployments; the hops keep their
order. The order is encoded in the returned route's priorities, so dispatch tries them as given.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Mapping

from core.money import PriceInfo, worst_case_micro
from gateway.routing import latency
from gateway.routing.table import DeploymentRoute, ModelRoute

STRATEGIES = ("priority", "weighted", "lowest_latency", "lowest_cost", "least_in_flight")

HOP = 100_000  # a policy's route puts hop N's deployments at priorities N * HOP + their own


def _weighted_order(pool: list[DeploymentRoute]) -> list[DeploymentRoute]:
    pool = list(pool)
    ordered: list[DeploymentRoute] = []
    while pool:
        pick = random.choices(range(len(pool)), weights=[max(d.weight, 0) or 1 for d in pool])[0]
        ordered.append(pool.pop(pick))
    return ordered


def order(
    route: ModelRoute,
    strategy: str,
    *,
    key_of: Callable[[DeploymentRoute], str],
    prompt_tokens: int = 0,
    output_tokens: int = 0,
    in_flight: Mapping[str, int] | None = None,
) -> ModelRoute:
    """The route with its deployments' priorities set to the strategy's order (``priority``: as is).

    ``in_flight`` (``least_in_flight``): the attempts in flight per ``key_of`` key (missing: 0).
    """
    if strategy not in STRATEGIES or strategy == "priority" or len(route.deployments) < 2:
        return route
    hops: dict[int, list[DeploymentRoute]] = {}
    for dep in route.deployments:
        hops.setdefault(dep.priority // HOP, []).append(dep)
    ordered: list[DeploymentRoute] = []
    for hop in sorted(hops):
        pool = _weighted_order(hops[hop])  # the tie-break of every strategy
        if strategy == "lowest_latency":
            pool.sort(key=lambda d: latency.ewma(key_of(d)) or 0.0)
        elif strategy == "lowest_cost":

            def cost(dep: DeploymentRoute) -> int:
                price: PriceInfo | None = route.price_for(dep)
                return worst_case_micro(price, prompt_tokens, output_tokens) if price is not None else 0

            pool.sort(key=cost)
        elif strategy == "least_in_flight":
            busy = in_flight or {}
            pool.sort(key=lambda d: busy.get(key_of(d), 0))
        ordered += [dataclasses.replace(d, priority=hop * HOP + rank) for rank, d in enumerate(pool)]
    return dataclasses.replace(route, deployments=tuple(ordered))
