# Joins the migrations of work done in parallel (routing, resilience, cache, tracing, Responses API, dashboard, audit).

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("gateway", "0008_provider_responses_api_stored_response"),
        ("gateway", "0008_provider_timeouts_and_health"),
        ("gateway", "0008_semantic_cache"),
        ("gateway", "0009_experiments"),
        ("gateway", "0009_model_strategy"),
    ]

    operations = []
