"""Stage 10, record: one ledger row for every request that reached a provider.

The row is handed durably to the usage writer (a Redis stream, or the local spool when Redis is
unreachable) before the response finishes; the writer inserts it, idempotent by request id.
"""

from __future__ import annotations

from gateway import usage
from gateway.context import RequestContext


async def run(ctx: RequestContext) -> None:
    if ctx.reached_provider:
        await usage.hand_off_or_spool(usage.row_from_context(ctx))
