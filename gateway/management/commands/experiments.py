"""``can experiments list|show ID|promote ID ARM|auto-promote``: routing experiments (docs/routing.md)."""

from __future__ import annotations

import json
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from gateway import experiments
from gateway.models import Experiment


def _num(value: Any, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


class Command(BaseCommand):
    help = "Routing experiments: their arms' results and the significance of the differences; promote a winner."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="{list,show,promote,auto-promote}")
        sub.add_parser("list", help="every experiment with its status")
        show = sub.add_parser("show", help="per arm results from the ledger and their significance")
        show.add_argument("id", metavar="ID")
        show.add_argument("--json", action="store_true", help="the report as JSON")
        promote = sub.add_parser("promote", help="send all of the experiment's traffic to one arm (audited)")
        promote.add_argument("id", metavar="ID")
        promote.add_argument("arm", metavar="ARM")
        sub.add_parser("auto-promote", help="promote the winners that reached their sample size and significance now")

    def handle(self, *args: Any, **opts: Any) -> None:
        action = opts["action"]
        if action == "list":
            for row in Experiment.objects.select_related("tenant").order_by("slug"):
                where = row.model or f"rule {row.rule}"
                scope = row.tenant.slug if row.tenant else "(global)"
                winner = f" winner={row.winner}" if row.winner else ""
                arms = ", ".join(f"{a.get('name')}={a.get('weight', 1)}" for a in row.arms if isinstance(a, dict))
                self.stdout.write(f"{row.slug}  {row.status}  {where}  {scope}  arms: {arms}{winner}")
            return
        if action == "auto-promote":
            done = experiments.experiments_auto_promote()
            for slug, arm in done:
                self.stdout.write(f"{slug}: promoted {arm}")
            if not done:
                self.stdout.write("no experiment reached its sample size and significance")
            return
        experiment = Experiment.objects.select_related("tenant").filter(slug=opts["id"]).first()
        if experiment is None:
            raise CommandError(f"no experiment {opts['id']!r} (can experiments list)")
        if action == "promote":
            try:
                experiments.experiment_promote(experiment, arm=opts["arm"], reason="by hand", actor_label="cli")
            except ValidationError as err:
                raise CommandError("; ".join(err.messages)) from None
            self.stdout.write(f"{experiment.slug}: promoted {opts['arm']}")
            return
        report = experiments.experiment_report(experiment)
        if opts["json"]:
            self.stdout.write(json.dumps(report, indent=2))
            return
        self._print(report)

    def _print(self, report: dict[str, Any]) -> None:
        out = self.stdout
        applies = report["applies_to"]
        where = f"model {applies['model']}" if "model" in applies else f"rule {applies['rule']}"
        out.write(f"experiment {report['id']} ({report['status']}) on {where}")
        if report.get("winner"):
            out.write(f"winner: {report['winner']}")
        out.write(
            f"{'arm':<14}{'requests':>9}{'errors':>8}{'p50 ms':>9}{'p95 ms':>9}"
            f"{'$/request':>12}{'feedback':>10}{'n':>6}"
        )
        for arm in report["arms"]:
            out.write(
                f"{arm['arm']:<14}{arm['requests']:>9}{_num(arm['error_rate'], '{:.1%}'):>8}"
                f"{_num(arm['latency_p50_ms']):>9}{_num(arm['latency_p95_ms']):>9}"
                f"{_num(arm['cost_per_request_usd'], '{:.6f}'):>12}{_num(arm['feedback_mean'], '{:.3f}'):>10}"
                f"{arm['feedback_n']:>6}"
            )
        confidence = report["confidence"]
        out.write(f"significance vs {report['arms'][0]['arm']} (alpha {report['alpha']}, {confidence:.0%} confidence):")
        for c in report["comparisons"]:
            verdict = "significant" if c["significant"] else "not significant"
            p_value = _num(c["p_value"], "{:.4g}")
            out.write(
                f"  {c['arm']} {c['metric']}: diff {_num(c['difference'], '{:+.4g}')}, p={p_value}"
                f" {verdict} ({c['method']})"
            )
        auto = report.get("auto_promote")
        if auto:
            out.write(f"auto-promotion on {auto['metric']} (min {auto['min_samples']} per arm): {auto['reason']}")
