"""The default providers, models and price table (USD per million tokens), overridable in the admin.

Providers are created without credentials and inactive until an operator adds a key (the admin,
or `can apply`). Prices as published by each provider when this table was written.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from django.db import migrations

PROVIDERS = [
    ("openai", "openai", "https://api.openai.com/v1"),
    ("anthropic", "anthropic", "https://api.anthropic.com"),
    ("groq", "openai", "https://api.groq.com/openai/v1"),
]

# name, kind, provider, upstream model, context, max output, input, cached input, cache write, output
MODELS = [
    ("gpt-4o", "chat", "openai", "gpt-4o", 128_000, 16_384, "2.50", "1.25", None, "10.00"),
    ("gpt-4o-mini", "chat", "openai", "gpt-4o-mini", 128_000, 16_384, "0.15", "0.075", None, "0.60"),
    ("o3-mini", "chat", "openai", "o3-mini", 200_000, 100_000, "1.10", "0.55", None, "4.40"),
    ("text-embedding-3-small", "embedding", "openai", "text-embedding-3-small", 8_191, 0, "0.02", None, None, "0"),
    (
        "claude-sonnet-4",
        "chat",
        "anthropic",
        "claude-sonnet-4-20250514",
        200_000,
        64_000,
        "3.00",
        "0.30",
        "3.75",
        "15.00",
    ),
    ("llama-3-70b", "chat", "groq", "llama3-70b-8192", 8_192, 8_192, "0.59", None, None, "0.79"),
]

EFFECTIVE = datetime(2025, 1, 1, tzinfo=UTC)


def load(apps: Any, schema_editor: Any) -> None:
    Provider = apps.get_model("gateway", "Provider")
    LLMModel = apps.get_model("gateway", "LLMModel")
    Deployment = apps.get_model("gateway", "Deployment")
    Price = apps.get_model("gateway", "Price")
    providers = {}
    for slug, kind, base_url in PROVIDERS:
        providers[slug], _ = Provider.objects.get_or_create(
            slug=slug, defaults={"kind": kind, "base_url": base_url, "is_active": False}
        )
    for name, kind, provider, upstream, ctx, max_out, inp, cached, write, out in MODELS:
        model, _ = LLMModel.objects.get_or_create(
            name=name,
            defaults={
                "kind": kind,
                "owned_by": provider if provider != "groq" else "meta",
                "context_window": ctx,
                "max_output_tokens": max_out,
            },
        )
        Deployment.objects.get_or_create(model=model, provider=providers[provider], upstream_model=upstream)
        Price.objects.get_or_create(
            model=model,
            effective_from=EFFECTIVE,
            defaults={
                "input_per_mtok": Decimal(inp),
                "cached_input_per_mtok": Decimal(cached) if cached else None,
                "cache_write_per_mtok": Decimal(write) if write else None,
                "output_per_mtok": Decimal(out),
            },
        )


class Migration(migrations.Migration):
    dependencies = [("gateway", "0001_initial")]
    operations = [migrations.RunPython(load, migrations.RunPython.noop)]
