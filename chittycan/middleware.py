"""Django middleware of the project's own.

``request_id``: every ``/v1`` answer carries ``x-request-id``. The hot routes (Channels consumers)
set it themselves; this covers the ``/v1`` paths Django answers (``/v1/models``, unknown ``/v1``
URLs), including their 401s and 404s.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponseBase

from gateway.pipeline import new_request_id

V1_PREFIX = "/v1/"


def _tag(request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
    if request.path.startswith(V1_PREFIX) and "x-request-id" not in response:
        response["x-request-id"] = new_request_id()
    return response


class RequestIdMiddleware:
    """Adds ``x-request-id`` to the ``/v1`` responses Django produces; sync and async capable."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> HttpResponseBase | Awaitable[HttpResponseBase]:
        if self.is_async:
            return self._acall(request)
        return _tag(request, self.get_response(request))

    async def _acall(self, request: HttpRequest) -> HttpResponseBase:
        response = await self.get_response(request)
        return _tag(request, response)
