"""``can cache invalidate|stats``: a tenant's entries in the exact response cache (docs/caching.md)."""

from __future__ import annotations

import asyncio
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from gateway import cache
from tenants.models import Tenant


class Command(BaseCommand):
    help = "Count or drop a tenant's cached answers (all of them, or one public model's)."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="{invalidate,stats}")
        for name, text in (("invalidate", "drop the tenant's cached answers"), ("stats", "count them")):
            action = sub.add_parser(name, help=text)
            action.add_argument("--tenant", metavar="SLUG", required=True)
            action.add_argument("--model", metavar="NAME", default=None, help="one public model (default: all)")

    def handle(self, *args: Any, **opts: Any) -> None:
        if not cache.shared():
            raise CommandError(
                "without REDIS_URL the response cache lives inside the gateway process: use"
                " POST /v1/cache/invalidate with a key of the tenant (docs/caching.md)"
            )
        tenant = Tenant.objects.filter(slug=opts["tenant"]).first()
        if tenant is None:
            raise CommandError(f"--tenant: no tenant {opts['tenant']!r}")
        model: str | None = opts["model"]
        what = f"model {model}" if model else "all models"
        if opts["action"] == "invalidate":
            count = asyncio.run(cache.invalidate(tenant.pk, model))
            self.stdout.write(f"{count} cached answers dropped for tenant {tenant.slug} ({what})")
        else:
            count = asyncio.run(cache.stats(tenant.pk, model))
            self.stdout.write(f"{count} cached answers for tenant {tenant.slug} ({what})")
