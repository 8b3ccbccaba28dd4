"""``can route explain --key KEY -f request.json``: the live routing policy's decision for a request,
without sending it: the matched rule, the model, each candidate deployment in order and why one
would be skipped (docs/routing.md)."""

from __future__ import annotations

import json
import sys
from typing import Any

from asgiref.sync import async_to_sync
from django.core.management.base import BaseCommand, CommandError, CommandParser

from gateway import auth
from gateway.context import RequestContext
from gateway.errors import GatewayError
from gateway.formats import CHAT, COMPLETIONS, EMBEDDINGS, MESSAGES, WireFormat
from gateway.pipeline import parse, route
from ledger.routes import describe_route

FORMATS: dict[str, WireFormat] = {
    "chat": CHAT,
    "completions": COMPLETIONS,
    "embeddings": EMBEDDINGS,
    "messages": MESSAGES,
}


class Command(BaseCommand):
    help = "Explain the routing policy's decision for a request, without sending it (explain --key KEY -f FILE)."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        explain = sub.add_parser("explain", help="evaluate a request body against the live policy")
        explain.add_argument("--key", required=True, help="the API key the request would use (ck-...)")
        explain.add_argument("-f", "--file", required=True, help="the request body as JSON (- for standard input)")
        explain.add_argument(
            "--endpoint",
            choices=sorted(FORMATS),
            default="",
            help="the /v1 route (default: messages when the body has max_tokens and no max_completion_tokens "
            "and a model starting with claude, else chat)",
        )
        explain.add_argument("--tags", default="", help="as the X-ChittyCan-Tags header: comma-separated")
        explain.add_argument("--json", action="store_true", help="the explanation as JSON")

    def handle(self, *args: Any, **opts: Any) -> None:
        path = opts["file"]
        try:
            raw = sys.stdin.buffer.read() if path == "-" else open(path, "rb").read()  # noqa: SIM115
        except OSError as exc:
            raise CommandError(f"cannot read {path}: {exc.strerror}") from None
        endpoint = opts["endpoint"] or _guess_endpoint(raw)
        result = async_to_sync(explain)(opts["key"], raw, endpoint, opts["tags"])
        if opts["json"]:
            self.stdout.write(json.dumps(result, indent=2))
            return
        if result.get("error"):
            self.stdout.write(f"refused: {result['status']} {result['error']}")
        for line in describe_route(result.get("route") or {}):
            self.stdout.write(line)
        if result.get("order"):
            self.stdout.write("dispatch order: " + " -> ".join(result["order"]))


def _guess_endpoint(raw: bytes) -> str:
    try:
        data = json.loads(raw)
    except ValueError:
        return "chat"
    if not isinstance(data, dict):
        return "chat"
    if "prompt" in data:
        return "completions"
    if "input" in data and "messages" not in data:
        return "embeddings"
    model = data.get("model")
    if isinstance(model, str) and model.startswith("claude") and "max_completion_tokens" not in data:
        return "messages"
    return "chat"


async def explain(token: str, raw: bytes, endpoint: str, tags: str) -> dict[str, Any]:
    """Parse, authenticate and route as the gateway would; stop before anything is sent."""
    wire = FORMATS[endpoint]
    ctx = RequestContext(request_id="explain", endpoint=endpoint)
    headers = {b"authorization": f"Bearer {token}".encode(), b"x-chittycan-tags": tags.encode()}
    try:
        parse.run(ctx, wire, raw, headers)
        ctx.key = await auth.authenticate(token)
        ctx.estimated_prompt_tokens = wire.prompt_tokens(ctx)
        resolved = await route.resolve(ctx, wire.kinds, headers)
    except GatewayError as err:
        return {
            "endpoint": endpoint,
            "status": err.status,
            "error": err.message,
            "code": err.code,
            "route": ctx.route_explanation,
            "header": ctx.route_header,
        }
    order = [f"{d.provider.slug}/{d.upstream_model}" for d in sorted(resolved.deployments, key=lambda d: d.priority)]
    return {
        "endpoint": endpoint,
        "estimated_prompt_tokens": ctx.estimated_prompt_tokens,
        "model": ctx.route_explanation.get("model", resolved.name),
        "route": ctx.route_explanation,
        "header": ctx.route_header,
        "order": order,
    }
