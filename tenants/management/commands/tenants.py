"""``can tenants create|list``: the tenant tree from the terminal."""

from __future__ import annotations

import zoneinfo
from collections import defaultdict
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import Count, Q

from tenants import services
from tenants.models import Plan, Tenant

ACTOR = "cli"


def _validation_message(exc: ValidationError) -> str:
    if hasattr(exc, "error_dict"):
        return "; ".join(f"{field}: {' '.join(msgs)}" for field, msgs in exc.message_dict.items())
    return " ".join(exc.messages)


class Command(BaseCommand):
    help = "Create tenants and show the tenant tree."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="{create,list}")
        create = sub.add_parser("create", help="create a tenant (an organisation, a team or a project)")
        create.add_argument("slug", metavar="SLUG")
        create.add_argument("--name", default="")
        create.add_argument("--parent", metavar="SLUG", default="")
        create.add_argument(
            "--kind",
            choices=Tenant.Kind.values,
            default=None,
            help="default: organisation at the top, team under an organisation, project under a team",
        )
        create.add_argument("--plan", metavar="SLUG", default="")
        create.add_argument("--time-zone", default="", help="IANA name, e.g. Europe/Berlin (default: the parent's)")
        create.add_argument("--stripe-customer", default="", metavar="CUSTOMER_ID")
        listing = sub.add_parser("list", help="show the tenant tree")
        listing.add_argument("--inactive", action="store_true", help="include inactive tenants")

    def handle(self, *args: Any, **opts: Any) -> None:
        getattr(self, f"_{opts['action']}")(opts)

    def _create(self, opts: dict[str, Any]) -> None:
        slug = opts["slug"]
        if Tenant.objects.filter(slug=slug).exists():
            raise CommandError(f"tenant {slug!r} already exists")
        parent = None
        if opts["parent"]:
            parent = Tenant.objects.filter(slug=opts["parent"]).first()
            if parent is None:
                raise CommandError(f"--parent: no tenant {opts['parent']!r}")
        plan = None
        if opts["plan"]:
            plan = Plan.objects.filter(slug=opts["plan"]).first()
            if plan is None:
                known = ", ".join(Plan.objects.values_list("slug", flat=True)) or "none yet"
                raise CommandError(f"--plan: no plan {opts['plan']!r} (known: {known})")
        time_zone = opts["time_zone"] or (parent.time_zone if parent else "UTC")
        if time_zone not in zoneinfo.available_timezones():
            raise CommandError(f"--time-zone: {time_zone!r} is not an IANA time zone (e.g. Europe/Berlin)")
        kind = opts["kind"] or _default_kind(parent)
        try:
            tenant = services.tenant_create(
                slug=slug,
                name=opts["name"],
                parent=parent,
                kind=kind,
                plan=plan,
                time_zone=time_zone,
                stripe_customer_id=opts["stripe_customer"],
                actor_label=ACTOR,
            )
        except ValidationError as exc:
            raise CommandError(_validation_message(exc)) from None
        where = f" under {parent.slug}" if parent else ""
        self.stdout.write(f"created {tenant.kind} {tenant.slug}{where} ({tenant.time_zone})")

    def _list(self, opts: dict[str, Any]) -> None:
        qs = Tenant.objects.select_related("plan").annotate(
            keys=Count("api_keys", filter=Q(api_keys__revoked_at__isnull=True))
        )
        tenants = list(qs.order_by("slug"))
        if not tenants:
            self.stderr.write("no tenants yet: `can tenants create SLUG`")
            return
        children: dict[int | None, list[Tenant]] = defaultdict(list)
        ids = {t.pk for t in tenants}
        for tenant in tenants:
            children[tenant.parent_id if tenant.parent_id in ids else None].append(tenant)
        lines: list[str] = []

        def walk(node: Tenant, lead: str, branch: str) -> None:
            lines.append(f"{branch}{_describe(node)}")
            kids = [k for k in children.get(node.pk, []) if opts["inactive"] or k.is_active]
            for i, kid in enumerate(kids):
                last = i == len(kids) - 1
                walk(kid, lead + ("    " if last else "│   "), lead + ("└── " if last else "├── "))

        for root in children[None]:
            if opts["inactive"] or root.is_active:
                walk(root, "", "")
        self.stdout.write("\n".join(lines))


def _default_kind(parent: Tenant | None) -> str:
    if parent is None:
        return Tenant.Kind.ORGANISATION
    if parent.kind == Tenant.Kind.ORGANISATION:
        return Tenant.Kind.TEAM
    return Tenant.Kind.PROJECT


def _describe(tenant: Any) -> str:
    bits = [tenant.slug, f"({tenant.kind})"]
    if tenant.name and tenant.name != tenant.slug:
        bits.append(f'"{tenant.name}"')
    if tenant.plan_id:
        bits.append(f"plan={tenant.plan.slug}")
    bits.append(f"tz={tenant.time_zone}")
    if tenant.stripe_customer_id:
        bits.append(f"stripe={tenant.stripe_customer_id}")
    bits.append(f"keys={tenant.keys}")
    if not tenant.is_active:
        bits.append("INACTIVE")
    return " ".join(bits)
