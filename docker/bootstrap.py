"""CI bootstrap for a dev-mode gateway container: make sure a known API key exists.

A CI job cannot read a key the container printed, so the job brings its own: generate one once,
store it as a CI secret, and pass it to the service container as ``CHITTYCAN_BOOTSTRAP_KEY``; the
entrypoint then registers it (idempotently) for the tenant ``CHITTYCAN_BOOTSTRAP_TENANT``
(default ``ci``). Only the key's HMAC is stored, as for every other key.

    docker run --rm chittycan python docker/bootstrap.py generate   # prints a fresh chitty_ key
    CHITTYCAN_BOOTSTRAP_KEY=chitty_... python docker/bootstrap.py ensure
"""

from __future__ import annotations

import os
import sys


def generate() -> None:
    from tenants import keys

    print(keys.generate_key())


def ensure() -> None:
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chittycan.settings")
    django.setup()
    from django.db import transaction

    from tenants import keys, services
    from tenants.models import Tenant

    plaintext = os.environ["CHITTYCAN_BOOTSTRAP_KEY"].strip()
    if not keys.looks_valid(plaintext):
        sys.exit("CHITTYCAN_BOOTSTRAP_KEY is not a chitty_ key (generate one: python docker/bootstrap.py generate)")
    slug = os.environ.get("CHITTYCAN_BOOTSTRAP_TENANT", "ci")
    with transaction.atomic():
        tenant = Tenant.objects.filter(slug=slug).first() or services.tenant_create(
            slug=slug, name=slug, actor_label="bootstrap"
        )
        api_key = services.key_register(tenant=tenant, plaintext=plaintext, name="bootstrap", actor_label="bootstrap")
    print(f"bootstrap: key {api_key.prefix}... ready for tenant {slug}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "generate":
        generate()
    elif command == "ensure":
        ensure()
    else:
        sys.exit(__doc__)
