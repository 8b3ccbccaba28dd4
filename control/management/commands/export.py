"""``can export [-o file]``: the current configuration as YAML that ``can apply`` reads back unchanged."""

from __future__ import annotations

import os
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from control.config import export


class Command(BaseCommand):
    help = (
        "Write providers, models, plans and tenants (with budgets) as YAML in the `can apply` format. "
        "Credentials are written as ${ENV_VAR} references, never in plaintext."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("-o", "--output", default="-", help="file to write (default: standard output)")

    def handle(self, *args: Any, **opts: Any) -> None:
        text = export.dump(export.export())
        if opts["output"] == "-":
            self.stdout.write(text, ending="")
            return
        tmp = f"{opts['output']}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, opts["output"])
        self.stderr.write(f"wrote {opts['output']}")
