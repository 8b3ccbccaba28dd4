"""``GET /api/requests`` and ``GET /api/requests/{request_id}``: the row-level request log, read with
a management token or with a gateway key that has ``usage:read``, never across tenants."""

from __future__ import annotations

import csv
import io
import re
from typing import Any

import httpx
import openai
import orjson
import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from control import tokens
from control.models import TenantMembership
from tests.conftest import exact_usage

MSG: Any = [{"role": "user", "content": "hi"}]


def _client(bearer: str | None = None) -> APIClient:
    client = APIClient()
    if bearer:
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {bearer}")
    return client


@pytest.fixture
def traffic(upstream, gateway_server, make_tenant, make_key):
    """Two tenants with traffic: acme (two requests, one streamed) and rival (one request)."""
    acme, rival = make_tenant("acme"), make_tenant("rival")
    acme_key = make_key(acme, name="acme-app")
    rival_key = make_key(rival, name="rival-app")

    def sdk(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{gateway_server.url}/v1", api_key=key, max_retries=0)

    raw = sdk(acme_key).chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG)
    list(sdk(acme_key).chat.completions.create(model="gpt-4o", messages=MSG, stream=True))
    rival_raw = sdk(rival_key).chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG)
    exact_usage(acme, 2, settle=0)
    exact_usage(rival, 1)
    return {
        "acme": acme,
        "rival": rival,
        "acme_key": acme_key,
        "rival_key": rival_key,
        "acme_id": raw.headers["x-request-id"],
        "acme_cost": raw.headers["x-chittycan-cost"],
        "rival_id": rival_raw.headers["x-request-id"],
    }


def test_a_key_finds_its_own_request_by_id(traffic):
    client = _client(traffic["acme_key"])
    response = client.get(f"/api/requests/{traffic['acme_id']}")
    assert response.status_code == 200, response.content
    row = response.json()
    assert row["request_id"] == traffic["acme_id"] and row["tenant"] == "acme" and row["key_name"] == "acme-app"
    assert row["model"] == "gpt-4o" and row["provider"] == "fake-openai" and row["status"] == "ok"
    assert row["cost_usd"] == traffic["acme_cost"]  # exactly what the response said it cost
    assert row["input_tokens"] > 0 and row["output_tokens"] > 0
    assert "upstream" in row["timings_ms"]
    # Never another tenant's row (it answers as if it did not exist); its own list holds only its own.
    assert client.get(f"/api/requests/{traffic['rival_id']}").status_code == 404
    listed = client.get("/api/requests").json()["results"]
    assert len(listed) == 2 and {r["tenant"] for r in listed} == {"acme"}
    # The rival key, the positive control, sees its own and not acme's.
    rival = _client(traffic["rival_key"])
    assert rival.get(f"/api/requests/{traffic['rival_id']}").status_code == 200
    assert rival.get(f"/api/requests/{traffic['acme_id']}").status_code == 404
    assert [r["request_id"] for r in rival.get("/api/requests").json()["results"]] == [traffic["rival_id"]]


def test_usage_read_scope(traffic, make_key):
    narrowed = make_key(traffic["acme"], name="chat-only", scopes={"endpoints": ["chat"]})
    refused = _client(narrowed).get(f"/api/requests/{traffic['acme_id']}")
    assert refused.status_code == 403
    assert "usage:read" in refused.json()["detail"]
    assert _client(narrowed).get("/api/requests").status_code == 403
    allowed = make_key(traffic["acme"], name="reader", scopes={"endpoints": ["chat", "usage:read"]})
    assert _client(allowed).get(f"/api/requests/{traffic['acme_id']}").status_code == 200
    # The scope can be given through the management API (and is checked there).
    staff = get_user_model().objects.create_user("root", password="pw-root-123", is_staff=True)
    _, token = tokens.token_create(user=staff)
    made = _client(token).post(
        "/api/keys/",
        {"tenant": "acme", "name": "api-reader", "scopes": {"endpoints": ["usage:read"]}},
        format="json",
    )
    assert made.status_code == 201, made.content
    reader = made.json()["key"]
    assert _client(reader).get(f"/api/requests/{traffic['acme_id']}").status_code == 200
    typo = _client(token).post(
        "/api/keys/", {"tenant": "acme", "name": "x", "scopes": {"endpoints": ["usage:write"]}}, format="json"
    )
    assert typo.status_code == 400
    bad = _client("chitty_" + "x" * 40).get("/api/requests")
    assert bad.status_code == 401
    assert _client().get("/api/requests").status_code in (401, 403)


def test_management_token_sees_its_subtree(traffic):
    users = get_user_model().objects
    alice = users.create_user("alice", password="pw-alice-123")
    sam = users.create_user("sam", password="pw-sam-123", is_staff=True)
    TenantMembership.objects.create(user=alice, tenant=traffic["acme"], role="member")
    _, alice_token = tokens.token_create(user=alice)
    _, sam_token = tokens.token_create(user=sam)
    alice_rows = _client(alice_token).get("/api/requests").json()["results"]
    assert {r["tenant"] for r in alice_rows} == {"acme"} and len(alice_rows) == 2
    assert _client(alice_token).get(f"/api/requests/{traffic['rival_id']}").status_code == 404
    sam_rows = _client(sam_token).get("/api/requests").json()["results"]
    assert {r["tenant"] for r in sam_rows} == {"acme", "rival"}


def test_filters_pagination_and_downloads(traffic):
    client = _client(traffic["acme_key"])
    first = client.get("/api/requests", {"limit": 1}).json()
    assert len(first["results"]) == 1 and first["next"]
    second = client.get(first["next"]).json()
    assert len(second["results"]) == 1 and second["next"] is None
    ids = {first["results"][0]["request_id"], second["results"][0]["request_id"]}
    assert len(ids) == 2 and traffic["acme_id"] in ids

    streamed = client.get("/api/requests", {"model": "gpt-4o", "status": "ok"}).json()["results"]
    assert len(streamed) == 2
    assert client.get("/api/requests", {"model": "other"}).json()["results"] == []
    assert len(client.get("/api/requests", {"status": "2xx"}).json()["results"]) == 2
    assert client.get("/api/requests", {"status": "404"}).json()["results"] == []
    assert client.get("/api/requests", {"end": "2020-01-01T00:00:00Z"}).json()["results"] == []
    assert len(client.get("/api/requests", {"start": "2020-01-01T00:00:00"}).json()["results"]) == 2

    for params, field in (
        ({"status": "weird"}, "status"),
        ({"start": "yesterday"}, "start"),
        ({"cache": "x"}, "cache"),
    ):
        bad = client.get("/api/requests", params)
        assert bad.status_code == 400 and field in bad.json(), bad.content
    bad_format = client.get("/api/requests", {"format": "xml"})
    assert bad_format.status_code == 400 and "format" in bad_format.json()

    as_csv = client.get("/api/requests", {"format": "csv"})
    assert as_csv.status_code == 200 and as_csv["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(as_csv.content.decode())))
    assert {r["request_id"] for r in rows} == ids and all(r["tenant"] == "acme" for r in rows)
    paged = client.get("/api/requests", {"format": "csv", "limit": "1"})
    assert len(list(csv.DictReader(io.StringIO(paged.content.decode())))) == 1
    assert paged["link"].endswith('rel="next"') and "format=csv" in paged["link"]
    assert "attachment" in paged["content-disposition"]
    as_jsonl = client.get("/api/requests", {"format": "jsonl"})
    assert as_jsonl["content-type"].startswith("application/jsonl")
    lines = [orjson.loads(line) for line in as_jsonl.content.splitlines()]
    assert {r["request_id"] for r in lines} == ids
    # An error asked for as CSV still comes in the JSON envelope.
    refused = client.get("/api/requests", {"format": "csv", "status": "weird"})
    assert refused.status_code == 400 and refused["content-type"].startswith("application/json")


def test_a_streamed_request_row_carries_the_cost_the_stream_announced(upstream, gateway_server, tenant_key):
    tenant, key = tenant_key
    body = {"model": "gpt-4o", "messages": MSG, "stream": True}
    with httpx.stream(
        "POST", f"{gateway_server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=body
    ) as response:
        request_id = response.headers["x-request-id"]
        text = "".join(response.iter_text())
    [announced] = re.findall(r": x-chittycan-cost=([0-9.]+)", text)
    exact_usage(tenant, 1, settle=0)
    row = _client(key).get(f"/api/requests/{request_id}").json()
    assert row["stream"] is True and row["cost_usd"] == announced and row["cost_micro"] > 0
