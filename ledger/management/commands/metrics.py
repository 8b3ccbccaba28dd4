"""``can metrics show [--tenant SLUG] [--since 24h]``: requests, cost, latency percentiles, models,
cache hit rate and savings, from the usage ledger."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.utils import timezone

from ledger import analytics
from ledger.management.commands._report import parse_since, table, tenant_by_slug, usd


class Command(BaseCommand):
    help = "Gateway metrics from the usage ledger."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="{show}")
        show = sub.add_parser("show", help="print the metrics of a window")
        show.add_argument("--tenant", help="tenant slug (its subtree); default: every tenant")
        show.add_argument("--since", default="24h", help="24h, 7d, 2w, a date or an ISO date-time (default 24h)")

    def handle(self, *args: Any, **options: Any) -> None:
        since = parse_since(options["since"])
        tenant_ids = None
        scope = "all tenants"
        if options.get("tenant"):
            tenant = tenant_by_slug(options["tenant"])
            tenant_ids = analytics.subtree_ids(tenant.pk)
            scope = f"{tenant.slug} and its subtree"
        m = analytics.metrics(tenant_ids=tenant_ids, since=since)
        per = analytics.Metrics.per_request
        out = self.stdout.write
        out(f"Metrics for {scope} since {since:%Y-%m-%d %H:%M} UTC (until {timezone.now():%Y-%m-%d %H:%M})")
        out(f"Requests:              {m.requests} ({m.errors} errors)")
        out(f"Cost:                  {usd(m.cost_micro)} USD")
        out(f"Cost per request:      {usd(per(m.cost_micro, m.requests))} USD")
        out(f"  cached:              {usd(per(m.cached_cost_micro, m.cached_requests))} USD ({m.cached_requests})")
        out(
            f"  uncached:            {usd(per(m.uncached_cost_micro, m.uncached_requests))} USD ({m.uncached_requests})"
        )

        def ms(v: int | None) -> str:
            return "-" if v is None else f"{v} ms"

        out(f"Latency p50/p95/p99:   {ms(m.latency_p50_ms)} / {ms(m.latency_p95_ms)} / {ms(m.latency_p99_ms)}")
        out(f"Cache hit rate:        {m.cache_hit_rate} %")
        out(f"Cache savings:         {usd(m.savings_micro)} USD")
        if m.models:
            out("")
            rows = [
                (name, n, f"{(100 * n / m.requests):.1f} %" if m.requests else "-", usd(cost))
                for name, n, cost in m.models
            ]
            out(table(("model", "requests", "share", "cost"), rows, (False, True, True, True)))
