"""``can budgets set|delete|list|reconcile|sweep``: budgets from the terminal (docs/budgets.md)."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from budgets import services
from budgets.models import Budget
from budgets.service import spend_status
from budgets.spend import subtree_ids
from budgets.tasks import reconcile, sweep_reservations
from core import money
from tenants.models import ApiKey, Tenant

ACTOR = "cli"


def usd_to_micro(text: str) -> int:
    """``"12.50"`` -> 12_500_000. Exact: more than six decimals is an error, never rounded."""
    try:
        amount = Decimal(text.strip().lstrip("$"))
    except InvalidOperation:
        raise CommandError(f"not an amount in USD: {text!r}") from None
    micro = amount * 1_000_000
    if not amount.is_finite() or amount < 0 or micro != micro.to_integral_value():
        raise CommandError(f"amount must be a non-negative USD value with at most 6 decimals: {text!r}")
    return int(micro)


def _show(name: str, value: Any) -> str:
    if value is None:
        return "none"
    if name == "limit_micro":
        return f"{money.format_usd_short(value)} USD"
    if name == "hard":
        return "hard" if value else "soft"
    return str(value)


class Command(BaseCommand):
    help = "Set, delete and list budgets; check the live counters against the ledger."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="{set,delete,list,reconcile,sweep}")
        for name, text in (("set", "create or change a budget"), ("delete", "remove a budget")):
            p = sub.add_parser(name, help=text)
            owner = p.add_mutually_exclusive_group(required=True)
            owner.add_argument("--tenant", metavar="SLUG", help="the tenant (its whole subtree counts)")
            owner.add_argument("--key", metavar="PREFIX", help="one API key, by its public prefix")
            p.add_argument("--period", choices=Budget.Period.values, default="month")
            p.add_argument(
                "--allow-weaken",
                action="store_true",
                help="allow raising a hard budget's limit or deleting it (refused otherwise)",
            )
            if name == "set":
                p.add_argument("--limit", required=True, metavar="USD", help="e.g. 100 or 12.50")
                p.add_argument(
                    "--soft",
                    action="store_true",
                    help="an alert level at this limit, never refuses (the hard budget, if any, stays)",
                )
                p.add_argument("--thresholds", default="", metavar="50,80,100", help="alert percentages")
                p.add_argument("--email", action="append", default=None, help="alert recipient (repeatable)")
            else:
                p.add_argument("--soft", action="store_true", help="delete a soft alert level, not the hard budget")
                p.add_argument("--limit", metavar="USD", help="which soft level (needed when there are several)")
        listing = sub.add_parser("list", help="budgets with their current spend")
        listing.add_argument("--tenant", metavar="SLUG", default="", help="this tenant's subtree only")
        rec = sub.add_parser("reconcile", help="compare live counters with the ledger; report drift")
        rec.add_argument("--repair", action="store_true", help="also correct drifting counters")
        sub.add_parser("sweep", help="release reservations whose lease expired")

    def handle(self, *args: Any, **opts: Any) -> None:
        getattr(self, f"_{opts['action']}")(opts)

    def _owner(self, opts: dict[str, Any]) -> dict[str, Any]:
        if opts.get("tenant"):
            tenant = Tenant.objects.filter(slug=opts["tenant"]).first()
            if tenant is None:
                raise CommandError(f"no tenant {opts['tenant']!r}")
            return {"tenant": tenant}
        key = ApiKey.objects.filter(prefix=opts["key"]).first()
        if key is None:
            raise CommandError(f"no API key with prefix {opts['key']!r}")
        return {"api_key": key}

    def _set(self, opts: dict[str, Any]) -> None:
        thresholds = None
        if opts["thresholds"]:
            try:
                thresholds = [int(t) for t in opts["thresholds"].split(",") if t.strip()]
            except ValueError:
                raise CommandError("--thresholds: comma-separated whole percentages, e.g. 50,80,100") from None
        try:
            change = services.budget_put(
                **self._owner(opts),
                period=opts["period"],
                limit_micro=usd_to_micro(opts["limit"]),
                hard=not opts["soft"],
                alert_thresholds=thresholds,
                alert_emails=opts["email"],
                allow_weaken=opts["allow_weaken"],
                actor_label=ACTOR,
            )
        except services.WeakenRefused as exc:
            raise CommandError(f"refused: {exc}; nothing changed (add --allow-weaken to do it)") from None
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from None
        budget = change.budget
        if change.before is None:
            self.stdout.write(f"created budget {budget.pk}: {budget}")
        elif not change.fields:
            self.stdout.write(f"unchanged budget {budget.pk}: {budget}")
        else:
            self.stdout.write(f"changed budget {budget.pk}: {budget}")
            for name, (old, new) in change.fields.items():
                self.stdout.write(f"  {name}: {_show(name, old)} -> {_show(name, new)}")
        others = Budget.objects.filter(period=budget.period, tenant=budget.tenant, api_key=budget.api_key).exclude(
            pk=budget.pk
        )
        for other in others.order_by("-hard", "limit_micro"):
            self.stdout.write(f"  also on this scope: budget {other.pk}: {other}")

    def _delete(self, opts: dict[str, Any]) -> None:
        rows = Budget.objects.filter(period=opts["period"], hard=not opts["soft"], **self._owner(opts))
        rows = rows.select_related("tenant", "api_key__tenant")
        if opts["limit"]:
            rows = rows.filter(limit_micro=usd_to_micro(opts["limit"]))
        found = list(rows.order_by("limit_micro"))
        if not found:
            raise CommandError(f"no such {'soft' if opts['soft'] else 'hard'} budget")
        if len(found) > 1:
            levels = ", ".join(money.format_usd_short(b.limit_micro) for b in found)
            raise CommandError(f"several soft budgets ({levels} USD): say which with --limit")
        budget = found[0]
        text = str(budget)
        try:
            services.budget_delete(budget=budget, allow_weaken=opts["allow_weaken"], actor_label=ACTOR)
        except services.WeakenRefused as exc:
            raise CommandError(f"refused: {exc}; nothing changed (add --allow-weaken to do it)") from None
        self.stdout.write(f"deleted budget {text}")

    def _list(self, opts: dict[str, Any]) -> None:
        rows = Budget.objects.select_related("tenant", "api_key__tenant").order_by("pk")
        if opts["tenant"]:
            root = Tenant.objects.filter(slug=opts["tenant"]).first()
            if root is None:
                raise CommandError(f"no tenant {opts['tenant']!r}")
            ids = subtree_ids(root.pk)
            rows = rows.filter(tenant_id__in=ids) | rows.filter(api_key__tenant_id__in=ids)
        header = f"{'scope':<32} {'period':<8} {'kind':<5} {'limit':>14} {'spent':>14} {'in flight':>12}  used"
        self.stdout.write(header)
        for b in rows:
            scope = f"tenant {b.tenant.slug}" if b.tenant else f"key {b.api_key.prefix}"  # type: ignore[union-attr]
            status = spend_status(b)
            self.stdout.write(
                f"{scope:<32} {b.period:<8} {'hard' if b.hard else 'soft':<5} "
                f"{money.format_usd(b.limit_micro):>14} {money.format_usd(status.spent_micro):>14} "
                f"{money.format_usd(status.reserved_micro):>12}  {status.percent:.1f}%"
            )

    def _reconcile(self, opts: dict[str, Any]) -> None:
        drifts = reconcile(repair=opts["repair"])
        if not drifts:
            self.stdout.write("no drift: every live counter equals the ledger")
            return
        for d in drifts:
            note = " (repaired)" if d.repaired else ""
            self.stdout.write(f"{d.counter}: live {d.live}, ledger {d.expected}, drift {d.drift:+d}{note}")
        if opts["repair"]:
            left = sum(1 for d in drifts if not d.repaired)
            self.stdout.write(f"repaired {len(drifts) - left} counter(s)")
            if left:
                raise CommandError(f"{left} counter(s) busy above the ledger, not provably wrong: run again when quiet")
        else:
            raise CommandError(f"{len(drifts)} counter(s) drift from the ledger (run with --repair to fix)")

    def _sweep(self, opts: dict[str, Any]) -> None:
        self.stdout.write(f"released {sweep_reservations()} expired reservation(s)")
