"""``can apply -f chittycan.yaml [--dry-run] [--prune]``: make the database match a configuration file."""

from __future__ import annotations

import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from control.config import apply, load, schema


class Command(BaseCommand):
    help = (
        "Sync providers, models (aliases, deployments, prices), plans and tenants (with budgets) from a YAML "
        "file, in one transaction. Idempotent: applying the same file twice changes nothing. See docs/config.md."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("-f", "--file", required=True, help="the YAML file (- for standard input)")
        parser.add_argument("--dry-run", action="store_true", help="show what would change; write nothing")
        parser.add_argument(
            "--prune",
            action="store_true",
            help="also delete models, deployments, prices, providers, plans and tenant budgets that are not in "
            "the file, and deactivate tenants that are not in it",
        )

    def handle(self, *args: Any, **opts: Any) -> None:
        path = opts["file"]
        try:
            if path == "-":
                path = "<stdin>"
                doc = load.load_text(sys.stdin.read(), filename=path)
            else:
                doc = load.load_file(path)
            result = apply.apply(doc, prune=opts["prune"], dry_run=opts["dry_run"], filename=path)
        except schema.ConfigError as exc:
            for line in exc.errors:
                self.stderr.write(line)
            count = len(exc.errors)
            raise CommandError(f"{path}: {count} error{'s' if count != 1 else ''}; nothing was written") from None
        for note in result.notes:
            self.stderr.write(f"note: {note}")
        for change in result.changes:
            self.stdout.write(str(change))
        n = len(result.changes)
        if result.dry_run:
            summary = f"dry run: {n} change{'s' if n != 1 else ''} would be made; nothing was written"
        elif n:
            summary = f"applied {path}: {n} change{'s' if n != 1 else ''}"
        else:
            summary = f"no changes: the database already matches {path}"
        self.stdout.write(self.style.SUCCESS(summary) if n and not result.dry_run else summary)
