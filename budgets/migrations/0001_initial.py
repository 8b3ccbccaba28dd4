# Budgets get their own app. The models move here from tenants (Budget, BudgetCounter,
# BudgetReservation: tenants/migrations/0004_move_budgets_out.py) and gateway (AlertSent:
# gateway/migrations/0005_move_alertsent_to_budgets.py). State only: every table keeps its name
# and its rows. The content types follow the models, so permissions and admin history stay.

import django.db.models.deletion
import django.utils.timezone
from django.db import migrations, models

import budgets.models

#: model -> the app it came from
MOVED = {"budget": "tenants", "budgetcounter": "tenants", "budgetreservation": "tenants", "alertsent": "gateway"}


def _relabel(apps, schema_editor, *, forward: bool) -> None:
    content_type = apps.get_model("contenttypes", "ContentType")
    rows = content_type.objects.using(schema_editor.connection.alias)
    for model, old_app in MOVED.items():
        source, target = ("budgets", old_app) if not forward else (old_app, "budgets")
        if not rows.filter(app_label=target, model=model).exists():
            rows.filter(app_label=source, model=model).update(app_label=target)


def adopt_content_types(apps, schema_editor):
    _relabel(apps, schema_editor, forward=True)


def return_content_types(apps, schema_editor):
    _relabel(apps, schema_editor, forward=False)


class Migration(migrations.Migration):
    initial = True

    dependencies = [
        ("contenttypes", "0002_remove_content_type_name"),
        ("tenants", "0004_move_budgets_out"),
        ("gateway", "0005_move_alertsent_to_budgets"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name="BudgetCounter",
                    fields=[
                        (
                            "id",
                            models.BigAutoField(
                                auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                            ),
                        ),
                        ("name", models.CharField(max_length=100, unique=True)),
                        ("value", models.BigIntegerField(default=0)),
                        ("synced_at", models.DateTimeField(default=django.utils.timezone.now)),
                    ],
                    options={
                        "db_table": "tenants_budgetcounter",
                    },
                ),
                migrations.CreateModel(
                    name="BudgetReservation",
                    fields=[
                        (
                            "id",
                            models.BigAutoField(
                                auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                            ),
                        ),
                        ("request_id", models.CharField(max_length=64, unique=True)),
                        (
                            "parts",
                            models.JSONField(default=list, help_text='[[counter name, amount, kind "m"|"q"], ...]'),
                        ),
                        ("expires_at", models.DateTimeField(db_index=True)),
                        (
                            "swept",
                            models.BooleanField(
                                default=False, help_text="Released by the sweeper; a late settle charges actual"
                            ),
                        ),
                        ("settled_at", models.DateTimeField(blank=True, db_index=True, null=True)),
                        ("actual_micro", models.BigIntegerField(default=0)),
                        ("actual_requests", models.PositiveIntegerField(default=0)),
                        ("created_at", models.DateTimeField(default=django.utils.timezone.now)),
                    ],
                    options={
                        "db_table": "tenants_budgetreservation",
                    },
                ),
                migrations.CreateModel(
                    name="Budget",
                    fields=[
                        (
                            "id",
                            models.BigAutoField(
                                auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                            ),
                        ),
                        (
                            "period",
                            models.CharField(
                                choices=[("day", "Day"), ("month", "Month"), ("total", "Total")],
                                default="month",
                                max_length=10,
                            ),
                        ),
                        (
                            "limit_micro",
                            models.PositiveBigIntegerField(help_text="Limit in micro-USD (1 USD = 1,000,000)"),
                        ),
                        (
                            "hard",
                            models.BooleanField(default=True, help_text="Hard: refuse with 402. Soft: alert only."),
                        ),
                        (
                            "alert_thresholds",
                            models.JSONField(
                                blank=True, default=budgets.models._default_thresholds, help_text="Percentages"
                            ),
                        ),
                        ("alert_emails", models.JSONField(blank=True, default=list)),
                        ("webhook_url", models.URLField(blank=True, default="")),
                        ("webhook_secret", models.CharField(blank=True, default="", max_length=200)),
                        ("created_at", models.DateTimeField(default=django.utils.timezone.now)),
                        (
                            "api_key",
                            models.ForeignKey(
                                blank=True,
                                null=True,
                                on_delete=django.db.models.deletion.CASCADE,
                                related_name="budgets",
                                to="tenants.apikey",
                            ),
                        ),
                        (
                            "tenant",
                            models.ForeignKey(
                                blank=True,
                                null=True,
                                on_delete=django.db.models.deletion.CASCADE,
                                related_name="budgets",
                                to="tenants.tenant",
                            ),
                        ),
                    ],
                    options={
                        "db_table": "tenants_budget",
                        "constraints": [
                            models.CheckConstraint(
                                condition=models.Q(
                                    models.Q(("api_key__isnull", True), ("tenant__isnull", False)),
                                    models.Q(("api_key__isnull", False), ("tenant__isnull", True)),
                                    _connector="OR",
                                ),
                                name="budget_exactly_one_scope",
                            ),
                            models.UniqueConstraint(fields=("tenant", "period"), name="budget_unique_tenant_period"),
                            models.UniqueConstraint(fields=("api_key", "period"), name="budget_unique_key_period"),
                        ],
                    },
                ),
                migrations.CreateModel(
                    name="AlertSent",
                    fields=[
                        (
                            "id",
                            models.BigAutoField(
                                auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                            ),
                        ),
                        ("period_key", models.CharField(help_text="2026-11, 2026-11-22 or total", max_length=20)),
                        ("threshold", models.PositiveSmallIntegerField(help_text="Percent of the limit")),
                        ("spend_micro", models.BigIntegerField(help_text="Spend when the threshold was found crossed")),
                        ("limit_micro", models.BigIntegerField()),
                        ("created_at", models.DateTimeField(default=django.utils.timezone.now)),
                        (
                            "notify",
                            models.BooleanField(
                                default=True, help_text="False when a higher threshold crossed at the same time"
                            ),
                        ),
                        ("email_sent_at", models.DateTimeField(blank=True, null=True)),
                        ("webhook_sent_at", models.DateTimeField(blank=True, null=True)),
                        ("attempts", models.PositiveIntegerField(default=0)),
                        ("last_error", models.TextField(blank=True, default="")),
                        (
                            "budget",
                            models.ForeignKey(
                                on_delete=django.db.models.deletion.CASCADE,
                                related_name="alerts_sent",
                                to="budgets.budget",
                            ),
                        ),
                    ],
                    options={
                        "db_table": "gateway_alertsent",
                        "ordering": ["-created_at"],
                        "constraints": [
                            models.UniqueConstraint(
                                fields=("budget", "period_key", "threshold"), name="alert_once_per_period"
                            ),
                        ],
                    },
                ),
            ],
            database_operations=[],
        ),
        migrations.RunPython(adopt_content_types, return_content_types, elidable=True),
    ]
