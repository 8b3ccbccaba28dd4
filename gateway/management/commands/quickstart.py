"""``can quickstart``: a demo tenant, an admin user and a key, printed with copy-pasteable snippets.

In dev mode (``make run``) the admin user gets a known password (``CHITTYCAN_ADMIN_PASSWORD``,
default ``chittycan-admin``). In production there is no default password: the admin user is
created only with ``CHITTYCAN_ADMIN_PASSWORD`` set (and accepted by the password validators);
otherwise quickstart prints the ``createsuperuser`` command to run instead.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser

from gateway import catalog
from gateway.models import Deployment, Experiment, LLMModel, Provider, RoutingPolicy
from tenants import services
from tenants.models import ApiKey, Tenant

DEMO_SLUG = "demo"
DEMO_MODEL = "gpt-4o-mini"  # the model the printed curl asks for; its response cache is turned on
ADMIN_USER = "admin"
DEV_ADMIN_PASSWORD = "chittycan-admin"
#: The roadmap's routing policy, applied in dev mode and attached to the demo tenant (docs/routing.md).
ROUTING_EXAMPLE = Path(settings.BASE_DIR) / "examples" / "routing-policy.yaml"
#: Dev mode: an offline mock deployment of the demo model with active health probes on, so
#: ``can providers status`` and GET /health/providers show probe results (docs/resilience.md).
DEMO_PROBED_PROVIDER = "demo-mock"
#: A routing experiment on the roadmap policy's `default` rule (medium prompts), on the demo tenant.
EXPERIMENT_EXAMPLE = Path(settings.BASE_DIR) / "examples" / "routing-experiment.yaml"


class Command(BaseCommand):
    help = "Create a demo tenant, an admin user and an API key (idempotent), and print how to call the gateway."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--port", type=int, default=int(os.environ.get("CHITTYCAN_PORT", "8080")))
        parser.add_argument("--key-file", default="var/demo-key.txt", help="where the demo key is kept")

    def handle(self, *args: Any, **opts: Any) -> None:
        self.ensure_admin()  # first: a refused password leaves nothing half done
        tenant = Tenant.objects.filter(slug=DEMO_SLUG).first() or services.tenant_create(
            slug=DEMO_SLUG, name="Demo", actor_label="quickstart"
        )
        demo_model = LLMModel.objects.filter(name=DEMO_MODEL).first()
        if demo_model is not None and not demo_model.cache_enabled:
            demo_model.cache_enabled = True  # the README's curl sent twice: MISS, then HIT at $0
            catalog.model_update(demo_model, cache_enabled=True, actor_label="quickstart")
        routing_note = self.apply_routing_example() if settings.CHITTYCAN_MODE == "dev" else ""
        if settings.CHITTYCAN_MODE == "dev" and demo_model is not None:
            self.ensure_probed_deployment(demo_model)
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
        dev_note = (
            "Every model of the catalogue answers from the offline mock (CHITTYCAN_MODE=dev), priced as\n"
            "the real model; an unknown model name is a 404, as in production.\n"
            if settings.CHITTYCAN_MODE == "dev"
            else ""
        )
        self.stdout.write(
            f"""
ChittyCan is ready. Demo tenant key (kept in {key_file}):

  export OPENAI_API_KEY={plaintext}
  export OPENAI_BASE_URL={base}

curl:
  curl {base}/chat/completions \\
    -H "Authorization: Bearer $OPENAI_API_KEY" -H "Content-Type: application/json" \\
    -d '{{"model": "gpt-4o-mini", "messages": [{{"role": "user", "content": "Say hello"}}]}}'

Sent twice, the second answer comes from the response cache (X-ChittyCan-Cache: HIT, cost $0):
  add -i to the curl above to see the X-ChittyCan-Cache and X-ChittyCan-Cost headers.

Follow a request: its X-Request-Id header (curl -i) leads to its tree of stages, upstream
attempts, tokens and cost:
  .venv/bin/can trace <x-request-id>
  curl http://127.0.0.1:{opts["port"]}/api/requests/<x-request-id> -H "Authorization: Bearer $OPENAI_API_KEY"
OpenTelemetry traces go to any OTLP/HTTP back end: OTEL_EXPORTER_OTLP_ENDPOINT=http://host:4318 make run.
The Responses API (stored per tenant; GET {base}/responses/<id> retrieves one):
  curl {base}/responses \\
    -H "Authorization: Bearer $OPENAI_API_KEY" -H "Content-Type: application/json" \\
    -d '{{"model": "gpt-4o-mini", "input": "Say hello"}}'

Images, speech, transcription and moderations (priced per image, character and minute: docs/media.md):
  curl {base}/images/generations \\
    -H "Authorization: Bearer $OPENAI_API_KEY" -H "Content-Type: application/json" \\
    -d '{{"model": "dall-e-3", "prompt": "a lighthouse", "size": "1024x1024", "quality": "standard"}}'
  curl {base}/audio/speech -o hello.wav \\
    -H "Authorization: Bearer $OPENAI_API_KEY" -H "Content-Type: application/json" \\
    -d '{{"model": "tts-1", "voice": "alloy", "input": "Hello there", "response_format": "wav"}}'
  curl {base}/audio/transcriptions \\
    -H "Authorization: Bearer $OPENAI_API_KEY" -F model=whisper-1 -F file=@hello.wav
  curl {base}/moderations \\
    -H "Authorization: Bearer $OPENAI_API_KEY" -H "Content-Type: application/json" \\
    -d '{{"input": "I will kill the process"}}'

Python (pip install openai):
  from openai import OpenAI
  client = OpenAI()  # reads OPENAI_API_KEY and OPENAI_BASE_URL
  reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{{"role": "user", "content": "Say hello"}}])
  print(reply.choices[0].message.content, reply.usage)
  response = client.responses.create(model="gpt-4o-mini", input="Say hello")
  print(response.output_text, client.responses.retrieve(response.id).usage)

{dev_note}{routing_note}Admin: http://127.0.0.1:{opts["port"]}/admin/
Provider health (circuit breakers, probe results): http://127.0.0.1:{opts["port"]}/admin/gateway/provider/
Audit log (every control-plane change, hash-chained): http://127.0.0.1:{opts["port"]}/admin/tenants/auditevent/
  .venv/bin/can audit verify      .venv/bin/can audit export --since 2026-01-01 --format jsonl
Tenant dashboard (spend, keys, budgets, usage, live feed of the demo tenant; sign in as {ADMIN_USER}):
  http://127.0.0.1:{opts["port"]}/dashboard/t/{DEMO_SLUG}/
"""
        )

    def apply_routing_example(self) -> str:
        """Dev mode: the roadmap's routing policy (examples/routing-policy.yaml) on the demo tenant."""
        if not ROUTING_EXAMPLE.exists():
            return ""
        if not RoutingPolicy.objects.filter(name="roadmap").exists():  # once: later edits are the operator's
            call_command("apply", "-f", str(ROUTING_EXAMPLE), stdout=io.StringIO())
        note = (
            "Routing policy `roadmap` (examples/routing-policy.yaml) is on the demo tenant: a short prompt\n"
            "matches rule=cheap_for_simple, a long one (over 500 tokens) smart_for_complex; see the\n"
            "X-ChittyCan-Route header (curl -i) and `can route explain --key $OPENAI_API_KEY -f request.json`.\n\n"
        )
        if EXPERIMENT_EXAMPLE.exists() and RoutingPolicy.objects.filter(name="roadmap").exists():
            if not Experiment.objects.filter(slug="default-model-ab").exists():  # once, as the policy
                call_command("apply", "-f", str(EXPERIMENT_EXAMPLE), stdout=io.StringIO())
            note += (
                "Experiment `default-model-ab` (examples/routing-experiment.yaml) splits medium prompts (rule\n"
                "default) between two models: see X-ChittyCan-Experiment, score answers with POST /v1/feedback,\n"
                "compare the arms with `can experiments show default-model-ab`.\n\n"
            )
        return note

    def ensure_probed_deployment(self, model: LLMModel) -> None:
        """Dev mode: the demo model gets a deployment on the offline mock provider, probed every 10 s
        by the embedded scheduler (no tokens are spent: the mock answers)."""
        provider = Provider.objects.filter(slug=DEMO_PROBED_PROVIDER).first() or catalog.provider_create(
            slug=DEMO_PROBED_PROVIDER,
            kind=Provider.Kind.MOCK,
            base_url="",
            probe_enabled=True,
            probe_interval=10.0,
            actor_label="quickstart",
        )
        if not Deployment.objects.filter(model=model, provider=provider).exists():
            catalog.deployment_create(
                model=model, provider=provider, upstream_model=model.name, priority=100, actor_label="quickstart"
            )

    def ensure_admin(self) -> None:
        """The ``admin`` superuser: a known password in dev mode only; in production one the
        operator chose (``CHITTYCAN_ADMIN_PASSWORD``), or none and the command to make it."""
        user_model = get_user_model()
        if user_model.objects.filter(username=ADMIN_USER).exists():
            return
        password = os.environ.get("CHITTYCAN_ADMIN_PASSWORD", "")
        if settings.CHITTYCAN_MODE == "dev":
            password = password or DEV_ADMIN_PASSWORD
            user_model.objects.create_superuser(ADMIN_USER, "admin@localhost", password)
            self.stdout.write(
                f"admin user: {ADMIN_USER} / {password}  (dev mode; change it: can changepassword {ADMIN_USER})"
            )
            return
        if not password:
            self.stdout.write(
                "No admin user was created: production has no default password. Create one with\n"
                f"  can createsuperuser --username {ADMIN_USER}\n"
                "(or run quickstart again with CHITTYCAN_ADMIN_PASSWORD set). Signing in to the admin also\n"
                "asks for a TOTP second factor (see docs/deployment.md)."
            )
            return
        user = user_model(username=ADMIN_USER, email="admin@localhost")
        try:
            validate_password(password, user)
        except ValidationError as exc:
            raise CommandError("CHITTYCAN_ADMIN_PASSWORD is refused: " + " ".join(exc.messages)) from exc
        user_model.objects.create_superuser(ADMIN_USER, "admin@localhost", password)
        self.stdout.write(
            f"admin user: {ADMIN_USER}, with the password from CHITTYCAN_ADMIN_PASSWORD. Signing in to the admin"
            " also asks for a TOTP second factor (see docs/deployment.md)."
        )
