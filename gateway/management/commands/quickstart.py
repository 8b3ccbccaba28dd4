"""``can quickstart``: a demo tenant, an admin user and a key, printed with copy-pasteable snippets."""

from __future__ import annotations

import os
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandParser

from tenants import services
from tenants.models import ApiKey, Tenant

DEMO_SLUG = "demo"


class Command(BaseCommand):
    help = "Create a demo tenant, an admin user and an API key (idempotent), and print how to call the gateway."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--port", type=int, default=int(os.environ.get("CHITTYCAN_PORT", "8080")))
        parser.add_argument("--key-file", default="var/demo-key.txt", help="where the demo key is kept")

    def handle(self, *args: Any, **opts: Any) -> None:
        tenant = Tenant.objects.filter(slug=DEMO_SLUG).first() or services.tenant_create(
            slug=DEMO_SLUG, name="Demo", actor_label="quickstart"
        )
        user_model = get_user_model()
        password = os.environ.get("CHITTYCAN_ADMIN_PASSWORD", "chittycan-admin")
        if not user_model.objects.filter(username="admin").exists():
            user_model.objects.create_superuser("admin", "admin@localhost", password)
            self.stdout.write(f"admin user: admin / {password}  (change it: manage.py changepassword admin)")
        key_file = opts["key_file"]
        plaintext = ""
        if os.path.exists(key_file):
            with open(key_file, encoding="utf-8") as fh:
                plaintext = fh.read().strip()
            if not ApiKey.objects.usable().filter(tenant=tenant, prefix=plaintext[:15]).exists():
                plaintext = ""
        if not plaintext:
            _, plaintext = services.key_issue(tenant=tenant, name="quickstart", actor_label="quickstart")
            os.makedirs(os.path.dirname(key_file) or ".", exist_ok=True)
            with open(key_file, "w", encoding="utf-8") as fh:
                fh.write(plaintext + "\n")
            os.chmod(key_file, 0o600)
        base = f"http://127.0.0.1:{opts['port']}/v1"
        self.stdout.write(
            f"""
ChittyCan is ready. Demo tenant key (kept in {key_file}):

  export OPENAI_API_KEY={plaintext}
  export OPENAI_BASE_URL={base}

curl:
  curl {base}/chat/completions \\
    -H "Authorization: Bearer $OPENAI_API_KEY" -H "Content-Type: application/json" \\
    -d '{{"model": "gpt-4o-mini", "messages": [{{"role": "user", "content": "Say hello"}}]}}'

Python (pip install openai):
  from openai import OpenAI
  client = OpenAI()  # reads OPENAI_API_KEY and OPENAI_BASE_URL
  reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{{"role": "user", "content": "Say hello"}}])
  print(reply.choices[0].message.content, reply.usage)

Every model answers from the offline mock (CHITTYCAN_MODE=dev), priced as the real model.
Admin: http://127.0.0.1:{opts["port"]}/admin/
"""
        )
