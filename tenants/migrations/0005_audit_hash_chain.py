# The tamper-evident audit log: origin fields, the hash chain (seq, prev_hash, hash) and the chain's
# bookkeeping row. Rows written before the chain existed are numbered in time order and hashed here,
# with the same code the writer and `can audit verify` use (tenants/auditchain.py).

from typing import Any

from django.contrib.auth import get_user_model
from django.db import migrations, models

from tenants.auditchain import GENESIS, row_hash


def chain_existing_rows(apps: Any, schema_editor: Any) -> None:
    AuditEvent = apps.get_model("tenants", "AuditEvent")
    AuditChain = apps.get_model("tenants", "AuditChain")
    alias = schema_editor.connection.alias
    username_field = get_user_model().USERNAME_FIELD  # historical models have no get_username()
    prev, seq = GENESIS, 0
    for row in AuditEvent.objects.using(alias).select_related("actor").order_by("at", "id").iterator():
        seq += 1
        row.seq = seq
        row.actor_name = str(getattr(row.actor, username_field)) if row.actor is not None else ""
        row.origin = (row.actor_label or "").split(":", 1)[0][:20]
        row.prev_hash = prev
        row.hash = row_hash(row)
        row.save(update_fields=["seq", "actor_name", "origin", "prev_hash", "hash"])
        prev = row.hash
    AuditChain.objects.using(alias).update_or_create(
        pk=1, defaults={"head_seq": seq, "head_hash": prev, "anchor_seq": 0, "anchor_hash": GENESIS}
    )


class Migration(migrations.Migration):
    dependencies = [
        ("tenants", "0004_move_budgets_out"),
    ]

    operations = [
        migrations.CreateModel(
            name="AuditChain",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("head_seq", models.PositiveBigIntegerField(default=0)),
                ("head_hash", models.CharField(max_length=64)),
                ("anchor_seq", models.PositiveBigIntegerField(default=0)),
                ("anchor_hash", models.CharField(max_length=64)),
            ],
        ),
        migrations.AddField(
            model_name="auditevent",
            name="actor_name",
            field=models.CharField(blank=True, default="", help_text="the actor's username then", max_length=150),
        ),
        migrations.AddField(
            model_name="auditevent",
            name="origin",
            field=models.CharField(
                blank=True, default="", help_text="admin, api, dashboard, cli, task, http, or empty", max_length=20
            ),
        ),
        migrations.AddField(
            model_name="auditevent",
            name="address",
            field=models.CharField(blank=True, default="", help_text="client address, or the host", max_length=255),
        ),
        migrations.AddField(
            model_name="auditevent",
            name="user_agent",
            field=models.CharField(blank=True, default="", help_text="user agent, or the command", max_length=300),
        ),
        migrations.AddField(
            model_name="auditevent",
            name="os_user",
            field=models.CharField(blank=True, default="", help_text="operating-system user (CLI)", max_length=100),
        ),
        migrations.AddField(
            model_name="auditevent",
            name="seq",
            field=models.PositiveBigIntegerField(editable=False, null=True),
        ),
        migrations.AddField(
            model_name="auditevent",
            name="prev_hash",
            field=models.CharField(default="", editable=False, max_length=64),
            preserve_default=False,
        ),
        migrations.AddField(
            model_name="auditevent",
            name="hash",
            field=models.CharField(default="", editable=False, max_length=64),
            preserve_default=False,
        ),
        migrations.RunPython(chain_existing_rows, migrations.RunPython.noop),
        migrations.AlterField(
            model_name="auditevent",
            name="seq",
            field=models.PositiveBigIntegerField(editable=False, unique=True),
        ),
    ]
