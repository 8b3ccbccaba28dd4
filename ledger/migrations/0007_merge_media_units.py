# Joins the media routes' migrations with the work merged before them.

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("ledger", "0004_usage_media_units"),
        ("ledger", "0006_merge_parallel_work"),
    ]

    operations = []
