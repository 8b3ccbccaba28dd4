"""``can trace``: a response's x-request-id leads to its ledger row and stage timings."""

from __future__ import annotations

import io
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from gateway import catalog
from gateway.models import LLMModel, Provider
from tenants import keys
from tests.conftest import wait_usage
from tests.fakes.openai_upstream import Reply


def test_trace_shows_the_row_of_a_request(upstream, openai_client, tenant_key):
    res = openai_client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "trace me"}]
    )
    request_id = res.headers["x-request-id"]
    assert wait_usage(1, request_id=request_id)
    out = io.StringIO()
    call_command("trace", request_id, stdout=out)
    text = out.getvalue()
    assert request_id in text
    tenant, key = tenant_key
    prefix = keys.key_prefix(key)
    assert f"tenant    acme  key {prefix}" in text  # the slug and the key's public prefix, not row ids
    assert f"tenant    {tenant.pk} " not in text
    assert "gpt-4o -> fake-openai:gpt-4o-2024-08-06" in text
    assert "prompt 10" in text and "completion 7" in text
    assert "0.000095 USD (95 micro-USD)" in text
    # The tree: stages with their times, the decision, the attempt, tokens and cost.
    assert f"Trace: {request_id} (" in text
    for label in ("├─ Parse request:", "├─ Gateway auth:", "├─ Router decision:", "├─ Budget reserve:"):
        assert label in text
    assert "│  └─ tenant acme, key chitty_" in text
    assert "Model selected: fake-openai/gpt-4o-2024-08-06 (primary)" in text
    assert "├─ Upstream call: " in text and "(1 attempts)" in text
    assert "#1 fake-openai/gpt-4o-2024-08-06: " in text and ", ok [primary]" in text
    assert "Tokens: 10 in, 7 out" in text and "Cost: 0.000095 USD" in text


def test_trace_tree_shows_a_fallback_and_a_cache_hit(upstream, fake_openai, openai_client, tenant_key):
    primary = Provider.objects.get(slug="fake-openai")
    primary.max_retries = 0
    primary.save()
    backup = Provider.objects.create(
        slug="backup-openai", kind="openai", base_url=f"{fake_openai[1].url}/backup/v1", max_retries=0
    )
    model = LLMModel.objects.get(name="gpt-4o")
    model.deployments.create(provider=backup, upstream_model="gpt-4o-b", priority=1)
    catalog.model_update(model, cache_enabled=True, cache_ttl=600)
    upstream.push(
        "/v1/chat/completions", Reply(status=503, json={"error": {"message": "down", "type": "server_error"}})
    )
    messages: Any = [{"role": "user", "content": "fall back"}]
    first = openai_client.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages)
    second = openai_client.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages)
    assert second.headers["x-chittycan-cache"] == "HIT"
    texts = []
    for res in (first, second):
        assert wait_usage(1, request_id=res.headers["x-request-id"])
        out = io.StringIO()
        call_command("trace", res.headers["x-request-id"], stdout=out)
        texts.append(out.getvalue())
    fallback, hit = texts
    assert "(2 attempts)" in fallback
    assert "#1 fake-openai/gpt-4o-2024-08-06: " in fallback and ", error 503 server_error [primary]" in fallback
    assert "#2 backup-openai/gpt-4o-b: " in fallback and ", ok [fallback after 503 server_error]" in fallback
    assert "Model selected: backup-openai/gpt-4o-b (fallback after 503 server_error)" in fallback
    assert "Cache lookup: " in fallback and "(MISS)" in fallback
    assert "(HIT)" in hit and "saved 0.000" in hit and "Upstream call" not in hit
    assert "└─ Served from the response cache" in hit and "Cost: 0.000000 USD" in hit


def test_unknown_request_id_is_a_clear_error(transactional_db):
    with pytest.raises(CommandError, match="no usage row"):
        call_command("trace", "req_nope")
