"""Routing policies end to end (docs/routing.md): the openai SDK against the real gateway, fake
upstreams on loopback, PostgreSQL and Redis. Short and long prompts match different rules (header
and ledger row), a reject is a 403 in the envelope, a child tenant's policy overrides its
parent's, a fallback hop is charged at its own model's price, the admin shows a CEL error at the
field, ``can apply`` round-trips, and ``can route explain`` answers without sending anything."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from django.core.management import CommandError, call_command
from django.test import Client

from tests.conftest import add_model, wait_usage
from tests.fakes.openai_upstream import FakeOpenAI, Fault
from tests.fakes.server import ServerThread
from tests.test_admin import admin_client, superuser  # noqa: F401 - fixtures

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "routing-policy.yaml"
SHORT: Any = [{"role": "user", "content": "Say hello"}]
LONG: Any = [{"role": "user", "content": "word " * 700}]


@pytest.fixture(scope="module")
def second_upstream() -> Iterator[tuple[FakeOpenAI, ServerThread]]:
    app = FakeOpenAI()
    server = ServerThread(app, name="fake-second").start()
    yield app, server
    server.stop()


@pytest.fixture(autouse=True)
def _fresh_breakers() -> Iterator[None]:
    from gateway.routing import breaker

    breaker.reset_local()
    yield
    breaker.reset_local()


@pytest.fixture
def catalogue(
    transactional_db: Any,
    fake_openai: tuple[FakeOpenAI, ServerThread],
    second_upstream: tuple[FakeOpenAI, ServerThread],
) -> tuple[FakeOpenAI, FakeOpenAI]:
    """Models cheap, strong and default on the first fake; backup on the second."""
    from gateway.models import Provider

    first_app, first = fake_openai
    second_app, second = second_upstream
    first_app.set_fault(None)
    second_app.set_fault(None)
    second_app.reset()
    one = Provider(slug="one", kind="openai", base_url=f"{first.url}/v1", max_retries=0)
    one.api_key = "sk-one"
    one.save()
    two = Provider(slug="two", kind="openai", base_url=f"{second.url}/v1", max_retries=0)
    two.api_key = "sk-two"
    two.save()
    add_model("cheap", one, upstream="cheap-up", prices=("0.10", "0.10", "0.20"), aliases=["one/cheap"])
    add_model("strong", one, upstream="strong-up", prices=("3.00", "3.00", "15.00"))
    add_model("default-m", one, upstream="default-up", prices=("1.00", "1.00", "2.00"))
    add_model("backup", two, upstream="backup-up", prices=("7.00", "7.00", "9.00"))
    return first_app, second_app


def put_policy(name: str, rules: list[dict[str, Any]], tenant: Any = None, **extra: Any) -> Any:
    from gateway import policies

    policy, _ = policies.policy_put(name=name, rules=rules, tenant=tenant, **extra)
    return policy


ROADMAP = [
    {"name": "cheap_for_simple", "condition": "tokens < 100", "route": "cheap"},
    {"name": "smart_for_complex", "condition": "tokens > 500", "route": "strong"},
    {"name": "default", "route": "default-m"},
]


def client_for(server: ServerThread, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def test_short_and_long_prompts_match_different_rules(
    gateway_server: ServerThread, catalogue: Any, tenant_key: tuple[Any, str]
) -> None:
    tenant, key = tenant_key
    put_policy("roadmap", ROADMAP, tenant=tenant)
    client = client_for(gateway_server, key)
    short = client.chat.completions.with_raw_response.create(model="default-m", messages=SHORT)
    long = client.chat.completions.with_raw_response.create(model="default-m", messages=LONG)
    assert short.headers["x-chittycan-route"] == "rule=cheap_for_simple; model=cheap; outcome=primary"
    assert short.headers["x-chittycan-model"] == "cheap-up"
    assert long.headers["x-chittycan-route"] == "rule=smart_for_complex; model=strong; outcome=primary"
    assert long.headers["x-chittycan-model"] == "strong-up"
    rows = {r.request_id: r for r in wait_usage(2, tenant=tenant)}
    short_row = rows[short.headers["x-request-id"]]
    assert short_row.route["rule"] == "cheap_for_simple" and short_row.route["model"] == "cheap"
    assert short_row.route["candidates"][0]["deployment"] == "one/cheap-up"
    assert short_row.route["served"] == "one/cheap-up" and short_row.route["outcome"] == "primary"
    long_row = rows[long.headers["x-request-id"]]
    assert long_row.route["rule"] == "smart_for_complex" and long_row.served_model == "strong-up"
    # Charged at the routed model's price (strong: $3 / $15 per M), not the requested one's.
    usage = long.parse().usage
    assert usage is not None
    assert long_row.cost_micro == round(usage.prompt_tokens * 3 + usage.completion_tokens * 15)


def test_no_policy_keeps_the_plain_header(
    gateway_server: ServerThread, catalogue: Any, tenant_key: tuple[Any, str]
) -> None:
    response = client_for(gateway_server, tenant_key[1]).chat.completions.with_raw_response.create(
        model="default-m", messages=SHORT
    )
    assert response.headers["x-chittycan-route"] == "primary"
    row = wait_usage(1, request_id=response.headers["x-request-id"])[0]
    assert row.route == {}


def test_reject_is_a_403_in_the_envelope(
    gateway_server: ServerThread, catalogue: Any, tenant_key: tuple[Any, str]
) -> None:
    tenant, key = tenant_key
    put_policy(
        "guard",
        [
            {"name": "no-batch", "condition": '"batch" in tags', "reject": "Batch traffic goes to the batch API."},
            {"name": "default", "route": "default-m"},
        ],
        tenant=tenant,
    )
    client = client_for(gateway_server, key)
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client.chat.completions.create(
            model="default-m", messages=SHORT, extra_headers={"X-ChittyCan-Tags": "batch, x"}
        )
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["code"] == "policy_rejected" and error["message"] == "Batch traffic goes to the batch API."
    assert caught.value.response.headers["x-chittycan-route"] == "rule=no-batch; rejected"
    ok = client.chat.completions.with_raw_response.create(model="default-m", messages=SHORT)
    assert ok.headers["x-chittycan-route"].startswith("rule=default;")


def test_child_tenant_overrides_parent(
    gateway_server: ServerThread,
    catalogue: Any,
    make_tenant: Callable[..., Any],
    make_key: Callable[..., str],
) -> None:
    parent = make_tenant("org")
    child = make_tenant("org-team", parent=parent)
    sibling = make_tenant("org-other", parent=parent)
    put_policy("org-policy", [{"name": "org-default", "route": "strong"}], tenant=parent)
    put_policy("team-policy", [{"name": "team-short", "condition": "tokens < 100", "route": "cheap"}], tenant=child)
    put_policy("global", [{"name": "global-default", "route": "default-m"}])
    child_client = client_for(gateway_server, make_key(child, name="team"))
    sibling_client = client_for(gateway_server, make_key(sibling, name="other"))
    route = "x-chittycan-route"
    create = child_client.chat.completions.with_raw_response.create
    assert create(model="default-m", messages=SHORT).headers[route].startswith("rule=team-short; model=cheap")
    assert create(model="default-m", messages=LONG).headers[route].startswith("rule=org-default; model=strong")
    other = sibling_client.chat.completions.with_raw_response.create(model="default-m", messages=SHORT)
    assert other.headers[route].startswith("rule=org-default; model=strong")
    outsider = make_tenant("elsewhere")
    lone = client_for(gateway_server, make_key(outsider, name="lone")).chat.completions.with_raw_response
    assert lone.create(model="cheap", messages=SHORT).headers[route].startswith("rule=global-default; model=default-m")


def test_fallback_chain_hop_served_and_charged_at_its_price(
    gateway_server: ServerThread, catalogue: tuple[FakeOpenAI, FakeOpenAI], tenant_key: tuple[Any, str]
) -> None:
    first, second = catalogue
    tenant, key = tenant_key
    put_policy(
        "chain",
        [{"name": "to-cheap", "route": "cheap", "timeouts": {"connect": 1, "total": 20}, "retries": 0}],
        tenant=tenant,
        fallback_chain=["backup (timeout: 5s)"],
    )
    first.set_fault(Fault("down"))
    try:
        response = client_for(gateway_server, key).chat.completions.with_raw_response.create(
            model="default-m", messages=SHORT
        )
    finally:
        first.set_fault(None)
    assert response.headers["x-chittycan-route"] == "rule=to-cheap; model=cheap; outcome=fallback:1"
    assert response.headers["x-chittycan-model"] == "backup-up"
    row = wait_usage(1, request_id=response.headers["x-request-id"])[0]
    assert row.route["served"] == "two/backup-up"
    assert [c["role"] for c in row.route["candidates"]] == ["route", "fallback"]
    assert row.route["candidates"][1]["timeouts"] == {"total": 5.0}
    usage = response.parse().usage
    assert usage is not None
    assert row.cost_micro == round(usage.prompt_tokens * 7 + usage.completion_tokens * 9)  # backup's price


def test_hop_timeouts_and_retries_reach_the_route(
    gateway_server: ServerThread, catalogue: Any, tenant_key: tuple[Any, str]
) -> None:
    """The policy's limits are set on the routed deployments (dispatch honours them)."""
    from asgiref.sync import async_to_sync

    from gateway.routing.table import HopTimeouts

    tenant, key = tenant_key
    put_policy(
        "limits",
        [{"name": "t", "route": "cheap", "timeouts": {"connect": "250ms", "first_byte": 2, "total": 9}, "retries": 3}],
        tenant=tenant,
        fallback_chain=[{"route": "backup", "timeouts": {"total": 4}}],
    )
    request = {"model": "default-m", "messages": SHORT}
    result = explain_json(key, request)
    assert result["order"] == ["one/cheap-up", "two/backup-up"]
    from gateway.management.commands.route import explain

    raw = json.dumps(request).encode()
    assert async_to_sync(explain)(key, raw, "chat", "")["model"] == "cheap"
    from gateway.pipeline import route
    from gateway.routing.table import route_table

    async def routed() -> Any:
        from gateway import auth
        from gateway.context import RequestContext

        ctx = RequestContext(request_id="t", endpoint="chat", requested_model="default-m", body=request)
        ctx.key = await auth.authenticate(key)
        await route_table()
        return await route.resolve(ctx, ("chat",), {})

    resolved = async_to_sync(routed)()
    primary, hop = sorted(resolved.deployments, key=lambda d: d.priority)
    assert primary.timeouts == HopTimeouts(connect=0.25, first_byte=2.0, total=9.0)
    assert primary.provider.max_retries == 3
    assert hop.timeouts == HopTimeouts(total=4.0) and hop.provider.max_retries == 0


def explain_json(key: str, request: dict[str, Any], *args: str) -> dict[str, Any]:
    path = Path("/tmp") / f"chittycan-explain-{abs(hash(json.dumps(request)))}.json"
    path.write_text(json.dumps(request))
    out = io.StringIO()
    call_command("route", "explain", "--key", key, "-f", str(path), "--json", *args, stdout=out)
    return dict(json.loads(out.getvalue()))


def test_route_explain_sends_nothing(
    catalogue: tuple[FakeOpenAI, FakeOpenAI], tenant_key: tuple[Any, str], tmp_path: Path
) -> None:
    first, _ = catalogue
    tenant, key = tenant_key
    put_policy("roadmap", ROADMAP, tenant=tenant, fallback_chain=["backup (timeout: 2s)"])
    put_policy("guard", [{"name": "no-urgent", "condition": '"urgent" in tags', "reject": "no"}])
    before = len(first.requests)
    short = explain_json(key, {"model": "default-m", "messages": SHORT})
    assert short["route"]["rule"] == "cheap_for_simple" and short["model"] == "cheap"
    assert short["order"] == ["one/cheap-up", "two/backup-up"]
    assert short["header"] == "rule=cheap_for_simple; model=cheap"
    long = explain_json(key, {"model": "default-m", "messages": LONG})
    assert long["route"]["rule"] == "smart_for_complex" and long["estimated_prompt_tokens"] > 500
    assert len(first.requests) == before  # nothing reached an upstream
    # The text form names the rule and each candidate.
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"model": "default-m", "messages": SHORT}))
    out = io.StringIO()
    call_command("route", "explain", "--key", key, "-f", str(request), stdout=out)
    text = out.getvalue()
    assert "rule cheap_for_simple" in text and "one/cheap-up" in text and "two/backup-up" in text


def test_apply_export_apply_round_trip(transactional_db: Any, make_tenant: Callable[..., Any], tmp_path: Path) -> None:
    from gateway.models import RoutingPolicy
    from tenants.models import AuditEvent

    make_tenant("demo")
    out = io.StringIO()
    call_command("apply", "-f", str(EXAMPLE), stdout=out, stderr=io.StringIO())
    assert "create routing policy roadmap" in out.getvalue()
    policy = RoutingPolicy.objects.get(name="roadmap")
    assert policy.tenant is not None and policy.tenant.slug == "demo"
    assert [r.name for r in policy.rules.all()] == ["cheap_for_simple", "smart_for_complex", "default"]
    assert AuditEvent.objects.filter(action="routing_policy.create", target="roadmap").exists()
    exported = io.StringIO()
    call_command("export", stdout=exported)
    document = yaml.safe_load(exported.getvalue())
    assert document["routing_policies"][0]["rules"][0] == {
        "name": "cheap_for_simple",
        "condition": "tokens < 100",
        "route": "groq/llama-3-8b",
    }
    path = tmp_path / "exported.yaml"
    path.write_text(exported.getvalue())
    again = io.StringIO()
    call_command("apply", "-f", str(path), stdout=again, stderr=io.StringIO())
    assert "no changes" in again.getvalue()
    # A change is one audited update; a broken condition is refused with the rule and field named.
    document["routing_policies"][0]["rules"][0]["condition"] = "tokens < 50"
    path.write_text(yaml.safe_dump(document))
    changed = io.StringIO()
    call_command("apply", "-f", str(path), stdout=changed, stderr=io.StringIO())
    assert "update routing policy roadmap" in changed.getvalue()
    document["routing_policies"][0]["rules"][0]["condition"] = "tokens <"
    path.write_text(yaml.safe_dump(document))
    err = io.StringIO()
    with pytest.raises(CommandError, match="nothing was written"):
        call_command("apply", "-f", str(path), stdout=io.StringIO(), stderr=err)
    assert "routing_policies[0]" in err.getvalue()
    assert "rule 'cheap_for_simple', condition: CEL syntax error" in err.getvalue()


def test_admin_shows_the_cel_error_at_the_field(admin_client: Client) -> None:  # noqa: F811
    from gateway.models import RoutingPolicy

    form = {
        "name": "from-admin",
        "description": "",
        "fallback_chain": "[]",
        "is_active": "on",
        "rules-TOTAL_FORMS": "1",
        "rules-INITIAL_FORMS": "0",
        "rules-MIN_NUM_FORMS": "0",
        "rules-MAX_NUM_FORMS": "1000",
        "rules-0-position": "0",
        "rules-0-name": "short",
        "rules-0-condition": "tokens <",
        "rules-0-route": '["cheap"]',
        "rules-0-split": "[]",
        "rules-0-reject": "",
        "rules-0-fallback": "null",
        "rules-0-timeouts": "{}",
        "rules-0-retries": "",
        "rules-0-tags": "[]",
        "rules-0-include": "",
    }
    response = admin_client.post("/admin/gateway/routingpolicy/add/", form)
    assert response.status_code == 200
    formset = response.context["inline_admin_formsets"][0].formset
    assert "CEL syntax error" in " ".join(formset.forms[0].errors["condition"])
    assert not RoutingPolicy.objects.filter(name="from-admin").exists()
    form["rules-0-condition"] = "tokens < 100"
    response = admin_client.post("/admin/gateway/routingpolicy/add/", form)
    assert response.status_code == 302, response.content[:3000]
    policy = RoutingPolicy.objects.get(name="from-admin")
    assert [(r.name, r.condition, r.route) for r in policy.rules.all()] == [("short", "tokens < 100", ["cheap"])]
    form["rules-0-include"] = "no-such-set"
    form["rules-0-route"] = "[]"
    form["name"] = "from-admin-2"
    response = admin_client.post("/admin/gateway/routingpolicy/add/", form)
    assert response.status_code == 200
    assert "unknown rule set" in str(response.context["inline_admin_formsets"][0].formset.non_form_errors())


def test_route_header_on_a_stream(gateway_server: ServerThread, catalogue: Any, tenant_key: tuple[Any, str]) -> None:
    tenant, key = tenant_key
    put_policy("roadmap", ROADMAP, tenant=tenant)
    with httpx.stream(
        "POST",
        f"{gateway_server.url}/v1/chat/completions",
        json={"model": "default-m", "messages": SHORT, "stream": True},
        headers={"authorization": f"Bearer {key}"},
        timeout=10,
    ) as response:
        body = b"".join(response.iter_bytes())
    assert response.headers["x-chittycan-route"] == "rule=cheap_for_simple; model=cheap; outcome=primary"
    assert b"data: [DONE]" in body


def test_reject_in_the_anthropic_envelope_and_routing_on_messages(
    gateway_server: ServerThread, catalogue: Any, tenant_key: tuple[Any, str]
) -> None:
    import anthropic

    tenant, key = tenant_key
    put_policy(
        "messages",
        [
            {"name": "no-tools", "condition": "has_tools", "reject": "Tools are not allowed here."},
            {"name": "short", "condition": "tokens < 100 && endpoint == 'messages'", "route": "cheap"},
        ],
        tenant=tenant,
    )
    client = anthropic.Anthropic(base_url=gateway_server.url, api_key=key, max_retries=0)
    tool: Any = {"name": "f", "description": "d", "input_schema": {"type": "object", "properties": {}}}
    with pytest.raises(anthropic.PermissionDeniedError) as caught:
        client.messages.create(model="default-m", max_tokens=50, messages=SHORT, tools=[tool])
    body = caught.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"] == {"type": "permission_error", "message": "Tools are not allowed here."}
    ok = client.messages.with_raw_response.create(model="default-m", max_tokens=50, messages=SHORT)
    assert ok.headers["x-chittycan-route"] == "rule=short; model=cheap; outcome=primary"


def test_model_strategy_lowest_latency_orders_deployments(
    gateway_server: ServerThread, catalogue: Any, tenant_key: tuple[Any, str]
) -> None:
    from gateway import catalog
    from gateway.models import Deployment, LLMModel, Provider
    from gateway.routing import latency

    model = LLMModel.objects.get(name="default-m")
    backup = Deployment.objects.create(
        model=model, provider=Provider.objects.get(slug="two"), upstream_model="backup-up", priority=1
    )
    own = Deployment.objects.get(model=model, provider__slug="one")
    catalog.model_update(model, strategy="lowest_latency")
    client = client_for(gateway_server, tenant_key[1])
    latency.reset()
    try:
        latency.observe(f"d{own.pk}", 900)
        latency.observe(f"d{backup.pk}", 40)
        first = client.chat.completions.with_raw_response.create(model="default-m", messages=SHORT)
        assert first.headers["x-chittycan-provider"] == "two"  # faster, despite its priority
        for _ in range(20):
            latency.observe(f"d{backup.pk}", 5000)  # it slowed down: the decaying average follows
        second = client.chat.completions.with_raw_response.create(model="default-m", messages=SHORT)
        assert second.headers["x-chittycan-provider"] == "one"
    finally:
        latency.reset()
    catalog.model_update(model, strategy="priority")
