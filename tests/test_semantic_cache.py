"""The semantic response cache (docs/caching.md "Semantic cache"): a cached answer served to a
similar prompt of the same tenant, model and parameters; the prompt's embedding is a metered
request of its own. The fake OpenAI upstream embeds with vectors chosen here."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests import anthropic_support as support
from tests.conftest import wait_usage

anthropic_upstream = support.anthropic_upstream
fake_anthropic_server = support.fake_anthropic_server
anthropic_client = support.anthropic_client

EMBEDDER = "text-embedding-3-small"

# Prompts and the (unnormalised) vectors the fake upstream gives them: the gateway embeds the
# canonical prompt ("user: <text>"), so a vector is chosen by the question it contains.
CAPITAL = "What is the capital of France?"
CAPITAL_AGAIN = "Which city is the capital of France, please?"  # cosine 0.990 with CAPITAL
CAPITAL_FAR = "Tell me something about France."  # cosine 0.900 with CAPITAL
WEATHER = "How is the weather today?"  # orthogonal
WEATHER_AGAIN = "How's today's weather?"  # cosine 0.995 with WEATHER
CAPITAL_VAGUE = "France: its capital?"  # cosine 0.900 with CAPITAL, 0.810 with CAPITAL_FAR
VECTORS = {
    CAPITAL: [1.0, 0.0, 0.0, 0.0],
    CAPITAL_AGAIN: [0.99, math.sqrt(1 - 0.99**2), 0.0, 0.0],
    CAPITAL_FAR: [0.9, 0.0, math.sqrt(1 - 0.9**2), 0.0],
    WEATHER: [0.0, 0.0, 0.0, 1.0],
    WEATHER_AGAIN: [0.0, 0.0, math.sqrt(1 - 0.995**2), 0.995],
    CAPITAL_VAGUE: [0.9, 0.0, 0.0, math.sqrt(1 - 0.9**2)],
}


def chosen_vector(text: str) -> list[float]:
    for question, vector in VECTORS.items():
        if question in text:
            return vector
    return [0.5, 0.5, 0.5, 0.5]


def enable_semantic(name: str = "gpt-4o", threshold: float = 0.95, semantic: bool = True) -> None:
    from gateway import catalog
    from gateway.models import LLMModel

    catalog.model_update(
        LLMModel.objects.get(name=name),
        cache_enabled=True,
        semantic_cache_enabled=semantic,
        semantic_embedding_model=EMBEDDER,
        semantic_threshold=threshold,
    )


def ask(text: str, **fields: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": text}], **fields}


def post(server: Any, key: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {key}", **headers},
        timeout=10,
    )


def wait_vectors(count: int, timeout: float = 5.0) -> None:
    """Wait until ``count`` prompt vectors are stored (written in the background after the answer)."""
    from gateway.models import SemanticVector

    deadline = time.monotonic() + timeout
    while SemanticVector.objects.count() < count:
        assert time.monotonic() < deadline, f"fewer than {count} vectors stored"
        time.sleep(0.02)


def calls(app: Any, path: str) -> int:
    return sum(1 for r in app.requests if r.path.endswith(path))


@pytest.fixture
def semantic(upstream: Any) -> Iterator[Any]:
    """gpt-4o with the exact and semantic caches on (threshold 0.95), the fake embedding with
    ``VECTORS``; the answer text tests change is restored."""
    enable_semantic()
    upstream.embedding_for = chosen_vector
    text = upstream.text
    yield upstream
    upstream.text = text


def test_similar_prompt_hits_with_its_similarity_and_the_embedding_is_metered(semantic, gateway_server, tenant_key):
    tenant, key = tenant_key
    semantic.text = "Paris."
    first = post(gateway_server, key, ask(CAPITAL))
    wait_vectors(1)
    semantic.text = "a fresh answer"
    second = post(gateway_server, key, ask(CAPITAL_AGAIN))
    assert first.status_code == second.status_code == 200
    assert first.headers["x-chittycan-cache"] == "MISS"
    assert "x-chittycan-cache-similarity" not in first.headers
    assert second.headers["x-chittycan-cache"] == "HIT"
    assert second.headers["x-chittycan-cache-similarity"] == "0.990"
    assert second.headers["x-chittycan-cost"] == "0.000000"
    assert second.json()["choices"][0]["message"]["content"] == "Paris."
    assert second.json()["usage"] == first.json()["usage"]
    assert calls(semantic, "/chat/completions") == 1
    embedded = [r.body["input"] for r in semantic.requests if r.path.endswith("/embeddings")]
    assert embedded == [f"user: {CAPITAL}", f"user: {CAPITAL_AGAIN}"]

    rows = wait_usage(4, tenant=tenant)
    chats = sorted((r for r in rows if r.endpoint == "chat"), key=lambda r: r.cache_hit)
    embeddings = [r for r in rows if r.endpoint == "embeddings"]
    assert len(rows) == 4 and len(chats) == 2 and len(embeddings) == 2
    assert all(r.status == "ok" and r.http_status == 200 for r in rows)
    miss, hit = chats
    assert (miss.cache_hit, miss.cost_micro > 0, miss.saved_micro) == (False, True, 0)
    assert hit.cache_hit and hit.cost_micro == 0 and hit.saved_micro == miss.cost_micro
    assert hit.request_id == second.headers["x-request-id"]
    for row in embeddings:
        # its own row: the embedding model's price (0.02 per million) on its tokens, the same key
        assert row.requested_model == EMBEDDER and not row.cache_hit and row.status == "ok"
        assert row.api_key_id == miss.api_key_id and row.prompt_tokens > 0 and row.cost_micro >= 0
        assert row.request_id not in (first.headers["x-request-id"], second.headers["x-request-id"])
    assert sum(r.prompt_tokens for r in embeddings) == 8  # the fake counts 4 tokens per input


def test_below_the_threshold_is_a_miss(semantic, gateway_server, tenant_key):
    _, key = tenant_key
    assert post(gateway_server, key, ask(CAPITAL)).headers["x-chittycan-cache"] == "MISS"
    wait_vectors(1)
    far = post(gateway_server, key, ask(CAPITAL_FAR))  # 0.900 < 0.95
    assert far.headers["x-chittycan-cache"] == "MISS"
    assert "x-chittycan-cache-similarity" not in far.headers
    assert post(gateway_server, key, ask(WEATHER)).headers["x-chittycan-cache"] == "MISS"
    assert calls(semantic, "/chat/completions") == 3
    # a lower threshold serves a prompt as far: the nearest stored one (CAPITAL, not CAPITAL_FAR)
    enable_semantic(threshold=0.85)
    wait_vectors(3)
    semantic.text = "not served"
    near_enough = post(gateway_server, key, ask(CAPITAL_VAGUE))
    assert near_enough.headers["x-chittycan-cache"] == "HIT"
    assert near_enough.headers["x-chittycan-cache-similarity"] == "0.900"
    assert calls(semantic, "/chat/completions") == 3


def test_a_different_temperature_never_hits(semantic, gateway_server, tenant_key):
    _, key = tenant_key
    assert post(gateway_server, key, ask(CAPITAL, temperature=0.2)).headers["x-chittycan-cache"] == "MISS"
    wait_vectors(1)
    other = post(gateway_server, key, ask(CAPITAL_AGAIN, temperature=0.9))
    assert other.headers["x-chittycan-cache"] == "MISS"
    shorter = post(gateway_server, key, ask(CAPITAL_AGAIN, temperature=0.2, max_tokens=5))
    assert shorter.headers["x-chittycan-cache"] == "MISS"
    same = post(gateway_server, key, ask(CAPITAL_AGAIN, temperature=0.2))  # positive control
    assert same.headers["x-chittycan-cache"] == "HIT"
    assert same.headers["x-chittycan-cache-similarity"] == "0.990"
    assert calls(semantic, "/chat/completions") == 3


def test_tenant_b_never_gets_tenant_a_semantic_hit(semantic, gateway_server, make_tenant, make_key):
    key_a = make_key(make_tenant("tenant-a"))
    key_b = make_key(make_tenant("tenant-b"))
    semantic.text = "Paris, for tenant A."
    assert post(gateway_server, key_a, ask(CAPITAL)).headers["x-chittycan-cache"] == "MISS"
    wait_vectors(1)
    semantic.text = "Paris, for tenant B."
    similar = post(gateway_server, key_b, ask(CAPITAL_AGAIN))
    assert similar.headers["x-chittycan-cache"] == "MISS"
    assert similar.json()["choices"][0]["message"]["content"] == "Paris, for tenant B."
    wait_vectors(2)
    # A's very prompt: B's exact cache has nothing, and its nearest prompt is B's own
    same = post(gateway_server, key_b, ask(CAPITAL))
    assert same.headers["x-chittycan-cache"] == "HIT"
    assert same.json()["choices"][0]["message"]["content"] == "Paris, for tenant B."
    assert calls(semantic, "/chat/completions") == 2
    # positive control: A's own similar request hits A's answer
    a_again = post(gateway_server, key_a, ask(CAPITAL_AGAIN))
    assert a_again.headers["x-chittycan-cache"] == "HIT"
    assert a_again.json()["choices"][0]["message"]["content"] == "Paris, for tenant A."
    assert calls(semantic, "/chat/completions") == 2


def test_semantic_off_makes_no_embedding_call(upstream, gateway_server, tenant_key):
    _, key = tenant_key
    enable_semantic(semantic=False)
    upstream.embedding_for = chosen_vector
    assert post(gateway_server, key, ask(CAPITAL)).headers["x-chittycan-cache"] == "MISS"
    again = post(gateway_server, key, ask(CAPITAL_AGAIN))
    assert again.headers["x-chittycan-cache"] == "MISS"
    assert "x-chittycan-cache-similarity" not in again.headers
    assert post(gateway_server, key, ask(CAPITAL)).headers["x-chittycan-cache"] == "HIT"  # exact still on
    assert calls(upstream, "/embeddings") == 0
    assert calls(upstream, "/chat/completions") == 2


def test_a_semantic_hit_replays_as_a_stream(semantic, gateway_server, tenant_key):
    _, key = tenant_key
    client = openai.OpenAI(base_url=f"{gateway_server.url}/v1", api_key=key, max_retries=0)
    whole = client.chat.completions.create(**ask(CAPITAL))
    wait_vectors(1)
    raw = client.chat.completions.with_raw_response.create(**ask(CAPITAL_AGAIN), stream=True)
    assert raw.headers["x-chittycan-cache"] == "HIT"
    assert raw.headers["x-chittycan-cache-similarity"] == "0.990"
    chunks = list(raw.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert calls(semantic, "/chat/completions") == 1
    # a streamed miss stores its prompt too, and serves a similar non-stream request
    semantic.text = "Sunny."
    streamed = client.chat.completions.create(**ask(WEATHER), stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "Sunny."
    wait_vectors(2)
    semantic.text = "not served"
    hit = client.chat.completions.with_raw_response.create(**ask(WEATHER_AGAIN))
    assert hit.headers["x-chittycan-cache"] == "HIT"
    assert hit.headers["x-chittycan-cache-similarity"] == "0.995"
    assert hit.parse().choices[0].message.content == "Sunny."
    assert calls(semantic, "/chat/completions") == 2


def test_no_cache_and_no_store(semantic, gateway_server, tenant_key):
    _, key = tenant_key
    post(gateway_server, key, ask(CAPITAL))
    wait_vectors(1)
    refreshed = post(gateway_server, key, ask(CAPITAL_AGAIN), **{"cache-control": "no-cache"})
    assert refreshed.headers["x-chittycan-cache"] == "MISS"
    bypass = post(gateway_server, key, ask(CAPITAL_AGAIN, seed=1), **{"cache-control": "no-store"})
    assert bypass.headers["x-chittycan-cache"] == "BYPASS"
    assert calls(semantic, "/chat/completions") == 3
    assert calls(semantic, "/embeddings") == 2  # no-store embeds nothing


def test_a_failed_embedding_is_a_plain_miss(semantic, gateway_server, tenant_key):
    from tests.fakes.openai_upstream import Reply

    _, key = tenant_key
    semantic.push("/v1/embeddings", Reply(status=400, json={"error": {"message": "bad", "type": "x"}}))
    first = post(gateway_server, key, ask(CAPITAL))
    assert first.status_code == 200 and first.headers["x-chittycan-cache"] == "MISS"
    # its vector was not stored, so a similar prompt misses; the identical one still hits exactly
    assert post(gateway_server, key, ask(CAPITAL_AGAIN)).headers["x-chittycan-cache"] == "MISS"
    assert post(gateway_server, key, ask(CAPITAL)).headers["x-chittycan-cache"] == "HIT"


def test_prompt_and_params():
    from gateway.cache.semantic import prompt_and_params

    text, rest = prompt_and_params(
        "chat",
        {
            "model": "m",
            "temperature": 0.2,
            "messages": [
                {"role": "system", "content": "  Be   brief. "},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": "u"}]},
            ],
        },
    ) or ("", {})
    assert text == "system: Be brief.\nuser: Hi"
    assert rest["temperature"] == 0.2
    assert rest["messages"][1]["content"] == [{"type": "text", "text": ""}, {"type": "image_url", "image_url": "u"}]
    assert prompt_and_params("messages", {"system": "S", "messages": [{"role": "user", "content": "Q"}]}) == (
        "system: S\nuser: Q",
        {"system": "", "messages": [{"role": "user", "content": ""}]},
    )
    assert prompt_and_params("completions", {"prompt": "Say  hi"}) == ("Say hi", {"prompt": ""})
    assert prompt_and_params("completions", {"prompt": [1, 2]}) is None
    assert prompt_and_params("embeddings", {"input": "x"}) is None


def test_mock_embeddings_put_similar_texts_close():
    from gateway.providers.mock import _vector

    def cosine(a: str, b: str) -> float:
        return sum(x * y for x, y in zip(_vector(a, 256), _vector(b, 256), strict=True))

    assert cosine("What is the capital of France?", "what is the capital of france") == pytest.approx(1.0)
    assert cosine("What is the capital of France?", "What's the capital of France?") > 0.8
    assert cosine("What is the capital of France?", "How do I bake sourdough bread?") < 0.3


def test_admin_model_form_checks_the_semantic_fields(upstream):
    from gateway.admin import LLMModelForm
    from gateway.models import LLMModel

    data = {"name": "admin-semantic", "kind": "chat", "aliases": "[]", "owned_by": "x", "context_window": 1000}
    data |= {"max_output_tokens": 100, "is_active": "on", "cache_ttl": 60, "semantic_cache_enabled": "on"}
    no_cache = LLMModelForm(data={**data, "semantic_embedding_model": EMBEDDER})
    assert not no_cache.is_valid() and "semantic_cache_enabled" in no_cache.errors
    not_embedding = LLMModelForm(data={**data, "cache_enabled": "on", "semantic_embedding_model": "gpt-4o"})
    assert not not_embedding.is_valid() and "semantic_embedding_model" in not_embedding.errors
    too_low = LLMModelForm(
        data={**data, "cache_enabled": "on", "semantic_embedding_model": EMBEDDER, "semantic_threshold": 0.2}
    )
    assert not too_low.is_valid() and "semantic_threshold" in too_low.errors
    good = LLMModelForm(data={**data, "cache_enabled": "on", "semantic_embedding_model": EMBEDDER})
    assert good.is_valid(), good.errors
    good.save()
    stored = LLMModel.objects.get(name="admin-semantic")
    assert stored.semantic_cache_enabled and stored.semantic_threshold == 0.95
    assert stored.semantic_embedding_model == EMBEDDER


CONFIG = """
providers:
  - slug: up
    kind: openai
    base_url: https://up.example/v1
models:
  - name: chat-m
    cache: {ttl: 600}
    semantic_cache: {embedding_model: embed-m, threshold: 0.9}
  - name: embed-m
    kind: embedding
"""


def test_config_file_applies_exports_and_checks_the_semantic_cache(db, tmp_path):
    import io

    import yaml
    from django.core.management import call_command

    from control.config import load, schema
    from gateway.models import LLMModel

    path = tmp_path / "chittycan.yaml"
    path.write_text(CONFIG)
    call_command("apply", "-f", str(path), stdout=io.StringIO(), stderr=io.StringIO())
    model = LLMModel.objects.get(name="chat-m")
    assert (model.semantic_cache_enabled, model.semantic_embedding_model, model.semantic_threshold) == (
        True,
        "embed-m",
        0.9,
    )
    exported = tmp_path / "exported.yaml"
    call_command("export", "-o", str(exported), stdout=io.StringIO(), stderr=io.StringIO())
    [chat] = [m for m in yaml.safe_load(exported.read_text())["models"] if m["name"] == "chat-m"]
    assert chat["semantic_cache"] == {"embedding_model": "embed-m", "threshold": 0.9}
    out = io.StringIO()
    call_command("apply", "-f", str(exported), stdout=out, stderr=io.StringIO())
    assert "no changes" in out.getvalue()

    for bad, message in (
        (CONFIG.replace("    cache: {ttl: 600}\n", ""), "models[0].semantic_cache: needs the model's cache on"),
        (CONFIG.replace("embedding_model: embed-m", "embedding_model: nope"), "no model nope in models"),
        (CONFIG.replace("embedding_model: embed-m", "embedding_model: chat-m"), "is a chat model"),
        (CONFIG.replace("threshold: 0.9", "threshold: 1.5"), "threshold"),
    ):
        with pytest.raises(schema.ConfigError, match=re.escape(message)):
            load.load_text(bad, filename="x.yaml", env={})


def test_anthropic_messages_hit_in_their_own_wire_format(semantic, anthropic_upstream, anthropic_client):
    enable_semantic("claude-sonnet-4")
    fields: Any = {"model": "claude-sonnet-4", "max_tokens": 50, "system": "Be brief."}
    first = anthropic_client.messages.create(**fields, messages=[{"role": "user", "content": CAPITAL}])
    wait_vectors(1)
    raw = anthropic_client.messages.with_raw_response.create(
        **fields, messages=[{"role": "user", "content": CAPITAL_AGAIN}]
    )
    assert raw.headers["x-chittycan-cache"] == "HIT"
    assert raw.headers["x-chittycan-cache-similarity"] == "0.990"
    second = raw.parse()
    assert second.content[0].text == first.content[0].text and second.id == first.id
    assert sum(1 for r in anthropic_upstream.requests if r.path.endswith("/messages")) == 1
    embedded = [r.body["input"] for r in semantic.requests if r.path.endswith("/embeddings")]
    assert embedded[0] == f"system: Be brief.\nuser: {CAPITAL}"


def test_a_key_without_the_embeddings_endpoint_gets_plain_misses(semantic, gateway_server, make_tenant, make_key):
    tenant = make_tenant("chat-only")
    key = make_key(tenant, scopes={"endpoints": ["chat"]})
    assert post(gateway_server, key, ask(CAPITAL)).headers["x-chittycan-cache"] == "MISS"
    assert post(gateway_server, key, ask(CAPITAL_AGAIN)).headers["x-chittycan-cache"] == "MISS"
    assert post(gateway_server, key, ask(CAPITAL)).headers["x-chittycan-cache"] == "HIT"  # the exact cache
    assert calls(semantic, "/embeddings") == 0
    rows = wait_usage(3, tenant=tenant)
    assert [r.endpoint for r in rows] == ["chat", "chat", "chat"]


def _probe(values: list[float], params: str = "p" * 64) -> Any:
    import numpy as np

    from gateway.cache.semantic import Probe

    vector = np.asarray(values, dtype=np.float32)
    return Probe(vector / np.linalg.norm(vector), params)


def test_the_search_keeps_to_the_tenant_model_parameters_and_unexpired_rows(make_tenant):
    from datetime import timedelta

    from django.utils import timezone

    from gateway.cache import semantic
    from gateway.models import SemanticVector

    a, b = make_tenant("search-a"), make_tenant("search-b")
    semantic._remember(a.id, "m", "1" * 64, _probe([1, 0, 0]), 60)
    semantic._remember(a.id, "m", "2" * 64, _probe([0.95, 0.31, 0]), 60)
    semantic._remember(a.id, "other-model", "3" * 64, _probe([1, 0, 0]), 60)
    semantic._remember(a.id, "m", "4" * 64, _probe([1, 0, 0], params="q" * 64), 60)
    semantic._remember(b.id, "m", "5" * 64, _probe([1, 0, 0]), 60)
    semantic._remember(a.id, "m", "6" * 64, _probe([1, 0, 0, 0]), 60)  # another dimension
    semantic._remember(a.id, "m", "7" * 64, _probe([1, 0, 0]), 60)
    SemanticVector.objects.filter(cache_digest="7" * 64).update(expires_at=timezone.now() - timedelta(seconds=1))

    query = _probe([1, 0, 0]).vector
    found = semantic._nearest_numpy(a.id, "m", "p" * 64, query, 0.9)
    assert [d for d, _ in found] == ["1" * 64, "2" * 64]
    assert found[0][1] == pytest.approx(1.0) and found[1][1] == pytest.approx(0.95, abs=0.01)
    assert [d for d, _ in semantic._nearest_numpy(a.id, "m", "p" * 64, query, 0.999)] == ["1" * 64]
    assert [d for d, _ in semantic._nearest_numpy(b.id, "m", "p" * 64, query, 0.9)] == ["5" * 64]

    # storing again replaces the entry's row; the expired row goes when the tenant's model stores one
    semantic._remember(a.id, "m", "1" * 64, _probe([0, 0, 1]), 60)
    assert not SemanticVector.objects.filter(cache_digest="7" * 64).exists()
    assert SemanticVector.objects.filter(tenant=a, cache_digest="1" * 64).count() == 1
    assert [d for d, _ in semantic._nearest_numpy(a.id, "m", "p" * 64, query, 0.9)] == ["2" * 64]


def _pgvector_available() -> bool:
    from django.db import connection

    if connection.vendor != "postgresql":
        return False
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")
        return cursor.fetchone() is not None


def test_the_search_backend_follows_the_vector_extension(transactional_db):
    from django.db import connection

    from gateway.cache import semantic

    expected = "pgvector" if _pgvector_available() else "numpy"
    assert semantic._detect() == expected
    with connection.cursor() as cursor:  # a refused CREATE EXTENSION left the connection usable
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)


def test_pgvector_search(make_tenant):
    """Runs only where PostgreSQL has the vector extension (not on the project's test machine)."""
    if not _pgvector_available():
        pytest.skip("PostgreSQL has no vector extension here (apt: postgresql-<version>-pgvector)")
    from gateway.cache import semantic

    assert semantic._detect() == "pgvector"
    semantic._backend = "pgvector"
    try:
        a, b = make_tenant("pg-a"), make_tenant("pg-b")
        semantic._remember(a.id, "m", "1" * 64, _probe([1, 0, 0]), 60)
        semantic._remember(a.id, "m", "2" * 64, _probe([0.95, 0.31, 0]), 60)
        semantic._remember(b.id, "m", "3" * 64, _probe([1, 0, 0]), 60)
        found = semantic._nearest_pgvector(a.id, "m", "p" * 64, _probe([1, 0, 0]).vector, 0.9)
        assert [d for d, _ in found] == ["1" * 64, "2" * 64]
        assert found[0][1] == pytest.approx(1.0, abs=1e-5)
    finally:
        semantic._backend = None
