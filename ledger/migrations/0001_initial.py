"""The usage ledger moves from the gateway app to its own app, tables and data untouched.

State only: the tables (``gateway_usagerecord``, ``gateway_hourlyusage``, ...) were created by the
gateway's migrations and keep their names (``db_table``); ``gateway.0004_move_usage_to_ledger``
removes the models from the gateway's state after this migration adds them here.
"""

import django.db.models.deletion
import django.db.models.functions.datetime
import django.utils.timezone
from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True

    dependencies = [
        ("gateway", "0003_usage_rollups_alerts"),
        ("tenants", "0001_initial"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[],
            state_operations=[
                migrations.CreateModel(
                    name="RollupCursor",
                    fields=[
                        (
                            "id",
                            models.BigAutoField(
                                auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                            ),
                        ),
                        ("name", models.CharField(max_length=50, unique=True)),
                        ("position", models.DateTimeField()),
                    ],
                    options={
                        "db_table": "gateway_rollupcursor",
                    },
                ),
                migrations.CreateModel(
                    name="RollupHour",
                    fields=[
                        (
                            "id",
                            models.BigAutoField(
                                auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                            ),
                        ),
                        ("hour", models.DateTimeField(unique=True)),
                        ("computed_at", models.DateTimeField(default=django.utils.timezone.now)),
                        ("sealed", models.BooleanField(default=False)),
                    ],
                    options={
                        "db_table": "gateway_rolluphour",
                        "ordering": ["-hour"],
                    },
                ),
                migrations.CreateModel(
                    name="DailyUsage",
                    fields=[
                        (
                            "id",
                            models.BigAutoField(
                                auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                            ),
                        ),
                        (
                            "model",
                            models.CharField(
                                help_text="Served model (the requested name if none was served)", max_length=200
                            ),
                        ),
                        ("provider", models.CharField(blank=True, default="", max_length=100)),
                        ("calls", models.PositiveBigIntegerField(default=0)),
                        ("errors", models.PositiveBigIntegerField(default=0, help_text="Rows whose status is not ok")),
                        ("cache_hits", models.PositiveBigIntegerField(default=0)),
                        ("stream_calls", models.PositiveBigIntegerField(default=0)),
                        ("prompt_tokens", models.PositiveBigIntegerField(default=0)),
                        ("cached_tokens", models.PositiveBigIntegerField(default=0)),
                        ("cache_write_tokens", models.PositiveBigIntegerField(default=0)),
                        ("completion_tokens", models.PositiveBigIntegerField(default=0)),
                        ("reasoning_tokens", models.PositiveBigIntegerField(default=0)),
                        ("cost_micro", models.BigIntegerField(default=0, help_text="Integer micro-USD")),
                        ("latency_ms_sum", models.PositiveBigIntegerField(default=0)),
                        ("ttft_ms_sum", models.PositiveBigIntegerField(default=0)),
                        (
                            "ttft_count",
                            models.PositiveBigIntegerField(default=0, help_text="Calls with a time to first token"),
                        ),
                        ("date", models.DateField(help_text="Calendar day in the tenant's time zone")),
                        (
                            "api_key",
                            models.ForeignKey(
                                db_constraint=False,
                                null=True,
                                on_delete=django.db.models.deletion.DO_NOTHING,
                                related_name="+",
                                to="tenants.apikey",
                            ),
                        ),
                        (
                            "tenant",
                            models.ForeignKey(
                                db_constraint=False,
                                on_delete=django.db.models.deletion.DO_NOTHING,
                                related_name="+",
                                to="tenants.tenant",
                            ),
                        ),
                    ],
                    options={
                        "db_table": "gateway_dailyusage",
                        "ordering": ["-date"],
                        "indexes": [models.Index(fields=["tenant", "date"], name="daily_usage_tenant")],
                        "constraints": [
                            models.UniqueConstraint(
                                fields=("date", "tenant", "api_key", "model", "provider"),
                                name="daily_usage_unique",
                                nulls_distinct=False,
                            )
                        ],
                    },
                ),
                migrations.CreateModel(
                    name="HourlyUsage",
                    fields=[
                        (
                            "id",
                            models.BigAutoField(
                                auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                            ),
                        ),
                        (
                            "model",
                            models.CharField(
                                help_text="Served model (the requested name if none was served)", max_length=200
                            ),
                        ),
                        ("provider", models.CharField(blank=True, default="", max_length=100)),
                        ("calls", models.PositiveBigIntegerField(default=0)),
                        ("errors", models.PositiveBigIntegerField(default=0, help_text="Rows whose status is not ok")),
                        ("cache_hits", models.PositiveBigIntegerField(default=0)),
                        ("stream_calls", models.PositiveBigIntegerField(default=0)),
                        ("prompt_tokens", models.PositiveBigIntegerField(default=0)),
                        ("cached_tokens", models.PositiveBigIntegerField(default=0)),
                        ("cache_write_tokens", models.PositiveBigIntegerField(default=0)),
                        ("completion_tokens", models.PositiveBigIntegerField(default=0)),
                        ("reasoning_tokens", models.PositiveBigIntegerField(default=0)),
                        ("cost_micro", models.BigIntegerField(default=0, help_text="Integer micro-USD")),
                        ("latency_ms_sum", models.PositiveBigIntegerField(default=0)),
                        ("ttft_ms_sum", models.PositiveBigIntegerField(default=0)),
                        (
                            "ttft_count",
                            models.PositiveBigIntegerField(default=0, help_text="Calls with a time to first token"),
                        ),
                        ("hour", models.DateTimeField(help_text="Start of the UTC hour")),
                        (
                            "api_key",
                            models.ForeignKey(
                                db_constraint=False,
                                null=True,
                                on_delete=django.db.models.deletion.DO_NOTHING,
                                related_name="+",
                                to="tenants.apikey",
                            ),
                        ),
                        (
                            "tenant",
                            models.ForeignKey(
                                db_constraint=False,
                                on_delete=django.db.models.deletion.DO_NOTHING,
                                related_name="+",
                                to="tenants.tenant",
                            ),
                        ),
                    ],
                    options={
                        "db_table": "gateway_hourlyusage",
                        "ordering": ["-hour"],
                        "indexes": [models.Index(fields=["tenant", "hour"], name="hourly_usage_tenant")],
                        "constraints": [
                            models.UniqueConstraint(
                                fields=("hour", "tenant", "api_key", "model", "provider"),
                                name="hourly_usage_unique",
                                nulls_distinct=False,
                            )
                        ],
                    },
                ),
                migrations.CreateModel(
                    name="UsageRecord",
                    fields=[
                        (
                            "id",
                            models.BigAutoField(
                                auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                            ),
                        ),
                        ("request_id", models.CharField(max_length=64, unique=True)),
                        ("created_at", models.DateTimeField(db_index=True, default=django.utils.timezone.now)),
                        ("endpoint", models.CharField(max_length=40)),
                        ("requested_model", models.CharField(max_length=200)),
                        ("served_model", models.CharField(blank=True, default="", max_length=200)),
                        ("provider", models.CharField(blank=True, default="", max_length=100)),
                        ("deployment_id", models.BigIntegerField(blank=True, null=True)),
                        (
                            "prompt_tokens",
                            models.PositiveIntegerField(default=0, help_text="All input tokens, cached included"),
                        ),
                        (
                            "cached_tokens",
                            models.PositiveIntegerField(default=0, help_text="Input tokens read from a prompt cache"),
                        ),
                        (
                            "cache_write_tokens",
                            models.PositiveIntegerField(default=0, help_text="Input tokens written to a cache"),
                        ),
                        ("completion_tokens", models.PositiveIntegerField(default=0)),
                        ("reasoning_tokens", models.PositiveIntegerField(default=0)),
                        ("cost_micro", models.BigIntegerField(default=0, help_text="Integer micro-USD")),
                        (
                            "usage_source",
                            models.CharField(
                                default="upstream", help_text="upstream | estimated | cache", max_length=20
                            ),
                        ),
                        ("latency_ms", models.PositiveIntegerField(default=0)),
                        ("ttft_ms", models.PositiveIntegerField(blank=True, null=True)),
                        (
                            "status",
                            models.CharField(
                                choices=[
                                    ("ok", "Ok"),
                                    ("upstream_error", "Upstream Error"),
                                    ("client_disconnected", "Client Disconnected"),
                                    ("upstream_timeout", "Upstream Timeout"),
                                    ("error", "Error"),
                                ],
                                default="ok",
                                max_length=30,
                            ),
                        ),
                        ("http_status", models.PositiveSmallIntegerField(default=200)),
                        ("error_type", models.CharField(blank=True, default="", max_length=100)),
                        ("stream", models.BooleanField(default=False)),
                        ("cache_hit", models.BooleanField(default=False)),
                        ("end_user", models.CharField(blank=True, default="", max_length=200)),
                        ("timings", models.JSONField(blank=True, default=dict, help_text="Per-stage milliseconds")),
                        (
                            "recorded_at",
                            models.DateTimeField(
                                db_default=django.db.models.functions.datetime.Now(),
                                editable=False,
                                help_text="When the row reached the ledger (rollups find late rows by it)",
                            ),
                        ),
                        (
                            "api_key",
                            models.ForeignKey(
                                db_constraint=False,
                                null=True,
                                on_delete=django.db.models.deletion.DO_NOTHING,
                                related_name="+",
                                to="tenants.apikey",
                            ),
                        ),
                        (
                            "tenant",
                            models.ForeignKey(
                                db_constraint=False,
                                on_delete=django.db.models.deletion.DO_NOTHING,
                                related_name="+",
                                to="tenants.tenant",
                            ),
                        ),
                    ],
                    options={
                        "db_table": "gateway_usagerecord",
                        "ordering": ["-created_at"],
                        "indexes": [
                            models.Index(fields=["tenant", "created_at"], name="usage_tenant_time"),
                            models.Index(fields=["api_key", "created_at"], name="usage_key_time"),
                            models.Index(fields=["recorded_at"], name="usage_recorded"),
                        ],
                    },
                ),
            ],
        ),
    ]
