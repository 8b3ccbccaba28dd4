"""Stage 1, parse: the body as an object naming a model (JSON, or a multipart form for uploads),
checked by the route's wire format.

Unknown fields are kept untouched so OpenAI-compatible upstreams see exactly what the client sent.
"""

from __future__ import annotations

from gateway.context import RequestContext
from gateway.formats import WireFormat
from gateway.formats.checks import model_name


def run(ctx: RequestContext, wire: WireFormat, body: bytes, headers: dict[bytes, bytes]) -> None:
    data = wire.decode(body, headers)
    ctx.requested_model = model_name(data)
    wire.parse(ctx, data, headers)
    ctx.body = data
    ctx.stage("parse")
