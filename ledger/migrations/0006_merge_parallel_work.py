# Joins the migrations of work done in parallel (routing, resilience, cache, tracing, Responses API, dashboard, audit).

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("ledger", "0004_usage_attempts"),
        ("ledger", "0005_rollup_cache_savings"),
        ("ledger", "0005_usage_experiment_feedback"),
    ]

    operations = []
