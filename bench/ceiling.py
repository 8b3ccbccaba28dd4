"""The Python ceiling for ``make bench``: a minimal aiohttp pass-through proxy.

``POST /v1/chat/completions`` is forwarded as it came (the body is not parsed) to the upstream
through one shared ``ClientSession`` with keep-alive connections. A JSON answer is read whole and
sent back with its length; an SSE answer (``text/event-stream``) is relayed chunk by chunk as it
arrives. No authentication, no database, no accounting: whatever a Python gateway does on top of
this is what it costs, so the benchmark reports every figure as a ratio to this proxy's.

    python -m bench.ceiling --upstream http://127.0.0.1:9100/v1 --port 9200
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)
STREAM_TYPE = "text/event-stream"


async def chat_completions(request: web.Request) -> web.StreamResponse:
    session = request.app[SESSION]
    body = await request.read()
    headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
    async with session.post(request.app[UPSTREAM] + "/chat/completions", data=body, headers=headers) as upstream:
        content_type = upstream.headers.get("Content-Type", "application/json")
        if not content_type.startswith(STREAM_TYPE):
            data = await upstream.read()
            return web.Response(status=upstream.status, body=data, headers={"Content-Type": content_type})
        response = web.StreamResponse(
            status=upstream.status, headers={"Content-Type": content_type, "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


def make_app(upstream: str) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
        async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as session:
            app[SESSION] = session
            yield

    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/chat/completions", chat_completions)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", required=True, help="the upstream's base URL, ending in /v1")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9200)
    args = parser.parse_args()
    import uvloop

    web.run_app(
        make_app(args.upstream),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        backlog=1024,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
