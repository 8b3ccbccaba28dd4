"""Stage 6, reserve: the worst-case cost on every budget and quota counter, all or nothing.

A refusal is a 402 ``insufficient_quota`` naming the budget, what is left and what this request
may cost; it also gives back what the limit stage took.
"""

from __future__ import annotations

from gateway import admission
from gateway.context import RequestContext


async def run(ctx: RequestContext, max_output_tokens: int) -> None:
    await admission.reserve(ctx, max_output_tokens)
    ctx.stage("admit")
