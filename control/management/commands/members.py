"""``can members add --user NAME --tenant SLUG [--role owner|admin|member|viewer]``, ``list``,
``remove``: who may use the management API and the dashboard for which tenant subtree."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from control import members
from control.models import TenantMembership
from tenants.models import Tenant


class Command(BaseCommand):
    help = "Tenant memberships for the management API."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="{add,list,remove}")
        add = sub.add_parser("add", help="give a user a role on a tenant (covers its subtree)")
        add.add_argument("--user", required=True)
        add.add_argument("--tenant", required=True)
        add.add_argument("--role", choices=TenantMembership.Role.values, default=TenantMembership.Role.MEMBER)
        listing = sub.add_parser("list")
        listing.add_argument("--tenant")
        remove = sub.add_parser("remove")
        remove.add_argument("--user", required=True)
        remove.add_argument("--tenant", required=True)

    def _lookup(self, username: str, slug: str) -> tuple[Any, Tenant]:
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"no user {username!r}")
        tenant = Tenant.objects.filter(slug=slug).first()
        if tenant is None:
            raise CommandError(f"no tenant {slug!r}")
        return user, tenant

    def handle(self, *args: Any, **options: Any) -> None:
        action = options["action"]
        if action == "list":
            rows = TenantMembership.objects.select_related("user", "tenant").order_by("tenant__slug", "user__username")
            if options.get("tenant"):
                rows = rows.filter(tenant__slug=options["tenant"])
            for m in rows:
                self.stdout.write(f"{m.tenant.slug:<30} {m.user.get_username():<20} {m.role}")
            return
        user, tenant = self._lookup(options["user"], options["tenant"])
        if action == "add":
            members.member_set(user=user, tenant=tenant, role=options["role"], actor_label="cli")
            self.stdout.write(f"{user.get_username()} is {options['role']} of {tenant.slug}")
        else:
            if not members.member_remove(user=user, tenant=tenant, actor_label="cli"):
                raise CommandError(f"{user.get_username()} has no membership on {tenant.slug}")
            self.stdout.write(f"removed {user.get_username()} from {tenant.slug}")
