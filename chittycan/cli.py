"""The ``can`` console script: ``can <command> ...`` runs the Django management command of that name.

``can serve``, ``can apply -f chittycan.yaml``, ``can export``, ``can keys create|list|revoke|rotate``,
``can tenants create|list``, ... are all management commands of the project's apps, so they work
the same as ``python manage.py <command>``.
"""

from __future__ import annotations

import os
import sys

from django.core.management import execute_from_command_line

OUR_COMMANDS = (
    "serve",
    "quickstart",
    "apply",
    "export",
    "keys",
    "tenants",
    "otp",
    "budgets",
    "analytics",
    "metrics",
    "billing",
    "trace",
    "apitoken",
    "members",
)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chittycan.settings")
    if not args or args[0] in ("-h", "--help", "help"):
        print("usage: can <command> [options]\n\ncommands:\n  " + "\n  ".join(OUR_COMMANDS))
        print("\n`can <command> --help` for a command's options; every Django management command works too.")
        return
    execute_from_command_line(["can", *args])


if __name__ == "__main__":
    main()
