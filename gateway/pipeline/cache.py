"""Stage 5, cache: the response cache's place in the request path.

No response cache is configured yet, so every request goes on to the upstream; the cache issue
fills this stage (an exact-match lookup namespaced per tenant, with in-flight coalescing).
``ctx.cache_hit`` stays False and the ledger row says so.
"""

from __future__ import annotations

from gateway.context import RequestContext


async def lookup(ctx: RequestContext) -> None:
    """Nothing is cached: leave ``ctx.cache_hit`` False and go on to reserve and dispatch."""
    ctx.cache_hit = False
