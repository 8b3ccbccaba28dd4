"""``can providers status [--json]``: each deployment's circuit breaker and health;
``can providers probe``: probe every deployment whose provider has probes on, now
(docs/resilience.md)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from core import money, runtime
from gateway.routing import health
from gateway.routing.table import RouteTable, load_route_table


async def _read(table: RouteTable) -> list[dict[str, Any]]:
    try:
        return await health.all_status(table)
    finally:
        if settings.REDIS_URL:
            await runtime.close_redis()


def _probe_cell(row: dict[str, Any]) -> str:
    last = row["health"]["last_probe"]
    if last is None:
        return "-" if not row["health"]["probes"] else "not yet"
    text = f"{last['result']} {last['seconds_ago']:.0f}s ago"
    if last["result"] == "ok" and last["latency_ms"] is not None:
        text += f" ({last['latency_ms']:.0f} ms)"
    return text


def _spend_cell(row: dict[str, Any]) -> str:
    spent = row["health"].get("probes_24h")
    if spent is None:
        return "?"  # the database did not answer
    return f"{spent['probes']} (${money.format_usd_short(spent['cost_micro'])})" if spent["probes"] else "-"


class Command(BaseCommand):
    help = "Provider deployments: their circuit breakers, health probes and outlier ejections."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="{status,probe}")
        status = sub.add_parser("status", help="each deployment's circuit breaker and health")
        status.add_argument("--json", action="store_true", help="JSON, as GET /health/providers answers")
        sub.add_parser("probe", help="probe now every deployment whose provider has probes on")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["action"] == "probe":
            table = load_route_table()
            results = asyncio.run(health.probe_in_own_loop(table, force=True))
            if not results:
                self.stdout.write("no deployment has probes on (a provider's probe_enabled)")
            for r in results:
                detail = f" {r['probe_ms']} ms" if r.get("probe_ms") else ""
                error = f": {r['probe_error']}" if r.get("probe_error") else ""
                self.stdout.write(
                    f"{r['model']} {r['provider']}:{r['upstream_model']} {r['probe_result']}{detail}{error}"
                )
            return
        rows = asyncio.run(_read(load_route_table()))
        if options["json"]:
            self.stdout.write(json.dumps({"deployments": rows}, indent=2))
            return
        if not settings.REDIS_URL:
            self.stderr.write(
                "Embedded mode (no REDIS_URL): breaker state and health live in the gateway process; "
                "ask it with GET /health/providers. Shown here: this process's view."
            )
        if not rows:
            self.stdout.write("no active deployments")
            return
        header = (
            "MODEL",
            "PROVIDER",
            "UPSTREAM MODEL",
            "STATE",
            "FAILURES",
            "OPENED",
            "RETRY IN",
            "LAST PROBE",
            "PROBES 24H",
        )
        lines = [header] + [
            (
                r["model"],
                r["provider"],
                r["upstream_model"],
                r["state"] + (" (unreadable)" if "error" in r else ""),
                str(r["consecutive_failures"]),
                str(r["times_opened"]),
                f"{r['retry_in_seconds']:.1f}s" if r["state"] == "open" else "-",
                _probe_cell(r),
                _spend_cell(r),
            )
            for r in rows
        ]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        for line in lines:
            self.stdout.write("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
