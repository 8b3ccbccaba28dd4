"""``can trace REQUEST_ID``: one request's ledger row with its per-stage timings, no external backend."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from core.money import format_usd
from ledger.models import UsageRecord
from ledger.routes import describe_route
from tenants.models import ApiKey, Tenant


class Command(BaseCommand):
    help = "Show one request's usage row and per-stage timings (the x-request-id of any response)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("request_id", help="the x-request-id header of the response, e.g. req_...")

    def handle(self, *args: Any, **options: Any) -> None:
        row = UsageRecord.objects.filter(request_id=options["request_id"]).first()
        if row is None:
            raise CommandError(
                f"no usage row for {options['request_id']!r}: requests refused before reaching a provider "
                "are not recorded, and the writer may still be a moment behind"
            )
        out = self.stdout.write
        out(f"request   {row.request_id}  {row.created_at:%Y-%m-%d %H:%M:%S.%f} UTC")
        tenant = Tenant.objects.filter(pk=row.tenant_id).values_list("slug", flat=True).first()
        key_id = row.api_key_id
        key = ApiKey.objects.filter(pk=key_id).values_list("prefix", flat=True).first() if key_id is not None else None
        key_text = key or (f"(deleted key {key_id})" if key_id is not None else "-")
        tenant_text = tenant or f"(deleted tenant {row.tenant_id})"
        out(f"tenant    {tenant_text}  key {key_text}  end user {row.end_user or '-'}")
        out(
            f"endpoint  {row.endpoint}{' (stream)' if row.stream else ''}  status {row.status} ({row.http_status})"
            + (f"  error {row.error_type}" if row.error_type else "")
        )
        out(f"model     {row.requested_model} -> {row.provider or '-'}:{row.served_model or '-'}")
        if row.route:
            out("route     " + "\n          ".join(describe_route(row.route)))
        out(
            f"tokens    prompt {row.prompt_tokens} (cached {row.cached_tokens}, cache write {row.cache_write_tokens})"
            f"  completion {row.completion_tokens} (reasoning {row.reasoning_tokens})  [{row.usage_source}]"
        )
        out(f"cost      {format_usd(row.cost_micro)} USD ({row.cost_micro} micro-USD)")
        ttft = f"  first token {row.ttft_ms} ms" if row.ttft_ms is not None else ""
        out(f"latency   {row.latency_ms} ms{ttft}")
        if row.timings:
            out("stages (ms, in order):")
            width = max(len(name) for name in row.timings)
            for name, ms in row.timings.items():
                out(f"  {name.ljust(width)}  {ms:>9.3f}")
