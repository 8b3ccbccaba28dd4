"""POST /v1/embeddings: float and base64 (the SDK's default), token-array input, usage and cost."""

from __future__ import annotations

import base64
import struct

import httpx
import openai
import pytest

from tests.conftest import exact_usage
from tests.fakes.openai_upstream import Reply

EXPECTED = [round(0.1 + 0.01 * d, 4) for d in range(8)]


def float32(values):
    """What a float32 round trip does to the fake's float64 values (what base64 carries)."""
    return list(struct.unpack(f"<{len(values)}f", struct.pack(f"<{len(values)}f", *values)))


def test_sdk_default_base64_is_decoded(upstream, openai_client, tenant_key):
    res = openai_client.embeddings.with_raw_response.create(model="text-embedding-3-small", input="hello world")
    result = res.parse()
    assert upstream.requests[-1].body["encoding_format"] == "base64"  # what the SDK asks by default
    assert result.object == "list" and result.data[0].object == "embedding" and result.data[0].index == 0
    assert result.data[0].embedding == float32(EXPECTED)
    assert result.usage.prompt_tokens == 4 and result.usage.total_tokens == 4
    assert res.headers["x-chittycan-cost"] == "0.000000"  # 4 tokens at $0.02/M rounds to zero micro-USD
    [row] = exact_usage(tenant_key[0], 1)
    assert row.endpoint == "embeddings" and row.prompt_tokens == 4 and row.status == "ok"


def test_float_format_returns_lists(upstream, openai_client):
    result = openai_client.embeddings.create(
        model="text-embedding-3-small", input=["a", "b"], encoding_format="float", dimensions=4
    )
    assert [d.embedding for d in result.data] == [[0.1, 0.11, 0.12, 0.13], [0.2, 0.21, 0.22, 0.23]]
    assert upstream.requests[-1].body["dimensions"] == 4


def test_upstream_floats_are_packed_when_client_asked_base64(upstream, gateway_server, tenant_key, openai_client):
    vector = [0.5, -0.25, 1.0e-3, 3.0]
    upstream.push(
        "/v1/embeddings",
        Reply(
            json={
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": vector}],
                "model": "text-embedding-3-small",
                "usage": {"prompt_tokens": 2, "total_tokens": 2},
            }
        ),
    )
    raw = httpx.post(
        f"{gateway_server.url}/v1/embeddings",
        json={"model": "text-embedding-3-small", "input": "x", "encoding_format": "base64"},
        headers={"authorization": f"Bearer {tenant_key[1]}"},
    ).json()
    encoded = raw["data"][0]["embedding"]
    assert isinstance(encoded, str)
    assert list(struct.unpack("<4f", base64.b64decode(encoded))) == float32(vector)
    # And through the SDK (default base64), the same vector comes back.
    upstream.push(
        "/v1/embeddings", Reply(json={**raw, "data": [{"object": "embedding", "index": 0, "embedding": vector}]})
    )
    assert openai_client.embeddings.create(model="text-embedding-3-small", input="x").data[0].embedding == float32(
        vector
    )


def test_token_array_inputs(upstream, openai_client, tenant_key):
    single = openai_client.embeddings.create(model="text-embedding-3-small", input=[1, 2, 3], encoding_format="float")
    assert len(single.data) == 1
    assert upstream.requests[-1].body["input"] == [1, 2, 3]
    many = openai_client.embeddings.create(
        model="text-embedding-3-small", input=[[1, 2], [3, 4, 5]], encoding_format="float"
    )
    assert [d.index for d in many.data] == [0, 1]
    assert upstream.requests[-1].body["input"] == [[1, 2], [3, 4, 5]]
    assert len(exact_usage(tenant_key[0], 2)) == 2


def test_mock_embeddings_are_deterministic_unit_vectors(transactional_db, gateway_server, make_tenant, make_key):
    from gateway.models import Provider
    from tests.conftest import add_model

    provider = Provider.objects.create(slug="mock", kind="mock")
    add_model("mock-embed", provider, kind="embedding", prices=("0.02", "0.02", "0"))
    client = openai.OpenAI(base_url=f"{gateway_server.url}/v1", api_key=make_key(make_tenant("t1")), max_retries=0)
    first = client.embeddings.create(model="mock-embed", input="same text", dimensions=16).data[0].embedding
    again = client.embeddings.create(model="mock-embed", input="same text", dimensions=16).data[0].embedding
    other = client.embeddings.create(model="mock-embed", input="other text", dimensions=16).data[0].embedding
    assert first == again != other and len(first) == 16
    assert abs(sum(v * v for v in first) - 1.0) < 1e-5


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "text-embedding-3-small"}, "input"),
        ({"model": "text-embedding-3-small", "input": []}, "input"),
        ({"model": "text-embedding-3-small", "input": [1, "a"]}, "input"),
        ({"model": "text-embedding-3-small", "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"model": "text-embedding-3-small", "input": "x", "dimensions": 0}, "dimensions"),
    ],
)
def test_bad_embedding_bodies_are_400(upstream, gateway_server, tenant_key, body, param):
    res = httpx.post(
        f"{gateway_server.url}/v1/embeddings", json=body, headers={"authorization": f"Bearer {tenant_key[1]}"}
    )
    assert res.status_code == 400
    assert res.json()["error"]["param"] == param
    assert upstream.requests == []


def test_chat_model_on_embeddings_endpoint_is_400(upstream, openai_client):
    with pytest.raises(openai.BadRequestError) as exc:
        openai_client.embeddings.create(model="gpt-4o", input="x")
    assert exc.value.code == "unsupported_model"
