"""``can cache invalidate|stats``: entries of the exact response cache (docs/caching.md), chosen
as ``POST /v1/cache/invalidate`` chooses them (one tenant's or every tenant's; a model, a cache-key
prefix, a glob over the prompt)."""

from __future__ import annotations

import asyncio
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from gateway import cache
from tenants.models import Tenant


class Command(BaseCommand):
    help = "Count or drop cached answers (a tenant's or all; optionally one model's, by key prefix or prompt glob)."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="{invalidate,stats}")
        for name, text in (("invalidate", "drop cached answers"), ("stats", "count them")):
            action = sub.add_parser(name, help=text)
            whose = action.add_mutually_exclusive_group(required=True)
            whose.add_argument("--tenant", metavar="SLUG", help="one tenant's entries")
            whose.add_argument("--all-tenants", action="store_true", help="every tenant's (and shared) entries")
            action.add_argument("--model", metavar="NAME", default=None, help="one public model (default: all)")
            action.add_argument("--key-prefix", metavar="HEX", default="", help="cache keys starting with this")
            action.add_argument("--pattern", metavar="GLOB", default=None, help="prompts matching this glob")

    def handle(self, *args: Any, **opts: Any) -> None:
        if not cache.shared():
            raise CommandError(
                "without REDIS_URL the response cache lives inside the gateway process: use"
                " POST /v1/cache/invalidate with a key of the tenant (docs/caching.md)"
            )
        tenant_ids: tuple[int, ...] | None = None
        whose = "every tenant"
        if opts["tenant"]:
            tenant = Tenant.objects.filter(slug=opts["tenant"]).first()
            if tenant is None:
                raise CommandError(f"--tenant: no tenant {opts['tenant']!r}")
            tenant_ids, whose = (tenant.pk,), f"tenant {tenant.slug}"
        prefix: str = opts["key_prefix"]
        if len(prefix) > 64 or not set(prefix) <= set("0123456789abcdef"):
            raise CommandError("--key-prefix: lowercase hex, at most 64 characters")
        model: str | None = opts["model"]
        chosen = cache.Selection(tenant_ids, model, prefix, opts["pattern"])
        what = ", ".join(
            part
            for part in (
                f"model {model}" if model else "all models",
                f"key prefix {prefix}" if prefix else "",
                f"prompt matching {opts['pattern']!r}" if opts["pattern"] else "",
            )
            if part
        )
        if opts["action"] == "invalidate":
            count = asyncio.run(cache.invalidate(chosen))
            self.stdout.write(f"{count} cached answers dropped for {whose} ({what})")
        else:
            count = asyncio.run(cache.stats(chosen))
            self.stdout.write(f"{count} cached answers for {whose} ({what})")
