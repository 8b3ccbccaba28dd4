"""Stage 9, settle: the actual cost from the real usage; the rate ticket and reservation brought to it."""

from __future__ import annotations

from core import money
from gateway import admission
from gateway.context import RequestContext


async def run(ctx: RequestContext) -> None:
    if ctx.usage is not None and ctx.route is not None and not ctx.cache_hit:
        ctx.cost_micro = money.cost_micro(ctx.route.price_for(ctx.deployment), ctx.usage)
    await admission.settle(ctx)
