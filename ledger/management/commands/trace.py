"""``can trace REQUEST_ID``: one request's ledger row and its tree (stages, route decision, cache,
upstream attempts, tokens, cost), with no external backend: the same data ``GET /api/requests/{id}``
shows and the OpenTelemetry spans are built from."""

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
        out("")
        for line in tree(row, tenant_text, key_text):
            out(line)


#: Stage timings (``UsageRecord.timings`` keys) as the tree names them.
STAGE_LABELS = {
    "parse": "Parse request",
    "auth": "Gateway auth",
    "route": "Router decision",
    "limit": "Rate limits",
    "cache": "Cache lookup",
    "admit": "Budget reserve",
    "upstream": "Upstream call",
    "upstream_first_chunk": "Upstream call (to first chunk)",
    "relay": "Response relay",
    "settle": "Settle cost",
}


def _ms(value: float) -> str:
    return f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"


def _branch(items: list[tuple[str, list[str]]]) -> list[str]:
    """``(line, children)`` pairs drawn as a tree."""
    lines: list[str] = []
    for index, (text, kids) in enumerate(items):
        last = index == len(items) - 1
        lines.append(("└─ " if last else "├─ ") + text)
        for k, kid in enumerate(kids):
            lines.append(("   " if last else "│  ") + ("└─ " if k == len(kids) - 1 else "├─ ") + kid)
    return lines


def _attempt_line(attempt: dict[str, Any]) -> str:
    where = f"#{attempt.get('n', '?')} {attempt.get('provider') or '-'}/{attempt.get('model') or '-'}"
    outcome = attempt.get("outcome", "")
    if outcome == "skipped":
        return f"{where}: skipped ({attempt.get('error') or 'breaker open'})"
    status = attempt.get("status")
    result = "ok" if outcome == "ok" else " ".join(str(p) for p in (outcome, status, attempt.get("error")) if p)
    why = attempt.get("why") or ""
    return f"{where}: {_ms(float(attempt.get('ms') or 0))}, {result}" + (f" [{why}]" if why else "")


def tree(row: UsageRecord, tenant: str, key: str) -> list[str]:
    """The request as the roadmap draws it: stages with their times, the route decision, the
    cache result, each upstream attempt, tokens and cost (from the ledger row alone)."""
    # In pipeline order (PostgreSQL's jsonb keeps no key order); stages unknown here go last.
    order = list(STAGE_LABELS)
    timings = dict(
        sorted((row.timings or {}).items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))
    )
    attempts: list[dict[str, Any]] = row.attempts or []
    items: list[tuple[str, list[str]]] = []
    for stage, ms in timings.items():
        label = f"{STAGE_LABELS.get(stage, stage)}: {_ms(ms)}"
        kids: list[str] = []
        if stage == "auth":
            kids.append(f"tenant {tenant}, key {key}")
        elif stage == "route":
            decision = getattr(row, "route", None)  # the routing policy's decision, where the ledger keeps it
            if isinstance(decision, dict):
                kids.extend(f"{name}: {value}" for name, value in decision.items())
            elif decision:
                kids.append(str(decision))
            served = f"{row.provider or '-'}/{row.served_model or '-'}"
            chosen = next((a for a in attempts if a.get("outcome") == "ok"), None)
            kids.append(f"Model selected: {served}" + (f" ({chosen['why']})" if chosen and chosen.get("why") else ""))
        elif stage == "cache":
            label += " (HIT)" if row.cache_hit else " (MISS)"
            if row.cache_hit:
                kids.append(f"saved {format_usd(row.saved_micro)} USD (what the answer would have cost)")
        elif stage.startswith("upstream"):
            label += f" ({len([a for a in attempts if a.get('outcome') != 'skipped'])} attempts)" if attempts else ""
            kids.extend(_attempt_line(a) for a in attempts)
            kids.append(_tokens(row))
            kids.append(f"Cost: {format_usd(row.cost_micro)} USD")
        items.append((label, kids))
    if row.cache_hit and not any(stage.startswith("upstream") for stage in timings):
        items.append(("Served from the response cache", [_tokens(row), f"Cost: {format_usd(row.cost_micro)} USD"]))
    return [f"Trace: {row.request_id} ({row.latency_ms} ms total)", *_branch(items)]


def _tokens(row: UsageRecord) -> str:
    cached = f" ({row.cached_tokens} cached)" if row.cached_tokens else ""
    reasoning = f" ({row.reasoning_tokens} reasoning)" if row.reasoning_tokens else ""
    return f"Tokens: {row.prompt_tokens} in{cached}, {row.completion_tokens} out{reasoning}"
