"""``can analytics costs --tenant SLUG [--month YYYY-MM]``: a tenant's month, day by day, against
its monthly budget, with a projection. ``can analytics rollup`` / ``prune`` run the rollup and
retention jobs by hand (Celery beat runs them on a schedule)."""

from __future__ import annotations

from typing import Any
from zoneinfo import ZoneInfo

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from ledger import analytics, retention, rollups
from ledger.management.commands._report import parse_month, table, tenant_by_slug, usd


class Command(BaseCommand):
    help = "Cost analytics from the usage ledger."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="{costs,rollup,prune}")
        costs = sub.add_parser("costs", help="per-day costs of a tenant (and its subtree) for a month")
        costs.add_argument("--tenant", required=True, help="tenant slug")
        costs.add_argument("--month", help="YYYY-MM in the tenant's time zone (default: the current month)")
        sub.add_parser("rollup", help="bring hourly and daily rollups up to date")
        prune = sub.add_parser("prune", help="delete raw usage rows past retention (rollups are kept)")
        prune.add_argument("--days", type=int, help="retention in days (default CHITTYCAN_USAGE_RETENTION_DAYS)")

    def handle(self, *args: Any, **options: Any) -> None:
        action = options["action"]
        if action == "costs":
            self.costs(options["tenant"], options.get("month"))
        elif action == "rollup":
            result = rollups.rollup_usage()
            self.stdout.write(f"rolled up {len(result.hours)} hours and {result.days} tenant-days")
        elif action == "prune":
            days = options.get("days")
            if days is not None and days < 1:
                raise CommandError("--days must be at least 1")
            pruned = retention.prune_usage(retention_days=days)
            self.stdout.write(
                f"pruned {pruned.rows} rows in {pruned.hours} hours before {pruned.cutoff:%Y-%m-%d %H:%M} UTC"
            )
            for name, count in sorted(pruned.others.items()):
                self.stdout.write(f"pruned {count} expired {name.replace('_', ' ')}")
            if pruned.kept_rows:
                self.stdout.write(
                    f"kept back {pruned.kept_rows} rows older than that (never pruned, whatever --days says):"
                )
                for reason, count in sorted(pruned.kept.items()):
                    self.stdout.write(f"  {count} rows {reason}")
                others = pruned.kept_rows - sum(pruned.kept.values())
                if others:
                    self.stdout.write(
                        f"  {others} other rows of the same {pruned.kept_hours} hour(s), "
                        "pruned together with them later"
                    )

    def costs(self, slug: str, month: str | None) -> None:
        tenant = tenant_by_slug(slug)
        now = timezone.now()
        if month:
            year, mon = parse_month(month)
        else:
            local = now.astimezone(ZoneInfo(tenant.time_zone))
            year, mon = local.year, local.month
        report = analytics.month_report(tenant, year, mon, now=now)
        per_day = report.budget_per_day_micro
        self.stdout.write(f"Costs for {tenant.slug} and its subtree, {year}-{mon:02d} ({tenant.time_zone}), USD")
        rows = [(d.isoformat(), calls, usd(cost), usd(per_day)) for d, calls, cost in report.days]
        calls = sum(c for _, c, _ in report.days)
        rows.append(("total", calls, usd(report.total_micro), usd(report.budget_micro)))
        self.stdout.write(table(("date", "calls", "cost", "budget/day"), rows, (False, True, True, True)))
        self.stdout.write("")
        self.stdout.write(f"Month total:  {usd(report.total_micro)}")
        if report.budget_micro is None:
            self.stdout.write("Budget:       none (no monthly budget on this tenant)")
        else:
            self.stdout.write(f"Budget:       {usd(report.budget_micro)} per month")
            self.stdout.write(f"Used:         {usd(report.total_micro)} ({report.used_percent} %)")
            self.stdout.write(f"Remaining:    {usd(report.remaining_micro)}")
        self.stdout.write(
            f"Projected:    {usd(report.projected_micro)} by month end "
            f"({report.elapsed_days} of {report.days_in_month} days elapsed)"
        )
        if report.verdict is not None:
            self.stdout.write(f"Verdict:      {report.verdict}")
        start, end = analytics.month_bounds(year, mon, tenant.time_zone)
        saved = analytics.cache_savings(analytics.subtree_ids(tenant.pk), start, end)
        self.stdout.write(
            f"Cache:        {saved.cache_hits} hits of {saved.calls} calls ({saved.hit_rate:.2f} %),"
            f" {saved.coalesced} of them coalesced; saved {usd(saved.saved_micro)}"
        )
