"""Stage 3, route: the public model name to its deployments, if the key may use it.

Dev mode sends every model to the mock (or a local Ollama); passthrough mode to the passthrough
provider. An unknown model and a model the key may not use look the same to the client.
"""

from __future__ import annotations

from django.conf import settings

from gateway.context import RequestContext
from gateway.errors import GatewayError, NotFound, PermissionDenied
from gateway.routing.table import ModelRoute, dev_route, passthrough_route, route_table


async def resolve(ctx: RequestContext, kinds: tuple[str, ...]) -> ModelRoute:
    name = ctx.requested_model
    table = await route_table()
    route = table.resolve(name)
    if settings.CHITTYCAN_MODE == "dev":
        route = dev_route(name, route)
    elif ctx.passthrough_key:
        route = await passthrough_route(name, route)
    key = ctx.key
    assert key is not None
    if route is None or not key.allows_model(route.name, route.aliases):
        # Unknown and not-allowed look the same: a key never learns what other tenants may use.
        if route is not None and key.models is not None and name in key.models:
            raise PermissionDenied(f"This API key may not use the model {name}.")
        raise NotFound(f"The model `{name}` does not exist or you do not have access to it.", param="model")
    # Dev mode serves any kind from its one deployment; passthrough cannot know an unlisted model's kind.
    unlisted_passthrough = bool(ctx.passthrough_key) and route.id is None
    if route.kind not in kinds and settings.CHITTYCAN_MODE != "dev" and not unlisted_passthrough:
        raise GatewayError(
            f"The model `{name}` does not support the {ctx.endpoint} endpoint.",
            status=400,
            type="invalid_request_error",
            code="unsupported_model",
            param="model",
        )
    ctx.route = route
    return route
