# Joins the media routes' migrations with the work merged before them.

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("gateway", "0010_default_media_models"),
        ("gateway", "0011_least_in_flight"),
    ]

    operations = []
