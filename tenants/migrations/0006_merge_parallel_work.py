# Joins the migrations of work done in parallel (routing, resilience, cache, tracing, Responses API, dashboard, audit).

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("tenants", "0005_audit_hash_chain"),
        ("tenants", "0005_cache_enablement_scope"),
        ("tenants", "0005_tenant_require_otp"),
    ]

    operations = []
