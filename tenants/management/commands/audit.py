"""``can audit verify|export|prune``: the tamper-evident audit log (docs/audit.md)."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils.dateparse import parse_date, parse_datetime

from tenants import audit
from tenants.models import Tenant


def parse_moment(text: str, option: str) -> datetime:
    """A date (its midnight UTC) or an ISO date-time (UTC when it names no zone)."""
    moment = parse_datetime(text)
    if moment is None:
        day = parse_date(text)
        if day is None:
            raise CommandError(f"{option}: {text!r} is neither a date (2026-11-01) nor an ISO date-time")
        moment = datetime.combine(day, time.min)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment


class Command(BaseCommand):
    help = "Verify the audit log's hash chain, export it as CSV or JSONL, prune rows past retention."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="{verify,export,prune}")
        sub.add_parser("verify", help="check the hash chain; exit 1 naming the first row altered or removed")
        export = sub.add_parser("export", help="write audit rows as CSV or JSONL (to stdout or --output)")
        export.add_argument("--since", required=True, help="a date (2026-11-01) or ISO date-time, inclusive")
        export.add_argument("--until", default="", help="a date or ISO date-time, exclusive (default: now)")
        export.add_argument("--format", choices=("csv", "jsonl"), default="csv")
        export.add_argument("--tenant", default="", metavar="SLUG", help="only this tenant and its subtree")
        export.add_argument("--output", "-o", default="", metavar="FILE", help="write here instead of stdout")
        prune = sub.add_parser("prune", help="delete rows past retention; the chain stays verifiable")
        prune.add_argument("--days", type=int, help="retention in days (default CHITTYCAN_AUDIT_RETENTION_DAYS)")

    def handle(self, *args: Any, **opts: Any) -> None:
        getattr(self, f"_{opts['action']}")(opts)

    def _verify(self, opts: dict[str, Any]) -> None:
        result = audit.verify()
        if not result.ok:
            self.stderr.write(f"audit chain BROKEN at row #{result.seq}: {result.problem}")
            self.stderr.write(f"({result.checked} rows verified before it, from the anchor #{result.anchor_seq})")
            sys.exit(1)
        start = f"from the anchor #{result.anchor_seq}" if result.anchor_seq else "from the first row"
        self.stdout.write(f"audit chain OK: {result.checked} rows verified {start} to the head #{result.head_seq}")

    def _export(self, opts: dict[str, Any]) -> None:
        since = parse_moment(opts["since"], "--since")
        until = parse_moment(opts["until"], "--until") if opts["until"] else None
        tenant_ids = None
        if opts["tenant"]:
            tenant = Tenant.objects.filter(slug=opts["tenant"]).first()
            if tenant is None:
                raise CommandError(f"--tenant: no tenant {opts['tenant']!r} (see: can tenants list)")
            tenant_ids = audit.subtree_ids(tenant)
        rows = audit.events(since=since, until=until, tenant_ids=tenant_ids).iterator(chunk_size=2000)
        write = audit.write_csv if opts["format"] == "csv" else audit.write_jsonl
        if opts["output"]:
            with open(opts["output"], "w", encoding="utf-8", newline="") as out:
                count = write(rows, out)
            self.stderr.write(f"wrote {count} audit rows to {opts['output']}")
        else:
            write(rows, self.stdout)  # each line ends in "\n", so OutputWrapper adds nothing

    def _prune(self, opts: dict[str, Any]) -> None:
        days = opts["days"]
        if days is not None and days < 1:
            raise CommandError("--days must be at least 1")
        pruned = audit.prune(retention_days=days)
        self.stdout.write(
            f"pruned {pruned.rows} audit rows before {pruned.cutoff:%Y-%m-%d %H:%M} UTC"
            + (f" (through #{pruned.through_seq}; the chain now starts after it)" if pruned.rows else "")
        )
