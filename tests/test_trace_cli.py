"""``can trace``: a response's x-request-id leads to its ledger row and stage timings."""

from __future__ import annotations

import io

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from tenants import keys
from tests.conftest import wait_usage


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
    for stage in ("parse", "auth", "admit", "upstream"):
        assert f"  {stage}" in text


def test_unknown_request_id_is_a_clear_error(transactional_db):
    with pytest.raises(CommandError, match="no usage row"):
        call_command("trace", "req_nope")
