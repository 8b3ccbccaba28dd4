"""Rollup rows are unique per bucket, tenant, key (or no key), model and provider on every database.

The constraints used ``nulls_distinct=False``, which SQLite cannot create (Django skipped them
there, warning models.W047). Two partial unique constraints, one for rows with a key and one for
rows without, mean the same and work on PostgreSQL and SQLite alike.
"""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("ledger", "0001_initial"),
    ]

    operations = [
        migrations.RemoveConstraint(
            model_name="dailyusage",
            name="daily_usage_unique",
        ),
        migrations.RemoveConstraint(
            model_name="hourlyusage",
            name="hourly_usage_unique",
        ),
        migrations.AddConstraint(
            model_name="dailyusage",
            constraint=models.UniqueConstraint(
                condition=models.Q(("api_key__isnull", False)),
                fields=("date", "tenant", "api_key", "model", "provider"),
                name="daily_usage_unique",
            ),
        ),
        migrations.AddConstraint(
            model_name="dailyusage",
            constraint=models.UniqueConstraint(
                condition=models.Q(("api_key__isnull", True)),
                fields=("date", "tenant", "model", "provider"),
                name="daily_usage_unique_keyless",
            ),
        ),
        migrations.AddConstraint(
            model_name="hourlyusage",
            constraint=models.UniqueConstraint(
                condition=models.Q(("api_key__isnull", False)),
                fields=("hour", "tenant", "api_key", "model", "provider"),
                name="hourly_usage_unique",
            ),
        ),
        migrations.AddConstraint(
            model_name="hourlyusage",
            constraint=models.UniqueConstraint(
                condition=models.Q(("api_key__isnull", True)),
                fields=("hour", "tenant", "model", "provider"),
                name="hourly_usage_unique_keyless",
            ),
        ),
    ]
