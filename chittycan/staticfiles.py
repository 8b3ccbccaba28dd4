"""``/static/`` under ASGI: WhiteNoise's file index and responses, sent natively to the ASGI server.

WhiteNoise (configured from the ``WHITENOISE_*`` settings and ``STATIC_ROOT``, filled by
``manage.py collectstatic`` at install and image build time) decides what to answer: content type,
``Cache-Control``, ``ETag``/``Last-Modified`` with 304s, ranges and the pre-compressed ``.gz``
variants. Its Django middleware is synchronous, so under ASGI it would push every Django request
through a thread; this wrapper sits in front of the whole ASGI app instead, so ``/static/`` never
enters Django and the ``/v1`` routes pay one string comparison.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from whitenoise.middleware import WhiteNoiseMiddleware

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CHUNK = 64 * 1024


def _request_headers(scope: Scope) -> dict[str, str]:
    """The request headers WhiteNoise reads, under their WSGI names (``HTTP_IF_NONE_MATCH``, ...)."""
    headers: dict[str, str] = {}
    for name, value in scope.get("headers") or ():
        key = "HTTP_" + name.decode("latin-1").upper().replace("-", "_")
        headers[key] = value.decode("latin-1")
    return headers


class StaticFilesApp:
    """Serve the files WhiteNoise knows under ``STATIC_URL``; pass everything else to ``app``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.whitenoise = WhiteNoiseMiddleware(get_response=None)
        self.prefix: str = self.whitenoise.static_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.prefix):
            if self.whitenoise.autorefresh:
                static_file = await asyncio.to_thread(self.whitenoise.find_file, scope["path"])
            else:
                static_file = self.whitenoise.files.get(scope["path"])
            if static_file is not None:
                await self._serve(static_file, scope, send)
                return
        await self.app(scope, receive, send)

    @staticmethod
    async def _serve(static_file: Any, scope: Scope, send: Send) -> None:
        response = await asyncio.to_thread(static_file.get_response, scope["method"], _request_headers(scope))
        headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in response.headers]
        await send({"type": "http.response.start", "status": int(response.status), "headers": headers})
        body = response.file
        if body is None:
            await send({"type": "http.response.body", "body": b""})
            return
        try:
            while True:
                chunk = await asyncio.to_thread(body.read, CHUNK)
                if not chunk:
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            body.close()
