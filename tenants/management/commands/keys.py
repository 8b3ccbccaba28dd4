"""``can keys create|list|revoke|rotate``: API keys from the terminal. A key is printed once, never again."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from core import invalidation
from tenants import keys, services
from tenants.management.commands._cli import format_scopes, parse_expires, parse_scopes, table
from tenants.models import ApiKey, Tenant

ACTOR = "cli"


def key_status(api_key: ApiKey) -> str:
    if api_key.revoked_at is not None:
        return "rotated" if hasattr(api_key, "rotated_to") else "revoked"
    if api_key.expires_at is not None and api_key.expires_at <= timezone.now():
        return "expired"
    if not api_key.tenant.is_active:
        return "tenant inactive"
    return "active"


def find_key(text: str) -> ApiKey:
    """A key by its public prefix (``chitty_XXXXXXXX``), its 8-character id, or the whole key."""
    text = text.strip()
    if not text.startswith(keys.KEY_PREFIX):
        text = keys.KEY_PREFIX + text
    prefix = keys.key_prefix(text)
    api_key = ApiKey.objects.select_related("tenant").filter(prefix=prefix).first()
    if api_key is None:
        raise CommandError(f"no API key with prefix {prefix}")
    return api_key


class Command(BaseCommand):
    help = "Create, list, revoke and rotate API keys. New keys are printed once and never stored in plaintext."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="{create,list,revoke,rotate}")
        create = sub.add_parser("create", help="issue a key to a tenant and print it once")
        create.add_argument("--tenant", required=True, metavar="SLUG")
        create.add_argument("--name", default="")
        create.add_argument(
            "--scopes",
            default="",
            help="e.g. 'models=gpt-4o,gpt-4o-mini;endpoints=chat' (default: every model and endpoint)",
        )
        create.add_argument(
            "--expires", default="", help="30d, 12h, 2w, or a date (midnight in the tenant's time zone)"
        )
        create.add_argument("--rpm", type=int, default=None, help="requests per minute for this key")
        create.add_argument("--tpm", type=int, default=None, help="tokens per minute for this key")
        listing = sub.add_parser("list", help="list keys (never secrets)")
        listing.add_argument("--tenant", metavar="SLUG", default="")
        listing.add_argument("--all", action="store_true", help="include revoked and expired keys")
        revoke = sub.add_parser("revoke", help="revoke a key now")
        revoke.add_argument("prefix", metavar="PREFIX")
        rotate = sub.add_parser("rotate", help="issue a replacement (same settings), revoke the old key")
        rotate.add_argument("prefix", metavar="PREFIX")

    def handle(self, *args: Any, **opts: Any) -> None:
        getattr(self, f"_{opts['action']}")(opts)

    def _tenant(self, slug: str) -> Tenant:
        tenant = Tenant.objects.filter(slug=slug).first()
        if tenant is None:
            raise CommandError(f"no tenant {slug!r} (see `can tenants list`)")
        return tenant

    def _create(self, opts: dict[str, Any]) -> None:
        tenant = self._tenant(opts["tenant"])
        if not tenant.is_active:
            raise CommandError(f"tenant {tenant.slug} is inactive")
        scopes = parse_scopes(opts["scopes"]) if opts["scopes"] else {}
        expires_at = parse_expires(opts["expires"], tz=tenant.time_zone) if opts["expires"] else None
        for flag in ("rpm", "tpm"):
            if opts[flag] is not None and opts[flag] <= 0:
                raise CommandError(f"--{flag} must be a positive integer")
        api_key, plaintext = services.key_issue(
            tenant=tenant,
            name=opts["name"],
            scopes=scopes,
            expires_at=expires_at,
            rpm_limit=opts["rpm"],
            tpm_limit=opts["tpm"],
            actor_label=ACTOR,
        )
        self._print_new(api_key, plaintext)

    def _print_new(self, api_key: ApiKey, plaintext: str) -> None:
        expiry = api_key.expires_at.isoformat() if api_key.expires_at else "never"
        self.stderr.write(
            f"Key {api_key.prefix} for tenant {api_key.tenant.slug} "
            f"(scopes: {format_scopes(api_key.scopes)}; expires: {expiry}).\n"
            "Copy it now: it is shown once and cannot be recovered."
        )
        self.stdout.write(plaintext)

    def _list(self, opts: dict[str, Any]) -> None:
        qs = ApiKey.objects.select_related("tenant", "rotated_to").order_by("tenant__slug", "created_at")
        if opts["tenant"]:
            qs = qs.filter(tenant=self._tenant(opts["tenant"]))
        rows = []
        for api_key in qs:
            status = key_status(api_key)
            if status != "active" and not opts["all"]:
                continue
            rows.append(
                [
                    api_key.prefix,
                    api_key.name,
                    api_key.tenant.slug,
                    format_scopes(api_key.scopes),
                    status,
                    api_key.expires_at.strftime("%Y-%m-%d %H:%M %Z") if api_key.expires_at else "never",
                ]
            )
        if not rows:
            self.stderr.write("no keys" + ("" if opts["all"] else " (--all includes revoked and expired keys)"))
            return
        self.stdout.write(table(rows, ["PREFIX", "NAME", "TENANT", "SCOPES", "STATUS", "EXPIRES"]))

    def _revoke(self, opts: dict[str, Any]) -> None:
        api_key = find_key(opts["prefix"])
        if api_key.revoked_at is not None:
            self.stdout.write(f"{api_key.prefix} was already revoked at {api_key.revoked_at:%Y-%m-%d %H:%M %Z}")
            return
        services.key_revoke(api_key=api_key, actor_label=ACTOR)
        self.stdout.write(f"revoked {api_key.prefix} ({api_key.tenant.slug}): refused {invalidation.takes_effect()}")

    def _rotate(self, opts: dict[str, Any]) -> None:
        api_key = find_key(opts["prefix"])
        if api_key.revoked_at is not None:
            raise CommandError(f"{api_key.prefix} is revoked; issue a new key with `can keys create` instead")
        new_key, plaintext = services.key_rotate(api_key=api_key, actor_label=ACTOR)
        self.stderr.write(
            f"{api_key.prefix} is revoked (refused {invalidation.takes_effect()}); its replacement is {new_key.prefix}."
        )
        self._print_new(new_key, plaintext)
