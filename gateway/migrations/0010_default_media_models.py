"""The default media models and their prices per unit (docs/media.md), overridable in the admin.

Served by the ``openai`` provider (inactive until an operator adds a key); in dev mode (``make run``)
by the offline mock, priced as here. Prices as OpenAI published them when this table was written.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from django.db import migrations

EFFECTIVE = datetime(2025, 1, 1, tzinfo=UTC)

# name, kind, per-unit price fields
MODELS: list[tuple[str, str, dict[str, Any]]] = [
    (
        "dall-e-3",
        "image",
        {
            "per_image": Decimal("0.04"),
            "image_prices": {
                "1024x1024": "0.04",  # a size alone: its price when the quality is not known (the default)
                "1024x1792": "0.08",
                "1792x1024": "0.08",
                "1024x1024/standard": "0.04",
                "1024x1792/standard": "0.08",
                "1792x1024/standard": "0.08",
                "1024x1024/hd": "0.08",
                "1024x1792/hd": "0.12",
                "1792x1024/hd": "0.12",
            },
        },
    ),
    (
        "gpt-image-1",
        "image",
        {
            "per_image": Decimal("0.042"),
            "image_prices": {
                "1024x1024/low": "0.011",
                "1024x1536/low": "0.016",
                "1536x1024/low": "0.016",
                "1024x1024/medium": "0.042",
                "1024x1536/medium": "0.063",
                "1536x1024/medium": "0.063",
                "1024x1024/high": "0.167",
                "1024x1536/high": "0.25",
                "1536x1024/high": "0.25",
            },
        },
    ),
    ("whisper-1", "transcription", {"audio_per_minute": Decimal("0.006")}),
    ("tts-1", "speech", {"per_mchars": Decimal("15.00")}),
    ("tts-1-hd", "speech", {"per_mchars": Decimal("30.00")}),
    ("omni-moderation-latest", "moderation", {}),
]


def load(apps: Any, schema_editor: Any) -> None:
    Provider = apps.get_model("gateway", "Provider")
    LLMModel = apps.get_model("gateway", "LLMModel")
    Deployment = apps.get_model("gateway", "Deployment")
    Price = apps.get_model("gateway", "Price")
    provider, _ = Provider.objects.get_or_create(
        slug="openai", defaults={"kind": "openai", "base_url": "https://api.openai.com/v1", "is_active": False}
    )
    for name, kind, prices in MODELS:
        model, created = LLMModel.objects.get_or_create(
            name=name, defaults={"kind": kind, "owned_by": "openai", "context_window": 0, "max_output_tokens": 0}
        )
        if not created:
            continue  # an operator's own model of that name stays as it is
        Deployment.objects.get_or_create(model=model, provider=provider, upstream_model=name)
        Price.objects.get_or_create(model=model, effective_from=EFFECTIVE, defaults=prices)


class Migration(migrations.Migration):
    dependencies = [("gateway", "0009_media_prices")]
    operations = [migrations.RunPython(load, migrations.RunPython.noop)]
