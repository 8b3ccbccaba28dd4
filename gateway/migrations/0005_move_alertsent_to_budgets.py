# AlertSent moves to the budgets app (budgets/migrations/0001_initial.py). State only: the table
# keeps its name (gateway_alertsent) and its rows.

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("gateway", "0003_usage_rollups_alerts"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.DeleteModel(name="AlertSent"),
            ],
            database_operations=[],
        ),
    ]
