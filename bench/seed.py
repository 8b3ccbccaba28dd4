"""Benchmark data in the benchmark's own database: a provider pointing at the fake upstream, a priced
model, a tenant with a large budget and RPM/TPM limits (so the limit and reservation stages run) and
a fresh key.

    DATABASE_URL=postgres://.../chittycan_bench python -m bench.seed setup --upstream http://127.0.0.1:9100/v1
    DATABASE_URL=... python -m bench.seed count      # ledger rows of the bench tenant
"""

from __future__ import annotations

import argparse
import os
from datetime import UTC, datetime
from decimal import Decimal

import orjson

TENANT = "bench"
PROVIDER = "bench-upstream"
MODEL = "bench-model"
LARGE_BUDGET_MICRO = 10**15  # a billion USD: never refuses, but every request reserves and settles
LARGE_RPM = 1_000_000_000
LARGE_TPM = 2_000_000_000


def _django() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chittycan.settings")
    import django

    django.setup()


def setup(upstream: str) -> dict[str, object]:
    from budgets.models import Budget
    from gateway.models import Deployment, LLMModel, Price, Provider
    from tenants import services
    from tenants.models import ApiKey, Tenant

    provider = Provider.objects.filter(slug=PROVIDER).first() or Provider(slug=PROVIDER, kind="openai")
    provider.base_url = upstream
    provider.api_key = "sk-bench-upstream"
    provider.max_retries = 0
    provider.is_active = True
    provider.save()
    model, _ = LLMModel.objects.update_or_create(
        name=MODEL, defaults={"kind": "chat", "max_output_tokens": 4096, "is_active": True}
    )
    Deployment.objects.update_or_create(
        model=model, provider=provider, upstream_model=MODEL, defaults={"priority": 0, "is_active": True}
    )
    Price.objects.update_or_create(
        model=model,
        effective_from=datetime(2020, 1, 1, tzinfo=UTC),
        defaults={
            "input_per_mtok": Decimal("0.15"),
            "cached_input_per_mtok": Decimal("0.075"),
            "output_per_mtok": Decimal("0.60"),
        },
    )
    tenant = Tenant.objects.filter(slug=TENANT).first() or services.tenant_create(
        slug=TENANT, name="Benchmark", actor_label="bench"
    )
    Tenant.objects.filter(pk=tenant.pk).update(rpm_limit=LARGE_RPM, tpm_limit=LARGE_TPM)
    Budget.objects.update_or_create(
        tenant=tenant, period=Budget.Period.MONTH, hard=True, defaults={"limit_micro": LARGE_BUDGET_MICRO}
    )
    # One key per run: revoke the previous runs' keys so the table stays small.
    ApiKey.objects.filter(tenant=tenant, revoked_at__isnull=True).update(revoked_at=datetime.now(tz=UTC))
    api_key, plaintext = services.key_issue(
        tenant=tenant, name="bench", rpm_limit=LARGE_RPM, tpm_limit=LARGE_TPM, actor_label="bench"
    )
    Budget.objects.update_or_create(
        api_key=api_key, period=Budget.Period.DAY, hard=True, defaults={"limit_micro": LARGE_BUDGET_MICRO}
    )
    return {"key": plaintext, "tenant_id": tenant.pk, "model": MODEL, "rows": count()}


def count() -> int:
    from ledger.models import UsageRecord
    from tenants.models import Tenant

    tenant = Tenant.objects.filter(slug=TENANT).first()
    return UsageRecord.objects.filter(tenant_id=tenant.pk).count() if tenant else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_setup = sub.add_parser("setup")
    p_setup.add_argument("--upstream", required=True, help="the fake upstream's base URL, ending in /v1")
    sub.add_parser("count")
    args = parser.parse_args()
    _django()
    out: dict[str, object] = setup(args.upstream) if args.command == "setup" else {"rows": count()}
    print(orjson.dumps(out).decode())


if __name__ == "__main__":
    main()
