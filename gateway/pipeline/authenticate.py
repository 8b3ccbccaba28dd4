"""Stage 2, authenticate: the key (by prefix, verified by HMAC, cached) and its tenant chain.

In passthrough mode a client's own provider key (``sk-...``) is metered under the passthrough
tenant's key and forwarded upstream.
"""

from __future__ import annotations

from django.conf import settings

from gateway import auth
from gateway.context import RequestContext


async def run(ctx: RequestContext, headers: dict[bytes, bytes]) -> None:
    token = auth.bearer_token(headers)
    if settings.CHITTYCAN_PASSTHROUGH and token.startswith("sk-"):
        ctx.key = await auth.passthrough_key()
        ctx.passthrough_key = token
    else:
        ctx.key = await auth.authenticate(token)
    auth.check_endpoint(ctx.key, ctx.endpoint)
    ctx.stage("auth")
