"""The typed, documented /v1 endpoints off the hot path (django-ninja): models, and the stored
Responses API answers (retrieve, delete, input items; ``POST /v1/responses`` is a hot route).

OpenAPI docs at /v1/docs. Authentication is the same key check as the hot path; errors use the
OpenAI envelope.
"""

from __future__ import annotations

from typing import Any

import orjson
from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt
from ninja import NinjaAPI, Schema
from ninja.errors import ValidationError
from ninja.security import HttpBearer

from gateway import auth, responses_store
from gateway.errors import GatewayError, InvalidRequest, NotFound
from gateway.models import StoredResponse
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


@api.exception_handler(ValidationError)
def invalid_parameters(request: HttpRequest, exc: ValidationError) -> HttpResponse:
    """A query parameter of the wrong type: a 400 in the OpenAI envelope (not ninja's 422)."""
    first = exc.errors[0] if exc.errors else {}
    where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    return gateway_error(request, InvalidRequest(f"{where or 'request'}: {first.get('msg', 'invalid')}", param=where))


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


# --- the Responses API's stored answers (the tenant's own only: any other id is a 404) ----------


async def _stored(request: HttpRequest, response_id: str) -> tuple[KeyInfo, StoredResponse]:
    key: KeyInfo = request.auth  # type: ignore[attr-defined]
    auth.check_endpoint(key, "responses")
    row = await responses_store.find(key.tenant.id, response_id)
    if row is None:
        raise _response_not_found(response_id)
    return key, row


def _response_not_found(response_id: str) -> NotFound:
    return NotFound(f"No response found with id '{response_id}'.", param="response_id", code="response_not_found")


def _json(body: Any) -> HttpResponse:
    return HttpResponse(orjson.dumps(body), content_type="application/json")


@api.get("/responses/{response_id}", auth=GatewayKeyAuth(), summary="A stored Responses API answer")
async def get_response(request: HttpRequest, response_id: str) -> HttpResponse:
    _, row = await _stored(request, response_id)
    return _json(row.response)


@api.delete("/responses/{response_id}", auth=GatewayKeyAuth(), summary="Delete a stored response")
async def delete_response(request: HttpRequest, response_id: str) -> HttpResponse:
    key, _ = await _stored(request, response_id)
    if not await sync_to_async(responses_store.delete, thread_sensitive=False)(key.tenant.id, response_id):
        raise _response_not_found(response_id)
    return _json({"id": response_id, "object": "response", "deleted": True})


@api.get("/responses/{response_id}/input_items", auth=GatewayKeyAuth(), summary="A stored response's input items")
async def list_input_items(
    request: HttpRequest, response_id: str, after: str | None = None, limit: int = 20, order: str = "desc"
) -> HttpResponse:
    """Everything the model was given as input (earlier turns first), paginated as OpenAI does:
    ``limit`` 1 to 100, ``order`` ``asc`` or ``desc`` (the default), ``after`` an item id."""
    _, row = await _stored(request, response_id)
    if not 1 <= limit <= 100:
        raise InvalidRequest("limit: must be an integer from 1 to 100", param="limit")
    if order not in ("asc", "desc"):
        raise InvalidRequest("order: must be 'asc' or 'desc'", param="order")
    items: list[Any] = list(row.input_items or [])
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [item.get("id") for item in items]
        if after not in ids:
            raise InvalidRequest(f"after: no input item with id '{after}' in this response", param="after")
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    return _json(
        {
            "object": "list",
            "data": page,
            "first_id": page[0].get("id") if page else None,
            "last_id": page[-1].get("id") if page else None,
            "has_more": len(items) > limit,
        }
    )


@csrf_exempt
def unknown_url(request: HttpRequest, rest: str = "") -> HttpResponse:
    """Any other /v1 path: OpenAI's "Invalid URL" 404, in the envelope the SDKs parse."""
    error = NotFound(f"Invalid URL ({request.method} {request.path})", code="unknown_url")
    return gateway_error(request, error)
