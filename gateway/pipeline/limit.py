"""Stage 4, limit: requests and tokens per minute for the key and each tenant of its chain.

The token count is the prompt (counted offline) plus the most the answer may use, corrected to
the actual figure at settle. With Redis the windows are planned here and taken by the reserve
stage in the same Lua call as the reservation (one round trip for both); without Redis they are
counted in this process now, and a full window is a 429 at once.
"""

from __future__ import annotations

from gateway import admission
from gateway.context import RequestContext


async def run(ctx: RequestContext, max_output_tokens: int) -> None:
    await admission.rate_limit(ctx, ctx.estimated_prompt_tokens + max_output_tokens)
