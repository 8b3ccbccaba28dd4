"""Stage 4, limit: requests and tokens per minute for the key and each tenant of its chain.

The token count is the prompt (counted offline) plus the most the answer may use; what was taken
is given back to the actual figure at settle.
"""

from __future__ import annotations

from gateway import admission
from gateway.context import RequestContext


async def run(ctx: RequestContext, max_output_tokens: int) -> None:
    await admission.rate_limit(ctx, ctx.estimated_prompt_tokens + max_output_tokens)
