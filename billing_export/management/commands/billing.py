"""``can billing export|push|runs|csv|status``: the Stripe export from a terminal.

can billing export --period 2026-11 --out costs.csv [--granularity day|hour|request] [--event NAME]
can billing push --period 2026-11 [--export]
can billing runs [--period 2026-11]
can billing csv --run 12 --out costs.csv
can billing status --period 2026-11
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from billing_export import selectors, services
from billing_export.models import ExportLine, ExportRun, Granularity
from billing_export.stripe_api import StripeNotConfigured


def _usd(micro: int) -> str:
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), 1_000_000)
    return f"{sign}${whole:,}.{frac:06d}"


class Command(BaseCommand):
    help = "Stripe usage export: CSV for the Billing Meter Event import, or push the events by API."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, parser_class=argparse.ArgumentParser)

        p = sub.add_parser("export", help="Bill not-yet-exported ledger rows of a period and write the CSV")
        p.add_argument("--period", required=True, help="YYYY-MM or YYYY-MM-DD (UTC)")
        p.add_argument("--out", required=True, help="CSV path; split into <stem>-001.csv ... above 5 MB")
        p.add_argument("--granularity", choices=Granularity.values, help="default CHITTYCAN_STRIPE_AGGREGATION")
        p.add_argument("--event", help="meter event name; default CHITTYCAN_STRIPE_METER_EVENT")
        p.add_argument("--push", action="store_true", help="also push the new lines to Stripe")

        p = sub.add_parser("push", help="Send a period's not-yet-accepted lines to Stripe as meter events")
        p.add_argument("--period", help="YYYY-MM or YYYY-MM-DD (lines whose bucket falls in it)")
        p.add_argument("--run", type=int, help="only this run's lines")
        p.add_argument("--export", action="store_true", help="export new ledger rows of the period first")

        p = sub.add_parser("runs", help="List export runs")
        p.add_argument("--period")
        p.add_argument("--limit", type=int, default=50)

        p = sub.add_parser("csv", help="Write an earlier run's CSV again (same lines, same identifiers)")
        p.add_argument("--run", type=int, required=True)
        p.add_argument("--out", required=True)

        p = sub.add_parser("status", help="Reconcile a period: billable ledger vs exported")
        p.add_argument("--period", required=True)

    def handle(self, *args: Any, **options: Any) -> None:
        action = options["action"]
        # The services log each run as a JSON line for the server's log pipeline; in a terminal that
        # line would land in the middle of the human report, which says the same. Warnings still
        # show (on stderr); -v 2 shows the info lines too.
        app_logger = logging.getLogger("billing_export")
        previous = app_logger.level
        if options.get("verbosity", 1) < 2:
            app_logger.setLevel(max(logging.WARNING, previous))
        try:
            getattr(self, f"_{action}")(options)
        except (services.ExportError, StripeNotConfigured) as exc:
            raise CommandError(str(exc)) from exc
        finally:
            app_logger.setLevel(previous)

    # --- actions -------------------------------------------------------------------------

    def _export(self, options: dict[str, Any]) -> None:
        run = services.export_run_create(
            period=options["period"],
            granularity=options.get("granularity"),
            event_name=options.get("event"),
            actor_label="cli",
        )
        self._report_run(run)
        paths = services.export_write_files(selectors.run_lines(run), Path(options["out"]))
        for path in paths:
            self.stdout.write(f"wrote {path}")
        if options.get("push"):
            self._report_push(services.export_run_push(lines=run.lines.order_by("id")))

    def _push(self, options: dict[str, Any]) -> None:
        if options.get("run"):
            run = self._get_run(options["run"])
            lines = run.lines.order_by("id")
        elif options.get("period"):
            if options.get("export"):
                self._report_run(services.export_run_create(period=options["period"], actor_label="cli"))
            p = services.parse_period(options["period"])
            lines = ExportLine.objects.filter(bucket_start__gte=p.start, bucket_start__lt=p.end).order_by("id")
        else:
            raise CommandError("push needs --period or --run")
        self._report_push(services.export_run_push(lines=lines))

    def _runs(self, options: dict[str, Any]) -> None:
        rows = selectors.run_list(period=options.get("period"), limit=options["limit"])
        self.stdout.write(f"{'run':>5}  {'period':<10} {'gran':<7} {'status':<7} {'lines':>6} {'total':>18}  created")
        for run in rows:
            self.stdout.write(
                f"{run.pk:>5}  {run.period:<10} {run.granularity:<7} {run.status:<7} {run.lines_count:>6} "
                f"{_usd(run.total_micro):>18}  {run.created_at:%Y-%m-%d %H:%M:%S}"
            )

    def _csv(self, options: dict[str, Any]) -> None:
        run = self._get_run(options["run"])
        for path in services.export_write_files(selectors.run_lines(run), Path(options["out"])):
            self.stdout.write(f"wrote {path}")

    def _status(self, options: dict[str, Any]) -> None:
        rec = selectors.period_reconciliation(services.parse_period(options["period"]))
        self.stdout.write(f"billable ledger rows   {rec.ledger_rows:>10}  {_usd(rec.ledger_micro):>18}")
        self.stdout.write(f"exported (marked) rows {rec.exported_rows:>10}  {_usd(rec.exported_micro):>18}")
        self.stdout.write(f"not yet exported       {rec.pending_rows:>10}  {_usd(rec.pending_micro):>18}")
        self.stdout.write(f"billed by lines                   {_usd(rec.lines_micro):>18}")
        verdict = "OK" if rec.exported_micro == rec.lines_micro else "MISMATCH"
        self.stdout.write(f"lines vs marked rows: {verdict}")
        if verdict != "OK":
            raise CommandError("exported lines do not equal the marked ledger rows")

    # --- helpers -------------------------------------------------------------------------

    def _get_run(self, pk: int) -> ExportRun:
        try:
            return ExportRun.objects.get(pk=pk)
        except ExportRun.DoesNotExist as exc:
            raise CommandError(f"no export run {pk}") from exc

    def _report_run(self, run: ExportRun) -> None:
        self.stdout.write(
            f"export run {run.pk}: period {run.period}, {run.granularity}, event {run.event_name}: "
            f"{run.lines_count} new line(s), {run.rows_count} ledger row(s), {_usd(run.total_micro)} "
            f"({run.total_micro} micro-USD)"
        )
        if run.lines_count == 0:
            self.stdout.write("nothing new to bill for this period (rows already exported are never billed twice)")
        for tenant in run.unmapped:
            self.stderr.write(
                f"NOT EXPORTED: tenant {tenant['slug']} has no Stripe customer id (nor has any ancestor): "
                f"{tenant['rows']} row(s), {_usd(tenant['cost_micro'])}"
            )
        for warning in run.warnings:
            self.stderr.write(f"warning: {warning}")

    def _report_push(self, result: services.PushResult) -> None:
        self.stdout.write(
            f"push: {result.accepted} accepted, {result.duplicates} already at Stripe, "
            f"{result.already_accepted} previously accepted, {result.failed} failed, {result.stale} stale, "
            f"{result.skipped_locked} busy"
        )
        for error in result.errors:
            self.stderr.write(f"failed: {error}")
        if result.stale:
            self.stderr.write("warning: stale lines are older than 35 days; Stripe refuses them")
        if result.stopped:
            self.stderr.write(result.stopped)
        if not result.ok:
            raise CommandError("push incomplete; re-run it (retries are safe: same identifiers, same keys)")
