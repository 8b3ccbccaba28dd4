# Budget, BudgetCounter and BudgetReservation move to the budgets app
# (budgets/migrations/0001_initial.py). State only: the tables keep their names and their rows.

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("tenants", "0003_reservation_settlement"),
        # AlertSent (gateway) points at Budget: it leaves the state first.
        ("gateway", "0005_move_alertsent_to_budgets"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.DeleteModel(name="BudgetCounter"),
                migrations.DeleteModel(name="BudgetReservation"),
                migrations.DeleteModel(name="Budget"),
            ],
            database_operations=[],
        ),
    ]
