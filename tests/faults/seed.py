"""Seed the fault suite's disposable database (run as a subprocess with its DATABASE_URL/REDIS_URL):
a provider pointing at the fake upstream (no retries: one client request is at most one upstream
call), ``gpt-4o`` at $2.50/$10.00 per million tokens, and per scenario a ``main`` tenant (a large
hard budget: every request reserves and settles) and a ``tight`` tenant (a hard budget the load
exhausts, to measure overrun), each with one key.

    python -m tests.faults.seed '{"upstream": "http://127.0.0.1:PORT/v1", "tenants": {"a-main": 1000000000}}'

With ``"resilience": {"primary": URL, "fallback": URL, "blackhole": URL}`` it also seeds the
resilience scenarios' models (tests/faults/test_resilience_faults.py): ``resilient`` (a primary
deployment, then a fallback) and ``unreachable`` (a host whose connect never completes, then the
fallback), the primaries with short breaker and timeout settings (``RESILIENCE_PROVIDER``).

prints ``{"a-main": {"tenant_id": 1, "key": "sk-..."}, ...}``.
"""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson

#: The primaries' settings in the resilience scenarios: short, so the suite stays short.
RESILIENCE_PROVIDER: dict[str, Any] = {
    "max_retries": 1,
    "connect_timeout": 0.5,
    "first_byte_timeout": 1.0,
    "breaker_failures": 3,
    "breaker_cooldown": 2.0,
}


def seed_resilience(urls: dict[str, str]) -> None:
    from gateway.models import Deployment, LLMModel, Price, Provider

    providers = {}
    for slug, url, fields in (
        ("primary-up", urls["primary"], RESILIENCE_PROVIDER),
        ("blackhole-up", urls["blackhole"], RESILIENCE_PROVIDER),
        ("fallback-up", urls["fallback"], {"max_retries": 1}),
    ):
        provider = Provider(slug=slug, kind="openai", base_url=f"{url}/v1", **fields)
        provider.api_key = "sk-fault-upstream"
        provider.save()
        providers[slug] = provider
    for name, first in (("resilient", "primary-up"), ("unreachable", "blackhole-up")):
        model = LLMModel.objects.create(name=name, kind="chat", max_output_tokens=4096)
        Deployment.objects.create(model=model, provider=providers[first], upstream_model="gpt-4o-2024-08-06")
        Deployment.objects.create(
            model=model, provider=providers["fallback-up"], upstream_model="gpt-4o-2024-08-06", priority=1
        )
        Price.objects.create(
            model=model,
            effective_from=datetime(2020, 1, 1, tzinfo=UTC),
            input_per_mtok=Decimal("2.50"),
            output_per_mtok=Decimal("10.00"),
        )


def seed(upstream: str, tenants: dict[str, int]) -> dict[str, Any]:
    from budgets import services as budget_services
    from gateway.models import Deployment, LLMModel, Price, Provider
    from tenants import services

    provider = Provider(slug="fault-upstream", kind="openai", base_url=upstream, max_retries=0)
    provider.api_key = "sk-fault-upstream"
    provider.save()
    # The migrations' catalogue has gpt-4o on an inactive OpenAI provider: only the fake serves it.
    model, _ = LLMModel.objects.update_or_create(
        name="gpt-4o", defaults={"kind": "chat", "max_output_tokens": 4096, "is_active": True}
    )
    Deployment.objects.filter(model=model).update(is_active=False)
    Deployment.objects.create(model=model, provider=provider, upstream_model="gpt-4o-2024-08-06", priority=0)
    model.prices.all().delete()
    Price.objects.create(
        model=model,
        effective_from=datetime(2020, 1, 1, tzinfo=UTC),
        input_per_mtok=Decimal("2.50"),
        cached_input_per_mtok=Decimal("1.25"),
        output_per_mtok=Decimal("10.00"),
    )
    out: dict[str, Any] = {}
    for slug, limit_micro in tenants.items():
        tenant = services.tenant_create(slug=slug, actor_label="faults")
        budget_services.budget_set(tenant=tenant, period="month", limit_micro=limit_micro, hard=True)
        _, key = services.key_issue(tenant=tenant, name="faults", actor_label="faults")
        out[slug] = {"tenant_id": tenant.pk, "key": key, "limit_micro": limit_micro}
    return out


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chittycan.settings")
    import django

    django.setup()
    spec = orjson.loads(sys.argv[1])
    if spec.get("resilience"):
        seed_resilience(spec["resilience"])
    print(orjson.dumps(seed(spec["upstream"], spec["tenants"])).decode())


if __name__ == "__main__":
    main()
