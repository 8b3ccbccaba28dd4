"""``can providers status [--json]``: each deployment's circuit breaker (docs/resilience.md)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from core import runtime
from gateway.routing import breaker


async def _read() -> list[dict[str, Any]]:
    try:
        return await breaker.all_status()
    finally:
        if settings.REDIS_URL:
            await runtime.close_redis()


class Command(BaseCommand):
    help = "Provider deployments and their circuit breakers."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="{status}")
        status = sub.add_parser("status", help="each deployment's circuit breaker: closed, open or half_open")
        status.add_argument("--json", action="store_true", help="JSON, as GET /health/providers answers")

    def handle(self, *args: Any, **options: Any) -> None:
        rows = asyncio.run(_read())
        if options["json"]:
            self.stdout.write(json.dumps({"deployments": rows}, indent=2))
            return
        if not settings.REDIS_URL:
            self.stderr.write(
                "Embedded mode (no REDIS_URL): breaker state lives in the gateway process; "
                "ask it with GET /health/providers. Shown here: this process's view (all closed)."
            )
        if not rows:
            self.stdout.write("no active deployments")
            return
        header = ("MODEL", "PROVIDER", "UPSTREAM MODEL", "STATE", "FAILURES", "OPENED", "RETRY IN")
        lines = [header] + [
            (
                r["model"],
                r["provider"],
                r["upstream_model"],
                r["state"] + (" (unreadable)" if "error" in r else ""),
                str(r["consecutive_failures"]),
                str(r["times_opened"]),
                f"{r['retry_in_seconds']:.1f}s" if r["state"] == "open" else "-",
            )
            for r in rows
        ]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        for line in lines:
            self.stdout.write("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
