"""The dashboard's request page on rows the real gateway wrote: a routing policy's rule sends the
request to a model whose only upstream is down, the fallback chain's hop serves it, and the page
shows the rule, the candidates, the outcome and both upstream attempts next to the stage timings,
to a member of the tenant and to nobody else (404)."""

from __future__ import annotations

from typing import Any

import openai
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import reverse

from control.models import TenantMembership
from tests.conftest import wait_usage
from tests.fakes.openai_upstream import FakeOpenAI, Fault
from tests.fakes.server import ServerThread
from tests.test_routing_policies import SHORT, _fresh_breakers, catalogue, put_policy, second_upstream  # noqa: F401

RULES = [{"name": "to-cheap", "route": "cheap", "retries": 0}]


def test_request_page_shows_the_real_route_decision_and_attempts(
    gateway_server: ServerThread,
    catalogue: tuple[FakeOpenAI, FakeOpenAI],  # noqa: F811
    tenant_key: tuple[Any, str],
    make_tenant: Any,
) -> None:
    first, _ = catalogue
    tenant, key = tenant_key
    put_policy("chain", RULES, tenant=tenant, fallback_chain=["backup"])
    first.set_fault(Fault("down"))
    try:
        client = openai.OpenAI(base_url=f"{gateway_server.url}/v1", api_key=key, max_retries=0)
        response = client.chat.completions.with_raw_response.create(model="default-m", messages=SHORT)
    finally:
        first.set_fault(None)
    request_id = response.headers["x-request-id"]
    [row] = wait_usage(1, request_id=request_id)
    assert row.route["outcome"] == "fallback:1" and len(row.attempts) == 2  # what the page must show

    users = get_user_model().objects
    member, stranger = users.create_user("member-m"), users.create_user("stranger-s")
    TenantMembership.objects.create(user=member, tenant=tenant, role="viewer")
    other = make_tenant("elsewhere")
    TenantMembership.objects.create(user=stranger, tenant=other, role="owner")
    url = reverse("dashboard:request", args=[tenant.slug, request_id])

    viewer = Client()
    viewer.force_login(member)
    page = viewer.get(url)
    assert page.status_code == 200
    text = page.content.decode()
    assert "chain" in text and "to-cheap" in text  # policy and rule
    assert "one/cheap-up" in text and "two/backup-up" in text  # the rule's target, then the chain's hop
    assert "ok: served by two/backup-up (fallback:1)" in text
    assert 'id="attempts"' in text and 'id="timings"' in text
    assert text.count('class="attempt-error"') == 1 and text.count('class="attempt-ok"') == 1

    outsider = Client()
    outsider.force_login(stranger)
    assert outsider.get(url).status_code == 404
    assert outsider.get(reverse("dashboard:request", args=[other.slug, request_id])).status_code == 404
