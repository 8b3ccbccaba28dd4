"""Active health probes in the ledger (``ledger.probes``, ``gateway.routing.health``): every probe
sent to a provider leaves exactly one ``ProbeRecord`` with its tokens and its cost at the probed
model's price; a skipped probe none. Shown by ``can providers status`` and
``GET /health/providers``, pruned with the usage ledger's retention. Against the fake OpenAI
upstream on loopback (tests/test_breakers.py ``pair``), probes sent the way ``can providers probe``
sends them (no gateway process, so no embedded scheduler probes meanwhile)."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from decimal import Decimal
from io import StringIO
from typing import Any

from django.core.management import call_command
from django.utils import timezone

from core import money
from gateway.routing import health
from gateway.routing.table import load_route_table
from ledger import retention
from ledger.models import ProbeRecord
from tests.fakes.openai_upstream import Fault
from tests.test_breakers import _fresh_breakers, fallback_server, pair  # noqa: F401

# gpt-4o in tests/conftest.py add_model: $2.50 in, $10.00 out per million tokens.
PRICE_IN, PRICE_OUT = Decimal("2.50"), Decimal("10.00")


def probe_all() -> list[dict[str, Any]]:
    return asyncio.run(health.probe_in_own_loop(load_route_table(), force=True))


def status_rows() -> dict[str, dict[str, Any]]:
    out = StringIO()
    call_command("providers", "status", "--json", stdout=out)
    return {r["provider"]: r for r in json.loads(out.getvalue())["deployments"]}


def test_each_probe_sent_leaves_one_priced_row_and_a_skipped_one_none(pair):  # noqa: F811
    primary, fallback, provider = pair
    provider.probe_enabled = True
    provider.first_byte_timeout = 0.3  # a stalled probe times out quickly
    provider.save()

    assert [r["probe_result"] for r in probe_all()] == ["ok"]
    row = ProbeRecord.objects.get()
    sent = primary.requests[-1].body
    usage = money.Usage(prompt_tokens=10 * len(sent["messages"]), completion_tokens=7)  # what the fake reports
    assert (row.provider, row.model, row.upstream_model, row.trigger, row.result) == (
        "primary",
        "gpt-4o",
        "gpt-4o-2024-08-06",
        "interval",
        "ok",
    )
    assert (row.prompt_tokens, row.completion_tokens) == (usage.prompt_tokens, usage.completion_tokens)
    # Micro-USD: the price per million tokens times the tokens.
    assert row.cost_micro == int(PRICE_IN * usage.prompt_tokens + PRICE_OUT * usage.completion_tokens) > 0
    assert row.error == "" and row.deployment_id is not None

    primary.set_fault(Fault("down"))
    assert [r["probe_result"] for r in probe_all()] == ["failed"]
    primary.set_fault(Fault("stall", stall=5.0))
    assert [r["probe_result"] for r in probe_all()] == ["failed"]  # timed out
    failed = list(ProbeRecord.objects.filter(result="failed").order_by("created_at"))
    assert len(failed) == 2 and all(r.cost_micro == 0 and r.prompt_tokens == 0 for r in failed)
    assert "down" in failed[0].error and "timed out" in failed[1].error

    primary.set_fault(Fault("down"))
    assert [r["probe_result"] for r in probe_all()] == ["failed"]  # the third failure opens the breaker
    assert [r["probe_result"] for r in probe_all()] == ["skipped"]  # open: nothing sent
    assert ProbeRecord.objects.count() == 4
    assert fallback.requests == []  # the fallback's provider does not probe

    spent = status_rows()["primary"]["health"]["probes_24h"]
    assert spent == {"probes": 4, "cost_micro": row.cost_micro}
    assert status_rows()["fallback"]["health"]["probes_24h"] == {"probes": 0, "cost_micro": 0}
    out = StringIO()
    call_command("providers", "status", stdout=out)
    text = out.getvalue()
    assert "PROBES 24H" in text and f"4 (${money.format_usd_short(row.cost_micro)})" in text, text


def test_probe_rows_are_pruned_with_the_ledger_retention(pair, settings):  # noqa: F811
    primary, _, provider = pair
    provider.probe_enabled = True
    provider.save()
    probe_all()
    probe_all()
    old = ProbeRecord.objects.order_by("created_at").first()
    assert old is not None
    ProbeRecord.objects.filter(pk=old.pk).update(
        created_at=timezone.now() - timedelta(days=settings.CHITTYCAN_USAGE_RETENTION_DAYS + 1)
    )
    result = retention.prune_usage()
    assert result.others.get("probe_records") == 1
    assert not ProbeRecord.objects.filter(pk=old.pk).exists() and ProbeRecord.objects.count() == 1
    # Old rows are outside the status views' 24 h window too.
    assert status_rows()["primary"]["health"]["probes_24h"]["probes"] == 1
