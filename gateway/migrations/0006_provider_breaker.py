# Circuit breaker settings per provider (gateway.routing.breaker, docs/resilience.md).

import django.core.validators
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("gateway", "0004_move_usage_to_ledger"),
    ]

    operations = [
        migrations.AddField(
            model_name="provider",
            name="breaker_cooldown",
            field=models.FloatField(
                default=30.0,
                help_text="Seconds an open breaker skips the deployment before one probe request",
                validators=[
                    django.core.validators.MinValueValidator(0.1),
                    django.core.validators.MaxValueValidator(3600.0),
                ],
            ),
        ),
        migrations.AddField(
            model_name="provider",
            name="breaker_error_rate",
            field=models.FloatField(
                default=0.5,
                help_text="Or this share of failed requests (0.01 to 1) ...",
                validators=[
                    django.core.validators.MinValueValidator(0.01),
                    django.core.validators.MaxValueValidator(1.0),
                ],
            ),
        ),
        migrations.AddField(
            model_name="provider",
            name="breaker_failures",
            field=models.PositiveSmallIntegerField(
                default=5,
                help_text="Consecutive failures that open the breaker",
                validators=[django.core.validators.MinValueValidator(1)],
            ),
        ),
        migrations.AddField(
            model_name="provider",
            name="breaker_min_requests",
            field=models.PositiveIntegerField(
                default=20,
                help_text="... among at least this many requests ...",
                validators=[django.core.validators.MinValueValidator(1)],
            ),
        ),
        migrations.AddField(
            model_name="provider",
            name="breaker_window",
            field=models.FloatField(
                default=30.0,
                help_text="... in this many seconds (per gateway process)",
                validators=[
                    django.core.validators.MinValueValidator(1.0),
                    django.core.validators.MaxValueValidator(3600.0),
                ],
            ),
        ),
    ]
