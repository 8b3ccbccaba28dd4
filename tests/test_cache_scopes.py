"""The response cache's enablement per tenant and key, its scopes (whose entries are shared),
invalidation by key prefix and prompt glob (a tenant's own; anyone's for a staff management
token), the savings in the reports, and replay through the SDKs' stream helpers (docs/caching.md)."""

from __future__ import annotations

import io
import re
from typing import Any

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command

from tests.conftest import wait_usage
from tests.test_admin import admin_client, superuser
from tests.test_cache import (
    HI,
    TOOLS,
    anthropic_upstream,
    cached,
    chat_calls,
    enable_cache,
    fake_anthropic_server,
    post,
)

__all__ = ["admin_client", "anthropic_upstream", "cached", "fake_anthropic_server", "superuser"]

CACHE = "x-chittycan-cache"
QUANTUM: Any = [{"role": "user", "content": "Explain quantum computing"}]
POEM: Any = [{"role": "user", "content": "Write a poem"}]


def invalidate(server: Any, token: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/cache/invalidate", json=body, headers={"authorization": f"Bearer {token}"}, timeout=10
    )


def test_enabled_per_tenant_and_per_key(upstream, gateway_server, make_tenant, make_key):
    from tenants import services
    from tenants.models import ApiKey

    on = make_tenant("cache-on", cache_enabled=True)  # gpt-4o's own cache is off
    child = make_tenant("cache-on-child", parent=on)  # inherits its parent's choice
    plain = make_tenant("cache-plain")
    key_on, key_child, key_plain = make_key(on), make_key(child), make_key(plain)
    key_off = make_key(on, name="off")
    api_key = ApiKey.objects.get(tenant=on, name="off")
    services.key_update(api_key, cache_enabled=False)
    body = {"model": "gpt-4o", "messages": HI}
    assert [post(gateway_server, key_on, body).headers.get(CACHE) for _ in range(2)] == ["MISS", "HIT"]
    assert [post(gateway_server, key_child, body).headers.get(CACHE) for _ in range(2)] == ["MISS", "HIT"]
    # The key turned off, and a tenant that says nothing (the model's cache is off): no cache.
    assert post(gateway_server, key_off, body).headers.get(CACHE) is None
    assert post(gateway_server, key_plain, body).headers.get(CACHE) is None
    assert post(gateway_server, key_plain, body).headers.get(CACHE) is None
    assert chat_calls(upstream) == 5


def test_scopes_key_tree_and_global(cached, gateway_server, make_tenant, make_key):
    body = {"model": "gpt-4o", "messages": HI}
    # key: each key its own entries.
    narrow = make_tenant("narrow", cache_scope="key")
    k1, k2 = make_key(narrow, name="one"), make_key(narrow, name="two")
    assert post(gateway_server, k1, body).headers[CACHE] == "MISS"
    assert post(gateway_server, k2, body).headers[CACHE] == "MISS"
    assert post(gateway_server, k1, body).headers[CACHE] == "HIT"  # positive control
    # tree: two child tenants that share up to their root; another tree never sees them.
    root = make_tenant("tree-root")
    left, right = (make_tenant(s, parent=root, cache_scope="tree") for s in ("tree-left", "tree-right"))
    other = make_tenant("tree-other-child", parent=make_tenant("tree-other"), cache_scope="tree")
    cached.text = "tree answer"
    assert post(gateway_server, make_key(left), body).headers[CACHE] == "MISS"
    shared = post(gateway_server, make_key(right), body)
    assert shared.headers[CACHE] == "HIT" and shared.json()["choices"][0]["message"]["content"] == "tree answer"
    assert post(gateway_server, make_key(other), body).headers[CACHE] == "MISS"
    # global: tenants that say so share; a default tenant does not.
    g1, g2 = make_tenant("global-one", cache_scope="global"), make_tenant("global-two", cache_scope="global")
    cached.text = "global answer"
    assert post(gateway_server, make_key(g1), body).headers[CACHE] == "MISS"
    assert post(gateway_server, make_key(g2), body).headers[CACHE] == "HIT"
    assert post(gateway_server, make_key(make_tenant("private")), body).headers[CACHE] == "MISS"
    # A child's invalidation never drops the tree's shared entries (they are its root's).
    assert invalidate(gateway_server, make_key(left), {})
    assert post(gateway_server, make_key(right), body).headers[CACHE] == "HIT"


def test_invalidate_by_prompt_glob_and_key_prefix_is_per_tenant(cached, gateway_server, make_tenant, make_key):
    key_a, key_b = make_key(make_tenant("inv-a")), make_key(make_tenant("inv-b"))
    for key in (key_a, key_b):
        for messages in (QUANTUM, POEM):
            assert post(gateway_server, key, {"model": "gpt-4o", "messages": messages}).headers[CACHE] == "MISS"
    gone = invalidate(gateway_server, key_b, {"pattern": "*quantum*"})
    assert gone.status_code == 200 and gone.json() == {"deleted": 1, "pattern": "*quantum*"}
    assert post(gateway_server, key_b, {"model": "gpt-4o", "messages": QUANTUM}).headers[CACHE] == "MISS"
    assert post(gateway_server, key_b, {"model": "gpt-4o", "messages": POEM}).headers[CACHE] == "HIT"
    assert post(gateway_server, key_a, {"model": "gpt-4o", "messages": QUANTUM}).headers[CACHE] == "HIT"  # A's kept
    # By key prefix: the X-ChittyCan-Cache-Key an answer carries.
    poem = post(gateway_server, key_a, {"model": "gpt-4o", "messages": POEM})
    cache_key = poem.headers["x-chittycan-cache-key"]
    assert re.fullmatch(r"[0-9a-f]{64}", cache_key)
    assert invalidate(gateway_server, key_b, {"key_prefix": cache_key[:12]}).json()["deleted"] == 1  # B's own poem
    assert post(gateway_server, key_a, {"model": "gpt-4o", "messages": POEM}).headers[CACHE] == "HIT"
    assert invalidate(gateway_server, key_a, {"key_prefix": cache_key[:12], "model": "gpt-4o"}).json()["deleted"] == 1
    assert post(gateway_server, key_a, {"model": "gpt-4o", "messages": POEM}).headers[CACHE] == "MISS"
    # Bad filters are 400s in the OpenAI envelope; a gateway key cannot name a tenant.
    for bad, param in (
        ({"key_prefix": "XYZ"}, "key_prefix"),
        ({"pattern": ""}, "pattern"),
        ({"tenant": "inv-a"}, "tenant"),
        ({"colour": "red"}, "colour"),
    ):
        refused = invalidate(gateway_server, key_a, bad)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param


def test_a_staff_management_token_invalidates_any_tenant(cached, gateway_server, make_tenant, make_key):
    from control import tokens

    key_a, key_b = make_key(make_tenant("mgmt-a")), make_key(make_tenant("mgmt-b"))
    for key in (key_a, key_b):
        post(gateway_server, key, {"model": "gpt-4o", "messages": QUANTUM})
        post(gateway_server, key, {"model": "gpt-4o", "messages": POEM})
    users = get_user_model().objects
    _, staff = tokens.token_create(user=users.create_user("ops", password="x", is_staff=True))
    _, member = tokens.token_create(user=users.create_user("member", password="x"))
    assert invalidate(gateway_server, member, {}).status_code == 401  # not staff
    assert invalidate(gateway_server, "ccm_" + "x" * 44, {}).status_code == 401
    one = invalidate(gateway_server, staff, {"tenant": "mgmt-a", "pattern": "*poem*"})
    assert one.status_code == 200 and one.json()["deleted"] == 1
    assert invalidate(gateway_server, staff, {"tenant": "nobody"}).status_code == 400
    everyone = invalidate(gateway_server, staff, {"pattern": "Explain *"})
    assert everyone.json()["deleted"] == 2
    assert post(gateway_server, key_b, {"model": "gpt-4o", "messages": POEM}).headers[CACHE] == "HIT"


def test_cli_filters(cached, gateway_server, make_tenant, make_key):
    key_a = make_key(make_tenant("cli-a"))
    post(gateway_server, key_a, {"model": "gpt-4o", "messages": QUANTUM})
    post(gateway_server, key_a, {"model": "gpt-4o", "messages": POEM})
    out = io.StringIO()
    call_command("cache", "stats", "--tenant", "cli-a", "--pattern", "*quantum*", stdout=out)
    call_command("cache", "invalidate", "--all-tenants", "--pattern", "*poem*", stdout=out)
    call_command("cache", "stats", "--tenant", "cli-a", stdout=out)
    assert out.getvalue().splitlines() == [
        "1 cached answers for tenant cli-a (all models, prompt matching '*quantum*')",
        "1 cached answers dropped for every tenant (all models, prompt matching '*poem*')",
        "1 cached answers for tenant cli-a (all models)",
    ]


def test_savings_in_the_costs_report_and_the_usage_api(cached, gateway_server, make_tenant, make_key):
    from rest_framework.test import APIClient

    from control import tokens

    tenant = make_tenant("saver")
    key = make_key(tenant)
    for _ in range(4):
        post(gateway_server, key, {"model": "gpt-4o", "messages": HI})
    rows = wait_usage(4, tenant=tenant)
    saved = sum(r.saved_micro for r in rows)
    assert saved > 0 and sum(r.cache_hit for r in rows) == 3
    out = io.StringIO()
    call_command("analytics", "costs", "--tenant", "saver", stdout=out)
    dollars = f"{saved / 1_000_000:.6f}"
    assert f"Cache:        3 hits of 4 calls (75.00 %), 0 of them coalesced; saved {dollars}" in out.getvalue()
    client = APIClient()
    _, plaintext = tokens.token_create(user=get_user_model().objects.create_superuser("root", password="x"))
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {plaintext}")
    usage = client.get("/api/usage/", {"tenant": "saver", "period": "month", "group_by": "model"}).json()
    total = usage["total"]
    assert (total["cache_hits"], total["saved_micro"], total["cache_hit_rate"]) == (3, saved, 75.0)
    assert usage["results"][0]["cache_hits"] == 3 and usage["results"][0]["saved_micro"] == saved


def _events(stream: Any) -> tuple[list[Any], Any]:
    """What the openai SDK's stream() helper makes of a stream: its content and tool-call
    argument deltas, in order, and the final completion it assembles."""
    seen: list[Any] = []
    for event in stream:
        if event.type == "content.delta":
            seen.append(("content", event.delta))
        elif event.type == "tool_calls.function.arguments.delta":
            seen.append(("arguments", event.index, event.name, event.arguments_delta))
        elif event.type == "chunk":
            seen.extend(("finish", c.index, c.finish_reason) for c in event.chunk.choices if c.finish_reason)
    return seen, stream.get_final_completion()


@pytest.mark.parametrize("tools", [None, TOOLS])
def test_replay_through_the_openai_stream_helper(cached, openai_client, tools):
    extra: dict[str, Any] = {"tools": tools} if tools else {}
    with openai_client.chat.completions.stream(model="gpt-4o", messages=HI, **extra) as stream:
        first, first_final = _events(stream)
    with openai_client.chat.completions.stream(model="gpt-4o", messages=HI, **extra) as stream:
        replay, replay_final = _events(stream)
    assert chat_calls(cached) == 1  # the second came from the cache
    assert replay == first and first
    assert any(e[0] == ("arguments" if tools else "content") for e in first)
    a, b = first_final.choices[0], replay_final.choices[0]
    assert (a.finish_reason, a.message.content) == (b.finish_reason, b.message.content)
    assert [(t.id, t.function.name, t.function.arguments) for t in a.message.tool_calls or ()] == [
        (t.id, t.function.name, t.function.arguments) for t in b.message.tool_calls or ()
    ]


def test_replay_through_the_anthropic_stream_helper_with_tools(anthropic_upstream, gateway_server, tenant_key):
    import anthropic

    _, key = tenant_key
    enable_cache("claude-sonnet-4")
    client = anthropic.Anthropic(base_url=gateway_server.url, api_key=key, max_retries=0)
    tools: Any = [{"name": "get_weather", "description": "Weather", "input_schema": {"type": "object"}}]

    def run() -> tuple[list[Any], Any]:
        seen: list[Any] = []
        with client.messages.stream(model="claude-sonnet-4", max_tokens=50, messages=HI, tools=tools) as stream:
            for event in stream:
                if event.type == "content_block_delta":
                    delta = event.delta
                    seen.append(
                        (event.index, delta.type, getattr(delta, "text", None) or getattr(delta, "partial_json", None))
                    )
                elif event.type == "message_delta":
                    seen.append(("stop", event.delta.stop_reason))
            return seen, stream.get_final_message()

    first, first_final = run()
    replay, replay_final = run()
    assert sum(1 for r in anthropic_upstream.requests if r.path.endswith("/messages")) == 1
    assert replay == first and first
    assert [(b.type, getattr(b, "input", None) or getattr(b, "text", None)) for b in replay_final.content] == [
        (b.type, getattr(b, "input", None) or getattr(b, "text", None)) for b in first_final.content
    ]
    assert replay_final.stop_reason == first_final.stop_reason


def test_tenant_cache_settings_round_trip_through_the_config_file(transactional_db, tmp_path):
    import yaml
    from django.core.management import CommandError

    from tenants.models import Tenant

    config = tmp_path / "chittycan.yaml"
    config.write_text(
        "version: 1\ntenants:\n"
        "  - slug: shop\n    cache: {enabled: true, scope: key}\n"
        "  - slug: shop-eu\n    parent: shop\n    cache: {enabled: false}\n"
        "  - slug: plain\n"
    )
    call_command("apply", "-f", str(config), stdout=io.StringIO())
    rows = {t.slug: t for t in Tenant.objects.filter(slug__in=["shop", "shop-eu", "plain"])}
    assert (rows["shop"].cache_enabled, rows["shop"].cache_scope) == (True, "key")
    assert (rows["shop-eu"].cache_enabled, rows["shop-eu"].cache_scope) == (False, "tenant")
    assert (rows["plain"].cache_enabled, rows["plain"].cache_scope) == (None, "tenant")
    out = io.StringIO()
    call_command("export", stdout=out)
    exported = {t["slug"]: t for t in yaml.safe_load(out.getvalue())["tenants"]}
    assert exported["shop"]["cache"] == {"enabled": True, "scope": "key"}
    assert exported["shop-eu"]["cache"] == {"enabled": False}
    assert "cache" not in exported["plain"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ntenants:\n  - slug: shop\n    cache: {scope: everyone}\n")
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(CommandError, match="nothing was written"):
        call_command("apply", "-f", str(bad), stdout=out, stderr=err)
    assert "scope" in out.getvalue() + err.getvalue()


def test_admin_action_drops_a_models_cached_answers(cached, gateway_server, make_tenant, make_key, admin_client):
    from django.urls import reverse

    from gateway.models import LLMModel
    from tenants.models import AuditEvent

    key_a, key_b = make_key(make_tenant("adm-a")), make_key(make_tenant("adm-b"))
    for key in (key_a, key_b):
        assert post(gateway_server, key, {"model": "gpt-4o", "messages": HI}).headers[CACHE] == "MISS"
        assert post(gateway_server, key, {"model": "gpt-4o", "messages": HI}).headers[CACHE] == "HIT"
    model = LLMModel.objects.get(name="gpt-4o")
    response = admin_client.post(
        reverse("admin:gateway_llmmodel_changelist"),
        {"action": "drop_cached_answers", "_selected_action": [model.pk]},
        follow=True,
    )
    assert "2 cached answers dropped." in response.content.decode()
    assert AuditEvent.objects.filter(action="cache.invalidate", target="gpt-4o").exists()
    assert post(gateway_server, key_a, {"model": "gpt-4o", "messages": HI}).headers[CACHE] == "MISS"
    assert post(gateway_server, key_b, {"model": "gpt-4o", "messages": HI}).headers[CACHE] == "MISS"
