"""The typed, documented /v1 endpoints off the hot path (django-ninja): models.

OpenAPI docs at /v1/docs. Authentication is the same key check as the hot path; errors use the
OpenAI envelope.
"""

from __future__ import annotations

from typing import Any

import orjson
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt
from ninja import NinjaAPI, Schema
from ninja.security import HttpBearer

from gateway import auth
from gateway.errors import GatewayError, NotFound
from gateway.routing.table import ModelRoute, dev_route, route_table
from tenants.keyinfo import KeyInfo


class GatewayKeyAuth(HttpBearer):
    """Bearer or x-api-key, verified like the hot path."""

    async def __call__(self, request: HttpRequest) -> Any:
        token = auth.bearer_token(
            {
                b"authorization": request.headers.get("Authorization", "").encode(),
                b"x-api-key": request.headers.get("x-api-key", "").encode(),
            }
        )
        info = await auth.authenticate(token)
        request.auth = info  # type: ignore[attr-defined]
        return info

    async def authenticate(self, request: HttpRequest, token: str) -> Any:  # pragma: no cover - __call__ overrides
        return await auth.authenticate(token)


api = NinjaAPI(title="ChittyCan /v1", version="1", urls_namespace="v1", docs_url="/docs")


@api.exception_handler(GatewayError)
def gateway_error(request: HttpRequest, exc: GatewayError) -> HttpResponse:
    response = HttpResponse(orjson.dumps(exc.openai_body()), status=exc.status, content_type="application/json")
    for key, value in exc.headers.items():
        response[key] = value
    return response


class ModelOut(Schema):
    id: str
    object: str = "model"
    created: int
    owned_by: str


class ModelList(Schema):
    object: str = "list"
    data: list[ModelOut]


def _out(route: ModelRoute) -> ModelOut:
    return ModelOut(id=route.name, created=route.created, owned_by=route.owned_by)


@api.get("/models", response=ModelList, auth=GatewayKeyAuth(), summary="Models this key may use")
async def list_models(request: HttpRequest) -> ModelList:
    key: KeyInfo = request.auth  # type: ignore[attr-defined]
    table = await route_table()
    return ModelList(data=[_out(r) for r in table.public_models() if key.allows_model(r.name, r.aliases)])


@api.get("/models/{path:model_id}", response=ModelOut, auth=GatewayKeyAuth(), summary="One model")
async def get_model(request: HttpRequest, model_id: str) -> ModelOut:
    key: KeyInfo = request.auth  # type: ignore[attr-defined]
    table = await route_table()
    route = table.resolve(model_id)
    if route is None and settings.CHITTYCAN_MODE == "dev":
        route = dev_route(model_id, None)
    if route is None or not key.allows_model(route.name, route.aliases):
        raise NotFound(f"The model '{model_id}' does not exist", param="model")
    return _out(route)


@csrf_exempt
def unknown_url(request: HttpRequest, rest: str = "") -> HttpResponse:
    """Any other /v1 path: OpenAI's "Invalid URL" 404, in the envelope the SDKs parse."""
    error = NotFound(f"Invalid URL ({request.method} {request.path})", code="unknown_url")
    return gateway_error(request, error)
