"""``can apitoken create --user NAME [--name LABEL]`` prints a management API token once;
``can apitoken list [--user NAME]``; ``can apitoken revoke PREFIX``."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from control import tokens
from control.models import ManagementToken


class Command(BaseCommand):
    help = "Tokens for the management REST API (/api/)."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="{create,list,revoke}")
        create = sub.add_parser("create", help="create a token for a user; printed once")
        create.add_argument("--user", required=True, help="username")
        create.add_argument("--name", default="", help="a label, e.g. ci or terraform")
        listing = sub.add_parser("list", help="list tokens (prefixes only)")
        listing.add_argument("--user", help="only this user's tokens")
        revoke = sub.add_parser("revoke", help="revoke a token by its prefix")
        revoke.add_argument("prefix")

    def handle(self, *args: Any, **options: Any) -> None:
        action = options["action"]
        if action == "create":
            user = get_user_model().objects.filter(username=options["user"]).first()
            if user is None:
                raise CommandError(f"no user {options['user']!r} (create one with `can createsuperuser` or the admin)")
            _, plaintext = tokens.token_create(user=user, name=options["name"])
            self.stdout.write(plaintext)
            self.stderr.write("Store it now: it is not shown again.")
        elif action == "list":
            rows = ManagementToken.objects.select_related("user").order_by("user__username", "-created_at")
            if options.get("user"):
                rows = rows.filter(user__username=options["user"])
            for t in rows:
                state = "revoked" if t.revoked_at else "active"
                used = f"{t.last_used_at:%Y-%m-%d %H:%M}" if t.last_used_at else "never"
                self.stdout.write(f"{t.prefix}  {t.user.get_username():<20} {state:<8} used {used}  {t.name}")
        else:
            token = ManagementToken.objects.filter(prefix=options["prefix"]).first()
            if token is None:
                raise CommandError(f"no token with prefix {options['prefix']!r}")
            tokens.token_revoke(token=token)
            self.stdout.write(f"revoked {token.prefix}")
