"""The dashboard's live feed: a real websocket client (``websockets``) against the real gateway
(uvicorn, the Redis channel layer), requests made with the official OpenAI SDK.

- ann is a viewer of acme: she sees acme's requests and its team's (acme-team), within a second;
- rob is a viewer of rival: he never sees acme's traffic, nor she his;
- nobody joins a feed of a tenant outside their memberships, and an anonymous socket is refused.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import pytest
import websockets
from asgiref.sync import async_to_sync
from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async
from channels.layers import InMemoryChannelLayer, get_channel_layer
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.test import Client

from chittycan.routing import websocket_routes
from control.models import TenantMembership
from dashboard import consumers
from ledger import feed
from tenants import services
from tests.conftest import exact_usage

MSG: Any = [{"role": "user", "content": "hello"}]


def _session_cookie(user: Any) -> str:
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}"


@pytest.fixture
def feed_world(upstream, gateway_server, make_tenant, make_key):
    acme = make_tenant("acme")
    team = make_tenant("acme-team", parent=acme, kind="team")
    rival = make_tenant("rival")
    users = get_user_model().objects
    ann = users.create_user("ann", password="pw-ann-12345")
    rob = users.create_user("rob", password="pw-rob-12345")
    TenantMembership.objects.create(user=ann, tenant=acme, role="viewer")
    TenantMembership.objects.create(user=rob, tenant=rival, role="viewer")
    return {
        "server": gateway_server,
        "acme": acme,
        "team": team,
        "rival": rival,
        "team_key": make_key(team, name="team-app"),
        "rival_key": make_key(rival, name="rival-app"),
        "ann": _session_cookie(ann),
        "rob": _session_cookie(rob),
    }


def _ws_url(server: Any, tenant_id: int) -> str:
    return f"{server.url.replace('http://', 'ws://')}/ws/dashboard/feed/{tenant_id}/"


async def _open(server: Any, tenant_id: int, cookie: str | None) -> Any:
    headers = {"Origin": server.url}
    if cookie:
        headers["Cookie"] = cookie
    return await websockets.connect(_ws_url(server, tenant_id), additional_headers=headers, open_timeout=5)


async def _refused(server: Any, tenant_id: int, cookie: str | None) -> int | None:
    """The close code the server answers with (None: it stayed open)."""
    try:
        ws = await _open(server, tenant_id, cookie)
    except websockets.InvalidStatus as exc:  # refused before the handshake completed
        return int(exc.response.status_code)
    try:
        await asyncio.wait_for(ws.recv(), timeout=2)
    except websockets.ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd else None
    except TimeoutError:
        return None
    finally:
        await ws.close()
    return None


def _chat(server: Any, key: str) -> str:
    sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
    raw = sdk.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG)
    return str(raw.headers["x-request-id"])


async def _nothing(ws: Any, seconds: float) -> bool:
    try:
        await asyncio.wait_for(ws.recv(), timeout=seconds)
    except TimeoutError:
        return True
    return False


def test_feed_shows_the_subtrees_requests_within_a_second_and_nobody_elses(feed_world):
    w = feed_world
    server = w["server"]

    async def run() -> None:
        ann = await _open(server, w["acme"].pk, w["ann"])
        rob = await _open(server, w["rival"].pk, w["rob"])
        try:
            await asyncio.sleep(0.2)  # both joined their groups
            request_id = await asyncio.to_thread(_chat, server, w["team_key"])
            loop = asyncio.get_running_loop()
            started = loop.time()
            message = json.loads(await asyncio.wait_for(ann.recv(), timeout=1.0))
            assert loop.time() - started < 1.0
            assert message["request_id"] == request_id
            assert message["model"] == "gpt-4o" and message["status"] == "ok" and message["tenant_id"] == w["team"].pk
            assert await _nothing(rob, 0.5), "rival's feed showed acme's request"

            rival_id = await asyncio.to_thread(_chat, server, w["rival_key"])
            assert json.loads(await asyncio.wait_for(rob.recv(), timeout=1.0))["request_id"] == rival_id
            assert await _nothing(ann, 0.5), "acme's feed showed rival's request"
        finally:
            await ann.close()
            await rob.close()

    async_to_sync(run)()
    exact_usage(w["team"], 1, settle=0)
    exact_usage(w["rival"], 1, settle=0)


def test_feed_refuses_other_tenants_and_anonymous_sockets(feed_world):
    w = feed_world
    server = w["server"]

    async def run() -> None:
        assert await _refused(server, w["rival"].pk, w["ann"]) == 4403
        assert await _refused(server, w["acme"].pk, w["rob"]) == 4403
        assert await _refused(server, w["team"].pk, w["rob"]) == 4403
        assert await _refused(server, w["acme"].pk, None) == 4401
        # A page from another site may not open the socket with the user's cookie.
        try:
            ws = await websockets.connect(
                _ws_url(server, w["acme"].pk), additional_headers={"Origin": "http://evil.example", "Cookie": w["ann"]}
            )
        except websockets.InvalidStatus as exc:
            assert exc.response.status_code == 403
        else:
            code = None
            try:
                await asyncio.wait_for(ws.recv(), timeout=2)
            except websockets.ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd else -1
            assert code is not None, "a foreign origin's socket stayed open"
        # Positive control: her own tenant's team is fine.
        assert await _refused(server, w["team"].pk, w["ann"]) is None

    async_to_sync(run)()


def test_embedded_in_process_layer_carries_the_feed_per_tenant(transactional_db, settings, monkeypatch):
    """The embedded default (no Redis): Channels' in-process layer, the consumer behind the session
    middleware as chittycan/asgi.py mounts it, ``ledger.feed.publish`` as the record stage calls it.
    (``transactional_db``: the consumer's database calls close old connections, as Channels does,
    which a test-wide transaction would not survive.)"""
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    monkeypatch.setattr(consumers, "RECHECK", 0.1)  # open sockets check access again this often
    acme = services.tenant_create(slug="acme", name="Acme")
    team = services.tenant_create(slug="acme-team", parent=acme, kind="team")
    rival = services.tenant_create(slug="rival", name="Rival")
    users = get_user_model().objects
    ann, rob = users.create_user("ann"), users.create_user("rob")
    TenantMembership.objects.create(user=ann, tenant=acme, role="viewer")
    TenantMembership.objects.create(user=rob, tenant=rival, role="viewer")
    app = AuthMiddlewareStack(URLRouter(websocket_routes))
    cookies = {user.pk: _session_cookie(user).encode() for user in (ann, rob)}

    def socket(user: Any, tenant_id: int) -> WebsocketCommunicator:
        headers = [(b"cookie", cookies[user.pk]), (b"host", b"testserver")]
        return WebsocketCommunicator(app, f"/ws/dashboard/feed/{tenant_id}/", headers=headers)

    async def run() -> None:
        assert isinstance(get_channel_layer(), InMemoryChannelLayer)
        settings.REDIS_URL = ""  # the embedded default: watches kept in-process
        assert await feed.watched([team.pk, acme.pk, rival.pk]) == []  # nobody watches: nothing is sent
        ann_ws, rob_ws = socket(ann, acme.pk), socket(rob, rival.pk)
        assert (await ann_ws.connect())[0] and (await rob_ws.connect())[0]
        assert await feed.watched([team.pk, acme.pk, rival.pk]) == [acme.pk, rival.pk]
        row = {"request_id": "req_embedded", "tenant_id": team.pk, "requested_model": "gpt-4o", "cost_micro": 1234}
        feed.publish(row, [team.pk, acme.pk])  # the key's lineage: its tenant, then the ancestors
        message = await ann_ws.receive_json_from(timeout=1)
        assert message["request_id"] == "req_embedded" and message["cost_usd"] == "0.001234"
        assert await rob_ws.receive_nothing(timeout=0.3)
        snoop = socket(rob, acme.pk)
        connected, _ = await snoop.connect()
        assert connected  # accepted, then closed with 4403 at once
        assert (await snoop.receive_output(timeout=1))["code"] == 4403
        # Her membership taken away while the socket is open: it closes (4403) and carries no more.
        await database_sync_to_async(TenantMembership.objects.filter(user=ann).delete)()
        assert (await ann_ws.receive_output(timeout=2)) == {"type": "websocket.close", "code": 4403}
        await rob_ws.disconnect()

    async_to_sync(run)()
