"""The usage ledger and its rollups move to the ledger app (``ledger.0001_initial``).

The tables stay where they are, with their rows, under the same names: only Django's state
changes. Their content types are relabelled too, so permissions granted on them and admin history
follow the models.
"""

from django.db import migrations

MODELS = ("usagerecord", "hourlyusage", "dailyusage", "rolluphour", "rollupcursor")


def _relabel(apps, schema_editor, old: str, new: str) -> None:
    content_type = apps.get_model("contenttypes", "ContentType")
    rows = content_type.objects.using(schema_editor.connection.alias)
    for model in MODELS:
        if not rows.filter(app_label=new, model=model).exists():
            rows.filter(app_label=old, model=model).update(app_label=new)


def forwards(apps, schema_editor) -> None:
    _relabel(apps, schema_editor, "gateway", "ledger")


def backwards(apps, schema_editor) -> None:
    _relabel(apps, schema_editor, "ledger", "gateway")


class Migration(migrations.Migration):
    # After 0005 (AlertSent's move to budgets, which came first), so the gateway's history stays
    # one line; the number is the one this move was planned under.
    dependencies = [
        ("contenttypes", "0002_remove_content_type_name"),
        ("gateway", "0005_move_alertsent_to_budgets"),
        ("ledger", "0001_initial"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[],
            state_operations=[
                migrations.DeleteModel(name="UsageRecord"),
                migrations.DeleteModel(name="HourlyUsage"),
                migrations.DeleteModel(name="DailyUsage"),
                migrations.DeleteModel(name="RollupHour"),
                migrations.DeleteModel(name="RollupCursor"),
            ],
        ),
        migrations.RunPython(forwards, backwards),
    ]
