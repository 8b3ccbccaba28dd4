"""Stage 10, record: one ledger row for every request that reached a provider.

The row is handed durably to the usage writer (a Redis stream, or the local spool when Redis is
unreachable); the writer inserts it, idempotent by request id. With Redis, the hand-off goes in
one round trip with the settle stage's commands (``ctx.closing``).
"""

from __future__ import annotations

from gateway import usage
from gateway.context import RequestContext


async def run(ctx: RequestContext) -> None:
    batch, ctx.closing = ctx.closing, None
    if ctx.reached_provider:
        await usage.hand_off_or_spool(usage.row_from_context(ctx), batch)
    if batch is not None:
        await batch.send()
