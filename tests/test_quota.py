"""Plan request quotas (e.g. Free: 100 requests a month), enforced like budgets: 402."""

from __future__ import annotations

from datetime import UTC, datetime

import openai
import pytest

from budgets.periods import period_key
from tests.conftest import wait_usage
from tests.fakes.openai_upstream import Reply
from tests.test_budgets import chat, client_for, counter_value


def test_monthly_request_quota_is_402_and_counts_the_subtree(upstream, gateway_server, make_tenant, make_key):
    from tenants.models import Plan

    free = Plan.objects.create(slug="free", name="Free", monthly_request_quota=3)
    org = make_tenant("quota-org", plan=free, time_zone="Asia/Tokyo")
    team = make_tenant("quota-team", parent=org)
    org_client = client_for(gateway_server, make_key(org))
    team_client = client_for(gateway_server, make_key(team))
    chat(org_client)
    chat(team_client)
    # A request the upstream refuses still reached it and counts; one we refuse before does not.
    upstream.push(
        "/v1/chat/completions",
        Reply(status=400, json={"error": {"message": "no", "type": "invalid_request_error", "code": None}}),
    )
    with pytest.raises(openai.BadRequestError):
        chat(team_client)
    with pytest.raises(openai.APIStatusError) as exc:
        chat(org_client)
    err = exc.value
    assert err.status_code == 402 and err.code == "insufficient_quota"
    assert err.response.headers["x-should-retry"] == "false"
    assert "monthly request quota of 3 for tenant quota-org" in err.message
    with pytest.raises(openai.APIStatusError):
        chat(team_client)
    assert len(upstream.requests) == 3
    wait_usage(3)
    name = f"q{org.pk}:{period_key('month', 'Asia/Tokyo', datetime.now(UTC))}"
    assert counter_value(org.pk, name) == 3
