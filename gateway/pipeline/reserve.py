"""Stage 6, reserve: the worst-case cost on every budget and quota counter, all or nothing.

With Redis, the rate-limit windows the limit stage planned are taken in the same script: a full
window is a 429 and nothing is counted. A budget refusal is a 402 ``insufficient_quota`` naming the
budget, what is left and what this request may cost; the request still counts in its requests-per-
minute windows, never in the token windows.
"""

from __future__ import annotations

from gateway import admission
from gateway.context import RequestContext


async def run(ctx: RequestContext, max_output_tokens: int) -> None:
    await admission.reserve(ctx, max_output_tokens)
    ctx.stage("admit")
