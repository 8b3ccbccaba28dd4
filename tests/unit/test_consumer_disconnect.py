"""``GatewayConsumer``: a client that leaves cancels the pipeline; the server's "disconnect" that
only says the response is complete (uvicorn sends one) does not cut what follows the answer."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.consumers import GatewayConsumer
from gateway.context import RequestContext


class _Probe(GatewayConsumer):
    """Answers at once, then does more work (as the cache store, settle and record do)."""

    after: list[str]

    async def run(self, ctx: RequestContext, body: bytes) -> None:
        self.after = []
        try:
            if self.scope.get("answer_first", True):
                await self.send_json(200, b"{}", [])
            for _ in range(5):
                await asyncio.sleep(0.01)
            self.after.append("done")
        except asyncio.CancelledError:
            self.after.append("cancelled")
            raise


def _serve(*, answer_first: bool, client_leaves: bool) -> tuple[list[str], list[dict[str, Any]]]:
    async def go() -> tuple[list[str], list[dict[str, Any]]]:
        sent: list[dict[str, Any]] = []
        complete = asyncio.Event()
        left = asyncio.Event()
        messages = [{"type": "http.request", "body": b"{}", "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop(0)
            # uvicorn: "disconnect" once the response is complete, or when the client goes away.
            done = asyncio.ensure_future(complete.wait())
            gone = asyncio.ensure_future(left.wait())
            await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
            done.cancel()
            gone.cancel()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                complete.set()

        consumer = _Probe()
        if client_leaves:
            asyncio.get_running_loop().call_later(0.02, left.set)
        scope = {"type": "http", "method": "POST", "path": "/v1/x", "headers": [], "answer_first": answer_first}
        await consumer(scope, receive, send)
        return consumer.after, sent

    return asyncio.run(go())


def test_work_after_a_complete_answer_is_not_cancelled_by_the_servers_disconnect() -> None:
    after, sent = _serve(answer_first=True, client_leaves=False)
    assert after == ["done"]
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]


def test_a_client_that_leaves_before_the_answer_cancels_the_pipeline() -> None:
    after, sent = _serve(answer_first=False, client_leaves=True)
    assert after == ["cancelled"]
    assert sent == []  # nobody to answer
